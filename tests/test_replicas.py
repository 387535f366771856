"""Control planes sharing one PostgreSQL database: work submitted to one runs on an agent
connected to another."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

import control_plane.fleet.dispatch as dispatch
from comfyfleet.throwaway_postgres import PgServer
from tests.conftest import AgentFactory, control_planes, png_bytes, poll_until
from tests.test_e2e import WORKFLOW, submit


async def test_a_workflow_submitted_to_one_control_plane_runs_on_an_agent_of_another(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        runner = await a.create_runner(tags=["gpu"])
        await start_agent(b.base, runner["token"], sim)  # the only agent, on B
        await b.services.fleet.wait_for(lambda: b.services.registry.get(runner["id"]) is not None, 20)
        fields = {"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"}
        submitted = [await submit(a, WORKFLOW, tags="gpu", **fields) for _ in range(3)]
        done: dict[str, Any] = {}

        async def all_completed() -> bool:
            for wf in submitted:
                _, done[wf["id"]] = await a.request("GET", f"/v1/workflow/{wf['id']}")
            return all(d["status"] == "completed" for d in done.values())

        await poll_until(all_completed, timeout_s=30)
        assert {d["runner_id"] for d in done.values()} == {runner["id"]}
        assert all(d["attempt"] == 1 for d in done.values())  # each ran once, not once per replica
        for wf in submitted:
            status, listing = await a.request("GET", f"/v1/workflow/{wf['id']}/outputs")
            assert status == 200 and {o["node_id"] for o in listing["outputs"]} == {"5", "6"}


async def test_a_waiting_workflow_whose_announcement_was_lost_is_found_by_the_sweep(
    tmp_path: Path,
    pg_server: PgServer,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "WAITING_SWEEP_S", 0.2)
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, heartbeat_s=1.0) as (a, b):
        runner = await a.create_runner()
        await start_agent(b.base, runner["token"], sim)
        await b.services.fleet.wait_for(lambda: b.services.registry.get(runner["id"]) is not None, 20)

        # A commits the workflow and says nothing, as if it died before its NOTIFY.
        async def silent(workflow_id: str) -> None:
            return None

        monkeypatch.setattr(a.services.store, "announce_waiting", silent)
        wf = await submit(a, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
        done = await b.wait_for_status(wf["id"], {"completed", "failed", "invalid"})
        assert done["status"] == "completed" and done["runner_id"] == runner["id"]
