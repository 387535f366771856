"""The client commands (``comfyfleet run``, ``rerun``, ``workflows``, ``runners``, ``login``)
run as a user runs them, as processes of their own, against a real control plane, simulator
and agent: on a terminal (a pseudo-terminal) with rich's progress bar, into a pipe with one
line per change, with ``--json``, and with the server and token from ``login``'s file."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import stat
import struct
import sys
import termios
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.client import AsyncClient
from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, read_png
from tests.test_e2e import sim_config

COMFYFLEET = [sys.executable, "-m", "comfyfleet"]
# Each test starts several processes, each a second or two of imports on a busy machine.
pytestmark = pytest.mark.timeout(300)
SAMPLE = Path(__file__).resolve().parents[1] / "comfyfleet" / "samples" / "invert_scale.json"


@dataclass
class Fleet:
    cp: ControlPlane
    sim: str
    token: str
    tmp: Path

    def env(self, **extra: str) -> dict[str, str]:
        """This machine's environment without anything of comfyfleet's, a home and a
        configuration folder of the test's own, and ``extra``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYFLEET_")}
        env.update(HOME=str(self.tmp / "home"), XDG_CONFIG_HOME=str(self.tmp / "xdg"))
        return env | extra

    def flags(self) -> list[str]:
        return ["--server", self.cp.base, "--token", self.token]

    def sample_args(self, out: Path | None = None) -> list[str]:
        image = self.tmp / "fox.png"
        image.write_bytes(png_bytes((10, 200, 60)))
        args = ["run", str(SAMPLE), "-p", "prefix=fox", "-f", f"input_image={image}", "-c", "method=bilinear"]
        args += ["-p", "width=32", "-p", "height=24", "--tags", "sdxl"]
        return args + (["--out", str(out)] if out is not None else [])


@pytest.fixture
async def fleet(cp: ControlPlane, sim: str, start_agent: AgentFactory, tmp_path: Path) -> Fleet:
    token = await cp.token("acme", tier="pro")
    runner = await cp.create_runner("acme", name="gpu-01", tags=["sdxl"])
    await start_agent(cp.base, runner["token"], sim)
    return Fleet(cp, sim, token, tmp_path)


async def comfyfleet(*args: str, env: dict[str, str], stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *COMFYFLEET,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin or b""), 60)
    return proc.returncode or 0, out.decode(), err.decode()


class Reader:
    """What a process writes to a file descriptor, gathered as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = b""
        self.closed = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: a pseudo-terminal whose other side has closed
            chunk = b""
        if chunk:
            self.data += chunk
            return
        asyncio.get_running_loop().remove_reader(self.fd)
        self.closed.set()

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    async def until(self, text: str) -> None:
        async def seen() -> bool:
            return text in self.text or self.closed.is_set()

        await poll_until(seen, timeout_s=60)
        assert text in self.text, self.text


@contextlib.asynccontextmanager
async def running(
    args: list[str], env: dict[str, str], *, terminal: bool
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Reader]]:
    """The command with its stdout on a pseudo-terminal (120 columns) or a pipe."""
    theirs, ours = (pty.openpty() if terminal else os.pipe())[::-1]
    if terminal:
        fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = await asyncio.create_subprocess_exec(
        *COMFYFLEET,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=theirs,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    os.close(theirs)
    reader = Reader(ours)
    try:
        yield proc, reader
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader.closed.wait(), 10)
        os.close(ours)


async def run_holding_node_3(
    fleet: Fleet, http: aiohttp.ClientSession, out: Path, *, terminal: bool, shown: str
) -> tuple[int, str, str]:
    """``comfyfleet run`` on the sample, its ImageScale node held until the command shows
    ``shown``: the output is seen while the workflow runs, not only once it is done."""
    await sim_config(http, fleet.sim, node_delays_s={"3": 60})
    env = fleet.env(TERM="xterm-256color", COLUMNS="120")
    async with running([*fleet.sample_args(out), *fleet.flags()], env, terminal=terminal) as (proc, reader):
        await reader.until(shown)
        await sim_config(http, fleet.sim, node_delays_s={})
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), 60)
        code = await asyncio.wait_for(proc.wait(), 60)
        await asyncio.wait_for(reader.closed.wait(), 10)
    return code, reader.text, err.decode()


def saved_png(path: str) -> tuple[int, int]:
    return read_png(Path(path).read_bytes()).size


async def test_run_on_a_terminal_shows_a_progress_bar_and_saves_the_outputs(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    out = fleet.tmp / "outputs"
    code, screen, err = await run_holding_node_3(fleet, http, out, terminal=True, shown="node 3")
    assert code == 0, err
    assert "\x1b[" in screen  # drawn in place, with colours: a terminal's display
    assert "━" in screen and "100%" in screen  # rich's bar, full at the end
    assert "running" in screen and "node 3 (ImageScale)" in screen
    (saved,) = list(out.iterdir())
    assert saved.name.startswith("fox_") and saved.suffix == ".png"
    assert str(saved) in screen  # the path, printed once saved
    assert saved_png(str(saved)) == (32, 24)


async def test_run_into_a_pipe_prints_one_plain_line_per_change(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    out = fleet.tmp / "outputs"
    code, text, err = await run_holding_node_3(fleet, http, out, terminal=False, shown="node 3 (ImageScale)")
    assert code == 0, err
    assert "\x1b" not in text and "━" not in text
    lines = text.splitlines()
    (saved,) = list(out.iterdir())
    assert lines[-1] == str(saved)
    wf_id = lines[0].split()[0]
    progress = [line.removeprefix(f"{wf_id}  ") for line in lines[:-1]]
    assert all(line.startswith(f"{wf_id}  ") for line in lines[:-1]), lines
    assert any(p.startswith("running  node 3 (ImageScale)") for p in progress), progress
    assert progress[-1] == "completed  100%"
    assert len(progress) == len(set(progress))  # a line per change, none repeated
    assert saved_png(str(saved)) == (32, 24)


async def json_of(fleet: Fleet, *args: str) -> Any:
    code, text, err = await comfyfleet(*args, "--json", *fleet.flags(), env=fleet.env())
    assert code == 0, err
    return json.loads(text)


async def test_json_of_run_and_both_reruns(fleet: Fleet) -> None:
    out = fleet.tmp / "outputs"
    result = await json_of(fleet, *fleet.sample_args(out))
    wf = result["workflow"]
    assert (wf["status"], wf["name"], wf["tags"]) == ("completed", "invert_scale", ["sdxl"])
    (output,) = result["outputs"]
    assert Path(output["path"]).parent == out and saved_png(output["path"]) == (32, 24)

    child = await json_of(fleet, "rerun", wf["id"], "-p", "prefix=blue", "-p", "width=8")
    assert child["workflow"]["parent_id"] == wf["id"] and child["workflow"]["status"] == "completed"
    assert child["outputs"][0]["filename"].startswith("blue_")
    again = await json_of(fleet, "rerun", wf["id"], "--from-node", "5", "--input", "filename_prefix=v2")
    assert again["workflow"]["id"] == wf["id"] and again["workflow"]["attempt"] == 2
    assert again["outputs"][0]["filename"].startswith("v2_")
    queued = await json_of(fleet, "rerun", wf["id"], "-c", "method=area", "--no-wait")
    assert queued["parent_id"] == wf["id"]


async def test_json_of_workflows_and_runners(fleet: Fleet) -> None:
    async with AsyncClient(fleet.cp.base, fleet.token) as client:
        wf = await client.submit(
            SAMPLE, files={"input_image": png_bytes((1, 2, 3))}, params={"prefix": "p"}, tags="sdxl"
        )
        await client.wait(wf["id"])
    listed = await json_of(fleet, "workflows", "list", "--tag", "sdxl")
    assert [w["id"] for w in listed["workflows"]] == [wf["id"]] and listed["total"] == 1
    shown = await json_of(fleet, "workflows", "show", wf["id"])
    assert shown["status"] == "completed" and len(shown["tasks"]) == 5
    outputs = await json_of(fleet, "workflows", "outputs", wf["id"], "--out", str(fleet.tmp / "o"))
    assert saved_png(outputs["outputs"][0]["path"]) == (256, 256)  # the sample's default size
    assert await json_of(fleet, "workflows", "delete", wf["id"]) == {"id": wf["id"], "deleted": True}
    code, _, err = await comfyfleet("workflows", "show", wf["id"], *fleet.flags(), env=fleet.env())
    assert code == 1 and "not found (HTTP 404)" in err

    runners = await json_of(fleet, "runners", "list")
    assert [r["name"] for r in runners["runners"]] == ["gpu-01"]
    made = await json_of(fleet, "runners", "create", "gpu-02", "--tags", "a,b")
    assert made["token"] and made["tags"] == ["a", "b"]
    assert (await json_of(fleet, "runners", "disable", made["id"]))["status"] == "disabled"
    assert (await json_of(fleet, "runners", "show", made["id"]))["status"] == "disabled"


async def test_login_writes_a_private_file_the_other_commands_use(fleet: Fleet) -> None:
    env = fleet.env()
    code, text, err = await comfyfleet(
        "login", "--server", fleet.cp.base, "--token", "-", env=env, stdin=f"{fleet.token}\n".encode()
    )
    assert code == 0, err
    assert "as account 'acme'" in text
    path = fleet.tmp / "xdg" / "comfyfleet" / "client.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"server": fleet.cp.base, "token": fleet.token}

    # No flags from here on: the file says where and who.
    code, text, err = await comfyfleet("runners", "list", env=env)
    assert code == 0, err
    assert "gpu-01" in text and text.splitlines()[0].split()[:3] == ["id", "name", "status"]
    code, text, err = await comfyfleet(*fleet.sample_args(), "--no-wait", env=env)
    assert code == 0, err
    wf_id = text.strip()
    code, text, err = await comfyfleet("workflows", "list", env=env)
    assert code == 0 and wf_id in text, err

    # A token that does not work is refused before anything is written.
    code, _, err = await comfyfleet("login", "--server", fleet.cp.base, "--token", "cf_wrong", env=env)
    assert (code, err.strip()) == (1, "comfyfleet: error: invalid token (HTTP 401)")
    assert json.loads(path.read_text())["token"] == fleet.token

    # COMFYFLEET_CLIENT_CONFIG moves the file; COMFYFLEET_CLIENT_TOKEN overrides the token in it.
    elsewhere = fleet.tmp / "other" / "cf.json"
    moved = fleet.env(COMFYFLEET_CLIENT_CONFIG=str(elsewhere))
    code, _, err = await comfyfleet("login", "--server", fleet.cp.base, "--token", fleet.token, env=moved)
    assert code == 0 and stat.S_IMODE(elsewhere.stat().st_mode) == 0o600, err
    code, _, err = await comfyfleet("workflows", "list", env=env | {"COMFYFLEET_CLIENT_TOKEN": "cf_wrong"})
    assert code == 1 and "invalid token" in err


async def test_errors_are_one_line_with_the_servers_message(fleet: Fleet) -> None:
    env = fleet.env()
    code, _, err = await comfyfleet("workflows", "show", "nope", *fleet.flags(), env=env)
    assert (code, err.strip()) == (1, "comfyfleet: error: workflow nope not found (HTTP 404)")
    code, _, err = await comfyfleet(*fleet.sample_args(), "-c", "method=dpm_2", *fleet.flags(), env=env)
    assert code == 1 and "(HTTP 400)" in err and "dpm_2" in err and "Traceback" not in err
    code, _, err = await comfyfleet("workflows", "list", env=env)  # no login, no token
    assert code == 2 and "no token: run 'comfyfleet login" in err
    code, _, err = await comfyfleet("run", str(SAMPLE), "-p", "prefix", *fleet.flags(), env=env)
    assert code == 2 and "-p takes NAME=VALUE, not 'prefix'" in err
    code, _, err = await comfyfleet("run", str(fleet.tmp / "missing.json"), *fleet.flags(), env=env)
    assert code == 2 and "missing.json" in err and "Traceback" not in err


async def test_a_sweep_runs_every_combination_of_the_values_given_and_is_shown_and_cancelled(
    fleet: Fleet,
) -> None:
    async with AsyncClient(fleet.cp.base, fleet.token) as client:
        wf = await client.submit(
            SAMPLE, files={"input_image": png_bytes((1, 2, 3))}, params={"prefix": "p"}, tags="sdxl"
        )
    other = fleet.tmp / "owl.png"
    other.write_bytes(png_bytes((200, 10, 10)))
    args = [
        "sweep",
        wf["id"],
        "-p",
        "prefix=a",
        "-p",
        "prefix=b",
        "-c",
        "method=area",
        "-c",
        "method=bilinear",
    ]
    code, text, err = await comfyfleet(*args, "-f", f"input_image={other}", *fleet.flags(), env=fleet.env())
    assert code == 0, err
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["1/4", "2/4", "3/4", "4/4"]
    assert lines[4].endswith(": 4 completed") and "owl.png" in lines[6]
    table = [line.split() for line in lines[6:]]
    assert [(row[1], row[2], row[3]) for row in table] == [
        ("completed", "a", "area"),
        ("completed", "a", "bilinear"),
        ("completed", "b", "area"),
        ("completed", "b", "bilinear"),
    ]

    sweep_id = lines[4].split()[1].rstrip(":")
    shown = await json_of(fleet, "sweeps", "show", sweep_id)
    assert (shown["total"], shown["counts"], shown["parent_id"]) == (4, {"completed": 4}, wf["id"])
    assert (await json_of(fleet, "sweeps", "cancel", sweep_id))["cancelled_now"] == 0
    queued = await json_of(fleet, "sweep", wf["id"], "-p", "prefix=c", "--priority", "5", "--no-wait")
    assert queued["total"] == 1 and queued["sweep_id"] != sweep_id

    code, _, err = await comfyfleet("sweep", wf["id"], *fleet.flags(), env=fleet.env())
    assert code == 2 and "give the values to sweep" in err
    code, _, err = await comfyfleet(
        "sweep", wf["id"], "-p", "prefix=x", "--priority", "6", *fleet.flags(), env=fleet.env()
    )
    assert code == 1 and "between 0 and 5 on the pro tier" in err
