"""The agent end to end: a fake control plane (below, on 127.0.0.1) and the ComfyUI simulator,
over real sockets. Only ComfyUI failure responses are mocked (aioresponses)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse, WSMsgType, web
from aioresponses import aioresponses
from PIL import Image

from protocol.messages import (
    Cancel,
    CapacityUpdate,
    HeldJob,
    Hello,
    Interrupt,
    Job,
    JobAck,
    JobDone,
    JobFile,
    JobUpdate,
    Message,
    Proceed,
    Ready,
    StatsRequest,
    Welcome,
    dump_message,
    parse_message,
)
from runner_agent.__main__ import EXIT_GIVE_UP, EXIT_SETTINGS, main
from runner_agent.agent import Agent
from runner_agent.config import AgentSettings
from runner_agent.connection import GiveUp

pytestmark = pytest.mark.timeout(30)

TOKEN = "cf_runner_test"
WAIT_S = 10.0


# -- a fake control plane -------------------------------------------------------------------------


@dataclass
class Received:
    connection: int
    message: Message


@dataclass
class StoredOutput:
    workflow_id: str
    params: dict[str, str]
    content_type: str
    sha256: str
    body: bytes


@dataclass
class FakeControlPlane:
    """The agent endpoints of the control plane, recording what the agent sends."""

    token: str = TOKEN
    heartbeat_s: float = 30.0
    files: dict[str, bytes] = field(default_factory=dict)
    outputs: list[StoredOutput] = field(default_factory=list)
    output_status: int | None = None  # force an answer to output uploads (409 ...)
    drop_jobs: list[HeldJob] = field(default_factory=list)
    connections: int = 0
    close_codes: list[int | None] = field(default_factory=list)
    # Close codes to hang up with right after the welcome, one per connection, in order.
    hang_ups: list[int] = field(default_factory=list)
    # As the real control plane: the go-ahead after "uploaded", an ack for each last report.
    auto_proceed: bool = True
    acks: bool = True

    def __post_init__(self) -> None:
        self.received: asyncio.Queue[Received] = asyncio.Queue()
        self.history: list[Received] = []
        self.ws: web.WebSocketResponse | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/v1/agent/connect", self._connect)
        app.router.add_get("/v1/agent/jobs/{workflow_id}/files/{sha256}", self._file)
        app.router.add_put("/v1/agent/jobs/{workflow_id}/outputs", self._output)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _connect(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        number = self.connections
        if not self._authorised(request):
            await ws.close(code=4001, message=b"bad token")
            return ws
        self.ws = ws
        async for frame in ws:
            if frame.type != WSMsgType.TEXT:
                continue
            message = parse_message(frame.data)
            if message is None:
                continue
            record = Received(number, message)
            self.history.append(record)
            self.received.put_nowait(record)
            if isinstance(message, JobUpdate) and message.status == "uploaded" and self.auto_proceed:
                await ws.send_str(
                    dump_message(Proceed(workflow_id=message.workflow_id, attempt=message.attempt))
                )
            if self.acks and _is_last_report(message):
                assert isinstance(message, JobUpdate | JobDone)
                await ws.send_str(
                    dump_message(JobAck(workflow_id=message.workflow_id, attempt=message.attempt))
                )
            if isinstance(message, Hello):
                welcome = Welcome(
                    runner_id="runner-1",
                    name="test runner",
                    tags=[],
                    status="active",
                    heartbeat_s=self.heartbeat_s,
                    drop_jobs=self.drop_jobs,
                )
                await ws.send_str(dump_message(welcome))
                if self.hang_ups:
                    await ws.close(code=self.hang_ups.pop(0))
        self.close_codes.append(ws.close_code)
        return ws

    async def _file(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"status": 401, "message": "no"}, status=401)
        body = self.files.get(request.match_info["sha256"])
        if body is None:
            return web.json_response({"status": 404, "message": "no such file"}, status=404)
        return web.Response(body=body, content_type="application/octet-stream")

    async def _output(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"status": 401, "message": "no"}, status=401)
        if self.output_status is not None:
            return web.json_response(
                {"status": self.output_status, "message": "forced"}, status=self.output_status
            )
        digest = hashlib.sha256()
        body = io.BytesIO()
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            body.write(chunk)
        if digest.hexdigest() != request.headers.get("X-Content-SHA256"):
            return web.json_response({"status": 400, "message": "sha256 mismatch"}, status=400)
        self.outputs.append(
            StoredOutput(
                workflow_id=request.match_info["workflow_id"],
                params=dict(request.query),
                content_type=request.headers.get("Content-Type", ""),
                sha256=digest.hexdigest(),
                body=body.getvalue(),
            )
        )
        return web.json_response(
            {"output_id": uuid.uuid4().hex, "size_bytes": body.tell(), "sha256": digest.hexdigest()},
            status=201,
        )

    async def send(self, message: Job | Cancel | Interrupt | StatsRequest | Proceed | JobAck) -> None:
        assert self.ws is not None
        await self.ws.send_str(dump_message(message))

    async def next(self, match: Callable[[Message], bool] = lambda _: True) -> Received:
        """The next message the agent sends that ``match``es; others are skipped."""
        while True:
            record = await asyncio.wait_for(self.received.get(), WAIT_S)
            if match(record.message):
                return record

    async def until_job_ends(self, workflow_id: str) -> list[Message]:
        """Every message about ``workflow_id`` until its JobDone or terminal update."""
        seen: list[Message] = []
        while True:
            message = (await self.next(lambda m: _about(m, workflow_id))).message
            seen.append(message)
            if _is_last_report(message):
                return seen


def _is_last_report(message: Message) -> bool:
    return isinstance(message, JobDone) or (
        isinstance(message, JobUpdate) and message.status in ("failed", "invalid", "cancelled", "completed")
    )


def _about(message: Message, workflow_id: str) -> bool:
    return isinstance(message, JobUpdate | JobDone) and message.workflow_id == workflow_id


def _is_update(status: str, workflow_id: str | None = None) -> Callable[[Message], bool]:
    def match(message: Message) -> bool:
        return (
            isinstance(message, JobUpdate)
            and message.status == status
            and (workflow_id is None or message.workflow_id == workflow_id)
        )

    return match


# -- a TCP proxy whose websocket connections can be cut ---------------------------------------------


class CuttableProxy:
    """Forwards to ComfyUI; :meth:`cut_websockets` kills every connection that carried a
    websocket upgrade, as a network failure would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._ws_links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._server: asyncio.Server | None = None
        self.websocket_opened = asyncio.Event()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut_websockets()

    def cut_websockets(self) -> None:
        for client, upstream in self._ws_links:
            client.transport.abort()
            upstream.transport.abort()
        self._ws_links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inspect: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    if inspect and b"GET /ws?" in data:
                        self._ws_links.append((writer, up_writer))
                        self.websocket_opened.set()
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


# -- aioresponses on aiohttp 3.14 ------------------------------------------------------------------


class _RequestAlreadySent:
    output_size = 0


class MockedResponse(ClientResponse):
    """aioresponses 0.7.9 builds responses without the ``stream_writer`` that aiohttp 3.14's
    ClientResponse requires; supply one that says the request was sent."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _RequestAlreadySent())
        super().__init__(method, url, **kwargs)


# -- fixtures -----------------------------------------------------------------------------------------


@dataclass
class Sim:
    url: str
    settings: Any
    port: int


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Sim]:
    from comfyui_sim import SimSettings, start_simulator

    settings = SimSettings(data_dir=tmp_path / "comfyui")
    runner, url = await start_simulator(settings, port=0)
    try:
        yield Sim(url.rstrip("/"), settings, int(url.rstrip("/").rsplit(":", 1)[1]))
    finally:
        await runner.cleanup()


@pytest.fixture
async def cp() -> AsyncIterator[FakeControlPlane]:
    plane = FakeControlPlane()
    await plane.start()
    try:
        yield plane
    finally:
        await plane.close()


def make_settings(tmp_path: Path, cp: FakeControlPlane, comfyui_url: str, **changes: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "server_url": cp.url,
        "token": TOKEN,
        "comfyui_url": comfyui_url,
        "data_dir": tmp_path / "agent",
        "history_poll_slow_s": 2.0,
        "history_poll_fast_s": 0.05,
        "shutdown_grace_s": 5.0,
        "comfyui_down_grace_s": 5.0,
        "welcome_timeout_s": 5.0,
    }
    values.update(changes)
    return AgentSettings(**values).validate()


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        await agent.stop()
        await asyncio.wait_for(task, WAIT_S)


async def connect_and_ready(cp: FakeControlPlane) -> Hello:
    hello = (await cp.next(lambda m: isinstance(m, Hello))).message
    await cp.next(lambda m: isinstance(m, Ready))
    assert isinstance(hello, Hello)
    return hello


def png_bytes() -> bytes:
    image = Image.new("RGB", (4, 2))
    image.putdata([(0, 0, 0), (255, 255, 255), (10, 20, 30), (200, 100, 50)] * 2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def invert_job(cp: FakeControlPlane, workflow_id: str, *, attempt: int = 1) -> Job:
    """LoadImage($file) -> ImageInvert -> SaveImage, its input served by the fake plane."""
    data = png_bytes()
    sha = hashlib.sha256(data).hexdigest()
    cp.files[sha] = data
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "$file(photo)"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "$text(prefix, inverted)"},
        },
    }
    return Job(
        workflow_id=workflow_id,
        attempt=attempt,
        workflow_json=workflow,
        params={"prefix": f"job_{workflow_id[:8]}"},
        files=[
            JobFile(
                name="photo",
                filename="../cat photo.png",
                url=f"/v1/agent/jobs/{workflow_id}/files/{sha}",
                sha256=sha,
                size_bytes=len(data),
            ),
        ],
    )


def empty_image_job(workflow_id: str, width: str = "8") -> Job:
    workflow = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": "$text(width)", "height": 8, "batch_size": 1, "color": 0},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "e"}},
    }
    return Job(workflow_id=workflow_id, attempt=1, workflow_json=workflow, params={"width": width})


def statuses(messages: list[Message]) -> list[str]:
    return [m.status for m in messages if isinstance(m, JobUpdate) and m.status]


# -- tests --------------------------------------------------------------------------------------------


async def test_job_end_to_end_inverts_the_image(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        hello = await connect_and_ready(cp)
        assert hello.comfyui.version and "LoadImage" in hello.comfyui.node_classes
        assert hello.jobs == []
        workflow_id = str(uuid.uuid4())
        await cp.send(invert_job(cp, workflow_id))
        messages = await cp.until_job_ends(workflow_id)
        ready = await cp.next(lambda m: isinstance(m, Ready))
        assert isinstance(ready.message, Ready) and ready.message.free_slots == 1

    assert statuses(messages) == ["uploaded", "queued", "running"]
    assert all(m.attempt == 1 for m in messages if isinstance(m, JobUpdate | JobDone))
    uploaded, queued = (
        m for m in messages if isinstance(m, JobUpdate) and m.status in ("uploaded", "queued")
    )
    assert isinstance(uploaded, JobUpdate) and uploaded.resolved_params is not None
    comfy_name = uploaded.resolved_params["files"]["photo"]
    assert comfy_name == f"comfyfleet/{workflow_id}/cat_photo.png"
    assert isinstance(queued, JobUpdate) and queued.prompt_id and queued.queue_number is not None

    events = [
        (m.node.event, m.node.node_id, m.node.class_type)
        for m in messages
        if isinstance(m, JobUpdate) and m.node
    ]
    assert [e for e in events if e[0] == "executing"] == [
        ("executing", "1", "LoadImage"),
        ("executing", "2", "ImageInvert"),
        ("executing", "3", "SaveImage"),
    ]
    assert ("executed", "3", "SaveImage") in events
    progress = [m.progress for m in messages if isinstance(m, JobUpdate) and m.progress is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0

    done = messages[-1]
    assert isinstance(done, JobDone) and len(done.outputs) == 1
    ref = done.outputs[0]
    assert (ref.node_id, ref.kind, ref.content_type) == ("3", "images", "image/png")
    (stored,) = cp.outputs
    assert stored.params["attempt"] == "1" and stored.params["filename"] == ref.filename
    assert ref.sha256 == stored.sha256 and ref.size_bytes == len(stored.body)
    original = np.asarray(Image.open(io.BytesIO(png_bytes())).convert("RGB"), dtype=int)
    result = np.asarray(Image.open(io.BytesIO(stored.body)).convert("RGB"), dtype=int)
    # ComfyUI works in floats 0..1 and truncates on save: one step of rounding either way.
    assert result.shape == original.shape
    assert np.abs(result - (255 - original)).max() <= 1
    assert cp.close_codes == [1001]  # the graceful stop said "going away"


async def test_execution_error_fails_with_node_and_exception(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    sim.settings.fail_nodes["ImageInvert"] = "the invert broke"
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-error"))
        messages = await cp.until_job_ends("wf-error")
    final = messages[-1]
    assert isinstance(final, JobUpdate) and final.status == "failed" and final.error
    assert (final.error.node_id, final.error.node_type) == ("2", "ImageInvert")
    assert "the invert broke" in final.error.message and final.error.exception_type
    assert final.prompt_id
    error_events = [
        m.node for m in messages if isinstance(m, JobUpdate) and m.node and m.node.event == "error"
    ]
    assert [(e.node_id, e.class_type) for e in error_events] == [("2", "ImageInvert")]


async def test_comfyui_400_is_invalid_with_node_errors(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    job = empty_image_job("wf-400")
    job.workflow_json["4"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["1", 0],
            "upscale_method": "no-such-method",
            "width": 8,
            "height": 8,
            "crop": "disabled",
        },
    }
    job.workflow_json["5"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["4", 0], "filename_prefix": "x"},
    }
    job.workflow_json["3"]["inputs"]["images"] = ["4", 0]
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(job)
        messages = await cp.until_job_ends("wf-400")
    assert statuses(messages) == ["uploaded", "invalid"]
    final = messages[-1]
    assert isinstance(final, JobUpdate) and final.error and final.error.node_errors
    assert "4" in final.error.node_errors
    assert "no-such-method" in final.error.message


async def test_conversion_error_is_invalid_before_comfyui(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(empty_image_job("wf-conv", width="wide"))
        messages = await cp.until_job_ends("wf-conv")
    assert statuses(messages) == ["invalid"]
    final = messages[-1]
    assert isinstance(final, JobUpdate) and final.error
    assert (final.error.node_id, final.error.node_type) == ("1", "EmptyImage")
    assert final.error.exception_type == "ConversionError" and "'wide'" in final.error.message


async def test_cancel_while_queued_deletes_and_while_running_interrupts(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    sim.settings.node_delays_s["ImageInvert"] = 1.0
    agent = Agent(make_settings(tmp_path, cp, sim.url, slots=2))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(empty_image_job("wf-running"))
        await cp.next(_is_update("running", "wf-running"))
        await cp.send(empty_image_job("wf-waiting"))
        waiting = (await cp.next(_is_update("queued", "wf-waiting"))).message
        assert isinstance(waiting, JobUpdate) and waiting.prompt_id

        await cp.send(Cancel(workflow_id="wf-waiting", attempt=1))
        final = (await cp.next(lambda m: _about(m, "wf-waiting"))).message
        assert isinstance(final, JobUpdate) and final.status == "cancelled"
        queue = await agent.comfy.queue()
        assert waiting.prompt_id not in json.dumps(queue)
        assert await agent.comfy.history(waiting.prompt_id) is None  # never ran

        await cp.send(Cancel(workflow_id="wf-running", attempt=1))
        rest = await cp.until_job_ends("wf-running")
        assert statuses(rest) == ["cancelled"]
        assert any(isinstance(m, JobUpdate) and m.node and m.node.event == "interrupted" for m in rest)
        assert not any(isinstance(m, JobDone) for m in rest)


async def test_completion_survives_a_lost_comfyui_websocket(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    proxy = CuttableProxy(sim.port)
    proxy_url = await proxy.start()
    sim.settings.node_delays_s["ImageInvert"] = 0.5
    agent = Agent(make_settings(tmp_path, cp, proxy_url))
    try:
        async with running(agent):
            await connect_and_ready(cp)
            await cp.send(invert_job(cp, "wf-lost-ws"))
            await cp.next(
                lambda m: (
                    isinstance(m, JobUpdate)
                    and m.node is not None
                    and m.node.node_id == "2"
                    and m.node.event == "executing"
                )
            )
            proxy.cut_websockets()  # mid-prompt: ImageInvert is still working
            messages = await cp.until_job_ends("wf-lost-ws")
    finally:
        await proxy.close()
    done = messages[-1]
    assert isinstance(done, JobDone) and len(done.outputs) == 1
    # The socket brought nothing after the cut: SaveImage's events never arrived.
    assert not any(isinstance(m, JobUpdate) and m.node and m.node.node_id == "3" for m in messages)


async def test_reconnects_with_backoff_and_resends_hello_with_held_job(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    delays: list[float] = []

    async def no_wait(delay: float) -> None:
        delays.append(delay)  # the backoff is recorded, not waited out

    sim.settings.node_delays_s["ImageInvert"] = 0.5
    settings = make_settings(tmp_path, cp, sim.url, reconnect_initial_s=0.5, reconnect_jitter=0.5)
    agent = Agent(settings, sleep=no_wait, rand=lambda: 0.5)
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-held"))
        await cp.next(_is_update("running", "wf-held"))
        assert cp.ws is not None
        await cp.ws.close(code=1001, message=b"control plane restarting")

        second = await cp.next(lambda m: isinstance(m, Hello))
        assert second.connection == 2
        assert isinstance(second.message, Hello)
        assert second.message.jobs == [HeldJob(workflow_id="wf-held", attempt=1)]
        rest = await cp.until_job_ends("wf-held")
        assert isinstance(rest[-1], JobDone)
    assert delays == [pytest.approx(0.5 * (1 - 0.5 * 0.5))]
    # Nothing lost or repeated across the two connections.
    updates = [r.message for r in cp.history if _about(r.message, "wf-held")]
    assert statuses(updates) == ["uploaded", "queued", "running"]
    assert isinstance(updates[-1], JobDone)


async def test_welcome_drop_jobs_abandons_silently(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    sim.settings.node_delays_s["ImageInvert"] = 1.0

    async def no_wait(delay: float) -> None:
        return None

    agent = Agent(make_settings(tmp_path, cp, sim.url), sleep=no_wait)
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-dropped"))
        await cp.next(_is_update("running", "wf-dropped"))
        cp.drop_jobs = [HeldJob(workflow_id="wf-dropped", attempt=1)]
        assert cp.ws is not None
        await cp.ws.close(code=1001)
        hello = await cp.next(lambda m: isinstance(m, Hello))
        # The job ends on ComfyUI without a word to the control plane, and frees its slot.
        ready = await cp.next(lambda m: isinstance(m, Ready))
    assert isinstance(ready.message, Ready) and ready.message.free_slots == 1
    after_hello = cp.history[cp.history.index(hello) :]
    assert not any(_about(r.message, "wf-dropped") for r in after_hello)
    assert not cp.outputs


async def test_409_on_output_upload_stops_the_job(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    cp.output_status = 409
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(invert_job(cp, "wf-409"))
        await cp.next(_is_update("running", "wf-409"))
        after = await cp.next(
            lambda m: (
                isinstance(m, Ready)
                or (_about(m, "wf-409") and (isinstance(m, JobDone) or m.status is not None))
            )
        )
    # Nothing more about the job (no job_done, no failed): its slot is simply free again.
    assert isinstance(after.message, Ready)
    assert not any(isinstance(r.message, JobDone) for r in cp.history)
    assert statuses([r.message for r in cp.history if _about(r.message, "wf-409")]) == [
        "uploaded",
        "queued",
        "running",
    ]


async def test_comfyui_500_on_prompt_fails_the_job(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    with aioresponses(passthrough_unmatched=True) as mocked:
        mocked.post(
            f"{sim.url}/prompt",
            status=500,
            body="500 Internal Server Error\n\nServer got itself in trouble",
            response_class=MockedResponse,
        )
        async with running(agent):
            await connect_and_ready(cp)
            await cp.send(empty_image_job("wf-500"))
            messages = await cp.until_job_ends("wf-500")
    final = messages[-1]
    assert isinstance(final, JobUpdate) and final.status == "failed" and final.error
    assert "ComfyUI answered 500 to POST /prompt" in final.error.message
    assert "Server got itself in trouble" in final.error.message


async def test_comfyui_refusing_connections_fails_the_job(
    tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int
) -> None:
    agent = Agent(make_settings(tmp_path, cp, f"http://127.0.0.1:{unused_tcp_port}"))
    async with running(agent):
        hello = await connect_and_ready(cp)
        assert hello.comfyui.node_classes == [] and hello.comfyui.version is None
        await cp.send(empty_image_job("wf-refused"))
        messages = await cp.until_job_ends("wf-refused")
    final = messages[-1]
    assert isinstance(final, JobUpdate) and final.status == "failed" and final.error
    assert f"ComfyUI at http://127.0.0.1:{unused_tcp_port} is unreachable" in final.error.message
    assert final.error.exception_type == "ComfyUIUnavailable"


async def test_bad_token_gives_up(tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int) -> None:
    settings = make_settings(tmp_path, cp, f"http://127.0.0.1:{unused_tcp_port}", token="wrong")
    agent = Agent(settings)
    with pytest.raises(GiveUp) as caught:
        await asyncio.wait_for(agent.run(), WAIT_S)
    assert caught.value.code == 4001
    assert "refused the runner token" in str(caught.value)


async def test_heartbeat_reports_capacity(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    agent = Agent(make_settings(tmp_path, cp, sim.url, heartbeat_s=0.02, slots=3))
    async with running(agent):
        await connect_and_ready(cp)
        update = (await cp.next(lambda m: isinstance(m, CapacityUpdate))).message
    assert isinstance(update, CapacityUpdate) and update.capacity.slots == 3
    assert update.capacity.host.cpu_count


async def test_comfyui_coming_up_later_triggers_a_fresh_hello(
    tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int
) -> None:
    from comfyui_sim import SimSettings, start_simulator

    comfyui_url = f"http://127.0.0.1:{unused_tcp_port}"
    agent = Agent(make_settings(tmp_path, cp, comfyui_url, heartbeat_s=0.02))
    async with running(agent):
        first = await connect_and_ready(cp)
        assert first.comfyui.node_classes == []
        runner, _ = await start_simulator(SimSettings(data_dir=tmp_path / "late"), port=unused_tcp_port)
        try:
            second = (await cp.next(lambda m: isinstance(m, Hello))).message
        finally:
            await runner.cleanup()
    assert isinstance(second, Hello) and "SaveImage" in second.comfyui.node_classes


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_cli_exit_codes(
    tmp_path: Path,
    cp: FakeControlPlane,
    unused_tcp_port: int,
    restore_logging: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("COMFYFLEET_SERVER", "COMFYFLEET_TOKEN", "COMFYFLEET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    assert await asyncio.to_thread(main, ["--token", "t"]) == EXIT_SETTINGS
    argv = [
        "--server",
        cp.url,
        "--token",
        "wrong",
        "--comfyui",
        f"http://127.0.0.1:{unused_tcp_port}",
        "--data-dir",
        str(tmp_path / "agent"),
        "--log-json",
    ]
    # In a thread: the CLI runs its own event loop, the fake control plane runs in this one.
    assert await asyncio.to_thread(main, argv) == EXIT_GIVE_UP


async def test_two_inputs_sent_under_one_name_stay_apart(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane
) -> None:
    job = invert_job(cp, "wf-two-files")
    other = Image.new("RGB", (4, 2), (1, 2, 3))
    buffer = io.BytesIO()
    other.save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    cp.files[sha] = data
    job.files.append(
        JobFile(
            name="mask",
            filename="cat photo.png",
            url=f"/v1/agent/jobs/wf-two-files/files/{sha}",
            sha256=sha,
            size_bytes=len(data),
        )
    )
    job.workflow_json["4"] = {"class_type": "LoadImage", "inputs": {"image": "$file(mask)"}}
    job.workflow_json["5"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["4", 0], "filename_prefix": "m"},
    }
    agent = Agent(make_settings(tmp_path, cp, sim.url))
    async with running(agent):
        await connect_and_ready(cp)
        await cp.send(job)
        messages = await cp.until_job_ends("wf-two-files")
    uploaded = next(m for m in messages if isinstance(m, JobUpdate) and m.status == "uploaded")
    assert uploaded.resolved_params is not None
    assert uploaded.resolved_params["files"] == {
        "photo": "comfyfleet/wf-two-files/cat_photo.png",
        "mask": "comfyfleet/wf-two-files/1_cat_photo.png",
    }
    done = messages[-1]
    assert isinstance(done, JobDone) and len(done.outputs) == 2
    by_node = {o.params["node_id"]: o.body for o in cp.outputs}
    mask = np.asarray(Image.open(io.BytesIO(by_node["5"])).convert("RGB"))
    assert (mask == (1, 2, 3)).all()


async def test_replaced_connection_backs_off_and_deleted_runner_gives_up(
    tmp_path: Path, cp: FakeControlPlane, unused_tcp_port: int
) -> None:
    delays: list[float] = []

    async def no_wait(delay: float) -> None:
        delays.append(delay)

    cp.hang_ups = [4004, 4004, 1001, 4003]
    settings = make_settings(tmp_path, cp, f"http://127.0.0.1:{unused_tcp_port}")
    agent = Agent(settings, sleep=no_wait, rand=lambda: 0.0)
    with pytest.raises(GiveUp) as caught:
        await asyncio.wait_for(agent.run(), WAIT_S)
    assert caught.value.code == 4003 and "deleted" in str(caught.value)
    # Replaced twice: the backoff grows; a plain drop after a welcome starts it afresh.
    assert delays == [0.5, 1.0, 0.5]


async def test_stop_drains_takes_no_new_job_and_closes_with_1001(
    tmp_path: Path, sim: Sim, cp: FakeControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="runner_agent.agent")
    sim.settings.node_delays_s["ImageInvert"] = 0.5
    agent = Agent(make_settings(tmp_path, cp, sim.url, slots=2))
    task = asyncio.create_task(agent.run())
    await connect_and_ready(cp)
    await cp.send(empty_image_job("wf-drain"))
    await cp.next(_is_update("running", "wf-drain"))
    stopping = asyncio.create_task(agent.stop())
    # The slots offered before are taken back first.
    withdrawn = (await cp.next(lambda m: isinstance(m, Ready))).message
    assert isinstance(withdrawn, Ready) and withdrawn.free_slots == 0
    await cp.send(empty_image_job("wf-late"))  # sent before the control plane heard
    messages = await cp.until_job_ends("wf-drain")
    await asyncio.wait_for(stopping, WAIT_S)
    await asyncio.wait_for(task, WAIT_S)
    assert isinstance(messages[-1], JobDone)
    assert not any(_about(r.message, "wf-late") for r in cp.history)
    assert any(
        "wf-late attempt 1: arrived while draining; not taken" in r.getMessage() for r in caplog.records
    )
    assert cp.close_codes == [1001]


async def test_a_second_stop_abandons_the_running_job(tmp_path: Path, sim: Sim, cp: FakeControlPlane) -> None:
    sim.settings.node_delays_s["ImageInvert"] = 1.0
    agent = Agent(make_settings(tmp_path, cp, sim.url, shutdown_grace_s=30.0))
    task = asyncio.create_task(agent.run())
    await connect_and_ready(cp)
    await cp.send(empty_image_job("wf-hurried"))
    queued = (await cp.next(_is_update("queued", "wf-hurried"))).message
    await cp.next(_is_update("running", "wf-hurried"))
    draining = asyncio.create_task(agent.stop())
    await cp.next(lambda m: isinstance(m, Ready))  # the drain began
    await agent.stop()  # a second SIGTERM: do not wait out the grace
    await asyncio.wait_for(draining, WAIT_S)
    await asyncio.wait_for(task, WAIT_S)
    # Abandoned: interrupted on ComfyUI, and not a word more to the control plane.
    assert isinstance(queued, JobUpdate) and queued.prompt_id
    try:
        entry = await agent.comfy.history(queued.prompt_id)
    finally:
        await agent.comfy.close()
    assert entry is not None and entry["status"]["status_str"] == "error"
    ended = [
        r.message
        for r in cp.history
        if _about(r.message, "wf-hurried")
        and (isinstance(r.message, JobDone) or r.message.status in ("failed", "cancelled", "completed"))
    ]
    assert ended == []
    assert cp.close_codes == [1001]
