"""Streaming multipart parsing for workflow submissions and reruns.

Field names follow the fleet product: ``$name`` text fields and file parts, ``#name`` choice
fields, plus plain fields (``name``, ``tags``, ``workflow_json``). A JSON object with the same
names is read as well (``json_form.py``). File parts stream straight
into the blob store; the whole request is capped while it is read, and a request refused
for its size is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from control_plane.db.blobs import BlobStore, BlobWriter
from control_plane.db.tables import Account
from control_plane.fleet.graph import check_graph
from control_plane.fleet.submissions import Sent
from control_plane.model.errors import BadRequest, TooLarge
from control_plane.model.json_limits import parse_json
from control_plane.model.names import check_tags
from control_plane.model.params import FileRef
from control_plane.services import Services
from control_plane.web import json_form, multipart
from control_plane.web.json_form import JsonInputs

_CHUNK = 64 * 1024
# Plain fields are read into memory; none of them needs to be big.
_MAX_FIELD_BYTES = 8 * 1024 * 1024
MAX_NAME_CHARS = 200
# Plain fields a form may have beside its parameters (name, tags, workflow_json, ...).
PLAIN_PARTS = 16
# The plain fields a submission (and a template run) takes, beside workflow_json, $name
# parameters and #name choices.
SUBMIT_FIELDS = ("name", "tags", "correlation_id", "timeout_s", "priority", "webhook_url")
_MAX_URLENCODED_BYTES = 1024 * 1024
# A workflow larger than this is parsed off the event loop.
_PARSE_ON_LOOP_BYTES = 256 * 1024


@dataclass
class SubmittedForm:
    fields: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileRef] = field(default_factory=dict)
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

    def sent(self) -> Sent:
        """The parameters and plain fields, as the fleet takes them."""
        return Sent(
            texts=self.texts,
            choices=self.choices,
            files=self.files,
            timeout_s=self.fields.get("timeout_s"),
            correlation_id=self.text_field("correlation_id", 255),
            priority=self.fields.get("priority"),
            webhook_url=self.fields.get("webhook_url"),
        )

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


@dataclass(frozen=True)
class FormLimits:
    max_bytes: int
    max_parts: int  # the tier's parameters and the plain fields


class FormGates:
    """At most ``per_account`` forms read at once per account: an account that sends many
    forms at once gets a few shares of the event loop, not one per form, so what it costs
    falls on itself. More than one, so that one slow upload does not hold up the account's
    other submissions."""

    def __init__(self, per_account: int = 4) -> None:
        self.per_account = per_account
        self._gates: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def turn(self, account_id: str) -> AsyncIterator[None]:
        gate, users = self._gates.get(account_id, (asyncio.Semaphore(self.per_account), 0))
        self._gates[account_id] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._gates[account_id]
            if users == 1:
                del self._gates[account_id]
            else:
                self._gates[account_id] = (gate, users - 1)

    def waiting(self, account_id: str) -> int:
        """Forms of the account that are being read or wait for their turn."""
        return self._gates.get(account_id, (None, 0))[1]


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise TooLarge(f"request exceeds the limit of {self.limit // (1024 * 1024)} MB")


async def _body(request: web.Request, budget: _Budget) -> AsyncIterator[bytes]:
    """The request's body, counted against the request's cap while it is read."""
    async for chunk in request.content.iter_chunked(_CHUNK):
        budget.take(len(chunk))
        yield chunk


def check_declared_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request exceeds the limit of {limit // (1024 * 1024)} MB")


Referenced = Callable[[str], Awaitable[bool]]


# One per app: the forms being read, per account.
FORM_GATES = web.AppKey("form_gates", FormGates)


def read_form(
    request: web.Request, svc: Services, account: Account
) -> AbstractAsyncContextManager[SubmittedForm]:
    """The request's multipart, url-encoded or JSON form, within the account's tier's
    limits and read in the account's turn."""
    tier = svc.settings.tiers.get(account.tier) or svc.settings.tiers["free"]
    limits = FormLimits(svc.settings.max_request_bytes, tier.max_parameters + PLAIN_PARTS)
    gate = request.app[FORM_GATES].turn(account.id)
    inputs = JsonInputs(
        svc.store, account.id, svc.settings.input_fetch_timeout_s, svc.settings.fetch_private_urls
    )
    return uploaded_form(request, svc.blobs, limits, svc.store.blob_referenced, gate, inputs)


@asynccontextmanager
async def uploaded_form(
    request: web.Request,
    blobs: BlobStore,
    limits: FormLimits,
    referenced: Referenced,
    gate: AbstractAsyncContextManager[None],
    inputs: JsonInputs | None = None,
) -> AsyncIterator[SubmittedForm]:
    """The request's form for the length of the block. If the block fails, the blobs the
    request added are removed again, unless something else uses them by then. The form is
    read while holding ``gate`` (its account's turn); the block runs after."""
    async with gate:
        form = await _read_form(request, blobs, limits, referenced, inputs)
    try:
        yield form
    except BaseException:
        await _discard(form, blobs, referenced)
        raise
    finally:
        _release(form, blobs)


async def _read_form(
    request: web.Request,
    blobs: BlobStore,
    limits: FormLimits,
    referenced: Referenced,
    inputs: JsonInputs | None,
) -> SubmittedForm:
    check_declared_length(request, limits.max_bytes)
    media_type = multipart.media_type(request.headers.get("Content-Type", ""))
    if media_type == "application/x-www-form-urlencoded":
        return _from_urlencoded(await _urlencoded_pairs(request, limits.max_parts))
    is_json = media_type == "application/json" and inputs is not None
    if not media_type.startswith("multipart/") and not is_json:
        raise BadRequest("send multipart/form-data (curl -F), a url-encoded form or a JSON object")
    form = SubmittedForm()
    try:
        if inputs is not None and is_json:
            await _read_json(request, form, blobs, limits, inputs)
        else:
            await _read_parts(request, form, blobs, _Budget(limits.max_bytes), limits.max_parts)
    except BaseException:
        await _discard(form, blobs, referenced)
        _release(form, blobs)
        raise
    return form


async def _read_parts(
    request: web.Request, form: SubmittedForm, blobs: BlobStore, budget: _Budget, max_parts: int
) -> None:
    found = multipart.parts(
        _body(request, budget),
        request.headers.get("Content-Type", ""),
        blobs,
        max_parts=max_parts,
        max_file_bytes=budget.limit,
        max_text_bytes=_MAX_FIELD_BYTES,
        is_file=lambda part: part.name.startswith("$") and part.filename is not None,
    )
    async for part in found:
        if part.file is not None:
            await _take_file(part, part.file, form, blobs)
        elif part.name == "workflow_json":
            form.workflow_json = bytes(part.text_bytes)
        else:
            try:
                text = part.text_bytes.decode()
            except UnicodeDecodeError as exc:
                raise BadRequest(f"field {part.name!r} is not UTF-8 text") from exc
            _put_text(form, no_nul(part.name, "a part's name"), text)


async def _read_json(
    request: web.Request, form: SubmittedForm, blobs: BlobStore, limits: FormLimits, inputs: JsonInputs
) -> None:
    body = await json_form.read_body(request, limits.max_bytes)
    if len(body) > limits.max_parts:
        raise BadRequest(f"a submission has at most {limits.max_parts} fields on this account's tier")
    for name, value in body.items():
        name = no_nul(name, "a field's name")
        if name == "workflow_json":
            form.workflow_json = json_form.workflow_bytes(value)
        elif name.startswith("$") and isinstance(value, dict):
            ref, stored = await json_form.file_ref(name, value, blobs, inputs, limits.max_bytes)
            blobs.hold(ref.sha256)
            form.held.append(ref.sha256)
            if stored is not None and stored.created:
                form.new_blobs.append(stored.sha256)
            form.files[name[1:]] = ref
        else:
            text = (
                json_form.scalar_text(name, value) if name[:1] in "$#" else json_form.field_text(name, value)
            )
            _put_text(form, name, text)


async def _take_file(part: multipart.Part, writer: BlobWriter, form: SubmittedForm, blobs: BlobStore) -> None:
    try:
        name = no_nul(part.name, "a part's name")
        filename = no_nul(part.filename or "", f"the file name of part {name!r}")
        stored = await writer.finish()
    finally:
        await writer.abort()
    blobs.hold(stored.sha256)
    form.held.append(stored.sha256)
    if stored.created:
        form.new_blobs.append(stored.sha256)
    form.files[name[1:]] = FileRef(
        sha256=stored.sha256,
        filename=filename,
        size_bytes=stored.size_bytes,
        content_type=part.content_type,
    )


def _put_text(form: SubmittedForm, name: str, text: str) -> None:
    text = no_nul(text, f"field {name!r}")
    if name.startswith("$"):
        form.texts[name[1:]] = text
    elif name.startswith("#"):
        form.choices[name[1:]] = text
    else:
        form.fields[name] = text


async def _urlencoded_pairs(request: web.Request, max_fields: int) -> list[tuple[str, str]]:
    raw = await request.content.read(_MAX_URLENCODED_BYTES + 1)
    if len(raw) > _MAX_URLENCODED_BYTES:
        raise TooLarge(
            f"a url-encoded form is at most {_MAX_URLENCODED_BYTES} bytes; send files as multipart"
        )
    try:
        text = raw.decode()
        return parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields, strict_parsing=False)
    except UnicodeDecodeError:
        raise BadRequest("a url-encoded form must be UTF-8") from None
    except ValueError:
        raise BadRequest(f"a form has at most {max_fields} fields on this account's tier") from None


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
