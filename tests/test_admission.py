"""A herd of agents connecting at once is let in at a pace: past ``max_handshakes`` handshakes
in progress an agent is closed with ``busy`` and told when to come back, and the agent waits
at least that long before it tries again."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from control_plane.fleet.admission import MAX_RETRY_AFTER_S, Admission
from protocol.capacity import Capacity
from protocol.closing import Close, retry_after
from protocol.messages import CapacityUpdate, ComfyUIInfo, Hello, Message, Welcome, dump_message
from runner_agent.config import AgentSettings
from runner_agent.connection import ControlPlaneConnection
from tests.conftest import ControlPlane, start_control_plane


async def test_handshakes_go_in_order_and_those_past_the_queue_are_told_when_to_come_back() -> None:
    now = [0.0]
    admission = Admission(limit=2, queue_limit=2, clock=lambda: now[0])
    first, second, third, fourth = (admission.arrive() for _ in range(4))
    assert first is not None and second is not None and first.done() and second.done()
    assert third is not None and fourth is not None and not third.done() and not fourth.done()
    assert admission.arrive() is None  # the queue is full too
    admission.depart(first, 0.1)
    assert third.done() and not fourth.done()  # first come, first served
    admission.depart(fourth, 0.0)  # it left while waiting: its place goes
    assert admission.waiting == 0
    admission.depart(second, 0.1)
    admission.depart(third, 0.1)
    assert admission.in_progress == 0


async def test_the_later_a_herd_member_is_turned_away_the_later_it_is_told_to_come_back() -> None:
    now = [0.0]
    admission = Admission(limit=2, queue_limit=0, clock=lambda: now[0])
    held = [admission.arrive(), admission.arrive()]
    for _ in range(50):  # handshakes have been taking 0.1 s: 20 a second, two at a time
        turn = held.pop(0)
        assert turn is not None
        admission.depart(turn, 0.1)
        held.append(admission.arrive())
    hints = []
    for _ in range(6):
        assert admission.arrive() is None
        hints.append(admission.retry_after_s())
    # The n-th turned away this second comes back once n more handshakes could have run.
    assert hints == pytest.approx([0.5 + n / 20 for n in range(1, 7)], rel=0.02)
    now[0] = 1.5  # a new second: the count starts again
    assert admission.arrive() is None and admission.retry_after_s() == pytest.approx(0.55, rel=0.02)
    for _ in range(10_000):
        admission.arrive()
    assert admission.retry_after_s() == MAX_RETRY_AFTER_S


def hello() -> Hello:
    return Hello(agent_version="test", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))


@contextlib.asynccontextmanager
async def admitting(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str, queue: int
) -> AsyncIterator[ControlPlane]:
    """A control plane that lets one handshake run at a time and ``queue`` more wait."""
    runner, base, app, settings = await start_control_plane(
        tmp_path, database_url=database_url, max_handshakes=1, handshake_queue=queue
    )
    try:
        yield ControlPlane(base, settings, app, runner, http)
    finally:
        await runner.cleanup()


async def open_socket(cp: ControlPlane, token: str) -> ClientConnection:
    url = cp.base.replace("http", "ws") + "/v1/agent/connect"
    return await connect(url, additional_headers={"Authorization": f"Bearer {token}"})


async def test_a_connect_past_the_handshake_limit_is_told_when_to_come_back(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    async with admitting(tmp_path, http, database_url, queue=0) as cp:
        first, second = await cp.create_runner(name="first"), await cp.create_runner(name="second")
        holding = await open_socket(cp, first["token"])  # in its handshake until it says hello
        refused = await open_socket(cp, second["token"])
        try:
            await asyncio.wait_for(refused.recv(), 10)
            raise AssertionError("a connect past the limit was let in")
        except ConnectionClosed:
            pass
        assert refused.close_code == Close.BUSY
        hint = retry_after(refused.close_reason)
        assert hint is not None and hint >= 0.5
        # The one holding the slot finishes its handshake; then there is room again.
        await holding.send(dump_message(hello()))
        assert json.loads(await asyncio.wait_for(holding.recv(), 10))["type"] == "welcome"
        again = await open_socket(cp, second["token"])
        await again.send(dump_message(hello()))
        assert json.loads(await asyncio.wait_for(again.recv(), 10))["type"] == "welcome"
        await holding.close()
        await again.close()


class Handler:
    """The least an agent must answer for its connection to the control plane."""

    def __init__(self) -> None:
        self.welcomed = asyncio.Event()

    async def hello(self, buffered: set[Any]) -> Hello:
        return hello()

    async def on_welcome(self, welcome: Welcome) -> None:
        self.welcomed.set()

    async def on_connected(self) -> None:
        pass

    async def on_message(self, message: Message) -> None:
        pass

    async def capacity(self) -> CapacityUpdate:
        return CapacityUpdate(capacity=Capacity())


async def test_an_agent_turned_away_waits_at_least_as_long_as_it_was_asked(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    async with admitting(tmp_path, http, database_url, queue=0) as cp:
        first, second = await cp.create_runner(name="first"), await cp.create_runner(name="second")
        holding = await open_socket(cp, first["token"])
        pauses: list[float] = []
        paused = asyncio.Event()

        async def pause(seconds: float) -> None:
            pauses.append(seconds)  # recorded, not slept: the test lets it go on at once
            paused.set()

        handler = Handler()
        agent_settings = AgentSettings(
            server_url=cp.base, token=second["token"], reconnect_initial_s=0.1, reconnect_jitter=0.2
        ).validate()
        connection = ControlPlaneConnection(agent_settings, handler, sleep=pause, rand=lambda: 0.5)
        running = asyncio.create_task(connection.run())
        await asyncio.wait_for(paused.wait(), 10)
        # Asked to come back in half a second or more: the backoff alone would be 0.09 s.
        assert pauses[0] >= 0.5 * (1 + 0.2 * 0.5)
        await holding.send(dump_message(hello()))
        assert json.loads(await asyncio.wait_for(holding.recv(), 10))["type"] == "welcome"
        await asyncio.wait_for(handler.welcomed.wait(), 10)
        await connection.stop()
        await asyncio.wait_for(running, 10)
        await holding.close()


async def test_an_agent_in_the_queue_is_welcomed_once_the_one_ahead_is_through(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    async with admitting(tmp_path, http, database_url, queue=1) as cp:
        a, b, c = [await cp.create_runner(name=n) for n in ("a", "b", "c")]
        holding = await open_socket(cp, a["token"])
        waiting = await open_socket(cp, b["token"])
        await waiting.send(dump_message(hello()))  # said, but not yet heard: its turn comes later
        refused = await open_socket(cp, c["token"])
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(refused.recv(), 10)
        assert refused.close_code == Close.BUSY
        await holding.send(dump_message(hello()))
        assert json.loads(await asyncio.wait_for(holding.recv(), 10))["type"] == "welcome"
        assert json.loads(await asyncio.wait_for(waiting.recv(), 10))["type"] == "welcome"
        await holding.close()
        await waiting.close()
