"""Node and progress reports: a subscriber hears each one as it comes; the store gets them
in one write, with the job's next report, a moment later when none follows (a long node),
or before anything else changes the workflow (a cancel, a rerun)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, start_control_plane
from tests.test_e2e import WORKFLOW, sim_config, submit

FIELDS = {"$prompt": "p", "$input_image": png_bytes((1, 2, 3))}


async def tasks_of(cp: ControlPlane, wf_id: str) -> dict[str, str]:
    _, body = await cp.request("GET", f"/v1/workflow/{wf_id}")
    return {t["node_id"]: t["status"] for t in body["tasks"]}


async def until_node_starts(cp: ControlPlane, wf_id: str, node_id: str) -> list[tuple[str, str]]:
    """The node events the stream brought until ``node_id`` started executing."""
    heard: list[tuple[str, str]] = []
    async with asyncio.timeout(20):
        async for event, data in cp.events(wf_id):
            if event == "node":
                heard.append((data["node_id"], data["event"]))
                if (node_id, "executing") in heard:
                    return heard
    raise AssertionError(f"the stream ended before node {node_id} started: {heard}")


async def long_job(cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession) -> str:
    """A workflow running on a fresh runner whose invert node takes a minute; its id."""
    await sim_config(http, sim, node_delays_s={"ImageInvert": 60.0})
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    return str((await submit(cp, WORKFLOW, **FIELDS))["id"])


async def test_every_node_event_is_streamed_and_every_task_recorded(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **FIELDS)
    heard: list[tuple[str, str]] = []
    async with asyncio.timeout(30):
        async for event, data in cp.events(wf["id"]):
            if event == "node":
                heard.append((data["node_id"], data["event"]))
            if event == "status" and data["status"] == "completed":
                break
    for node_id in WORKFLOW:
        assert (node_id, "executing") in heard, heard
    assert {(n, "executed") for n in ("5", "6")} <= set(heard)  # ComfyUI says it of output nodes
    assert await tasks_of(cp, wf["id"]) == dict.fromkeys(WORKFLOW, "COMPLETED")


async def test_a_long_node_is_in_progress_in_the_store_while_it_runs(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    # Nothing follows the node's start for a minute: the held reports are written anyway.
    wf_id = await long_job(cp, sim, start_agent, http)

    async def invert_in_progress() -> bool:
        return (await tasks_of(cp, wf_id)).get("2") == "IN_PROGRESS"

    await poll_until(invert_in_progress)
    assert "1" in await tasks_of(cp, wf_id)  # LoadImage, before it
    _, body = await cp.request("GET", f"/v1/workflow/{wf_id}")
    assert body["status"] == "running" and 0 < body["progress"] < 1
    await cp.request("POST", f"/v1/workflow/{wf_id}/cancel")
    await sim_config(http, sim, node_delays_s={})  # the interrupt lands at the next node


@pytest.fixture
async def holding_cp(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> AsyncIterator[ControlPlane]:
    """A control plane that holds node reports for an hour unless something takes them."""
    runner, base, app, settings = await start_control_plane(
        tmp_path, heartbeat_s=1.0, database_url=database_url, node_report_write_s=3600.0
    )
    yield ControlPlane(base, settings, app, runner, http)
    await runner.cleanup()


async def test_held_node_reports_are_written_before_a_cancel(
    holding_cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    cp = holding_cp
    wf_id = await long_job(cp, sim, start_agent, http)
    heard = await until_node_starts(cp, wf_id, "2")
    assert ("1", "executing") in heard
    status, body = await cp.request("POST", f"/v1/workflow/{wf_id}/cancel")
    assert (status, body["status"]) == (200, "cancelled")
    await sim_config(http, sim, node_delays_s={})  # the interrupt lands at the next node
    tasks = await tasks_of(cp, wf_id)
    # The two nodes that had started are on record: the first ended when the second began,
    # the second was cut short by the cancel; the rest never began.
    assert tasks == {"1": "COMPLETED", "2": "CANCELED"}, tasks


async def test_held_node_reports_are_written_before_a_rerun_from_a_task(
    holding_cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    cp = holding_cp
    wf_id = await long_job(cp, sim, start_agent, http)
    await until_node_starts(cp, wf_id, "2")
    await sim_config(http, sim, node_delays_s={})
    async with cp.http.post(
        f"{cp.base}/api/workflow/{wf_id}/rerun",
        json={"reRunFromTaskId": "3"},
        headers=await cp.headers(),
    ) as resp:
        assert resp.status == 200, await resp.text()
    done = await cp.wait_for_status(wf_id, {"completed", "failed"}, timeout_s=30)
    assert done["status"] == "completed", done
    _, every = await cp.request("GET", f"/v1/workflow/{wf_id}/tasks")  # every attempt's tasks
    first: dict[str, Any] = {t["node_id"]: t["status"] for t in every["tasks"] if t["attempt"] == 1}
    # The first attempt's nodes that had started are on record although no status change
    # followed them (the interrupt ends the prompt at the next node boundary: one more may
    # have begun).
    assert {"1", "2"} <= set(first), every["tasks"]


async def test_a_rerun_waits_for_the_report_that_carries_the_held_ones(
    holding_cp: ControlPlane,
    sim: str,
    start_agent: AgentFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A report takes what is held and goes to the store with it; a rerun that comes
    meanwhile must not commit in between, or its new attempt fences that report out and the
    held node reports with it."""
    cp = holding_cp
    store, fleet = cp.services.store, cp.services.fleet
    wf_id = await long_job(cp, sim, start_agent, http)
    await until_node_starts(cp, wf_id, "2")
    carrying, let_go, flushing = asyncio.Event(), asyncio.Event(), asyncio.Event()
    update_current, flush = store.update_current, fleet.node_reports.flush

    async def held_back(workflow_id: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("node_events") and not carrying.is_set():
            carrying.set()  # the first write that carries node reports: held here a while
            await let_go.wait()
        return await update_current(workflow_id, *args, **kwargs)

    async def noted_flush(workflow_id: str) -> None:
        flushing.set()
        await flush(workflow_id)

    monkeypatch.setattr(store, "update_current", held_back)
    monkeypatch.setattr(fleet.node_reports, "flush", noted_flush)
    await sim_config(http, sim, node_delays_s={})
    await asyncio.wait_for(carrying.wait(), 20)
    rerun = asyncio.create_task(
        cp.request("POST", f"/api/workflow/{wf_id}/rerun", json={"reRunFromTaskId": "3"})
    )

    async def rerun_waits_or_went_through() -> bool:
        return rerun.done() or (flushing.is_set() and fleet.node_reports.carrying(wf_id))

    await poll_until(rerun_waits_or_went_through)
    let_go.set()
    status, _ = await rerun
    assert status == 200
    done = await cp.wait_for_status(wf_id, {"completed", "failed"}, timeout_s=30)
    assert done["status"] == "completed", done
    _, every = await cp.request("GET", f"/v1/workflow/{wf_id}/tasks")
    first = {t["node_id"] for t in every["tasks"] if t["attempt"] == 1}
    assert {"1", "2"} <= first, every["tasks"]  # what the held-back write carried is on record
