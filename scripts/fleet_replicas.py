"""``bench_fleet.py --replicas 1,2,3``: the same simulated agents, and the same workflows, on
1, 2, 3 control planes on one PostgreSQL behind nginx (each ``comfyfleet serve`` a process of
its own, agents and client through nginx), and how evenly the agents and the work spread.

For each count it prints how long the agents took to be welcomed (and how many a second), how
many workflows a second were dispatched to them (``--workflows`` submitted with 32 in flight,
from the first submit to the last job's arrival), and how many agents and workflows each
control plane took (from the runners' leases). One control plane is the baseline of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from fleet_agents import (  # scripts/, beside this file
    TRIVIAL,
    Arrivals,
    Holders,
    create_runners,
    free_port,
    raise_fd_limit,
    start_server,
)

from comfyfleet.admin import create_token
from comfyfleet.throwaway_nginx import NginxServer
from comfyfleet.throwaway_postgres import PgServer
from control_plane.settings import Settings

IN_FLIGHT = 32


async def _spread(url: str, query: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return sorted(int(count) for _, count in await conn.fetch(query))
    finally:
        await conn.close()


async def _submit_all(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], n: int, arrivals: Arrivals
) -> float:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(number: int) -> float:
        # As a careful client submits: with a key, sent again when the connection went (nginx
        # closes a keepalive connection after so many requests, maybe as one is written).
        keyed = {**headers, "Idempotency-Key": f"bench-{number}"}
        async with gate:
            for _ in range(5):
                form = aiohttp.FormData()
                form.add_field("workflow_json", json.dumps(TRIVIAL), filename="wf.json")
                try:
                    async with http.post(f"{base}/v1/workflow", data=form, headers=keyed) as resp:
                        assert resp.status == 201, await resp.text()
                        wf_id = (await resp.json())["id"]
                    break
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    continue
            else:
                raise RuntimeError(f"workflow {number} could not be submitted")
            return await arrivals.wait(wf_id)

    started = time.perf_counter()
    last = max(await asyncio.gather(*(one(number) for number in range(n))))
    return n / (last - started)


async def one_count(
    pg: PgServer, replicas: int, agents: int, workflows: int, heartbeat_s: float, holder_procs: int
) -> str:
    url = await pg.new_database()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        token = await create_token(
            Settings(data_dir=data, database_url=url), "bench", "enterprise", "client", None
        )
        headers = {"Authorization": f"Bearer {token}"}
        servers = []
        nginx: NginxServer | None = None
        holders: Holders | None = None
        try:
            ports = [free_port() for _ in range(replicas)]
            for number, port in enumerate(ports):
                env = {
                    **os.environ,
                    "COMFYFLEET_PORT": str(port),
                    "COMFYFLEET_DATA_DIR": str(data),  # replicas share their blob storage
                    "COMFYFLEET_DATABASE_URL": url,
                    "COMFYFLEET_REPLICA_ID": f"cp{number}",
                    "COMFYFLEET_HEARTBEAT_S": str(heartbeat_s),
                    "COMFYFLEET_RUNNER_TIMEOUT_S": str(heartbeat_s * 5),
                }
                servers.append(await start_server(env))
            nginx = NginxServer([f"127.0.0.1:{port}" for port in ports])
            await asyncio.to_thread(nginx.start)
            base = nginx.url
            arrivals = Arrivals()
            holders = Holders(
                holder_procs, f"ws://{urlsplit(base).netloc}/v1/agent/connect", heartbeat_s, arrivals
            )
            await holders.start()
            async with aiohttp.ClientSession() as http:
                tokens = await create_runners(http, base, headers, agents, 0)
                started = time.perf_counter()
                await holders.add(tokens)
                connect_s = time.perf_counter() - started
                per_s = await _submit_all(http, base, headers, workflows, arrivals)
            held = await _spread(url, "SELECT replica_id, count(*) FROM runner GROUP BY 1")
            work = await _spread(
                url,
                "SELECT r.replica_id, count(*) FROM workflow w JOIN runner r ON r.id = w.runner_id"
                " GROUP BY 1",
            )
        finally:
            if holders is not None:
                await holders.stop()
            for server, drain in servers:
                server.terminate()
                await server.wait()
                drain.cancel()
            if nginx is not None:
                await asyncio.to_thread(nginx.stop)
    return (
        f"| {replicas} | {agents} | {connect_s:.2f} | {agents / connect_s:.0f} | {workflows} | {per_s:.0f} "
        f"| {_range(held)} | {_range(work)} |"
    )


def _range(counts: Sequence[int]) -> str:
    return f"{counts[0]}–{counts[-1]}" if counts else "—"


async def run(
    replica_counts: list[int], agents: int, workflows: int, heartbeat_s: float, holder_procs: int
) -> None:
    raise_fd_limit()  # nginx, started from here, holds two sockets per agent
    pg = PgServer()
    await asyncio.to_thread(pg.start)
    try:
        print(
            "| control planes | agents | connect s | agents/s | workflows | dispatched/s "
            "| agents per control plane | workflows per control plane |"
        )
        print("|---:|---:|---:|---:|---:|---:|---|---|", flush=True)
        for replicas in replica_counts:
            print(await one_count(pg, replicas, agents, workflows, heartbeat_s, holder_procs), flush=True)
    finally:
        await asyncio.to_thread(pg.stop)


def main(replicas: str, agents: int, workflows: int, heartbeat_s: float, holder_procs: int) -> None:
    counts = [int(n) for n in replicas.split(",")]
    if any(n < 1 for n in counts):
        sys.exit("--replicas takes counts of control planes, each at least 1")
    asyncio.run(run(counts, agents, workflows, heartbeat_s, holder_procs))
