"""A runner that goes silent without closing its socket (a dead host, a cut cable) is
dropped after runner_timeout_s, and its job then moves on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from protocol.capacity import Capacity
from protocol.messages import ComfyUIInfo, Hello, Ready, dump_message
from tests.conftest import ControlPlane, start_control_plane
from tests.test_e2e import curl_form

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "l"}},
}


@asynccontextmanager
async def agent_holding_a_job(cp: ControlPlane, name: str) -> AsyncIterator[tuple[ClientConnection, str]]:
    """A bare agent (a websocket speaking the protocol by hand) that took one job."""
    runner = await cp.create_runner(name=name)
    url = cp.base.replace("http", "ws") + "/v1/agent/connect"
    async with connect(url, additional_headers={"Authorization": f"Bearer {runner['token']}"}) as ws:
        hello = Hello(agent_version="test", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))
        await ws.send(dump_message(hello))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(dump_message(Ready(free_slots=1)))
        status, body = await cp.request("POST", "/v1/workflow", data=curl_form(TRIVIAL))
        assert status == 201
        job = json.loads(await ws.recv())
        assert (job["type"], job["workflow_id"]) == ("job", body["id"])
        yield ws, body["id"]


async def test_silent_runner_is_dropped_and_its_job_requeued(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, base, app, settings = await start_control_plane(
        tmp_path, heartbeat_s=0.5, runner_timeout_s=1.5, runner_grace_s=0.5, max_attempts=2
    )
    try:
        cp = ControlPlane(base, settings, app, runner, http)
        async with agent_holding_a_job(cp, "silent") as (ws, wf_id):
            # From here on the agent says nothing and never closes its end.
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == 4005
        registry = cp.services.registry
        await cp.services.fleet.wait_for(lambda: not registry.all(), timeout_s=5)
        async with asyncio.timeout(5):
            async for event, data in cp.events(wf_id):
                if event == "status" and data["attempt"] == 2:
                    break
        assert (data["status"], data["runner_id"]) == ("accepted", None)  # waiting for another runner
    finally:
        await runner.cleanup()


async def test_an_agent_that_says_goodbye_hands_its_jobs_back_at_once(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # A grace period far longer than the test: only an immediate hand-back passes.
    runner, base, app, settings = await start_control_plane(tmp_path, runner_grace_s=600)
    try:
        cp = ControlPlane(base, settings, app, runner, http)
        async with agent_holding_a_job(cp, "leaving") as (ws, wf_id):
            await ws.close(1001, "agent stopping")  # as a draining agent does
        async with asyncio.timeout(5):
            async for event, data in cp.events(wf_id):
                if event == "status" and data["attempt"] == 2:
                    break
        assert (data["status"], data["runner_id"]) == ("accepted", None)
    finally:
        await runner.cleanup()
