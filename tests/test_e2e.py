"""End to end through real sockets: REST client -> control plane -> agent -> ComfyUI simulator
and back, for the happy path and each way a job can end."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, read_png, start_control_plane

WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$file(input_image)"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["2", 0],
            "upscale_method": "$choice(sampler, nearest-exact, bilinear)",
            "width": "$text(width, 16)",
            "height": 16,
            "crop": "disabled",
        },
    },
    "4": {"class_type": "ImageAddNoise", "inputs": {"image": ["3", 0], "seed": "$random()", "strength": 0.0}},
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "$text(prompt)"}},
    "6": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "$timestamp()"}},
}


def curl_form(workflow: dict[str, Any], **fields: str | bytes) -> aiohttp.FormData:
    """Multipart as the README's curl example builds it: -F '$prompt=…' -F '$input_image=@…'
    -F '#sampler=…', plus the workflow file, its name and tags."""
    data = aiohttp.FormData()
    data.add_field("name", "e2e")
    data.add_field(
        "workflow_json", json.dumps(workflow), filename="workflow.json", content_type="application/json"
    )
    for key, value in fields.items():
        if isinstance(value, bytes):
            data.add_field(key, value, filename="input.png", content_type="image/png")
        else:
            data.add_field(key, value)
    return data


async def submit(cp: ControlPlane, workflow: dict[str, Any], **fields: str | bytes) -> dict[str, Any]:
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(workflow, **fields))
    assert status == 201, body
    return body


async def statuses_until_done(cp: ControlPlane, wf_id: str, on_first: Any = None) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(30):
        async for event, data in cp.events(wf_id):
            if event == "status":
                seen.append(data["status"])
                if len(seen) == 1 and on_first is not None:
                    await on_first()
    return seen


async def sim_config(http: aiohttp.ClientSession, sim: str, **config: Any) -> None:
    async with http.post(f"{sim}/sim/config", json=config) as resp:
        assert resp.status == 200


async def test_workflow_runs_end_to_end_with_every_placeholder(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner(tags=["gpu"])
    wf = await submit(
        cp,
        WORKFLOW,
        tags="gpu",
        **{"$prompt": "a red fox", "$input_image": png_bytes((10, 200, 60)), "#sampler": "bilinear"},
    )

    async def agent_comes_online() -> None:
        await start_agent(cp.base, runner["token"], sim)

    # The agent starts only once the stream is open, so every status is seen.
    seen = await statuses_until_done(cp, wf["id"], on_first=agent_comes_online)
    assert seen == ["accepted", "uploaded", "queued", "running", "completed"]

    status, done = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert status == 200
    assert done["runner_id"] == runner["id"]
    assert done["prompt_id"]
    assert done["started_at"] and done["completed_at"]
    resolved = done["workflow_params"]["resolved"]
    assert resolved["values"] == {"prompt": "a red fox", "sampler": "bilinear", "width": "16"}
    assert 0 <= resolved["random"]["4.seed"] < 2**64
    timestamp_ms = resolved["timestamp_ms"]

    status, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    by_node = {o["node_id"]: o for o in listing["outputs"]}
    assert set(by_node) == {"5", "6"}
    assert by_node["5"]["filename"].startswith("a red fox_")
    assert by_node["6"]["filename"].startswith(f"{timestamp_ms}_")
    status, png = await cp.request("GET", by_node["5"]["src"])
    assert status == 200
    image = read_png(png)
    assert image.size == (16, 16)  # scaled by $width's default
    # The uploaded colour, inverted; ComfyUI truncates when it converts back to 8 bits.
    pixel = image.getpixel((8, 8))
    assert all(abs(got - want) <= 1 for got, want in zip(pixel, (245, 55, 195), strict=True)), pixel
    status, _ = await cp.request("GET", by_node["5"]["src"], account="mallory")
    assert status == 404


async def test_comfyui_validation_error_makes_the_workflow_invalid(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    broken = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "$text(prefix, x)"}},
    }
    wf = await submit(cp, broken)
    done = await cp.wait_for_status(wf["id"], {"invalid", "failed", "completed"})
    assert done["status"] == "invalid"
    assert done["node_errors"]["2"]["errors"][0]["type"] == "required_input_missing"
    assert "validation" in done["exception_message"].lower()


async def test_value_that_does_not_convert_is_invalid(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    """Submitted while no runner has said what its ComfyUI declares (so the control plane
    cannot check it), the value is caught by the agent: the workflow ends invalid."""
    runner = await cp.create_runner()
    wf_json = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": "$text(width)", "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    wf = await submit(cp, wf_json, **{"$width": "wide"})
    await start_agent(cp.base, runner["token"], sim)
    done = await cp.wait_for_status(wf["id"], {"invalid", "failed", "completed"})
    assert done["status"] == "invalid"
    assert "'wide'" in done["exception_message"] and "INT" in done["exception_message"]


async def test_execution_error_makes_the_workflow_failed(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    await sim_config(http, sim, fail_nodes={"ImageInvert": "the invert broke"})
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    causes: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        async for event, data in cp.events(wf["id"]):
            if event == "cause":
                causes.append(data)
    _, done = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert done["status"] == "failed"
    assert done["error_node"] == "2"
    assert "the invert broke" in done["exception_message"]
    assert done["exception_type"]
    assert causes and causes[0]["error_node"] == "2"
    tasks = {t["node_id"]: t["status"] for t in done["tasks"]}
    assert tasks["2"] == "FAILED"


async def test_cancel_while_running_interrupts_comfyui(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    # A slow first node holds the prompt; interrupt lands when the next node starts.
    await sim_config(http, sim, node_delays_s={"LoadImage": 1.0})
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    await cp.wait_for_status(wf["id"], {"running"})
    status, body = await cp.request("POST", f"/v1/workflow/{wf['id']}/cancel")
    assert (status, body["status"]) == (200, "cancelled")
    # The runner is free again for the next workflow; ComfyUI runs one prompt at a time, so
    # once that one completed the interrupted one has ended too.
    await sim_config(http, sim, node_delays_s={})
    nxt = await submit(cp, WORKFLOW, **{"$prompt": "q", "$input_image": png_bytes((1, 2, 3))})
    assert (await cp.wait_for_status(nxt["id"], {"completed", "failed"}))["status"] == "completed"
    async with http.get(f"{sim}/history/{body['prompt_id']}") as resp:
        history = await resp.json()
    assert history[body["prompt_id"]]["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in history[body["prompt_id"]]["status"]["messages"])
    _, final = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert final["status"] == "cancelled"  # late reports of the cancelled job change nothing


async def test_cancel_while_queued_in_comfyui_removes_the_prompt(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    await sim_config(http, sim, node_delays_s={"LoadImage": 1.0})
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim, slots=2)
    first = await submit(cp, WORKFLOW, **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await cp.wait_for_status(first["id"], {"running"})
    second = await submit(cp, WORKFLOW, **{"$prompt": "b", "$input_image": png_bytes((4, 5, 6))})
    queued = await cp.wait_for_status(second["id"], {"queued"})
    status, body = await cp.request("POST", f"/v1/workflow/{second['id']}/cancel")
    assert (status, body["status"]) == (200, "cancelled")
    done = await cp.wait_for_status(first["id"], {"completed", "failed"})
    assert done["status"] == "completed"
    async with http.get(f"{sim}/sim/log") as resp:
        ran = [p["prompt_id"] for p in (await resp.json())["prompts"]]
    assert queued["prompt_id"] not in ran


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_agent_reconnects_after_control_plane_restart_and_finishes_its_job(
    tmp_path: Path, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    runner1, base, app, settings = await start_control_plane(tmp_path, port=port, runner_grace_s=30)
    cp1 = ControlPlane(base, settings, app, runner1, http)
    runner = await cp1.create_runner()
    await start_agent(base, runner["token"], sim)
    await sim_config(http, sim, node_delays_s={"ImageInvert": 1.0})
    wf = await submit(cp1, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    await cp1.wait_for_status(wf["id"], {"running"})
    await runner1.cleanup()  # the control plane goes away mid-job

    runner2, base2, app2, settings2 = await start_control_plane(tmp_path, port=port, runner_grace_s=30)
    try:
        cp2 = ControlPlane(base2, settings2, app2, runner2, http)
        cp2._tokens = cp1._tokens
        done = await cp2.wait_for_status(wf["id"], {"completed", "failed"})
        assert done["status"] == "completed"
        assert done["attempt"] == 1  # the same attempt finished: nothing was run twice
        _, listing = await cp2.request("GET", f"/v1/workflow/{wf['id']}/outputs")
        assert {o["node_id"] for o in listing["outputs"]} == {"5", "6"}
        _, fetched = await cp2.request("GET", f"/v1/runner/{runner['id']}")
        assert fetched["connected"] is True
    finally:
        await runner2.cleanup()


async def test_cancel_while_uploaded_keeps_the_prompt_from_running(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    # ComfyUI is slow to accept the prompt: the job sits in "uploaded" meanwhile, its prompt on
    # the way. Its first node takes a minute, so only the agent can keep the prompt from its
    # outputs; that node is let go once the agent has acted, whichever way it went.
    await sim_config(http, sim, prompt_accept_delay_s=1.0, node_delays_s={"LoadImage": 60.0})
    runner = await cp.create_runner()
    agent = await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "a", "$input_image": png_bytes((1, 2, 3))})
    await cp.wait_for_status(wf["id"], {"uploaded"})
    status, body = await cp.request("POST", f"/v1/workflow/{wf['id']}/cancel")
    assert (status, body["status"]) == (200, "cancelled")

    async def agent_acted() -> bool:
        # Either the cancel came before the prompt was posted (the job ended, nothing
        # posted) or ComfyUI got the prompt and the agent interrupted it.
        async with http.get(f"{sim}/sim/log") as resp:
            log = await resp.json()
        interrupted = bool(log["queued"]) and set(log["queued"]) <= set(log["interrupted"])
        return interrupted or (wf["id"], 1) not in agent.jobs

    await poll_until(agent_acted)
    await sim_config(http, sim, prompt_accept_delay_s=0, node_delays_s={})
    nxt = await submit(cp, WORKFLOW, **{"$prompt": "b", "$input_image": png_bytes((1, 2, 3))})
    done = await cp.wait_for_status(nxt["id"], {"completed", "failed"})
    assert done["status"] == "completed"
    # The cancelled job's prompt, if ComfyUI took it at all, never ran to its outputs.
    async with http.get(f"{sim}/sim/log") as resp:
        ran = {p["prompt_id"]: p for p in (await resp.json())["prompts"]}
    others = [p for pid, p in ran.items() if pid != done["prompt_id"]]
    assert all("5" not in p["executed"] and not p["success"] for p in others)
    _, final = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert final["status"] == "cancelled"
    _, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    assert listing["outputs"] == []


async def test_values_are_checked_against_the_runners_types_at_submit(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    registry = cp.services.registry
    await cp.services.fleet.wait_for(lambda: registry.get(runner["id"]) is not None, timeout_s=10)
    wf_json = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": "$text(width)", "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "$choice(method, bilinear, dpm_2)",
                "width": 8,
                "height": 8,
                "crop": "disabled",
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(wf_json, **{"$width": "wide"}))
    assert status == 400
    assert body["message"] == "node 1 input 'width': 'wide' is not an INT"
    status, body = await cp.request(
        "POST", "/v1/workflow", data=curl_form(wf_json, **{"$width": "8", "#method": "dpm_2"})
    )
    assert status == 400
    assert body["message"].startswith(
        "node 2 input 'upscale_method': 'dpm_2' is not one of nearest-exact, bilinear"
    )
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(wf_json, **{"$width": "8"}))
    assert status == 201
    assert (await cp.wait_for_status(body["id"], {"completed", "failed", "invalid"}))["status"] == "completed"
