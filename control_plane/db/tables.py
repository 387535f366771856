"""Database tables (SQLModel). REST schemas live in ``views.py``; protocol messages in
``protocol.messages``: the three families are kept apart."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Table
from sqlmodel import Field, SQLModel

from control_plane.model.lifecycle import DeliveryStatus, TaskStatus, WorkflowStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def lease_live(expires_at: datetime | None) -> bool:
    """Whether a runner's lease (``Runner.lease_expires_at``) still holds."""
    return expires_at is not None and as_utc(expires_at) > utcnow()


def new_id() -> str:
    return str(uuid.uuid4())


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


def _created() -> Any:
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class Account(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    name: str = Field(unique=True, index=True)
    tier: str = "free"
    # Signs the webhooks sent to the URLs workflows name themselves (``webhook_url``); made
    # and shown by ``POST /v1/webhook-secret``.
    webhook_secret: str | None = None
    created_at: datetime = _created()


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    token_hash: str = Field(unique=True, index=True)
    scope: str = "client"  # client | operator
    created_at: datetime = _created()
    expires_at: datetime | None = _ts()
    last_used_at: datetime | None = _ts()


class Runner(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    name: str
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = "active"  # active | disabled
    token_hash: str = Field(unique=True, index=True)
    created_at: datetime = _created()
    updated_at: datetime = _created()
    last_seen_at: datetime | None = _ts()
    capacity: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    comfyui: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # On a database several control planes serve: the one holding the runner's connection
    # (which connection, and until when unless renewed). Unset on SQLite.
    replica_id: str | None = None
    connection_id: str | None = None
    lease_expires_at: datetime | None = _ts()
    # What its agent said at its last hello, and the protocol version the two spoke: during
    # a rolling upgrade, which agents are still the old ones.
    agent_version: str | None = None
    protocol_version: int | None = None


class Workflow(SQLModel, table=True):
    __table_args__ = (
        Index("ix_workflow_account_created", "account_id", "created_at"),
        Index("ix_workflow_retention", "files_removed_at", "completed_at"),
    )
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    name: str
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # ",a,b," so that one tag can be filtered with LIKE on SQLite and PostgreSQL alike.
    tag_index: str = ","
    status: str = Field(default=WorkflowStatus.ACCEPTED, index=True)
    workflow_json: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # {"values": {name: str}, "files": {name: {sha256, filename, size_bytes, content_type}},
    #  and once run: "random", "timestamp_ms", "comfy_files"} — enough to reproduce the run.
    workflow_params: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    attempt: int = 1
    # The sequence number of the workflow's last event in the event log.
    event_seq: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    runner_id: str | None = Field(default=None, index=True)
    # A rerun from a node goes back to the runner whose ComfyUI cache holds the upstream nodes.
    preferred_runner_id: str | None = None
    dispatched_at: datetime | None = _ts()
    prompt_id: str | None = None
    queue_number: int | None = None
    progress: float | None = None
    correlation_id: str | None = Field(default=None, index=True)
    parent_id: str | None = Field(default=None, index=True)
    # The workflows of one sweep (POST /v1/workflow/{id}/sweep) are followed and cancelled together.
    sweep_id: str | None = Field(default=None, index=True)
    # Told when the workflow ends (completed, failed, cancelled), signed with the account's secret.
    webhook_url: str | None = None
    # Waiting workflows are dispatched highest priority first, then oldest first.
    priority: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    # When its files (inputs and outputs) were removed, its tier's retention period over.
    files_removed_at: datetime | None = _ts()
    error_node: str | None = None
    exception_type: str | None = None
    exception_message: str | None = None
    node_errors: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # Whose fault a failure was: "workflow" (its own graph), "infrastructure" (the fleet's,
    # once max_attempts ran out), "timeout" (an attempt ran past timeout_s), "queue_timeout"
    # (no runner took it within queue_timeout_s).
    failure_reason: str | None = None
    # Each attempt that ended without a result: {attempt, runner_id, kind, reason, at}.
    attempt_log: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Runners where an earlier attempt met an infrastructure fault: others are tried first.
    avoid_runner_ids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # A retried attempt waits out its backoff before it is dispatched.
    not_before: datetime | None = _ts()
    # After a node ran out of GPU memory: a runner with at least this much free is wanted.
    min_gpu_free_bytes: int | None = Field(default=None, sa_column=Column(BigInteger))
    # Limits, resolved at submit from the request, the template and the account's tier.
    timeout_s: int = 3600
    queue_timeout_s: int = 86400
    # When the current wait runs out: for a runner while accepted and unclaimed, for the
    # attempt's end once a runner holds it.
    deadline_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True, index=True)
    )
    created_at: datetime = _created()
    updated_at: datetime = _created()
    started_at: datetime | None = _ts()
    completed_at: datetime | None = _ts()


def new_workflow(**fields: Any) -> Workflow:
    """A new workflow, its defaults given outright: pydantic inspects a default factory's
    signature every time it calls it, a twentieth of a submit's CPU for the four of them."""
    now = utcnow()
    defaults: dict[str, Any] = {
        "id": new_id(),
        "tags": [],
        "workflow_params": {},
        "attempt_log": [],
        "avoid_runner_ids": [],
        "created_at": now,
        "updated_at": now,
    }
    return Workflow(**(defaults | fields))


class Template(SQLModel, table=True):
    """A reusable workflow with placeholders; ``POST /v1/template/{id}/run`` makes a workflow."""

    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    name: str
    description: str = ""
    body: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    # Runs of the template get this timeout unless they ask for another (None: the tier's).
    timeout_s: int | None = None
    created_at: datetime = _created()
    updated_at: datetime = _created()


def tag_index(tags: list[str]) -> str:
    return "," + "".join(f"{t}," for t in tags)


class Task(SQLModel, table=True):
    """One attempt of one node of a workflow."""

    __table_args__ = (Index("ix_task_workflow_attempt", "workflow_id", "attempt"),)
    task_id: str = Field(default_factory=new_id, primary_key=True)
    workflow_id: str = Field(foreign_key="workflow.id")
    attempt: int
    node_id: str
    class_type: str | None = None
    status: str = TaskStatus.SCHEDULED
    cached: bool = False
    started_at: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    # Why a task did not complete: the node's error, or the fault that ended its attempt;
    # failure_kind as the protocol says it ("workflow", "infrastructure", "out_of_memory").
    reason: str | None = None
    failure_kind: str | None = None


class Output(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    workflow_id: str = Field(foreign_key="workflow.id", index=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    attempt: int
    node_id: str
    filename: str
    kind: str
    content_type: str
    size_bytes: int
    sha256: str = Field(index=True)
    created_at: datetime = _created()


class WorkflowInput(SQLModel, table=True):
    """A workflow's reference to one of its input files, kept by database triggers as
    workflows are inserted and deleted: what tells an unused blob from one in use."""

    __tablename__ = "workflow_input"
    workflow_id: str = Field(primary_key=True)
    sha256: str = Field(primary_key=True, index=True)


class WorkflowEvent(SQLModel, table=True):
    """One event of a workflow's stream, in the order its subscribers got it (``seq``). ``origin``
    is the id its stream sent it with (SSE ``id:``), by which a client that reconnects says
    where it was."""

    __tablename__ = "workflow_event"
    workflow_id: str = Field(foreign_key="workflow.id", primary_key=True)
    seq: int = Field(primary_key=True)
    origin: str
    name: str
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = _created()


class AccountBlob(SQLModel, table=True):
    """A file an account uploaded on its own (``POST /v1/blob``), to name by its sha256 as a
    ``$file`` parameter of later submissions instead of sending it again."""

    __tablename__ = "account_blob"
    account_id: str = Field(foreign_key="account.id", primary_key=True)
    sha256: str = Field(primary_key=True)
    filename: str
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    content_type: str | None = None
    created_at: datetime = _created()


class SchemaFloor(SQLModel, table=True):
    """One row: the oldest schema revision whose code may serve this database (``schema.py``)."""

    __tablename__ = "schema_floor"
    oldest_code_schema: str = Field(primary_key=True)


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_record"
    account_id: str = Field(primary_key=True)
    key: str = Field(primary_key=True)
    request_hash: str
    status: int
    body: str
    created_at: datetime = _created()


class WebhookEndpoint(SQLModel, table=True):
    """An account's webhook: the events it wants, and how its deliveries have been going."""

    __tablename__ = "webhook_endpoint"
    id: str = Field(default_factory=new_id, primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    url: str
    events: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    description: str = ""
    secret: str
    status: str = "active"  # active | disabled
    disabled_reason: str | None = None
    # The first failed attempt since its last success: failing for long enough disables it.
    failing_since: datetime | None = _ts()
    created_at: datetime = _created()
    updated_at: datetime = _created()


class WebhookChange(SQLModel, table=True):
    """A workflow's status changed while someone wanted to hear of it: written by a trigger in
    the transaction of the change itself (migration 0009), so none is ever lost or made up;
    turned into deliveries by the sender (``webhooks/sender.py``)."""

    __tablename__ = "webhook_change"
    id: int | None = Field(default=None, primary_key=True)
    workflow_id: str
    account_id: str
    status: str
    attempt: int
    changed_at: datetime = _created()


class WebhookDelivery(SQLModel, table=True):
    """One message to one URL, sent until it is answered with a 2xx or given up on. Its id is
    the ``webhook-id`` of every attempt, by which a receiver drops repeats."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)
    id: str = Field(primary_key=True)
    account_id: str = Field(foreign_key="account.id", index=True)
    endpoint_id: str | None = Field(default=None, index=True)
    url: str
    event_type: str
    workflow_id: str | None = Field(default=None, index=True)
    # The body, exactly as every attempt sends it.
    payload: str
    status: str = DeliveryStatus.PENDING
    attempts: int = 0
    next_attempt_at: datetime = _created()
    # Each attempt: {at, status_code, error, duration_ms}.
    attempt_log: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _created()
    delivered_at: datetime | None = _ts()


def table_of(model: type[SQLModel]) -> Table:
    """The plain table behind a model, for the hot path's Core statements: they skip the ORM's
    bookkeeping (identity map, unit of work, bulk-update evaluation)."""
    table: Table = model.__table__  # type: ignore[attr-defined]
    return table


WORKFLOWS, TASKS, RUNNERS, TOKENS, OUTPUTS, EVENTS = (
    table_of(m) for m in (Workflow, Task, Runner, ApiToken, Output, WorkflowEvent)
)
