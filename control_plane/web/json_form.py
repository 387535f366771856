"""A submission (or a rerun, or a template run) sent as one JSON object instead of a form:
the same field names, values as JSON.

    {"workflow_json": {...}, "name": "fox", "tags": ["sdxl"], "correlation_id": "order-7",
     "$prompt": "a red fox", "$steps": 30, "#sampler": "dpm_2",
     "$input_image": {"base64": "iVBORw0…", "filename": "fox.png"}}

A ``$file`` parameter is an object with one of ``base64`` (the bytes, with a ``filename``),
``url`` (fetched by the control plane, ``input_urls.py``) or ``sha256`` (a file the account
uploaded with ``POST /v1/blob``); ``filename`` and ``content_type`` are optional beside the
last two. Text and choice values may be strings, numbers or booleans.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane.db.blobs import BlobStore, StoredBlob
from control_plane.db.store import Store
from control_plane.model.errors import BadRequest, TooLarge
from control_plane.model.json_limits import parse_json
from control_plane.model.names import TAG
from control_plane.model.params import FileRef
from control_plane.web import input_urls

# A body larger than this is parsed (and its base64 decoded) off the event loop.
_ON_LOOP_BYTES = 256 * 1024
_SOURCES = ("base64", "url", "sha256")
_BYTES = "application/octet-stream"  # a file whose type nobody said


@dataclass(frozen=True)
class JsonInputs:
    """What reading a JSON submission needs beyond the blob store."""

    store: Store
    account_id: str
    fetch_timeout_s: float
    fetch_private_urls: bool


async def read_body(request: web.Request, max_bytes: int) -> dict[str, Any]:
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise TooLarge(f"request exceeds the limit of {max_bytes // (1024 * 1024)} MB")
    body = (
        await asyncio.to_thread(parse_json, raw, "body")
        if len(raw) > _ON_LOOP_BYTES
        else parse_json(raw, "body")
    )
    if not isinstance(body, dict):
        raise BadRequest("a JSON submission is one object: workflow_json, $name parameters, #name choices, …")
    return body


def scalar_text(name: str, value: Any) -> str:
    """A text or choice value as the form would carry it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    raise BadRequest(f"{name} must be a string, a number or true/false")


def field_text(name: str, value: Any) -> str:
    """A plain field: tags may come as a list, a template's body as an object."""
    if name == "body" and isinstance(value, dict):
        return json.dumps(value)
    if name == "tags" and isinstance(value, list):
        if not all(isinstance(tag, str) and TAG.fullmatch(tag) for tag in value):
            raise BadRequest("tags are letters, digits and _ . : - (at most 64 each)")
        return ",".join(value)
    return scalar_text(name, value)


def workflow_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        return json.dumps(value).encode()
    if isinstance(value, str):
        return value.encode()
    raise BadRequest("workflow_json must be an object of nodes (ComfyUI API format)")


async def file_ref(
    name: str, value: Any, blobs: BlobStore, inputs: JsonInputs, max_bytes: int
) -> tuple[FileRef, StoredBlob | None]:
    """The file a ``$name`` object names, and the blob this request stored for it, if any."""
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object with one of base64, url or sha256")
    given = [key for key in _SOURCES if key in value]
    unknown = sorted(set(value) - {*_SOURCES, "filename", "content_type"})
    if len(given) != 1 or unknown:
        raise BadRequest(
            f"{name}: a file is an object with one of base64, url or sha256 (and filename, "
            "content_type); a text value is a string, a number or true/false"
        )
    filename, content_type = value.get("filename"), value.get("content_type")
    for key, text in (("filename", filename), ("content_type", content_type)):
        if text is not None and (not isinstance(text, str) or not text or "\x00" in text):
            raise BadRequest(f"{name}.{key} must be non-empty text")
    source = value[given[0]]
    if not isinstance(source, str):
        raise BadRequest(f"{name}.{given[0]} must be a string")
    if given[0] == "sha256":
        return await _uploaded(name, source.lower(), filename, content_type, blobs, inputs), None
    if given[0] == "base64":
        if filename is None:
            raise BadRequest(f"{name}.filename is required with base64 (ComfyUI's loaders go by it)")
        blob = await blobs.put(await _decoded(name, source), max_bytes=max_bytes)
        return FileRef(
            sha256=blob.sha256,
            filename=filename,
            size_bytes=blob.size_bytes,
            content_type=content_type or _BYTES,
        ), blob
    fetched = await input_urls.fetch(
        source,
        name,
        blobs,
        max_bytes=max_bytes,
        timeout_s=inputs.fetch_timeout_s,
        allow_private=inputs.fetch_private_urls,
        filename=filename,
    )
    ref = FileRef(
        sha256=fetched.blob.sha256,
        filename=fetched.filename,
        size_bytes=fetched.blob.size_bytes,
        content_type=content_type or fetched.content_type or _BYTES,
    )
    return ref, fetched.blob


async def _decoded(name: str, text: str) -> bytes:
    try:
        if len(text) > _ON_LOOP_BYTES:
            return await asyncio.to_thread(base64.b64decode, text, validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{name}.base64 is not base64") from None


async def _uploaded(
    name: str,
    sha256: str,
    filename: str | None,
    content_type: str | None,
    blobs: BlobStore,
    inputs: JsonInputs,
) -> FileRef:
    blob = await inputs.store.account_blob(inputs.account_id, sha256)
    if blob is None or not await blobs.exists(sha256):
        raise BadRequest(f"{name}: this account uploaded no file with sha256 {sha256[:64]} (POST /v1/blob)")
    return FileRef(
        sha256=blob.sha256,
        filename=filename or blob.filename,
        size_bytes=blob.size_bytes,
        content_type=content_type or blob.content_type or _BYTES,
    )
