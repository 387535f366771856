"""A whole fleet in this process for the benchmarks: the ComfyUI simulator, a control plane
on SQLite and one agent, each on its own port on 127.0.0.1, and a client token."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from comfyfleet.admin import create_token
from comfyui_sim import SimSettings, start_simulator
from control_plane.app import create_app
from control_plane.settings import Settings
from runner_agent.agent import Agent
from runner_agent.config import AgentSettings


@dataclass(frozen=True)
class LocalFleet:
    base: str  # the control plane
    sim: str  # the simulator
    headers: dict[str, str]  # a client token of an enterprise account
    http: aiohttp.ClientSession


@asynccontextmanager
async def local_fleet(sim_settings: dict[str, object] | None = None) -> AsyncIterator[LocalFleet]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sim_runner, sim = await start_simulator(
            SimSettings(data_dir=root / "comfyui", **(sim_settings or {})),  # type: ignore[arg-type]
            port=0,
        )
        settings = Settings(data_dir=root / "cp").validate()
        cp_runner = web.AppRunner(create_app(settings), access_log=None)
        await cp_runner.setup()
        site = web.TCPSite(cp_runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        headers = {
            "Authorization": f"Bearer {await create_token(settings, 'bench', 'enterprise', 'client', None)}"
        }
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{base}/v1/runner", json={"name": "bench"}, headers=headers) as resp:
                    runner = await resp.json()
                agent = Agent(
                    AgentSettings(
                        server_url=base, token=runner["token"], comfyui_url=sim, data_dir=root / "agent"
                    )
                )
                agent_task = asyncio.create_task(agent.run())
                try:
                    yield LocalFleet(base, sim, headers, http)
                finally:
                    await agent.stop()
                    await asyncio.wait_for(agent_task, 10)
        finally:
            await cp_runner.cleanup()
            await sim_runner.cleanup()
