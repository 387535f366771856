"""The operator dashboard: an HTML page, a JSON snapshot and a live stream of snapshots.

Routes (``routes``; operator tokens only, everything scoped to the token's account, or to
every account for an ``admin`` token):

    GET /dashboard                      the page (static HTML, CSS and JS served from here)
    GET /dashboard/assets/{name}        dashboard.css, dashboard.js
    GET /v1/dashboard                   the snapshot as JSON
    GET /v1/dashboard/stream            Server-Sent Events: ``event: snapshot`` with the same
                                        JSON, at once and then whenever it changes

The page and its assets need no token (they hold no data); the two data routes answer 401
without a token and 403 "this needs an operator token" for a client token. Browsers cannot
send headers with EventSource, so the page reads the stream with ``fetch()``.

The snapshot (times are ISO 8601 UTC, durations seconds, sizes bytes; null where unknown)::

    {
      "generated_at": "2025-01-01T12:00:00.000000Z",
      "account": {"id": str | null, "name": str},   # null, "every account": an admin token
      "summary": {"runners": int, "runners_online": int, "gpus_online": int,
                  "jobs_running": int,          # workflows held by a runner, not finished
                  "waiting": int,               # accepted, no runner yet
                  "completed_last_hour": int, "failed_last_hour": int},
      "runners": [{                             # online first, then by name
          "id": str, "name": str, "account": str, "tags": [str], "status": "active" | "disabled",
          "online": bool, "healthy": bool | null, "unhealthy_reason": str | null,
          "connected_at": str | null, "last_seen": str | null,
          "slots": int | null, "free_slots": int | null, "comfyui_version": str | null,
          "gpu_source": "nvml" | "comfyui" | "none", "driver_version": str | null,
          "cuda_version": str | null,
          "gpus": [{"index": int, "name": str | null, "uuid": str | null,
                    "utilization_pct": float | null, "memory_used_bytes": int | null,
                    "memory_total_bytes": int | null, "memory_pct": float | null,
                    "temperature_c": float | null, "power_draw_w": float | null,
                    "power_limit_w": float | null}],   # an offline runner: last known
          "host": {"cpu_pct", "memory_total_bytes", "memory_available_bytes",
                   "disk_free_bytes"},
          "jobs": [{"id": str, "name": str, "status": str, "attempt": int,
                    "progress": float | null,          # 0..1 over the whole prompt
                    "node": str | null,                # what it is executing now
                    "queue_number": int | null, "created_at": str, "started_at": str | null,
                    "run_s": float | null}]}],
      "queue": {"total": int,
                "groups": [{"tags": [str],             # sorted; [] for untagged workflows
                            "count": int, "oldest_created_at": str, "oldest_age_s": float,
                            "runners_online": int}]},  # active online runners that match
      "recent": [{                              # the last 50 workflows, newest first
          "id": str, "name": str, "status": str, "tags": [str], "attempt": int,
          "runner_id": str | null, "runner_name": str | null, "progress": float | null,
          "created_at": str, "started_at": str | null, "completed_at": str | null,
          "queued_s": float | null,             # created -> started (or -> now / -> end)
          "run_s": float | null,                # started -> completed (or -> now)
          "error_node": str | null, "exception_type": str | null,
          "exception_message": str | null}],   # at most 1000 characters
      "throughput": {"bucket_s": 300, "start": str, "end": str,
                     "buckets": [{"start": str, "completed": int, "failed": int}],  # 12
                     "completed": int, "failed": int}   # failed counts failed + invalid
    }

The stream is fed by one background task per account that has a stream open, shared by all
of that account's streams: it rebuilds the snapshot when the fleet signals a change
(``Fleet.next_change``) and at least every second, at most every quarter second, and sends
it only when something other than ``generated_at`` changed. A stream that has nothing to
send writes a keep-alive comment every 15 s and re-checks its token every minute. Streams end
when the server shuts down (``EventHub.close``), so that they do not hold the shutdown up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from control_plane.model.errors import Forbidden, NotFound, Unauthorized
from control_plane.services import Services
from control_plane.web.dashboard_data import View, build_snapshot

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}
REFRESH_S = 1.0
MIN_GAP_S = 0.25
KEEPALIVE_S = 15.0
REAUTH_S = 60.0
# How often a stream notices that its client went away while there is nothing to send.
CLIENT_CHECK_S = 1.0
_SHUTDOWN_KEY = "dashboard:shutdown"

_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
}


def _services(request: web.Request) -> Services:
    return request.app[Services.KEY]


@routes.get("/dashboard")
async def dashboard_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        STATIC_DIR / "dashboard.html",
        headers={**_PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"},
    )


@routes.get("/dashboard/assets/{name}")
async def dashboard_asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no dashboard asset {name!r}")
    return web.FileResponse(
        STATIC_DIR / name, headers={**_PAGE_HEADERS, "Content-Type": f"{ASSETS[name]}; charset=utf-8"}
    )


@routes.get("/v1/dashboard")
async def dashboard_json(request: web.Request) -> web.Response:
    svc = _services(request)
    principal = await svc.auth.client(request, scope="operator")
    snapshot = await build_snapshot(svc, View.of(principal.account, principal.sees_every_account))
    return web.json_response(snapshot, headers={"Cache-Control": "no-store"})


@routes.get("/v1/dashboard/stream")
async def dashboard_stream(request: web.Request) -> web.StreamResponse:
    svc = _services(request)
    principal = await svc.auth.client(request, scope="operator")
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    last_write = last_auth = loop.time()
    try:
        view = View.of(principal.account, principal.sees_every_account)
        with _feed(request.app, svc, view).subscribe() as queue:
            while not _client_gone(request):
                payload: bytes | None = b""
                try:
                    async with asyncio.timeout(CLIENT_CHECK_S):
                        payload = await queue.get()
                except TimeoutError:
                    pass
                if payload is None:
                    break  # the feed closed: the server is shutting down
                now = loop.time()
                if now - last_auth >= REAUTH_S:
                    last_auth = now
                    try:
                        await svc.auth.client(request, scope="operator")
                    except (Unauthorized, Forbidden) as exc:
                        await resp.write(_sse("error", {"status": exc.status, "message": exc.message}))
                        break
                if payload:
                    await resp.write(payload)
                    last_write = now
                elif now - last_write >= KEEPALIVE_S:
                    await resp.write(b": keepalive\n\n")
                    last_write = now
    except ConnectionResetError:
        return resp  # the client went away mid-write
    with contextlib.suppress(ConnectionResetError):
        await resp.write_eof()
    return resp


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# -- one feed per account with a stream open ----------------------------------------------

_FEEDS: weakref.WeakKeyDictionary[web.Application, dict[str, _Feed]] = weakref.WeakKeyDictionary()


def _feed(app: web.Application, svc: Services, view: View) -> _Feed:
    feeds = _FEEDS.setdefault(app, {})
    feed = feeds.get(view.key)
    if feed is None or feed.closed:
        feed = feeds[view.key] = _Feed(svc, view, on_idle=lambda f: _forget(feeds, f))
    return feed


def _forget(feeds: dict[str, _Feed], feed: _Feed) -> None:
    if feeds.get(feed.view.key) is feed:
        del feeds[feed.view.key]


class _Feed:
    """Snapshots of one account, built by one task and handed to every subscriber; each
    subscriber holds only the latest one (a slow client skips, it never piles up)."""

    def __init__(self, svc: Services, view: View, on_idle: Callable[[_Feed], None]) -> None:
        self.svc = svc
        self.view = view
        self.closed = False
        self._on_idle = on_idle
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._latest: bytes | None = None
        self._last_content: str | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[bytes | None]]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
        if self._latest is not None:
            queue.put_nowait(self._latest)
        self._subscribers.add(queue)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"dashboard feed {self.view.key}")
            self._task.add_done_callback(self._ended)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
            if not self._subscribers:
                self.close()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("dashboard feed of %s failed", self.view.name, exc_info=task.exception())
        # Whatever ended it, its streams end too: their clients reconnect to a fresh feed.
        self.close()

    def close(self) -> None:
        """Stop building; subscribers still reading get ``None`` (end of stream)."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._on_idle(self)
        for queue in self._subscribers:
            _offer(queue, None)

    async def _run(self) -> None:
        # The hub tells every subscriber when the server shuts down (``EventHub.close``);
        # this key is no workflow's id, so nothing else arrives on it.
        with self.svc.hub.subscribe(_SHUTDOWN_KEY) as notices:
            shutdown = asyncio.ensure_future(notices.get())
            try:
                await self._loop(shutdown)
            finally:
                shutdown.cancel()

    async def _loop(self, shutdown: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            if shutdown.done():
                self.close()
                return
            started = loop.time()
            # Listen before building, so that a change during the build is not missed.
            change = asyncio.ensure_future(self.svc.fleet.next_change())
            stop = asyncio.ensure_future(self._stop.wait())
            try:
                try:
                    self._publish(await build_snapshot(self.svc, self.view))
                except Exception:  # a loop boundary: log, keep the streams, try again
                    log.exception("dashboard snapshot of %s failed", self.view.name)
                await asyncio.wait(
                    {change, stop, shutdown}, timeout=REFRESH_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                change.cancel()
                stop.cancel()
            gap = started + MIN_GAP_S - loop.time()
            if gap > 0 and not self.closed:
                # Rate limit: a burst of changes makes one rebuild, not one each.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(gap):
                        await self._stop.wait()

    def _publish(self, snapshot: dict[str, Any]) -> None:
        content = json.dumps({k: v for k, v in snapshot.items() if k != "generated_at"}, sort_keys=True)
        if content == self._last_content or self.closed:
            return
        self._last_content = content
        self._latest = _sse("snapshot", snapshot)
        for queue in self._subscribers:
            _offer(queue, self._latest)


def _offer(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """Replace what the subscriber has not read yet with ``item``."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
