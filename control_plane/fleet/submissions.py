"""Making workflows: a new submission, a template run, and both reruns all pass through
:class:`Submissions`, so each checks the same things in the same order. It takes parsed
values (:class:`Sent`, :class:`TaskRerun`), never an HTTP request."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from control_plane.db.store import Store
from control_plane.db.tables import (
    Account,
    IdempotencyRecord,
    Workflow,
    new_id,
    new_workflow,
    tag_index,
    utcnow,
)
from control_plane.db.webhooks import WebhookStore
from control_plane.fleet.capabilities import Needs, Offers, check_values, missing, needs
from control_plane.fleet.dispatch import Fleet
from control_plane.fleet.rate_limits import RateLimiter
from control_plane.fleet.registry import Registry, tags_match
from control_plane.model.errors import BadRequest, Forbidden, TooManyRequests
from control_plane.model.params import FileRef, WorkflowParams
from control_plane.public_addresses import check_target
from control_plane.settings import Settings, Tier
from protocol.placeholders import (
    ParameterError,
    PlaceholderError,
    declared_parameters,
    merge_values,
    validate_values,
)

log = logging.getLogger(__name__)

_PRIVATE = "webhook_private_urls"
# The Idempotency-Key's answer for a new workflow, stored in the transaction that creates it.
Receipt = Callable[[Workflow], IdempotencyRecord | None]
SweepReceipt = Callable[[list[Workflow]], IdempotencyRecord | None]


@dataclass(frozen=True)
class Sent:
    """What a client sent with a submission, a template run or a rerun with new parameters."""

    texts: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileRef] = field(default_factory=dict)
    timeout_s: str | None = None
    correlation_id: str | None = None
    priority: str | None = None
    webhook_url: str | None = None

    @property
    def parameter_count(self) -> int:
        return len(self.texts) + len(self.choices) + len(self.files)


class Submissions:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: Registry,
        fleet: Fleet,
        rate_limits: RateLimiter,
        webhooks: WebhookStore,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.fleet = fleet
        self.rate_limits = rate_limits
        self.webhooks = webhooks

    def tier(self, account: Account) -> Tier:
        return self.settings.tiers.get(account.tier) or self.settings.tiers["free"]

    def check_submit_rate(self, account: Account, token_id: str) -> None:
        """429 past the tier's submissions per second for this token (checked before the body
        is read, so that a flood costs as little as it can)."""
        tier = self.tier(account)
        wait_s = self.rate_limits.take(token_id, tier.submits_per_s, tier.submit_burst)
        if wait_s > 0:
            raise TooManyRequests(
                f"the {tier.name} tier submits at most {tier.submits_per_s:g} workflows a second "
                f"(bursts of {tier.submit_burst}); try again in {wait_s:.1f} s",
                wait_s,
            )

    def check_parameter_count(self, account: Account, parameter_count: int) -> None:
        tier = self.tier(account)
        if parameter_count > tier.max_parameters:
            raise Forbidden(
                f"{parameter_count} parameters sent; the {tier.name} tier allows {tier.max_parameters}"
            )

    async def check_tier(self, account: Account, parameter_count: int, workflows: int = 1) -> None:
        """Parameters per request and workflows per day (a rerun that creates one counts, a
        sweep counts each of its workflows)."""
        self.check_parameter_count(account, parameter_count)
        tier = self.tier(account)
        used = await self.store.workflows_last_day(account.id)
        if used + workflows > tier.max_workflows_per_day:
            if workflows == 1 or used >= tier.max_workflows_per_day:
                raise Forbidden(
                    f"workflow limit of the {tier.name} tier reached ({tier.max_workflows_per_day} a day)"
                )
            raise Forbidden(
                f"this sweep makes {workflows} workflows; the {tier.name} tier allows "
                f"{tier.max_workflows_per_day} a day and {tier.max_workflows_per_day - used} are left"
            )

    def resolve_timeout(self, account: Account, requested: str | None, fallback: int | None) -> int:
        """The attempt timeout: what the request asks for (up to the tier's maximum), else the
        template's or the original's, else the tier's default."""
        tier = self.tier(account)
        if requested is None or not requested.strip():
            return min(fallback, tier.max_timeout_s) if fallback is not None else tier.default_timeout_s
        try:
            value = int(requested)
        except ValueError:
            raise BadRequest(f"timeout_s must be a whole number of seconds, not {requested!r}") from None
        if not 1 <= value <= tier.max_timeout_s:
            raise BadRequest(
                f"timeout_s must be between 1 and {tier.max_timeout_s} s on the {tier.name} tier"
            )
        return value

    def resolve_priority(self, account: Account, requested: str | None, fallback: int = 0) -> int:
        """The priority asked for (from 0 to the tier's maximum), else ``fallback`` (a rerun
        keeps its original's)."""
        if requested is None or not requested.strip():
            return fallback
        tier = self.tier(account)
        try:
            value = int(requested)
        except ValueError:
            raise BadRequest(f"priority must be a whole number, not {requested[:40]!r}") from None
        if not 0 <= value <= tier.max_priority:
            raise BadRequest(
                f"priority must be between 0 and {tier.max_priority} on the {tier.name} tier "
                "(higher runs first)"
            )
        return value

    async def resolve_webhook_url(
        self, account: Account, requested: str | None, fallback: str | None
    ) -> str | None:
        """The URL told of the workflow's end: the one sent (checked, and only once the account
        has the secret that signs it), else the original's on a rerun."""
        if requested is None or not requested.strip():
            return fallback
        try:
            url = await check_target(requested, "webhook_url", self.settings.webhook_private_urls, _PRIVATE)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if not await self.webhooks.account_secret(account.id):
            raise BadRequest(
                "webhook_url is signed with the account's webhook secret, which it has not made yet: "
                "POST /v1/webhook-secret makes it (and shows it once)"
            )
        return url

    async def check_runner_available(
        self, account: Account, tags: list[str], workflow_json: dict[str, Any], values: dict[str, str]
    ) -> Needs:
        """400 unless some active runner with matching tags can run the workflow, as far as
        anyone knows (a runner that never connected has not said what it lacks). A connected
        runner that can run it settles it (looked at once per class of runners, however many
        are connected); otherwise the runners come from the store's short-lived cache, and a
        refusal is only ever made on a fresh read. Returns what the workflow needs (dispatch
        keeps it)."""
        need = needs(workflow_json, values)
        connected = next(
            (
                k.offers
                for k in self.registry.connected_classes()
                if k.account_id == account.id and k.accepts(tags) and missing(need, k.offers) == []
            ),
            None,
        )
        if connected is not None:
            _check_values(workflow_json, values, [connected])
            return need
        try:
            await self._check_runners(account, tags, workflow_json, values, need, fresh=False)
        except BadRequest:
            await self._check_runners(account, tags, workflow_json, values, need, fresh=True)
        return need

    async def _check_runners(
        self,
        account: Account,
        tags: list[str],
        workflow_json: dict[str, Any],
        values: dict[str, str],
        need: Needs,
        *,
        fresh: bool,
    ) -> None:
        runners = [
            r
            for r in await self.store.account_runners(account.id, fresh=fresh)
            if r.status == "active" and tags_match(r.tags, tags)
        ]
        if not runners:
            raise BadRequest(f"no runner available with matching tags {tags}")
        shortfalls: list[tuple[str, list[str]]] = []
        capable: list[Offers] = []
        unknown = False
        for runner in runners:
            live = self.registry.get(runner.id)
            offers = live.offers if live is not None else Offers.of(runner.comfyui)
            lacks = missing(need, offers)
            if lacks is None:
                unknown = True
            elif lacks:
                shortfalls.append((runner.name, lacks))
            elif offers is not None:
                # One is enough: the first runner that can run it speaks for the input types
                # (check_values), and a fleet of thousands is not walked on every submit.
                capable.append(offers)
                break
        if not capable and not unknown:
            name, lacks = min(shortfalls, key=lambda item: sum(len(p) for p in item[1]))
            raise BadRequest(f"no runner can run this workflow: {name} lacks {'; '.join(lacks)}")
        _check_values(workflow_json, values, capable)

    async def create(
        self,
        account: Account,
        sent: Sent,
        *,
        workflow_json: dict[str, Any],
        name: str,
        tags: list[str],
        default_timeout_s: int | None = None,
        receipt: Receipt | None = None,
    ) -> Workflow:
        """A new workflow from the parameters sent (submit and template run)."""
        try:
            parameters = declared_parameters(workflow_json)
            values = validate_values(parameters, sent.texts, sent.choices, sent.files.keys())
        except (PlaceholderError, ParameterError) as exc:
            raise BadRequest(str(exc)) from exc
        timeout_s = self.resolve_timeout(account, sent.timeout_s, default_timeout_s)
        priority = self.resolve_priority(account, sent.priority)
        webhook_url = await self.resolve_webhook_url(account, sent.webhook_url, None)
        await self.check_tier(account, sent.parameter_count)
        need = await self.check_runner_available(account, tags, workflow_json, values)
        params = WorkflowParams(values=values, files={n: f for n, f in sent.files.items() if n in parameters})
        wf = new_workflow(
            account_id=account.id,
            name=name,
            tags=tags,
            tag_index=tag_index(tags),
            workflow_json=workflow_json,
            workflow_params=params.stored(),
            correlation_id=sent.correlation_id,
            priority=priority,
            webhook_url=webhook_url,
        )
        wf = await self._add(account, wf, timeout_s, receipt, need)
        log.info("workflow %s accepted for account %s", wf.id, account.name)
        return wf

    async def rerun_with_parameters(
        self, account: Account, original: Workflow, sent: Sent, receipt: Receipt | None = None
    ) -> Workflow:
        """The rerun with new parameters: a new workflow with the original's structure, name and
        tags; the parameters sent replace the original's, the others (files included) keep
        their values, and ``$random()``/``$timestamp()`` are drawn afresh on the runner."""
        before = WorkflowParams.of(original.workflow_params)
        try:
            parameters = declared_parameters(original.workflow_json)
            values = merge_values(parameters, before.values, sent.texts, sent.choices, sent.files.keys())
        except (PlaceholderError, ParameterError) as exc:
            raise BadRequest(str(exc)) from exc
        timeout_s = self.resolve_timeout(account, sent.timeout_s, original.timeout_s)
        priority = self.resolve_priority(account, sent.priority, original.priority)
        webhook_url = await self.resolve_webhook_url(account, sent.webhook_url, original.webhook_url)
        await self.check_tier(account, sent.parameter_count)
        need = await self.check_runner_available(account, original.tags, original.workflow_json, values)
        params = WorkflowParams(values=values, files={**before.files, **sent.files})
        wf = _rerun_of(original, params, sent.correlation_id, priority=priority, webhook_url=webhook_url)
        wf = await self._add(account, wf, timeout_s, receipt, need)
        log.info("workflow %s is a rerun of %s", wf.id, original.id)
        return wf

    async def sweep(
        self,
        account: Account,
        original: Workflow,
        sets: list[Sent],
        options: Sent,
        receipt: SweepReceipt | None = None,
    ) -> list[Workflow]:
        """A rerun with new parameters for each set, all made in one transaction or none:
        every set is checked first, and the first bad one refuses the sweep with its number.
        ``options`` carries what applies to all of them (timeout_s, correlation_id, priority).
        The workflows wait in the order of their sets."""
        before = WorkflowParams.of(original.workflow_params)
        try:
            parameters = declared_parameters(original.workflow_json)
        except PlaceholderError as exc:
            raise BadRequest(str(exc)) from exc
        timeout_s = self.resolve_timeout(account, options.timeout_s, original.timeout_s)
        priority = self.resolve_priority(account, options.priority, original.priority)
        webhook_url = await self.resolve_webhook_url(account, options.webhook_url, original.webhook_url)
        await self.check_tier(account, max(s.parameter_count for s in sets), workflows=len(sets))
        sweep_id = new_id()
        planned: list[tuple[Workflow, Needs]] = []
        for number, sent in enumerate(sets, 1):
            try:
                values = merge_values(parameters, before.values, sent.texts, sent.choices, sent.files.keys())
                need = await self.check_runner_available(
                    account, original.tags, original.workflow_json, values
                )
            except (ParameterError, BadRequest) as exc:
                raise BadRequest(f"set {number}: {exc}") from exc
            params = WorkflowParams(values=values, files={**before.files, **sent.files})
            wf = _rerun_of(
                original,
                params,
                options.correlation_id,
                priority=priority,
                webhook_url=webhook_url,
                sweep_id=sweep_id,
            )
            planned.append((wf, need))
        now = utcnow()
        for number, (wf, _) in enumerate(planned):
            # A microsecond apart, so that "oldest first" keeps the sets' order.
            self._limit(account, wf, timeout_s, now + timedelta(microseconds=number))
        workflows = [wf for wf, _ in planned]
        added = await self.store.add_workflows(workflows, receipt(workflows) if receipt is not None else None)
        for wf, need in planned:
            self.fleet.enqueue(wf, need)
        log.info("sweep %s: %d reruns of %s", sweep_id, len(added), original.id)
        return added

    async def _add(
        self, account: Account, wf: Workflow, timeout_s: int, receipt: Receipt | None, need: Needs
    ) -> Workflow:
        """Store a new workflow with its limits and its first wait for a runner, then wake
        dispatch."""
        self._limit(account, wf, timeout_s, utcnow())
        wf = await self.store.add_workflow(wf, receipt(wf) if receipt is not None else None)
        self.fleet.enqueue(wf, need)
        return wf

    def _limit(self, account: Account, wf: Workflow, timeout_s: int, now: datetime) -> None:
        """A new workflow's times and limits: created now, and waiting for a runner for at
        most its tier's queue limit."""
        wf.created_at = wf.updated_at = now
        wf.timeout_s = timeout_s
        wf.queue_timeout_s = self.tier(account).max_queue_s
        wf.deadline_at = now + timedelta(seconds=wf.queue_timeout_s)


def _rerun_of(
    original: Workflow, params: WorkflowParams, correlation_id: str | None, **fields: Any
) -> Workflow:
    """A new workflow with the original's structure, name and tags, and these parameters."""
    return new_workflow(
        account_id=original.account_id,
        name=original.name,
        tags=list(original.tags),
        tag_index=tag_index(original.tags),
        workflow_json=original.workflow_json,
        workflow_params=params.stored(),
        correlation_id=correlation_id or original.correlation_id,
        parent_id=original.id,
        **fields,
    )


def _check_values(workflow_json: dict[str, Any], values: dict[str, str], capable: list[Offers]) -> None:
    try:
        check_values(workflow_json, values, capable)
    except ValueError as exc:  # ConversionError and friends: the message says what is wrong
        raise BadRequest(str(exc)) from exc
