"""What the agent does when things around it fail: it is killed and started again (as a real
process, SIGKILL), the control plane's go-ahead never comes, ComfyUI stops answering. Against
the fake control plane of ``test_agent_e2e`` and the ComfyUI simulator."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from comfyfleet import processes
from protocol.messages import Cancel, HeldJob, Hello, JobAck, JobDone, JobUpdate, Proceed, Ready
from runner_agent.agent import Agent
from tests import test_agent_e2e
from tests.conftest import poll_until
from tests.test_agent_e2e import (
    TOKEN,
    FakeControlPlane,
    Sim,
    connect_and_ready,
    empty_image_job,
    invert_job,
    make_settings,
    running,
    statuses,
)

# The fake control plane and the simulator of the agent's end-to-end tests, as fixtures here.
cp = test_agent_e2e.cp
sim = test_agent_e2e.sim

pytestmark = pytest.mark.timeout(60)
WAIT_S = 20.0
FAST_RECONNECT = {"reconnect_initial_s": "0.05", "reconnect_max_s": "0.5", "history_poll_fast_s": "0.05"}


async def sim_log(sim: Sim) -> dict[str, list[str]]:
    async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/sim/log") as resp:
        return dict(await resp.json())


async def folders_left(root: Path) -> list[str]:
    jobs = root / "data" / "jobs"
    return sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else []


async def until_empty(root: Path) -> None:
    async def empty() -> bool:
        return not await folders_left(root)

    await poll_until(empty, WAIT_S)


def _is_running(message: object) -> bool:
    return isinstance(message, JobUpdate) and message.status == "running"


async def test_agent_killed_after_finishing_before_the_ack_runs_nothing_again(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    cp.acks = False  # the ack never arrives before the kill
    root = tmp_path / "agent"
    agent = processes.agent(root, cp.url, TOKEN, sim.url, settings=FAST_RECONNECT)
    await agent.start()
    try:
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-done"))
        first = (await cp.next(lambda m: isinstance(m, JobDone))).message
        await agent.kill()
        assert await folders_left(root) == ["wf-done-1"]  # the result waits on disk

        await agent.start()
        hello = (await cp.next(lambda m: isinstance(m, Hello))).message
        assert isinstance(hello, Hello)
        assert hello.jobs == [HeldJob(workflow_id="wf-done", attempt=1, finished=True)]
        again = (await cp.next(lambda m: isinstance(m, JobDone))).message
        assert again == first  # the same result, the same outputs
        # ComfyUI ran the prompt once, and the outputs were uploaded once per try of the
        # same file (the control plane answers a repeated upload with what it has).
        assert len((await sim_log(sim))["queued"]) == 1
        assert {o.sha256 for o in cp.outputs} == {ref.sha256 for ref in first.outputs}

        await cp.send(JobAck(workflow_id="wf-done", attempt=1))
        await until_empty(root)  # acknowledged: nothing is kept
    finally:
        await agent.kill()


async def test_agent_killed_mid_prompt_follows_that_prompt_after_its_restart(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    sim.settings.node_delays_s["ImageInvert"] = 2.0
    root = tmp_path / "agent"
    agent = processes.agent(root, cp.url, TOKEN, sim.url, settings=FAST_RECONNECT)
    await agent.start()
    try:
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-kept"))
        await cp.next(_is_running)
        await agent.kill()  # ComfyUI goes on with the prompt

        await agent.start()
        hello = (await cp.next(lambda m: isinstance(m, Hello))).message
        assert isinstance(hello, Hello)
        # Still its job, the same attempt: the control plane keeps it rather than run it again.
        assert hello.jobs == [HeldJob(workflow_id="wf-kept", attempt=1)]
        done = (await cp.next(lambda m: isinstance(m, JobDone))).message
        assert isinstance(done, JobDone) and len(done.outputs) == 1
        log = await sim_log(sim)
        assert len(log["queued"]) == 1 and log["prompts"][-1]["success"] is True
        await until_empty(root)
    finally:
        await agent.kill()


async def test_without_the_go_ahead_a_cancelled_prompt_never_reaches_a_fast_comfyui(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    cp.auto_proceed = False
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(empty_image_job("wf-x"))
        await cp.next(lambda m: isinstance(m, JobUpdate) and m.status == "uploaded")
        # The control plane cancelled the workflow before it answered "uploaded".
        await cp.send(Cancel(workflow_id="wf-x", attempt=1))
        messages = await cp.until_job_ends("wf-x")
        # A go-ahead that comes late changes nothing.
        await cp.send(Proceed(workflow_id="wf-x", attempt=1))
    assert statuses(messages) == ["cancelled"]
    assert (await sim_log(sim))["queued"] == []


async def test_a_job_waits_for_the_go_ahead_and_runs_once_it_comes(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    cp.auto_proceed = False
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(empty_image_job("wf-go"))
        await cp.next(lambda m: isinstance(m, JobUpdate) and m.status == "uploaded")
        assert (await sim_log(sim))["queued"] == []  # nothing posted yet
        await cp.send(Proceed(workflow_id="wf-go", attempt=1))
        messages = await cp.until_job_ends("wf-go")
    assert isinstance(messages[-1], JobDone)
    assert len((await sim_log(sim))["queued"]) == 1


async def test_a_comfyui_that_stops_mid_prompt_is_the_fleets_fault_and_goes_out_of_service(
    tmp_path: Path, cp: FakeControlPlane
) -> None:
    from comfyui_sim import SimSettings, start_simulator

    settings = SimSettings(data_dir=tmp_path / "comfyui", node_delays_s={"ImageInvert": 30.0})
    sim_runner, url = await start_simulator(settings, port=0)
    agent = Agent(make_settings(tmp_path, cp, url, heartbeat_s=60))
    try:
        async with running(agent):
            await connect_and_ready(cp)
            await cp.send(empty_image_job("wf-lost"))
            await cp.next(_is_running)
            await sim_runner.cleanup()  # ComfyUI goes away with the prompt
            final = (await cp.until_job_ends("wf-lost"))[-1]
            started = next(i for i, r in enumerate(cp.history) if _is_running(r.message))

            def offers() -> list[int]:
                return [r.message.free_slots for r in cp.history[started:] if isinstance(r.message, Ready)]

            async def said_so() -> bool:
                return bool(offers())

            # Out of service at once, long before any heartbeat: no slot is offered from then on.
            await poll_until(said_so, WAIT_S)
    finally:
        await sim_runner.cleanup()
    assert isinstance(final, JobUpdate) and final.status == "failed" and final.error is not None
    assert final.error.kind == "infrastructure" and final.error.exception_type == "PromptLost"
    assert "ComfyUI stopped while running prompt" in final.error.message
    assert set(offers()) == {0}


async def test_an_uploaded_report_lost_with_its_connection_is_said_again(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    cp.auto_proceed = False
    agent = Agent(make_settings(tmp_path, cp, sim.url, reconnect_initial_s=0.05, reconnect_max_s=0.2))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(empty_image_job("wf-again"))
        await cp.next(lambda m: isinstance(m, JobUpdate) and m.status == "uploaded")
        assert cp.ws is not None
        await cp.ws.close(code=1001)  # as if the control plane died before reading it
        hello = (await cp.next(lambda m: isinstance(m, Hello))).message
        assert isinstance(hello, Hello) and hello.jobs == [HeldJob(workflow_id="wf-again", attempt=1)]
        again = (await cp.next(lambda m: isinstance(m, JobUpdate) and m.workflow_id == "wf-again")).message
        assert isinstance(again, JobUpdate) and again.status == "uploaded"
        await cp.send(Proceed(workflow_id="wf-again", attempt=1))
        done = (await cp.until_job_ends("wf-again"))[-1]
    assert isinstance(done, JobDone) and len(done.outputs) == 1
