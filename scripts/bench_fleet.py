"""How one control plane copes with many runners.

Starts `comfyfleet serve` as its own process (so its CPU time and memory can be read), then
grows a fleet of simulated agents — light websocket clients speaking the agent protocol,
each finishing any job it is given at once — through the sizes given, and at each size
prints:

- connect time: from opening the new agents' sockets to every one of them welcomed;
- heartbeat CPU: the control plane's CPU use while every agent sends a capacity update each
  heartbeat and nothing else happens, in all and per runner;
- RSS per runner: the control plane's resident memory over the empty baseline, divided by N;
- dispatch latency: from submitting a workflow to an agent holding its job (median, p99 of
  --jobs workflows submitted one after another).

With ``--waiting N``, N workflows wait throughout (tagged for a runner that never connects),
so that dispatch is measured beside a queue that long.

With ``--replicas 1,2,3`` it measures something else: agents connected and workflows
dispatched per second by that many control planes behind nginx (``fleet_replicas.py``).

With ``--storm`` it then kills the control plane and starts it again on the same data, so
that every agent reconnects at once (each honouring a ``busy`` close's time to come back, as
the real agent does), and prints how long until all are welcomed again, how often they were
told to come back later, any HTTP 5xx and any runner the watchdog dropped.

    .venv/bin/python scripts/bench_fleet.py [--sizes 10,100,500,2000] [--heartbeat-s 2] [--storm]
        [--waiting 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from fleet_agents import (  # scripts/, beside this file
    TRIVIAL,
    Arrivals,
    Holders,
    create_runners,
    free_port,
    park,
    raise_fd_limit,
    start_server,
)

STORM_LIMIT_S = 300.0


async def storm(
    holders: Holders, env: dict[str, str], heartbeat_s: float
) -> tuple[asyncio.subprocess.Process, asyncio.Task[bytes]]:
    """Start the control plane again on the same data (it was killed): every agent reconnects
    at once. Prints how long until all were welcomed again and what they met on the way."""
    before = await holders.stats()
    started = time.perf_counter()
    server, drain = await start_server(env)
    last_at, missing = await holders.all_welcomed(STORM_LIMIT_S)
    all_in_s = last_at - started
    await asyncio.sleep(heartbeat_s * 6)  # past the runner timeout: would the watchdog drop any?
    after = await holders.stats()
    if missing:
        welcomed = f"{missing} not welcomed within {STORM_LIMIT_S:g} s"
    else:
        welcomed = f"all welcomed {all_in_s:.1f} s after the restart"
    print(
        f"reconnect storm of {holders.size}: {welcomed}; "
        f"told to come back later {after.busy - before.busy} times, "
        f"{after.http_5xx - before.http_5xx} HTTP 5xx, "
        f"{after.dropped_silent - before.dropped_silent} dropped by the watchdog",
        flush=True,
    )
    return server, drain


async def main(
    sizes: list[int],
    heartbeat_s: float,
    jobs: int,
    window_s: float,
    with_storm: bool,
    waiting: int,
    processes: int,
) -> None:
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            "COMFYFLEET_PORT": str(port),
            "COMFYFLEET_DATA_DIR": str(data),
            "COMFYFLEET_HEARTBEAT_S": str(heartbeat_s),
            "COMFYFLEET_RUNNER_TIMEOUT_S": str(heartbeat_s * 5),
        }
        admin = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfyfleet",
            "admin",
            "token",
            "create",
            "--account",
            "bench",
            "--tier",
            "enterprise",
            "--data-dir",
            str(data),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        token = (await admin.communicate())[0].decode().strip().splitlines()[-1]
        server, drain = await start_server(env)
        proc = psutil.Process(server.pid)
        base = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/v1/agent/connect"
        headers = {"Authorization": f"Bearer {token}"}
        arrivals = Arrivals()
        holders = Holders(processes, ws_url, heartbeat_s, arrivals)
        await holders.start()
        print(f"heartbeat every {heartbeat_s:g} s; CPU over a {window_s:g} s window; {jobs} jobs per size")
        columns = (
            "N",
            "connect s",
            "hb CPU %",
            "CPU %/runner",
            "RSS KiB/runner",
            "dispatch p50 ms",
            "p99 ms",
        )
        widths = (6, 11, 10, 14, 16, 17, 9)
        print("".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)), flush=True)
        try:
            async with aiohttp.ClientSession() as http:
                baseline_rss = proc.memory_info().rss
                if waiting:
                    await park(http, base, headers, waiting)
                for size in sizes:
                    tokens = await create_runners(http, base, headers, size - holders.size, holders.size)
                    started = time.perf_counter()
                    await holders.add(tokens)
                    connect_s = time.perf_counter() - started

                    cpu_before = proc.cpu_times()
                    await asyncio.sleep(window_s)  # the measurement window: heartbeats only
                    cpu_after = proc.cpu_times()
                    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
                    cpu_pct = 100 * cpu_s / window_s
                    rss = proc.memory_info().rss
                    rss_per_runner = (rss - baseline_rss) / holders.size

                    latencies: list[float] = []
                    for _ in range(jobs):
                        form = aiohttp.FormData()
                        form.add_field("workflow_json", json.dumps(TRIVIAL), filename="wf.json")
                        t0 = time.perf_counter()
                        async with http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
                            wf_id = (await resp.json())["id"]
                        latencies.append(await arrivals.wait(wf_id) - t0)
                    latencies.sort()
                    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
                    p50 = statistics.median(latencies) * 1000
                    print(
                        f"{size:>6}{connect_s:>11.2f}{cpu_pct:>10.1f}{cpu_pct / size:>14.4f}"
                        f"{rss_per_runner / 1024:>16.1f}{p50:>17.1f}{p99 * 1000:>9.1f}",
                        flush=True,
                    )
                if with_storm:
                    await holders.forget_welcomes()
                    server.kill()  # a crash: nothing said to the agents
                    await server.wait()
                    drain.cancel()
                    server, drain = await storm(holders, env, heartbeat_s)
        finally:
            await holders.stop()
            server.terminate()
            await server.wait()
            drain.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,500,2000")
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--storm", action="store_true", help="then restart the control plane under the fleet")
    parser.add_argument("--waiting", type=int, default=0, help="workflows left waiting throughout")
    parser.add_argument("--processes", type=int, default=2, help="processes holding the simulated agents")
    parser.add_argument(
        "--replicas",
        help="instead: these counts of control planes on PostgreSQL behind nginx (fleet_replicas.py)",
    )
    parser.add_argument("--agents", type=int, default=1000, help="with --replicas: agents connected")
    parser.add_argument("--workflows", type=int, default=2000, help="with --replicas: workflows dispatched")
    args = parser.parse_args()
    if args.replicas:
        import fleet_replicas  # scripts/, beside this file

        fleet_replicas.main(args.replicas, args.agents, args.workflows, args.heartbeat_s, args.processes)
    else:
        sizes = [int(n) for n in args.sizes.split(",")]
        asyncio.run(
            main(sizes, args.heartbeat_s, args.jobs, args.window_s, args.storm, args.waiting, args.processes)
        )
