"""What the fleet adds to a prompt's latency.

Runs a trivial workflow (EmptyImage -> SaveImage) N times posted straight to ComfyUI and N
times submitted through the control plane and an agent, in alternating blocks, and prints
the median and p99 from submit to completed for each and their difference. Each run uses a
new colour so that ComfyUI's cache never answers for it. ComfyUI (the simulator unless
``--comfyui URL`` names a real one), ``comfyfleet serve`` and the agent are each a process of
their own, as deployed; this one is the client.

    .venv/bin/python scripts/bench_overhead.py [--runs 100] [--comfyui http://127.0.0.1:8188]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import aiohttp
from local_fleet import local_fleet  # scripts/, beside this file


def prompt(color: int, template: bool) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {
                "width": 64,
                "height": 64,
                "batch_size": 1,
                "color": "$text(color)" if template else color,
            },
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
    }


async def direct_run(
    http: aiohttp.ClientSession, sim: str, ws: aiohttp.ClientWebSocketResponse, client_id: str, color: int
) -> float:
    start = time.perf_counter()
    async with http.post(
        f"{sim}/prompt", json={"prompt": prompt(color, False), "client_id": client_id}
    ) as resp:
        prompt_id = (await resp.json())["prompt_id"]
    async for msg in ws:
        data = json.loads(msg.data)
        if (
            data["type"] == "executing"
            and data["data"]["node"] is None
            and data["data"]["prompt_id"] == prompt_id
        ):
            break
    return time.perf_counter() - start


async def fleet_run(http: aiohttp.ClientSession, base: str, headers: dict[str, str], color: int) -> float:
    form = aiohttp.FormData()
    form.add_field("workflow_json", json.dumps(prompt(color, True)), filename="wf.json")
    form.add_field("$color", str(color))
    start = time.perf_counter()
    async with http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
        wf_id = (await resp.json())["id"]
    async with http.get(f"{base}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data: ") and b'"status": "completed"' in line:
                break
    return time.perf_counter() - start


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


async def main(runs: int, block: int, comfyui: str | None) -> None:
    async with local_fleet(comfyui=comfyui) as fleet_:
        http, sim, base, headers = fleet_.http, fleet_.sim, fleet_.base, fleet_.headers
        client_id = uuid.uuid4().hex
        ws = await http.ws_connect(f"{sim.replace('http', 'ws')}/ws?clientId={client_id}")
        direct: list[float] = []
        fleet: list[float] = []
        color = 0
        for _ in range(3):  # warm-up: imports, first connections, first PNG encoder use
            color += 1
            await direct_run(http, sim, ws, client_id, color)
            await fleet_run(http, base, headers, color + 1_000_000)
        while len(direct) < runs:
            for _ in range(block):
                color += 1
                direct.append(await direct_run(http, sim, ws, client_id, color))
            for _ in range(block):
                color += 1
                fleet.append(await fleet_run(http, base, headers, color))
        await ws.close()

    d_med, d_p99 = summary(direct)
    f_med, f_p99 = summary(fleet)
    print(f"runs per path: {len(direct)} (alternating blocks of {block})")
    print(f"{'path':<28}{'median ms':>12}{'p99 ms':>12}")
    print(f"{'ComfyUI simulator direct':<28}{d_med:>12.1f}{d_p99:>12.1f}")
    print(f"{'through the fleet':<28}{f_med:>12.1f}{f_p99:>12.1f}")
    print(f"{'fleet overhead':<28}{f_med - d_med:>12.1f}{f_p99 - d_p99:>12.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--comfyui", help="a real ComfyUI's URL instead of the simulator")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.block, args.comfyui))
