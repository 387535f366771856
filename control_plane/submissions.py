"""Making workflows: a new submission, a template run, and a rerun with new parameters all
pass through here, so each checks the same things in the same order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from control_plane.capabilities import Offers, check_values, missing, needs
from control_plane.errors import BadRequest, Forbidden, TooManyRequests
from control_plane.forms import SubmittedForm
from control_plane.registry import tags_match
from control_plane.services import Services
from control_plane.settings import Tier
from control_plane.store import day_ago
from control_plane.tables import Account, IdempotencyRecord, Workflow, tag_index, utcnow
from protocol.placeholders import (
    ParameterError,
    PlaceholderError,
    declared_parameters,
    merge_values,
    validate_values,
)

log = logging.getLogger(__name__)

# The plain fields a submission (and a template run) takes, beside workflow_json, $name
# parameters and #name choices.
SUBMIT_FIELDS = ("name", "tags", "correlation_id", "timeout_s")

# The Idempotency-Key's answer for a new workflow, stored in the transaction that creates it.
Receipt = Callable[[Workflow], IdempotencyRecord | None]


def _tier(svc: Services, account: Account) -> Tier:
    return svc.settings.tiers.get(account.tier) or svc.settings.tiers["free"]


def resolve_timeout(svc: Services, account: Account, requested: str | None, fallback: int | None) -> int:
    """The attempt timeout: what the request asks for (up to the tier's maximum), else the
    template's or the original's, else the tier's default."""
    tier = _tier(svc, account)
    if requested is None or not requested.strip():
        return min(fallback, tier.max_timeout_s) if fallback is not None else tier.default_timeout_s
    try:
        value = int(requested)
    except ValueError:
        raise BadRequest(f"timeout_s must be a whole number of seconds, not {requested!r}") from None
    if not 1 <= value <= tier.max_timeout_s:
        raise BadRequest(f"timeout_s must be between 1 and {tier.max_timeout_s} s on the {tier.name} tier")
    return value


def waiting(wf: Workflow, svc: Services, account: Account, timeout_s: int) -> Workflow:
    """A new workflow's limits and its first wait for a runner."""
    now = utcnow()
    wf.created_at = wf.updated_at = now
    wf.timeout_s = timeout_s
    wf.queue_timeout_s = _tier(svc, account).max_queue_s
    wf.deadline_at = now + timedelta(seconds=wf.queue_timeout_s)
    return wf


def check_submit_rate(svc: Services, account: Account, token_id: str) -> None:
    """429 past the tier's submissions per second for this token (checked before the body
    is read, so that a flood costs as little as it can)."""
    tier = _tier(svc, account)
    wait_s = svc.rate_limits.take(token_id, tier.submits_per_s, tier.submit_burst)
    if wait_s > 0:
        raise TooManyRequests(
            f"the {tier.name} tier submits at most {tier.submits_per_s:g} workflows a second "
            f"(bursts of {tier.submit_burst}); try again in {wait_s:.1f} s",
            wait_s,
        )


def check_parameter_count(svc: Services, account: Account, parameter_count: int) -> None:
    tier = _tier(svc, account)
    if parameter_count > tier.max_parameters:
        raise Forbidden(
            f"{parameter_count} parameters sent; the {tier.name} tier allows {tier.max_parameters}"
        )


async def check_tier(svc: Services, account: Account, parameter_count: int) -> None:
    """Parameters per request and workflows per day (a rerun that creates one counts)."""
    check_parameter_count(svc, account, parameter_count)
    tier = _tier(svc, account)
    used = await svc.store.count_workflows_since(account.id, day_ago())
    if used >= tier.max_workflows_per_day:
        raise Forbidden(
            f"workflow limit of the {tier.name} tier reached ({tier.max_workflows_per_day} a day)"
        )


async def check_runner_available(
    svc: Services, account: Account, tags: list[str], workflow_json: dict[str, Any], values: dict[str, str]
) -> None:
    """400 unless some active runner with matching tags can run the workflow, as far as
    anyone knows (a runner that never connected has not said what it lacks)."""
    runners = [
        r
        for r in await svc.store.account_runners(account.id)
        if r.status == "active" and tags_match(r.tags, tags)
    ]
    if not runners:
        raise BadRequest(f"no runner available with matching tags {tags}")
    need = needs(workflow_json, values)
    shortfalls: list[tuple[str, list[str]]] = []
    capable: list[Offers] = []
    unknown = False
    for runner in runners:
        live = svc.registry.get(runner.id)
        offers = live.offers if live is not None else Offers.of(runner.comfyui)
        lacks = missing(need, offers)
        if lacks is None:
            unknown = True
        elif lacks:
            shortfalls.append((runner.name, lacks))
        else:
            capable.append(offers)  # type: ignore[arg-type]
    if not capable and not unknown:
        name, lacks = min(shortfalls, key=lambda item: sum(len(p) for p in item[1]))
        raise BadRequest(f"no runner can run this workflow: {name} lacks {'; '.join(lacks)}")
    try:
        check_values(workflow_json, values, capable)
    except ValueError as exc:  # ConversionError and friends: the message says what is wrong
        raise BadRequest(str(exc)) from exc


async def create_workflow(
    svc: Services,
    account: Account,
    form: SubmittedForm,
    *,
    workflow_json: dict[str, Any],
    name: str,
    tags: list[str],
    default_timeout_s: int | None = None,
    receipt: Receipt | None = None,
) -> Workflow:
    """A new workflow from a form's parameters (submit and template run)."""
    try:
        parameters = declared_parameters(workflow_json)
        values = validate_values(parameters, form.texts, form.choices, form.files.keys())
    except (PlaceholderError, ParameterError) as exc:
        raise BadRequest(str(exc)) from exc
    timeout_s = resolve_timeout(svc, account, form.fields.get("timeout_s"), default_timeout_s)
    await check_tier(svc, account, form.parameter_count)
    await check_runner_available(svc, account, tags, workflow_json, values)
    wf = waiting(
        Workflow(
            account_id=account.id,
            name=name,
            tags=tags,
            tag_index=tag_index(tags),
            workflow_json=workflow_json,
            workflow_params={
                "values": values,
                "files": {n: form.files[n].to_param() for n in parameters if n in form.files},
            },
            correlation_id=form.text_field("correlation_id", 255),
        ),
        svc,
        account,
        timeout_s,
    )
    wf = await svc.store.add_workflow(wf, receipt(wf) if receipt is not None else None)
    log.info("workflow %s accepted for account %s", wf.id, account.name)
    svc.fleet.kick()
    return wf


# A rerun copies everything but the dynamic parameters: these fields would change the rest.
_FIXED_ON_RERUN = ("workflow_json", "name", "tags")


async def rerun_with_parameters(
    svc: Services, account: Account, original: Workflow, form: SubmittedForm, receipt: Receipt | None = None
) -> Workflow:
    """The rerun with new parameters: a new workflow with the original's structure, name and
    tags; the parameters sent replace the original's, the others (files included) keep their
    values, and ``$random()``/``$timestamp()`` are drawn afresh on the runner."""
    fixed = [f for f in _FIXED_ON_RERUN if f in form.fields or (f == "workflow_json" and form.workflow_json)]
    if fixed:
        raise BadRequest(
            f"a rerun copies {', '.join(fixed)} from the original; "
            "send only $text, $file and #choice parameters (and timeout_s, correlation_id)"
        )
    form.only("timeout_s", "correlation_id")
    try:
        parameters = declared_parameters(original.workflow_json)
        previous = original.workflow_params.get("values", {})
        values = merge_values(parameters, previous, form.texts, form.choices, form.files.keys())
    except (PlaceholderError, ParameterError) as exc:
        raise BadRequest(str(exc)) from exc
    timeout_s = resolve_timeout(svc, account, form.fields.get("timeout_s"), original.timeout_s)
    await check_tier(svc, account, form.parameter_count)
    await check_runner_available(svc, account, original.tags, original.workflow_json, values)
    files = dict(original.workflow_params.get("files", {}))
    files.update({n: f.to_param() for n, f in form.files.items()})
    wf = waiting(
        Workflow(
            account_id=account.id,
            name=original.name,
            tags=list(original.tags),
            tag_index=tag_index(original.tags),
            workflow_json=original.workflow_json,
            workflow_params={"values": values, "files": files},
            correlation_id=form.text_field("correlation_id", 255) or original.correlation_id,
            parent_id=original.id,
        ),
        svc,
        account,
        timeout_s,
    )
    wf = await svc.store.add_workflow(wf, receipt(wf) if receipt is not None else None)
    log.info("workflow %s is a rerun of %s", wf.id, original.id)
    svc.fleet.kick()
    return wf
