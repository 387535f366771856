"""The hot path's statements, built once, and the writes of an agent's reports made of them.

Building a SQLAlchemy statement (coercing every clause, then computing its cache key) costs
several times what SQLite takes to run it: a SELECT of a few columns by primary key took
0.34 ms built per call and 0.045 ms built once with bound parameters. The statements that
run once or more per workflow are therefore module constants, executed with a dict of
parameters; an UPDATE without ``.values()`` sets the columns its parameters name (compiled
once per set of names, then cached by SQLAlchemy).

Names of bound parameters start with ``b_`` so they never collide with a column that an
UPDATE's parameters set.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlmodel import Session, col
from sqlmodel import select as select_model

from control_plane.db.rows import STATE_COLUMNS, WorkflowState
from control_plane.db.tables import (
    EVENTS,
    OUTPUTS,
    RUNNERS,
    TASKS,
    WORKFLOWS,
    Account,
    ApiToken,
    Output,
    Runner,
    new_id,
    utcnow,
)
from control_plane.model.lifecycle import (
    OPEN_TASK,
    TERMINAL,
    TaskStatus,
    WorkflowStatus,
    holds_current,
    is_terminal,
    moves_back,
)
from control_plane.model.params import Resolved, WorkflowParams

_w, _t, _o = WORKFLOWS.c, TASKS.c, OUTPUTS.c

STATE = select(*(_w[name] for name in STATE_COLUMNS)).where(_w.id == bindparam("b_id"))
STATE_LOCKED = STATE.with_for_update()
UPDATE_WORKFLOW = update(WORKFLOWS).where(_w.id == bindparam("b_id"))
INSERT_WORKFLOW = insert(WORKFLOWS)
# The event log: a workflow's sequence moved on by as many events as it logs, and the events.
BUMP_EVENT_SEQ = (
    update(WORKFLOWS)
    .where(_w.id == bindparam("b_id"))
    .values(event_seq=_w.event_seq + bindparam("b_n"))
    .returning(_w.event_seq)
)
INSERT_EVENTS = insert(EVENTS)
CLAIM = (
    update(WORKFLOWS)
    .where(
        _w.id == bindparam("b_id"),
        _w.attempt == bindparam("b_attempt"),
        _w.status == WorkflowStatus.ACCEPTED,
        _w.runner_id.is_(None),
    )
    .returning(_w.workflow_json, _w.workflow_params)
)

_TASK_OF_NODE = (
    _t.workflow_id == bindparam("b_workflow_id"),
    _t.attempt == bindparam("b_attempt"),
    _t.node_id == bindparam("b_node_id"),
)
TASK_STATES = select(_t.node_id, _t.status, _t.started_at).where(
    _t.workflow_id == bindparam("b_workflow_id"), _t.attempt == bindparam("b_attempt")
)
INSERT_TASK = insert(TASKS)
UPDATE_TASK = update(TASKS).where(*_TASK_OF_NODE)
CLOSE_TASKS = update(TASKS).where(
    _t.workflow_id == bindparam("b_workflow_id"),
    _t.attempt == bindparam("b_attempt"),
    _t.status.in_(sorted(OPEN_TASK)),
)

SAME_OUTPUT = select(_o.id).where(
    _o.workflow_id == bindparam("b_workflow_id"),
    _o.attempt == bindparam("b_attempt"),
    _o.node_id == bindparam("b_node_id"),
    _o.filename == bindparam("b_filename"),
    _o.sha256 == bindparam("b_sha256"),
)
INSERT_OUTPUT = insert(OUTPUTS)
OUTPUT_BYTES = select(func.coalesce(func.sum(_o.size_bytes), 0)).where(
    _o.workflow_id == bindparam("b_workflow_id"), _o.attempt == bindparam("b_attempt")
)

UPDATE_RUNNER = update(RUNNERS).where(RUNNERS.c.id == bindparam("b_id"))
HELD_BY_RUNNER = select(_w.id, _w.attempt).where(
    _w.runner_id == bindparam("b_runner_id"), _w.status.not_in(sorted(TERMINAL))
)

# Who a token is (a cold cache: a reconnecting fleet asks once per runner).
RUNNER_BY_TOKEN = select_model(Runner).where(col(Runner.token_hash) == bindparam("b_hash"))
CLIENT_TOKEN = (
    select_model(ApiToken, Account)
    .join(Account, col(Account.id) == col(ApiToken.account_id))
    .where(col(ApiToken.token_hash) == bindparam("b_hash"))
)

NodeEvent = tuple[str, str | None, str]  # node id, class type, event


def workflow_state(c: Connection, workflow_id: str, *, lock: bool = False) -> WorkflowState | None:
    row = c.execute(STATE_LOCKED if lock else STATE, {"b_id": workflow_id}).first()
    return None if row is None else WorkflowState(*row)


def fenced_state(s: Session, workflow_id: str, attempt: int, runner_id: str | None) -> WorkflowState | None:
    """The fence for a report: the few columns it needs, locked, in one SELECT; ``None``
    unless that runner holds that attempt and the workflow has not finished."""
    state = workflow_state(s.connection(), workflow_id, lock=True)
    return state if holds_current(state, attempt, runner_id) else None


def apply_report(
    s: Session, wf: WorkflowState, changes: dict[str, Any], resolved_params: dict[str, Any] | None
) -> None:
    """A fenced report's changes on the workflow, never moving its status back: set on the
    state (the caller's answer) and written with one UPDATE of the columns that change."""
    status = changes.get("status")
    if status is not None and moves_back(wf.status, status):
        changes = {k: v for k, v in changes.items() if k not in ("status", "started_at")}
    values = dict(changes, updated_at=utcnow())
    if resolved_params is not None:
        params = WorkflowParams.of(wf.workflow_params)
        params.resolved = Resolved.model_validate(resolved_params)
        values["workflow_params"] = params.stored()
    if is_terminal(values.get("status", wf.status)):
        values["deadline_at"] = None
    for key, value in values.items():
        if hasattr(wf, key):
            setattr(wf, key, value)
    s.connection().execute(UPDATE_WORKFLOW, {"b_id": wf.id, **values})


def record_node_events(s: Session, workflow_id: str, attempt: int, events: Sequence[NodeEvent]) -> None:
    """Fold ComfyUI node events, in the order they came, into the task records of their
    nodes for this attempt: one SELECT for the attempt's tasks, then one INSERT or UPDATE
    per node that the events change."""
    if not events:
        return
    c = s.connection()
    key = {"b_workflow_id": workflow_id, "b_attempt": attempt}
    existing = {row[0]: (row[1], row[2]) for row in c.execute(TASK_STATES, key)}
    now = utcnow()
    state = dict(existing)  # node id -> (status, started_at), as the events so far leave it
    changed: dict[str, dict[str, Any]] = {}
    class_types: dict[str, str | None] = {}
    for node_id, class_type, event in events:
        class_types.setdefault(node_id, class_type)
        if event == "executing":
            _end_the_running(node_id, state, changed, now)
        status, started_at = state.get(node_id, (TaskStatus.SCHEDULED, None))
        values = _task_change(event, status, started_at, now)
        changed.setdefault(node_id, {}).update(values)
        state[node_id] = (values.get("status", status), values.get("started_at", started_at))
    for node_id, values in changed.items():
        if node_id in existing:
            if values:
                c.execute(UPDATE_TASK, {**key, "b_node_id": node_id, **values})
            continue
        new_task = {
            "task_id": new_id(),
            "workflow_id": workflow_id,
            "attempt": attempt,
            "node_id": node_id,
            "class_type": class_types[node_id],
            "status": TaskStatus.SCHEDULED,
            "cached": False,
            "started_at": None,
            "ended_at": None,
            "reason": None,
            "failure_kind": None,
        }
        c.execute(INSERT_TASK, new_task | values)


def _end_the_running(
    starting: str,
    state: dict[str, tuple[str, datetime | None]],
    changed: dict[str, dict[str, Any]],
    now: datetime,
) -> None:
    """ComfyUI runs a prompt's nodes one at a time, so the node that was running when another
    starts has completed (ComfyUI says "executed" for output nodes only), whatever fails later."""
    for node_id, (status, started_at) in list(state.items()):
        if node_id != starting and status == TaskStatus.IN_PROGRESS:
            changed.setdefault(node_id, {}).update(status=TaskStatus.COMPLETED, ended_at=now)
            state[node_id] = (TaskStatus.COMPLETED, started_at)


def _task_change(event: str, status: str, started_at: datetime | None, now: datetime) -> dict[str, Any]:
    """What one node event changes on its task."""
    if event in ("executing", "progress"):
        return {"status": TaskStatus.IN_PROGRESS, "started_at": now} if status == TaskStatus.SCHEDULED else {}
    if event == "cached":
        return {"status": TaskStatus.COMPLETED, "cached": True, "ended_at": now}
    if event == "executed":
        return {"status": TaskStatus.COMPLETED, "ended_at": now, "started_at": started_at or now}
    if event == "error":
        return {"status": TaskStatus.FAILED, "ended_at": now}
    if event == "interrupted":
        return {"status": TaskStatus.CANCELED, "ended_at": now}
    return {}


def close_tasks(
    s: Session,
    workflow_id: str,
    attempt: int,
    status: str,
    reason: str | None = None,
    kind: str | None = None,
) -> None:
    """Close an attempt's open tasks (ComfyUI sends ``executed`` for output nodes only, so a
    node that started and heard nothing more ended with the prompt)."""
    values: dict[str, Any] = {"status": status, "ended_at": utcnow()}
    if reason is not None:
        values.update(reason=reason, failure_kind=kind)
    s.flush()  # a Core statement: what the session holds goes first
    s.connection().execute(CLOSE_TASKS, {"b_workflow_id": workflow_id, "b_attempt": attempt, **values})


def note_task(
    s: Session,
    workflow_id: str,
    attempt: int,
    node_id: str,
    reason: str,
    kind: str,
    status: str | None = None,
) -> None:
    """Say on a node's task why it did not complete (its error, and whose fault it was)."""
    values: dict[str, Any] = {"reason": reason, "failure_kind": kind}
    if status is not None:
        values.update(status=status, ended_at=utcnow())
    s.flush()  # a Core statement: what the session holds goes first
    key = {"b_workflow_id": workflow_id, "b_attempt": attempt, "b_node_id": node_id}
    s.connection().execute(UPDATE_TASK, key | values)


def same_output(s: Session, output: Output) -> Output | None:
    """The same output already recorded for the attempt (an upload or report sent again):
    looked for with one SELECT, loaded as an object only when found (seldom)."""
    found = (
        s.connection()
        .execute(
            SAME_OUTPUT,
            {
                "b_workflow_id": output.workflow_id,
                "b_attempt": output.attempt,
                "b_node_id": output.node_id,
                "b_filename": output.filename,
                "b_sha256": output.sha256,
            },
        )
        .first()
    )
    return None if found is None else s.get(Output, found[0])


def add_output(s: Session, output: Output) -> None:
    row = {column.key: getattr(output, column.key) for column in OUTPUTS.columns}
    s.connection().execute(INSERT_OUTPUT, row)


def output_bytes(s: Session, workflow_id: str, attempt: int) -> int:
    """What an attempt has uploaded so far, in all."""
    total = s.connection().execute(OUTPUT_BYTES, {"b_workflow_id": workflow_id, "b_attempt": attempt})
    return int(total.scalar_one())
