"""The event log behind the streams: each logged event goes out with an ``id:``, and a client
that reconnects with ``Last-Event-ID`` gets exactly the events it missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tests.conftest import AgentFactory, ControlPlane, png_bytes, sse_frames
from tests.test_e2e import WORKFLOW, submit

Frame = tuple[str | None, str, dict[str, Any]]  # id, event, data


async def frames(cp: ControlPlane, wf_id: str, last_event_id: str | None = None) -> AsyncIterator[Frame]:
    """A stream's frames as a client reads them, until the server ends it."""
    headers = await cp.headers()
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    async with cp.http.get(f"{cp.base}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for frame in sse_frames(resp):
            yield frame


async def whole_stream(cp: ControlPlane, wf_id: str) -> list[Frame]:
    async with asyncio.timeout(30):
        return [frame async for frame in frames(cp, wf_id)]


async def resumed(cp: ControlPlane, wf_id: str, last_event_id: str) -> list[Frame]:
    async with asyncio.timeout(30):
        return [frame async for frame in frames(cp, wf_id, last_event_id)]


async def run_one(cp: ControlPlane, sim: str, start_agent: AgentFactory) -> tuple[str, list[Frame]]:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    await cp.services.fleet.wait_for(lambda: cp.services.registry.get(runner["id"]) is not None, 20)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "a fox", "$input_image": png_bytes((9, 9, 9))})
    return wf["id"], await whole_stream(cp, wf["id"])


async def test_a_client_that_reconnects_with_the_last_event_id_gets_exactly_what_it_missed(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    wf_id, whole = await run_one(cp, sim, start_agent)
    assert whole[0][0] is None and whole[0][1] == "status"  # the status it was in: not an event
    logged = whole[1:]
    assert all(event_id is not None for event_id, _, _ in logged)
    assert len({event_id for event_id, _, _ in logged}) == len(logged)
    names = [name for _, name, _ in logged]
    assert {"status", "node", "output"} <= set(names) and logged[-1][2]["status"] == "completed"
    # Cut anywhere: the rest, no more, no less, in order (and the stream ends with it).
    for cut in sorted({0, 1, len(logged) // 2, len(logged) - 2}):
        event_id = logged[cut][0]
        assert event_id is not None
        assert await resumed(cp, wf_id, event_id) == logged[cut + 1 :], cut
    last_id = logged[-1][0]
    assert last_id is not None
    assert await resumed(cp, wf_id, last_id) == []  # it had everything: the stream just ends


async def test_an_unknown_last_event_id_starts_the_stream_from_the_status(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    wf_id, _ = await run_one(cp, sim, start_agent)
    again = await resumed(cp, wf_id, "not-an-event-of-ours")
    assert [(event_id, name, data["status"]) for event_id, name, data in again] == [
        (None, "status", "completed")
    ]
