"""Light read models for the hot path: the columns a report needs, read with one Core SELECT
into a plain dataclass instead of an ORM object (loading one of those costs more than the
statement)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any


@dataclass
class WorkflowState:
    """A workflow as an agent's report sees and changes it: what the fence checks, what the
    status and cause events say, and the parameters a report may complete."""

    id: str
    account_id: str
    status: str
    attempt: int
    runner_id: str | None
    queue_number: int | None
    progress: float | None
    updated_at: datetime
    started_at: datetime | None
    error_node: str | None
    exception_type: str | None
    exception_message: str | None
    node_errors: dict[str, Any] | None
    failure_reason: str | None
    attempt_log: list[dict[str, Any]]
    workflow_params: dict[str, Any]


STATE_COLUMNS = tuple(f.name for f in fields(WorkflowState))
