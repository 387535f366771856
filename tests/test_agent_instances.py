"""One agent, several ComfyUI instances (one per GPU): placement, health, and the runner-level
requests (interrupt, stats). Real simulators and a fake control plane on 127.0.0.1; NVML is the
stand-in of test_capacity, the one thing that cannot run here."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses

from comfyui_sim import SimSettings, start_simulator
from protocol.capacity import Capacity
from protocol.messages import (
    CapacityUpdate,
    Hello,
    Interrupt,
    JobDone,
    JobUpdate,
    Message,
    Ready,
    Reply,
    StatsRequest,
)
from runner_agent.agent import Agent
from runner_agent.capacity import NvmlProbe
from tests.test_agent_e2e import (
    FakeControlPlane,
    MockedResponse,
    Sim,
    _is_update,
    empty_image_job,
    make_settings,
    running,
)
from tests.test_capacity import H100, FakeNvml

pytestmark = pytest.mark.timeout(30)


class ExplodingNvml(FakeNvml):
    """A binding that breaks in a way NVML never should (not an NVMLError)."""

    explode = False

    def nvmlDeviceGetCount(self) -> int:
        if self.explode:
            raise RuntimeError("the binding broke")
        return super().nvmlDeviceGetCount()


@pytest.fixture
async def cp() -> AsyncIterator[FakeControlPlane]:
    plane = FakeControlPlane()
    await plane.start()
    try:
        yield plane
    finally:
        await plane.close()


async def _start_sim(tmp_path: Path, name: str, port: int = 0) -> tuple[Any, Sim]:
    settings = SimSettings(data_dir=tmp_path / name, version=f"0.3.64-{name}")
    runner, url = await start_simulator(settings, port=port)
    url = url.rstrip("/")
    return runner, Sim(url, settings, int(url.rsplit(":", 1)[1]))


@pytest.fixture
async def sims(tmp_path: Path) -> AsyncIterator[tuple[Sim, Sim]]:
    runner_a, a = await _start_sim(tmp_path, "a")
    runner_b, b = await _start_sim(tmp_path, "b")
    try:
        yield a, b
    finally:
        await runner_a.cleanup()
        await runner_b.cleanup()


def two_gpus() -> FakeNvml:
    second = {**copy.deepcopy(H100), "uuid": "GPU-1f3c0a2e-0000-4000-8000-000000000009"}
    return ExplodingNvml([copy.deepcopy(H100), second])


def is_reply(request_id: str) -> Any:
    return lambda m: isinstance(m, Reply) and m.request_id == request_id


async def until_jobs_end(cp: FakeControlPlane, workflow_ids: set[str]) -> dict[str, Message]:
    """The last word (JobDone or a terminal update) about each of ``workflow_ids``."""
    ends: dict[str, Message] = {}
    while set(ends) != workflow_ids:
        message = (await cp.next()).message
        final = isinstance(message, JobDone) or (
            isinstance(message, JobUpdate)
            and message.status in ("failed", "invalid", "cancelled", "completed")
        )
        if final and isinstance(message, JobDone | JobUpdate) and message.workflow_id in workflow_ids:
            ends[message.workflow_id] = message
    return ends


async def test_two_instances_run_two_jobs_and_answer_stats_and_interrupt(
    tmp_path: Path, cp: FakeControlPlane, sims: tuple[Sim, Sim]
) -> None:
    a, b = sims
    for sim in sims:
        sim.settings.node_delays_s["ImageInvert"] = 2.0
    nvml = two_gpus()
    settings = make_settings(tmp_path, cp, a.url, comfyui_urls=(a.url, b.url), comfyui_gpus=(0, 1))
    agent = Agent(settings, nvml=NvmlProbe(nvml))
    async with running(agent):
        hello = (await cp.next(lambda m: isinstance(m, Hello))).message
        ready = (await cp.next(lambda m: isinstance(m, Ready))).message
        assert isinstance(hello, Hello) and isinstance(ready, Ready)
        assert (hello.healthy, hello.unhealthy_reason) == (True, None)
        assert hello.comfyui.url == a.url and hello.comfyui.version == "0.3.64-a"
        assert hello.capacity.slots == 2
        assert [g.uuid for g in hello.capacity.gpus] == [g["uuid"] for g in nvml.gpus]
        assert ready.free_slots == 2

        prompts = {}
        for workflow_id in ("wf-a", "wf-b"):
            await cp.send(empty_image_job(workflow_id))
            queued = (await cp.next(_is_update("queued", workflow_id))).message
            assert isinstance(queued, JobUpdate) and queued.prompt_id
            prompts[workflow_id] = queued.prompt_id
            await cp.next(_is_update("running", workflow_id))

        # Fresh figures, not the hello's: the stats request probes again.
        nvml.gpus[1]["util"] = 99
        await cp.send(StatsRequest(request_id="stats-1"))
        stats = (await cp.next(is_reply("stats-1"))).message
        assert isinstance(stats, Reply) and stats.ok
        assert [(i["url"], i["gpu_index"], i["busy_workflow_id"]) for i in stats.data["instances"]] == [
            (a.url, 0, "wf-a"),
            (b.url, 1, "wf-b"),
        ]
        assert all(i["healthy"] for i in stats.data["instances"]) and stats.data["healthy"]
        versions = [s["system"]["comfyui_version"] for s in stats.data["system_stats"]]
        assert versions == ["0.3.64-a", "0.3.64-b"]
        capacity = Capacity.model_validate(stats.data["capacity"])
        assert capacity.slots == 2 and capacity.gpus[1].utilization_pct == 99.0

        await cp.send(Interrupt(request_id="interrupt-1"))
        reply = (await cp.next(is_reply("interrupt-1"))).message
        assert isinstance(reply, Reply) and reply.ok and reply.error is None
        assert sorted(reply.data["interrupted"]) == sorted(prompts.values())
        ends = await until_jobs_end(cp, {"wf-a", "wf-b"})
    for final in ends.values():
        assert isinstance(final, JobUpdate) and final.status == "failed" and final.error
        assert final.error.exception_type == "Interrupted"
        assert "runner interrupt from the control plane" in final.error.message
    # Each instance ran the job placed on it.
    for instance, workflow_id in zip(agent.instances, ("wf-a", "wf-b"), strict=True):
        try:
            assert await instance.comfy.history(prompts[workflow_id]) is not None
        finally:
            await instance.comfy.close()


async def test_an_instance_that_is_down_makes_the_runner_unhealthy_and_offers_no_slot(
    tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int
) -> None:
    runner_a, a = await _start_sim(tmp_path, "a")
    down_url = f"http://127.0.0.1:{unused_tcp_port}"
    # The one that is down is listed first: the hello speaks for the first healthy one.
    settings = make_settings(tmp_path, cp, down_url, comfyui_urls=(down_url, a.url), heartbeat_s=0.05)
    agent = Agent(settings, nvml=NvmlProbe(two_gpus()))
    late_runner = None
    try:
        async with running(agent):
            hello = (await cp.next(lambda m: isinstance(m, Hello))).message
            ready = (await cp.next(lambda m: isinstance(m, Ready))).message
            assert isinstance(hello, Hello) and isinstance(ready, Ready)
            assert hello.healthy is False and hello.unhealthy_reason
            assert f"ComfyUI at {down_url} does not answer" in hello.unhealthy_reason
            assert hello.comfyui.url == a.url and "SaveImage" in hello.comfyui.node_classes
            assert hello.capacity.slots == 2
            assert ready.free_slots == 1  # the healthy instance's slot only
            update = (await cp.next(lambda m: isinstance(m, CapacityUpdate))).message
            assert isinstance(update, CapacityUpdate) and update.healthy is False
            assert update.unhealthy_reason and down_url in update.unhealthy_reason

            await cp.send(empty_image_job("wf-on-a"))
            done = (await until_jobs_end(cp, {"wf-on-a"}))["wf-on-a"]
            assert isinstance(done, JobDone)

            await cp.send(StatsRequest(request_id="stats-down"))
            stats = (await cp.next(is_reply("stats-down"))).message
            assert isinstance(stats, Reply) and stats.ok
            assert "is unreachable" in stats.data["system_stats"][0]["error"]
            assert stats.data["system_stats"][1]["system"]["comfyui_version"] == "0.3.64-a"
            assert [i["healthy"] for i in stats.data["instances"]] == [False, True]
            assert stats.data["healthy"] is False

            await cp.send(Interrupt(request_id="interrupt-down"))
            reply = (await cp.next(is_reply("interrupt-down"))).message
            assert isinstance(reply, Reply) and reply.ok is False
            assert reply.error and f"ComfyUI at {down_url} is unreachable" in reply.error
            assert reply.data == {"interrupted": []}

            # It comes up: a fresh hello says the runner is whole again.
            late_runner, _ = await _start_sim(tmp_path, "late", port=unused_tcp_port)
            again = (await cp.next(lambda m: isinstance(m, Hello))).message
            ready = (await cp.next(lambda m: isinstance(m, Ready))).message
            assert isinstance(again, Hello) and (again.healthy, again.unhealthy_reason) == (True, None)
            assert again.comfyui.url == down_url
            assert isinstance(ready, Ready) and ready.free_slots == 2
    finally:
        await runner_a.cleanup()
        if late_runner is not None:
            await late_runner.cleanup()


async def test_a_failed_interrupt_is_reported_and_the_job_goes_on(
    tmp_path: Path, cp: FakeControlPlane, sims: tuple[Sim, Sim]
) -> None:
    a, _ = sims
    a.settings.node_delays_s["ImageInvert"] = 0.5
    agent = Agent(make_settings(tmp_path, cp, a.url), nvml=NvmlProbe(two_gpus()))
    with aioresponses(passthrough_unmatched=True) as mocked:
        mocked.post(f"{a.url}/interrupt", status=500, body="interrupt broke", response_class=MockedResponse)
        async with running(agent):
            await cp.next(lambda m: isinstance(m, Ready))
            await cp.send(empty_image_job("wf-goes-on"))
            await cp.next(_is_update("running", "wf-goes-on"))
            await cp.send(Interrupt(request_id="interrupt-500"))
            reply = (await cp.next(is_reply("interrupt-500"))).message
            done = (await until_jobs_end(cp, {"wf-goes-on"}))["wf-goes-on"]
    assert isinstance(reply, Reply) and reply.ok is False and reply.data == {"interrupted": []}
    assert reply.error and "ComfyUI answered 500 to POST /interrupt: interrupt broke" in reply.error
    assert isinstance(done, JobDone)


async def test_a_request_that_breaks_still_gets_an_answer(
    tmp_path: Path, cp: FakeControlPlane, sims: tuple[Sim, Sim]
) -> None:
    a, _ = sims
    nvml = two_gpus()
    agent = Agent(make_settings(tmp_path, cp, a.url), nvml=NvmlProbe(nvml))
    async with running(agent):
        await cp.next(lambda m: isinstance(m, Ready))
        nvml.explode = True  # type: ignore[attr-defined]
        await cp.send(StatsRequest(request_id="stats-broken"))
        reply = (await cp.next(is_reply("stats-broken"))).message
    assert isinstance(reply, Reply) and reply.ok is False
    assert reply.error == "agent error: RuntimeError: the binding broke"
