"""``GET /view`` and ``POST /upload/image``, with ComfyUI's path rules and status codes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import mimetypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from aiohttp import web
from PIL import Image

from .paths import SimPaths, is_within, split_annotation
from .state import SIM_STATE

# Served as downloads so a browser never renders them from ComfyUI's origin.
_FORCE_DOWNLOAD = {
    "text/html",
    "text/html-sandboxed",
    "application/xhtml+xml",
    "text/javascript",
    "text/css",
}


def _converted(path: str, preview: str | None, channel: str) -> tuple[bytes, str] | None:
    """The file re-encoded as ``preview=webp;90`` / ``channel=rgb|a`` ask, or None when
    it should be sent as it is."""
    with Image.open(path) as img:
        out = io.BytesIO()
        if preview is not None:
            parts = preview.split(";")
            fmt = parts[0]
            if fmt not in ("webp", "jpeg") or "a" in channel:
                fmt = "webp"
            quality = int(parts[-1]) if parts[-1].isdigit() else 90
            frame: Image.Image = img
            if fmt == "jpeg" or channel == "rgb":
                frame = img.convert("RGB")
            frame.save(out, format=fmt, quality=quality)
            return out.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            rgb = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
            rgb.save(out, format="PNG")
            return out.getvalue(), "image/png"
        if channel == "a":
            alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
            holder = Image.new("RGBA", img.size)
            holder.putalpha(alpha)
            holder.save(out, format="PNG")
            return out.getvalue(), "image/png"
    return None


def _locate(paths: SimPaths, query: Mapping[str, str]) -> int | tuple[str, str]:
    """The file ``/view`` asks for as (path, bare name), or the HTTP status refusing it."""
    if "filename" not in query:
        return 404
    filename, kind = split_annotation(query["filename"])
    if not filename:
        return 400
    if filename[0] == "/" or ".." in filename:
        return 400
    base_dir = paths.directory_for_type(kind or query.get("type", "output"))
    if base_dir is None:
        return 400
    base = os.path.abspath(base_dir)
    if "subfolder" in query:
        folder = os.path.abspath(os.path.join(base, query["subfolder"]))
        if not is_within(base, folder):
            return 403
        base = folder
    filename = os.path.basename(filename)
    file = os.path.join(base, filename)
    return (file, filename) if os.path.isfile(file) else 404


async def view(request: web.Request) -> web.StreamResponse:
    paths: SimPaths = request.app[SIM_STATE].paths
    query = request.rel_url.query
    found = await asyncio.to_thread(_locate, paths, query)
    if isinstance(found, int):
        return web.Response(status=found)
    file, filename = found
    disposition = {"Content-Disposition": f'filename="{filename}"'}
    channel = query.get("channel", "rgba")
    if "preview" in query or channel in ("rgb", "a"):
        converted = await asyncio.to_thread(_converted, file, query.get("preview"), channel)
        if converted is not None:
            body, content_type = converted
            return web.Response(body=body, content_type=content_type, headers=disposition)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    if content_type in _FORCE_DOWNLOAD:
        content_type = "application/octet-stream"
    return web.FileResponse(file, headers={**disposition, "Content-Type": content_type})


def _same_bytes(path: str, upload: IO[bytes]) -> bool:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    upload.seek(0)
    other = hashlib.sha256()
    for chunk in iter(lambda: upload.read(1 << 20), b""):
        other.update(chunk)
    upload.seek(0)
    return digest.digest() == other.digest()


def _store_upload(
    root_dir: Path, subfolder: str, filename: str, upload: IO[bytes], overwrite: bool
) -> str | None:
    """Write the upload; returns the name used, or None if it would leave ``root``.

    Without overwrite, an existing file with the same bytes is reused and one with other
    bytes makes the name ``stem (1).ext``, ``stem (2).ext`` ..."""
    root = os.path.abspath(root_dir)
    folder = os.path.join(root, os.path.normpath(subfolder))
    target = os.path.abspath(os.path.join(folder, filename))
    if not is_within(root, target):
        return None
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(filename)
    if not overwrite:
        counter = 1
        while os.path.exists(target):
            if _same_bytes(target, upload):
                return filename
            filename = f"{stem} ({counter}){ext}"
            target = os.path.join(folder, filename)
            counter += 1
    upload.seek(0)
    with open(target, "wb") as out:
        for chunk in iter(lambda: upload.read(1 << 20), b""):
            out.write(chunk)
    return filename


async def upload_image(request: web.Request) -> web.Response:
    paths: SimPaths = request.app[SIM_STATE].paths
    post = await request.post()
    image: Any = post.get("image")
    if not isinstance(image, web.FileField) or not image.filename:
        return web.Response(status=400)
    kind = str(post.get("type") or "input")
    base_dir = paths.directory_for_type(kind)
    if base_dir is None:
        return web.Response(status=400)
    subfolder = str(post.get("subfolder", ""))
    overwrite = str(post.get("overwrite", "")) in ("true", "1")
    name = await asyncio.to_thread(_store_upload, base_dir, subfolder, image.filename, image.file, overwrite)
    if name is None:
        return web.Response(status=400)
    return web.json_response({"name": name, "subfolder": subfolder, "type": kind})


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/view", view),
    ("POST", "/upload/image", upload_image),
]
