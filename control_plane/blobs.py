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

from control_plane.errors import BadRequest, TooLarge

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
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    await asyncio.to_thread(fh.write, chunk)
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256.lower():
                raise BadRequest(f"sha256 mismatch: got {sha}, expected {expected_sha256}")
            final = self.path(sha)
            created = await asyncio.to_thread(_move_into_place, tmp, final)
            return StoredBlob(sha256=sha, size_bytes=size, created=created)
        finally:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    async def delete(self, sha256: str) -> None:
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)


def _move_into_place(tmp: Path, final: Path) -> bool:
    if final.exists():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return True
