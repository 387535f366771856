"""The agent as a daemon: ``python -m runner_agent`` as a real process against a real control
plane and the ComfyUI simulator. SIGTERM drains it: the running job finishes and is reported,
no new job is taken, the connection closes with 1001, and the process exits 0. Its log is one
JSON object per line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ControlPlane

pytestmark = pytest.mark.timeout(60)
WAIT_S = 20.0

SLOW_WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "$text(prefix, d)"}},
}


class AgentProcess:
    """The agent in a process of its own; its JSON log lines are parsed as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.entries: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                self.entries.put_nowait(json.loads(line))

    async def log_entry(self, needle: str) -> dict[str, Any]:
        """The next log entry whose message holds ``needle``."""
        async with asyncio.timeout(WAIT_S):
            while True:
                entry = await self.entries.get()
                if needle in str(entry.get("message")):
                    return entry

    async def exit_code(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), WAIT_S)
        await self._reader
        return code


@contextlib.asynccontextmanager
async def agent_process(*args: str) -> AsyncIterator[AgentProcess]:
    # Only what the test passes configures the agent, whatever this shell has exported.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYFLEET_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runner_agent",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    agent = AgentProcess(proc)
    try:
        yield agent
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def workflow_form(prefix: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("name", prefix)
    form.add_field(
        "workflow_json", json.dumps(SLOW_WORKFLOW), filename="workflow.json", content_type="application/json"
    )
    form.add_field("$prefix", prefix)
    return form


async def submit(cp: ControlPlane, prefix: str) -> str:
    status, body = await cp.request("POST", "/v1/workflow", data=workflow_form(prefix))
    assert status == 201, body
    return str(body["id"])


async def test_sigterm_drains_the_running_job_takes_no_new_one_and_exits_0(
    tmp_path: Path,
    cp: ControlPlane,
    sim: str,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="control_plane")
    async with http.post(f"{sim}/sim/config", json={"node_delays_s": {"ImageInvert": 2.0}}) as resp:
        assert resp.status == 200
    runner = await cp.create_runner(name="daemon")
    token_file = tmp_path / "agent.token"
    token_file.write_text(runner["token"] + "\n")
    token_file.chmod(0o600)
    first = await submit(cp, "first")

    async with agent_process(
        "--server",
        cp.base,
        "--token-file",
        str(token_file),
        "--comfyui",
        sim,
        # Two slots: the control plane would send the second job at once unless told not to.
        "--slots",
        "2",
        "--data-dir",
        str(tmp_path / "agent"),
        "--shutdown-grace-s",
        "20",
        "--log-json",
    ) as agent:
        running = await cp.wait_for_status(first, {"running"}, timeout_s=WAIT_S)
        assert running["status"] == "running"
        agent.proc.send_signal(signal.SIGTERM)
        drain = await agent.log_entry("draining")
        assert drain["logger"] == "runner_agent.agent" and "1 running job(s)" in drain["message"]

        second = await submit(cp, "second")
        done = await cp.wait_for_status(first, {"completed", "failed", "cancelled"}, timeout_s=WAIT_S)
        assert done["status"] == "completed", done
        assert await agent.exit_code() == 0

    _, later = await cp.request("GET", f"/v1/workflow/{second}")
    # Never dispatched: the draining runner took back the slot it had offered.
    assert (later["status"], later["runner_id"], later["attempt"]) == ("accepted", None, 1)
    # Every line of the agent's log is one JSON object, with the workflow named where it acts.
    entries = [json.loads(line) for line in agent.lines]
    assert entries and all({"at", "level", "logger", "message"} <= entry.keys() for entry in entries)
    assert any(first in entry["message"] for entry in entries)
    assert not any(second in entry["message"] for entry in entries)
    # The control plane saw it go away politely.
    assert any(
        "disconnected" in r.getMessage() and "1001" in r.getMessage()
        for r in caplog.records
        if r.name.startswith("control_plane")
    )
