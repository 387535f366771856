"""The store: one method per query, short sessions, no network calls inside a transaction."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, delete, func, or_, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import defer
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from control_plane.db import reports
from control_plane.db.database import Database
from control_plane.db.read_cache import ReadCache
from control_plane.db.rows import WorkflowState
from control_plane.db.tables import (
    EVENTS,
    RUNNERS,
    TOKENS,
    WORKFLOWS,
    Account,
    AccountBlob,
    ApiToken,
    IdempotencyRecord,
    Output,
    Runner,
    Task,
    Template,
    Workflow,
    WorkflowEvent,
    WorkflowInput,
    as_utc,
    lease_live,
    utcnow,
)
from control_plane.failpoints import FailPoints
from control_plane.model.errors import Conflict, NotFound, PayloadTooLarge
from control_plane.model.figures import FleetFigures
from control_plane.model.lifecycle import (
    OPEN_TASK,
    TERMINAL,
    TaskStatus,
    WorkflowStatus,
    holds_current,
    start_next_attempt,
    task_end,
)
from control_plane.model.params import WorkflowParams

# How long a retried attempt waits before it is dispatched: doubling per attempt up to this.
_MAX_BACKOFF_S = 30.0
CLIENT_TOKEN_PREFIX = "cf_"
RUNNER_TOKEN_PREFIX = "cfr_"
T = TypeVar("T")
# How long the hot path's repeated reads (tokens, an account's runners, its workflows of the
# last day) are served from memory; what this process changes is seen at once.
READ_CACHE_S = 5.0


# A workflow waits for a runner: accepted, and no runner holds it (fleet/waiting.py:waits).
_WAITS = (WORKFLOWS.c.status == WorkflowStatus.ACCEPTED, WORKFLOWS.c.runner_id.is_(None))


class KeyTaken(Exception):
    """An Idempotency-Key was taken by a request that committed first; nothing was written."""


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


class Store:
    def __init__(self, engine: AsyncEngine, fail_points: FailPoints | None = None) -> None:
        self.db = Database(engine)
        self.engine = engine
        self._fail = fail_points or FailPoints()
        self._tokens: ReadCache[str, tuple[ApiToken, Account]] = ReadCache(READ_CACHE_S)
        self._runner_tokens: ReadCache[str, Runner] = ReadCache(READ_CACHE_S)
        self._account_runners: ReadCache[str, list[Runner]] = ReadCache(READ_CACHE_S, 1000)
        # Per account: workflows created in the 24 h before the count was read, and since.
        self._last_day: ReadCache[str, list[int]] = ReadCache(READ_CACHE_S)

    async def run(self, work: Callable[[Session], T]) -> T:
        """One unit of work on a session of its own (``database.py``)."""
        return await self.db.run(work)

    async def close(self) -> None:
        await self.db.close()

    async def ping(self) -> None:
        """A round trip to the database (health checks)."""

        def work(s: Session) -> None:
            s.exec(text("SELECT 1"))  # type: ignore[call-overload]

        return await self.run(work)

    # -- accounts and tokens -------------------------------------------------------------

    async def get_or_create_account(self, name: str, tier: str | None = None) -> Account:
        def work(s: Session) -> Account:
            account = (s.exec(select(Account).where(Account.name == name))).first()
            if account is None:
                account = Account(name=name, tier=tier or "free")
                s.add(account)
            elif tier is not None:
                account.tier = tier
                s.add(account)
            s.commit()
            return account

        return await self.run(work)

    async def create_token(
        self, account_id: str, scope: str, expires_at: datetime | None = None
    ) -> tuple[str, ApiToken]:
        raw = new_token(CLIENT_TOKEN_PREFIX)
        token = ApiToken(
            account_id=account_id, token_hash=hash_token(raw), scope=scope, expires_at=expires_at
        )

        def work(s: Session) -> None:
            s.add(token)
            s.commit()

        await self.run(work)
        return raw, token

    async def resolve_token(self, raw: str) -> tuple[ApiToken, Account] | None:
        """The token and its account (served from memory for ``READ_CACHE_S``; a token not
        found is looked up again every time, so that a new one works at once)."""
        token_hash = hash_token(raw)
        cached = self._tokens.get(token_hash)
        if cached is not None:
            return cached

        def work(s: Session) -> tuple[ApiToken, Account] | None:
            row = s.exec(reports.CLIENT_TOKEN, params={"b_hash": token_hash}).first()
            return None if row is None else (row[0], row[1])

        found = await self.run(work)
        if found is not None:
            self._tokens.put(token_hash, found)
        return found

    async def list_tokens(self, account_name: str | None) -> list[dict[str, Any]]:
        query = select(ApiToken, Account.name).join(Account, col(Account.id) == col(ApiToken.account_id))
        if account_name is not None:
            query = query.where(Account.name == account_name)

        def work(s: Session) -> list[dict[str, Any]]:
            rows = s.exec(query.order_by(col(ApiToken.created_at).desc()))
            return [
                {
                    "id": token.id,
                    "account": name,
                    "scope": token.scope,
                    "created_at": token.created_at,
                    "expires_at": token.expires_at,
                    "last_used_at": token.last_used_at,
                }
                for token, name in rows
            ]

        return await self.run(work)

    async def revoke_token(self, token_id: str) -> bool:
        """Delete a token: from now on it is as invalid as one never made."""

        def work(s: Session) -> bool:
            result = s.exec(delete(ApiToken).where(col(ApiToken.id) == token_id))
            s.commit()
            return bool(result.rowcount)

        revoked = await self.run(work)
        self._tokens.clear()  # after the commit: a look-up meanwhile cannot cache it again
        return revoked

    async def touch_token(self, token_id: str) -> None:
        def work(s: Session) -> None:
            s.connection().execute(
                update(TOKENS).where(TOKENS.c.id == token_id).values(last_used_at=utcnow())
            )
            s.commit()

        return await self.run(work)

    # -- runners -------------------------------------------------------------------------

    async def create_runner(self, account_id: str, name: str, tags: list[str]) -> tuple[str, Runner]:
        raw = new_token(RUNNER_TOKEN_PREFIX)
        runner = Runner(account_id=account_id, name=name, tags=tags, token_hash=hash_token(raw))

        def work(s: Session) -> None:
            s.add(runner)
            s.commit()

        await self.run(work)
        self._forget_runner(runner)
        return raw, runner

    async def list_runners(self, account_id: str, offset: int, limit: int) -> tuple[list[Runner], int]:
        def work(s: Session) -> tuple[list[Runner], int]:
            where = Runner.account_id == account_id
            total = (s.exec(select(func.count()).select_from(Runner).where(where))).one()
            rows = s.exec(
                select(Runner)
                .where(where)
                .order_by(col(Runner.created_at).desc())
                .offset(offset)
                .limit(limit)
            )
            return list(rows), int(total)

        return await self.run(work)

    async def account_runners(self, account_id: str, *, fresh: bool = False) -> list[Runner]:
        """The account's runners; from memory for ``READ_CACHE_S`` unless ``fresh``."""
        cached = None if fresh else self._account_runners.get(account_id)
        if cached is not None:
            return cached

        def work(s: Session) -> list[Runner]:
            return list(s.exec(select(Runner).where(Runner.account_id == account_id)))

        runners = await self.run(work)
        self._account_runners.put(account_id, runners)
        return runners

    async def get_runner(self, account_id: str | None, runner_id: str) -> Runner:
        def work(s: Session) -> Runner:
            return _owned(s, Runner, runner_id, account_id)

        return await self.run(work)

    async def update_runner(self, account_id: str, runner_id: str, changes: dict[str, Any]) -> Runner:
        def work(s: Session) -> Runner:
            return _update(s, _owned(s, Runner, runner_id, account_id), changes)

        runner = await self.run(work)
        self._forget_runner(runner)
        return runner

    async def delete_runner(self, account_id: str, runner_id: str) -> None:
        def work(s: Session) -> Runner:
            runner = _owned(s, Runner, runner_id, account_id)
            s.delete(runner)
            s.commit()
            return runner

        self._forget_runner(await self.run(work))

    def _forget_runner(self, runner: Runner) -> None:
        self._runner_tokens.drop(runner.token_hash)
        self._account_runners.drop(runner.account_id)

    async def runner_by_token(self, raw: str) -> Runner | None:
        """The runner a token belongs to (from memory for ``READ_CACHE_S``, like client
        tokens)."""
        token_hash = hash_token(raw)
        cached = self._runner_tokens.get(token_hash)
        if cached is not None:
            return cached

        def work(s: Session) -> Runner | None:
            return s.exec(reports.RUNNER_BY_TOKEN, params={"b_hash": token_hash}).first()

        runner = await self.run(work)
        if runner is not None:
            self._runner_tokens.put(token_hash, runner)
        return runner

    async def save_runner_state(
        self,
        runner_id: str,
        *,
        capacity: dict[str, Any] | None = None,
        comfyui: dict[str, Any] | None = None,
        speaks: tuple[str, int] | None = None,
    ) -> None:
        """A heartbeat, or what a runner's hello said (``speaks``: its agent's version and
        the protocol version agreed): its own short transaction."""
        values: dict[str, Any] = {"last_seen_at": utcnow()}
        if capacity is not None:
            values["capacity"] = capacity
        if comfyui is not None:
            values["comfyui"] = comfyui
        if speaks is not None:
            values["agent_version"], values["protocol_version"] = speaks

        def work(s: Session) -> None:
            s.connection().execute(update(RUNNERS).where(RUNNERS.c.id == runner_id).values(**values))
            s.commit()

        await self.run(work)
        if comfyui is not None:  # what the runner offers changed (rare): read it afresh
            self._account_runners.clear()

    async def save_capacities(self, rows: Sequence[tuple[str, dict[str, Any], datetime]]) -> None:
        """Connected runners' live capacity and when each was last heard, (id, capacity,
        last seen) each: one statement for them all."""
        params = [{"b_id": runner_id, "capacity": cap, "last_seen_at": seen} for runner_id, cap, seen in rows]

        def work(s: Session) -> None:
            s.connection().execute(reports.UPDATE_RUNNER, params)
            s.commit()

        if params:
            await self.run(work)

    # -- workflows -----------------------------------------------------------------------

    async def add_workflow(self, workflow: Workflow, receipt: IdempotencyRecord | None = None) -> Workflow:
        """Insert a workflow, and the answer to its Idempotency-Key in the same transaction,
        so that a crash leaves both or neither. Raises :class:`KeyTaken` when the key went to
        a request that committed first."""
        return (await self.add_workflows([workflow], receipt))[0]

    async def add_workflows(
        self, workflows: list[Workflow], receipt: IdempotencyRecord | None = None
    ) -> list[Workflow]:
        """Insert workflows (a sweep's: all of them or none) and their Idempotency-Key's
        answer in one transaction."""

        # A Core INSERT of the objects' columns: the ORM's unit of work for one new row cost
        # as much as the rest of the transaction.
        rows = [{column.key: getattr(wf, column.key) for column in WORKFLOWS.columns} for wf in workflows]

        parents = sorted({wf.parent_id for wf in workflows if wf.parent_id is not None})

        def work(s: Session) -> list[Workflow]:
            for parent_id in parents:
                # A rerun's original, held until this commits: a delete or the retention
                # sweep waits for it (and then sees the rerun use its files) or went first
                # (and the rerun is a 404, or a 409 with the files gone).
                query = (
                    select(Workflow.files_removed_at, Workflow.workflow_params)
                    .where(Workflow.id == parent_id)
                    .with_for_update(read=True)
                )
                found = s.exec(query).first()
                if found is None:
                    raise NotFound(f"workflow {parent_id} was deleted")
                removed_at, params = found
                if removed_at is not None and _uses_files_of(workflows, parent_id, dict(params)):
                    raise Conflict(_files_removed(parent_id, removed_at))
            s.connection().execute(reports.INSERT_WORKFLOW, rows)
            if receipt is not None:
                s.add(receipt)
            _commit_receipt(s, receipt, lambda: self._fail.hit("before_workflow_commit"))
            self._fail.hit("after_workflow_commit")
            return workflows

        added = await self.run(work)
        for wf in added:
            counted = self._last_day.get(wf.account_id)
            if counted is not None:
                counted[1] += 1
        return added

    async def get_workflow(self, account_id: str | None, workflow_id: str) -> Workflow:
        def work(s: Session) -> Workflow:
            return _owned(s, Workflow, workflow_id, account_id)

        return await self.run(work)

    async def state_of(self, workflow_id: str) -> WorkflowState | None:
        """A workflow's status and little else, whoever's it is (for streams that follow it)."""

        def work(s: Session) -> WorkflowState | None:
            return reports.workflow_state(s.connection(), workflow_id)

        return await self.run(work)

    async def workflow_state(self, account_id: str, workflow_id: str) -> WorkflowState:
        """Its status and little else (an event stream's first event), in one Core SELECT."""

        def work(s: Session) -> WorkflowState:
            state = reports.workflow_state(s.connection(), workflow_id)
            if state is None or state.account_id != account_id:
                raise NotFound(f"workflow {workflow_id} not found")
            return state

        return await self.run(work)

    async def list_workflows(
        self, account_id: str, offset: int, limit: int, filters: dict[str, str]
    ) -> tuple[list[Workflow], int]:
        conds: list[ColumnElement[bool]] = [col(Workflow.account_id) == account_id]
        for key in ("status", "parent_id", "correlation_id", "sweep_id"):
            if key in filters:
                conds.append(getattr(Workflow, key) == filters[key])
        if "tag" in filters:
            conds.append(col(Workflow.tag_index).contains(f",{filters['tag']},", autoescape=True))

        def work(s: Session) -> tuple[list[Workflow], int]:
            total = (s.exec(select(func.count()).select_from(Workflow).where(*conds))).one()
            rows = s.exec(
                select(Workflow)
                .where(*conds)
                .order_by(col(Workflow.created_at).desc())
                .offset(offset)
                .limit(limit)
            )
            return list(rows), int(total)

        return await self.run(work)

    async def sweep_workflows(self, account_id: str, sweep_id: str) -> list[Workflow]:
        """A sweep's workflows in the order of its sets, without their graphs; 404 if the
        account has none by that id."""
        query = (
            select(Workflow)
            .where(Workflow.account_id == account_id, Workflow.sweep_id == sweep_id)
            .order_by(col(Workflow.created_at), col(Workflow.id))
            .options(defer(Workflow.workflow_json))  # type: ignore[arg-type]
        )

        def work(s: Session) -> list[Workflow]:
            return list(s.exec(query))

        rows = await self.run(work)
        if not rows:
            raise NotFound(f"sweep {sweep_id[:64]} not found")
        return rows

    async def child_ids(self, workflow_id: str) -> list[str]:
        def work(s: Session) -> list[str]:
            rows = s.exec(
                select(Workflow.id)
                .where(Workflow.parent_id == workflow_id)
                .order_by(col(Workflow.created_at))
            )
            return list(rows)

        return await self.run(work)

    async def workflows_last_day(self, account_id: str) -> int:
        """The account's workflows created in the last 24 hours: counted in the database at
        most every ``READ_CACHE_S``, and those this process added since then on top."""
        cached = self._last_day.get(account_id)
        if cached is not None:
            return cached[0] + cached[1]
        since = day_ago()

        def work(s: Session) -> int:
            n = s.exec(
                select(func.count())
                .select_from(Workflow)
                .where(Workflow.account_id == account_id, col(Workflow.created_at) >= since)
            )
            return int(n.one())

        counted = await self.run(work)
        self._last_day.put(account_id, [counted, 0])
        return counted

    # -- control planes sharing the database -----------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether other control planes may serve this database too (PostgreSQL)."""
        return self.db.dialect == "postgresql"

    def listen_dsn(self) -> str:
        """The database's address for a plain asyncpg connection (LISTEN)."""
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def waiting_ids(self) -> set[str]:
        """The ids of the accepted workflows no runner holds."""

        def work(s: Session) -> set[str]:
            return {row[0] for row in s.connection().execute(select(WORKFLOWS.c.id).where(*_WAITS))}

        return await self.run(work)

    async def waiting_workflow(self, workflow_id: str) -> Workflow | None:
        """The workflow, with its graph, if it is accepted and no runner holds it."""

        def work(s: Session) -> Workflow | None:
            return s.exec(select(Workflow).where(col(Workflow.id) == workflow_id, *_WAITS)).first()

        return await self.run(work)

    async def waiting_workflows(self) -> list[Workflow]:
        """Accepted workflows no runner holds, oldest first."""

        def work(s: Session) -> list[Workflow]:
            rows = s.exec(select(Workflow).where(*_WAITS).order_by(col(Workflow.created_at)))
            return list(rows)

        return await self.run(work)

    async def claim_workflow(
        self, workflow_id: str, attempt: int, runner_id: str, timeout_s: int
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Give a waiting workflow to a runner, whose attempt must end within ``timeout_s``,
        in one statement: the workflow's graph and parameters (its job is built from them),
        or ``None`` if someone else changed it meanwhile."""
        now = utcnow()

        def work(s: Session) -> tuple[dict[str, Any], dict[str, Any]] | None:
            result = s.connection().execute(
                reports.CLAIM,
                {
                    "b_id": workflow_id,
                    "b_attempt": attempt,
                    "runner_id": runner_id,
                    "dispatched_at": now,
                    "updated_at": now,
                    "queue_number": None,
                    # The preference has done its job once the workflow is placed; a
                    # requeue of this attempt goes wherever it can.
                    "preferred_runner_id": None,
                    "deadline_at": now + timedelta(seconds=timeout_s),
                },
            )
            claimed = result.first()
            s.commit()
            return None if claimed is None else (claimed[0], claimed[1])

        return await self.run(work)

    async def unclaim_workflow(
        self, workflow_id: str, attempt: int, runner_id: str, queue_timeout_s: int
    ) -> None:
        """The job never reached the runner: the workflow waits again, with a fresh wait."""
        now = utcnow()

        def work(s: Session) -> None:
            w = WORKFLOWS.c
            s.connection().execute(
                update(WORKFLOWS)
                .where(
                    w.id == workflow_id,
                    w.attempt == attempt,
                    w.runner_id == runner_id,
                    w.status == WorkflowStatus.ACCEPTED,
                )
                .values(
                    runner_id=None, dispatched_at=None, deadline_at=now + timedelta(seconds=queue_timeout_s)
                )
            )
            s.commit()

        return await self.run(work)

    async def update_current(
        self,
        workflow_id: str,
        attempt: int,
        runner_id: str | None,
        changes: dict[str, Any],
        *,
        resolved_params: dict[str, Any] | None = None,
        outputs: list[Output] | None = None,
        node_events: Sequence[reports.NodeEvent] = (),
        failed_node: tuple[str, str, str] | None = None,
    ) -> WorkflowState | None:
        """Apply an agent's report in one transaction, fenced: only the runner holding the
        current attempt of a workflow that is not finished may change it, its tasks
        included. ``failed_node`` is (node id, reason, failure kind) of the node whose error
        ended the attempt. ``None`` when the report is stale."""

        def work(s: Session) -> WorkflowState | None:
            wf = reports.fenced_state(s, workflow_id, attempt, runner_id)
            if wf is None:
                return None
            reports.apply_report(s, wf, changes, resolved_params)
            for output in outputs or ():
                if not reports.same_output(s, output):
                    reports.add_output(s, output)
            reports.record_node_events(s, workflow_id, attempt, node_events)
            if failed_node is not None:
                reports.note_task(s, workflow_id, attempt, *failed_node)
            if wf.status in TERMINAL:
                reports.close_tasks(s, workflow_id, attempt, task_end(wf.status))
            s.commit()
            return wf

        return await self.run(work)

    async def cancel_workflow(self, workflow_id: str) -> Workflow | None:
        """Mark a workflow cancelled unless it already finished (then ``None``)."""
        now = utcnow()

        def work(s: Session) -> Workflow | None:
            wf = _locked(s, workflow_id)
            if wf is None or wf.status in TERMINAL:
                return None
            wf.status, wf.completed_at, wf.updated_at, wf.deadline_at = (
                WorkflowStatus.CANCELLED,
                now,
                now,
                None,
            )
            reports.close_tasks(s, workflow_id, wf.attempt, TaskStatus.CANCELED)
            s.add(wf)
            s.commit()
            return wf

        return await self.run(work)

    async def delete_workflow(self, account_id: str, workflow_id: str) -> list[str]:
        """Delete a finished workflow with its tasks, outputs and events; the blobs (its inputs
        and outputs) that nothing refers to any more, for the caller to remove once this has
        committed. 409 while it has not finished."""

        def work(s: Session) -> list[str]:
            wf = _locked(s, workflow_id, without_graph=True)
            if wf is None or wf.account_id != account_id:
                raise NotFound(f"workflow {workflow_id} not found")
            if wf.status not in TERMINAL:
                raise Conflict(f"workflow {workflow_id} is {wf.status}; cancel it before deleting it")
            files = WorkflowParams.of(wf.workflow_params).files.values()
            outputs = s.exec(select(Output.sha256).where(Output.workflow_id == workflow_id))
            candidates = {f.sha256 for f in files} | set(outputs)
            c = s.connection()
            for table in (Output, Task, WorkflowEvent):
                c.execute(delete(table).where(table.workflow_id == workflow_id))  # type: ignore[arg-type]
            c.execute(delete(Workflow).where(col(Workflow.id) == workflow_id))
            unused = sorted(sha for sha in candidates if not _blob_referenced(s, sha))
            s.commit()
            return unused

        return await self.run(work)

    async def due_for_file_removal(
        self, periods: dict[str, timedelta], now: datetime, limit: int
    ) -> list[str]:
        """Finished workflows, oldest first, whose files are past their account's tier's
        retention period (``periods``: by tier name)."""
        past = [
            and_(col(Account.tier) == tier, col(Workflow.completed_at) < now - period)
            for tier, period in periods.items()
        ]
        query = (
            select(Workflow.id)
            .join(Account, col(Account.id) == col(Workflow.account_id))
            .where(col(Workflow.files_removed_at).is_(None), col(Workflow.status).in_(TERMINAL), or_(*past))
            .order_by(col(Workflow.completed_at))
            .limit(limit)
        )
        return await self.run(lambda s: list(s.exec(query)))

    async def remove_files(
        self, workflow_id: str, periods: dict[str, timedelta], now: datetime
    ) -> list[str] | None:
        """Its tier's retention over, a finished workflow loses its outputs and its references
        to its inputs and is marked ``files_removed_at``, in one transaction that locks it;
        returns the blobs nothing refers to any more, for the caller to remove once this has
        committed. ``None`` when it is no longer due (rerun meanwhile, or already done)."""

        def work(s: Session) -> list[str] | None:
            wf = _locked(s, workflow_id, without_graph=True)
            if wf is None or wf.status not in TERMINAL or wf.files_removed_at is not None:
                return None
            tier = s.exec(select(Account.tier).where(Account.id == wf.account_id)).one()
            period = periods.get(tier)
            if period is None or wf.completed_at is None or as_utc(wf.completed_at) >= now - period:
                return None
            c = s.connection()
            inputs = c.execute(select(WorkflowInput.sha256).where(WorkflowInput.workflow_id == workflow_id))
            outputs = c.execute(select(Output.sha256).where(Output.workflow_id == workflow_id))
            candidates = set(inputs.scalars()) | set(outputs.scalars())
            for table in (Output, WorkflowInput):
                c.execute(delete(table).where(table.workflow_id == workflow_id))  # type: ignore[arg-type]
            wf.files_removed_at = now
            s.add(wf)
            unused = sorted(sha for sha in candidates if not _blob_referenced(s, sha))
            s.commit()
            return unused

        return await self.run(work)

    async def inflight_workflows(self) -> list[Workflow]:
        """Workflows held by a runner that have not finished; without their graphs (read once,
        when the control plane starts)."""
        conds: list[ColumnElement[bool]] = [
            col(Workflow.runner_id).is_not(None),
            col(Workflow.status).not_in(TERMINAL),
        ]
        query = select(Workflow).where(*conds).options(defer(Workflow.workflow_json))  # type: ignore[arg-type]

        def work(s: Session) -> list[Workflow]:
            return list(s.exec(query))

        return await self.run(work)

    # -- the event log ---------------------------------------------------------------------

    async def append_events(self, events: Sequence[LoggedEvent]) -> None:
        """Log ``events`` (in the order given), each workflow's taking the next numbers of its
        sequence; those of a workflow that is gone are dropped."""
        by_workflow: dict[str, list[LoggedEvent]] = {}
        for event in events:
            by_workflow.setdefault(event.workflow_id, []).append(event)

        def work(s: Session) -> None:
            c = s.connection()
            rows: list[dict[str, Any]] = []
            now = utcnow()
            # Workflows in one order, so that two control planes' writes cannot deadlock.
            for workflow_id in sorted(by_workflow):
                batch = by_workflow[workflow_id]
                top = c.execute(reports.BUMP_EVENT_SEQ, {"b_id": workflow_id, "b_n": len(batch)}).scalar()
                if top is None:
                    continue
                first = int(top) - len(batch) + 1
                rows.extend(
                    {
                        "workflow_id": workflow_id,
                        "seq": first + n,
                        "origin": e.origin,
                        "name": e.name,
                        "data": e.data,
                        "created_at": now,
                    }
                    for n, e in enumerate(batch)
                )
            if rows:
                c.execute(reports.INSERT_EVENTS, rows)
            s.commit()

        await self.run(work)

    async def events_since(
        self, workflow_id: str, origin: str
    ) -> tuple[dict[str, Any] | None, list[LoggedEvent]] | None:
        """The workflow's logged events after the one sent as ``origin``, oldest first, with
        the last status logged up to it (what its client knew); ``None`` when the log has no
        such event."""

        def work(s: Session) -> tuple[dict[str, Any] | None, list[LoggedEvent]] | None:
            c = s.connection()
            seq = c.execute(
                select(EVENTS.c.seq).where(EVENTS.c.workflow_id == workflow_id, EVENTS.c.origin == origin)
            ).scalar()
            if seq is None:
                return None
            rows = c.execute(
                select(EVENTS.c.origin, EVENTS.c.name, EVENTS.c.data)
                .where(EVENTS.c.workflow_id == workflow_id, EVENTS.c.seq > seq)
                .order_by(EVENTS.c.seq)
            )
            missed = [LoggedEvent(workflow_id, str(o), str(n), dict(d)) for o, n, d in rows]
            before = c.execute(
                select(EVENTS.c.data)
                .where(EVENTS.c.workflow_id == workflow_id, EVENTS.c.seq <= seq, EVENTS.c.name == "status")
                .order_by(EVENTS.c.seq.desc())
                .limit(1)
            ).scalar()
            return (dict(before) if before is not None else None), missed

        return await self.run(work)

    # -- leases: which control plane holds a runner's connection (shared databases) ---------

    async def take_lease(
        self, runner_id: str, replica_id: str, connection_id: str, expires_at: datetime
    ) -> tuple[str, str] | None:
        """This connection holds the runner now. The (replica, connection) that held a live
        lease before, if another control plane's: that connection is to be closed."""

        def work(s: Session) -> tuple[str, str] | None:
            c = s.connection()
            row = c.execute(
                select(RUNNERS.c.replica_id, RUNNERS.c.connection_id, RUNNERS.c.lease_expires_at)
                .where(RUNNERS.c.id == runner_id)
                .with_for_update()
            ).first()
            c.execute(
                update(RUNNERS)
                .where(RUNNERS.c.id == runner_id)
                .values(replica_id=replica_id, connection_id=connection_id, lease_expires_at=expires_at)
            )
            s.commit()
            if row is None or row[0] in (None, replica_id) or not lease_live(row[2]):
                return None
            return str(row[0]), str(row[1])

        return await self.run(work)

    async def renew_leases(self, replica_id: str, expires_at: datetime) -> None:
        """Every lease this control plane holds, renewed in one statement."""

        def work(s: Session) -> None:
            s.connection().execute(
                update(RUNNERS).where(RUNNERS.c.replica_id == replica_id).values(lease_expires_at=expires_at)
            )
            s.commit()

        await self.run(work)

    async def drop_lease(self, runner_id: str, connection_id: str) -> None:
        """The connection closed: its lease goes, unless a newer connection holds it now."""

        def work(s: Session) -> None:
            s.connection().execute(
                update(RUNNERS)
                .where(RUNNERS.c.id == runner_id, RUNNERS.c.connection_id == connection_id)
                .values(replica_id=None, connection_id=None, lease_expires_at=None)
            )
            s.commit()

        await self.run(work)

    async def lease_holder(self, runner_id: str) -> str | None:
        """The control plane holding a live lease on the runner, if any."""

        def work(s: Session) -> str | None:
            row = (
                s.connection()
                .execute(
                    select(RUNNERS.c.replica_id, RUNNERS.c.lease_expires_at).where(RUNNERS.c.id == runner_id)
                )
                .first()
            )
            if row is None or row[0] is None or not lease_live(row[1]):
                return None
            return str(row[0])

        return await self.run(work)

    async def take_over_lapsed_leases(self) -> list[str]:
        """Runners whose control plane let their lease lapse (it died): each is taken by
        exactly one of the control planes that ask, which then keeps its grace period."""

        def work(s: Session) -> list[str]:
            rows = s.connection().execute(
                update(RUNNERS)
                .where(RUNNERS.c.replica_id.is_not(None), RUNNERS.c.lease_expires_at < utcnow())
                .values(replica_id=None, connection_id=None, lease_expires_at=None)
                .returning(RUNNERS.c.id)
            )
            taken = [str(r[0]) for r in rows]
            s.commit()
            return taken

        return await self.run(work)

    async def held_by(self, runner_id: str) -> dict[str, int]:
        """The unfinished workflows a runner holds, with the attempt it holds: what a
        (re)connecting runner is reconciled with, in one light SELECT."""

        def work(s: Session) -> dict[str, int]:
            rows = s.connection().execute(reports.HELD_BY_RUNNER, {"b_runner_id": runner_id})
            return {row[0]: row[1] for row in rows}

        return await self.run(work)

    async def retry(
        self, workflow_id: str, attempt: int, runner_id: str | None, fault: Fault
    ) -> Workflow | None:
        """An attempt ended by a fault of the fleet (or a node out of GPU memory): the next
        attempt waits for a runner after a backoff, elsewhere where possible; or, once the
        workflow has had ``fault.max_attempts``, it fails, naming every attempt's reason.
        The attempt's open tasks are closed with the reason. ``None`` if the workflow moved
        on (finished, or held by another runner)."""
        now = utcnow()

        def work(s: Session) -> Workflow | None:
            wf = _fenced(s, workflow_id, attempt, runner_id)
            if wf is None:
                return None
            wf.attempt_log = [
                *wf.attempt_log,
                {
                    "attempt": wf.attempt,
                    "runner_id": runner_id,
                    "kind": fault.kind,
                    "reason": fault.reason,
                    "at": now.isoformat(),
                },
            ]
            if fault.node_id is not None:
                reports.note_task(
                    s, workflow_id, attempt, fault.node_id, fault.reason, fault.kind, TaskStatus.FAILED
                )
            if wf.attempt >= fault.max_attempts:
                reports.close_tasks(s, workflow_id, wf.attempt, TaskStatus.FAILED, fault.reason, fault.kind)
                tries = "attempt" if wf.attempt == 1 else "attempts"
                every = "; ".join(f"attempt {e['attempt']}: {e['reason']}" for e in wf.attempt_log)
                wf.status, wf.completed_at, wf.deadline_at = WorkflowStatus.FAILED, now, None
                wf.failure_reason = "workflow" if fault.kind == "out_of_memory" else "infrastructure"
                wf.exception_type = fault.exception_type or wf.exception_type
                wf.exception_message = f"gave up after {wf.attempt} {tries}: {every}"
            else:
                reports.close_tasks(s, workflow_id, wf.attempt, TaskStatus.CANCELED, fault.reason, fault.kind)
                start_next_attempt(wf, now)
                wf.not_before = now + timedelta(
                    seconds=min(_MAX_BACKOFF_S, fault.backoff_s * 2 ** (attempt - 1))
                )
                if runner_id is not None and runner_id not in wf.avoid_runner_ids:
                    wf.avoid_runner_ids = [*wf.avoid_runner_ids, runner_id]
                if fault.min_gpu_free_bytes is not None:
                    wf.min_gpu_free_bytes = fault.min_gpu_free_bytes
            wf.updated_at = now
            s.add(wf)
            s.commit()
            return wf

        return await self.run(work)

    async def new_attempt(
        self,
        workflow_id: str,
        expected_attempt: int,
        changes: dict[str, Any],
        receipt: IdempotencyRecord | None = None,
    ) -> Workflow | None:
        """The Conductor-compatible rerun: start attempt + 1 of a workflow in one transaction
        (with the answer to its Idempotency-Key). The previous attempt's tasks that had not
        ended were interrupted and become CANCELED; those that ended keep what they ended
        as (a node that completed did, whatever runs again). ``None`` if the attempt moved on
        meanwhile; :class:`KeyTaken` when the key went to a request that committed first."""
        now = utcnow()

        def work(s: Session) -> Workflow | None:
            wf = _locked(s, workflow_id)
            if wf is None or wf.attempt != expected_attempt:
                return None
            if wf.files_removed_at is not None and WorkflowParams.of(wf.workflow_params).files:
                raise Conflict(_files_removed(wf.id, wf.files_removed_at))
            old_tasks = s.exec(
                select(Task).where(Task.workflow_id == workflow_id, Task.attempt == expected_attempt)
            )
            for task in old_tasks:
                if task.status in OPEN_TASK:
                    task.status = TaskStatus.CANCELED
                    task.ended_at = task.ended_at or now
                    s.add(task)
            for key, value in changes.items():
                setattr(wf, key, value)
            start_next_attempt(wf, now)
            # A rerun asked for by the user starts afresh: earlier faults are history.
            wf.attempt_log, wf.avoid_runner_ids, wf.min_gpu_free_bytes = [], [], None
            wf.error_node = wf.exception_type = wf.exception_message = wf.failure_reason = None
            wf.node_errors = None
            wf.started_at = wf.completed_at = None
            wf.updated_at = now
            s.add(wf)
            if receipt is not None:
                s.add(receipt)
            _commit_receipt(s, receipt)
            self._fail.hit("after_attempt_commit")
            return wf

        return await self.run(work)

    async def expired(self, now: datetime) -> list[str]:
        """Workflows whose deadline has passed and that have not finished."""

        def work(s: Session) -> list[str]:
            rows = s.exec(
                select(Workflow.id).where(
                    col(Workflow.deadline_at) < now, col(Workflow.status).not_in(TERMINAL)
                )
            )
            return list(rows)

        return await self.run(work)

    async def expire(self, workflow_id: str, now: datetime) -> tuple[Workflow, str | None] | None:
        """Fail a workflow whose deadline passed: ``queue_timeout`` when no runner took it,
        ``timeout`` when its attempt ran too long. Returns it with the runner that held it
        (to be told to stop), or ``None`` if it moved on meanwhile."""

        def work(s: Session) -> tuple[Workflow, str | None] | None:
            wf = _locked(s, workflow_id, without_graph=True)
            if wf is None or wf.status in TERMINAL or wf.deadline_at is None or as_utc(wf.deadline_at) >= now:
                return None
            held_by = wf.runner_id
            if held_by is None:
                wf.failure_reason, wf.exception_type = "queue_timeout", "QueueTimeout"
                wf.exception_message = f"no runner took it within {wf.queue_timeout_s} s (the queue limit)"
                reason = "the workflow waited past its queue limit"
            else:
                wf.failure_reason, wf.exception_type = "timeout", "Timeout"
                wf.exception_message = f"attempt {wf.attempt} ran longer than its timeout of {wf.timeout_s} s"
                reason = wf.exception_message
            wf.status, wf.completed_at, wf.updated_at, wf.deadline_at = WorkflowStatus.FAILED, now, now, None
            reports.close_tasks(s, workflow_id, wf.attempt, TaskStatus.CANCELED, reason, "workflow")
            s.add(wf)
            s.commit()
            return wf, held_by

        return await self.run(work)

    async def lineage_ids(self, workflow_id: str) -> set[str]:
        """The workflow, its ancestors (parent_id chain) and all its reruns' descendants."""
        found = {workflow_id}

        def work(s: Session) -> set[str]:
            current: str | None = workflow_id
            while current is not None:
                parent = (s.exec(select(Workflow.parent_id).where(Workflow.id == current))).first()
                current = parent if parent not in found else None
                if current is not None:
                    found.add(current)
            frontier = [workflow_id]
            while frontier:
                children = list(s.exec(select(Workflow.id).where(col(Workflow.parent_id).in_(frontier))))
                frontier = [c for c in children if c not in found]
                found.update(frontier)
            return found

        return await self.run(work)

    # -- templates -----------------------------------------------------------------------

    async def add_template(self, template: Template) -> Template:
        def work(s: Session) -> Template:
            s.add(template)
            s.commit()
            return template

        return await self.run(work)

    async def get_template(self, account_id: str, template_id: str) -> Template:
        def work(s: Session) -> Template:
            return _owned(s, Template, template_id, account_id)

        return await self.run(work)

    async def update_template(self, account_id: str, template_id: str, changes: dict[str, Any]) -> Template:
        def work(s: Session) -> Template:
            return _update(s, _owned(s, Template, template_id, account_id), changes)

        return await self.run(work)

    async def list_templates(self, account_id: str, offset: int, limit: int) -> tuple[list[Template], int]:
        def work(s: Session) -> tuple[list[Template], int]:
            where = Template.account_id == account_id
            total = (s.exec(select(func.count()).select_from(Template).where(where))).one()
            rows = s.exec(
                select(Template)
                .where(where)
                .order_by(col(Template.created_at).desc())
                .offset(offset)
                .limit(limit)
            )
            return list(rows), int(total)

        return await self.run(work)

    # -- tasks ---------------------------------------------------------------------------

    async def tasks(self, workflow_id: str, attempt: int | None = None) -> list[Task]:
        conds = [Task.workflow_id == workflow_id]
        if attempt is not None:
            conds.append(Task.attempt == attempt)

        def work(s: Session) -> list[Task]:
            rows = s.exec(select(Task).where(*conds).order_by(col(Task.attempt).desc(), col(Task.started_at)))
            return list(rows)

        return await self.run(work)

    # -- outputs -------------------------------------------------------------------------

    async def add_output(self, output: Output, runner_id: str) -> tuple[Output, bool] | None:
        """Record an uploaded output of the current attempt, fenced like a report; the same
        file uploaded again (a retry, an agent that restarted) gives the output already
        recorded. ``(output, created)``, or ``None`` when the attempt is no longer current."""

        def work(s: Session) -> tuple[Output, bool] | None:
            if reports.fenced_state(s, output.workflow_id, output.attempt, runner_id) is None:
                return None
            same = reports.same_output(s, output)
            if same is not None:
                return same, False
            reports.add_output(s, output)
            s.commit()
            return output, True

        return await self.run(work)

    async def add_small_output(
        self, account_id: str, output: Output, runner_id: str, room: int
    ) -> tuple[Output, bool]:
        """An output already stored as a blob, recorded in one unit: the workflow read and
        fenced (404 for another account's, :class:`Conflict` unless that runner holds that
        attempt), the attempt's outputs so far held to ``room`` bytes in all
        (:class:`PayloadTooLarge`), and inserted. ``(output, created)`` as :meth:`add_output`
        gives: the same file recorded before is answered with that record."""

        def work(s: Session) -> tuple[Output, bool]:
            state = reports.workflow_state(s.connection(), output.workflow_id, lock=True)
            if state is None or state.account_id != account_id:
                raise NotFound(f"workflow {output.workflow_id} not found")
            if not holds_current(state, output.attempt, runner_id):
                raise Conflict(
                    f"attempt {output.attempt} of workflow {state.id} is not current on this runner"
                )
            same = reports.same_output(s, output)
            if same is not None:
                return same, False
            uploaded = reports.output_bytes(s, output.workflow_id, output.attempt)
            if uploaded + output.size_bytes > room:
                raise PayloadTooLarge(
                    f"attempt {output.attempt} of workflow {state.id} may upload {room} bytes "
                    f"of outputs in all; {max(room - uploaded, 0)} are left"
                )
            reports.add_output(s, output)
            s.commit()
            return output, True

        return await self.run(work)

    async def upload_state(
        self, account_id: str, workflow_id: str, attempt: int | None, runner_id: str
    ) -> tuple[WorkflowState, int]:
        """For an output upload, in one read: the workflow (the caller fences on it; 404 for
        another account's) and how many bytes the attempt has uploaded so far (counted only
        when that runner holds that attempt; 0 otherwise)."""

        def work(s: Session) -> tuple[WorkflowState, int]:
            state = reports.workflow_state(s.connection(), workflow_id)
            if state is None or state.account_id != account_id:
                raise NotFound(f"workflow {workflow_id} not found")
            if attempt is None or not holds_current(state, attempt, runner_id):
                return state, 0
            return state, reports.output_bytes(s, workflow_id, attempt)

        return await self.run(work)

    async def outputs(self, workflow_id: str, attempt: int | None = None) -> list[Output]:
        conds = [Output.workflow_id == workflow_id]
        if attempt is not None:
            conds.append(Output.attempt == attempt)

        def work(s: Session) -> list[Output]:
            rows = s.exec(select(Output).where(*conds).order_by(col(Output.created_at)))
            return list(rows)

        return await self.run(work)

    async def get_output(self, account_id: str, output_id: str) -> Output:
        def work(s: Session) -> Output:
            return _owned(s, Output, output_id, account_id)

        return await self.run(work)

    async def keep_account_blob(self, blob: AccountBlob) -> tuple[AccountBlob, bool]:
        """Record that an account uploaded a file; the record and whether it is new (the same
        file uploaded again keeps its first record)."""

        def work(s: Session) -> tuple[AccountBlob, bool]:
            found = s.get(AccountBlob, (blob.account_id, blob.sha256))
            if found is not None:
                return found, False
            s.add(blob)
            try:
                s.commit()
            except IntegrityError:  # the same upload, committed a moment before
                s.rollback()
                return s.get(AccountBlob, (blob.account_id, blob.sha256)) or blob, False
            s.refresh(blob)
            return blob, True

        return await self.run(work)

    async def account_blob(self, account_id: str, sha256: str) -> AccountBlob | None:
        def work(s: Session) -> AccountBlob | None:
            return s.get(AccountBlob, (account_id, sha256))

        return await self.run(work)

    async def blob_referenced(self, sha256: str) -> bool:
        """Whether any workflow (as an input), output or account's upload refers to the blob."""
        return await self.run(lambda s: _blob_referenced(s, sha256))

    # -- figures -------------------------------------------------------------------------

    async def fleet_figures(self, account_id: str | None) -> FleetFigures:
        """Workflows by status and the waiting queue per account, for /metrics: one account,
        or every account when ``account_id`` is None."""
        only_workflows = [Workflow.account_id == account_id] if account_id is not None else []

        def work(s: Session) -> FleetFigures:
            accounts = s.exec(
                select(Account.id, Account.name).where(*([Account.id == account_id] if account_id else []))
            )
            by_status = s.exec(
                select(Workflow.account_id, Workflow.status, func.count())
                .where(*only_workflows)
                .group_by(Workflow.account_id, Workflow.status)
            )
            waiting = s.exec(
                select(Workflow.account_id, func.count(), func.min(Workflow.created_at))
                .where(
                    *only_workflows,
                    Workflow.status == WorkflowStatus.ACCEPTED,
                    col(Workflow.runner_id).is_(None),
                )
                .group_by(Workflow.account_id)
            )
            return FleetFigures(
                account_names=dict(accounts.all()),
                workflows=[(a, st, int(n)) for a, st, n in by_status],
                waiting=[(a, int(n), as_utc(first) if first else None) for a, n, first in waiting],
            )

        return await self.run(work)

    # -- idempotency ---------------------------------------------------------------------

    async def get_idempotent(self, account_id: str, key: str) -> IdempotencyRecord | None:
        def work(s: Session) -> IdempotencyRecord | None:
            return s.get(IdempotencyRecord, (account_id, key))

        return await self.run(work)

    async def forget_idempotent(self, account_id: str, key: str) -> None:
        """Let an expired key go (it answers retries for a limited time only)."""

        def work(s: Session) -> None:
            s.exec(
                delete(IdempotencyRecord).where(
                    col(IdempotencyRecord.account_id) == account_id, col(IdempotencyRecord.key) == key
                )
            )
            s.commit()

        return await self.run(work)

    async def forget_idempotent_before(self, cutoff: datetime) -> None:
        def work(s: Session) -> None:
            s.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.created_at) < cutoff))
            s.commit()

        return await self.run(work)


_Owned = TypeVar("_Owned", Runner, Workflow, Template, Output)


def _blob_referenced(s: Session, sha256: str) -> bool:
    """An account's upload, a workflow's input or an output: three indexed look-ups."""
    c = s.connection()
    for table in (AccountBlob, WorkflowInput, Output):
        query = select(table.sha256).where(table.sha256 == sha256).limit(1)
        if c.execute(query).first() is not None:
            return True
    return False


def _shas(params: dict[str, Any]) -> set[str]:
    return {f.sha256 for f in WorkflowParams.of(params).files.values()}


def _uses_files_of(workflows: list[Workflow], parent_id: str, parent_params: dict[str, Any]) -> bool:
    """Whether a rerun keeps any of its original's files (rather than only new ones)."""
    theirs = _shas(parent_params)
    return any(_shas(wf.workflow_params) & theirs for wf in workflows if wf.parent_id == parent_id)


def _files_removed(workflow_id: str, when: datetime) -> str:
    return (
        f"the files of workflow {workflow_id} were removed on {as_utc(when):%Y-%m-%d} (its tier's "
        "retention period): submit it again with its files"
    )


def _locked(s: Session, workflow_id: str, *, without_graph: bool = False) -> Workflow | None:
    """The workflow's row, locked for a read-check-write (PostgreSQL; on SQLite no two units
    of work interleave). ``without_graph`` leaves the workflow JSON (which can be large)
    unread: fencing an agent's report needs only a few small columns."""
    query = select(Workflow).where(Workflow.id == workflow_id).with_for_update()
    if without_graph:
        query = query.options(defer(Workflow.workflow_json))  # type: ignore[arg-type]
    return s.exec(query).first()


def _fenced(s: Session, workflow_id: str, attempt: int, runner_id: str | None) -> Workflow | None:
    """The fence on behalf of a runner (a report's is :func:`_fenced_state`), for a write
    that needs the whole workflow: its row, locked, if that runner holds that attempt of it
    and it has not finished; else ``None`` (the attempt was cancelled, replaced or moved)."""
    wf = _locked(s, workflow_id)
    return wf if wf is not None and holds_current(wf, attempt, runner_id) else None


def _owned(s: Session, model: type[_Owned], object_id: str, account_id: str | None) -> _Owned:
    """The object if it exists and is the account's (``None``: any account's); another
    account's objects are as absent as missing ones: 404, never 403."""
    found = s.get(model, object_id)
    if found is None or (account_id is not None and found.account_id != account_id):
        raise NotFound(f"{model.__tablename__} {object_id} not found")
    return found


def _update(s: Session, obj: _Owned, changes: dict[str, Any]) -> _Owned:
    for key, value in changes.items():
        setattr(obj, key, value)
    obj.updated_at = utcnow()
    s.add(obj)
    s.commit()
    return obj


@dataclass(frozen=True)
class LoggedEvent:
    """One event of a workflow's stream as the event log keeps it (``origin``: its SSE id)."""

    workflow_id: str
    origin: str
    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Fault:
    """Why an attempt ended without a result, and what the retry should take into account."""

    kind: str  # "infrastructure" or "out_of_memory"
    reason: str
    max_attempts: int
    backoff_s: float
    exception_type: str | None = None
    node_id: str | None = None  # the node that failed (out of memory)
    min_gpu_free_bytes: int | None = None


def _commit_receipt(
    s: Session, receipt: IdempotencyRecord | None, before_commit: Callable[[], None] | None = None
) -> None:
    """Commit, turning a taken Idempotency-Key (written in this transaction) into KeyTaken."""
    try:
        s.flush()
        if before_commit is not None:
            before_commit()
        s.commit()
    except IntegrityError:
        if receipt is None:
            raise
        s.rollback()
        raise KeyTaken(receipt.key) from None


def day_ago() -> datetime:
    return utcnow() - timedelta(days=1)


__all__: Sequence[str] = (
    "Fault",
    "KeyTaken",
    "Store",
    "day_ago",
    "hash_token",
    "new_token",
)
