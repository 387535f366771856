"""``POST /v1/workflow/{id}/rerun``, the rerun with new parameters: multipart, a new
workflow. The rerun from a task, in place, is Conductor's (``conductor.py``)."""

from __future__ import annotations

from aiohttp import web

from control_plane.model.errors import BadRequest
from control_plane.services import Services
from control_plane.web import idempotency
from control_plane.web.forms import read_form
from control_plane.web.views import workflow_view
from control_plane.web.workflows import created_receipt

routes = web.RouteTableDef()

# A rerun copies everything but the dynamic parameters: these fields would change the rest.
_FIXED_ON_RERUN = ("workflow_json", "name", "tags")


@routes.post("/v1/workflow/{id}/rerun")
async def rerun_with_new_parameters(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    original = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    async with read_form(request, svc, principal.account) as form:
        sent = set(form.fields) | ({"workflow_json"} if form.workflow_json else set())
        fixed = [f for f in _FIXED_ON_RERUN if f in sent]
        if fixed:
            raise BadRequest(
                f"a rerun copies {', '.join(fixed)} from the original; "
                "send only $text, $file and #choice parameters "
                "(and timeout_s, correlation_id, priority, webhook_url)"
            )
        form.only("timeout_s", "correlation_id", "priority", "webhook_url")

        async def produce(claim: idempotency.Claim | None) -> web.Response:
            wf = await svc.submissions.rerun_with_parameters(
                principal.account, original, form.sent(), created_receipt(claim)
            )
            return web.json_response(workflow_view(wf), status=201)

        return await idempotency.once(request, principal.account.id, form.fingerprint(), produce)
