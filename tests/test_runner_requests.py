"""POST /v1/runner/{id}/interrupt and GET /v1/runner/{id}/stats go through the agent's
connection, never to the runner's ComfyUI directly."""

from __future__ import annotations

import aiohttp

from tests.conftest import AgentFactory, ControlPlane, png_bytes
from tests.test_e2e import WORKFLOW, sim_config, submit


async def test_stats_come_live_from_the_agent(cp: ControlPlane, sim: str, start_agent: AgentFactory) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    await cp.services.fleet.wait_for(lambda: cp.services.registry.get(runner["id"]) is not None, timeout_s=10)
    status, stats = await cp.request("GET", f"/v1/runner/{runner['id']}/stats")
    assert status == 200, stats
    assert stats["capacity"]["host"]["memory_total_bytes"] > 0
    (system,) = stats["system_stats"]
    assert system["system"]["comfyui_version"] == "0.3.64"
    assert stats["instances"][0]["url"] == sim


async def test_interrupt_stops_what_the_runner_runs(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    await sim_config(http, sim, node_delays_s={"LoadImage": 1.0})
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    running = await cp.wait_for_status(wf["id"], {"running"})
    status, body = await cp.request("POST", f"/v1/runner/{runner['id']}/interrupt")
    assert status == 200, body
    assert running["prompt_id"] in body["interrupted"]
    done = await cp.wait_for_status(wf["id"], {"completed", "failed", "cancelled"})
    assert done["status"] == "failed"
    assert done["exception_type"] == "Interrupted"


async def test_runner_requests_fail_clearly_when_offline_or_foreign(cp: ControlPlane) -> None:
    runner = await cp.create_runner(name="sleeper")
    status, body = await cp.request("GET", f"/v1/runner/{runner['id']}/stats")
    assert (status, body["message"]) == (409, "runner sleeper is offline")
    status, body = await cp.request("POST", f"/v1/runner/{runner['id']}/interrupt")
    assert (status, body["message"]) == (409, "runner sleeper is offline")
    status, _ = await cp.request("GET", f"/v1/runner/{runner['id']}/stats", account="mallory")
    assert status == 404
