"""HTTP client for the local ComfyUI, over one aiohttp session.

Errors, as a tree::

    ComfyUIError
    ├── ComfyUIUnavailable   the server cannot be reached (refused, reset, timed out)
    ├── ComfyUIHTTPError     it answered with an unexpected status (a 500, a 404 ...)
    └── PromptRejected       POST /prompt answered 400: the prompt is invalid
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger(__name__)

# ComfyUI's binary preview frames can be whole images; they are ignored but must fit.
_WS_MAX_MSG_BYTES = 64 * 1024 * 1024


class ComfyUIError(Exception):
    """Something went wrong talking to ComfyUI."""


class ComfyUIUnavailable(ComfyUIError):
    """ComfyUI could not be reached at all. ``refused``: nothing listens at its address, so
    the process is gone (stopped, crashed or restarting) and with it its queue."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ComfyUIHTTPError(ComfyUIError):
    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.method, self.path, self.status, self.body = method, path, status, body
        super().__init__(f"ComfyUI answered {status} to {method} {path}: {_snippet(body)}")


class PromptRejected(ComfyUIError):
    """ComfyUI refused the prompt (HTTP 400). ``error`` and ``node_errors`` are its own."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any]) -> None:
        self.error, self.node_errors = error, node_errors
        super().__init__(describe_prompt_error(error, node_errors))


def describe_prompt_error(error: Mapping[str, Any], node_errors: Mapping[str, Any]) -> str:
    """One readable line from ComfyUI's 400 body: the message, its details, and the first
    error of each node."""
    parts = [str(error.get("message") or "ComfyUI rejected the prompt")]
    if error.get("details"):
        parts.append(str(error["details"]))
    for node_id, info in node_errors.items():
        if not isinstance(info, dict):
            continue
        for err in info.get("errors", [])[:1]:
            if isinstance(err, dict):
                what = ": ".join(str(x) for x in (err.get("message"), err.get("details")) if x)
                parts.append(f"node {node_id} ({info.get('class_type', '?')}): {what}")
    return "; ".join(parts)


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"


class ComfyUIClient:
    """Thin async wrapper over ComfyUI's HTTP API. Owns its aiohttp session."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        read_timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = dict(headers or {})
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily so the client can be built outside a running loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def ws_url(self) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws"

    # -- plumbing ---------------------------------------------------------------------------

    async def _request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._request(method, path, **kwargs) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ComfyUIHTTPError(method, path, resp.status, text)
            return _json_or_empty(method, path, text)

    @asynccontextmanager
    async def _request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        url = self.base_url + path
        try:
            async with self.session.request(method, url, **kwargs) as resp:
                yield resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Refused, reset, disconnected mid-body, timed out: all mean "not there" to us.
            raise ComfyUIUnavailable(
                f"ComfyUI at {self.base_url} is unreachable ({method} {path}): "
                f"{exc.__class__.__name__}: {exc}",
                refused=_refused(exc),
            ) from exc

    # -- endpoints --------------------------------------------------------------------------

    async def system_stats(self) -> dict[str, Any]:
        return dict(await self._request_json("GET", "/system_stats"))

    async def object_info(self) -> dict[str, Any]:
        return dict(await self._request_json("GET", "/object_info"))

    async def queue(self) -> dict[str, Any]:
        return dict(await self._request_json("GET", "/queue"))

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of one prompt, or ``None`` while ComfyUI has none (unknown,
        still queued or running, or lost to a restart: ComfyUI cannot tell these apart)."""
        data = await self._request_json("GET", f"/history/{prompt_id}")
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    async def post_prompt(
        self,
        prompt: dict[str, Any],
        client_id: str,
        *,
        prompt_id: str | None = None,
        extra_data: dict[str, Any] | None = None,
    ) -> tuple[str, int | None]:
        """Queue a prompt; returns ``(prompt_id, number)`` or raises :class:`PromptRejected`."""
        body: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
        if prompt_id is not None:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        async with self._request("POST", "/prompt", json=body) as resp:
            text = await resp.text()
            if resp.status == 400:
                data = _json_or_empty("POST", "/prompt", text, strict=False)
                error = data.get("error") if isinstance(data, dict) else None
                node_errors = data.get("node_errors") if isinstance(data, dict) else None
                raise PromptRejected(
                    error if isinstance(error, dict) else {"message": _snippet(text)},
                    node_errors if isinstance(node_errors, dict) else {},
                )
            if resp.status != 200:
                raise ComfyUIHTTPError("POST", "/prompt", resp.status, text)
        data = _json_or_empty("POST", "/prompt", text)
        if not isinstance(data, dict) or not isinstance(data.get("prompt_id"), str):
            raise ComfyUIHTTPError("POST", "/prompt", 200, text)
        number = data.get("number")
        return data["prompt_id"], number if isinstance(number, int) else None

    async def upload_image(
        self,
        content: bytes | Path,
        filename: str,
        *,
        subfolder: str = "",
        overwrite: bool = True,
    ) -> str:
        """Put a file into ComfyUI's input folder; returns the name LoadImage and friends
        want: ``subfolder/name``, where ``name`` is what ComfyUI chose (it may rename)."""
        form = aiohttp.FormData()
        fh = None
        if isinstance(content, Path):
            # aiohttp reads a file object in its executor, so the loop never blocks on disk.
            fh = await asyncio.to_thread(content.open, "rb")
            form.add_field("image", fh, filename=filename)
        else:
            form.add_field("image", content, filename=filename)
        form.add_field("type", "input")
        form.add_field("subfolder", subfolder)
        form.add_field("overwrite", "true" if overwrite else "false")
        try:
            data = await self._request_json("POST", "/upload/image", data=form)
        finally:
            if fh is not None and not fh.closed:
                await asyncio.to_thread(fh.close)
        name = data.get("name") if isinstance(data, dict) else None
        if not isinstance(name, str):
            raise ComfyUIHTTPError("POST", "/upload/image", 200, json.dumps(data))
        folder = data.get("subfolder") or ""
        return f"{folder}/{name}" if folder else name

    @asynccontextmanager
    async def view(
        self, filename: str, subfolder: str = "", folder_type: str = "output"
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Stream one output file: ``async with client.view(...) as resp`` then read
        ``resp.content`` in chunks."""
        params = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        async with self._request("GET", "/view", params=params) as resp:
            if resp.status != 200:
                raise ComfyUIHTTPError("GET", f"/view?filename={filename}", resp.status, await resp.text())
            yield resp

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt. With ``prompt_id`` ComfyUI only interrupts if that is
        the prompt running (older versions interrupt whatever runs)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        async with self._request("POST", "/interrupt", json=body) as resp:
            if resp.status != 200:
                raise ComfyUIHTTPError("POST", "/interrupt", resp.status, await resp.text())

    async def delete_from_queue(self, prompt_ids: list[str]) -> None:
        """Remove pending prompts; a running one is not touched (use :meth:`interrupt`)."""
        async with self._request("POST", "/queue", json={"delete": prompt_ids}) as resp:
            if resp.status != 200:
                raise ComfyUIHTTPError("POST", "/queue", resp.status, await resp.text())

    async def connect_ws(self, client_id: str) -> aiohttp.ClientWebSocketResponse:
        try:
            return await self.session.ws_connect(
                self.ws_url,
                params={"clientId": client_id},
                max_msg_size=_WS_MAX_MSG_BYTES,
                heartbeat=30.0,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ComfyUIUnavailable(
                f"ComfyUI websocket at {self.ws_url} is unreachable: {exc.__class__.__name__}: {exc}",
                refused=_refused(exc),
            ) from exc


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, ConnectionRefusedError)


def _json_or_empty(method: str, path: str, text: str, *, strict: bool = True) -> Any:
    # POST /interrupt and friends answer an empty body.
    if not text.strip():
        return {}
    try:
        return json.loads(text)
    except ValueError as exc:
        if not strict:
            return {}
        raise ComfyUIHTTPError(method, path, 200, text) from exc


def queue_position(queue: Mapping[str, Any], prompt_id: str) -> str | None:
    """``"running"``, ``"pending"`` or ``None`` for a prompt in a ``GET /queue`` answer.
    Items are ``[number, prompt_id, prompt, extra_data, outputs_to_execute]``."""
    for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
        for item in queue.get(key) or []:
            if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                return state
    return None


def running_prompt_ids(queue: Mapping[str, Any]) -> list[str]:
    """The prompts a ``GET /queue`` answer lists as running (ComfyUI runs one at a time)."""
    return [
        item[1]
        for item in queue.get("queue_running") or []
        if isinstance(item, list) and len(item) > 1 and isinstance(item[1], str)
    ]
