"""Submitting workflows: the errors the submit contract names, tags, cancel before dispatch."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import ControlPlane, png_bytes

WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$file(input_image)"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {
        "class_type": "SaveImage",
        "inputs": {"images": ["2", 0], "filename_prefix": "$text(prefix, out)"},
    },
    "4": {
        "class_type": "ImageBlur",
        "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": "$choice(sigma, 1.0, 2.0)"},
    },
}


def form(workflow: dict[str, Any] | bytes = WORKFLOW, tags: str = "", **params: Any) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("name", "test workflow")
    if tags:
        data.add_field("tags", tags)
    raw = workflow if isinstance(workflow, bytes) else json.dumps(workflow).encode()
    data.add_field("workflow_json", raw, filename="wf.json", content_type="application/json")
    params.setdefault("$input_image", png_bytes((10, 20, 30)))
    for key, value in params.items():
        if isinstance(value, bytes):
            data.add_field(key, value, filename="in.png", content_type="image/png")
        else:
            data.add_field(key, value)
    return data


async def submit(cp: ControlPlane, data: aiohttp.FormData, account: str = "alice") -> tuple[int, Any]:
    return await cp.request("POST", "/v1/workflow", account=account, data=data)


def blob_count(cp: ControlPlane) -> int:
    return sum(1 for p in cp.settings.blob_dir.rglob("*") if p.is_file())


async def test_accepted_workflow_records_its_parameters(cp: ControlPlane) -> None:
    await cp.create_runner()
    status, body = await submit(cp, form(**{"$prefix": "hello", "#sigma": "2.0"}))
    assert status == 201, body
    assert body["status"] == "accepted"
    assert body["name"] == "test workflow"
    params = body["workflow_params"]
    assert params["values"] == {"prefix": "hello", "sigma": "2.0"}
    assert params["files"]["input_image"]["filename"] == "in.png"
    status, fetched = await cp.request("GET", f"/v1/workflow/{body['id']}")
    assert status == 200
    assert fetched["queue_number"] == 1  # no agent connected: it waits, first in line


async def test_defaults_fill_omitted_parameters(cp: ControlPlane) -> None:
    await cp.create_runner()
    status, body = await submit(cp, form())
    assert status == 201
    assert body["workflow_params"]["values"] == {"prefix": "out", "sigma": "1.0"}


async def test_unknown_parameter_is_400_and_stores_nothing(cp: ControlPlane) -> None:
    await cp.create_runner()
    before = blob_count(cp)
    status, body = await submit(cp, form(**{"$nope": "x"}))
    assert status == 400
    assert "nope" in body["message"]
    assert blob_count(cp) == before
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0


async def test_choice_outside_options_is_400(cp: ControlPlane) -> None:
    await cp.create_runner()
    status, body = await submit(cp, form(**{"#sigma": "9.9"}))
    assert status == 400
    assert "1.0" in body["message"] and "2.0" in body["message"]


async def test_missing_file_is_400(cp: ControlPlane) -> None:
    await cp.create_runner()
    data = aiohttp.FormData()
    data.add_field("workflow_json", json.dumps(WORKFLOW), filename="wf.json")
    status, body = await submit(cp, data)
    assert status == 400
    assert "input_image" in body["message"]


async def test_malformed_workflow_is_400(cp: ControlPlane) -> None:
    await cp.create_runner()
    status, body = await submit(cp, form(b"{not json"))
    assert status == 400 and "workflow_json" in body["message"]
    status, body = await submit(cp, form({"1": {"class_type": "X", "inputs": {"a": "$text(bad name!)"}}}))
    assert status == 400 and "bad name" in body["message"]


async def test_oversize_request_is_400_and_stores_nothing(cp: ControlPlane) -> None:
    await cp.create_runner()
    before = blob_count(cp)
    big = b"\0" * (cp.settings.max_request_bytes + 1)
    # Its own session: closing it ends the server's wait for the rest of the refused body.
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"{cp.base}/v1/workflow", data=form(**{"$input_image": big}), headers=await cp.headers()
        )
        assert resp.status == 400
        assert "50 MB" in (await resp.json())["message"]
    assert blob_count(cp) == before


async def test_oversize_chunked_request_is_stopped_while_reading(cp: ControlPlane) -> None:
    """Without a Content-Length the cap is enforced on the bytes as they arrive."""
    await cp.create_runner()
    writer = form()()

    async def body() -> Any:
        chunk = b"x" * (1024 * 1024)
        boundary = writer.boundary
        disposition = 'Content-Disposition: form-data; name="$input_image"; filename="a.png"'
        yield f"--{boundary}\r\n{disposition}\r\n\r\n".encode()
        for _ in range(60):
            yield chunk

    headers = {**await cp.headers(), "Content-Type": f"multipart/form-data; boundary={writer.boundary}"}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{cp.base}/v1/workflow", data=body(), headers=headers)
        assert resp.status == 400
        assert "50 MB" in (await resp.json())["message"]


async def test_no_runner_with_matching_tags_is_400(cp: ControlPlane) -> None:
    await cp.create_runner(tags=["sdxl"])
    status, body = await submit(cp, form(tags="flux"))
    assert status == 400
    assert body["message"].startswith("no runner available with matching tags")


async def test_tag_matching_all_tags_wildcards_and_disabled(cp: ControlPlane) -> None:
    tagged = await cp.create_runner(name="tagged", tags=["sdxl", "a100"])
    assert (await submit(cp, form(tags="sdxl,a100")))[0] == 201
    assert (await submit(cp, form(tags="sdxl,h100")))[0] == 400  # needs every tag
    await cp.request("PUT", f"/v1/runner/{tagged['id']}", json={"status": "disabled"})
    assert (await submit(cp, form(tags="sdxl")))[0] == 400  # disabled runners never get work
    await cp.create_runner(name="wildcard")
    assert (await submit(cp, form(tags="anything,at-all")))[0] == 201


async def test_other_accounts_workflow_is_404(cp: ControlPlane) -> None:
    await cp.create_runner()
    _, body = await submit(cp, form())
    for method, path in (
        ("GET", f"/v1/workflow/{body['id']}"),
        ("POST", f"/v1/workflow/{body['id']}/cancel"),
        ("GET", f"/v1/workflow/{body['id']}/outputs"),
        ("GET", f"/v1/workflow/{body['id']}/subscribe"),
    ):
        status, err = await cp.request(method, path, account="mallory")
        assert status == 404, (method, path)
        assert err["message"] == f"workflow {body['id']} not found"
    status, _ = await cp.request("GET", "/v1/workflow/00000000-0000-0000-0000-000000000000")
    assert status == 404


async def test_cancel_accepted_then_cancel_again_is_400(cp: ControlPlane) -> None:
    await cp.create_runner()
    _, body = await submit(cp, form())
    status, cancelled = await cp.request("POST", f"/v1/workflow/{body['id']}/cancel")
    assert (status, cancelled["status"]) == (200, "cancelled")
    assert cancelled["completed_at"] is not None
    status, err = await cp.request("POST", f"/v1/workflow/{body['id']}/cancel")
    assert status == 400
    assert err["message"] == f"workflow {body['id']} is already cancelled"


async def test_tier_parameter_limit_is_403(cp: ControlPlane) -> None:
    await cp.create_runner()
    wf = {"1": {"class_type": "PrimitiveString", "inputs": {f"v{i}": f"$text(p{i}, x)" for i in range(25)}}}
    params = {f"$p{i}": "y" for i in range(25)}
    status, body = await submit(cp, form_without_file(wf, params))
    assert status == 403
    assert "free tier allows 20" in body["message"]


def form_without_file(workflow: dict[str, Any], params: dict[str, str]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("workflow_json", json.dumps(workflow), filename="wf.json")
    for key, value in params.items():
        data.add_field(key, value)
    return data
