"""The read-only queries behind the operator dashboard: a handful of short ones, each loading
only the columns the dashboard shows (never ``workflow_json`` or a runner's node-class lists),
all in one unit of work. ``account_id`` None means every account (``admin`` tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import and_, case, func
from sqlalchemy import select as wide_select  # sqlmodel's select types at most four columns
from sqlmodel import Session, col, select

from control_plane.db.store import Store
from control_plane.db.tables import Account, Runner, Task, Workflow, as_utc
from control_plane.model.lifecycle import TERMINAL, TaskStatus, WorkflowStatus

RECENT_LIMIT = 50
BUCKET_S = 300
BUCKETS = 12  # an hour of five-minute buckets
FAILED = (WorkflowStatus.FAILED, WorkflowStatus.INVALID)

# The workflow columns the dashboard shows.
_WF_FIELDS = (
    "id",
    "name",
    "status",
    "tags",
    "runner_id",
    "attempt",
    "progress",
    "queue_number",
    "created_at",
    "started_at",
    "completed_at",
    "error_node",
    "exception_type",
    "exception_message",
)


@dataclass(frozen=True)
class DashboardRows:
    runners: list[dict[str, Any]]
    inflight: list[dict[str, Any]]  # held by a runner, not finished; oldest first
    current_nodes: dict[str, str]  # workflow id -> the node it executes now
    queue: list[tuple[str, int, datetime]]  # tag index, waiting, oldest
    recent: list[dict[str, Any]]  # newest first
    bucket_edges: list[datetime]  # BUCKETS + 1 edges, the last past ``now``
    finished: list[tuple[int, int]]  # per bucket: completed, failed (failed + invalid)


def _only(column: Any, account_id: str | None) -> list[Any]:
    return [column == account_id] if account_id is not None else []


async def dashboard_rows(store: Store, account_id: str | None, now: datetime) -> DashboardRows:
    return await store.run(lambda s: _rows(s, account_id, now))


def _rows(s: Session, account_id: str | None, now: datetime) -> DashboardRows:
    inflight = _workflows(
        s,
        *_only(Workflow.account_id, account_id),
        col(Workflow.runner_id).is_not(None),
        col(Workflow.status).not_in(TERMINAL),
        order=col(Workflow.created_at),
    )
    edges, finished = _throughput(s, account_id, now)
    return DashboardRows(
        runners=_runners(s, account_id),
        inflight=inflight,
        current_nodes=_current_nodes(s, inflight),
        queue=_queue(s, account_id),
        recent=_workflows(
            s,
            *_only(Workflow.account_id, account_id),
            order=col(Workflow.created_at).desc(),
            limit=RECENT_LIMIT,
        ),
        bucket_edges=edges,
        finished=finished,
    )


def _runners(s: Session, account_id: str | None) -> list[dict[str, Any]]:
    rows = s.connection().execute(
        wide_select(
            col(Runner.id),
            col(Runner.name),
            col(Runner.tags),
            col(Runner.status),
            col(Runner.last_seen_at),
            col(Runner.capacity),
            col(Account.name),
            col(Runner.lease_expires_at),
        )
        .join(Account, col(Account.id) == col(Runner.account_id))
        .where(*_only(Runner.account_id, account_id))
    )
    keys = ("id", "name", "tags", "status", "last_seen_at", "capacity", "account", "lease_expires_at")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _workflows(s: Session, *conds: Any, order: Any, limit: int | None = None) -> list[dict[str, Any]]:
    query = wide_select(*(getattr(Workflow, f) for f in _WF_FIELDS)).where(*conds).order_by(order)
    if limit is not None:
        query = query.limit(limit)
    return [dict(zip(_WF_FIELDS, row, strict=True)) for row in s.connection().execute(query)]


def _current_nodes(s: Session, inflight: list[dict[str, Any]]) -> dict[str, str]:
    """The node each running workflow is executing now (class_type, else node id)."""
    attempts = {wf["id"]: wf["attempt"] for wf in inflight if wf["status"] == WorkflowStatus.RUNNING}
    if not attempts:
        return {}
    rows = s.connection().execute(
        wide_select(
            col(Task.workflow_id),
            col(Task.attempt),
            col(Task.node_id),
            col(Task.class_type),
            col(Task.started_at),
        ).where(col(Task.workflow_id).in_(list(attempts)), col(Task.status) == TaskStatus.IN_PROGRESS)
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


def _queue(s: Session, account_id: str | None) -> list[tuple[str, int, datetime]]:
    """Waiting workflows (accepted, no runner yet) counted per tag set."""
    rows = s.exec(
        select(col(Workflow.tag_index), func.count(), func.min(col(Workflow.created_at)))
        .where(
            *_only(Workflow.account_id, account_id),
            Workflow.status == WorkflowStatus.ACCEPTED,
            col(Workflow.runner_id).is_(None),
        )
        .group_by(Workflow.tag_index)
    )
    return [(tag_index, int(count), oldest) for tag_index, count, oldest in rows]


def _throughput(
    s: Session, account_id: str | None, now: datetime
) -> tuple[list[datetime], list[tuple[int, int]]]:
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
        sums.append(
            func.sum(case((and_(inside, col(Workflow.status) == WorkflowStatus.COMPLETED), 1), else_=0))
        )
        sums.append(func.sum(case((and_(inside, col(Workflow.status).in_(FAILED)), 1), else_=0)))
    only = _only(Workflow.account_id, account_id)
    row = (s.exec(select(*sums).where(*only, done_at >= start, done_at < end))).one()
    counts = [int(v or 0) for v in row]
    return edges, [(counts[2 * i], counts[2 * i + 1]) for i in range(BUCKETS)]
