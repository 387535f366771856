"""Three control planes, each a ``comfyfleet serve`` process of its own on one PostgreSQL,
behind nginx, as deployed: work submitted to one, run by the agent connected to another,
followed from the third; and the one holding the agent killed mid-job."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg

from comfyfleet import processes
from comfyfleet.admin import create_token
from comfyfleet.throwaway_nginx import NginxServer
from comfyfleet.throwaway_postgres import PgServer
from control_plane.settings import Settings
from tests.conftest import AgentFactory, png_bytes, poll_until, sse_frames
from tests.test_dashboard import sim_config
from tests.test_e2e import WORKFLOW, curl_form
from tests.test_faults import SLOW


@dataclasses.dataclass
class Plane:
    part: processes.Part
    base: str


async def _start_planes(tmp_path: Path, url: str, planes: list[Plane]) -> None:
    """Three control planes, each put in ``planes`` as it starts (for the caller to stop)."""
    for name in "abc":
        port = processes.free_port()
        part = processes.control_plane(
            tmp_path / "cp",  # one data folder: replicas share their blob storage
            port,
            database_url=url,
            settings={"replica_id": name, "heartbeat_s": "1", "runner_grace_s": "60"},
        )
        part = dataclasses.replace(part, log=tmp_path / f"serve-{name}.log")
        await part.start()
        planes.append(Plane(part, f"http://127.0.0.1:{port}"))
    for plane in planes:
        await processes.wait_until_answers(f"{plane.base}/healthz")


async def _events(
    http: aiohttp.ClientSession, base: str, wf_id: str, headers: dict[str, str]
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with http.get(f"{base}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for _, name, data in sse_frames(resp):
            yield name, data


@dataclasses.dataclass
class Deployment:
    http: aiohttp.ClientSession
    headers: dict[str, str]
    planes: list[Plane]
    sim: str
    db_url: str

    async def call(self, method: str, base: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, base + path, headers=self.headers, **kwargs) as resp:
            return resp.status, await resp.json()

    async def holder(self, runner_id: str) -> str | None:
        """The control plane whose lease the runner's row names."""
        conn = await asyncpg.connect(self.db_url)
        try:
            return await conn.fetchval("SELECT replica_id FROM runner WHERE id = $1", runner_id)  # type: ignore[no-any-return]
        finally:
            await conn.close()


async def test_three_control_planes_behind_nginx_carry_on_when_the_agents_one_is_killed(
    tmp_path: Path, pg_server: PgServer, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory
) -> None:
    url = await pg_server.new_database()
    planes: list[Plane] = []
    nginx: NginxServer | None = None
    try:
        await _start_planes(tmp_path, url, planes)
        a, b, _ = planes
        nginx = NginxServer([urlsplit(p.base).netloc for p in planes])
        nginx.start()
        token = await create_token(
            Settings(data_dir=tmp_path / "cp", database_url=url), "alice", None, "client", None
        )
        fleet = Deployment(http, {"Authorization": f"Bearer {token}"}, planes, sim, url)
        status, runner = await fleet.call("POST", a.base, "/v1/runner", json={"name": "gpu-01"})
        assert status == 201
        # The agent dials B, and nginx once B is gone.
        await start_agent(f"{b.base},{nginx.url}", runner["token"], sim)

        async def on_b() -> bool:
            return await fleet.holder(runner["id"]) == "b"

        await poll_until(on_b, timeout_s=30)
        _, seen = await fleet.call("GET", a.base, f"/v1/runner/{runner['id']}")
        assert seen["connected"] is True  # as A knows it: from the lease B holds
        status, stats = await fleet.call("GET", a.base, f"/v1/runner/{runner['id']}/stats")
        assert status == 200 and stats["id"] == runner["id"]
        await _a_cancel_on_a_interrupts_the_prompt_on_bs_agent(fleet)
        await _b_killed_mid_job(fleet, runner["id"])
    finally:
        if nginx is not None:
            nginx.stop()
        for plane in planes:
            await plane.part.stop()


async def _a_cancel_on_a_interrupts_the_prompt_on_bs_agent(fleet: Deployment) -> None:
    a, _, c = fleet.planes
    await sim_config(fleet.http, fleet.sim, node_delays_s={"ImageInvert": 60})
    status, wf = await fleet.call("POST", a.base, "/v1/workflow", data=curl_form(SLOW))
    assert status == 201
    async for name, data in _events(fleet.http, c.base, wf["id"], fleet.headers):
        if name == "status" and data["status"] == "running":
            break
    _, running = await fleet.call("GET", a.base, f"/v1/workflow/{wf['id']}")
    status, _ = await fleet.call("POST", a.base, f"/v1/workflow/{wf['id']}/cancel")
    assert status == 200

    async def interrupted() -> bool:
        async with fleet.http.get(f"{fleet.sim}/sim/log") as resp:
            return running["prompt_id"] in (await resp.json())["interrupted"]

    await poll_until(interrupted)


async def _b_killed_mid_job(fleet: Deployment, runner_id: str) -> None:
    """Submitted on A, run by B's agent, followed on C; B is killed while it runs."""
    a, b, c = fleet.planes
    await sim_config(fleet.http, fleet.sim, node_delays_s={"SaveImage": 60})
    fields = {"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"}
    status, wf = await fleet.call("POST", a.base, "/v1/workflow", data=curl_form(WORKFLOW, **fields))
    assert status == 201
    told: list[str] = []

    async def follow() -> None:
        async for name, data in _events(fleet.http, c.base, wf["id"], fleet.headers):
            if name == "status":
                told.append(data["status"])

    stream = asyncio.create_task(follow())
    await poll_until(lambda: _said(told, "running"), timeout_s=30)
    await b.part.kill()

    async def moved() -> bool:
        # B's lease would pass for a while yet: the runner's row names its new holder.
        return await fleet.holder(runner_id) in ("a", "c")

    await poll_until(moved, timeout_s=30)  # its agent is back, through nginx, on A or C
    await sim_config(fleet.http, fleet.sim, node_delays_s={})
    await asyncio.wait_for(stream, 60)
    assert told[-1] == "completed", told
    _, done = await fleet.call("GET", c.base, f"/v1/workflow/{wf['id']}")
    assert done["status"] == "completed" and done["attempt"] in (1, 2)
    status, outputs = await fleet.call("GET", a.base, f"/v1/workflow/{wf['id']}/outputs")
    assert status == 200 and {o["node_id"] for o in outputs["outputs"]} == {"5", "6"}


async def _said(told: list[str], status: str) -> bool:
    return status in told
