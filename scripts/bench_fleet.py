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
import random
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from protocol.capacity import Capacity, GpuInfo
from protocol.closing import Close, retry_after
from protocol.messages import PROTOCOL_VERSION, ComfyUIInfo, Hello, JobDone, Ready, dump_message

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "bench"}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Arrivals:
    """When each workflow's job reached an agent, awaitable by workflow id."""

    def __init__(self) -> None:
        self._at: dict[str, asyncio.Future[float]] = {}

    def _future(self, wf_id: str) -> asyncio.Future[float]:
        return self._at.setdefault(wf_id, asyncio.get_running_loop().create_future())

    def arrived(self, wf_id: str, at: float | None = None) -> None:
        # A job can arrive twice: one finished as the control plane was killed runs again
        # after the restart. The first arrival is the one measured.
        future = self._future(wf_id)
        if not future.done():
            # perf_counter is CLOCK_MONOTONIC, one clock for every process on the machine.
            future.set_result(time.perf_counter() if at is None else at)

    async def wait(self, wf_id: str) -> float:
        return await self._future(wf_id)


@dataclass
class StormStats:
    """What the agents met while (re)connecting."""

    busy: int = 0  # closes with ``busy`` (told when to come back)
    http_5xx: int = 0
    dropped_silent: int = 0  # closed by the watchdog


class FakeAgent:
    """One simulated runner agent: hello, ready, capacity every heartbeat, jobs done at once."""

    def __init__(self, url: str, token: str, index: int, arrivals: Arrivals, stats: StormStats) -> None:
        self.url, self.token, self.index, self.arrivals, self.stats = url, token, index, arrivals, stats
        self.capacity = Capacity(
            gpu_source="nvml",
            gpus=[GpuInfo(index=0, name="Simulated GPU", memory_total_bytes=24 << 30, utilization_pct=0.0)],
        )
        self.welcomed = asyncio.Event()
        self.ws: ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """Until welcomed; an agent that failed to connect raises its error here."""
        assert self.task is not None
        welcomed = asyncio.ensure_future(self.welcomed.wait())
        await asyncio.wait({welcomed, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not self.welcomed.is_set():
            welcomed.cancel()
            self.task.result()  # raises what went wrong
            raise RuntimeError(f"agent {self.index} closed before its welcome")

    async def run(self, heartbeat_s: float) -> None:
        """Connected until cancelled: after a drop, back again as a real agent comes back (a
        jittered pause, or the time a busy control plane asked for)."""
        while True:
            pause_s = await self._session(heartbeat_s)
            await asyncio.sleep(pause_s * (1 + 0.2 * random.random()))  # the agent's own backoff

    async def _session(self, heartbeat_s: float) -> float:
        """One connection; how long to pause before the next."""
        try:
            async with connect(
                self.url, additional_headers={"Authorization": f"Bearer {self.token}"}, max_size=None
            ) as ws:
                self.ws = ws
                hello = Hello(
                    agent_version="bench",
                    protocol_version=PROTOCOL_VERSION,
                    capacity=self.capacity,
                    comfyui=ComfyUIInfo(url="http://sim", node_classes=["EmptyImage", "SaveImage"]),
                )
                await ws.send(dump_message(hello))
                json.loads(await ws.recv())  # welcome
                await ws.send(dump_message(Ready(free_slots=1)))
                self.welcomed.set()
                beat = asyncio.create_task(self._heartbeat(ws, heartbeat_s))
                try:
                    await self._jobs(ws)
                finally:
                    beat.cancel()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == Close.BUSY:
                self.stats.busy += 1
                return retry_after(exc.rcvd.reason) or 1.0
        except InvalidStatus as exc:
            if exc.response.status_code >= 500:
                self.stats.http_5xx += 1
        except (OSError, WebSocketException):
            pass  # not listening (yet), or gone in the middle of the handshake: try again
        if self.ws is not None and self.ws.close_code == Close.SILENT:
            self.stats.dropped_silent += 1
        self.ws = None
        return 0.5

    async def _jobs(self, ws: ClientConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "job":
                self.arrivals.arrived(msg["workflow_id"])
                done = JobDone(workflow_id=msg["workflow_id"], attempt=msg["attempt"])
                await ws.send(dump_message(done))
                await ws.send(dump_message(Ready(free_slots=1)))

    async def _heartbeat(self, ws: ClientConnection, heartbeat_s: float) -> None:
        update = json.dumps({"type": "capacity", "capacity": self.capacity.model_dump()})
        while True:
            await asyncio.sleep(heartbeat_s)  # the agent's own heartbeat period
            await ws.send(update)


# -- the processes that hold the simulated agents ------------------------------------------


class ReportedArrivals(Arrivals):
    """In a holder process: a job's arrival goes to the benchmark on stdout."""

    def arrived(self, wf_id: str, at: float | None = None) -> None:
        say({"arrived": wf_id, "at": time.perf_counter()})


def say(message: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def hold(ws_url: str, heartbeat_s: float) -> None:
    """A holder process: runs the agents it is given, answers the benchmark's commands (one
    JSON object per line on stdin, one answer per line on stdout)."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader(limit=1 << 26)  # an ``add`` line carries thousands of tokens
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    agents: list[FakeAgent] = []
    arrivals, stats = ReportedArrivals(), StormStats()
    while line := await commands.readline():
        command = json.loads(line)
        if "add" in command:
            fresh = [
                FakeAgent(ws_url, t, len(agents) + i, arrivals, stats) for i, t in enumerate(command["add"])
            ]
            for agent in fresh:
                agent.task = asyncio.create_task(agent.run(heartbeat_s))
            await asyncio.gather(*(a.ready() for a in fresh))
            agents.extend(fresh)
            say({"ready": len(fresh)})
        elif "forget_welcomes" in command:
            for agent in agents:
                agent.welcomed = asyncio.Event()
            say({"ok": True})
        elif "welcomed" in command:
            waits = [asyncio.ensure_future(a.welcomed.wait()) for a in agents]
            _, missing = await asyncio.wait(waits, timeout=float(command["welcomed"]))
            for pending in missing:
                pending.cancel()
            stuck = [a for a in agents if not a.welcomed.is_set()]
            if stuck:  # what the ones left out are doing, for whoever reads the log
                states = Counter("socket open" if a.ws is not None else "no socket" for a in stuck)
                print(f"holder {os.getpid()}: not welcomed: {dict(states)}", file=sys.stderr, flush=True)
            say({"welcomed": time.perf_counter(), "missing": len(missing)})
        elif "stats" in command:
            say({"busy": stats.busy, "http_5xx": stats.http_5xx, "dropped_silent": stats.dropped_silent})


class Holders:
    """The benchmark's side of the holder processes: agents spread evenly over them."""

    def __init__(self, count: int, ws_url: str, heartbeat_s: float, arrivals: Arrivals) -> None:
        self.count, self.ws_url, self.heartbeat_s, self.arrivals = count, ws_url, heartbeat_s, arrivals
        self.procs: list[asyncio.subprocess.Process] = []
        self.answers: list[asyncio.Queue[dict[str, object]]] = []
        self.readers: list[asyncio.Task[None]] = []
        self.size = 0

    async def start(self) -> None:
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--hold",
                self.ws_url,
                "--heartbeat-s",
                str(self.heartbeat_s),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                preexec_fn=raise_fd_limit,
            )
            answers: asyncio.Queue[dict[str, object]] = asyncio.Queue()
            self.procs.append(proc)
            self.answers.append(answers)
            self.readers.append(asyncio.create_task(self._read(proc, answers)))

    async def _read(
        self, proc: asyncio.subprocess.Process, answers: asyncio.Queue[dict[str, object]]
    ) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            message = json.loads(line)
            if "arrived" in message:
                self.arrivals.arrived(str(message["arrived"]), float(message["at"]))
            else:
                answers.put_nowait(message)

    async def _all(self, command: list[dict[str, object]]) -> list[dict[str, object]]:
        for proc, one in zip(self.procs, command, strict=True):
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(one) + "\n").encode())
        return list(await asyncio.gather(*(answers.get() for answers in self.answers)))

    async def add(self, tokens: list[str]) -> None:
        await self._all([{"add": tokens[i :: self.count]} for i in range(self.count)])
        self.size += len(tokens)

    async def forget_welcomes(self) -> None:
        await self._all([{"forget_welcomes": True}] * self.count)

    async def all_welcomed(self, timeout_s: float) -> tuple[float, int]:
        """When the last agent was welcomed (again), and how many were not within the time."""
        answers = await self._all([{"welcomed": timeout_s}] * self.count)
        return max(float(str(a["welcomed"])) for a in answers), sum(int(str(a["missing"])) for a in answers)

    async def stats(self) -> StormStats:
        found = await self._all([{"stats": True}] * self.count)
        return StormStats(
            *(sum(int(str(a[k])) for a in found) for k in ("busy", "http_5xx", "dropped_silent"))
        )

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
        await asyncio.gather(*(p.wait() for p in self.procs))
        for reader in self.readers:
            reader.cancel()


async def create_runners(
    http: aiohttp.ClientSession,
    base: str,
    headers: dict[str, str],
    n: int,
    start: int,
    tags: tuple[str, ...] = ("bench",),
) -> list[str]:
    gate = asyncio.Semaphore(20)
    body = {"tags": list(tags)}

    async def one(i: int) -> str:
        runner = {"name": f"{tags[0]}-{i}", **body}
        async with gate, http.post(f"{base}/v1/runner", json=runner, headers=headers) as resp:
            return str((await resp.json())["token"])

    return list(await asyncio.gather(*(one(i) for i in range(start, start + n))))


async def park(http: aiohttp.ClientSession, base: str, headers: dict[str, str], n: int) -> None:
    """``n`` workflows that wait for ever: tagged for a runner that exists and never connects
    (the simulated agents are tagged ``bench`` and cannot take them)."""
    await create_runners(http, base, headers, 1, 0, tags=("parked",))
    gate = asyncio.Semaphore(32)
    started = time.perf_counter()

    async def one() -> None:
        form = aiohttp.FormData()
        form.add_field("workflow_json", json.dumps(TRIVIAL), filename="wf.json")
        form.add_field("tags", "parked")
        async with gate, http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
            assert resp.status == 201, await resp.text()

    await asyncio.gather(*(one() for _ in range(n)))
    took_s = time.perf_counter() - started
    print(f"{n} workflows waiting (submitted in {took_s:.1f} s, {n / took_s:.0f}/s)", flush=True)


async def start_server(env: dict[str, str]) -> tuple[asyncio.subprocess.Process, asyncio.Task[bytes]]:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyfleet",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=raise_fd_limit,
    )
    assert server.stderr is not None
    while b"listening on" not in await server.stderr.readline():
        pass
    drain = asyncio.create_task(server.stderr.read())  # keep its log pipe from filling up
    return server, drain


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
    parser.add_argument("--hold", metavar="WS_URL", help=argparse.SUPPRESS)  # a holder process
    args = parser.parse_args()
    if args.hold:
        asyncio.run(hold(args.hold, args.heartbeat_s))
    elif args.replicas:
        import fleet_replicas  # scripts/, beside this file

        fleet_replicas.main(args.replicas, args.agents, args.workflows, args.heartbeat_s, args.processes)
    else:
        sizes = [int(n) for n in args.sizes.split(",")]
        asyncio.run(
            main(sizes, args.heartbeat_s, args.jobs, args.window_s, args.storm, args.waiting, args.processes)
        )
