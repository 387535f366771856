"""Streaming multipart parsing for workflow submissions and reruns.

Field names follow the fleet product: ``$name`` text fields and file parts, ``#name`` choice
fields, plus plain fields (``name``, ``tags``, ``workflow_json``). File parts stream straight
into the blob store; the whole request is capped while it is read, and a request refused
for its size is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from control_plane.blobs import BlobStore
from control_plane.errors import BadRequest, TooLarge
from control_plane.graph import check_graph
from control_plane.json_limits import parse_json
from control_plane.names import check_tags

_CHUNK = 64 * 1024
# Plain fields are read into memory; none of them needs to be big.
_MAX_FIELD_BYTES = 8 * 1024 * 1024
MAX_NAME_CHARS = 200
# A form has at most this many parts: the largest tier's parameters and the plain fields fit.
MAX_PARTS = 1000
# The event loop gets a turn every so many parts.
_YIELD_EVERY = 32
_MAX_URLENCODED_BYTES = 1024 * 1024
# What aiohttp's multipart reader raises for a body that is not well formed (no boundary, a
# part cut short, a header it cannot parse): the sender's mistake, a 400.
_MALFORMED = (ValueError, RuntimeError, AssertionError, LookupError, HttpProcessingError)
# A workflow larger than this is parsed off the event loop.
_PARSE_ON_LOOP_BYTES = 256 * 1024


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

    async def workflow(self, what: str = "workflow_json") -> dict[str, Any]:
        """The workflow sent, parsed and checked: nesting, and the shape of its graph."""
        if self.workflow_json is None:
            raise BadRequest(f"{what} is required (a file part or a field)")
        raw = self.workflow_json
        if len(raw) > _PARSE_ON_LOOP_BYTES:
            return await asyncio.to_thread(_parse_workflow, raw, what)
        return _parse_workflow(raw, what)

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
        return check_tags(self.fields.get("tags", ""))

    def only(self, *allowed: str) -> SubmittedForm:
        """400 for a plain field the route does not take (a typo would otherwise be lost)."""
        unknown = sorted(set(self.fields) - set(allowed))
        if unknown:
            named = ", ".join(repr(u) for u in unknown)[:200]
            raise BadRequest(
                f"unknown field{'s' if len(unknown) > 1 else ''} {named}; "
                f"this takes {', '.join(allowed)}, $name parameters and #name choices"
            )
        return self

    def text_field(self, name: str, max_chars: int) -> str | None:
        """A plain field, stripped; ``None`` when absent or empty; 400 past ``max_chars``."""
        value = self.fields.get(name, "").strip()
        if len(value) > max_chars:
            raise BadRequest(f"{name} is at most {max_chars} characters")
        return value or None


def _parse_workflow(raw: bytes, what: str) -> dict[str, Any]:
    data = parse_json(raw, what)
    if not isinstance(data, dict) or not data:
        raise BadRequest(f"{what} must be a non-empty object of nodes (ComfyUI API format)")
    check_graph(data)
    return data


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
        return _from_urlencoded(await _urlencoded_pairs(request))
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("send multipart/form-data (curl -F) or a url-encoded form")
    form = SubmittedForm()
    try:
        await _read_parts(request, form, blobs, _Budget(limit))
    except BaseException:
        await _discard(form, blobs, referenced)
        _release(form, blobs)
        raise
    return form


async def _read_parts(request: web.Request, form: SubmittedForm, blobs: BlobStore, budget: _Budget) -> None:
    try:
        reader = await request.multipart()
        count = 0
        while (part := await reader.next()) is not None:
            count += 1
            if count > MAX_PARTS:
                raise BadRequest(f"a form has at most {MAX_PARTS} parts")
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # a turn for everyone else: a long form must not stall them
            await _take_part(part, form, blobs, budget)
    except _MALFORMED as exc:
        detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise BadRequest(f"malformed multipart body: {' '.join(detail.split())}"[:300]) from None


async def _take_part(
    part: BodyPartReader | MultipartReader, form: SubmittedForm, blobs: BlobStore, budget: _Budget
) -> None:
    if not isinstance(part, BodyPartReader):
        raise BadRequest("nested multipart is not supported")
    if not part.name:
        raise BadRequest('every part needs a name (Content-Disposition: form-data; name="...")')
    name = no_nul(part.name, "a part's name")
    if name.startswith("$") and part.filename is not None:
        filename = no_nul(part.filename, f"the file name of part {name!r}")
        stored = await blobs.write(_chunks(part, budget), max_bytes=budget.limit)
        blobs.hold(stored.sha256)
        form.held.append(stored.sha256)
        if stored.created:
            form.new_blobs.append(stored.sha256)
        form.files[name[1:]] = UploadedFile(
            sha256=stored.sha256,
            filename=filename,
            size_bytes=stored.size_bytes,
            content_type=part.headers.get("Content-Type", "application/octet-stream"),
        )
        return
    data = await _read_small(part, budget)
    if name == "workflow_json":
        form.workflow_json = data
        return
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"field {name!r} is not UTF-8 text") from exc
    _put_text(form, name, text)


def _put_text(form: SubmittedForm, name: str, text: str) -> None:
    text = no_nul(text, f"field {name!r}")
    if name.startswith("$"):
        form.texts[name[1:]] = text
    elif name.startswith("#"):
        form.choices[name[1:]] = text
    else:
        form.fields[name] = text


async def _urlencoded_pairs(request: web.Request) -> list[tuple[str, str]]:
    raw = await request.content.read(_MAX_URLENCODED_BYTES + 1)
    if len(raw) > _MAX_URLENCODED_BYTES:
        raise TooLarge(
            f"a url-encoded form is at most {_MAX_URLENCODED_BYTES} bytes; send files as multipart"
        )
    try:
        text = raw.decode()
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_PARTS, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("a url-encoded form must be UTF-8") from None
    except ValueError:
        raise BadRequest(f"a form has at most {MAX_PARTS} fields") from None


def _from_urlencoded(pairs: list[tuple[str, str]]) -> SubmittedForm:
    """A form without files (some clients send text-only forms url-encoded)."""
    form = SubmittedForm()
    for name, value in pairs:
        name = no_nul(name, "a field's name")
        if name == "workflow_json":
            form.workflow_json = value.encode()
        else:
            _put_text(form, name, value)
    return form


def no_nul(text: str, what: str) -> str:
    """PostgreSQL cannot store a NUL in text: refused on every database alike."""
    if "\x00" in text:
        raise BadRequest(f"{what} holds a NUL character")
    return text


async def _discard(form: SubmittedForm, blobs: BlobStore, referenced: Referenced) -> None:
    for sha in form.new_blobs:
        if not blobs.held_elsewhere(sha) and not await referenced(sha):
            await blobs.delete(sha)
    form.new_blobs.clear()


def _release(form: SubmittedForm, blobs: BlobStore) -> None:
    for sha in form.held:
        blobs.release(sha)
    form.held.clear()
