"""The chaos run: a fleet as it is deployed — the control plane, K ComfyUI simulators and K
agents, each a process of its own on 127.0.0.1 — N workflows submitted as a careful client
submits them (an Idempotency-Key each, retried until answered), and faults injected at random
meanwhile:

    agent-kill     an agent SIGKILLed, started again a moment later
    comfyui-kill   a ComfyUI SIGKILLed (its queue and history lost), started again
    agent-freeze   an agent SIGSTOPped past the control plane's runner timeout, then let go
    cp-kill        the control plane SIGKILLed once, started again on the same data; with
                   ``--replicas N`` (PostgreSQL) N control planes behind nginx, which the
                   client and the agents go through, and a random one killed each time

When every workflow is terminal it reports: submitted, terminal by status, lost (answered,
then missing or never terminal), duplicated (more than one workflow for one key), failed, the
attempts histogram, the drain time after the last fault, whether every output downloads
intact (sha256 and pixels), and how soon retries were answered once the control plane
answered again; then it submits every key once more, which must answer the same workflow.

    .venv/bin/python scripts/chaos.py --workflows 300 --hosts 4 [--postgres [--replicas 3]] [--seed 1]

Exit status 0 when nothing was lost, duplicated or failed and every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from PIL import Image

from comfyfleet import processes
from comfyfleet.admin import create_token
from comfyfleet.throwaway_nginx import NginxServer
from comfyfleet.throwaway_postgres import PgServer
from control_plane.settings import Settings

TERMINAL = ("completed", "failed", "cancelled", "invalid")
FAULTS = ("agent-kill", "comfyui-kill", "agent-freeze", "cp-kill")
# Short enough that a frozen agent is given up on, and its jobs moved, within seconds.
CP_SETTINGS = {
    "heartbeat_s": "1",
    "runner_timeout_s": "4",
    "runner_grace_s": "3",
    "retry_backoff_s": "0.5",
}
AGENT_SETTINGS = {
    "reconnect_initial_s": "0.2",
    "reconnect_max_s": "2",
    "history_poll_fast_s": "0.1",
    "comfyui_down_grace_s": "20",
    "transfer_retry_s": "300",
}
FREEZE_S = float(CP_SETTINGS["runner_timeout_s"]) + 2.0


def workflow(color: int, prefix: str) -> dict[str, Any]:
    """A new colour each: ComfyUI's cache never answers, and the output can be checked."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


@dataclass
class Submission:
    key: str
    color: int
    workflow_id: str | None = None
    tries: int = 0
    # When a try that failed was followed by an answer after the control plane came back.
    answered_at: float | None = None
    failed_tries_at: list[float] = field(default_factory=list)


@dataclass
class Host:
    name: str
    sim: processes.Part
    agent: processes.Part
    busy: bool = False  # a fault is being played on it


class Chaos:
    def __init__(self, args: argparse.Namespace, root: Path, database_url: str) -> None:
        self.args = args
        self.root = root
        self.database_url = database_url
        self.rand = random.Random(args.seed)
        self.cps: list[tuple[processes.Part, str]] = []  # each control plane, its own address
        for number in range(args.replicas):
            port = processes.free_port()
            settings = {**CP_SETTINGS, "max_attempts": str(args.max_attempts), "replica_id": f"cp{number}"}
            # One data folder: control planes share their blob storage.
            part = processes.control_plane(root / "cp", port, database_url=database_url, settings=settings)
            part = dataclasses.replace(part, log=root / "cp" / f"serve-{number}.log")
            self.cps.append((part, f"http://127.0.0.1:{port}"))
        self.nginx = (
            NginxServer([urlsplit(base).netloc for _, base in self.cps]) if args.replicas > 1 else None
        )
        self.base = self.nginx.url if self.nginx is not None else self.cps[0][1]
        self.hosts: list[Host] = []
        self.headers: dict[str, str] = {}
        self.subs = [
            Submission(key=f"chaos-{args.seed}-{n}", color=self.rand.randrange(1 << 24))
            for n in range(args.workflows)
        ]
        self.faults: collections.Counter[str] = collections.Counter()
        self.cp_back_at: list[float] = []
        self.cp_down = False
        self.cp_killed = False
        self.last_fault_at = 0.0
        self.done = asyncio.Event()
        self._freed = asyncio.Condition()  # a host's fault is over

    # -- the fleet ----------------------------------------------------------------------------

    async def start(self, http: aiohttp.ClientSession) -> None:
        cp_settings = Settings(data_dir=self.root / "cp", database_url=self.database_url).validate()
        token = await create_token(cp_settings, "chaos", "enterprise", "client", None)
        self.headers = {"Authorization": f"Bearer {token}"}
        for part, base in self.cps:
            await part.start()
            await processes.wait_until_answers(f"{base}/healthz")
        if self.nginx is not None:
            await asyncio.to_thread(self.nginx.start)
        for number in range(self.args.hosts):
            name = f"host{number}"
            async with http.post(f"{self.base}/v1/runner", json={"name": name}, headers=self.headers) as resp:
                token = (await resp.json())["token"]
            sim_port = processes.free_port()
            sim = processes.simulator(self.root / name / "comfyui", sim_port)
            sim.argv += ["--delay", f"ImageInvert={self.args.job_s}"]
            agent = processes.agent(
                self.root / name / "agent",
                self.base,
                token,
                f"http://127.0.0.1:{sim_port}",
                name=name,
                settings=AGENT_SETTINGS,
            )
            await sim.start()
            await processes.wait_until_answers(f"http://127.0.0.1:{sim_port}/system_stats")
            await agent.start()
            self.hosts.append(Host(name, sim, agent))
        await self._until_runners_online(http)

    async def _until_runners_online(self, http: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(120):
            while True:
                async with http.get(f"{self.base}/v1/runner?per_page=100", headers=self.headers) as resp:
                    runners = (await resp.json())["runners"]
                if sum(r["connected"] for r in runners) == self.args.hosts:
                    return
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for host in self.hosts:
            await host.agent.stop(5)
            await host.sim.stop(5)
        for part, _ in self.cps:
            await part.stop(10)
        if self.nginx is not None:
            await asyncio.to_thread(self.nginx.stop)

    # -- the client ---------------------------------------------------------------------------

    @property
    def submit_every_s(self) -> float:
        """Submissions are spread over the run at about the pace the fleet works them off,
        so that faults, the control plane's kill included, meet submissions in flight."""
        return self.args.job_s / self.args.hosts

    async def submit_all(self, http: aiohttp.ClientSession) -> None:
        gate = asyncio.Semaphore(self.args.concurrency)

        async def one(sub: Submission) -> None:
            async with gate:
                await self._submit(http, sub)

        tasks = []
        for sub in self.subs:
            tasks.append(asyncio.create_task(one(sub)))
            await asyncio.sleep(self.submit_every_s)  # the client's pace
        await asyncio.gather(*tasks)

    async def _submit(self, http: aiohttp.ClientSession, sub: Submission) -> str:
        """Submit until answered, as a client that must not lose or double its work does."""
        pause_s = 0.1
        while True:
            sub.tries += 1
            form = aiohttp.FormData()
            form.add_field("name", sub.key)
            form.add_field("correlation_id", sub.key)
            body = json.dumps(workflow(sub.color, sub.key))
            form.add_field("workflow_json", body, filename="w.json", content_type="application/json")
            headers = {**self.headers, "Idempotency-Key": sub.key}
            try:
                async with http.post(f"{self.base}/v1/workflow", data=form, headers=headers) as resp:
                    if resp.status == 201:
                        answer = await resp.json()
                        if sub.workflow_id is None:
                            sub.workflow_id = answer["id"]
                            sub.answered_at = time.monotonic()
                        return str(answer["id"])
                    if resp.status < 500 and resp.status != 429:
                        raise RuntimeError(f"{sub.key}: refused with {resp.status}: {await resp.text()}")
            except (aiohttp.ClientError, TimeoutError):
                pass
            sub.failed_tries_at.append(time.monotonic())
            await asyncio.sleep(pause_s)  # a client's retry pace
            pause_s = min(pause_s * 2, 1.0)

    # -- the faults ---------------------------------------------------------------------------

    async def inject(self, http: aiohttp.ClientSession) -> None:
        """Faults at random until most of the work is done: each kind at least once, in an
        order the seed decides, and the control plane's kill once, while submissions go on."""
        planned = list(FAULTS[:3])
        self.rand.shuffle(planned)
        running: set[asyncio.Task[None]] = set()
        kill_at = self.rand.uniform(0.2, 0.6) * self.submit_every_s * len(self.subs)
        running.add(asyncio.create_task(self._later(kill_at, "cp-kill", http)))
        played = 1  # the control plane's kill, planned above
        while not self.done.is_set() and (self.args.max_faults is None or played < self.args.max_faults):
            await asyncio.sleep(self.rand.uniform(0.5, 1.5) * self.args.fault_every_s)
            if self.done.is_set():
                break
            played += 1
            # Several control planes: killing one of them is one more fault to draw.
            kind = planned.pop() if planned else self.rand.choice(FAULTS if len(self.cps) > 1 else FAULTS[:3])
            task = asyncio.create_task(self._play(kind, http))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running)

    async def _later(self, delay_s: float, kind: str, http: aiohttp.ClientSession) -> None:
        await asyncio.sleep(delay_s)
        await self._play(kind, http)

    async def _play(self, kind: str, http: aiohttp.ClientSession) -> None:
        if kind == "cp-kill":
            # One control plane is killed once; one of several, as often as the dice say.
            if self.cp_down or (self.cp_killed and len(self.cps) == 1):
                return
            self.cp_killed = self.cp_down = True
            self.faults[kind] += 1
            part, base = self.rand.choice(self.cps)
            await part.kill()
            await asyncio.sleep(self.rand.uniform(0.5, 2.0))  # the outage
            await part.start()
            await processes.wait_until_answers(f"{base}/healthz")
            self.cp_back_at.append(time.monotonic())
            self.cp_down = False
            self.last_fault_at = time.monotonic()
            return
        host = await self._idle_host()
        self.faults[kind] += 1
        try:
            if kind == "agent-kill":
                await host.agent.kill()
                await asyncio.sleep(self.rand.uniform(0.2, 2.0))
                await host.agent.start()
            elif kind == "comfyui-kill":
                await host.sim.kill()
                await asyncio.sleep(self.rand.uniform(0.2, 3.0))
                await host.sim.start()
            else:
                host.agent.freeze()
                await asyncio.sleep(FREEZE_S)  # past the runner timeout: it is taken for gone
                host.agent.thaw()
        finally:
            async with self._freed:
                host.busy = False
                self._freed.notify_all()
            self.last_fault_at = time.monotonic()

    async def _idle_host(self) -> Host:
        """A host no fault is playing on (waiting for one to be let go), marked busy."""
        async with self._freed:
            await self._freed.wait_for(lambda: any(not h.busy for h in self.hosts))
            host = self.rand.choice([h for h in self.hosts if not h.busy])
            host.busy = True
            return host

    # -- the end ------------------------------------------------------------------------------

    async def _get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with asyncio.timeout(30):
            while True:
                try:
                    async with http.get(self.base + path, headers=self.headers) as resp:
                        if resp.content_type == "application/json":
                            return resp.status, await resp.json()
                        return resp.status, await resp.read()
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.2)  # the control plane is restarting

    async def watch(self, http: aiohttp.ClientSession, deadline_s: float) -> dict[str, dict[str, Any]]:
        """Every answered workflow's last state, once all are terminal (or the deadline passed);
        tells the fault loop to stop when most of the work is done."""
        latest: dict[str, dict[str, Any]] = {}
        give_up_at = time.monotonic() + deadline_s
        while time.monotonic() < give_up_at:
            pending = [
                s.workflow_id
                for s in self.subs
                if s.workflow_id and latest.get(s.workflow_id, {}).get("status") not in TERMINAL
            ]
            answered = sum(s.workflow_id is not None for s in self.subs)
            for workflow_id in pending:
                status, body = await self._get(http, f"/v1/workflow/{workflow_id}")
                latest[workflow_id] = body if status == 200 else {"status": f"http {status}"}
            terminal = sum(1 for w in latest.values() if w.get("status") in TERMINAL)
            if terminal >= 0.9 * len(self.subs):
                self.done.set()
            if (
                answered == len(self.subs)
                and terminal == len(self.subs)
                and self.done.is_set()
                and not self.cp_down
            ):
                return latest
            await asyncio.sleep(0.5)
        return latest

    async def check_outputs(
        self, http: aiohttp.ClientSession, latest: dict[str, dict[str, Any]]
    ) -> tuple[int, list[str]]:
        colors = {s.workflow_id: s.color for s in self.subs}
        checked, bad = 0, []
        for workflow_id, wf in latest.items():
            if wf.get("status") != "completed":
                continue
            _, listing = await self._get(http, f"/v1/workflow/{workflow_id}/outputs")
            outputs = listing["outputs"]
            if len(outputs) != 1:
                bad.append(f"{workflow_id}: {len(outputs)} outputs")
                continue
            status, data = await self._get(http, outputs[0]["src"])
            color = colors[workflow_id]
            want = (255 - (color >> 16 & 255), 255 - (color >> 8 & 255), 255 - (color & 255))
            pixel = Image.open(io.BytesIO(data)).convert("RGB").getpixel((4, 4)) if status == 200 else None
            # ComfyUI truncates when it turns floats back into 8 bits: off by one at most.
            near = pixel is not None and all(abs(a - b) <= 1 for a, b in zip(pixel, want, strict=True))
            if status != 200 or hashlib.sha256(data).hexdigest() != outputs[0]["sha256"] or not near:
                bad.append(f"{workflow_id}: {status}, pixel {pixel}, wanted {want}")
            checked += 1
        return checked, bad

    async def duplicates(self, http: aiohttp.ClientSession) -> int:
        by_key: collections.Counter[str] = collections.Counter()
        page = 1
        while True:
            _, body = await self._get(http, f"/v1/workflow?per_page=100&page={page}")
            by_key.update(w["name"] for w in body["workflows"])
            if page * 100 >= body["total"]:
                break
            page += 1
        return sum(n - 1 for n in by_key.values() if n > 1)

    async def replay_all(self, http: aiohttp.ClientSession) -> list[str]:
        """Every key once more: the same workflow must answer."""
        wrong = []
        for sub in self.subs:
            first = sub.workflow_id
            again = await self._submit(http, sub)
            if again != first:
                wrong.append(f"{sub.key}: {first} then {again}")
        return wrong


def keep_logs(root: Path, keep: Path) -> None:
    for log in root.rglob("*.log"):
        target = keep / log.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(log.read_bytes())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pg: PgServer | None = None
    database_url = args.database_url
    if args.postgres:
        pg = PgServer()
        await asyncio.to_thread(pg.start)
        database_url = await pg.new_database()
    with tempfile.TemporaryDirectory(prefix="comfyfleet-chaos-") as tmp:
        chaos = Chaos(args, Path(tmp), database_url)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            try:
                await chaos.start(http)
                began = time.monotonic()
                faults = asyncio.create_task(chaos.inject(http))
                submitting = asyncio.create_task(chaos.submit_all(http))
                latest = await chaos.watch(http, args.drain_timeout_s)
                await submitting
                chaos.done.set()
                await faults
                latest = await chaos.watch(http, args.drain_timeout_s)
                drained_at = time.monotonic()
                checked, bad_outputs = await chaos.check_outputs(http, latest)
                duplicated = await chaos.duplicates(http)
                wrong_replays = await chaos.replay_all(http)
            finally:
                await chaos.stop()
                if pg is not None:
                    await asyncio.to_thread(pg.stop)
                if args.keep_logs:
                    await asyncio.to_thread(keep_logs, Path(tmp), Path(args.keep_logs))
    statuses = collections.Counter(w.get("status") for w in latest.values())
    answered = [s for s in chaos.subs if s.workflow_id]
    lost = [s.key for s in answered if latest.get(s.workflow_id or "", {}).get("status") not in TERMINAL]
    lost += [s.key for s in chaos.subs if s.workflow_id is None]
    after_restart = [
        s.answered_at - back
        for s in chaos.subs
        for back in chaos.cp_back_at[:1]
        if s.answered_at is not None and any(t < back for t in s.failed_tries_at) and s.answered_at >= back
    ]
    return {
        "workflows": args.workflows,
        "hosts": args.hosts,
        "replicas": args.replicas,
        "database": "postgresql" if database_url else "sqlite",
        "seed": args.seed,
        "faults": dict(chaos.faults),
        "submitted": len(answered),
        "tries": sum(s.tries for s in chaos.subs),
        "terminal": {status: statuses.get(status, 0) for status in TERMINAL},
        "lost": len(lost),
        "lost_keys": lost[:20],
        "duplicated": duplicated,
        "failed": statuses.get("failed", 0) + statuses.get("invalid", 0),
        "failures": [
            f"{w['id']}: {w.get('failure_reason')}: {w.get('exception_message')}"
            for w in latest.values()
            if w.get("status") in ("failed", "invalid")
        ][:20],
        "attempts": dict(sorted(collections.Counter(w.get("attempt") for w in latest.values()).items())),
        "outputs_checked": checked,
        "outputs_bad": bad_outputs[:20],
        "retries_after_restart": len(after_restart),
        "slowest_retry_after_restart_s": round(max(after_restart, default=0.0), 2),
        "replays_wrong": wrong_replays[:20],
        "drain_s": round(drained_at - chaos.last_fault_at, 1),
        "run_s": round(drained_at - began, 1),
    }


def report(result: dict[str, Any]) -> str:
    faults = ", ".join(f"{n} {kind}" for kind, n in sorted(result["faults"].items())) or "none"
    terminal = ", ".join(f"{status} {n}" for status, n in result["terminal"].items())
    attempts = ", ".join(f"{k}: {v}" for k, v in result["attempts"].items())
    lines = [
        f"chaos run: {result['workflows']} workflows, {result['hosts']} hosts, {result['database']}, "
        f"{result['replicas']} control plane(s), seed {result['seed']}",
        f"faults: {faults}",
        f"submitted {result['submitted']} in {result['tries']} tries; "
        f"{result['retries_after_restart']} retried across the control plane's restart, the slowest "
        f"answered {result['slowest_retry_after_restart_s']} s after it answered again",
        f"terminal: {terminal}",
        f"lost {result['lost']}, duplicated {result['duplicated']}, failed {result['failed']}",
        f"attempts: {attempts}",
        f"outputs: {result['outputs_checked']} downloaded, {len(result['outputs_bad'])} damaged",
        f"replayed keys answering another workflow: {len(result['replays_wrong'])}",
        f"drain: {result['drain_s']} s after the last fault; run {result['run_s']} s",
    ]
    for label in ("lost_keys", "failures", "outputs_bad", "replays_wrong"):
        for item in result[label]:
            lines.append(f"  {label}: {item}")
    return "\n".join(lines)


def ok(result: dict[str, Any]) -> bool:
    return (
        result["lost"] == 0
        and result["duplicated"] == 0
        and result["failed"] == 0
        and not result["outputs_bad"]
        and not result["replays_wrong"]
        and result["outputs_checked"] == result["workflows"]
        and result["slowest_retry_after_restart_s"] <= 10.0
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", type=int, default=300)
    parser.add_argument("--hosts", type=int, default=4, help="simulator + agent pairs")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--job-s", type=float, default=0.3, help="how long each workflow takes on ComfyUI")
    parser.add_argument("--fault-every-s", type=float, default=3.0, help="mean pause between faults")
    parser.add_argument(
        "--max-faults", type=int, help="stop after this many faults (at least 4: one of each)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="submissions in flight")
    parser.add_argument("--max-attempts", type=int, default=5)
    parser.add_argument("--drain-timeout-s", type=float, default=900.0)
    parser.add_argument("--database-url", default="", help="PostgreSQL to use (default: SQLite)")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL for the run")
    parser.add_argument(
        "--replicas", type=int, default=1, help="control planes behind nginx (PostgreSQL only)"
    )
    parser.add_argument("--json", dest="json_out", help="also write the figures here")
    parser.add_argument("--keep-logs", help="copy every part's log into this folder")
    args = parser.parse_args()
    if args.replicas > 1 and not (args.postgres or args.database_url):
        parser.error("--replicas needs PostgreSQL (--postgres or --database-url)")
    result = asyncio.run(run(args))
    print(report(result), flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0 if ok(result) else 1


if __name__ == "__main__":
    sys.exit(main())
