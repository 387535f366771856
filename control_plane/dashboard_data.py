"""The operator dashboard's snapshot of one account's fleet, or of every account's for the
platform's own operators (``admin`` tokens); its shape: ``dashboard.py``.

Built from the registry (who is connected, live capacity) and the store, with a handful of
short read-only queries that load only the columns they show (never ``workflow_json`` or a
runner's node-class lists). Nothing here writes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, case, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from control_plane.registry import AgentConnection, tags_match
from control_plane.services import Services
from control_plane.store import TERMINAL
from control_plane.tables import Account, Runner, Task, Workflow, as_utc, utcnow
from control_plane.views import iso
from protocol.capacity import Capacity

log = logging.getLogger(__name__)

RECENT_LIMIT = 50
BUCKET_S = 300
BUCKETS = 12  # an hour of five-minute buckets
FAILED = ("failed", "invalid")
ERROR_CHARS = 1000

# The workflow columns the dashboard shows.
_WF_COLUMNS = (
    Workflow.id,
    Workflow.name,
    Workflow.status,
    Workflow.tags,
    Workflow.runner_id,
    Workflow.attempt,
    Workflow.progress,
    Workflow.queue_number,
    Workflow.created_at,
    Workflow.started_at,
    Workflow.completed_at,
    Workflow.error_node,
    Workflow.exception_type,
    Workflow.exception_message,
)


@dataclass(frozen=True)
class View:
    """Whose fleet a snapshot shows: one account, or every account (``account_id`` None)."""

    account_id: str | None
    name: str

    @classmethod
    def of(cls, account: Account, every_account: bool) -> View:
        return cls(None, "every account") if every_account else cls(account.id, account.name)

    @property
    def key(self) -> str:
        return self.account_id or "*"

    def only(self, column: Any) -> list[Any]:
        return [column == self.account_id] if self.account_id is not None else []


async def build_snapshot(svc: Services, view: View, now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows for ``view``; only those runners and workflows."""
    now = as_utc(now or utcnow())
    async with svc.store.session() as s:
        runner_rows = await _runners(s, view)
        inflight = await _workflows(
            s,
            *view.only(Workflow.account_id),
            col(Workflow.runner_id).is_not(None),
            col(Workflow.status).not_in(TERMINAL),
            order=col(Workflow.created_at),
        )
        current_nodes = await _current_nodes(s, inflight)
        queue_rows = await _queue(s, view)
        recent = await _workflows(
            s, *view.only(Workflow.account_id), order=col(Workflow.created_at).desc(), limit=RECENT_LIMIT
        )
        throughput = await _throughput(s, view, now)

    names = {r["id"]: r["name"] for r in runner_rows}
    conns = {c.runner_id: c for c in svc.registry.all() if c.runner_id in names}
    jobs_by_runner: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for wf in inflight:
        jobs_by_runner[wf["runner_id"]].append(_job_view(wf, current_nodes.get(wf["id"]), now))
    runners = [_runner_view(r, conns.get(r["id"]), jobs_by_runner.get(r["id"], [])) for r in runner_rows]
    runners.sort(key=lambda r: (not r["online"], r["name"].lower(), r["id"]))
    queue = _queue_view(queue_rows, list(conns.values()), now)
    online = [r for r in runners if r["online"]]
    return {
        "generated_at": iso(now),
        "account": {"id": view.account_id, "name": view.name},
        "summary": {
            "runners": len(runners),
            "runners_online": len(online),
            "gpus_online": sum(len(r["gpus"]) for r in online),
            "jobs_running": len(inflight),
            "waiting": queue["total"],
            "completed_last_hour": throughput["completed"],
            "failed_last_hour": throughput["failed"],
        },
        "runners": runners,
        "queue": queue,
        "recent": [_recent_view(wf, names, now) for wf in recent],
        "throughput": throughput,
    }


# -- queries ----------------------------------------------------------------------------


async def _runners(s: AsyncSession, view: View) -> list[dict[str, Any]]:
    rows = await s.exec(
        select(
            Runner.id,
            Runner.name,
            Runner.tags,
            Runner.status,
            Runner.last_seen_at,
            Runner.capacity,
            Account.name,
        )
        .join(Account, col(Account.id) == col(Runner.account_id))
        .where(*view.only(Runner.account_id))
    )
    keys = ("id", "name", "tags", "status", "last_seen_at", "capacity", "account")
    return [dict(zip(keys, row, strict=True)) for row in rows]


async def _workflows(
    s: AsyncSession, *conds: Any, order: Any, limit: int | None = None
) -> list[dict[str, Any]]:
    query = select(*_WF_COLUMNS).where(*conds).order_by(order)
    if limit is not None:
        query = query.limit(limit)
    keys = [c.key for c in _WF_COLUMNS]
    return [dict(zip(keys, row, strict=True)) for row in await s.exec(query)]


async def _current_nodes(s: AsyncSession, inflight: list[dict[str, Any]]) -> dict[str, str]:
    """The node each running workflow is executing now (class_type, else node id)."""
    attempts = {wf["id"]: wf["attempt"] for wf in inflight if wf["status"] == "running"}
    if not attempts:
        return {}
    rows = await s.exec(
        select(Task.workflow_id, Task.attempt, Task.node_id, Task.class_type, Task.started_at).where(
            col(Task.workflow_id).in_(list(attempts)), Task.status == "IN_PROGRESS"
        )
    )
    found: dict[str, tuple[datetime, str]] = {}
    for workflow_id, attempt, node_id, class_type, started_at in rows:
        if attempts.get(workflow_id) != attempt:
            continue
        started = as_utc(started_at) if started_at is not None else datetime.min.replace(tzinfo=UTC)
        label = class_type or f"node {node_id}"
        if workflow_id not in found or started >= found[workflow_id][0]:
            found[workflow_id] = (started, label)
    return {wf_id: label for wf_id, (_, label) in found.items()}


async def _queue(s: AsyncSession, view: View) -> list[tuple[str, int, datetime]]:
    """Waiting workflows (accepted, no runner yet) counted per tag set."""
    rows = await s.exec(
        select(Workflow.tag_index, func.count(), func.min(Workflow.created_at))
        .where(
            *view.only(Workflow.account_id),
            Workflow.status == "accepted",
            col(Workflow.runner_id).is_(None),
        )
        .group_by(Workflow.tag_index)
    )
    return [(tag_index, int(count), oldest) for tag_index, count, oldest in rows]


async def _throughput(s: AsyncSession, view: View, now: datetime) -> dict[str, Any]:
    """Workflows that finished completed or failed (failed + invalid) per five-minute
    bucket; the buckets are aligned to the clock and the last one holds ``now``."""
    epoch = now.timestamp()
    end = datetime.fromtimestamp((epoch // BUCKET_S + 1) * BUCKET_S, UTC)
    start = end - timedelta(seconds=BUCKET_S * BUCKETS)
    edges = [start + timedelta(seconds=BUCKET_S * i) for i in range(BUCKETS + 1)]
    done_at = col(Workflow.completed_at)
    sums = []
    for lo, hi in pairwise(edges):
        inside = and_(done_at >= lo, done_at < hi)
        sums.append(func.sum(case((and_(inside, Workflow.status == "completed"), 1), else_=0)))
        sums.append(func.sum(case((and_(inside, col(Workflow.status).in_(FAILED)), 1), else_=0)))
    row = (
        await s.exec(select(*sums).where(*view.only(Workflow.account_id), done_at >= start, done_at < end))
    ).one()
    counts = [int(v or 0) for v in row]
    buckets = [
        {"start": iso(edges[i]), "completed": counts[2 * i], "failed": counts[2 * i + 1]}
        for i in range(BUCKETS)
    ]
    return {
        "bucket_s": BUCKET_S,
        "start": iso(start),
        "end": iso(end),
        "buckets": buckets,
        "completed": sum(b["completed"] for b in buckets),
        "failed": sum(b["failed"] for b in buckets),
    }


# -- views ------------------------------------------------------------------------------


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (as_utc(end) - as_utc(start)).total_seconds()), 1)


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= ERROR_CHARS:
        return text
    return text[: ERROR_CHARS - 1] + "…"


def _capacity(raw: dict[str, Any] | None) -> Capacity:
    if not raw:
        return Capacity()
    try:
        return Capacity.model_validate(raw)
    except ValidationError as exc:
        log.debug("unreadable capacity %r: %s", raw, exc)
        return Capacity()


def _gpu_view(gpu: Any) -> dict[str, Any]:
    total, used, free = gpu.memory_total_bytes, gpu.memory_used_bytes, gpu.memory_free_bytes
    if used is None and total is not None and free is not None:
        used = total - free
    memory_pct = round(100.0 * used / total, 1) if total and used is not None else None
    return {
        "index": gpu.index,
        "name": gpu.name,
        "uuid": gpu.uuid,
        "utilization_pct": gpu.utilization_pct,
        "memory_used_bytes": used,
        "memory_total_bytes": total,
        "memory_pct": memory_pct,
        "temperature_c": gpu.temperature_c,
        "power_draw_w": gpu.power_draw_w,
        "power_limit_w": gpu.power_limit_w,
    }


def _runner_view(
    row: dict[str, Any], conn: AgentConnection | None, jobs: list[dict[str, Any]]
) -> dict[str, Any]:
    live = conn is not None
    capacity = _capacity(conn.capacity if conn is not None else row["capacity"])
    if conn is not None:
        last_seen: str | None = iso(datetime.fromtimestamp(conn.last_seen_at, UTC))
        connected_at: str | None = iso(datetime.fromtimestamp(conn.connected_at, UTC))
    else:
        last_seen, connected_at = iso(row["last_seen_at"]), None
    host = capacity.host
    return {
        "id": row["id"],
        "name": row["name"],
        "account": row["account"],
        "tags": list(row["tags"] or []),
        "status": row["status"],
        "online": live,
        "healthy": conn.healthy if conn is not None else None,
        "unhealthy_reason": conn.unhealthy_reason if conn is not None else None,
        "connected_at": connected_at,
        "last_seen": last_seen,
        "slots": capacity.slots if live else None,
        "free_slots": max(0, conn.free_slots) if conn is not None else None,
        "comfyui_version": (conn.comfyui.get("version") if conn is not None else None),
        "gpu_source": capacity.gpu_source,
        "driver_version": capacity.driver_version,
        "cuda_version": capacity.cuda_version,
        "gpus": [_gpu_view(g) for g in capacity.gpus],
        "host": {
            "cpu_pct": host.cpu_pct,
            "memory_total_bytes": host.memory_total_bytes,
            "memory_available_bytes": host.memory_available_bytes,
            "disk_free_bytes": host.disk_free_bytes,
        },
        "jobs": jobs,
    }


def _job_view(wf: dict[str, Any], node: str | None, now: datetime) -> dict[str, Any]:
    return {
        "id": wf["id"],
        "name": wf["name"],
        "status": wf["status"],
        "attempt": wf["attempt"],
        "progress": wf["progress"],
        "node": node,
        "queue_number": wf["queue_number"] if wf["status"] == "queued" else None,
        "created_at": iso(wf["created_at"]),
        "started_at": iso(wf["started_at"]),
        "run_s": _seconds(wf["started_at"], now),
    }


def _queue_view(
    rows: list[tuple[str, int, datetime]], conns: list[AgentConnection], now: datetime
) -> dict[str, Any]:
    groups: dict[tuple[str, ...], tuple[int, datetime]] = {}
    for tag_index, count, oldest in rows:
        # tag_index is ",a,b," in the order the tags were sent: one group per set.
        key = tuple(sorted({t for t in tag_index.split(",") if t}))
        if key in groups:
            before, seen = groups[key]
            groups[key] = (before + count, min(as_utc(seen), as_utc(oldest)))
        else:
            groups[key] = (count, as_utc(oldest))
    views = [
        {
            "tags": list(tags),
            "count": count,
            "oldest_created_at": iso(oldest),
            "oldest_age_s": _seconds(oldest, now),
            "runners_online": sum(
                1 for c in conns if c.status == "active" and tags_match(c.tags, list(tags))
            ),
        }
        for tags, (count, oldest) in groups.items()
    ]
    views.sort(key=lambda g: (g["oldest_created_at"] or "", g["tags"]))
    return {"total": sum(g["count"] for g in views), "groups": views}


def _recent_view(wf: dict[str, Any], names: dict[str, str], now: datetime) -> dict[str, Any]:
    status = wf["status"]
    created, started, completed = wf["created_at"], wf["started_at"], wf["completed_at"]
    finished = status in TERMINAL
    waited_until = started or (completed if finished else now)
    run_until = completed if finished else now
    return {
        "id": wf["id"],
        "name": wf["name"],
        "status": status,
        "tags": list(wf["tags"] or []),
        "attempt": wf["attempt"],
        "runner_id": wf["runner_id"],
        "runner_name": names.get(wf["runner_id"]) if wf["runner_id"] else None,
        "progress": wf["progress"],
        "created_at": iso(created),
        "started_at": iso(started),
        "completed_at": iso(completed),
        "queued_s": _seconds(created, waited_until),
        "run_s": _seconds(started, run_until) if started is not None else None,
        "error_node": wf["error_node"],
        "exception_type": wf["exception_type"],
        "exception_message": _clip(wf["exception_message"]),
    }
