"""The Python client (``comfyfleet.client``) against a real control plane, simulator and agent:
submit with every kind of parameter, follow, wait, download, cancel, both reruns, listing,
runners and the server's errors as typed exceptions. The blocking :class:`Client` runs in a
worker thread, since the control plane serves from this test's event loop."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from comfyfleet.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectionFailed,
    Event,
    Forbidden,
    NotFound,
    Progress,
    RateLimited,
    Unauthorized,
    config,
)
from comfyfleet.client.events import SseParser
from comfyfleet.processes import free_port
from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, read_png
from tests.test_e2e import sim_config

SAMPLE = Path(__file__).resolve().parents[1] / "comfyfleet" / "samples" / "invert_scale.json"
T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kwargs)


@dataclass
class Fleet:
    cp: ControlPlane
    sim: str
    token: str
    runner: dict[str, Any]
    client: Client
    aclient: AsyncClient


@pytest.fixture
async def fleet(cp: ControlPlane, sim: str, start_agent: AgentFactory) -> AsyncIterator[Fleet]:
    token = await cp.token("acme", tier="pro")
    client = Client(cp.base, token)
    aclient = AsyncClient(cp.base, token)
    runner = await aclient.create_runner("gpu-01", ["sdxl"])
    await start_agent(cp.base, runner["token"], sim)
    yield Fleet(cp, sim, token, runner, client, aclient)
    await in_thread(client.close)
    await aclient.aclose()


def sample_params(prefix: str = "fox") -> dict[str, Any]:
    return {"params": {"prefix": prefix, "width": 24, "height": 16}, "choices": {"method": "bilinear"}}


async def test_submit_follow_wait_and_download(fleet: Fleet, tmp_path: Path) -> None:
    image = tmp_path / "fox.png"
    image.write_bytes(png_bytes((10, 200, 60)))
    wf = await in_thread(
        fleet.client.submit,
        SAMPLE,
        files={"input_image": image},
        tags=["sdxl"],
        name="a fox",
        **sample_params(),
    )
    assert (wf["status"], wf["name"], wf["tags"]) == ("accepted", "a fox", ["sdxl"])

    events: list[Event] = await in_thread(lambda: list(fleet.client.events(wf["id"])))
    assert events[0].name == "status"
    assert events[-1].status == "completed" and events[-1].terminal
    assert [e for e in events if e.name == "output"], [e.name for e in events]
    # Each event after the first status has an id, to resume from.
    assert all(e.id for e in events[1:])
    progress = Progress(wf["id"])
    for event in events:
        progress = progress.after(event)
    assert (progress.status, progress.percent, progress.outputs) == ("completed", 100, 1)

    # Waiting on a finished workflow answers at once, with the whole view.
    seen: list[Event] = []
    done = await in_thread(fleet.client.wait, wf["id"], on_event=seen.append)
    assert done["status"] == "completed" and [e.status for e in seen] == ["completed"]
    assert done["runner_id"] == fleet.runner["id"]
    assert done["workflow_params"]["resolved"]["values"] == {
        "prefix": "fox",
        "width": "24",
        "height": "16",
        "method": "bilinear",
    }

    (output,) = await in_thread(fleet.client.outputs, wf["id"])
    assert output["node_id"] == "5" and output["filename"].startswith("fox_")
    data = await in_thread(fleet.client.download, output)
    image_out = read_png(data)
    assert image_out.size == (24, 16)
    pixel = image_out.getpixel((5, 5))
    assert all(abs(a - b) <= 1 for a, b in zip(pixel, (245, 55, 195), strict=True)), pixel  # inverted

    (path,) = await in_thread(fleet.client.save_outputs, wf["id"], tmp_path / "out")
    assert path == tmp_path / "out" / output["filename"]
    assert path.read_bytes() == data
    assert not list((tmp_path / "out").glob("*.part"))

    listed = await in_thread(fleet.client.list_workflows, tag="sdxl", status="completed")
    assert [w["id"] for w in listed["workflows"]] == [wf["id"]] and listed["total"] == 1


async def test_the_async_client_does_the_same(fleet: Fleet, tmp_path: Path) -> None:
    workflow = json.loads(SAMPLE.read_text())  # a dict this time, and the image as bytes
    wf = await fleet.aclient.submit(
        workflow, files={"$input_image": png_bytes((0, 0, 0))}, **sample_params("night")
    )
    statuses = [e.status async for e in fleet.aclient.events(wf["id"]) if e.status]
    assert statuses[-1] == "completed"
    assert statuses == sorted(set(statuses), key=statuses.index)  # none told twice
    done = await fleet.aclient.wait(wf["id"])
    assert done["status"] == "completed"
    (path,) = await fleet.aclient.save_outputs(wf["id"], tmp_path)
    assert path.name.startswith("night_")
    assert read_png(path.read_bytes()).getpixel((0, 0)) == (255, 255, 255)
    assert (await fleet.aclient.get_workflow(wf["id"]))["id"] == wf["id"]


async def test_cancel_a_running_workflow(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    await sim_config(http, fleet.sim, node_delays_s={"3": 60})  # ImageScale runs until cancelled
    wf = await fleet.aclient.submit(SAMPLE, files={"input_image": png_bytes((1, 2, 3))}, **sample_params())
    statuses = []
    async for event in fleet.aclient.events(wf["id"]):
        if event.name == "node" and event.data.get("node_id") == "3":
            cancelled = await fleet.aclient.cancel(wf["id"])
            assert cancelled["status"] == "cancelled"
        if event.status:
            statuses.append(event.status)
    assert statuses[-1] == "cancelled" and "running" in statuses
    assert await fleet.aclient.outputs(wf["id"]) == []
    # The sync client's typed error, with the server's own words.
    with pytest.raises(BadRequest) as caught:
        await in_thread(fleet.client.cancel, wf["id"])
    assert caught.value.status == 400
    assert caught.value.message == f"workflow {wf['id']} is already cancelled"
    assert caught.value.code == "bad_request"
    await sim_config(http, fleet.sim, node_delays_s={})  # lets the interrupted node end


async def test_both_reruns(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    original = await in_thread(
        fleet.client.submit, SAMPLE, files={"input_image": png_bytes((9, 9, 9))}, **sample_params("red")
    )
    first = await in_thread(fleet.client.wait, original["id"])

    # From a node, in place: the same workflow, its next attempt; upstream comes from the cache
    # (first: the rerun below, with its own copy of the input file, would take the cache's place).
    again = await in_thread(fleet.client.rerun_from_node, original["id"], "4", params={"prefix": "green"})
    assert again == original["id"]
    second = await in_thread(fleet.client.wait, original["id"])
    assert (second["status"], second["attempt"]) == ("completed", first["attempt"] + 1)
    (out,) = await in_thread(fleet.client.outputs, original["id"])
    assert out["filename"].startswith("green_")
    async with http.get(f"{fleet.sim}/sim/log") as resp:
        last = (await resp.json())["prompts"][-1]
    assert last["executed"] == ["4", "5"] and sorted(last["cached"]) == ["1", "2", "3"]

    # New parameters: a new workflow; what is not sent (the file, the sizes) is kept.
    child = await in_thread(fleet.client.rerun, original["id"], params={"prefix": "blue"})
    assert child["id"] != original["id"]
    done = await in_thread(fleet.client.wait, child["id"])
    assert done["status"] == "completed" and done["parent_id"] == original["id"]
    assert done["workflow_params"]["resolved"]["values"]["prefix"] == "blue"
    assert done["workflow_params"]["resolved"]["values"]["width"] == "24"
    (out,) = await in_thread(fleet.client.outputs, child["id"])
    assert out["filename"].startswith("blue_")
    children = await in_thread(fleet.client.list_workflows, parent_id=original["id"])
    assert [w["id"] for w in children["workflows"]] == [child["id"]]


async def test_the_servers_errors_are_typed_with_its_message(fleet: Fleet) -> None:
    with pytest.raises(NotFound) as missing:
        await in_thread(fleet.client.get_workflow, "no-such-workflow")
    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert missing.value.message == "workflow no-such-workflow not found"
    assert str(missing.value) == "workflow no-such-workflow not found (HTTP 404)"

    with pytest.raises(BadRequest) as bad:  # not one of the choice's options
        await fleet.aclient.submit(
            SAMPLE,
            files={"input_image": png_bytes((1, 1, 1))},
            params={"prefix": "x"},
            choices={"method": "dpm_2"},
        )
    assert bad.value.status == 400 and "dpm_2" in bad.value.message

    with pytest.raises(NotFound):  # an id that is not a workflow's, on the stream as well
        await in_thread(lambda: list(fleet.client.events("no-such-workflow")))

    with Client(fleet.cp.base, "cf_not-a-token") as stranger, pytest.raises(Unauthorized) as refused:
        await in_thread(stranger.list_workflows)
    assert refused.value.message == "invalid token"

    port = free_port()
    with Client(f"127.0.0.1:{port}", fleet.token) as nowhere, pytest.raises(ConnectionFailed) as unreachable:
        await in_thread(nowhere.whoami)
    assert str(unreachable.value).startswith(f"cannot reach http://127.0.0.1:{port}: ")


async def test_free_tier_limits_are_forbidden_and_rate_limited(cp: ControlPlane) -> None:
    async with AsyncClient(cp.base, await cp.token("frugal")) as client:
        await client.create_runner("gpu")  # else "no runner available" comes first
        with pytest.raises(Forbidden, match="21 parameters sent; the free tier allows 20"):
            many = {f"x{i}": f"$text(p{i}, 1)" for i in range(21)}
            workflow = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png", **many}}}
            await client.submit(workflow, params={f"p{i}": i for i in range(21)})
        # The submit bucket is checked before the body is read: a burst past it is a 429.
        limited = None
        for _ in range(60):
            try:
                await client.submit({}, params={"a": 1})
            except RateLimited as exc:
                limited = exc
                break
            except BadRequest:
                continue
        assert limited is not None and limited.status == 429 and limited.retry_after_s >= 1
        assert "the free tier submits at most" in limited.message


async def test_runners(fleet: Fleet) -> None:
    async def connected() -> bool:
        return bool((await fleet.aclient.get_runner(fleet.runner["id"]))["connected"])

    await poll_until(connected)
    listed = await in_thread(fleet.client.list_runners)
    assert [r["id"] for r in listed["runners"]] == [fleet.runner["id"]]
    assert listed["runners"][0]["connected"] is True
    made = await in_thread(fleet.client.create_runner, "gpu-02", "a,b")
    assert made["token"] and made["tags"] == ["a", "b"] and made["status"] == "active"
    shown = await in_thread(fleet.client.get_runner, made["id"])
    assert "token" not in shown and shown["name"] == "gpu-02"
    assert (await in_thread(fleet.client.disable_runner, made["id"]))["status"] == "disabled"
    assert (await fleet.aclient.get_runner(made["id"]))["status"] == "disabled"
    assert (await fleet.aclient.enable_runner(made["id"]))["status"] == "active"
    with pytest.raises(BadRequest, match="name must be a non-empty string"):
        await fleet.aclient.create_runner("  ")
    await fleet.aclient.delete_runner(made["id"])
    with pytest.raises(NotFound):
        await fleet.aclient.get_runner(made["id"])


def test_sse_parser_reads_the_stream_as_eventsource_does() -> None:
    parser = SseParser()
    lines = [
        ": keepalive",
        "",
        "id: 7",
        "event: node",
        'data: {"node_id": "3",',
        'data: "progress": 0.5}',
        "",
    ]
    got = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert got == [Event("node", {"node_id": "3", "progress": 0.5}, "7")]
    assert parser.feed("data:plain") is None and parser.feed("") == Event("message", {"text": "plain"})


def test_progress_folds_events_into_what_a_bar_shows() -> None:
    p = Progress("wf")
    p = p.after(Event("status", {"status": "accepted", "attempt": 1, "queue_number": 2}))
    assert p.line() == "accepted  queue position 2"
    p = p.after(Event("status", {"status": "running", "attempt": 1, "queue_number": None}))
    p = p.after(
        Event("node", {"node_id": "3", "class_type": "ImageScale", "event": "executing", "progress": 0.4})
    )
    assert (p.node, p.percent) == ("3 (ImageScale)", 40)
    assert p.line() == "running  node 3 (ImageScale)  40%"
    p = p.after(Event("status", {"status": "running", "attempt": 2}))  # a new attempt starts over
    assert (p.node, p.percent, p.line()) == (None, None, "running  attempt 2")


def test_config_file_is_private_and_flags_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in (config.CONFIG_ENV, config.SERVER_ENV, config.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    assert config.config_path() == tmp_path / "xdg" / "comfyfleet" / "client.json"
    assert config.resolve() == config.ClientConfig(config.DEFAULT_SERVER, None)
    path = config.save_file("http://cp:8080", "cf_stored")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.resolve().token == "cf_stored" and config.resolve().server == "http://cp:8080"
    monkeypatch.setenv(config.TOKEN_ENV, "cf_env")
    assert config.resolve().token == "cf_env"
    assert config.resolve(token="cf_flag", server="http://other").token == "cf_flag"
    monkeypatch.setenv(config.CONFIG_ENV, str(tmp_path / "elsewhere.json"))
    assert config.config_path() == tmp_path / "elsewhere.json"
