"""``--comfyui-cmd``: the agent starts ComfyUI, restarts it when it dies, reports the runner
unhealthy meanwhile and stops it on exit. Real processes throughout: the simulator as the
supervised ComfyUI, and small Python programs that misbehave in the ways ComfyUI can."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocol.messages import CapacityUpdate, Hello, JobDone, Ready
from runner_agent.agent import Agent
from runner_agent.capacity import NvmlProbe
from runner_agent.comfyui import ComfyUIClient
from runner_agent.supervisor import ComfyUIProcess
from tests.test_agent_e2e import FakeControlPlane, empty_image_job, make_settings, running
from tests.test_capacity import DRIVER_NOT_LOADED, FakeNvml

pytestmark = pytest.mark.timeout(40)
WAIT_S = 15.0


@pytest.fixture
async def cp() -> AsyncIterator[FakeControlPlane]:
    plane = FakeControlPlane()
    await plane.start()
    try:
        yield plane
    finally:
        await plane.close()


def no_driver() -> NvmlProbe:
    fake = FakeNvml([])
    fake.init_error = DRIVER_NOT_LOADED
    return NvmlProbe(fake)


class Listener:
    """A TCP server on 127.0.0.1 that the test programs dial: each connection says "I am up"
    and its end says "I am gone", without any sleep in the test."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        self.connections.put_nowait(reader)

    async def next_connection(self) -> asyncio.StreamReader:
        return await asyncio.wait_for(self.connections.get(), WAIT_S)

    def program(self, *, ignore_sigterm: bool = False) -> str:
        """Python source that dials this listener and then idles until it is killed."""
        lines = ["import signal, socket, time"]
        if ignore_sigterm:
            lines.append("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
        lines += [
            f"s = socket.create_connection(('127.0.0.1', {self.port}))",
            "print('dialled', flush=True)",
            # Idles in the child program; the test itself never sleeps.
            "time.sleep(120)",
        ]
        return "; ".join(lines)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the peer's end of the connection went away (the process holding it died)."""
    return await asyncio.wait_for(reader.read(), WAIT_S) == b""


@contextlib.asynccontextmanager
async def supervising(
    cmd: list[str], states: asyncio.Queue[str | None], **kwargs: float
) -> AsyncIterator[ComfyUIProcess]:
    """A started supervisor, stopped (if the test did not) and tidied up at the end."""
    timings = {"start_timeout_s": 60.0, "restart_max_s": 30.0, "stop_grace_s": 5.0, **kwargs}
    # Nothing listens on port 9 of 127.0.0.1: these programs never answer as ComfyUI.
    comfy = ComfyUIClient("http://127.0.0.1:9")
    process = ComfyUIProcess(shlex.join(cmd), comfy, on_state=states.put_nowait, **timings)
    process.start()
    try:
        yield process
    finally:
        await process.stop()
        await comfy.close()


async def next_state(states: asyncio.Queue[str | None]) -> str | None:
    return await asyncio.wait_for(states.get(), WAIT_S)


# -- the agent with a supervised simulator -------------------------------------------------------


async def test_supervised_comfyui_is_restarted_and_the_runner_says_so(
    tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runner_agent.supervisor")
    url = f"http://127.0.0.1:{unused_tcp_port}"
    cmd = [
        sys.executable,
        "-m",
        "comfyui_sim",
        "--port",
        str(unused_tcp_port),
        "--data-dir",
        str(tmp_path / "sim"),
    ]
    settings = make_settings(tmp_path, cp, url, comfyui_cmds=(shlex.join(cmd),), comfyui_restart_max_s=0.2)
    agent = Agent(settings, nvml=no_driver())
    process = agent.processes[0]
    async with running(agent):
        first = (await cp.next(lambda m: isinstance(m, Hello))).message
        assert isinstance(first, Hello)
        if not first.healthy:  # the agent dials before its ComfyUI is up, as a rule
            assert first.unhealthy_reason == f"ComfyUI at {url} is starting"
            first = (await cp.next(lambda m: isinstance(m, Hello))).message
            assert isinstance(first, Hello)
        assert first.healthy and "SaveImage" in first.comfyui.node_classes
        await cp.next(lambda m: isinstance(m, Ready))
        await cp.send(empty_image_job("wf-before"))
        assert isinstance((await cp.until_job_ends("wf-before"))[-1], JobDone)

        first_pid = process.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        # Told at once, not at the next heartbeat (30 s away here).
        update = (await cp.next(lambda m: isinstance(m, CapacityUpdate))).message
        assert isinstance(update, CapacityUpdate) and update.healthy is False
        assert update.unhealthy_reason in (
            f"ComfyUI at {url} is restarting (exited with code -9)",
            f"ComfyUI at {url} is starting",
        )
        offered = (await cp.next(lambda m: isinstance(m, Ready))).message
        assert isinstance(offered, Ready) and offered.free_slots == 0

        # Back up: a fresh hello with what the restarted ComfyUI offers, then work again.
        again = (await cp.next(lambda m: isinstance(m, Hello))).message
        assert isinstance(again, Hello) and again.healthy and "SaveImage" in again.comfyui.node_classes
        ready = (await cp.next(lambda m: isinstance(m, Ready))).message
        assert isinstance(ready, Ready) and ready.free_slots == 1
        await cp.send(empty_image_job("wf-after"))
        assert isinstance((await cp.until_job_ends("wf-after"))[-1], JobDone)
        second_pid = process.pid
    assert process.starts == 2 and second_pid not in (None, first_pid)
    # Stopping the agent stopped its ComfyUI with SIGTERM, which it obeys with a clean exit.
    assert process.pid is None and process.returncode == 0
    assert second_pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(second_pid, 0)
    # ComfyUI's own output went through the agent's logging.
    assert any(f"Running on {url}" in r.getMessage() for r in caplog.records)


# -- the supervisor on its own -------------------------------------------------------------------


async def test_a_comfyui_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    async with Listener() as listener:
        cmd = [sys.executable, "-c", listener.program(ignore_sigterm=True)]
        async with supervising(cmd, states, stop_grace_s=0.3) as process:
            connection = await listener.next_connection()
            loop = asyncio.get_running_loop()
            started = loop.time()
            await process.stop()
            assert loop.time() - started >= 0.3
            assert process.returncode == -signal.SIGKILL
            assert await closed(connection)
    assert await next_state(states) == "starting"
    assert states.empty()  # nothing reported while stopping


async def test_stop_ends_everything_the_command_started() -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    async with Listener() as listener:
        child = shlex.join([sys.executable, "-c", listener.program()])
        # A wrapper shell that waits for the real program, as launch scripts do.
        async with supervising(["sh", "-c", f"{child} & wait"], states) as process:
            connection = await listener.next_connection()
            await process.stop()
            assert await closed(connection)


async def test_what_outlives_a_dead_leader_is_killed_before_the_restart() -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    async with Listener() as listener:
        # The leader starts the real program (in the leader's process group), waits until
        # it dialled, and exits: the program would go on holding ComfyUI's port.
        program = listener.program()
        leader = (
            "import subprocess, sys; "
            f"child = subprocess.Popen([sys.executable, '-c', {program!r}], stdout=subprocess.PIPE); "
            "child.stdout.readline()"
        )
        async with supervising([sys.executable, "-c", leader], states):
            connection = await listener.next_connection()
            assert await closed(connection)
            assert await next_state(states) == "starting"
            assert await next_state(states) == "restarting (exited with code 0 while starting)"


async def test_a_comfyui_that_never_answers_is_restarted() -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    async with Listener() as listener:
        cmd = [sys.executable, "-c", listener.program()]
        async with supervising(cmd, states, start_timeout_s=0.5, restart_max_s=0.1):
            first = await listener.next_connection()
            assert await closed(first)  # terminated for not answering
            await listener.next_connection()  # and started again
    assert [await next_state(states) for _ in range(3)] == [
        "starting",
        "restarting (did not answer within 0.5 s of its start)",
        "starting",
    ]


async def test_a_command_that_cannot_start_is_retried_with_the_reason(tmp_path: Path) -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    cmd = [str(tmp_path / "no-such-comfyui"), "--port", "8188"]
    async with supervising(cmd, states, restart_max_s=0.05) as process:
        assert await next_state(states) == "starting"
        assert await next_state(states) == "restarting (could not be started: No such file or directory)"
        assert await next_state(states) == "starting"  # tried again: the file may appear
    assert process.pid is None and process.starts == 0


async def test_a_comfyui_that_exits_while_starting_is_restarted() -> None:
    states: asyncio.Queue[str | None] = asyncio.Queue()
    async with supervising(
        [sys.executable, "-c", "raise SystemExit(3)"], states, restart_max_s=0.05
    ) as process:
        assert await next_state(states) == "starting"
        assert await next_state(states) == "restarting (exited with code 3 while starting)"
        assert await next_state(states) == "starting"
    assert process.starts >= 1
