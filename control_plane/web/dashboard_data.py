"""The operator dashboard's snapshot of one account's fleet, or of every account's for the
platform's own operators (``admin`` tokens); its shape: ``dashboard.py``.

Built from the registry (who is connected, live capacity) and the rows of
``db/dashboard_queries.py``. Nothing here writes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from control_plane.db.dashboard_queries import BUCKET_S, DashboardRows, dashboard_rows
from control_plane.db.tables import Account, as_utc, lease_live, utcnow
from control_plane.fleet.events import iso
from control_plane.fleet.registry import AgentConnection, tags_match
from control_plane.model.lifecycle import TERMINAL, WorkflowStatus
from control_plane.services import Services
from protocol.capacity import Capacity

log = logging.getLogger(__name__)

ERROR_CHARS = 1000


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


async def build_snapshot(svc: Services, view: View, now: datetime | None = None) -> dict[str, Any]:
    """Everything the dashboard shows for ``view``; only those runners and workflows."""
    now = as_utc(now or utcnow())
    rows = await dashboard_rows(svc.store, view.account_id, now)
    inflight = rows.inflight
    throughput = _throughput_view(rows)
    names = {r["id"]: r["name"] for r in rows.runners}
    conns = {c.runner_id: c for c in svc.registry.all() if c.runner_id in names}
    jobs_by_runner: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for wf in inflight:
        jobs_by_runner[wf["runner_id"]].append(_job_view(wf, rows.current_nodes.get(wf["id"]), now))
    runners = [_runner_view(r, conns.get(r["id"]), jobs_by_runner.get(r["id"], [])) for r in rows.runners]
    runners.sort(key=lambda r: (not r["online"], r["name"].lower(), r["id"]))
    queue = _queue_view(rows.queue, list(conns.values()), now)
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
            "completed_last_hour": throughput[WorkflowStatus.COMPLETED],
            "failed_last_hour": throughput[WorkflowStatus.FAILED],
        },
        "runners": runners,
        "queue": queue,
        "recent": [_recent_view(wf, names, now) for wf in rows.recent],
        "throughput": throughput,
    }


def _throughput_view(rows: DashboardRows) -> dict[str, Any]:
    """Counts per bucket, keyed by how the workflows ended ("failed" counts invalid too)."""
    done_key, failed_key = WorkflowStatus.COMPLETED.value, WorkflowStatus.FAILED.value
    edges = rows.bucket_edges
    buckets = [
        {"start": iso(edges[i]), done_key: done, failed_key: failed}
        for i, (done, failed) in enumerate(rows.finished)
    ]
    return {
        "bucket_s": BUCKET_S,
        "start": iso(edges[0]),
        "end": iso(edges[-1]),
        "buckets": buckets,
        done_key: sum(done for done, _ in rows.finished),
        failed_key: sum(failed for _, failed in rows.finished),
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
    # Connected here, or to another control plane on the database (whose lease is live).
    live = conn is not None or lease_live(row["lease_expires_at"])
    capacity = _capacity(conn.capacity.model_dump() if conn is not None else row["capacity"])
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
        "queue_number": wf["queue_number"] if wf["status"] == WorkflowStatus.QUEUED else None,
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
