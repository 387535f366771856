"""The websocket side: ComfyUI's socket map, its message pump and its reconnect trap.

Like ComfyUI, sockets are kept in a dict keyed by client id. A socket that connects with
an id already in the map replaces the old entry without closing the old socket, and when
*any* socket closes its id is removed from the map. So a client that reconnects before its
old socket has closed ends up with a live socket that receives nothing more: not its
prompt's events, not even the ``status`` broadcasts. This is kept on purpose; agents are
tested against it.

Messages go through one queue and one publisher task, as in ComfyUI, so every socket sees
them in the order they were produced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

# Binary frame types: 4-byte big-endian type first.
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
# The payload of PREVIEW_IMAGE starts with a format word.
IMAGE_FORMAT_PNG = 2

SERVER_FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "max_upload_size": 100 * 1024 * 1024,
}

_SEND_ERRORS = (ConnectionError, aiohttp.ClientError)


@dataclass
class _Outgoing:
    sid: str | None
    text: str | None = None
    data: bytes | None = None


class WsHub:
    def __init__(self) -> None:
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.features: dict[str, dict[str, Any]] = {}
        # Every open socket, orphans included: shutdown must close them all.
        self._open: set[web.WebSocketResponse] = set()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()

    # -- producing ------------------------------------------------------------------------

    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Queue a JSON message for ``sid``, or for every socket in the map if None."""
        self._outbox.put_nowait(_Outgoing(sid, text=_message(event, data)))

    def send_binary(self, event: int, payload: bytes, sid: str | None = None) -> None:
        self._outbox.put_nowait(_Outgoing(sid, data=struct.pack(">I", event) + payload))

    def send_preview(self, png: bytes, metadata: dict[str, Any], sid: str | None) -> None:
        """One preview image in the format the receiving client negotiated."""
        if self.supports_preview_metadata(sid):
            meta = json.dumps({**metadata, "image_type": "image/png"}).encode()
            payload = struct.pack(">I", len(meta)) + meta + png
            self.send_binary(PREVIEW_IMAGE_WITH_METADATA, payload, sid)
        else:
            self.send_binary(PREVIEW_IMAGE, struct.pack(">I", IMAGE_FORMAT_PNG) + png, sid)

    def supports_preview_metadata(self, sid: str | None) -> bool:
        if sid is None:
            return False
        return bool(self.features.get(sid, {}).get("supports_preview_metadata"))

    # -- delivering -----------------------------------------------------------------------

    async def run_publisher(self) -> None:
        while True:
            item = await self._outbox.get()
            if item.sid is None:
                targets = list(self.sockets.values())
            else:
                target = self.sockets.get(item.sid)
                targets = [target] if target is not None else []
            for ws in targets:
                await _deliver(ws, item)

    # -- the /ws endpoint -----------------------------------------------------------------

    async def serve(
        self,
        request: web.Request,
        queue_info: Callable[[], dict[str, Any]],
        running_node: Callable[[str], str | None],
    ) -> web.WebSocketResponse:
        """``running_node(sid)``: the node now executing if ``sid`` owns the running prompt
        (ComfyUI tells a reconnecting client where its prompt is)."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self.features[sid] = {}
        self._open.add(ws)
        try:
            # Straight to the socket, not through the queue: ComfyUI does the same, so this
            # can overtake messages already queued.
            await _send_now(ws, "status", {"status": queue_info(), "sid": sid})
            node = running_node(sid)
            if node is not None:
                await _send_now(ws, "executing", {"node": node})
            first = True
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    body = json.loads(msg.data)
                except ValueError:
                    log.warning("invalid JSON from websocket client %s", sid)
                    continue
                # Only a first message can negotiate features, as in ComfyUI.
                if first and isinstance(body, dict) and body.get("type") == "feature_flags":
                    flags = body.get("data")
                    self.features[sid] = flags if isinstance(flags, dict) else {}
                    await _send_now(ws, "feature_flags", SERVER_FEATURES)
                first = False
        finally:
            # Faithfully unconditional: this may drop a newer socket that reused the id.
            self.sockets.pop(sid, None)
            self.features.pop(sid, None)
            self._open.discard(ws)
        return ws

    async def close_all(self) -> None:
        sockets = list(self._open)
        self.sockets.clear()
        await asyncio.gather(
            *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"Server shutdown") for ws in sockets),
            return_exceptions=True,
        )


def _message(event: str, data: Any) -> str:
    return json.dumps({"type": event, "data": data})


async def _send_now(ws: web.WebSocketResponse, event: str, data: Any) -> None:
    await _deliver(ws, _Outgoing(None, text=_message(event, data)))


async def _deliver(ws: web.WebSocketResponse, item: _Outgoing) -> None:
    if ws.closed:
        return
    # A client that vanished mid-send is the reader's problem, not the publisher's.
    with contextlib.suppress(*_SEND_ERRORS):
        if item.text is not None:
            await ws.send_str(item.text)
        elif item.data is not None:
            await ws.send_bytes(item.data)
