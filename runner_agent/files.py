"""Streaming files to and from disk without blocking the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import re
import shutil
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 256 * 1024
# A file up to this size is read or written whole, in one thread call; a larger one streams.
SMALL_FILE_BYTES = 4 * 1024**2


@dataclass(frozen=True)
class StoredFile:
    path: Path
    sha256: str
    size_bytes: int


class TooLarge(ValueError):
    """A stream ran past the size it announced."""


async def store_stream(
    chunks: AsyncIterable[bytes], path: Path, *, max_bytes: int | None = None
) -> StoredFile:
    """Write ``chunks`` to ``path`` (through a temporary name, so a half-written file never
    sits at ``path``) and hash them on the way."""
    partial = path.with_name(path.name + ".part")
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fh = await asyncio.to_thread(partial.open, "wb")
    try:
        async for chunk in chunks:
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise TooLarge(f"more than the {max_bytes} bytes announced")
            digest.update(chunk)
            await asyncio.to_thread(fh.write, chunk)
    except BaseException:
        await asyncio.to_thread(fh.close)
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        raise
    await asyncio.to_thread(fh.close)
    await asyncio.to_thread(partial.replace, path)
    return StoredFile(path, digest.hexdigest(), size)


async def store_bytes(data: bytes, path: Path) -> StoredFile:
    """Write ``data`` to ``path`` as :func:`store_stream` does, hashed on the way, in one
    thread call."""
    partial = path.with_name(path.name + ".part")

    def write() -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.write_bytes(data)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    return StoredFile(path, await asyncio.to_thread(write), len(data))


async def read_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
    """The file's bytes, a chunk at a time, read off the loop."""
    fh = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, chunk_bytes):
            yield chunk
    finally:
        await asyncio.to_thread(fh.close)


async def remove_tree(path: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


# Only characters aiohttp's multipart writer leaves as they are: it percent-encodes the rest,
# and ComfyUI would keep "%20" literally in the name.
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(name: str, fallback: str = "file") -> str:
    """A file name that is only a name: no folders, no control characters, not hidden."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip("._")
    return base[:200] or fallback


def guess_content_type(filename: str, offered: str | None = None) -> str:
    """The type ComfyUI's /view announced, unless it only said "bytes"; else by extension."""
    if offered and offered.split(";")[0].strip() not in ("", "application/octet-stream"):
        return offered.split(";")[0].strip()
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"
