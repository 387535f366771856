"""Streaming multipart parsing for workflow submissions and reruns.

Field names follow the fleet product: ``$name`` text fields and file parts, ``#name`` choice
fields, plus plain fields (``name``, ``tags``, ``workflow_json``). File parts stream straight
into the blob store; the whole request is capped while it is read, and a request refused
for its size is refused before its body is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from control_plane.blobs import BlobStore
from control_plane.errors import BadRequest, TooLarge
from control_plane.json_limits import parse_json

_CHUNK = 64 * 1024
# Plain fields are read into memory; none of them needs to be big.
_MAX_FIELD_BYTES = 8 * 1024 * 1024


@dataclass
class UploadedFile:
    sha256: str
    filename: str
    size_bytes: int
    content_type: str

    def to_param(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "content_type": self.content_type,
        }


@dataclass
class SubmittedForm:
    fields: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)
    workflow_json: bytes | None = None
    # Blobs this request added to the store: removed again if the request fails.
    new_blobs: list[str] = field(default_factory=list)
    # Blobs this request holds (BlobStore.hold) until it has answered.
    held: list[str] = field(default_factory=list)

    @property
    def parameter_count(self) -> int:
        return len(self.texts) + len(self.choices) + len(self.files)

    def workflow(self) -> dict[str, Any]:
        if self.workflow_json is None:
            raise BadRequest("workflow_json is required (a file part or a field)")
        data = parse_json(self.workflow_json, "workflow_json")
        if not isinstance(data, dict) or not data:
            raise BadRequest("workflow_json must be a non-empty object of nodes (ComfyUI API format)")
        return data

    def fingerprint(self) -> str:
        """What identifies this request for Idempotency-Key: fields, and file contents by hash."""
        digest = hashlib.sha256(
            json.dumps(
                {
                    "fields": self.fields,
                    "texts": self.texts,
                    "choices": self.choices,
                    "files": {n: [f.sha256, f.filename] for n, f in self.files.items()},
                    "workflow": hashlib.sha256(self.workflow_json or b"").hexdigest(),
                },
                sort_keys=True,
            ).encode()
        )
        return digest.hexdigest()

    def tags(self) -> list[str]:
        raw = self.fields.get("tags", "")
        tags = [t.strip() for t in raw.split(",") if t.strip()]
        return list(dict.fromkeys(tags))


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise TooLarge(f"request exceeds the limit of {self.limit // (1024 * 1024)} MB")


async def _chunks(part: BodyPartReader, budget: _Budget) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        budget.take(len(chunk))
        yield chunk


async def _read_small(part: BodyPartReader, budget: _Budget) -> bytes:
    buf = bytearray()
    async for chunk in _chunks(part, budget):
        buf += chunk
        if len(buf) > _MAX_FIELD_BYTES:
            raise BadRequest(f"field {part.name!r} is larger than {_MAX_FIELD_BYTES} bytes")
    return bytes(buf)


def check_declared_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request exceeds the limit of {limit // (1024 * 1024)} MB")


Referenced = Callable[[str], Awaitable[bool]]


@asynccontextmanager
async def uploaded_form(
    request: web.Request, blobs: BlobStore, limit: int, referenced: Referenced
) -> AsyncIterator[SubmittedForm]:
    """The request's form for the length of the block. If the block fails, the blobs the
    request added are removed again, unless something else uses them by then."""
    form = await _read_form(request, blobs, limit, referenced)
    try:
        yield form
    except BaseException:
        await _discard(form, blobs, referenced)
        raise
    finally:
        _release(form, blobs)


async def _read_form(
    request: web.Request, blobs: BlobStore, limit: int, referenced: Referenced
) -> SubmittedForm:
    check_declared_length(request, limit)
    if request.content_type == "application/x-www-form-urlencoded":
        return _from_urlencoded(await request.post())
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send multipart/form-data (curl -F) or a url-encoded form")
    budget = _Budget(limit)
    form = SubmittedForm()
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart is not supported")
            name = part.name or ""
            if name.startswith("$") and part.filename is not None:
                stored = await blobs.write(_chunks(part, budget), max_bytes=limit)
                blobs.hold(stored.sha256)
                form.held.append(stored.sha256)
                if stored.created:
                    form.new_blobs.append(stored.sha256)
                form.files[name[1:]] = UploadedFile(
                    sha256=stored.sha256,
                    filename=part.filename,
                    size_bytes=stored.size_bytes,
                    content_type=part.headers.get("Content-Type", "application/octet-stream"),
                )
                continue
            data = await _read_small(part, budget)
            if name == "workflow_json":
                form.workflow_json = data
                continue
            try:
                text = data.decode()
            except UnicodeDecodeError as exc:
                raise BadRequest(f"field {name!r} is not UTF-8 text") from exc
            if name.startswith("$"):
                form.texts[name[1:]] = text
            elif name.startswith("#"):
                form.choices[name[1:]] = text
            else:
                form.fields[name] = text
    except BaseException:
        await _discard(form, blobs, referenced)
        _release(form, blobs)
        raise
    return form


def _from_urlencoded(post: Any) -> SubmittedForm:
    """A form without files (some clients send text-only forms url-encoded)."""
    form = SubmittedForm()
    for name, value in post.items():
        if not isinstance(value, str):
            raise BadRequest(f"field {name!r} must be text in a url-encoded form")
        if name == "workflow_json":
            form.workflow_json = value.encode()
        elif name.startswith("$"):
            form.texts[name[1:]] = value
        elif name.startswith("#"):
            form.choices[name[1:]] = value
        else:
            form.fields[name] = value
    return form


async def _discard(form: SubmittedForm, blobs: BlobStore, referenced: Referenced) -> None:
    for sha in form.new_blobs:
        if not blobs.held_elsewhere(sha) and not await referenced(sha):
            await blobs.delete(sha)
    form.new_blobs.clear()


def _release(form: SubmittedForm, blobs: BlobStore) -> None:
    for sha in form.held:
        blobs.release(sha)
    form.held.clear()
