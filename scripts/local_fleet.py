"""A whole fleet on this machine for the benchmarks, as it is deployed: the ComfyUI simulator
(or a real ComfyUI at ``comfyui``), ``comfyfleet serve`` on SQLite and one agent, each a
process of its own on 127.0.0.1, and a client token of an enterprise account."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from comfyfleet import processes
from comfyfleet.admin import create_token
from control_plane.settings import Settings


@dataclass(frozen=True)
class LocalFleet:
    base: str  # the control plane
    sim: str  # the ComfyUI the agent runs prompts on
    headers: dict[str, str]  # a client token of an enterprise account
    http: aiohttp.ClientSession


async def _started(stack: AsyncExitStack, part: processes.Part, health_url: str) -> None:
    await part.start()
    stack.push_async_callback(part.stop)
    await processes.wait_until_answers(health_url)


@asynccontextmanager
async def local_fleet(
    sim_config: dict[str, object] | None = None, comfyui: str | None = None
) -> AsyncIterator[LocalFleet]:
    """``sim_config`` goes to the simulator's ``POST /sim/config`` (node delays and the like);
    with ``comfyui`` no simulator is started and the agent uses that ComfyUI."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with AsyncExitStack() as stack, aiohttp.ClientSession() as http:
            sim = comfyui
            if sim is None:
                port = processes.free_port()
                sim = f"http://127.0.0.1:{port}"
                await _started(stack, processes.simulator(root / "comfyui", port), f"{sim}/system_stats")
                if sim_config:
                    async with http.post(f"{sim}/sim/config", json=sim_config) as resp:
                        resp.raise_for_status()
            settings = Settings(data_dir=root / "cp").validate()
            token = await create_token(settings, "bench", "enterprise", "client", None)
            headers = {"Authorization": f"Bearer {token}"}
            port = processes.free_port()
            base = f"http://127.0.0.1:{port}"
            await _started(stack, processes.control_plane(root / "cp", port), f"{base}/healthz")
            async with http.post(f"{base}/v1/runner", json={"name": "bench"}, headers=headers) as resp:
                runner = await resp.json()
            agent = processes.agent(root / "agent", base, runner["token"], sim)
            await agent.start()
            stack.push_async_callback(agent.stop)
            await _until_connected(http, base, headers, runner["id"])
            yield LocalFleet(base, sim, headers, http)


async def _until_connected(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], runner_id: str
) -> None:
    async with asyncio.timeout(60):
        while True:
            async with http.get(f"{base}/v1/runner/{runner_id}", headers=headers) as resp:
                if (await resp.json()).get("connected"):
                    return
            await asyncio.sleep(0.05)  # the poll's pace
