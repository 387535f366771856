"""/v1/workflow: submit, read, list, cancel, follow (SSE), list tasks and fetch outputs."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import quote

from aiohttp import web

from control_plane.db.blobs import Download
from control_plane.db.rows import WorkflowState
from control_plane.fleet.events import Event, EventName, output_event, status_event
from control_plane.fleet.journal import behind
from control_plane.fleet.submissions import Receipt
from control_plane.model.errors import BadRequest
from control_plane.model.lifecycle import TERMINAL, WorkflowStatus
from control_plane.model.names import TAG
from control_plane.services import Services
from control_plane.web import idempotency
from control_plane.web.forms import MAX_NAME_CHARS, SUBMIT_FIELDS, read_form
from control_plane.web.http_util import paging
from control_plane.web.views import task_view, workflow_summary, workflow_view

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
SSE_KEEPALIVE_S = 15.0


def services(request: web.Request) -> Services:
    return request.app[Services.KEY]


def created_receipt(claim: idempotency.Claim | None) -> Receipt | None:
    """For a request that creates a workflow: its 201 answer, kept for the key's retries."""
    if claim is None:
        return None
    return lambda wf: claim.receipt(201, json.dumps(workflow_view(wf)))


@routes.post("/v1/workflow")
async def submit_workflow(request: web.Request) -> web.Response:
    svc = services(request)
    principal = await svc.auth.client(request)
    svc.submissions.check_submit_rate(principal.account, principal.token_id)
    async with read_form(request, svc, principal.account) as form:
        form.only(*SUBMIT_FIELDS)

        async def produce(claim: idempotency.Claim | None) -> web.Response:
            wf = await svc.submissions.create(
                principal.account,
                form.sent(),
                workflow_json=await form.workflow(),
                name=form.text_field("name", MAX_NAME_CHARS) or "untitled",
                tags=form.tags(),
                receipt=created_receipt(claim),
            )
            return web.json_response(workflow_view(wf), status=201)

        return await idempotency.once(request, principal.account.id, form.fingerprint(), produce)


@routes.get("/v1/workflow")
async def list_workflows(request: web.Request) -> web.Response:
    svc = services(request)
    principal = await svc.auth.client(request)
    offset, limit = paging(request)
    filters = {
        k: request.query[k]
        for k in ("status", "parent_id", "correlation_id", "sweep_id", "tag")
        if k in request.query
    }
    if "status" in filters and filters["status"] not in set(WorkflowStatus):
        raise BadRequest(f"status must be one of {', '.join(WorkflowStatus)}")
    if "tag" in filters and not TAG.fullmatch(filters["tag"]):
        raise BadRequest("tag must be letters, digits and _ . : - (at most 64)")
    rows, total = await svc.store.list_workflows(principal.account.id, offset, limit, filters)
    return web.json_response(
        {"workflows": [workflow_summary(w) | {"parent_id": w.parent_id} for w in rows], "total": total}
    )


@routes.get("/v1/workflow/{id}")
async def get_workflow(request: web.Request) -> web.Response:
    svc = services(request)
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    queue_number = svc.queue_position(wf)
    children = await svc.store.child_ids(wf.id)
    tasks = await svc.store.tasks(wf.id, wf.attempt)
    return web.json_response(workflow_view(wf, queue_number=queue_number, children=children, tasks=tasks))


@routes.get("/v1/workflow/{id}/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    """Every attempt's tasks, the newest attempt first (``?attempt=N``: that one's)."""
    svc = services(request)
    principal = await svc.auth.client(request)
    attempt = request.query.get("attempt")
    if attempt is not None and not (attempt.isascii() and attempt.isdigit() and 0 < int(attempt) < 2**31):
        raise BadRequest("attempt must be a positive whole number")
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    tasks = await svc.store.tasks(wf.id, int(attempt) if attempt is not None else None)
    return web.json_response({"tasks": [task_view(t) for t in tasks], "attempt": wf.attempt})


@routes.post("/v1/workflow/{id}/cancel")
async def cancel_workflow(request: web.Request) -> web.Response:
    svc = services(request)
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    if wf.status in TERMINAL:
        raise BadRequest(f"workflow {wf.id} is already {wf.status}")
    cancelled = await svc.fleet.cancel(wf)
    if cancelled is None:  # it finished while we were looking
        current = await svc.store.get_workflow(principal.account.id, wf.id)
        raise BadRequest(f"workflow {wf.id} is already {current.status}")
    return web.json_response(workflow_view(cancelled))


@routes.delete("/v1/workflow/{id}")
async def delete_workflow(request: web.Request) -> web.Response:
    """A finished workflow, gone with its tasks, outputs and events, and the files (inputs,
    outputs) no other workflow or upload uses. 409 while it runs: cancel it first."""
    svc = services(request)
    principal = await svc.auth.client(request)
    unused = await svc.store.delete_workflow(principal.account.id, request.match_info["id"])
    for sha256 in unused:
        # A request in flight may be about to refer to the same bytes (it stored them again
        # under the same address): it keeps them.
        if not svc.blobs.held(sha256):
            await svc.blobs.delete(sha256)
    log.info("workflow %s deleted (%d files removed)", request.match_info["id"], len(unused))
    return web.Response(status=204)


@routes.get("/v1/workflow/{id}/outputs")
async def list_outputs(request: web.Request) -> web.Response:
    svc = services(request)
    principal = await svc.auth.client(request)
    wf = await svc.store.get_workflow(principal.account.id, request.match_info["id"])
    outputs = [output_event(o) for o in await svc.store.outputs(wf.id, wf.attempt)]
    return web.json_response({"outputs": outputs, "total": len(outputs)})


@routes.get("/v1/output/{id}")
async def download_output(request: web.Request) -> web.StreamResponse:
    svc = services(request)
    principal = await svc.auth.client(request)
    out = await svc.store.get_output(principal.account.id, request.match_info["id"])
    download = Download(
        content_type=safe_content_type(out.content_type),
        content_disposition=content_disposition(out.filename),
        headers=(
            # The type a runner declared is not to be second-guessed into something a
            # browser runs, here on the control plane's own origin.
            ("X-Content-Type-Options", "nosniff"),
            ("Content-Security-Policy", "default-src 'none'; sandbox"),
        ),
    )
    return await svc.blobs.response(request, out.sha256, download)


# Kinds of output a browser only displays. Anything else (HTML, SVG, scripts) is served as
# bytes to save: a runner's ComfyUI names the type, and it must not run on this origin.
_SAFE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/avif", "text/plain"})
_SAFE_FAMILIES = ("video/", "audio/")


def safe_content_type(declared: str) -> str:
    base = declared.split(";", 1)[0].strip().lower()
    if base in _SAFE_TYPES or base.startswith(_SAFE_FAMILIES):
        return base
    return "application/octet-stream"


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback name and the exact one, percent-encoded as UTF-8."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _sse(event: str, data: dict[str, object], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class _Told:
    """What a stream has told its client: the last status (a status repeated without a new
    queue position is not told again) and the logged events it has sent or passed over."""

    def __init__(self, last: tuple[str, int]) -> None:
        self.last = last
        self.seen: set[str] = set()

    def frame(self, event: Event) -> bytes | None:
        if event.id is not None:
            if event.id in self.seen:
                return None  # sent from the log already
            self.seen.add(event.id)
        if event.name == "status":
            now = (str(event.data["status"]), int(event.data["attempt"]))
            if now == self.last and event.data.get("queue_number") is None:
                return None
            self.last = now
        return _sse(event.name, event.data, event.id)


async def _stream(
    resp: web.StreamResponse,
    queue: asyncio.Queue[Event],
    told: _Told,
    recheck: Callable[[], Awaitable[WorkflowState | None]] | None,
) -> None:
    """Every change, until a terminal state (or shutdown). With ``recheck`` (events relayed
    from other control planes, which can go unheard) the workflow is read again at each
    keepalive, so that a stream always reaches its end."""
    while told.last[0] not in TERMINAL:
        try:
            event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
        except TimeoutError:
            await resp.write(b": keepalive\n\n")
            state = await recheck() if recheck is not None else None
            if state is None or (state.status, state.attempt) == told.last:
                continue
            event = Event("status", status_event(state))
        if event.name == "shutdown":
            break
        frame = told.frame(event)
        if frame is not None:
            await resp.write(frame)


async def _first_frames(
    svc: Services, wf: WorkflowState, last_event_id: str | None
) -> tuple[list[bytes], _Told]:
    """How a stream starts: with the current status, or, for a client that says the last
    event it got (``Last-Event-ID``) and whose event the log has, with what it missed."""
    now = (wf.status, wf.attempt)
    resumed = None
    if last_event_id and svc.hub.journal is not None:
        resumed = await svc.hub.journal.since(wf.id, last_event_id, now)
    if resumed is None:
        told = _Told(now)
        return [_sse("status", status_event(wf) | {"queue_number": svc.queue_position(wf)})], told
    before, missed = resumed
    told = _Told((str(before["status"]), int(before["attempt"])) if before is not None else ("", 0))
    frames = [f for f in (told.frame(Event(cast(EventName, e.name), e.data, e.origin)) for e in missed) if f]
    if behind(told.last, now):
        # The log lacks the latest (a crash took it before its write, or the control plane
        # that published it is that late writing it): the store has it.
        frames.append(_sse("status", status_event(wf)))
        told.last = now
    return frames, told


@routes.get("/v1/workflow/{id}/subscribe")
async def subscribe(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the current status first, then every change; closes once the
    workflow reaches a terminal state. Each logged event has an ``id:``; a client that
    reconnects with ``Last-Event-ID`` gets the events it missed instead of the status."""
    svc = services(request)
    principal = await svc.auth.client(request)
    # Subscribe before reading the snapshot so that no change falls between the two.
    with svc.hub.subscribe(request.match_info["id"]) as queue:
        wf = await svc.store.workflow_state(principal.account.id, request.match_info["id"])
        frames, told = await _first_frames(svc, wf, request.headers.get("Last-Event-ID"))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        try:
            for frame in frames:
                await resp.write(frame)
            shared = svc.fleet.replicas is not None
            recheck = functools.partial(svc.store.state_of, wf.id) if shared else None
            await _stream(resp, queue, told, recheck)
            await resp.write_eof()
        except ConnectionResetError:
            # The client left: an ordinary end of a stream, not an error.
            log.info("workflow %s: event stream closed by the client", wf.id)
    return resp
