"""Submissions as JSON: parameters as values, files as base64, as a URL the control plane
fetches, or as the sha256 of a file uploaded once with POST /v1/blob."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import AgentFactory, ControlPlane, png_bytes, read_png, start_control_plane
from tests.test_e2e import WORKFLOW

FOX = png_bytes((200, 60, 10))
ENDS = {"completed", "failed", "invalid", "cancelled"}


@pytest.fixture
async def files() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A web server on loopback: /fox.png, /moved (to it), /never (answers once let go)."""
    let_go = asyncio.Event()

    async def fox(_: web.Request) -> web.Response:
        return web.Response(body=FOX, content_type="image/png")

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/fox.png")

    async def never(_: web.Request) -> web.Response:
        await let_go.wait()
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/fox.png", fox)
    app.router.add_get("/moved", moved)
    app.router.add_get("/never", never)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", let_go
    let_go.set()
    await runner.cleanup()


@pytest.fixture
async def open_cp(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> AsyncIterator[ControlPlane]:
    """A control plane whose operator lets it fetch from private addresses (the test's
    server is on loopback), and gives up on a fetch after a second."""
    runner, base, app, settings = await start_control_plane(
        tmp_path, database_url=database_url, fetch_private_urls=True, input_fetch_timeout_s=1.0
    )
    yield ControlPlane(base, settings, app, runner, http)
    await runner.cleanup()


def body(image: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {
        "workflow_json": WORKFLOW,
        "name": "json",
        "$prompt": "fox",
        "$width": 16,
        "$input_image": image,
    } | more


async def run_to_end(cp: ControlPlane, sent: dict[str, Any]) -> dict[str, Any]:
    status, wf = await cp.request("POST", "/v1/workflow", json=sent)
    assert status == 201, wf
    return await cp.wait_for_status(wf["id"], ENDS)


async def inverted_output(cp: ControlPlane, wf: dict[str, Any]) -> tuple[int, int, int]:
    _, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    [six] = [o for o in listing["outputs"] if o["node_id"] == "6"]
    _, data = await cp.request("GET", six["src"])
    pixel = read_png(data).getpixel((0, 0))
    assert isinstance(pixel, tuple)
    return pixel[0], pixel[1], pixel[2]


def inverted(pixel: tuple[int, int, int]) -> bool:
    """The fox's colour, inverted (ComfyUI's arithmetic is in floats: within one)."""
    return all(abs(got - (255 - sent)) <= 1 for got, sent in zip(pixel, (200, 60, 10), strict=True))


async def test_a_json_submission_with_a_base64_file_runs(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = {"base64": base64.b64encode(FOX).decode(), "filename": "fox.png"}
    done = await run_to_end(cp, body(image, tags=["json"], **{"#sampler": "bilinear"}))
    assert done["status"] == "completed" and done["tags"] == ["json"]
    params = done["workflow_params"]
    assert params["values"] == {"prompt": "fox", "width": "16", "sampler": "bilinear"}
    assert params["files"]["input_image"]["sha256"] == hashlib.sha256(FOX).hexdigest()
    assert inverted(await inverted_output(cp, done))  # the fox, inverted

    # A rerun with new parameters takes JSON as well.
    status, again = await cp.request("POST", f"/v1/workflow/{done['id']}/rerun", json={"$prompt": "fox2"})
    assert status == 201, again
    rerun = await cp.wait_for_status(again["id"], ENDS)
    assert rerun["status"] == "completed" and rerun["workflow_params"]["values"]["prompt"] == "fox2"


async def test_a_file_given_by_url_is_fetched_and_followed_through_a_redirect(
    open_cp: ControlPlane, sim: str, start_agent: AgentFactory, files: tuple[str, asyncio.Event]
) -> None:
    cp, (server, _) = open_cp, files
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    done = await run_to_end(cp, body({"url": f"{server}/moved"}))
    assert done["status"] == "completed"
    sent = done["workflow_params"]["files"]["input_image"]
    assert (sent["filename"], sent["size_bytes"]) == ("fox.png", len(FOX))
    assert inverted(await inverted_output(cp, done))


async def test_a_url_that_cannot_be_had_is_a_400_that_says_why(
    open_cp: ControlPlane, files: tuple[str, asyncio.Event]
) -> None:
    cp, (server, _) = open_cp, files
    for url, said in (
        (f"{server}/missing.png", "answered 404"),
        (f"{server}/never", "did not answer within 1 s"),
        ("ftp://example.org/fox.png", "must be http:// or https://"),
    ):
        status, answer = await cp.request("POST", "/v1/workflow", json=body({"url": url}))
        assert status == 400 and said in answer["message"], (url, answer)
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0  # nothing was made of them


async def test_private_and_loopback_urls_are_refused_unless_the_operator_allows_them(
    cp: ControlPlane, files: tuple[str, asyncio.Event]
) -> None:
    server, _ = files
    port = server.rsplit(":", 1)[1]
    for url in (f"{server}/fox.png", f"http://localhost:{port}/fox.png", "http://169.254.169.254/latest"):
        status, answer = await cp.request("POST", "/v1/workflow", json=body({"url": url}))
        assert status == 400, (url, answer)
        assert (
            "private, loopback or link-local" in answer["message"]
            and "fetch_private_urls" in answer["message"]
        )


async def test_a_file_uploaded_once_is_named_by_its_sha256(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    sha = hashlib.sha256(FOX).hexdigest()
    headers = await cp.headers() | {"Content-Type": "image/png"}
    status, blob = await cp.request("POST", "/v1/blob?filename=fox.png", data=FOX, headers=headers)
    assert (status, blob["sha256"], blob["size"], blob["filename"]) == (201, sha, len(FOX), "fox.png")
    status, _ = await cp.request("POST", "/v1/blob?filename=fox.png", data=FOX, headers=headers)
    assert status == 200  # already there
    done = await run_to_end(cp, body({"sha256": sha}))
    assert (
        done["status"] == "completed"
        and done["workflow_params"]["files"]["input_image"]["filename"] == "fox.png"
    )

    # Another account has not uploaded it: the hash alone gives it nothing.
    status, answer = await cp.request("POST", "/v1/workflow", json=body({"sha256": sha}), account="bob")
    assert status == 400 and "uploaded no file with sha256" in answer["message"]


async def test_a_json_submission_that_is_wrong_is_a_400_that_says_what(cp: ControlPlane) -> None:
    wrong: list[tuple[Any, str]] = [
        ([1, 2], "one object"),
        (body({"base64": "not base64!", "filename": "f.png"}), "is not base64"),
        (body({"base64": base64.b64encode(FOX).decode()}), "filename is required"),
        (
            body({"base64": "", "url": "http://example.org/x", "filename": "f"}),
            "a file is an object with one of base64, url or sha256",
        ),
        (body({"sha256": "0" * 64}), "uploaded no file"),
        (
            body({"base64": "AA==", "filename": "f.png"}, **{"$prompt": {"nested": 1}}),
            "a text value is a string",
        ),
        (
            body({"base64": "AA==", "filename": "f.png"}, **{"#sampler": [1]}),
            "must be a string, a number",
        ),
        (body({"base64": "AA==", "filename": "f.png"}, workflow_json=[1]), "workflow_json must be an object"),
        (body({"base64": "AA==", "filename": "f.png"}, colour="red"), "unknown field 'colour'"),
    ]
    for sent, said in wrong:
        status, answer = await cp.request("POST", "/v1/workflow", json=sent)
        assert status == 400 and said in answer["message"], (sent, answer)
    status, answer = await cp.request(
        "POST",
        "/v1/workflow",
        data=b"{not json",
        headers=await cp.headers() | {"Content-Type": "application/json"},
    )
    assert status == 400 and "JSON" in answer["message"]
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0
