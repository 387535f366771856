"""What a client sending huge forms costs everyone else.

Starts ``comfyfleet serve`` as its own process, then measures ``GET /healthz`` one request after
another for ``--seconds``: first with nothing else going on (the baseline), then while three
clients (in a process of their own) keep sending forms of 100,000 tiny fields (7 MB each) to
``POST /v1/workflow``. Prints the median, p99 and worst latency of both, and how the forms
were answered.

    .venv/bin/python scripts/bench_hostile_forms.py [--seconds 10] [--fields 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from comfyfleet import processes
from comfyfleet.admin import create_token
from control_plane.settings import Settings


def many_fields(count: int) -> bytes:
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    return part * count + b"--b--\r\n"


async def latencies(http: aiohttp.ClientSession, base: str, seconds: float) -> list[float]:
    found = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        async with http.get(f"{base}/healthz") as resp:
            await resp.read()
            assert resp.status == 200
        found.append((time.perf_counter() - start) * 1000)
    return found


async def flood(
    http: aiohttp.ClientSession, base: str, token: str, body: bytes, stop: asyncio.Event
) -> list[int]:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "multipart/form-data; boundary=b"}
    statuses = []
    while not stop.is_set():
        async with http.post(f"{base}/v1/workflow", data=body, headers=headers) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


def line(label: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"| {label} | {len(ms)} | {statistics.median(ms):.2f} | {p99:.2f} | {ms[-1]:.2f} |"


async def attack(args: argparse.Namespace) -> None:
    """The attackers' process: three clients sending forms until stdin closes."""
    body = many_fields(args.fields)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as http:
        floods = [asyncio.create_task(flood(http, args.attack, args.token, body, stop)) for _ in range(3)]
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()
        statuses = collections.Counter(s for found in await asyncio.gather(*floods) for s in found)
    print(json.dumps(statuses), flush=True)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        token = await create_token(Settings(data_dir=root).validate(), "bench", "enterprise", "client", None)
        port = processes.free_port()
        base = f"http://127.0.0.1:{port}"
        served = processes.control_plane(root, port)
        await served.start()
        try:
            await processes.wait_until_answers(f"{base}/healthz")
            async with aiohttp.ClientSession() as http:
                quiet = await latencies(http, base, args.seconds)
                attackers = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--fields",
                    str(args.fields),
                    "--attack",
                    base,
                    "--token",
                    token,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                busy = await latencies(http, base, args.seconds)
                out, _ = await attackers.communicate(b"")
                answers = json.loads(out)
        finally:
            await served.stop()
    size = len(many_fields(args.fields))
    print(
        f"GET /healthz, one after another, {args.seconds:g} s each; forms of {args.fields} fields "
        f"({size / 1e6:.1f} MB) from 3 clients at once, in a process of their own"
    )
    print("| while | requests | median ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    print(line("nothing else (baseline)", quiet))
    print(line("3 clients send huge forms", busy))
    print(f"the forms were answered: {dict(answers)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fields", type=int, default=100_000)
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # the attackers' own process
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    asyncio.run(attack(parsed) if parsed.attack else main(parsed))
