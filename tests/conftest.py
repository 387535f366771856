"""Shared fixtures: a real control plane, the ComfyUI simulator and real agents, all on
127.0.0.1 with ports picked by the OS."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from comfyfleet.admin import create_token
from comfyfleet.throwaway_postgres import PgServer
from control_plane.app import create_app
from control_plane.services import Services
from control_plane.settings import Settings
from tests.s3_server import S3Server


@dataclass
class ControlPlane:
    base: str
    settings: Settings
    app: web.Application
    runner: web.AppRunner
    http: aiohttp.ClientSession
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def services(self) -> Services:
        return self.app[Services.KEY]

    async def token(
        self,
        account: str = "alice",
        *,
        tier: str | None = None,
        scope: str = "client",
        expires_in_days: float | None = None,
    ) -> str:
        return await create_token(self.settings, account, tier, scope, expires_in_days)

    async def headers(self, account: str = "alice") -> dict[str, str]:
        if account not in self._tokens:
            self._tokens[account] = await self.token(account)
        return {"Authorization": f"Bearer {self._tokens[account]}"}

    async def create_runner(
        self, account: str = "alice", name: str = "r1", tags: list[str] | None = None
    ) -> dict[str, Any]:
        async with self.http.post(
            f"{self.base}/v1/runner",
            json={"name": name, "tags": tags or []},
            headers=await self.headers(account),
        ) as resp:
            assert resp.status == 201, await resp.text()
            return await resp.json()

    async def request(
        self, method: str, path: str, account: str | None = "alice", **kwargs: Any
    ) -> tuple[int, Any]:
        headers = kwargs.pop("headers", None)
        if headers is None and account is not None:
            headers = await self.headers(account)
        async with self.http.request(method, self.base + path, headers=headers, **kwargs) as resp:
            body = await resp.json() if resp.content_type == "application/json" else await resp.read()
            return resp.status, body

    async def wait_for_status(
        self, wf_id: str, statuses: set[str], account: str = "alice", timeout_s: float = 20
    ) -> dict[str, Any]:
        """Follow the workflow's SSE stream until it reports one of ``statuses``."""
        async with asyncio.timeout(timeout_s):
            async for event, data in self.events(wf_id, account):
                if event == "status" and data["status"] in statuses:
                    break
        _, body = await self.request("GET", f"/v1/workflow/{wf_id}", account)
        return body

    async def events(self, wf_id: str, account: str = "alice") -> AsyncIterator[tuple[str, dict[str, Any]]]:
        async with self.http.get(
            f"{self.base}/v1/workflow/{wf_id}/subscribe", headers=await self.headers(account)
        ) as resp:
            assert resp.status == 200, await resp.text()
            async for _, event, data in sse_frames(resp):
                yield event, data


async def sse_frames(resp: aiohttp.ClientResponse) -> AsyncIterator[tuple[str | None, str, dict[str, Any]]]:
    """An event stream's frames as a client reads them: (id, event, data)."""
    event_id: str | None = None
    name = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield event_id, name, json.loads(line[6:])
            event_id = None


async def start_control_plane(
    tmp_path: Path, **overrides: Any
) -> tuple[web.AppRunner, str, web.Application, Settings]:
    port = overrides.pop("port", 0)
    settings = Settings(data_dir=tmp_path / "cp", **overrides).validate()
    app = create_app(settings)
    # A refused upload is drained for lingering_time so the client reads its 400; a short
    # one keeps the test server's shutdown quick.
    runner = web.AppRunner(app, access_log=None, lingering_time=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sock_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{sock_port}", app, settings


@contextlib.asynccontextmanager
async def control_planes(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str, n: int, **overrides: Any
) -> AsyncIterator[list[ControlPlane]]:
    """``n`` control planes on one database (PostgreSQL), sharing a data folder as replicas
    share their blob storage; each is stopped at the end (a test may stop one before)."""
    planes = []
    try:
        for _ in range(n):
            runner, base, app, settings = await start_control_plane(
                tmp_path, database_url=database_url, **overrides
            )
            planes.append(ControlPlane(base, settings, app, runner, http))
        yield planes
    finally:
        for plane in planes:
            await plane.runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest) -> str:
    """Every test that uses the control plane runs on both databases."""
    if request.param == "sqlite":
        return ""
    server: PgServer = request.getfixturevalue("pg_server")
    return await server.new_database()


@pytest.fixture
async def cp(tmp_path: Path, http: aiohttp.ClientSession, database_url: str) -> AsyncIterator[ControlPlane]:
    runner, base, app, settings = await start_control_plane(
        tmp_path, runner_grace_s=2.0, heartbeat_s=1.0, database_url=database_url
    )
    yield ControlPlane(base, settings, app, runner, http)
    await runner.cleanup()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["disk", "s3"])
async def blob_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The blob tests run on both stores: local disk and an S3-speaking server (a bucket of
    their own, reached as any S3 is, through the AWS_* environment)."""
    if request.param == "disk":
        return ""
    server: S3Server = request.getfixturevalue("s3_server")
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{await server.new_bucket()}/blobs"


@pytest.fixture
async def blob_cp(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str, blob_url: str
) -> AsyncIterator[ControlPlane]:
    """A control plane on each database with each blob store."""
    runner, base, app, settings = await start_control_plane(
        tmp_path, runner_grace_s=2.0, heartbeat_s=1.0, database_url=database_url, blob_url=blob_url
    )
    yield ControlPlane(base, settings, app, runner, http)
    await runner.cleanup()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[str]:
    from comfyui_sim import SimSettings, start_simulator

    runner, url = await start_simulator(SimSettings(data_dir=tmp_path / "comfyui"), port=0)
    yield url
    await runner.cleanup()


AgentFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def start_agent(tmp_path: Path) -> AsyncIterator[AgentFactory]:
    """Start real agents; each is stopped at the end of the test."""
    from runner_agent.agent import Agent
    from runner_agent.config import AgentSettings

    running: list[tuple[Any, asyncio.Task[Any]]] = []

    async def start(server: str, token: str, comfyui: str, nvml: Any = None, **kw: Any) -> Any:
        settings = AgentSettings(
            server_url=server,
            token=token,
            comfyui_url=comfyui,
            data_dir=tmp_path / f"agent{len(running)}",
            reconnect_initial_s=0.05,
            reconnect_max_s=0.5,
            **kw,
        )
        agent = Agent(settings, nvml=nvml)
        running.append((agent, asyncio.create_task(agent.run())))
        return agent

    yield start
    for agent, task in running:
        await agent.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


async def rerun_held_after_its_checks(
    cp: ControlPlane, workflow_id: str, prompt: str
) -> tuple[asyncio.Task[tuple[int, Any]], asyncio.Event]:
    """A rerun of the workflow (``$prompt`` new), held once it has been checked and before it
    is inserted: a race's other side goes in there. Setting the event lets it go on."""
    submissions = cp.services.submissions
    checked, go_on = asyncio.Event(), asyncio.Event()
    check = submissions.check_runner_available

    async def held(*args: Any, **kwargs: Any) -> Any:
        need = await check(*args, **kwargs)
        checked.set()
        await go_on.wait()
        return need

    submissions.check_runner_available = held  # type: ignore[method-assign]
    data = aiohttp.FormData({"$prompt": prompt})
    rerun = asyncio.create_task(cp.request("POST", f"/v1/workflow/{workflow_id}/rerun", data=data))
    await asyncio.wait_for(checked.wait(), 30)
    return rerun, go_on


async def poll_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Until ``check()`` holds, looking again every 50 ms; TimeoutError past the deadline.
    For state that sends no event (a file on disk, another process)."""
    async with asyncio.timeout(timeout_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)  # the poll's pace, not a wait for something to happen


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def read_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
