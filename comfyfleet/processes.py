"""Parts of a fleet as processes of their own on 127.0.0.1, as they are deployed: the control
plane (``comfyfleet serve``), ComfyUI simulators and runner agents, each logging to a file.

For what needs a part to be killed outright (SIGKILL), frozen (SIGSTOP) or measured on its
own: the chaos run, the benchmarks and the tests that crash a part.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Part:
    """One process: started, killed, frozen and started again with the same arguments."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # Only what the caller passes configures the part, whatever this shell has exported.
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYFLEET_")} | self.env
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.running and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing cleaned up."""
        self.signal(signal.SIGCONT)  # a frozen process dies as well
        self.signal(signal.SIGKILL)
        await self.exited()

    async def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace_s``; the exit code."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.exited(), grace_s)
        except TimeoutError:
            await self.kill()
            return None

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    async def exited(self) -> int | None:
        if self.proc is None:
            return None
        return await self.proc.wait()


async def wait_until_answers(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``url`` until it answers 200, or raise TimeoutError."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout_s):
        while True:
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)  # the poll's pace


def control_plane(
    root: Path, port: int, *, database_url: str = "", settings: dict[str, str] | None = None
) -> Part:
    """``comfyfleet serve`` on ``port``; ``settings`` as ``COMFYFLEET_*`` variables by name."""
    env = {f"COMFYFLEET_{key.upper()}": str(value) for key, value in (settings or {}).items()}
    argv = [sys.executable, "-m", "comfyfleet", "serve", "--port", str(port), "--data-dir", str(root)]
    if database_url:
        argv += ["--database-url", database_url]
    return Part("control-plane", argv, root / "serve.log", env)


def simulator(root: Path, port: int, name: str = "comfyui") -> Part:
    argv = [sys.executable, "-m", "comfyui_sim", "--port", str(port), "--data-dir", str(root)]
    return Part(name, argv, root / "simulator.log")


def agent(
    root: Path,
    server: str,
    token: str,
    comfyui: str,
    *,
    name: str = "agent",
    settings: dict[str, str] | None = None,
) -> Part:
    """``python -m runner_agent``; ``settings`` as ``COMFYFLEET_AGENT_*`` variables by name."""
    env = {f"COMFYFLEET_AGENT_{key.upper()}": str(value) for key, value in (settings or {}).items()}
    token_file = root / "runner.token"
    root.mkdir(parents=True, exist_ok=True)
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    argv = [
        sys.executable,
        "-m",
        "runner_agent",
        "--server",
        server,
        "--token-file",
        str(token_file),
        "--comfyui",
        comfyui,
        "--data-dir",
        str(root / "data"),
        "--log-json",
    ]
    return Part(name, argv, root / "agent.log", env)
