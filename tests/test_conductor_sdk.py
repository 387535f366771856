"""Conductor's own Python client (``conductor-python``), unchanged, against comfyfleet: it
logs in with a key and a comfyfleet token as the secret, reads workflows in every state with
and without their tasks, reruns from a task, terminates, retries and restarts, and gets
Conductor's errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conductor.client.configuration.configuration import Configuration
from conductor.client.configuration.settings.authentication_settings import AuthenticationSettings
from conductor.client.http.models.rerun_workflow_request import RerunWorkflowRequest
from conductor.client.http.models.workflow import Workflow
from conductor.client.http.rest import ApiException
from conductor.client.orkes.orkes_workflow_client import OrkesWorkflowClient

from tests.conftest import AgentFactory, ControlPlane, poll_until
from tests.test_dashboard import sim_config
from tests.test_e2e import submit
from tests.test_faults import SLOW

T = TypeVar("T")
ENDS = {"completed", "failed", "invalid", "cancelled"}


async def off_loop(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """The SDK blocks; the control plane under test runs on this loop."""
    return await asyncio.to_thread(call, *args, **kwargs)


async def conductor(cp: ControlPlane, secret: str | None = None) -> OrkesWorkflowClient:
    """The client as Conductor's documentation sets it up, pointed at comfyfleet."""
    if secret is None:
        secret = (await cp.headers())["Authorization"].removeprefix("Bearer ")
    config = Configuration(
        server_api_url=f"{cp.base}/api",
        authentication_settings=AuthenticationSettings(key_id="comfyfleet", key_secret=secret),
    )
    return await off_loop(OrkesWorkflowClient, config)


def by_node(wf: Workflow) -> dict[str, list[Any]]:
    tasks: dict[str, list[Any]] = {}
    for task in wf.tasks:
        tasks.setdefault(task.reference_task_name, []).append(task)
    return tasks


async def test_conductors_client_reads_a_completed_workflow_with_and_without_its_tasks(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    client = await conductor(cp)
    wf = await submit(cp, SLOW, correlation_id="order-7")
    await cp.wait_for_status(wf["id"], ENDS)

    got = await off_loop(client.get_workflow, wf["id"])
    assert isinstance(got, Workflow)
    assert (got.workflow_id, got.status, got.correlation_id) == (wf["id"], "COMPLETED", "order-7")
    assert got.create_time <= got.start_time <= got.end_time and got.workflow_name == "e2e"
    assert [t.reference_task_name for t in got.tasks] == ["1", "2", "3"]  # in the order they ran
    assert [t.seq for t in got.tasks] == [1, 2, 3]
    assert [(t.task_type, t.status, t.retry_count) for t in got.tasks] == [
        ("EmptyImage", "COMPLETED", 0),
        ("ImageInvert", "COMPLETED", 0),
        ("SaveImage", "COMPLETED", 0),
    ]
    assert all(t.workflow_instance_id == wf["id"] and t.task_id for t in got.tasks)
    assert got.tasks[1].input_data == {"image": ["1", 0]}
    [saved] = got.output["outputs"]
    assert saved["node_id"] == "3" and got.tasks[2].output_data["outputs"] == [saved]

    bare = await off_loop(client.workflowResourceApi.get_execution_status, wf["id"], include_tasks=False)
    assert bare.status == "COMPLETED" and bare.tasks == []


async def test_conductors_client_follows_a_run_that_fails_and_retries_it_from_the_failed_task(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    client = await conductor(cp)
    await sim_config(cp.http, sim, fail_nodes={"ImageInvert": "the GPU caught fire"})
    wf = await submit(cp, SLOW)
    await cp.wait_for_status(wf["id"], ENDS)

    failed = await off_loop(client.get_workflow, wf["id"])
    assert failed.status == "FAILED" and "the GPU caught fire" in failed.reason_for_incompletion
    assert failed.failed_reference_task_names == {"2"}
    tasks = by_node(failed)
    # The node before the one that failed ran to its end: it says so.
    assert [t.status for t in tasks["1"]] == ["COMPLETED"]
    assert [t.status for t in tasks["2"]] == ["FAILED"]
    assert "the GPU caught fire" in tasks["2"][0].reason_for_incompletion

    await sim_config(cp.http, sim, fail_nodes={})
    await off_loop(client.retry_workflow, wf["id"])
    done = await cp.wait_for_status(wf["id"], ENDS)
    assert (done["status"], done["attempt"]) == ("completed", 2)
    retried = by_node(await off_loop(client.get_workflow, wf["id"]))
    # Node 1 ran once: its result came from ComfyUI's cache the second time.
    assert [(t.status, t.retry_count) for t in retried["1"]] == [("COMPLETED", 0)]
    assert [(t.status, t.retried, t.retry_count) for t in retried["2"]] == [
        ("FAILED", True, 0),
        ("COMPLETED", False, 1),
    ]

    with pytest.raises(ApiException) as refused:
        await off_loop(client.retry_workflow, wf["id"])  # it completed: nothing to retry
    assert refused.value.status == 409


async def test_conductors_client_terminates_a_running_workflow_and_restarts_it(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    client = await conductor(cp)
    await sim_config(cp.http, sim, node_delays_s={"ImageInvert": 60})
    wf = await submit(cp, SLOW)
    await cp.wait_for_status(wf["id"], {"running"})

    seen: list[Workflow] = []

    async def invert_started() -> bool:
        seen.append(await off_loop(client.get_workflow, wf["id"]))
        return "2" in by_node(seen[-1])

    await poll_until(invert_started, timeout_s=30)
    running = seen[-1]
    assert running.status == "RUNNING" and running.end_time == 0
    assert by_node(running)["2"][0].status == "IN_PROGRESS"

    await off_loop(client.terminate_workflow, wf["id"], reason="changed my mind")
    terminated = await off_loop(client.get_workflow, wf["id"])
    assert terminated.status == "TERMINATED" and terminated.end_time >= terminated.start_time
    with pytest.raises(ApiException) as again:
        await off_loop(client.terminate_workflow, wf["id"])
    assert again.value.status == 409

    await sim_config(cp.http, sim, node_delays_s={})
    await off_loop(client.restart_workflow, wf["id"])
    done = await cp.wait_for_status(wf["id"], ENDS)
    assert (done["status"], done["attempt"]) == ("completed", 2)
    restarted = await off_loop(client.get_workflow, wf["id"])
    assert restarted.status == "COMPLETED"
    assert [t.status for t in by_node(restarted)["3"]][-1] == "COMPLETED"


async def test_conductors_client_reruns_from_a_task(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    client = await conductor(cp)
    wf = await submit(cp, SLOW)
    await cp.wait_for_status(wf["id"], ENDS)
    first = await off_loop(client.get_workflow, wf["id"])
    [save] = by_node(first)["3"]

    answer = await off_loop(
        client.rerun_workflow,
        wf["id"],
        RerunWorkflowRequest(re_run_from_task_id=save.task_id, task_input={"filename_prefix": "again"}),
    )
    assert answer == wf["id"]
    done = await cp.wait_for_status(wf["id"], ENDS)
    assert (done["status"], done["attempt"]) == ("completed", 2)
    tasks = by_node(await off_loop(client.get_workflow, wf["id"]))
    assert [t.retry_count for t in tasks["3"]] == [0, 1]
    assert tasks["3"][1].input_data["filename_prefix"] == "again"
    assert [len(tasks["1"]), len(tasks["2"])] == [1, 1]  # upstream: served from the cache
    _, raw = await cp.request("GET", f"/api/workflow/{wf['id']}")
    reused = {t["referenceTaskName"]: t["reusedFromCache"] for t in raw["tasks"] if t["retryCount"] == 0}
    assert reused == {"1": True, "2": True, "3": False}


async def test_conductors_client_gets_conductors_errors(cp: ControlPlane) -> None:
    client = await conductor(cp)
    with pytest.raises(ApiException) as missing:
        await off_loop(client.get_workflow, "no-such-workflow")
    assert missing.value.status == 404

    stranger = await conductor(cp, secret="cf_not_a_token")
    with pytest.raises(ApiException) as refused:
        await off_loop(stranger.get_workflow, "no-such-workflow")
    assert refused.value.status == 401


def readme_snippet() -> str:
    """The README's Conductor example, as written."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Conductor's clients") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("```\n", 10)]


async def test_the_readmes_conductor_example_runs_as_written(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, SLOW)
    await cp.wait_for_status(wf["id"], ENDS)
    code = readme_snippet()
    assert "http://localhost:8080/api" in code
    names: dict[str, Any] = {
        "TOKEN": (await cp.headers())["Authorization"].removeprefix("Bearer "),
        "ID": wf["id"],
    }
    # Only the address differs: this control plane listens on a port of its own.
    await off_loop(exec, code.replace("http://localhost:8080", cp.base), names)
    assert names["wf"].status == "COMPLETED"
    done = await cp.wait_for_status(wf["id"], ENDS)
    assert (done["status"], done["attempt"]) == ("cancelled", 2)  # rerun, then terminated
