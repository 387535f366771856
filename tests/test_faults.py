"""Faults are the fleet's to absorb. A ComfyUI that is dead when its job arrives or dies
mid-prompt, a control plane away while a job finishes, a runner that fails every try: the
job runs again as the next attempt (elsewhere where it can) and only a workflow's own errors,
its timeout or its queue limit fail it. Real control plane, real agents, real simulators."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from comfyui_sim import SimSettings, start_simulator
from control_plane.db.tables import Workflow, utcnow
from control_plane.settings import DEFAULT_TIERS, Tier
from protocol.capacity import Capacity
from protocol.messages import ComfyUIInfo, Hello, JobDone, JobUpdate, Ready, dump_message
from runner_agent.capacity import NvmlProbe
from tests.conftest import AgentFactory, ControlPlane, poll_until, read_png, start_control_plane
from tests.fake_nvml import FakeNvml, h100
from tests.test_e2e import curl_form, free_port, sim_config

SLOW: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "f"}},
}
ENDS = {"completed", "failed", "invalid", "cancelled"}


@dataclass
class Box:
    """A GPU host: a runner, its agent and its own ComfyUI simulator."""

    runner: dict[str, Any]
    sim_runner: web.AppRunner
    sim: str
    agent: Any

    @property
    def id(self) -> str:
        return str(self.runner["id"])

    async def kill_comfyui(self) -> None:
        await self.sim_runner.cleanup()


async def box(
    cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory, name: str, **agent_settings: Any
) -> Box:
    sim_runner, sim = await start_simulator(SimSettings(data_dir=tmp_path / f"comfyui-{name}"), port=0)
    runner = await cp.create_runner(name=name)
    agent = await start_agent(cp.base, runner["token"], sim, **agent_settings)
    registry = cp.services.registry

    def ready() -> bool:
        conn = registry.get(runner["id"])
        return conn is not None and conn.free_slots > 0

    await cp.services.fleet.wait_for(ready, timeout_s=10)
    return Box(runner, sim_runner, sim, agent)


async def submit(cp: ControlPlane, workflow: dict[str, Any] = SLOW, **fields: str) -> str:
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(workflow, **fields))
    assert status == 201, body
    return str(body["id"])


async def sim_log(http: aiohttp.ClientSession, sim: str) -> dict[str, Any]:
    async with http.get(f"{sim}/sim/log") as resp:
        return dict(await resp.json())


async def test_a_job_sent_to_a_dead_comfyui_runs_again_elsewhere_and_that_runner_gets_no_more(
    cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory
) -> None:
    # A's agent would notice only at its next heartbeat, a minute away: the job finds out.
    a = await box(cp, tmp_path, start_agent, "a", heartbeat_s=60)
    b = await box(cp, tmp_path, start_agent, "b")
    await a.kill_comfyui()
    wf = await submit(cp)
    done = await cp.wait_for_status(wf, ENDS)
    assert (done["status"], done["attempt"], done["runner_id"]) == ("completed", 2, b.id)
    [first] = done["attempts"]
    assert (first["attempt"], first["runner_id"], first["kind"]) == (1, a.id, "infrastructure")
    assert "is unreachable" in first["reason"] and "on runner a" in first["reason"]
    conn = cp.services.registry.get(a.id)
    assert conn is not None
    await cp.services.fleet.wait_for(lambda: conn.free_slots == 0 and not conn.healthy, timeout_s=10)
    # The next workflow goes straight to B.
    nxt = await cp.wait_for_status(await submit(cp), ENDS)
    assert (nxt["status"], nxt["attempt"], nxt["runner_id"]) == ("completed", 1, b.id)


async def test_comfyui_killed_mid_prompt_runs_the_job_again_elsewhere(
    cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    a = await box(cp, tmp_path, start_agent, "a")
    await sim_config(http, a.sim, node_delays_s={"ImageInvert": 30.0})
    wf = await submit(cp)
    running = await cp.wait_for_status(wf, {"running"})
    assert running["runner_id"] == a.id
    b = await box(cp, tmp_path, start_agent, "b")
    await a.kill_comfyui()
    done = await cp.wait_for_status(wf, ENDS)
    assert (done["status"], done["attempt"], done["runner_id"]) == ("completed", 2, b.id)
    assert "ComfyUI stopped while running prompt" in done["attempts"][0]["reason"]
    _, tasks = await cp.request("GET", f"/v1/workflow/{wf}/tasks")
    lost = [t for t in tasks["tasks"] if t["attempt"] == 1 and t["node_id"] == "2"]
    assert lost and lost[0]["status"] == "CANCELED" and lost[0]["failure_kind"] == "infrastructure"


async def test_control_plane_down_for_10_s_while_a_job_finishes_loses_nothing(
    tmp_path: Path, start_agent: AgentFactory, http: aiohttp.ClientSession, database_url: str
) -> None:
    sim_runner, sim = await start_simulator(SimSettings(data_dir=tmp_path / "comfyui"), port=0)
    port = free_port()
    settings = {"port": port, "runner_grace_s": 60, "database_url": database_url}
    runner1, base, app, cp_settings = await start_control_plane(tmp_path, **settings)
    cp1 = ControlPlane(base, cp_settings, app, runner1, http)
    try:
        runner = await cp1.create_runner()
        await start_agent(base, runner["token"], sim)
        await sim_config(http, sim, node_delays_s={"ImageInvert": 1.0})
        wf = await submit(cp1)
        await cp1.wait_for_status(wf, {"running"})
        await runner1.cleanup()  # the control plane goes away mid-job
        down_at = asyncio.get_running_loop().time()

        async def prompt_done() -> bool:
            return any(p["success"] for p in (await sim_log(http, sim))["prompts"])

        await poll_until(prompt_done)  # the job finishes while nobody can take its outputs
        # The outage lasts 10 s in all (the scenario, not a wait for anything).
        await asyncio.sleep(max(0.0, 10.0 - (asyncio.get_running_loop().time() - down_at)))

        runner2, base2, app2, cp_settings2 = await start_control_plane(tmp_path, **settings)
        try:
            cp2 = ControlPlane(base2, cp_settings2, app2, runner2, http)
            cp2._tokens = cp1._tokens
            done = await cp2.wait_for_status(wf, ENDS)
            assert (done["status"], done["attempt"], done["attempts"]) == ("completed", 1, [])
            _, listing = await cp2.request("GET", f"/v1/workflow/{wf}/outputs")
            [output] = listing["outputs"]
            status, png = await cp2.request("GET", output["src"])
            assert status == 200 and hashlib.sha256(png).hexdigest() == output["sha256"]
            assert read_png(png).getpixel((0, 0)) == (255, 255, 255)  # black, inverted
        finally:
            await runner2.cleanup()
    finally:
        await sim_runner.cleanup()


async def test_a_runner_that_fails_every_attempt_ends_the_workflow_naming_each_reason(
    tmp_path: Path, start_agent: AgentFactory, http: aiohttp.ClientSession, database_url: str
) -> None:
    runner1, base, app, settings = await start_control_plane(
        tmp_path, database_url=database_url, max_attempts=2, retry_backoff_s=0, heartbeat_s=1.0
    )
    cp = ControlPlane(base, settings, app, runner1, http)
    try:
        # Two hosts whose ComfyUI died unnoticed: each attempt finds out in turn.
        for name in ("a", "b"):
            await (await box(cp, tmp_path, start_agent, name, heartbeat_s=60)).kill_comfyui()
        wf = await submit(cp)
        done = await cp.wait_for_status(wf, ENDS)
        runners = await cp_runners(cp)
    finally:
        await runner1.cleanup()
    assert (done["status"], done["attempt"], done["failure_reason"]) == ("failed", 2, "infrastructure")
    assert [e["attempt"] for e in done["attempts"]] == [1, 2]
    assert {e["runner_id"] for e in done["attempts"]} == {r["id"] for r in runners}
    message = done["exception_message"]
    assert message.startswith("gave up after 2 attempts: attempt 1: on runner ")
    assert "attempt 2: on runner " in message and message.count("is unreachable") == 2


async def cp_runners(cp: ControlPlane) -> list[dict[str, Any]]:
    _, listing = await cp.request("GET", "/v1/runner")
    return list(listing["runners"])


async def test_out_of_memory_gets_one_more_try_on_a_runner_with_more_free_gpu_memory(
    cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    oom = "CUDA out of memory. Tried to allocate 30.00 GiB"
    small = await box(cp, tmp_path, start_agent, "small", nvml=NvmlProbe(FakeNvml([h100(0, 0, 70, 30, 60)])))
    await sim_config(http, small.sim, fail_nodes={"ImageInvert": oom})
    big = await box(cp, tmp_path, start_agent, "big", nvml=NvmlProbe(FakeNvml([h100(0, 0, 2, 30, 60)])))
    wf = await submit(cp)
    done = await cp.wait_for_status(wf, ENDS)
    assert (done["status"], done["attempt"], done["runner_id"]) == ("completed", 2, big.id)
    assert done["attempts"][0]["kind"] == "out_of_memory" and done["attempts"][0]["runner_id"] == small.id
    _, conductor = await cp.request("GET", f"/v1/workflow/{wf}/tasks")
    [failed] = [t for t in conductor["tasks"] if t["attempt"] == 1 and t["node_id"] == "2"]
    assert (failed["status"], failed["failure_kind"]) == ("FAILED", "out_of_memory")
    assert oom in failed["reason"] and "more than" in failed["reason"]

    # Once retried, out of memory again is the workflow's own failure. (Another colour:
    # ComfyUI's cache would otherwise answer the same prompt without running it.)
    await sim_config(http, big.sim, fail_nodes={"ImageInvert": oom})
    other = {**SLOW, "1": {**SLOW["1"], "inputs": {**SLOW["1"]["inputs"], "color": 7}}}
    again = await cp.wait_for_status(await submit(cp, other), ENDS)
    assert (again["status"], again["failure_reason"]) == ("failed", "workflow")
    assert again["attempt"] == 2 and oom in again["exception_message"]
    _, conductor = await cp.request("GET", f"/v1/workflow/{again['id']}/tasks")
    [last] = [t for t in conductor["tasks"] if t["attempt"] == 2 and t["node_id"] == "2"]
    assert (last["status"], last["failure_kind"]) == ("FAILED", "out_of_memory")


async def test_the_workflows_own_errors_are_not_retried(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    await sim_config(http, sim, fail_nodes={"ImageInvert": "the invert broke"})
    done = await cp.wait_for_status(await submit(cp), ENDS)
    assert (done["status"], done["attempt"], done["failure_reason"], done["attempts"]) == (
        "failed",
        1,
        "workflow",
        [],
    )
    _, conductor = await cp.request("GET", f"/v1/workflow/{done['id']}/tasks")
    [failed] = [t for t in conductor["tasks"] if t["node_id"] == "2"]
    assert (failed["status"], failed["failure_kind"]) == ("FAILED", "workflow")
    assert "the invert broke" in failed["reason"]


async def test_an_attempt_past_its_timeout_is_interrupted_and_fails_with_reason_timeout(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    await sim_config(http, sim, node_delays_s={"ImageInvert": 60.0})
    wf = await submit(cp, timeout_s="1")
    done = await cp.wait_for_status(wf, ENDS)
    assert (done["status"], done["failure_reason"], done["exception_type"]) == (
        "failed",
        "timeout",
        "Timeout",
    )
    assert done["timeout_s"] == 1 and "longer than its timeout of 1 s" in done["exception_message"]

    async def interrupted() -> bool:
        log = await sim_log(http, sim)
        return set(log["queued"]) <= set(log["interrupted"])

    async def comfyui_idle() -> bool:
        async with http.get(f"{sim}/queue") as resp:
            queue = await resp.json()
        return not queue["queue_running"] and not queue["queue_pending"]

    # Its prompt was interrupted; like ComfyUI, the simulator notices at the next node start,
    # so the minute-long node is let go once the interrupt is in.
    await poll_until(interrupted)
    await sim_config(http, sim, node_delays_s={})
    await poll_until(comfyui_idle)
    assert not any(p["success"] for p in (await sim_log(http, sim))["prompts"])
    # The runner is free again.
    nxt = await cp.wait_for_status(await submit(cp), ENDS)
    assert nxt["status"] == "completed"


async def test_timeout_s_is_checked_against_the_tier_and_templates_carry_one(cp: ControlPlane) -> None:
    await cp.create_runner()
    limit = DEFAULT_TIERS["free"].max_timeout_s
    for bad, message in (
        ("0", f"between 1 and {limit} s on the free tier"),
        (str(limit + 1), f"between 1 and {limit} s on the free tier"),
        ("soon", "timeout_s must be a whole number of seconds, not 'soon'"),
    ):
        status, body = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW, timeout_s=bad))
        assert (status, message in body["message"]) == (400, True), body
    _, default = await cp.request("GET", f"/v1/workflow/{await submit(cp)}")
    assert default["timeout_s"] == DEFAULT_TIERS["free"].default_timeout_s

    form = aiohttp.FormData()
    form.add_field("name", "slow")
    form.add_field("timeout_s", "42")
    form.add_field("body", json.dumps(SLOW), filename="body.json", content_type="application/json")
    status, template = await cp.request("POST", "/v1/template", data=form)
    assert status == 201 and template["timeout_s"] == 42
    status, run = await cp.request("POST", f"/v1/template/{template['id']}/run", data=aiohttp.FormData())
    assert status == 201 and run["timeout_s"] == 42
    rerun = aiohttp.FormData()
    rerun.add_field("timeout_s", "7")
    status, again = await cp.request("POST", f"/v1/workflow/{run['id']}/rerun", data=rerun)
    assert status == 201 and again["timeout_s"] == 7


async def test_a_workflow_no_runner_takes_within_the_queue_limit_fails_with_a_reason(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    tiers = {**DEFAULT_TIERS, "free": Tier("free", 20, 500, max_queue_s=1)}
    runner1, base, app, settings = await start_control_plane(tmp_path, database_url=database_url, tiers=tiers)
    cp = ControlPlane(base, settings, app, runner1, http)
    try:
        await cp.create_runner()  # registered, never connected
        wf = await submit(cp)
        done = await cp.wait_for_status(wf, ENDS)
    finally:
        await runner1.cleanup()
    assert (done["status"], done["failure_reason"], done["runner_id"]) == ("failed", "queue_timeout", None)
    assert "within 1 s" in done["exception_message"]


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_a_workflow_nested_too_deep_is_refused_at_submit(cp: ControlPlane) -> None:
    await cp.create_runner()
    deep = {**SLOW, "1": {**SLOW["1"], "inputs": {**SLOW["1"]["inputs"], "color": nested(300)}}}
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(deep))
    assert (status, body["message"]) == (400, "workflow_json is nested more than 64 levels deep")
    # Far deeper than Python's own parser goes: the same answer.
    raw = json.dumps(SLOW)[:-1] + ', "9": ' + "[" * 20_000 + "]" * 20_000 + "}"
    form = aiohttp.FormData()
    form.add_field("workflow_json", raw, filename="w.json", content_type="application/json")
    status, body = await cp.request("POST", "/v1/workflow", data=form)
    assert (status, body["message"]) == (400, "workflow_json is nested more than 64 levels deep")
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0


async def test_a_job_that_cannot_be_sent_fails_its_workflow_and_frees_the_slot(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    account = await cp.services.store.get_or_create_account("alice")
    # As a version without the submit-time limit accepted it: 300 levels deep.
    deep = {**SLOW, "1": {**SLOW["1"], "inputs": {**SLOW["1"]["inputs"], "color": nested(300)}}}
    now = utcnow()
    stuck = await cp.services.store.add_workflow(
        Workflow(account_id=account.id, name="deep", workflow_json=deep, created_at=now, updated_at=now)
    )
    cp.services.fleet.enqueue(stuck)
    done = await cp.wait_for_status(stuck.id, ENDS)
    assert (done["status"], done["failure_reason"], done["exception_type"]) == (
        "failed",
        "workflow",
        "UnsendableJob",
    )
    assert done["runner_id"] is None
    nxt = await cp.wait_for_status(await submit(cp), ENDS)  # the slot was not taken
    assert nxt["status"] == "completed"
    status, _ = await cp.request("POST", f"/v1/workflow/{stuck.id}/cancel")
    assert status == 400


# -- the control plane's half of the protocol, with a hand-rolled agent ------------------------------


async def bare_agent(cp: ControlPlane, name: str) -> tuple[ClientConnection, dict[str, Any]]:
    runner = await cp.create_runner(name=name)
    url = cp.base.replace("http", "ws") + "/v1/agent/connect"
    ws = await connect(url, additional_headers={"Authorization": f"Bearer {runner['token']}"})
    hello = Hello(agent_version="test", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))
    await ws.send(dump_message(hello))
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws, runner


async def next_of(ws: ClientConnection, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == kind:
                return dict(message)


async def test_uploaded_gets_the_go_ahead_unless_the_workflow_was_cancelled_first(cp: ControlPlane) -> None:
    ws, _ = await bare_agent(cp, "hand")
    try:
        for cancel_first in (False, True):
            await ws.send(dump_message(Ready(free_slots=1)))
            wf = await submit(cp)
            job = await next_of(ws, "job")
            if cancel_first:
                status, _ = await cp.request("POST", f"/v1/workflow/{wf}/cancel")
                assert status == 200
                assert (await next_of(ws, "cancel"))["workflow_id"] == wf
            # The agent's "uploaded" crosses the cancel on the wire.
            await ws.send(dump_message(JobUpdate(workflow_id=wf, attempt=job["attempt"], status="uploaded")))
            answer = json.loads(await ws.recv())
            assert (answer["type"], answer["workflow_id"]) == ("cancel" if cancel_first else "proceed", wf)
            if not cancel_first:
                await ws.send(dump_message(JobDone(workflow_id=wf, attempt=1)))
                assert (await next_of(ws, "job_ack"))["workflow_id"] == wf
    finally:
        await ws.close()


async def test_a_report_said_again_after_a_later_one_does_not_move_the_workflow_back(
    cp: ControlPlane,
) -> None:
    ws, _ = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit(cp)
        await next_of(ws, "job")
        for status in ("uploaded", "running", "uploaded"):  # the last one resent after a reconnect
            await ws.send(dump_message(JobUpdate(workflow_id=wf, attempt=1, status=status)))
        assert (await next_of(ws, "proceed"))["workflow_id"] == wf
        assert (await next_of(ws, "proceed"))["workflow_id"] == wf  # asked again, answered again
        _, now = await cp.request("GET", f"/v1/workflow/{wf}")
        assert now["status"] == "running"
    finally:
        await ws.close()


async def test_a_result_sent_twice_is_applied_once_and_acknowledged_twice(cp: ControlPlane) -> None:
    ws, _ = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit(cp)
        await next_of(ws, "job")
        for _ in range(2):  # as an agent that restarted before the first ack would
            await ws.send(dump_message(JobDone(workflow_id=wf, attempt=1)))
            assert (await next_of(ws, "job_ack"))["workflow_id"] == wf
    finally:
        await ws.close()
    _, done = await cp.request("GET", f"/v1/workflow/{wf}")
    assert (done["status"], done["attempt"]) == ("completed", 1)


# -- ordinary events are not errors ------------------------------------------------------------------


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_leaving_an_event_stream_is_one_info_line(
    cp: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await cp.create_runner()
    wf = await submit(cp)
    async with aiohttp.ClientSession() as client:
        resp = await client.get(f"{cp.base}/v1/workflow/{wf}/subscribe", headers=await cp.headers())
        assert (await resp.content.readline()).startswith(b"event: status")
        resp.close()  # the client goes away mid-stream
    status, _ = await cp.request("POST", f"/v1/workflow/{wf}/cancel")  # an event to write
    assert status == 200

    async def noted() -> bool:
        return any("event stream closed by the client" in r.getMessage() for r in caplog.records)

    await poll_until(noted)
    assert errors_logged(caplog) == []


async def test_an_agent_dropping_mid_upload_is_one_info_line(
    cp: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ws, runner = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit(cp)
        await next_of(ws, "job")
        _, writer = await asyncio.open_connection("127.0.0.1", int(cp.base.rsplit(":", 1)[1]))
        head = (
            f"PUT /v1/agent/jobs/{wf}/outputs?attempt=1&node_id=3&filename=a.png HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {runner['token']}\r\n"
            f"X-Content-SHA256: {'0' * 64}\r\n"
            "Content-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
        )
        writer.write(head.encode() + b"\x89PNG" * 1000)
        await writer.drain()
        writer.transport.abort()  # the agent's host goes away mid-body

        async def noted() -> bool:
            return any("broke off" in r.getMessage() for r in caplog.records)

        await poll_until(noted)
    finally:
        await ws.close()
    assert errors_logged(caplog) == []
    _, listing = await cp.request("GET", f"/v1/workflow/{wf}/outputs")
    assert listing["outputs"] == []
