"""How many workflows a second one control plane gets through, and what each costs it.

Three kinds of process, as deployed: ``comfyfleet serve``; K simulated agents (websocket
clients speaking the agent protocol, in a process of their own); and this client, which keeps
``--in-flight`` workflows going (a multipart submit, then the workflow's event stream until it
completes) for ``--seconds``. The agents either finish each job at once (``instant``: ``job_done``
only) or say what a real agent says (``real``: ``uploaded``, wait for ``proceed``, ``queued``,
``running``, two node events, one output uploaded over HTTP, ``job_done``).

Printed beside it, measured in the same run with the same client and concurrency: a trivial
aiohttp handler (its own process) answering GETs and multipart POSTs, the ceiling of what one
Python process serves on this machine.

    .venv/bin/python scripts/bench_throughput.py [--agents 8] [--in-flight 32] [--seconds 10]
        [--pattern instant|real] [--postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web
from websockets.asyncio.client import ClientConnection, connect

from comfyfleet import processes
from comfyfleet.admin import create_token
from comfyfleet.throwaway_postgres import PgServer
from control_plane.settings import Settings
from protocol.agent_http import SHA256_HEADER, outputs_path
from protocol.capacity import Capacity
from protocol.messages import (
    ComfyUIInfo,
    Hello,
    JobDone,
    JobUpdate,
    NodeEvent,
    OutputRef,
    Ready,
    dump_message,
)

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "$text(prefix)"}},
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 120


# -- the agents' process ---------------------------------------------------------------------


async def agent(base: str, token: str, pattern: str, stop: asyncio.Event) -> None:
    url = base.replace("http", "ws", 1) + "/v1/agent/connect"
    async with (
        aiohttp.ClientSession() as http,
        connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws,
    ):
        hello = Hello(
            agent_version="bench",
            capacity=Capacity(slots=4),
            comfyui=ComfyUIInfo(url="http://sim", node_classes=["EmptyImage", "SaveImage"]),
        )
        await ws.send(dump_message(hello))
        await ws.recv()  # welcome
        await ws.send(dump_message(Ready(free_slots=4)))
        proceeds: dict[str, asyncio.Future[None]] = {}
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "job":
                job = asyncio.create_task(run_job(http, ws, base, token, msg, pattern, proceeds))
                job.add_done_callback(lambda t: t.exception())
            elif msg["type"] == "proceed" and msg["workflow_id"] in proceeds:
                proceeds.pop(msg["workflow_id"]).set_result(None)
            if stop.is_set():
                return


async def run_job(
    http: aiohttp.ClientSession,
    ws: ClientConnection,
    base: str,
    token: str,
    job: dict[str, Any],
    pattern: str,
    proceeds: dict[str, asyncio.Future[None]],
) -> None:
    wf, attempt = job["workflow_id"], job["attempt"]
    outputs: list[OutputRef] = []
    if pattern == "real":
        go = proceeds[wf] = asyncio.get_running_loop().create_future()
        await ws.send(dump_message(JobUpdate(workflow_id=wf, attempt=attempt, status="uploaded")))
        await go
        for update in (
            JobUpdate(workflow_id=wf, attempt=attempt, status="queued", prompt_id=wf, queue_number=0),
            JobUpdate(workflow_id=wf, attempt=attempt, status="running"),
            JobUpdate(workflow_id=wf, attempt=attempt, node=NodeEvent(node_id="1", event="executing")),
            JobUpdate(workflow_id=wf, attempt=attempt, node=NodeEvent(node_id="2", event="executed")),
        ):
            await ws.send(dump_message(update))
        sha = hashlib.sha256(PNG).hexdigest()
        headers = {"Authorization": f"Bearer {token}", SHA256_HEADER: sha, "Content-Type": "image/png"}
        params = {"attempt": str(attempt), "node_id": "2", "filename": "out.png", "kind": "images"}
        async with http.put(base + outputs_path(wf), params=params, headers=headers, data=PNG) as resp:
            receipt = await resp.json()
        outputs.append(
            OutputRef(
                output_id=receipt["output_id"],
                node_id="2",
                filename="out.png",
                kind="images",
                content_type="image/png",
                size_bytes=len(PNG),
                sha256=sha,
            )
        )
    await ws.send(dump_message(JobDone(workflow_id=wf, attempt=attempt, outputs=outputs)))
    await ws.send(dump_message(Ready(free_slots=4)))


async def agents_process(args: argparse.Namespace) -> None:
    tokens = json.loads(sys.stdin.readline())
    stop = asyncio.Event()
    running = [asyncio.create_task(agent(args.agents_for, t, args.pattern, stop)) for t in tokens]
    print("up", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes
    stop.set()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


# -- the trivial handler's process -----------------------------------------------------------


async def trivial_process(port: int) -> None:
    async def get(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def post(request: web.Request) -> web.Response:
        form = await request.post()
        return web.json_response({"fields": len(form)}, status=201)

    app = web.Application()
    app.add_routes([web.get("/healthz", get), web.post("/v1/workflow", post)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# -- the client ------------------------------------------------------------------------------


def form(n: int) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("workflow_json", json.dumps(TRIVIAL), filename="w.json", content_type="application/json")
    data.add_field("$prefix", f"bench{n}")
    return data


async def one_workflow(http: aiohttp.ClientSession, base: str, headers: dict[str, str], n: int) -> None:
    async with http.post(f"{base}/v1/workflow", data=form(n), headers=headers) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"submit answered {resp.status}: {body}")
    async with http.get(f"{base}/v1/workflow/{body['id']}/subscribe", headers=headers) as stream:
        async for line in stream.content:
            if line.startswith(b"data:") and b'"status": "completed"' in line:
                return
    raise RuntimeError(f"workflow {body['id']} ended without completing")


async def keep_going(seconds: float, in_flight: int, work: Any) -> int:
    """``in_flight`` workers doing ``work(n)`` one after another; how many finished in time."""
    done = 0
    end = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await work(next(counter))
            done += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done


async def ceiling(http: aiohttp.ClientSession, seconds: float, in_flight: int) -> tuple[float, float]:
    port = processes.free_port()
    server = await asyncio.create_subprocess_exec(sys.executable, __file__, "--trivial", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        await processes.wait_until_answers(f"{base}/healthz")

        async def get(_: int) -> None:
            async with http.get(f"{base}/healthz") as resp:
                await resp.read()

        async def post(n: int) -> None:
            async with http.post(f"{base}/v1/workflow", data=form(n)) as resp:
                await resp.read()

        gets = await keep_going(seconds, in_flight, get) / seconds
        posts = await keep_going(seconds, in_flight, post) / seconds
        return gets, posts
    finally:
        server.kill()
        await server.wait()


@contextlib.asynccontextmanager
async def database(postgres: bool) -> AsyncIterator[str]:
    if not postgres:
        yield ""
        return
    pg = PgServer()
    await asyncio.to_thread(pg.start)
    try:
        yield await pg.new_database()
    finally:
        await asyncio.to_thread(pg.stop)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with database(args.postgres) as url:
            settings = Settings(data_dir=root, database_url=url).validate()
            token = await create_token(settings, "bench", "enterprise", "client", None)
            port = processes.free_port()
            base = f"http://127.0.0.1:{port}"
            served = processes.control_plane(root, port, database_url=url)
            await served.start()
            try:
                await processes.wait_until_answers(f"{base}/healthz")
                figures = await measure(args, base, token, psutil.Process(served.pid))
            finally:
                await served.stop()
    report(args, *figures)


async def measure(
    args: argparse.Namespace, base: str, token: str, cp: psutil.Process
) -> tuple[int, float, float, float]:
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=args.in_flight * 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        tokens = []
        for i in range(args.agents):
            async with http.post(f"{base}/v1/runner", json={"name": f"bench-{i}"}, headers=headers) as resp:
                tokens.append((await resp.json())["token"])
        agents = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--agents-for", base, "--pattern", args.pattern,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert agents.stdin is not None and agents.stdout is not None
        agents.stdin.write((json.dumps(tokens) + "\n").encode())
        await agents.stdin.drain()
        await agents.stdout.readline()  # "up"

        async def work(n: int) -> None:
            await one_workflow(http, base, headers, n)

        try:
            await keep_going(min(2.0, args.seconds), args.in_flight, work)  # warm up
            before = cp.cpu_times()
            done = await keep_going(args.seconds, args.in_flight, work)
            after = cp.cpu_times()
        finally:
            agents.stdin.close()
            await agents.wait()
        cpu_s = (after.user - before.user) + (after.system - before.system)
        gets, posts = await ceiling(http, args.seconds, args.in_flight)
    return done, cpu_s, gets, posts


def report(args: argparse.Namespace, done: int, cpu_s: float, gets: float, posts: float) -> None:
    rate = done / args.seconds
    db = "PostgreSQL" if args.postgres else "SQLite"
    print(
        f"{args.agents} {args.pattern} agents, {args.in_flight} workflows in flight, {args.seconds:g} s, {db}"
    )
    print("| what | per second | control plane CPU per workflow |")
    print("|---|---:|---:|")
    print(f"| workflows through the fleet | {rate:.1f} | {cpu_s / max(done, 1) * 1000:.2f} ms |")
    print(f"| trivial aiohttp GET (ceiling) | {gets:.0f} | |")
    print(f"| trivial aiohttp multipart POST (ceiling) | {posts:.0f} | |")
    print(f"workflows/s against the multipart ceiling: {rate / posts:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pattern", choices=("instant", "real"), default="instant")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--agents-for", help=argparse.SUPPRESS)  # the agents' own process
    parser.add_argument("--trivial", type=int, help=argparse.SUPPRESS)  # the ceiling's process
    parsed = parser.parse_args()
    if parsed.trivial:
        asyncio.run(trivial_process(parsed.trivial))
    elif parsed.agents_for:
        asyncio.run(agents_process(parsed))
    else:
        asyncio.run(main(parsed))
