"""What every blob store does: inputs and outputs kept once per sha256, written as a stream
(hashed on the way, under their digest once complete, nothing left by an aborted write),
served to whoever may read them."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterable
from dataclasses import dataclass

from aiohttp import web

from control_plane.model.errors import BadRequest, TooLarge

SHA256 = re.compile(r"[0-9a-f]{64}")


def checked_sha256(sha256: str) -> str:
    if not SHA256.fullmatch(sha256):
        raise BadRequest(f"not a sha256: {sha256!r}")
    return sha256


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    created: bool  # false when the same bytes were already stored


@dataclass(frozen=True)
class Download:
    """How a blob is handed out: the type and file name the reader should see, and headers
    for when the control plane serves the bytes itself."""

    content_type: str
    content_disposition: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


class BlobStore(ABC):
    def __init__(self) -> None:
        # Requests in flight that rely on a blob: a failed request must not delete a blob
        # that another one (same bytes, same address) is about to reference.
        self._holds: Counter[str] = Counter()

    def hold(self, sha256: str) -> None:
        self._holds[sha256] += 1

    def release(self, sha256: str) -> None:
        self._holds[sha256] -= 1
        if self._holds[sha256] <= 0:
            del self._holds[sha256]

    def held(self, sha256: str) -> bool:
        """Held by some request in flight."""
        return self._holds[sha256] > 0

    def held_elsewhere(self, sha256: str) -> bool:
        """Held by some request besides the one asking (which holds it once)."""
        return self._holds[sha256] > 1

    @abstractmethod
    def describe(self) -> str:
        """Where the blobs are, for the log."""

    @abstractmethod
    async def setup(self) -> None:
        """Ready the store (called once, before the first request)."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of what the store holds (connections); called once, at the end."""

    @abstractmethod
    async def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    async def open_writer(self, max_bytes: int) -> BlobWriter:
        """A blob written a piece at a time (for a part of a form as it is parsed)."""

    @abstractmethod
    async def put(self, data: bytes, *, max_bytes: int, expected_sha256: str | None = None) -> StoredBlob:
        """Store bytes already in memory (a text output, a small upload) in one go."""

    @abstractmethod
    async def delete(self, sha256: str) -> None:
        """Remove the blob; one that is not there is no error."""

    @abstractmethod
    async def response(self, request: web.Request, sha256: str, download: Download) -> web.StreamResponse:
        """The answer to a request for the blob's bytes: the bytes, or where to get them."""

    async def write(
        self,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int,
        expected_sha256: str | None = None,
    ) -> StoredBlob:
        """Stream ``chunks`` into the store. Over ``max_bytes`` raises TooLarge; a digest
        that differs from ``expected_sha256`` raises BadRequest. Either way nothing stays."""
        writer = await self.open_writer(max_bytes)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
            return await writer.finish(expected_sha256)
        finally:
            await writer.abort()


def digest_of(data: bytes, max_bytes: int, expected_sha256: str | None) -> str:
    """The sha256 of bytes to be stored, once they are known to be within the limit and the
    digest the sender announced."""
    if len(data) > max_bytes:
        raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
    return matching(hashlib.sha256(data).hexdigest(), expected_sha256)


def matching(sha256: str, expected_sha256: str | None) -> str:
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        raise BadRequest(f"sha256 mismatch: got {sha256}, expected {expected_sha256}")
    return sha256


class BlobWriter(ABC):
    """One blob on its way into a store, hashed as it goes and put under its digest by
    :meth:`finish`; :meth:`abort` (always safe to call, also after finish) leaves nothing."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256()
        self.size_bytes = 0

    async def write(self, chunk: bytes) -> None:
        self.size_bytes += len(chunk)
        if self.size_bytes > self._max_bytes:
            raise TooLarge(f"upload exceeds the limit of {self._max_bytes} bytes")
        self._digest.update(chunk)
        await self._write(chunk)

    async def finish(self, expected_sha256: str | None = None) -> StoredBlob:
        sha = matching(self._digest.hexdigest(), expected_sha256)
        created = await self._finish(sha)
        return StoredBlob(sha256=sha, size_bytes=self.size_bytes, created=created)

    @abstractmethod
    async def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def _finish(self, sha256: str) -> bool:
        """Put what was written under its digest; false when those bytes were there already."""

    @abstractmethod
    async def abort(self) -> None: ...
