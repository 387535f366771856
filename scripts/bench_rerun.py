"""What a rerun from the last node saves.

A chain LoadImage -> ImageBlur -> ImageInvert -> ImageScale -> SaveImage whose two middle
nodes are slow (simulator delays). Each round submits it with a new input image (a full run:
nothing cached) and then reruns it from its last node with a new filename prefix
(POST /api/workflow/{id}/rerun), which goes back to the same runner so ComfyUI's
cache serves everything upstream. Prints the median time of each, from request to
completed, and their ratio.

    .venv/bin/python scripts/bench_rerun.py [--rounds 5] [--delay-s 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from typing import Any

import aiohttp
from local_fleet import local_fleet  # scripts/, beside this file
from PIL import Image

WORKFLOW: dict[str, Any] = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$file(image)"}},
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
    "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
    "4": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["3", 0],
            "upscale_method": "bilinear",
            "width": 256,
            "height": 256,
            "crop": "disabled",
        },
    },
    "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "full"}},
}


def png(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), (shade, 255 - shade, 64)).save(buf, format="PNG")
    return buf.getvalue()


async def until_completed(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], wf_id: str
) -> None:
    async with http.get(f"{base}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data: ") and b'"status": "completed"' in line:
                return
    raise RuntimeError(f"workflow {wf_id} did not complete")


async def full_run(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], shade: int
) -> tuple[str, float]:
    form = aiohttp.FormData()
    form.add_field("workflow_json", json.dumps(WORKFLOW), filename="wf.json")
    form.add_field("$image", png(shade), filename="in.png", content_type="image/png")
    start = time.perf_counter()
    async with http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
        wf_id = (await resp.json())["id"]
    await until_completed(http, base, headers, wf_id)
    return wf_id, time.perf_counter() - start


async def rerun_last(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], wf_id: str, n: int
) -> float:
    body = {"reRunFromTaskId": "5", "taskInput": {"filename_prefix": f"rerun{n}"}}
    start = time.perf_counter()
    async with http.post(f"{base}/api/workflow/{wf_id}/rerun", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    await until_completed(http, base, headers, wf_id)
    return time.perf_counter() - start


async def main(rounds: int, delay_s: float) -> None:
    delays = {"ImageBlur": delay_s, "ImageInvert": delay_s}
    async with local_fleet({"node_delays_s": delays}) as fleet:
        http, base, headers = fleet.http, fleet.base, fleet.headers
        full: list[float] = []
        rerun: list[float] = []
        for n in range(rounds):
            wf_id, elapsed = await full_run(http, base, headers, shade=n * 37 % 256)
            full.append(elapsed)
            rerun.append(await rerun_last(http, base, headers, wf_id, n))
        async with http.get(f"{fleet.sim}/sim/log") as resp:
            last = (await resp.json())["prompts"][-1]

    f_med, r_med = statistics.median(full) * 1000, statistics.median(rerun) * 1000
    print(f"rounds: {rounds}; ImageBlur and ImageInvert each delayed {delay_s:g} s")
    print(f"{'run':<34}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    print(
        f"{'full run (nothing cached)':<34}{f_med:>12.1f}{min(full) * 1000:>10.1f}{max(full) * 1000:>10.1f}"
    )
    print(
        f"{'rerun from the last node':<34}{r_med:>12.1f}{min(rerun) * 1000:>10.1f}{max(rerun) * 1000:>10.1f}"
    )
    print(f"ratio full / rerun: {f_med / r_med:.1f}x")
    print(f"last rerun on ComfyUI: executed {last['executed']}, cached {sorted(last['cached'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay-s", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.delay_s))
