"""Parameter sweeps: ``POST /v1/workflow/{id}/sweep`` makes a rerun with new parameters for
each set of a grid or a list, in one request and one transaction; ``/v1/sweep/{id}`` follows
them together and ``/v1/sweep/{id}/cancel`` cancels those that have not finished.

The body is JSON (``sweep_sets.py`` has its shapes). A ``$file`` value names a file the
account uploaded with ``POST /v1/blob`` by its sha256: a sweep refers to files, it does not
carry them."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from aiohttp import web

from control_plane.db.tables import Workflow
from control_plane.fleet.submissions import Sent
from control_plane.model.errors import BadRequest
from control_plane.model.lifecycle import TERMINAL
from control_plane.model.params import FileRef
from control_plane.model.sweep_sets import parameter_sets
from control_plane.services import Services
from control_plane.web import idempotency, json_form
from control_plane.web.json_form import JsonInputs
from control_plane.web.multipart import media_type
from control_plane.web.views import workflow_summary

routes = web.RouteTableDef()
_OPTIONS = ("timeout_s", "correlation_id", "priority", "webhook_url")
# A sweep's body names files and values; it never needs the size of a submission's.
_MAX_BODY_BYTES = 8 * 1024 * 1024


@routes.post("/v1/workflow/{id}/sweep")
async def sweep(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    original = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    if media_type(request.headers.get("Content-Type", "")) != "application/json":
        raise BadRequest('a sweep is a JSON object: {"grid": {…}} or {"sets": […]}')
    body = await json_form.read_body(request, _MAX_BODY_BYTES)
    unknown = sorted(set(body) - {"grid", "sets", *_OPTIONS})
    if unknown:
        raise BadRequest(
            f"unknown field {', '.join(repr(u[:64]) for u in unknown[:5])}; a sweep takes grid or sets, "
            f"and {', '.join(_OPTIONS)}"
        )
    inputs = JsonInputs(
        svc.store, principal.account.id, svc.settings.input_fetch_timeout_s, svc.settings.fetch_private_urls
    )
    files = _Files(svc, inputs)
    sets = [await _sent(f"set {n}", one, files) for n, one in enumerate(parameter_sets(body), 1)]
    options = Sent(
        timeout_s=_option(body, "timeout_s", int),
        correlation_id=_option(body, "correlation_id", str),
        priority=_option(body, "priority", int),
        webhook_url=_option(body, "webhook_url", str),
    )
    if options.correlation_id is not None and len(options.correlation_id) > 255:
        raise BadRequest("correlation_id is at most 255 characters")

    async def produce(claim: idempotency.Claim | None) -> web.Response:
        def receipt(workflows: list[Workflow]) -> Any:
            return claim.receipt(201, json.dumps(sweep_view(workflows))) if claim is not None else None

        made = await svc.submissions.sweep(principal.account, original, sets, options, receipt)
        return web.json_response(sweep_view(made), status=201)

    return await idempotency.once(request, principal.account.id, idempotency.fingerprint(body), produce)


@routes.get("/v1/sweep/{id}")
async def get_sweep(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    workflows = await svc.store.sweep_workflows(principal.account.id, request.match_info["id"])
    return web.json_response(sweep_view(workflows))


@routes.post("/v1/sweep/{id}/cancel")
async def cancel_sweep(request: web.Request) -> web.Response:
    """Cancel every workflow of the sweep that has not finished; those that have keep their
    results. Answers the sweep as it is afterwards, and how many this cancelled (``cancelled_now``)."""
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    sweep_id = request.match_info["id"]
    cancelled = 0
    for wf in await svc.store.sweep_workflows(principal.account.id, sweep_id):
        if wf.status not in TERMINAL and await svc.fleet.cancel(wf) is not None:
            cancelled += 1
    workflows = await svc.store.sweep_workflows(principal.account.id, sweep_id)
    return web.json_response(sweep_view(workflows) | {"cancelled_now": cancelled})


def sweep_view(workflows: list[Workflow]) -> dict[str, Any]:
    """The sweep, its workflows in the order of its sets, and how many are in each status."""
    first = workflows[0]
    return {
        "sweep_id": first.sweep_id,
        "parent_id": first.parent_id,
        "total": len(workflows),
        "counts": dict(Counter(str(wf.status) for wf in workflows)),
        "workflows": [workflow_summary(wf) for wf in workflows],
    }


class _Files:
    """The sha256 files a sweep names, each looked up once however many sets name it."""

    def __init__(self, svc: Services, inputs: JsonInputs) -> None:
        self.svc = svc
        self.inputs = inputs
        self.found: dict[str, FileRef] = {}

    async def ref(self, name: str, value: Any) -> FileRef:
        if not (isinstance(value, dict) and "sha256" in value) or {"base64", "url"} & set(value):
            raise BadRequest(
                f'{name}: a file in a sweep is {{"sha256": …}} of a file uploaded with POST /v1/blob'
            )
        key = json.dumps(value, sort_keys=True)
        if key not in self.found:
            ref, _ = await json_form.file_ref(name, value, self.svc.blobs, self.inputs, 0)
            self.found[key] = ref
        return self.found[key]


async def _sent(where: str, values: dict[str, Any], files: _Files) -> Sent:
    texts: dict[str, str] = {}
    choices: dict[str, str] = {}
    refs: dict[str, FileRef] = {}
    for name, value in values.items():
        if name.startswith("$") and isinstance(value, dict):
            refs[name[1:]] = await files.ref(f"{where} {name}", value)
        else:
            text = json_form.scalar_text(f"{where} {name}", value)
            if "\x00" in text:
                raise BadRequest(f"{where} {name} holds a NUL character")
            (texts if name.startswith("$") else choices)[name[1:]] = text
    return Sent(texts=texts, choices=choices, files=refs)


def _option(body: dict[str, Any], name: str, kind: type) -> str | None:
    """An option as the fleet takes it (text); 400 unless it is JSON of its kind."""
    if name not in body:
        return None
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{name} must be {'a whole number' if kind is int else 'a string'}")
    text = str(value).strip()
    if "\x00" in text:
        raise BadRequest(f"{name} holds a NUL character")
    return text or None
