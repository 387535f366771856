"""``POST /v1/blob``: a file uploaded on its own, once, to be named by its sha256 as a
``$file`` parameter of any later JSON submission of the account (``json_form.py``), so a
large input is sent once however many workflows use it.

The body is the file itself, streamed into the blob store within the request cap::

    curl --data-binary @fox.png -H 'Content-Type: image/png' \\
         -H "Authorization: Bearer $TOKEN" 'localhost:8080/v1/blob?filename=fox.png'
"""

from __future__ import annotations

from aiohttp import web

from control_plane.db.tables import AccountBlob
from control_plane.fleet.events import iso
from control_plane.model.errors import BadRequest
from control_plane.services import Services
from control_plane.web.forms import MAX_NAME_CHARS, check_declared_length, no_nul

routes = web.RouteTableDef()
_CHUNK = 64 * 1024


@routes.post("/v1/blob")
async def upload(request: web.Request) -> web.Response:
    svc: Services = request.app[Services.KEY]
    principal = await svc.auth.client(request)
    filename = no_nul(request.query.get("filename", "").strip(), "filename")
    if not filename or len(filename) > MAX_NAME_CHARS:
        raise BadRequest(f"say the file's name: ?filename=… (at most {MAX_NAME_CHARS} characters)")
    check_declared_length(request, svc.settings.max_request_bytes)
    stored = await svc.blobs.write(
        request.content.iter_chunked(_CHUNK), max_bytes=svc.settings.max_request_bytes
    )
    content_type = request.headers.get("Content-Type") or None
    svc.blobs.hold(stored.sha256)
    try:
        blob, new = await svc.store.keep_account_blob(
            AccountBlob(
                account_id=principal.account.id,
                sha256=stored.sha256,
                filename=filename,
                size_bytes=stored.size_bytes,
                content_type=content_type,
            )
        )
    finally:
        svc.blobs.release(stored.sha256)
    view = {
        "sha256": blob.sha256,
        "filename": blob.filename,
        "size": blob.size_bytes,
        "content_type": blob.content_type,
        "created_at": iso(blob.created_at),
    }
    return web.json_response(view, status=201 if new else 200)
