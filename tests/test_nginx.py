"""The control plane behind nginx (Debian's, with the project's own ``deploy/nginx.conf``):
the REST API, the event stream and the agent's websocket through one address, as deployed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from comfyfleet.throwaway_nginx import NginxServer
from tests.conftest import AgentFactory, ControlPlane, png_bytes
from tests.test_dashboard import sim_config
from tests.test_e2e import WORKFLOW, curl_form


@pytest.fixture
def nginx(cp: ControlPlane) -> Iterator[NginxServer]:
    server = NginxServer([urlsplit(cp.base).netloc])
    server.start()
    yield server
    server.stop()


async def test_a_workflow_runs_through_nginx_and_its_events_arrive_as_they_happen(
    cp: ControlPlane, nginx: NginxServer, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    runner = await cp.create_runner(tags=["gpu"])
    await start_agent(nginx.url, runner["token"], sim)  # its websocket goes through nginx
    await cp.services.fleet.wait_for(lambda: cp.services.registry.get(runner["id"]) is not None, 20)
    await sim_config(http, sim, node_delays_s={"SaveImage": 60})  # held until we let go
    headers = await cp.headers()
    fields = {"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"}
    async with http.post(
        f"{nginx.url}/v1/workflow", data=curl_form(WORKFLOW, tags="gpu", **fields), headers=headers
    ) as resp:
        assert resp.status == 201, await resp.text()
        wf_id = (await resp.json())["id"]

    seen: list[str] = []
    async with http.get(f"{nginx.url}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = json.loads(line[6:])
            if "status" not in data or "node" in data:
                continue
            seen.append(data["status"])
            if data["status"] == "running":
                # Still running (ComfyUI is held): the event came through as it was sent,
                # not when the stream ended.
                status, now = await cp.request("GET", f"/v1/workflow/{wf_id}")
                assert now["status"] == "running"
                await sim_config(http, sim, node_delays_s={})
    assert seen[-1] == "completed"
    assert "running" in seen

    async with http.get(f"{nginx.url}/v1/workflow/{wf_id}/outputs", headers=headers) as resp:
        outputs = (await resp.json())["outputs"]
    assert {o["node_id"] for o in outputs} == {"5", "6"}
    for output in outputs:
        async with http.get(f"{nginx.url}{output['src']}", headers=headers) as resp:
            through_nginx = await resp.read()
        status, direct = await cp.request("GET", output["src"])
        assert status == 200 and through_nginx == direct and direct[:4] == b"\x89PNG"


async def test_an_oversized_request_gets_the_control_planes_own_answer_through_nginx(
    cp: ControlPlane, nginx: NginxServer
) -> None:
    await cp.create_runner()
    big = b"\0" * (cp.settings.max_request_bytes + 1)
    form = curl_form(WORKFLOW, **{"$input_image": big})
    # Its own session: closing it ends the wait for the rest of the refused body.
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{nginx.url}/v1/workflow", data=form, headers=await cp.headers())
        assert resp.status == 400
        assert "exceeds the limit of 50 MB" in (await resp.json())["message"]
