"""GET /v1/agent/connect: the websocket each runner agent keeps open
(docs/architecture.md, "The agent protocol").

Close codes and what the agent should do about them:

    4001 invalid runner token       give up
    4002 protocol version refused   give up
    4003 runner deleted             give up
    4004 replaced by a newer connection of the same runner   retry
    4005 nothing heard from the runner within runner_timeout_s   retry
    1001 going away (shutdown)      retry
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from control_plane.auth import bearer_token
from control_plane.capabilities import Offers
from control_plane.registry import AgentConnection
from control_plane.services import Services
from protocol.messages import (
    PROTOCOL_VERSION,
    CapacityUpdate,
    Hello,
    JobDone,
    JobUpdate,
    ProtocolError,
    Ready,
    Reply,
    Welcome,
    parse_message,
)

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

CLOSE_BAD_TOKEN = 4001
CLOSE_BAD_PROTOCOL = 4002
CLOSE_REPLACED = 4004
CLOSE_SILENT = 4005
HELLO_TIMEOUT_S = 15.0
PERSIST_EVERY_S = 30.0


@routes.get("/v1/agent/connect")
async def agent_connect(request: web.Request) -> web.WebSocketResponse:
    svc: Services = request.app[Services.KEY]
    # No websocket-level pings: the agent's capacity message every heartbeat_s already says
    # it is alive, and the watchdog closes a socket that stays silent (a half-open TCP
    # connection included). Pings would double the per-runner traffic of a large fleet.
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    raw = bearer_token(request)
    runner = await svc.store.runner_by_token(raw) if raw else None
    if runner is None:
        await ws.close(code=CLOSE_BAD_TOKEN, message=b"invalid runner token")
        return ws
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT_S)
        hello = parse_message(first.data) if first.type == WSMsgType.TEXT else None
    except (TimeoutError, ProtocolError) as exc:
        log.info("runner %s: no valid hello: %s", runner.id, exc)
        await ws.close(code=CLOSE_BAD_PROTOCOL, message=b"expected hello")
        return ws
    if not isinstance(hello, Hello) or hello.protocol_version != PROTOCOL_VERSION:
        await ws.close(
            code=CLOSE_BAD_PROTOCOL, message=f"protocol version {PROTOCOL_VERSION} required".encode()
        )
        return ws

    conn = AgentConnection(
        runner_id=runner.id,
        account_id=runner.account_id,
        name=runner.name,
        tags=list(runner.tags),
        status=runner.status,
        ws=ws,
        capacity=hello.capacity.model_dump(),
        comfyui=hello.comfyui.model_dump(),
        healthy=hello.healthy,
        unhealthy_reason=hello.unhealthy_reason,
        offers=Offers.of(hello.comfyui.model_dump()),
    )
    old = svc.registry.add(conn)
    if old is not None:
        await old.ws.close(code=CLOSE_REPLACED, message=b"replaced by a newer connection")
    log.info(
        "runner %s (%s) connected, agent %s, holding %d jobs",
        runner.id,
        runner.name,
        hello.agent_version,
        len(hello.jobs),
    )
    try:
        await svc.store.save_runner_state(runner.id, capacity=conn.capacity, comfyui=conn.comfyui)
        drop = await svc.fleet.runner_connected(conn, hello.jobs)
        await conn.send(
            Welcome(
                runner_id=runner.id,
                name=runner.name,
                tags=runner.tags,
                status=runner.status,  # type: ignore[arg-type]
                heartbeat_s=svc.settings.heartbeat_s,
                drop_jobs=drop,
            )
        )
        watchdog = asyncio.create_task(_watchdog(svc, conn))
        try:
            await _receive_loop(svc, conn)
        except ConnectionResetError as exc:
            # The agent's host went away mid-frame: the ordinary end of a connection.
            log.info("runner %s: connection reset: %s", runner.id, exc)
        finally:
            watchdog.cancel()
    finally:
        conn.fail_pending()
        if svc.registry.remove(conn):
            # An agent that says goodbye (1001 after a drain) will not finish what it still
            # holds here: those jobs move now rather than after the grace period.
            said_goodbye = ws.close_code == WSCloseCode.GOING_AWAY and not svc.fleet.stopping
            await svc.fleet.runner_disconnected(conn, left=said_goodbye)
            await svc.store.save_runner_state(conn.runner_id, capacity=conn.capacity)
        log.info("runner %s disconnected (close code %s)", runner.id, ws.close_code)
    return ws


async def _watchdog(svc: Services, conn: AgentConnection) -> None:
    """Close the socket of a runner gone silent: its jobs then get their grace period.

    Silence is counted only while the control plane itself was there to listen: when the
    watchdog wakes late, the event loop was busy and the runner's frames may be sitting
    unread, so that time is not held against the runner."""
    timeout_s = svc.settings.runner_timeout_s
    check_s = timeout_s / 3
    loop = asyncio.get_running_loop()
    missed_s = 0.0  # of the silence so far, how long the loop was too busy to listen
    heard = conn.heard_at
    while not conn.ws.closed:
        planned = loop.time() + check_s
        await asyncio.sleep(check_s)  # a periodic check, not a wait for an event
        late_s = loop.time() - planned
        if conn.heard_at != heard:
            heard, missed_s = conn.heard_at, 0.0
        missed_s += max(0.0, late_s)
        if late_s > check_s / 2:
            continue  # just back from a stall: let the receive loop read what waited first
        silent_s = loop.time() - conn.heard_at - missed_s
        if silent_s > timeout_s:
            log.warning(
                "runner %s: nothing heard for %.0f s; closing its connection", conn.runner_id, silent_s
            )
            await conn.ws.close(code=CLOSE_SILENT, message=b"no heartbeat")
            return


async def _receive_loop(svc: Services, conn: AgentConnection) -> None:
    async for frame in conn.ws:
        if frame.type != WSMsgType.TEXT:
            continue
        conn.heard()
        try:
            msg = parse_message(frame.data)
        except ProtocolError as exc:
            log.warning("runner %s: bad message ignored: %s", conn.runner_id, exc)
            continue
        try:
            await _handle(svc, conn, msg)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad report must not drop the runner's connection
            log.exception("runner %s: handling %s failed", conn.runner_id, type(msg).__name__)


async def _handle(svc: Services, conn: AgentConnection, msg: object) -> None:
    if isinstance(msg, Ready):
        await svc.fleet.runner_ready(conn, msg.free_slots)
    elif isinstance(msg, JobUpdate):
        await svc.fleet.job_update(conn, msg)
    elif isinstance(msg, JobDone):
        await svc.fleet.job_done(conn, msg)
    elif isinstance(msg, CapacityUpdate):
        conn.capacity = msg.capacity.model_dump()
        was_healthy = conn.healthy
        conn.healthy, conn.unhealthy_reason = msg.healthy, msg.unhealthy_reason
        if conn.healthy != was_healthy:
            log.info(
                "runner %s is %s",
                conn.runner_id,
                "healthy" if conn.healthy else f"unhealthy: {conn.unhealthy_reason}",
            )
            svc.fleet.kick()
        # Live figures stay in memory; the database gets them now and then, for the time the
        # runner is offline, so a large fleet's heartbeats do not turn into a write storm.
        if time.time() - conn.persisted_at >= PERSIST_EVERY_S or conn.healthy != was_healthy:
            conn.persisted_at = time.time()
            await svc.store.save_runner_state(conn.runner_id, capacity=conn.capacity)
        svc.fleet.changed()
    elif isinstance(msg, Reply):
        conn.resolve(msg)
    # Anything else (including types this version does not know) is ignored.
