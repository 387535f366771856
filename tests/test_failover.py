"""An agent given several control planes (replicas on one PostgreSQL) fails over between
them: it dials the next when the one it has cannot be reached, and its jobs' files follow."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from comfyfleet.processes import free_port
from comfyfleet.throwaway_postgres import PgServer
from tests.conftest import AgentFactory, control_planes, png_bytes
from tests.test_e2e import WORKFLOW, submit


def nothing_listens() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def test_an_agent_fails_over_to_the_next_control_plane_and_runs_its_work(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    async with control_planes(tmp_path, http, url, 2, runner_grace_s=5.0, heartbeat_s=1.0) as (a, b):
        runner = await a.create_runner(tags=["gpu"])
        # The first address answers nothing: the agent goes on to A at once.
        await start_agent(f"{nothing_listens()}, {a.base}, {b.base}", runner["token"], sim)
        await a.services.fleet.wait_for(lambda: a.services.registry.get(runner["id"]) is not None, 20)
        await a.runner.cleanup()  # A goes away: the agent tries it again, then B
        await b.services.fleet.wait_for(lambda: b.services.registry.get(runner["id"]) is not None, 20)

        # Work submitted to B runs on the agent: its input comes from B and its outputs go there.
        wf = await submit(
            b,
            WORKFLOW,
            tags="gpu",
            **{"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"},
        )
        done = await b.wait_for_status(wf["id"], {"completed", "failed", "invalid"})
        assert done["status"] == "completed", done
        assert done["runner_id"] == runner["id"]
        status, listing = await b.request("GET", f"/v1/workflow/{wf['id']}/outputs")
        assert status == 200
        assert {o["node_id"] for o in listing["outputs"]} == {"5", "6"}
        status, png = await b.request("GET", listing["outputs"][0]["src"])
        assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
