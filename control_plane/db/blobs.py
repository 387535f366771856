"""Content-addressed blob storage on disk: inputs and outputs, stored once per sha256.

Writes stream through a temporary file and are renamed into place, so a reader never sees
half a blob and an aborted upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections import Counter
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from control_plane.model.errors import BadRequest, TooLarge

SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    created: bool  # false when the same bytes were already stored


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
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

    def setup(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise BadRequest(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

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

    async def put(self, data: bytes, *, max_bytes: int, expected_sha256: str | None = None) -> StoredBlob:
        """Store bytes already in memory (a text output, a small upload): hashed, checked and
        written in one thread call."""
        if len(data) > max_bytes:
            raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
        sha, created = await asyncio.to_thread(self._put_sync, data, expected_sha256)
        return StoredBlob(sha256=sha, size_bytes=len(data), created=created)

    def _put_sync(self, data: bytes, expected_sha256: str | None) -> tuple[str, bool]:
        sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256.lower():
            raise BadRequest(f"sha256 mismatch: got {sha}, expected {expected_sha256}")
        final = self.path(sha)
        if final.exists():
            return sha, False
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return sha, _move_into_place(Path(tmp_name), final)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    async def open_writer(self, max_bytes: int) -> BlobWriter:
        """A blob written a piece at a time (for a part of a form as it is parsed)."""
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self._tmp)
        return BlobWriter(self, Path(tmp_name), os.fdopen(fd, "wb"), max_bytes)

    async def delete(self, sha256: str) -> None:
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)


def _move_into_place(tmp: Path, final: Path) -> bool:
    if final.exists():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return True


class BlobWriter:
    """One blob on its way into the store: through a temporary file, hashed as it goes, moved
    into place by :meth:`finish`; :meth:`abort` (always safe to call) leaves nothing behind."""

    def __init__(self, store: BlobStore, tmp: Path, fh: BinaryIO, max_bytes: int) -> None:
        self._store, self._tmp, self._fh, self._max_bytes = store, tmp, fh, max_bytes
        self._digest = hashlib.sha256()
        self.size_bytes = 0

    async def write(self, chunk: bytes) -> None:
        self.size_bytes += len(chunk)
        if self.size_bytes > self._max_bytes:
            raise TooLarge(f"upload exceeds the limit of {self._max_bytes} bytes")
        self._digest.update(chunk)
        await asyncio.to_thread(self._fh.write, chunk)

    async def finish(self, expected_sha256: str | None = None) -> StoredBlob:
        await asyncio.to_thread(self._fh.close)
        sha = self._digest.hexdigest()
        if expected_sha256 is not None and sha != expected_sha256.lower():
            raise BadRequest(f"sha256 mismatch: got {sha}, expected {expected_sha256}")
        created = await asyncio.to_thread(_move_into_place, self._tmp, self._store.path(sha))
        return StoredBlob(sha256=sha, size_bytes=self.size_bytes, created=created)

    async def abort(self) -> None:
        if not self._fh.closed:
            await asyncio.to_thread(self._fh.close)
        await asyncio.to_thread(self._tmp.unlink, missing_ok=True)
