"""HTTP endpoints for agents: input files down, outputs up. Blobs never travel on the websocket."""

from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from control_plane.db.blobs import SHA256, Download, StoredBlob
from control_plane.db.tables import Output
from control_plane.fleet.events import output_event
from control_plane.model.errors import BadRequest, Conflict, DomainError, NotFound, PayloadTooLarge
from control_plane.model.lifecycle import holds_current, runs_on
from control_plane.model.params import WorkflowParams
from control_plane.services import Services
from protocol.agent_http import FILE_PATH, OUTPUTS_PATH, SHA256_HEADER, UploadReceipt

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

# Outputs can be videos: larger than client uploads, but still bounded, one by one and in all.
MAX_OUTPUT_BYTES = 4 * 1024**3
# An output up to this size is read whole and stored in one go; a larger one is streamed.
SMALL_OUTPUT_BYTES = 4 * 1024**2


@routes.get(FILE_PATH)
async def download_input(request: web.Request) -> web.StreamResponse:
    svc: Services = request.app[Services.KEY]
    runner = await svc.auth.runner(request)
    wf = await svc.store.get_workflow(runner.account_id, request.match_info["workflow_id"])
    sha = request.match_info["sha256"]
    # Only the runner holding the job gets its files, and only the files it declares.
    files = WorkflowParams.of(wf.workflow_params).files.values()
    if not runs_on(wf, runner.id) or sha not in {f.sha256 for f in files}:
        raise NotFound("no such file for this job")
    return await svc.blobs.response(request, sha, Download("application/octet-stream"))


def _int_or_none(raw: str | None) -> int | None:
    try:
        return None if raw is None else int(raw)
    except ValueError:
        return None


async def _store_body(request: web.Request, svc: Services, limit: int, expected_sha256: str) -> StoredBlob:
    declared = request.content_length
    try:
        if declared is not None and declared <= SMALL_OUTPUT_BYTES:
            # Most outputs (an image, a short clip) fit in memory: one thread call stores them.
            return await svc.blobs.put(await request.read(), max_bytes=limit, expected_sha256=expected_sha256)
        return await svc.blobs.write(
            request.content.iter_chunked(64 * 1024), max_bytes=limit, expected_sha256=expected_sha256
        )
    except (ConnectionError, aiohttp.ClientPayloadError) as exc:
        # The agent went away mid-upload (it retries, or its job runs again): nothing is kept.
        log.info("output upload to %s broke off: %s", request.path, exc)
        raise BadRequest("the upload broke off before its end") from None


@dataclass(frozen=True)
class _Upload:
    """What an output upload says about itself in its query and headers."""

    workflow_id: str
    attempt: int
    node_id: str
    filename: str
    kind: str
    content_type: str
    sha256: str

    def output(self, account_id: str, stored: StoredBlob) -> Output:
        return Output(
            workflow_id=self.workflow_id,
            account_id=account_id,
            attempt=self.attempt,
            node_id=self.node_id,
            filename=self.filename.rsplit("/", 1)[-1],
            kind=self.kind,
            content_type=self.content_type,
            size_bytes=stored.size_bytes,
            sha256=stored.sha256,
        )


def _upload_of(request: web.Request) -> _Upload | None:
    """The upload's description, or ``None`` when something in it is missing or malformed."""
    q = request.query
    attempt = _int_or_none(q.get("attempt"))
    node_id, filename = q.get("node_id"), q.get("filename")
    sha256 = request.headers.get(SHA256_HEADER, "").lower()
    if attempt is None or node_id is None or filename is None or not SHA256.fullmatch(sha256):
        return None
    content_type = (
        request.headers.get("Content-Type") or mimetypes.guess_type(filename)[0] or "application/octet-stream"
    )
    return _Upload(
        request.match_info["workflow_id"],
        attempt,
        node_id,
        filename,
        q.get("kind", "images"),
        content_type,
        sha256,
    )


@routes.put(OUTPUTS_PATH)
async def upload_output(request: web.Request) -> web.Response:
    """One output of the runner's current attempt, stored in the blob store and checked
    against its sha256. The same file sent again (a retry, or an agent that restarted) is
    answered with the output already recorded (200 rather than 201)."""
    svc: Services = request.app[Services.KEY]
    runner = await svc.auth.runner(request)
    upload = _upload_of(request)
    declared = request.content_length
    if upload is not None and declared is not None and declared <= SMALL_OUTPUT_BYTES:
        # The common case, an image or a short clip: the body is read and stored first, then
        # fenced, checked and recorded in one unit.
        try:
            stored = await _store_body(request, svc, SMALL_OUTPUT_BYTES, upload.sha256)
        except BadRequest:
            # Damaged bytes are a 400, but a workflow that is not there, or not this
            # runner's to upload to, says so first, as it does for a large output.
            wf, _ = await svc.store.upload_state(
                runner.account_id, upload.workflow_id, upload.attempt, runner.id
            )
            if not holds_current(wf, upload.attempt, runner.id):
                raise Conflict(
                    f"attempt {upload.attempt} of workflow {wf.id} is not current on this runner"
                ) from None
            raise
        try:
            recorded = await svc.store.add_small_output(
                runner.account_id,
                upload.output(runner.account_id, stored),
                runner.id,
                svc.settings.max_job_output_bytes,
            )
        except DomainError:
            await _forget(svc, stored)
            raise
        return _receipt(svc, runner.id, recorded)
    return await _streamed_upload(request, svc, runner.id, runner.account_id, upload)


async def _streamed_upload(
    request: web.Request, svc: Services, runner_id: str, account_id: str, upload: _Upload | None
) -> web.Response:
    """A large output (or a malformed request): refused on what it declares before a byte of
    its body is read, then streamed into the blob store."""
    attempt = _int_or_none(request.query.get("attempt"))
    # Another account's workflow is a 404 whatever else is wrong with the request.
    wf, uploaded_bytes = await svc.store.upload_state(
        account_id, request.match_info["workflow_id"], attempt, runner_id
    )
    if attempt is None or request.query.get("node_id") is None or request.query.get("filename") is None:
        raise BadRequest("attempt, node_id and filename are required query parameters")
    if upload is None:
        raise BadRequest("X-Content-SHA256 must be the sha256 of the body, in hex")
    if not holds_current(wf, attempt, runner_id):
        raise Conflict(f"attempt {attempt} of workflow {wf.id} is not current on this runner")
    declared = request.content_length
    if declared is not None and declared > MAX_OUTPUT_BYTES:
        raise PayloadTooLarge(f"an output is at most {MAX_OUTPUT_BYTES} bytes; this one declares {declared}")
    room = svc.settings.max_job_output_bytes - uploaded_bytes
    if declared is not None and declared > room:
        raise PayloadTooLarge(
            f"attempt {attempt} of workflow {wf.id} may upload {svc.settings.max_job_output_bytes} bytes "
            f"of outputs in all; {max(room, 0)} are left"
        )
    stored = await _store_body(request, svc, min(MAX_OUTPUT_BYTES, max(room, 0)), upload.sha256)
    recorded = await svc.store.add_output(upload.output(wf.account_id, stored), runner_id)
    if recorded is None:
        # The upload took a while: the attempt was cancelled or replaced meanwhile.
        await _forget(svc, stored)
        raise Conflict(f"attempt {attempt} of workflow {wf.id} ended while its output was uploaded")
    return _receipt(svc, runner_id, recorded)


async def _forget(svc: Services, stored: StoredBlob) -> None:
    """A blob stored for an upload that was then refused goes, unless something uses it."""
    if stored.created and not await svc.store.blob_referenced(stored.sha256):
        await svc.blobs.delete(stored.sha256)


def _receipt(svc: Services, runner_id: str, recorded: tuple[Output, bool]) -> web.Response:
    out, created = recorded
    if created:
        log.info(
            "workflow %s: output %s (%s, %d bytes) from runner %s",
            out.workflow_id,
            out.filename,
            out.kind,
            out.size_bytes,
            runner_id,
        )
        svc.hub.publish(out.workflow_id, "output", output_event(out))
    receipt = UploadReceipt(output_id=out.id, size_bytes=out.size_bytes, sha256=out.sha256)
    return web.json_response(receipt.model_dump(), status=201 if created else 200)
