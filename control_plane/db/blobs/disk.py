"""Blobs on local disk, at ``<root>/<sha256[:2]>/<sha256>``: the default store.

Writes stream through a temporary file and are renamed into place, so a reader never sees
half a blob and an aborted upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from control_plane.db.blobs.store import (
    BlobStore,
    BlobWriter,
    Download,
    StoredBlob,
    checked_sha256,
    digest_of,
)


class DiskBlobStore(BlobStore):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.tmp = root / "tmp"

    def describe(self) -> str:
        return f"disk {self.root}"

    async def setup(self) -> None:
        await asyncio.to_thread(self.tmp.mkdir, parents=True, exist_ok=True)

    async def close(self) -> None:
        pass  # nothing held between calls

    def path(self, sha256: str) -> Path:
        sha = checked_sha256(sha256)
        return self.root / sha[:2] / sha

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)

    async def put(self, data: bytes, *, max_bytes: int, expected_sha256: str | None = None) -> StoredBlob:
        """Hashed, checked and written in one thread call."""
        sha = digest_of(data, max_bytes, expected_sha256)
        created = await asyncio.to_thread(self._put_sync, sha, data)
        return StoredBlob(sha256=sha, size_bytes=len(data), created=created)

    def _put_sync(self, sha: str, data: bytes) -> bool:
        final = self.path(sha)
        if final.exists():
            return False
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return _move_into_place(Path(tmp_name), final)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    async def open_writer(self, max_bytes: int) -> BlobWriter:
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self.tmp)
        return _DiskWriter(self, Path(tmp_name), os.fdopen(fd, "wb"), max_bytes)

    async def delete(self, sha256: str) -> None:
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)

    async def response(self, request: web.Request, sha256: str, download: Download) -> web.StreamResponse:
        headers = {"Content-Type": download.content_type, **dict(download.headers)}
        if download.content_disposition:
            headers["Content-Disposition"] = download.content_disposition
        return web.FileResponse(self.path(sha256), headers=headers)


def _move_into_place(tmp: Path, final: Path) -> bool:
    if final.exists():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return True


class _DiskWriter(BlobWriter):
    """Through a temporary file, moved into place when finished."""

    def __init__(self, store: DiskBlobStore, tmp: Path, fh: BinaryIO, max_bytes: int) -> None:
        super().__init__(max_bytes)
        self._store, self._tmp, self._fh = store, tmp, fh

    async def _write(self, chunk: bytes) -> None:
        await asyncio.to_thread(self._fh.write, chunk)

    async def _finish(self, sha256: str) -> bool:
        await asyncio.to_thread(self._fh.close)
        return await asyncio.to_thread(_move_into_place, self._tmp, self._store.path(sha256))

    async def abort(self) -> None:
        if not self._fh.closed:
            await asyncio.to_thread(self._fh.close)
        await asyncio.to_thread(self._tmp.unlink, missing_ok=True)
