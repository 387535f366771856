"""/v1/template: reusable workflows with placeholders, and runs of them."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any

from aiohttp import web

from control_plane.db.tables import Account, Template
from control_plane.fleet.events import iso
from control_plane.model.errors import BadRequest
from control_plane.services import Services
from control_plane.web import idempotency
from control_plane.web.forms import MAX_NAME_CHARS, SUBMIT_FIELDS, SubmittedForm, read_form
from control_plane.web.http_util import paging
from control_plane.web.views import workflow_view
from control_plane.web.workflows import created_receipt
from protocol.placeholders import PlaceholderError, declared_parameters

routes = web.RouteTableDef()


def template_view(template: Template) -> dict[str, Any]:
    return {
        "id": template.id,
        "name": template.name,
        "description": template.description,
        "body": template.body,
        "timeout_s": template.timeout_s,
        # What a client needs to build a form: name, kind, field, default, options, required.
        "parameters": [p.to_dict() for p in declared_parameters(template.body).values()],
        "created_at": iso(template.created_at),
        "updated_at": iso(template.updated_at),
    }


# A template's timeout is held to the tier's maximum when it runs; stored, it is bounded here.
_MAX_TEMPLATE_TIMEOUT_S = 30 * 24 * 3600


async def _template_fields(form: SubmittedForm, *, partial: bool) -> dict[str, Any]:
    if form.texts or form.choices or form.files:
        raise BadRequest("a template takes name, description and body; parameters are sent when it runs")
    form.only("name", "description", "timeout_s")
    changes: dict[str, Any] = {}
    if "name" in form.fields or not partial:
        name = form.fields.get("name", "").strip()
        if not name or len(name) > 200:
            raise BadRequest("name must be a non-empty string of at most 200 characters")
        changes["name"] = name
    if "description" in form.fields:
        changes["description"] = form.fields["description"]
    if "timeout_s" in form.fields:
        raw = form.fields["timeout_s"].strip()
        if raw and not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= _MAX_TEMPLATE_TIMEOUT_S):
            raise BadRequest(
                f"timeout_s must be a whole number of seconds from 1 to {_MAX_TEMPLATE_TIMEOUT_S} "
                "(empty: the tier's default)"
            )
        changes["timeout_s"] = int(raw) if raw else None
    if form.workflow_json is not None or "body" in form.fields or not partial:
        form.workflow_json = form.workflow_json or form.fields.get("body", "").encode() or None
        if form.workflow_json is None:
            raise BadRequest("body is required (the workflow JSON, as a file part or a field)")
        body = await form.workflow("body")
        try:
            declared_parameters(body)
        except PlaceholderError as exc:
            raise BadRequest(str(exc)) from exc
        changes["body"] = body
    return changes


def _template_form(
    request: web.Request, svc: Services, account: Account
) -> AbstractAsyncContextManager[SubmittedForm]:
    return read_form(request, svc, account)


def _body_part(form: SubmittedForm) -> SubmittedForm:
    # The body travels as a part named "body"; forms.py keeps only "workflow_json" as bytes.
    if "body" in form.fields:
        form.workflow_json = form.fields.pop("body").encode()
    return form


@routes.post("/v1/template")
async def create_template(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    async with _template_form(request, svc, principal.account) as form:
        changes = await _template_fields(_body_part(form), partial=False)
    template = await svc.store.add_template(Template(account_id=principal.account.id, **changes))
    return web.json_response(template_view(template), status=201)


@routes.get("/v1/template")
async def list_templates(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    offset, limit = paging(request)
    rows, total = await svc.store.list_templates(principal.account.id, offset, limit)
    return web.json_response({"templates": [template_view(t) for t in rows], "total": total})


@routes.get("/v1/template/{id}")
async def get_template(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    template = await svc.store.get_template(principal.account.id, request.match_info["id"])
    return web.json_response(template_view(template))


@routes.put("/v1/template/{id}")
async def update_template(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    await svc.store.get_template(principal.account.id, request.match_info["id"])
    async with _template_form(request, svc, principal.account) as form:
        changes = await _template_fields(_body_part(form), partial=True)
    template = await svc.store.update_template(principal.account.id, request.match_info["id"], changes)
    return web.json_response(template_view(template))


@routes.post("/v1/template/{id}/run")
async def run_template(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    template = await svc.store.get_template(principal.account.id, request.match_info["id"])
    async with _template_form(request, svc, principal.account) as form:
        form.only(*SUBMIT_FIELDS)

        async def produce(claim: idempotency.Claim | None) -> web.Response:
            if form.workflow_json is not None:
                raise BadRequest(
                    "a template run takes its workflow from the template; do not send workflow_json"
                )
            wf = await svc.submissions.create(
                principal.account,
                form.sent(),
                workflow_json=template.body,
                name=form.text_field("name", MAX_NAME_CHARS) or template.name,
                tags=form.tags(),
                default_timeout_s=template.timeout_s,
                receipt=created_receipt(claim),
            )
            return web.json_response(workflow_view(wf), status=201)

        return await idempotency.once(request, principal.account.id, form.fingerprint(), produce)
