"""Blob transfers with the control plane over HTTP: job inputs down, outputs up.

Blobs never travel on the websocket. Both directions stream through disk, checked by sha256.

Errors::

    TransferError            a download or upload failed (after retries)
    ├── AttemptSuperseded    409: this attempt is no longer current; stop working on the job
    └── OutputRefused        413: the outputs are over the control plane's limits
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import ValidationError

from protocol.agent_http import SHA256_HEADER, UploadReceipt, outputs_path
from protocol.messages import JobFile, OutputRef
from runner_agent.files import SMALL_FILE_BYTES, StoredFile, TooLarge, read_chunks, store_stream

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRY_BASE_S = 0.25
_RETRY_MAX_S = 10.0
# Damaged bytes (a sha256 mismatch) are resent a few times, not for as long as an outage lasts.
_DAMAGED_RETRIES = 3


class TransferError(Exception):
    """A transfer with the control plane failed."""


class AttemptSuperseded(TransferError):
    """The control plane answered 409: a newer attempt owns the job."""


class OutputRefused(TransferError):
    """413: an output, or the job's outputs in all, are larger than the control plane takes.
    The workflow's own doing: running it again would produce the same."""


class _Retryable(TransferError):
    """Worth another try: the control plane is away or restarting, or the bytes got damaged."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


class ControlPlaneFiles:
    def __init__(
        self, base_url: str, token: str, *, read_timeout_s: float = 300.0, retry_s: float = 600.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # How long a transfer keeps trying while the control plane cannot be reached: long
        # enough to outlast a restart of it, after which the job fails as the fleet's fault.
        self.retry_s = retry_s
        self._auth = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _url(self, url: str) -> str:
        """Job file URLs are paths on the control plane. An absolute URL is accepted only on
        the control plane's own origin: the runner token must never go anywhere else."""
        parts = urlsplit(url)
        if not parts.scheme:
            return self.base_url + "/" + url.lstrip("/")
        base = urlsplit(self.base_url)
        if (parts.scheme, parts.netloc) != (base.scheme, base.netloc):
            raise TransferError(f"refusing to send the runner token to {parts.netloc}")
        return url

    async def download_input(self, file: JobFile, dest: Path, *, tag: str = "") -> StoredFile:
        """Fetch one job input to ``dest``; its sha256 and size must match the job's."""

        async def attempt() -> StoredFile:
            url = self._url(file.url)  # each try: the control plane connected now
            try:
                async with self.session.get(url, headers=self._auth) as resp:
                    if resp.status == 409:
                        raise AttemptSuperseded(f"GET {file.url}: attempt no longer current")
                    if resp.status >= 500:
                        raise _Retryable(f"GET {file.url} answered {resp.status}")
                    if resp.status != 200:
                        raise TransferError(
                            f"GET {file.url} answered {resp.status}: {(await resp.text())[:200]}"
                        )
                    stored = await store_stream(
                        resp.content.iter_chunked(256 * 1024), dest, max_bytes=file.size_bytes
                    )
            except TooLarge as exc:
                raise TransferError(f"input {file.name!r} is larger than announced") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _Retryable(f"GET {file.url}: {exc.__class__.__name__}: {exc}") from exc
            if stored.size_bytes != file.size_bytes or stored.sha256 != file.sha256.lower():
                await asyncio.to_thread(dest.unlink, missing_ok=True)
                raise _Retryable(
                    f"input {file.name!r} arrived damaged: {stored.size_bytes} bytes, sha256 "
                    f"{stored.sha256}, expected {file.size_bytes} bytes, {file.sha256}",
                    damaged=True,
                )
            return stored

        return await _with_retries(
            attempt, f"{tag}: download of input {file.name!r} ({file.url})", self.retry_s
        )

    async def upload_output(
        self,
        *,
        workflow_id: str,
        attempt: int,
        node_id: str,
        kind: str,
        filename: str,
        content_type: str,
        path: Path,
        sha256: str,
        size_bytes: int,
    ) -> OutputRef:
        """Stream one output file from disk to the control plane, which checks its sha256."""
        params = {
            "attempt": str(attempt),
            "node_id": node_id,
            "filename": filename,
            "kind": kind,
        }
        headers = {
            **self._auth,
            "Content-Type": content_type,
            SHA256_HEADER: sha256,
            # Known up front, so the control plane can refuse an oversized body early.
            "Content-Length": str(size_bytes),
        }

        async def put_once() -> OutputRef:
            url = self.base_url + outputs_path(workflow_id)  # each try: the one connected now
            try:
                # A small file goes in one read (one thread call), a large one a chunk at a time.
                body = await asyncio.to_thread(path.read_bytes) if size_bytes <= SMALL_FILE_BYTES else None
                async with self.session.put(
                    url, params=params, headers=headers, data=body if body is not None else read_chunks(path)
                ) as resp:
                    text = await resp.text()
                    if resp.status == 409:
                        raise AttemptSuperseded(
                            f"output upload for attempt {attempt} refused: no longer current"
                        )
                    if resp.status == 413:
                        raise OutputRefused(f"output {filename!r} refused: {_message(text)}")
                    if resp.status >= 500:
                        raise _Retryable(f"PUT outputs answered {resp.status}: {text[:200]}")
                    if resp.status == 400:
                        # A sha256 mismatch: the bytes were damaged on the way; resend.
                        raise _Retryable(f"PUT outputs answered 400: {text[:200]}", damaged=True)
                    if resp.status not in (200, 201):
                        raise TransferError(f"PUT outputs answered {resp.status}: {text[:200]}")
                    try:
                        receipt = UploadReceipt.model_validate(_json_object(text))
                    except ValidationError as exc:
                        raise TransferError(
                            f"PUT outputs answered {resp.status} with no receipt: {exc}"
                        ) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _Retryable(f"PUT outputs: {exc.__class__.__name__}: {exc}") from exc
            return OutputRef(
                output_id=receipt.output_id,
                node_id=node_id,
                filename=filename,
                kind=kind,
                content_type=content_type,
                size_bytes=receipt.size_bytes,
                sha256=receipt.sha256,
            )

        return await _with_retries(
            put_once,
            f"upload of output {filename!r} of workflow {workflow_id} attempt {attempt}",
            self.retry_s,
        )


def _message(text: str) -> str:
    """The message of the control plane's JSON error, else the text itself (shortened)."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:200]
    return str(body.get("message", text))[:300] if isinstance(body, dict) else text[:200]


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TransferError(f"control plane answered something that is not JSON: {text[:200]}") from exc
    if not isinstance(data, dict):
        raise TransferError(f"control plane answered unexpected JSON: {text[:200]}")
    return data


async def _with_retries(operation: Callable[[], Awaitable[T]], what: str, retry_s: float) -> T:
    """Try again, with pauses doubling up to a few seconds, for as long as ``retry_s`` allows
    (a control plane that restarts is back within it); damaged bytes only a few times.
    Anything that is not worth retrying fails at once."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + retry_s
    failures = damaged = 0
    while True:
        try:
            return await operation()
        except _Retryable as exc:
            failures += 1
            damaged += exc.damaged
            pause_s = min(_RETRY_MAX_S, _RETRY_BASE_S * 2 ** min(failures - 1, 16))
            if damaged >= _DAMAGED_RETRIES or loop.time() + pause_s > give_up_at:
                raise TransferError(f"{exc} (gave up after {failures} tries)") from exc
            if failures == 1 or failures % 10 == 0:
                log.warning("%s failed, trying again: %s", what, exc)
            await asyncio.sleep(pause_s)  # the retry's own pace, not a wait for an event
