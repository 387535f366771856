"""Simulated agents for the fleet benchmarks: light websocket clients speaking the agent
protocol, each finishing any job it is given at once, held by child processes of their own
(``Holders``) so that tens of thousands fit; and the runners and control plane they need.
Used by ``bench_fleet.py`` and ``fleet_replicas.py``; run as ``--hold WS_URL`` it is such a
child.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hold", metavar="WS_URL", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    args = parser.parse_args()
    asyncio.run(hold(args.hold, args.heartbeat_s))
