"""Reruns, both ways: new parameters as a new workflow and from a task in place
(Conductor-compatible); tasks, lineage, templates and idempotency keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.settings import Tier
from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, read_png, start_control_plane
from tests.test_e2e import curl_form, sim_config, submit

# The rerun contract's example parameters: $prompt, $input_image, #sampler; $width shows what is kept.
WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$file(input_image)"}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
    "4": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["3", 0],
            "upscale_method": "$choice(sampler, bilinear, nearest-exact, dpm_2)",
            "width": "$text(width, 16)",
            "height": 16,
            "crop": "disabled",
        },
    },
    "5": {"class_type": "ImageAddNoise", "inputs": {"image": ["4", 0], "seed": "$random()", "strength": 0.0}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "$text(prompt)"}},
}
RERUN_FIELDS = ("id", "name", "status", "tags", "created_at", "updated_at", "started_at", "completed_at")


async def completed(cp: ControlPlane, wf_id: str) -> dict[str, Any]:
    done = await cp.wait_for_status(wf_id, {"completed", "failed", "invalid", "cancelled"})
    assert done["status"] == "completed", done
    return done


async def output_png(cp: ControlPlane, wf_id: str, node_id: str = "6") -> tuple[str, Any]:
    _, listing = await cp.request("GET", f"/v1/workflow/{wf_id}/outputs")
    (out,) = [o for o in listing["outputs"] if o["node_id"] == node_id]
    _, data = await cp.request("GET", out["src"])
    return out["filename"], read_png(data)


def near(pixel: tuple[int, ...], want: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 1 for a, b in zip(pixel, want, strict=True))


@pytest.fixture
async def fleet(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> tuple[ControlPlane, str, dict[str, Any]]:
    runner = await cp.create_runner(tags=["gpu"])
    await start_agent(cp.base, runner["token"], sim)
    return cp, sim, runner


async def test_rerun_with_new_parameters_changes_only_what_is_sent(
    fleet: tuple[ControlPlane, str, dict[str, Any]],
) -> None:
    cp, _, _ = fleet
    original = await submit(
        cp,
        WORKFLOW,
        tags="gpu",
        **{"$prompt": "old", "$input_image": png_bytes((10, 20, 30)), "#sampler": "bilinear", "$width": "24"},
    )
    before = await completed(cp, original["id"])

    # Byte for byte what `curl -F '$prompt=…' -F '$input_image=@…' -F '#sampler=…'` sends.
    form = aiohttp.FormData()
    form.add_field("$prompt", "New prompt text here")
    form.add_field(
        "$input_image", png_bytes((200, 100, 50)), filename="new-image.png", content_type="image/png"
    )
    form.add_field("#sampler", "nearest-exact")
    status, rerun = await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=form)
    assert status == 201, rerun
    assert set(RERUN_FIELDS) <= set(rerun)
    assert rerun["id"] != original["id"]
    assert (rerun["name"], rerun["tags"], rerun["status"]) == (original["name"], ["gpu"], "accepted")
    assert rerun["started_at"] is None and rerun["completed_at"] is None
    assert rerun["parent_id"] == original["id"]

    done = await completed(cp, rerun["id"])
    assert done["workflow_params"]["resolved"]["values"] == {
        "prompt": "New prompt text here",
        "sampler": "nearest-exact",
        "width": "24",  # not sent: the original's value
    }
    assert (
        done["workflow_params"]["resolved"]["random"]["5.seed"]
        != before["workflow_params"]["resolved"]["random"]["5.seed"]
    )
    filename, image = await output_png(cp, rerun["id"])
    assert filename.startswith("New prompt text here_")
    assert image.size == (24, 16)
    assert near(image.getpixel((5, 5)), (55, 155, 205))  # the new image, inverted

    _, after = await cp.request("GET", f"/v1/workflow/{original['id']}")
    assert after["reruns"] == [rerun["id"]]
    for key in ("status", "workflow_params", "workflow_json", "completed_at", "updated_at", "attempt"):
        assert after[key] == before[key], key
    _, children = await cp.request("GET", f"/v1/workflow?parent_id={original['id']}")
    assert [w["id"] for w in children["workflows"]] == [rerun["id"]]


async def test_rerun_with_new_parameters_keeps_files_without_reupload(
    fleet: tuple[ControlPlane, str, dict[str, Any]],
) -> None:
    cp, _, _ = fleet
    original = await submit(
        cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((10, 20, 30))}
    )
    await completed(cp, original["id"])
    form = aiohttp.FormData()
    form.add_field("$prompt", "b")
    status, rerun = await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=form)
    assert status == 201, rerun
    await completed(cp, rerun["id"])
    filename, image = await output_png(cp, rerun["id"])
    assert filename.startswith("b_")
    assert near(image.getpixel((5, 5)), (245, 235, 225))


async def test_rerun_with_new_parameters_of_a_running_workflow(
    fleet: tuple[ControlPlane, str, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    cp, sim, _ = fleet
    await sim_config(http, sim, node_delays_s={"ImageBlur": 1.0})
    original = await submit(cp, WORKFLOW, **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await cp.wait_for_status(original["id"], {"running"})
    form = aiohttp.FormData()
    form.add_field("$prompt", "b")
    status, rerun = await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=form)
    assert status == 201
    await sim_config(http, sim, node_delays_s={})
    await completed(cp, original["id"])  # the original runs on, untouched
    await completed(cp, rerun["id"])


async def rerun_form(**fields: str | bytes) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for key, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(key, value, filename="x.png", content_type="image/png")
        else:
            form.add_field(key, value)
    return form


async def test_rerun_with_new_parameters_errors(cp: ControlPlane) -> None:
    await cp.create_runner()
    original = await submit(cp, WORKFLOW, **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    path = f"/v1/workflow/{original['id']}/rerun"
    status, body = await cp.request("POST", path, data=await rerun_form(**{"$nope": "x"}))
    assert (status, body["message"]) == (400, "unknown parameter '$nope'")
    status, body = await cp.request("POST", path, data=await rerun_form(**{"#sampler": "euler"}))
    assert status == 400 and "choose one of bilinear, nearest-exact, dpm_2" in body["message"]
    status, body = await cp.request("POST", path, data=await rerun_form(workflow_json="{}"))
    assert status == 400 and "copies workflow_json" in body["message"]
    big = b"\0" * (cp.settings.max_request_bytes + 1)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            cp.base + path, data=await rerun_form(**{"$input_image": big}), headers=await cp.headers()
        )
        assert resp.status == 400
        assert "50 MB" in (await resp.json())["message"]
    status, body = await cp.request("POST", path, account=None, data=await rerun_form(**{"$prompt": "x"}))
    assert status == 401
    status, body = await cp.request(
        "POST", path, account="mallory", data=await rerun_form(**{"$prompt": "x"})
    )
    assert (status, body["message"]) == (404, f"workflow {original['id']} not found")
    status, _ = await cp.request(
        "POST", "/v1/workflow/no-such-id/rerun", data=await rerun_form(**{"$prompt": "x"})
    )
    assert status == 404
    await cp.request(
        "PUT",
        f"/v1/runner/{(await cp.request('GET', '/v1/runner'))[1]['runners'][0]['id']}",
        json={"status": "disabled"},
    )
    status, body = await cp.request("POST", path, data=await rerun_form(**{"$prompt": "x"}))
    assert status == 400 and body["message"].startswith("no runner available with matching tags")
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 1  # no failed rerun left anything behind


async def test_tier_limits_apply_to_reruns(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    tiers = {"free": Tier("free", max_parameters=2, max_workflows_per_day=2)}
    runner, base, app, settings = await start_control_plane(tmp_path, tiers=tiers)
    try:
        cp = ControlPlane(base, settings, app, runner, http)
        await cp.create_runner()
        original = await submit(cp, WORKFLOW, **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
        path = f"/v1/workflow/{original['id']}/rerun"
        status, body = await cp.request(
            "POST", path, data=await rerun_form(**{"$prompt": "b", "$width": "8", "#sampler": "dpm_2"})
        )
        assert (status, body["message"]) == (403, "3 parameters sent; the free tier allows 2")
        status, _ = await cp.request("POST", path, data=await rerun_form(**{"$prompt": "b"}))
        assert status == 201  # the second workflow of the day
        status, body = await cp.request("POST", path, data=await rerun_form(**{"$prompt": "c"}))
        assert (status, body["message"]) == (403, "workflow limit of the free tier reached (2 a day)")
    finally:
        await runner.cleanup()


async def api_rerun(cp: ControlPlane, wf_id: str, body: Any, **kw: Any) -> tuple[int, str]:
    headers = {
        "X-Authorization": (await cp.headers())["Authorization"].split()[1],
        "accept": "text/plain",
        **kw,
    }
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with cp.http.post(
        f"{cp.base}/api/workflow/{wf_id}/rerun",
        data=data,
        headers={**headers, "Content-Type": "application/json"},
    ) as resp:
        return resp.status, await resp.text()


async def sim_log(http: aiohttp.ClientSession, sim: str) -> list[dict[str, Any]]:
    async with http.get(f"{sim}/sim/log") as resp:
        return (await resp.json())["prompts"]


async def test_conductor_rerun_from_a_task_runs_only_that_part(
    fleet: tuple[ControlPlane, str, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    cp, sim, runner = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    first = await completed(cp, wf["id"])
    _, engine_view = await cp.request("GET", f"/v1/workflow/{wf['id']}/tasks")
    noise_task = next(t for t in engine_view["tasks"] if t["node_id"] == "5")
    assert noise_task["status"] == "COMPLETED"

    # The rerun contract's request example, with a real task id.
    status, text = await api_rerun(cp, wf["id"], {"reRunFromTaskId": noise_task["task_id"]})
    assert (status, text) == (200, wf["id"])
    second = await completed(cp, wf["id"])
    assert second["attempt"] == 2
    assert second["runner_id"] == runner["id"]
    log = await sim_log(http, sim)
    assert log[-1]["prompt_id"] == second["prompt_id"]
    assert log[-1]["executed"] == ["5", "6"]  # the rerun node and what depends on it
    assert sorted(log[-1]["cached"]) == ["1", "2", "3", "4"]
    # upstream kept its seedless inputs; the rerun node drew a new seed
    assert (
        second["workflow_params"]["resolved"]["random"]["5.seed"]
        != first["workflow_params"]["resolved"]["random"]["5.seed"]
    )

    _, engine_view = await cp.request("GET", f"/v1/workflow/{wf['id']}/tasks")
    by_attempt: dict[int, dict[str, dict[str, Any]]] = {}
    for task in engine_view["tasks"]:
        by_attempt.setdefault(task["attempt"], {})[task["node_id"]] = task
    assert engine_view["tasks"][0]["attempt"] == 2  # newest first
    assert {n: t["status"] for n, t in by_attempt[1].items()} == {
        "1": "COMPLETED",
        "2": "COMPLETED",
        "3": "COMPLETED",
        "4": "COMPLETED",
        "5": "COMPLETED",  # what ran to its end did, whatever runs again
        "6": "COMPLETED",
    }
    assert {n: (t["status"], t["cached"]) for n, t in by_attempt[2].items()} == {
        "1": ("COMPLETED", True),
        "2": ("COMPLETED", True),
        "3": ("COMPLETED", True),
        "4": ("COMPLETED", True),
        "5": ("COMPLETED", False),
        "6": ("COMPLETED", False),
    }
    assert {t["task_id"] for t in by_attempt[2].values()}.isdisjoint(
        t["task_id"] for t in by_attempt[1].values()
    )


async def test_conductor_rerun_from_the_last_node_with_task_input(
    fleet: tuple[ControlPlane, str, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    cp, sim, _ = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await completed(cp, wf["id"])
    status, text = await api_rerun(
        cp,
        wf["id"],
        {"reRunFromTaskId": "6", "taskInput": {"filename_prefix": "retitled"}, "correlationId": "batch-7"},
    )
    assert (status, text) == (200, wf["id"])
    done = await completed(cp, wf["id"])
    assert (await sim_log(http, sim))[-1]["executed"] == ["6"]
    assert done["correlation_id"] == "batch-7"
    assert done["workflow_json"]["6"]["inputs"]["filename_prefix"] == "retitled"
    filename, _ = await output_png(cp, wf["id"])
    assert filename.startswith("retitled_")


async def test_conductor_rerun_with_new_workflow_input(
    fleet: tuple[ControlPlane, str, dict[str, Any]],
) -> None:
    cp, _, _ = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await completed(cp, wf["id"])
    status, _ = await api_rerun(cp, wf["id"], {"workflowInput": {"width": 40, "sampler": "nearest-exact"}})
    assert status == 200
    done = await completed(cp, wf["id"])
    assert done["workflow_params"]["resolved"]["values"]["width"] == "40"
    _, image = await output_png(cp, wf["id"])
    assert image.size == (40, 16)


async def test_conductor_rerun_of_a_running_workflow_interrupts_it(
    fleet: tuple[ControlPlane, str, dict[str, Any]], http: aiohttp.ClientSession
) -> None:
    cp, sim, _ = fleet
    # Long enough that the first prompt cannot end before the agent interrupts it.
    await sim_config(http, sim, node_delays_s={"ImageBlur": 60.0})
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    running = await cp.wait_for_status(wf["id"], {"running"})
    status, body = await api_rerun(cp, wf["id"], {})
    assert status == 409 and "reRunFromTaskId" in json.loads(body)["message"]
    status, _ = await api_rerun(cp, wf["id"], {"reRunFromTaskId": "4"})
    assert status == 200

    async def old_prompt_interrupted() -> bool:
        async with http.get(f"{sim}/sim/log") as resp:
            return running["prompt_id"] in (await resp.json())["interrupted"]

    # ComfyUI notices an interrupt when the next node starts: the delay is lifted only once
    # the agent has asked, or the first prompt would simply finish.
    await poll_until(old_prompt_interrupted)
    await sim_config(http, sim, node_delays_s={})
    done = await completed(cp, wf["id"])
    assert done["attempt"] == 2
    async with http.get(f"{sim}/history/{running['prompt_id']}") as resp:
        old = (await resp.json())[running["prompt_id"]]
    assert any(m[0] == "execution_interrupted" for m in old["status"]["messages"])
    _, engine_view = await cp.request("GET", f"/v1/workflow/{wf['id']}/tasks")
    assert all(t["status"] != "IN_PROGRESS" for t in engine_view["tasks"])
    assert {t["status"] for t in engine_view["tasks"] if t["attempt"] == 1} <= {"COMPLETED", "CANCELED"}


async def test_conductor_rerun_errors(fleet: tuple[ControlPlane, str, dict[str, Any]]) -> None:
    cp, _, _ = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await completed(cp, wf["id"])
    status, body = await api_rerun(cp, wf["id"], {"reRunFromTaskId": "no-such-task"})
    assert (status, json.loads(body)["message"]) == (
        400,
        "task 'no-such-task' not found in the latest attempt of this workflow",
    )
    status, body = await api_rerun(cp, wf["id"], b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["message"]
    status, body = await api_rerun(
        cp, wf["id"], {"reRunFromWorkflowId": "00000000-0000-0000-0000-000000000000"}
    )
    assert status == 400 and "reRunFromWorkflowId" in json.loads(body)["message"]
    status, body = await api_rerun(cp, wf["id"], {"workflowInput": {"sampler": "euler"}})
    assert status == 400 and "choose one of" in json.loads(body)["message"]
    async with cp.http.post(f"{cp.base}/api/workflow/{wf['id']}/rerun", json={}) as resp:
        assert resp.status == 401
    status, _ = await api_rerun(cp, "00000000-0000-0000-0000-000000000000", {})
    assert status == 404
    _, still = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert (still["attempt"], still["status"]) == (1, "completed")  # nothing half-done


async def test_stale_reports_of_an_old_attempt_change_nothing(
    fleet: tuple[ControlPlane, str, dict[str, Any]],
) -> None:
    from protocol.messages import JobUpdate

    cp, _, runner = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await completed(cp, wf["id"])
    await api_rerun(cp, wf["id"], {"reRunFromTaskId": "6", "taskInput": {"filename_prefix": "z"}})
    await completed(cp, wf["id"])
    conn = cp.services.registry.get(runner["id"])
    assert conn is not None
    await cp.services.fleet.job_update(conn, JobUpdate(workflow_id=wf["id"], attempt=1, status="failed"))
    _, now = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert (now["attempt"], now["status"]) == (2, "completed")


async def test_idempotency_key_on_create_and_rerun(cp: ControlPlane) -> None:
    await cp.create_runner()
    headers = {**await cp.headers(), "Idempotency-Key": "k-1"}
    fields = {"$prompt": "a", "$input_image": png_bytes((1, 2, 3))}
    async with cp.http.post(
        f"{cp.base}/v1/workflow", data=curl_form(WORKFLOW, **fields), headers=headers
    ) as r:
        first = (r.status, await r.json())
    async with cp.http.post(
        f"{cp.base}/v1/workflow", data=curl_form(WORKFLOW, **fields), headers=headers
    ) as r:
        again = (r.status, await r.json())
        assert r.headers["Idempotent-Replayed"] == "true"
    assert first == again and first[0] == 201
    async with cp.http.post(
        f"{cp.base}/v1/workflow", data=curl_form(WORKFLOW, **{**fields, "$prompt": "b"}), headers=headers
    ) as r:
        assert r.status == 422
        assert "different request" in (await r.json())["message"]
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 1

    wf_id = first[1]["id"]
    for _ in range(2):
        async with cp.http.post(
            f"{cp.base}/v1/workflow/{wf_id}/rerun",
            data=await rerun_form(**{"$prompt": "r"}),
            headers={**headers, "Idempotency-Key": "k-2"},
        ) as r:
            assert r.status == 201
    _, listing = await cp.request("GET", f"/v1/workflow?parent_id={wf_id}")
    assert listing["total"] == 1
    # a failed request does not take the key
    async with cp.http.post(
        f"{cp.base}/v1/workflow/{wf_id}/rerun",
        data=await rerun_form(**{"$nope": "r"}),
        headers={**headers, "Idempotency-Key": "k-3"},
    ) as r:
        assert r.status == 400
    async with cp.http.post(
        f"{cp.base}/v1/workflow/{wf_id}/rerun",
        data=await rerun_form(**{"$prompt": "s"}),
        headers={**headers, "Idempotency-Key": "k-3"},
    ) as r:
        assert r.status == 201


async def test_list_filters(cp: ControlPlane) -> None:
    await cp.create_runner()
    a = await submit(cp, WORKFLOW, tags="x,y", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await submit(
        cp,
        WORKFLOW,
        tags="y",
        **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3)), "correlation_id": "c-9"},
    )
    await cp.request("POST", f"/v1/workflow/{a['id']}/cancel")
    for query, total in (
        ("tag=y", 2),
        ("tag=x", 1),
        ("tag=z", 0),
        ("status=cancelled", 1),
        ("status=accepted", 1),
        ("correlation_id=c-9", 1),
    ):
        _, listing = await cp.request("GET", f"/v1/workflow?{query}")
        assert listing["total"] == total, query


async def test_templates(fleet: tuple[ControlPlane, str, dict[str, Any]]) -> None:
    cp, _, _ = fleet
    form = aiohttp.FormData()
    form.add_field("name", "invert")
    form.add_field("description", "inverts an image")
    form.add_field("body", json.dumps(WORKFLOW), filename="body.json", content_type="application/json")
    status, template = await cp.request("POST", "/v1/template", data=form)
    assert status == 201, template
    params = {p["name"]: p for p in template["parameters"]}
    assert params["sampler"] == {
        "name": "sampler",
        "kind": "choice",
        "field": "#sampler",
        "default": "bilinear",
        "options": ["bilinear", "nearest-exact", "dpm_2"],
        "required": False,
    }
    assert params["input_image"]["required"] is True and params["input_image"]["field"] == "$input_image"
    status, run = await cp.request(
        "POST",
        f"/v1/template/{template['id']}/run",
        data=await rerun_form(**{"$prompt": "t", "$input_image": png_bytes((0, 0, 0)), "tags": "gpu"}),
    )
    assert status == 201, run
    await completed(cp, run["id"])
    _, image = await output_png(cp, run["id"])
    assert near(image.getpixel((3, 3)), (255, 255, 255))
    status, body = await cp.request(
        "POST", f"/v1/template/{template['id']}/run", data=await rerun_form(**{"$prompt": "t"})
    )
    assert status == 400 and "input_image" in body["message"]
    update = aiohttp.FormData()
    update.add_field("name", "renamed")
    status, updated = await cp.request("PUT", f"/v1/template/{template['id']}", data=update)
    assert (status, updated["name"], updated["body"]) == (200, "renamed", WORKFLOW)
    status, listing = await cp.request("GET", "/v1/template")
    assert listing["total"] == 1
    status, _ = await cp.request("GET", f"/v1/template/{template['id']}", account="mallory")
    assert status == 404
    bad = aiohttp.FormData()
    bad.add_field("name", "x")
    bad.add_field("body", json.dumps({"1": {"class_type": "X", "inputs": {"a": "$choice(c)"}}}))
    status, body = await cp.request("POST", "/v1/template", data=bad)
    assert status == 400 and "choice" in body["message"]


async def test_a_rerun_does_not_wait_for_a_runner_whose_comfyui_is_down(
    cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory
) -> None:
    from comfyui_sim import SimSettings, start_simulator

    sim_a_runner, sim_a = await start_simulator(SimSettings(data_dir=tmp_path / "a"), port=0)
    sim_b_runner, sim_b = await start_simulator(SimSettings(data_dir=tmp_path / "b"), port=0)
    try:
        a = await cp.create_runner(name="a")
        await start_agent(cp.base, a["token"], sim_a)
        wf = await submit(cp, WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3))})
        first = await completed(cp, wf["id"])
        assert first["runner_id"] == a["id"]
        b = await cp.create_runner(name="b")
        await start_agent(cp.base, b["token"], sim_b)
        await sim_a_runner.cleanup()  # a's ComfyUI goes away: a is still connected, unhealthy
        registry = cp.services.registry
        await cp.services.fleet.wait_for(
            lambda: (
                (c := registry.get(a["id"])) is not None
                and not c.healthy
                and registry.get(b["id"]) is not None
            ),
            timeout_s=15,
        )
        status, _ = await api_rerun(
            cp, wf["id"], {"reRunFromTaskId": "6", "taskInput": {"filename_prefix": "moved"}}
        )
        assert status == 200
        done = await completed(cp, wf["id"])
        assert (done["attempt"], done["runner_id"]) == (2, b["id"])
    finally:
        await sim_b_runner.cleanup()


async def test_conductor_rerun_new_values_are_checked_like_a_submission(
    fleet: tuple[ControlPlane, str, dict[str, Any]],
) -> None:
    cp, _, _ = fleet
    wf = await submit(cp, WORKFLOW, tags="gpu", **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await completed(cp, wf["id"])
    status, body = await api_rerun(cp, wf["id"], {"workflowInput": {"width": "wide"}})
    assert (status, json.loads(body)["message"]) == (400, "node 4 input 'width': 'wide' is not an INT")
    # An Idempotency-Key makes a retried rerun a no-op: still one new attempt.
    for _ in range(2):
        status, text = await api_rerun(
            cp,
            wf["id"],
            {"reRunFromTaskId": "6", "taskInput": {"filename_prefix": "k"}},
            **{"Idempotency-Key": "r-1"},
        )
        assert (status, text) == (200, wf["id"])
    done = await completed(cp, wf["id"])
    assert done["attempt"] == 2
