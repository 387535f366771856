"""The ComfyUI simulator against what a real ComfyUI 0.3.64 was recorded saying.

Every test starts a real simulator on 127.0.0.1 (port picked by the OS) and talks to it
over HTTP and websockets. Where a recorded transcript exists, the simulator's messages are
compared with it message by message, after replacing what legitimately differs between
runs (prompt ids, timestamps, tracebacks). Slow nodes are made slow with the simulator's
delay hook and released through ``POST /sim/config``, so no test waits on a clock.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from comfyui_sim import SimSettings, start_simulator

CAPTURED = Path(__file__).resolve().parent / "fixtures" / "comfyui"
SAFETY_TIMEOUT_S = 15.0

# -- recorded material ----------------------------------------------------------------------


def capture_json(name: str) -> Any:
    return json.loads((CAPTURED / name).read_text())


def capture_messages(name: str) -> list[Any]:
    lines = (CAPTURED / "ws" / f"{name}.jsonl").read_text().splitlines()
    return [json.loads(line)["msg"] for line in lines if line.strip()]


def history_prompt(name: str) -> dict[str, Any]:
    """The prompt a recorded run used, as ComfyUI stored it in history."""
    (entry,) = capture_json(f"history/{name}.json").values()
    return copy.deepcopy(entry["prompt"][2])


def normalize(value: Any) -> Any:
    """Blank out what differs between any two runs: prompt ids, timestamps, tracebacks
    (they name source files), and the order of lists ComfyUI builds from sets."""
    if isinstance(value, dict):
        if value.get("binary") is True:
            return {"binary": True, "event_type": value["event_type"]}
        out = {}
        for key, item in value.items():
            if key == "prompt_id" and isinstance(item, str):
                out[key] = "<prompt_id>"
            elif key == "timestamp":
                assert isinstance(item, int) and item > 1_600_000_000_000, item
                out[key] = "<ms>"
            elif key == "traceback":
                assert isinstance(item, list) and all(isinstance(x, str) for x in item)
                out[key] = "<traceback>"
            elif key in ("executed", "current_outputs") and isinstance(item, list):
                out[key] = sorted(item)
            else:
                out[key] = normalize(item)
        return out
    if isinstance(value, list):
        return [normalize(item) for item in value]
    return value


def as_text(messages: list[Any]) -> list[str]:
    # Through JSON text so 1 and 1.0 stay different: ComfyUI sends both, on purpose.
    return [json.dumps(normalize(m)) for m in messages]


def png_of(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


# -- talking to a simulator -------------------------------------------------------------------


class Socket:
    """A websocket client that records what it receives; binary frames are kept as
    ``{"binary": True, "event_type": n, "payload": bytes}``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello

    async def next(self) -> Any:
        msg = await self.ws.receive(timeout=SAFETY_TIMEOUT_S)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return json.loads(msg.data)
        if msg.type == aiohttp.WSMsgType.BINARY:
            (event,) = struct.unpack(">I", msg.data[:4])
            return {"binary": True, "event_type": event, "payload": bytes(msg.data[4:])}
        raise AssertionError(f"socket ended ({msg.type}, close code {self.ws.close_code})")

    async def until(self, done: Callable[[Any], bool]) -> list[Any]:
        got = []
        async with asyncio.timeout(SAFETY_TIMEOUT_S):
            while True:
                got.append(await self.next())
                if done(got[-1]):
                    return got

    async def until_done(self, prompt_id: str) -> list[Any]:
        """Everything up to ``executing {node: null}`` for the prompt: history is ready."""
        return await self.until(
            lambda m: (
                m.get("type") == "executing"
                and m["data"]["node"] is None
                and m["data"].get("prompt_id") == prompt_id
            )
        )

    async def until_executing(self, node_id: str) -> list[Any]:
        return await self.until(lambda m: m.get("type") == "executing" and m["data"]["node"] == node_id)

    async def drain_to_close(self) -> list[Any]:
        """Read until the server closes the socket; returns what came before."""
        got = []
        async with asyncio.timeout(SAFETY_TIMEOUT_S):
            while True:
                msg = await self.ws.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSING,
                    aiohttp.WSMsgType.CLOSED,
                ):
                    return got
                got.append(msg.data)


@dataclass
class Sim:
    url: str
    settings: SimSettings
    runner: web.AppRunner
    http: aiohttp.ClientSession
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()

    async def connect(self, client_id: str | None = None) -> Socket:
        params = {"clientId": client_id} if client_id else {}
        ws = await self.http.ws_connect(self.url + "/ws", params=params)
        hello = json.loads((await ws.receive(timeout=SAFETY_TIMEOUT_S)).data)
        assert hello["type"] == "status"
        return Socket(ws, hello)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.read()

    async def submit(self, prompt: dict[str, Any], client_id: str | None, **extra: Any) -> str:
        body: dict[str, Any] = {"prompt": prompt, **extra}
        if client_id is not None:
            body["client_id"] = client_id
        status, answer = await self.request("POST", "/prompt", json=body)
        assert status == 200, answer
        assert answer["node_errors"] == {}
        return str(answer["prompt_id"])

    async def set_config(self, **config: Any) -> None:
        status, answer = await self.request("POST", "/sim/config", json=config)
        assert status == 200, answer

    async def history(self, prompt_id: str) -> dict[str, Any]:
        status, answer = await self.request("GET", f"/history/{prompt_id}")
        assert status == 200
        return dict(answer)

    async def log(self) -> list[dict[str, Any]]:
        status, answer = await self.request("GET", "/sim/log")
        assert status == 200
        return list(answer["prompts"])

    async def upload(self, data: bytes, name: str, **fields: str) -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("image", data, filename=name, content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        return await self.request("POST", "/upload/image", data=form)


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[Sim]:
    settings = SimSettings(data_dir=tmp_path / "comfyui")
    runner, url = await start_simulator(settings, port=0)
    async with aiohttp.ClientSession() as http:
        sim = Sim(url, settings, runner, http)
        try:
            yield sim
        finally:
            await sim.stop()


def empty_save(color: int = 0xFF0000, prefix: str = "sim_empty", size: int = 16) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def invert_chain(color: int = 0x102030) -> dict[str, Any]:
    """EmptyImage -> ImageInvert (2) -> ImageInvert (3) -> SaveImage (4)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "chain"}},
    }


async def run_recorded(sim: Sim, socket: Socket, name: str, prompt: dict[str, Any]) -> list[Any]:
    """Run a prompt and check its websocket messages against the recording ``name``."""
    prompt_id = await sim.submit(prompt, "probe-main")
    got = await socket.until_done(prompt_id)
    assert as_text(got) == as_text(capture_messages(name))
    return got


# -- the event stream ------------------------------------------------------------------------


async def test_empty_save_events_and_history_match_the_recording(comfy: Sim) -> None:
    socket = await comfy.connect("probe-main")
    assert socket.hello["data"] == {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "probe-main"}

    prompt = capture_json("workflows/empty_save.json")
    status, answer = await comfy.request(
        "POST", "/prompt", json={"prompt": prompt, "client_id": "probe-main"}
    )
    assert status == 200
    assert answer == {"prompt_id": answer["prompt_id"], "number": 0, "node_errors": {}}
    got = await socket.until_done(answer["prompt_id"])
    assert as_text(got) == as_text(capture_messages("empty_save"))

    # History is complete by the time executing {node: null} arrives.
    history = await comfy.history(answer["prompt_id"])
    (recorded,) = capture_json("history/empty_save.json").values()
    entry = history[answer["prompt_id"]]
    assert entry["prompt"][1] == answer["prompt_id"]
    entry["prompt"][1] = recorded["prompt"][1]
    assert normalize(entry) == normalize(recorded)

    # The file is a real 64x64 red PNG carrying the prompt, as ComfyUI writes it.
    status, body = await comfy.request(
        "GET", "/view", params={"filename": "probe_empty_00001_.png", "subfolder": "", "type": "output"}
    )
    assert status == 200
    image = png_of(body)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((10, 10)) == (255, 0, 0)
    assert json.loads(image.info["prompt"]) == prompt


async def test_load_invert_scale_save_computes_real_pixels(comfy: Sim) -> None:
    source_bytes = (CAPTURED / "inputs" / "probe_input.png").read_bytes()
    status, answer = await comfy.upload(source_bytes, "probe_input.png", overwrite="true")
    assert (status, answer) == (200, {"name": "probe_input.png", "subfolder": "", "type": "input"})
    socket = await comfy.connect("probe-main")

    got = await run_recorded(
        comfy, socket, "load_invert_scale_save", history_prompt("load_invert_scale_save")
    )
    assert got[-5]["data"]["output"]["images"] == [
        {"filename": "probe_invert_00001_.png", "subfolder": "", "type": "output"}
    ]
    source = np.asarray(png_of(source_bytes).convert("RGB"), dtype=np.int16)
    _, body = await comfy.request("GET", "/view", params={"filename": "probe_invert_00001_.png"})
    scaled = np.asarray(png_of(body), dtype=np.int16)
    assert scaled.shape == (128, 256, 3)
    # Blue is 128 everywhere in the source: inverted it is 127 (or 126 after truncation).
    assert set(np.unique(scaled[..., 2]).tolist()) <= {126, 127}
    # Red grows left to right in the source, so inverted red can only shrink.
    assert (np.diff(scaled[..., 0], axis=1) <= 0).all()
    assert scaled[:, 0, 0].mean() > 240 and scaled[:, -1, 0].mean() < 15

    # An exact oracle: nearest-exact at twice the size repeats every inverted pixel 2x2.
    prompt = history_prompt("load_invert_scale_save")
    prompt["3"]["inputs"].update(upscale_method="nearest-exact", width=192, height=128)
    prompt["4"]["inputs"]["filename_prefix"] = "exact"
    prompt_id = await comfy.submit(prompt, "probe-main")
    await socket.until_done(prompt_id)
    _, body = await comfy.request("GET", "/view", params={"filename": "exact_00001_.png"})
    exact = np.asarray(png_of(body), dtype=np.int16)
    expected = np.repeat(np.repeat(255 - source, 2, axis=0), 2, axis=1)
    assert exact.shape == expected.shape
    assert np.abs(exact - expected).max() <= 1
    # LoadImage and ImageInvert were cached from the previous prompt.
    assert (await comfy.log())[-1] == {
        "prompt_id": prompt_id,
        "executed": ["3", "4"],
        "cached": ["1", "2"],
        "success": True,
    }

    # A subfolder on both ends: "sub/name.png" in, "folder/prefix" out.
    status, answer = await comfy.upload(source_bytes, "probe_input.png", subfolder="sub")
    assert (status, answer["subfolder"]) == (200, "sub")
    got = await run_recorded(comfy, socket, "load_subfolder", history_prompt("load_subfolder"))
    status, body = await comfy.request(
        "GET", "/view", params={"filename": "invert_00001_.png", "subfolder": "probe_sub"}
    )
    assert status == 200 and png_of(body).size == (256, 128)


async def test_cache_reuses_unchanged_nodes_whatever_their_ids(comfy: Sim) -> None:
    socket = await comfy.connect("probe-main")
    await run_recorded(comfy, socket, "slow_run1", history_prompt("slow_run1"))
    assert (await comfy.log())[-1]["executed"] == ["1", "2", "3", "4", "5", "6"]

    # Identical rerun: everything cached, nothing runs, the output node replays its file.
    await run_recorded(comfy, socket, "slow_run2_identical", history_prompt("slow_run2_identical"))
    assert (await comfy.log())[-1]["executed"] == []
    assert (await comfy.log())[-1]["cached"] == ["1", "2", "3", "4", "5", "6"]

    # Last node changed: only it runs.
    changed = history_prompt("slow_run3_last_changed")
    await run_recorded(comfy, socket, "slow_run3_last_changed", changed)
    assert (await comfy.log())[-1]["executed"] == ["6"]

    # Same graph under other ids: still all cached (ids take no part in the cache key).
    renamed = {
        f"n{node_id}": {
            "class_type": node["class_type"],
            "inputs": {
                k: [f"n{v[0]}", v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()
            },
        }
        for node_id, node in changed.items()
    }
    prompt_id = await comfy.submit(renamed, "probe-main")
    got = await socket.until_done(prompt_id)
    cached = next(m for m in got if m["type"] == "execution_cached")
    assert cached["data"]["nodes"] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert (await comfy.log())[-1]["executed"] == []

    # The cache keeps the last prompt only: A, B, A recomputes A.
    await socket.until_done(await comfy.submit(empty_save(), "probe-main"))
    await socket.until_done(await comfy.submit(changed, "probe-main"))
    assert (await comfy.log())[-1]["executed"] == ["1", "2", "3", "4", "5", "6"]


async def test_only_nodes_needed_by_outputs_run(comfy: Sim) -> None:
    prompt = empty_save()
    prompt["9"] = {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}
    socket = await comfy.connect("c")
    prompt_id = await comfy.submit(prompt, "c")
    await socket.until_done(prompt_id)
    assert (await comfy.log())[-1]["executed"] == ["1", "2"]


# -- validation ------------------------------------------------------------------------------


def _without_tracebacks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<traceback>" if k == "traceback" else _without_tracebacks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_tracebacks(v) for v in value]
    return value


async def test_every_recorded_validation_answer_is_reproduced(comfy: Sim) -> None:
    cases = capture_json("errors_post_prompt.json")
    assert len(cases) >= 20
    for name, case in cases.items():
        if "request_prompt" in case:
            kwargs: dict[str, Any] = {"json": {"prompt": case["request_prompt"], "client_id": "v"}}
        else:
            kwargs = {"data": case["request_body"], "headers": {"Content-Type": "application/json"}}
        status, body = await comfy.request("POST", "/prompt", **kwargs)
        assert status == case["http_status"], name
        expected = case["body"]
        if isinstance(expected, str):
            assert body.decode() == expected, name
        elif status == 200:
            # Accepted, possibly with the outputs that failed listed beside it.
            assert set(body) == {"prompt_id", "number", "node_errors"}, name
            assert _without_tracebacks(body["node_errors"]) == _without_tracebacks(expected["node_errors"]), (
                name
            )
        else:
            assert _without_tracebacks(body) == _without_tracebacks(expected), name


async def test_validation_converts_values_in_the_queued_prompt(comfy: Sim) -> None:
    prompt = empty_save()
    prompt["1"]["inputs"]["width"] = "16"
    prompt["2"]["inputs"]["unknown_input"] = "ignored"
    socket = await comfy.connect("c")
    prompt_id = await comfy.submit(prompt, "c")
    await socket.until_done(prompt_id)
    stored = (await comfy.history(prompt_id))[prompt_id]["prompt"][2]
    assert stored["1"]["inputs"]["width"] == 16
    assert stored["2"]["inputs"]["unknown_input"] == "ignored"


# -- failures, interrupts, queue ------------------------------------------------------------


async def test_execution_error_has_comfyuis_shape(comfy: Sim) -> None:
    socket = await comfy.connect("probe-main")
    # A genuine failure: RegexReplace with a broken pattern raises re.error.
    got = await run_recorded(comfy, socket, "runtime_error_regex", history_prompt("runtime_error_regex"))
    error = next(m for m in got if m["type"] == "execution_error")["data"]
    assert error["exception_type"] == "re.error"
    assert error["exception_message"] == "missing ), unterminated subpattern at position 0\n"

    # An injected one, through the test hook.
    await comfy.set_config(fail_nodes={"SaveImage": "disk on fire"})
    prompt_id = await comfy.submit(empty_save(), "probe-main")
    got = await socket.until_done(prompt_id)
    assert [m["type"] for m in got][-3:] == ["execution_error", "status", "executing"]
    assert "execution_success" not in [m["type"] for m in got]
    data = got[-3]["data"]
    recorded = next(m for m in capture_messages("runtime_error_regex") if m["type"] == "execution_error")
    assert list(data) == list(recorded["data"])
    assert data["node_id"] == "2" and data["node_type"] == "SaveImage"
    assert data["exception_message"] == "disk on fire\n"
    assert data["exception_type"] == "RuntimeError"
    assert data["executed"] == ["1"]
    assert sorted(data["current_outputs"]) == ["1", "2"]
    assert data["current_inputs"]["filename_prefix"] == ["sim_empty"]
    assert set(data["current_inputs"]) == {"images", "filename_prefix", "prompt", "extra_pnginfo"}
    entry = (await comfy.history(prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_error"
    assert entry["outputs"] == {}
    assert (await comfy.log())[-1]["executed"] == ["1"]


async def test_interrupt_lands_when_the_next_node_starts(comfy: Sim) -> None:
    socket = await comfy.connect("probe-err")
    await comfy.set_config(node_delays_s={"4": 600})
    prompt_id = await comfy.submit(history_prompt("interrupt_global"), "probe-err")
    got = await socket.until_executing("4")
    status, body = await comfy.request("POST", "/interrupt")
    assert (status, body) == (200, b"")
    # The slow node is not cut short: it finishes, and the next node is where it stops.
    await comfy.set_config(node_delays_s={})
    got += await socket.until_done(prompt_id)
    assert as_text(got) == as_text(capture_messages("interrupt_global"))
    entry = (await comfy.history(prompt_id))[prompt_id]
    (recorded,) = capture_json("history/interrupt_global.json").values()
    assert normalize(entry["status"]) == normalize(recorded["status"])
    assert (entry["outputs"], entry["meta"]) == ({}, {})
    assert (await comfy.log())[-1]["executed"] == ["1", "2", "3", "4"]


async def test_interrupt_for_another_prompt_is_ignored(comfy: Sim) -> None:
    socket = await comfy.connect("c")
    await comfy.set_config(node_delays_s={"2": 600})
    prompt_id = await comfy.submit(invert_chain(), "c")
    await socket.until_executing("2")
    status, _ = await comfy.request("POST", "/interrupt", json={"prompt_id": "not-this-one"})
    assert status == 200
    await comfy.set_config(node_delays_s={})
    got = await socket.until_done(prompt_id)
    assert "execution_success" in [m["type"] for m in got]

    # Naming the running prompt does interrupt it.
    await comfy.set_config(node_delays_s={"2": 600})
    prompt_id = await comfy.submit(invert_chain(color=0x405060), "c")
    await socket.until_executing("2")
    await comfy.request("POST", "/interrupt", json={"prompt_id": prompt_id})
    await comfy.set_config(node_delays_s={})
    got = await socket.until_done(prompt_id)
    interrupted = next(m for m in got if m["type"] == "execution_interrupted")["data"]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("3", "ImageInvert")
    assert interrupted["executed"] == ["1", "2"]

    # An interrupt while idle does not kill the next prompt.
    await comfy.request("POST", "/interrupt")
    got = await socket.until_done(await comfy.submit(empty_save(), "c"))
    assert "execution_success" in [m["type"] for m in got]


async def test_queue_delete_and_clear_touch_pending_prompts_only(comfy: Sim) -> None:
    socket = await comfy.connect("q")
    await comfy.set_config(node_delays_s={"ImageInvert": 600})
    running = await comfy.submit(invert_chain(), "q")
    await socket.until_executing("2")
    pending = [await comfy.submit(empty_save(color=c), "q") for c in (1, 2, 3)]

    _, queue = await comfy.request("GET", "/queue")
    assert [item[1] for item in queue["queue_running"]] == [running]
    assert [item[1] for item in queue["queue_pending"]] == pending
    first = queue["queue_pending"][0]
    assert len(first) == 5 and first[3] == {"client_id": "q"} and first[4] == ["2"]
    assert [item[0] for item in queue["queue_pending"]] == [1, 2, 3]

    status, body = await comfy.request("POST", "/queue", json={"delete": [pending[0], running]})
    assert (status, body) == (200, b"")
    _, queue = await comfy.request("GET", "/queue")
    assert [item[1] for item in queue["queue_pending"]] == pending[1:]
    assert [item[1] for item in queue["queue_running"]] == [running]
    await comfy.request("POST", "/queue", json={"clear": True})
    _, queue = await comfy.request("GET", "/queue")
    assert queue["queue_pending"] == [] and len(queue["queue_running"]) == 1

    await comfy.set_config(node_delays_s={})
    got = await socket.until_done(running)
    remaining = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in got if m["type"] == "status"]
    # 2, 3, 4 while queueing; 3 after the delete; 1 after the clear; 0 at the end.
    assert remaining[-3:] == [3, 1, 0]
    assert [entry["prompt_id"] for entry in await comfy.log()] == [running]
    for prompt_id in pending:
        assert await comfy.history(prompt_id) == {}
    _, queue = await comfy.request("GET", "/queue")
    assert queue == {"queue_running": [], "queue_pending": []}


async def test_history_is_empty_for_unknown_and_unfinished_prompts(comfy: Sim) -> None:
    assert await comfy.history("no-such-prompt") == {}
    assert (await comfy.request("GET", "/api/history/no-such-prompt")) == (200, {})
    socket = await comfy.connect("h")
    await comfy.set_config(node_delays_s={"2": 600})
    prompt_id = await comfy.submit(invert_chain(), "h")
    await socket.until_executing("2")
    assert await comfy.history(prompt_id) == {}
    await comfy.set_config(node_delays_s={})
    await socket.until_done(prompt_id)
    assert list(await comfy.history(prompt_id)) == [prompt_id]

    status, body = await comfy.request("POST", "/history", json={"delete": [prompt_id]})
    assert (status, body) == (200, b"")
    assert await comfy.history(prompt_id) == {}


async def test_shutdown_is_prompt_with_a_node_mid_delay(comfy: Sim) -> None:
    socket = await comfy.connect("s")
    await comfy.set_config(node_delays_s={"ImageInvert": 600})
    await comfy.submit(invert_chain(), "s")
    await socket.until_executing("2")
    reader = asyncio.create_task(socket.drain_to_close())
    async with asyncio.timeout(5):
        await comfy.stop()
    await reader
    assert socket.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


# -- websockets: who gets what ---------------------------------------------------------------


async def test_events_only_reach_the_prompts_client(comfy: Sim) -> None:
    owner = await comfy.connect("owner")
    observer = await comfy.connect("observer")
    prompt_id = await comfy.submit(empty_save(), "owner")
    owned = await owner.until_done(prompt_id)
    assert {"execution_start", "executing", "executed", "execution_success"} <= {m["type"] for m in owned}
    seen = await observer.until(
        lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
    )
    assert [m["type"] for m in seen] == ["status", "status", "status"]

    # Without a client id nobody gets the prompt's events, but progress_state is broadcast.
    status, answer = await comfy.request("POST", "/prompt", json={"prompt": empty_save(color=7)})
    assert status == 200
    seen = await observer.until(
        lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
    )
    assert [m["type"] for m in seen] == ["status", "status"] + ["progress_state"] * 4 + ["status"]
    assert all(m["data"]["prompt_id"] == answer["prompt_id"] for m in seen if m["type"] != "status")
    assert list(await comfy.history(answer["prompt_id"])) == [answer["prompt_id"]]


async def test_reconnecting_with_the_same_client_id_orphans_the_new_socket(comfy: Sim) -> None:
    old = await comfy.connect("dup")
    new = await comfy.connect("dup")
    assert new.hello["data"]["sid"] == "dup"
    observer = await comfy.connect("observer")
    await old.ws.close()
    # A round trip to the server, so it has finished with the closed socket.
    await comfy.request("GET", "/queue")

    prompt_id = await comfy.submit(empty_save(), "dup")
    await observer.until(
        lambda m: m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0
    )
    # The prompt completed all the same: only polling history can tell.
    entry = (await comfy.history(prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "success"

    reader = asyncio.create_task(new.drain_to_close())
    await comfy.stop()
    # Not one event, not even the status broadcasts: the socket was dropped from the map
    # when the old one closed, and only shutdown reaches it.
    assert await reader == []
    assert new.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY


async def test_socket_without_client_id_gets_a_generated_sid(comfy: Sim) -> None:
    socket = await comfy.connect()
    sid = socket.hello["data"]["sid"]
    assert isinstance(sid, str) and len(sid) == 32
    prompt_id = await comfy.submit(empty_save(), sid)
    got = await socket.until_done(prompt_id)
    assert got[-3]["type"] == "execution_success"


async def test_save_image_websocket_sends_binary_frames(comfy: Sim) -> None:
    recorded = capture_json("results_observer_binary.json")
    prompt = capture_json("workflows/save_image_websocket.json")

    plain = await comfy.connect("plain")
    got = await plain.until_done(await comfy.submit(prompt, "plain"))
    assert [_kind(m) for m in got] == [
        "BINARY(event_type=1)" if k.startswith("BINARY") else k
        for k in recorded["save_image_websocket_run1_types"]
    ]
    frames = [m["payload"] for m in got if m.get("binary")]
    assert len(frames) == 2
    for frame in frames:
        assert frame[:4] == struct.pack(">I", 2)  # PNG
        image = png_of(frame[4:])
        assert image.size == (32, 16) and image.getpixel((0, 0)) == (0, 255, 0)
    assert await comfy.history(got[-1]["data"]["prompt_id"]) != {}

    # A client that negotiates preview metadata gets type-4 frames, ahead of "progress".
    fancy = await comfy.connect("fancy")
    await fancy.ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    reply = await fancy.next()
    features = capture_json("results_main.json")["feature_flags_client_transcript"][1]
    assert reply == features
    prompt_id = await comfy.submit(prompt, "fancy")
    got = await fancy.until_done(prompt_id)
    assert [_kind(m) for m in got] == [
        "BINARY(event_type=4)" if k.startswith("BINARY") else k
        for k in recorded["save_image_websocket_with_preview_metadata_flag_types"]
    ]
    payload = next(m["payload"] for m in got if m.get("binary"))
    (length,) = struct.unpack(">I", payload[:4])
    metadata = json.loads(payload[4 : 4 + length])
    assert metadata == {
        "node_id": "2",
        "prompt_id": prompt_id,
        "display_node_id": "2",
        "parent_node_id": None,
        "real_node_id": "2",
        "image_type": "image/png",
    }
    assert png_of(payload[4 + length :]).size == (32, 16)


def _kind(message: Any) -> str:
    if message.get("binary"):
        return f"BINARY(event_type={message['event_type']})"
    return str(message["type"])


async def test_preview_any_and_primitives_produce_text(comfy: Sim) -> None:
    prompt = {
        "a": {"class_type": "PrimitiveString", "inputs": {"value": "hello"}},
        "b": {"class_type": "PrimitiveString", "inputs": {"value": "World"}},
        "c": {
            "class_type": "StringConcatenate",
            "inputs": {"string_a": ["a", 0], "string_b": ["b", 0], "delimiter": ", "},
        },
        "d": {"class_type": "CaseConverter", "inputs": {"string": ["c", 0], "mode": "UPPERCASE"}},
        "e": {"class_type": "PreviewAny", "inputs": {"source": ["d", 0]}},
        "f": {"class_type": "PrimitiveFloat", "inputs": {"value": 1.5}},
        "g": {"class_type": "PreviewAny", "inputs": {"source": ["f", 0]}},
    }
    socket = await comfy.connect("t")
    prompt_id = await comfy.submit(prompt, "t")
    await socket.until_done(prompt_id)
    outputs = (await comfy.history(prompt_id))[prompt_id]["outputs"]
    assert outputs == {"e": {"text": ["HELLO, WORLD"]}, "g": {"text": ["1.5"]}}


# -- files -----------------------------------------------------------------------------------


async def test_view_refuses_what_comfyui_refuses(comfy: Sim) -> None:
    socket = await comfy.connect("v")
    await socket.until_done(await comfy.submit(empty_save(prefix="viewme"), "v"))
    name = "viewme_00001_.png"
    cases = [
        ({"filename": name, "subfolder": "", "type": "output"}, 200),
        ({"filename": name}, 200),  # type defaults to output
        ({"filename": f"{name} [output]", "type": "input"}, 200),  # the name picks the folder
        ({"filename": "nope.png", "subfolder": "", "type": "output"}, 404),
        ({"filename": "../x.png", "type": "output"}, 400),
        ({"filename": name, "type": "bogus"}, 400),
        ({"filename": name, "subfolder": "..", "type": "output"}, 403),
        ({}, 404),
    ]
    for params, expected in cases:
        status, _ = await comfy.request("GET", "/view", params=params)
        assert status == expected, params
    status, body = await comfy.request("GET", "/api/view", params={"filename": name})
    assert status == 200 and png_of(body).size == (16, 16)
    async with comfy.http.get(comfy.url + "/view", params={"filename": name, "preview": "webp;50"}) as resp:
        assert resp.status == 200 and resp.content_type == "image/webp"
        assert resp.headers["Content-Disposition"] == f'filename="{name}"'


async def test_upload_names_follow_comfyui(comfy: Sim) -> None:
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    assert await comfy.upload(red, "pic.png") == (200, {"name": "pic.png", "subfolder": "", "type": "input"})
    # Same bytes again: the existing file is reused.
    assert (await comfy.upload(red, "pic.png"))[1]["name"] == "pic.png"
    # Other bytes under the same name: a new name, and again for the next ones.
    assert (await comfy.upload(blue, "pic.png"))[1]["name"] == "pic (1).png"
    assert (await comfy.upload(blue, "pic.png"))[1]["name"] == "pic (1).png"
    assert (await comfy.upload(_png((1, 2, 3)), "pic.png"))[1]["name"] == "pic (2).png"
    # overwrite=true replaces in place.
    assert (await comfy.upload(blue, "pic.png", overwrite="true"))[1]["name"] == "pic.png"
    assert await comfy.upload(red, "pic.png", subfolder="sub") == (
        200,
        {"name": "pic.png", "subfolder": "sub", "type": "input"},
    )
    assert (await comfy.upload(red, "pic.png", subfolder="../.."))[0] == 400
    assert (await comfy.upload(red, "pic.png", type="temp"))[1]["type"] == "temp"
    status, _ = await comfy.request("POST", "/upload/image", data={"subfolder": "x"})
    assert status == 400

    _, info = await comfy.request("GET", "/object_info/LoadImage")
    options = info["LoadImage"]["input"]["required"]["image"][0]
    assert options == ["pic (1).png", "pic (2).png", "pic.png", "sub/pic.png"]

    # The overwritten file is what LoadImage now reads (its content is part of the cache key).
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pic.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}},
    }
    socket = await comfy.connect("u")
    await socket.until_done(await comfy.submit(prompt, "u"))
    _, body = await comfy.request("GET", "/view", params={"filename": "up_00001_.png"})
    assert png_of(body).getpixel((0, 0)) == (0, 0, 255)
    await comfy.upload(red, "pic.png", overwrite="true")
    await socket.until_done(await comfy.submit(prompt, "u"))
    assert (await comfy.log())[-1]["executed"] == ["1", "2"]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


# -- node and system information -------------------------------------------------------------


async def test_object_info_matches_comfyuis_for_every_simulated_node(comfy: Sim) -> None:
    recorded = capture_json("object_info_used_nodes.json")
    status, info = await comfy.request("GET", "/object_info")
    assert status == 200
    compared = 0
    for name, entry in info.items():
        if name not in recorded:
            continue
        expected = copy.deepcopy(recorded[name])
        if name == "LoadImage":
            # The options are the files in this simulator's input folder: none yet.
            expected["input"]["required"]["image"][0] = []
        assert json.dumps(entry) == json.dumps(expected), name
        compared += 1
    assert compared >= 15
    assert await comfy.request("GET", "/object_info/NoSuchNode") == (200, {})
    status, one = await comfy.request("GET", "/api/object_info/EmptyImage")
    assert status == 200 and one == {"EmptyImage": info["EmptyImage"]}


async def test_system_stats_and_small_endpoints(comfy: Sim) -> None:
    recorded = capture_json("system_stats.json")
    misc = capture_json("misc_endpoints.json")
    status, stats = await comfy.request("GET", "/system_stats")
    assert status == 200
    assert list(stats) == list(recorded)
    assert list(stats["system"]) == list(recorded["system"])
    assert [list(d) for d in stats["devices"]] == [list(d) for d in recorded["devices"]]
    assert stats["devices"][0]["type"] == "cpu"
    assert stats["system"]["comfyui_version"] == "0.3.64"
    for path in ("/embeddings", "/models", "/models/checkpoints", "/features", "/prompt", "/queue"):
        assert await comfy.request("GET", path) == (200, misc[path]["body"]), path
    assert await comfy.request("GET", "/extensions") == (200, [])
    assert (await comfy.request("GET", "/models/no_such_folder"))[0] == 404


async def test_sim_config_is_validated_and_reported(comfy: Sim) -> None:
    for bad in ({"node_delays_s": {"x": -1}}, {"node_delays_s": []}, {"fail_nodes": {"x": 3}}, [1]):
        status, _ = await comfy.request("POST", "/sim/config", json=bad)
        assert status == 400, bad
    status, _ = await comfy.request("POST", "/sim/config", data="nope")
    assert status == 400
    status, config = await comfy.request(
        "POST", "/sim/config", json={"node_delays_s": {"2": 0.5}, "fail_nodes": {"X": "m"}}
    )
    assert status == 200
    assert config == {"node_delays_s": {"2": 0.5}, "fail_nodes": {"X": "m"}, "prompt_accept_delay_s": 0.0}
    assert comfy.settings.node_delays_s == {"2": 0.5}
    assert await comfy.request("GET", "/sim/config") == (200, config)
