"""GET /v1/agent/connect: the websocket each runner agent keeps open
(docs/architecture.md, "The agent protocol").

Why a connection is closed, and whether the agent comes back, is protocol/closing.py's table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import WSMsgType, web

from control_plane.agents.session import AgentSession
from control_plane.auth import bearer_token
from control_plane.db.tables import Runner
from control_plane.fleet.admission import Turn
from control_plane.fleet.capabilities import Offers
from control_plane.fleet.registry import AgentConnection
from control_plane.services import Services
from protocol.agent_http import CONNECT_PATH
from protocol.closing import Close, busy_reason
from protocol.messages import (
    OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Hello,
    ProtocolError,
    Welcome,
    negotiate,
    parse_message,
)

log = logging.getLogger(__name__)
routes = web.RouteTableDef()

HELLO_TIMEOUT_S = 15.0


@routes.get(CONNECT_PATH)
async def agent_connect(request: web.Request) -> web.WebSocketResponse:
    svc: Services = request.app[Services.KEY]
    # No websocket-level pings: the agent's capacity message every heartbeat_s already says
    # it is alive, and the watchdog closes a socket that stays silent (a half-open TCP
    # connection included). Pings would double the per-runner traffic of a large fleet.
    # Nor per-message compression: agent messages are small JSON, and deflating each one cost
    # a twenty-fifth of the control plane's CPU per workflow.
    ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024, compress=False)
    # A place in line is taken before the upgrade is answered: who connected first goes first.
    turn = svc.admission.arrive()
    if turn is None:
        await ws.prepare(request)
        retry_after_s = svc.admission.retry_after_s()
        await ws.close(code=Close.BUSY, message=busy_reason(retry_after_s).encode())
        return ws
    handshake = _Handshake(svc, turn)
    try:
        await ws.prepare(request)
        await turn  # at once, or once those ahead are through their handshakes
        handshake.started = svc.admission.now()
        greeted = await _greeting(svc, request, ws)
        if greeted is not None:
            await _serve(svc, ws, *greeted, welcomed=handshake.done)
    finally:
        handshake.done()
    return ws


class _Handshake:
    """An admitted handshake, which ends once: at the welcome, or when the connection does."""

    def __init__(self, svc: Services, turn: Turn) -> None:
        self.svc, self.turn = svc, turn
        self.started = svc.admission.now()
        self.ended = False

    def done(self) -> None:
        if not self.ended:
            self.ended = True
            self.svc.admission.depart(self.turn, self.svc.admission.now() - self.started)


async def _greeting(
    svc: Services, request: web.Request, ws: web.WebSocketResponse
) -> tuple[Runner, Hello, int] | None:
    """The runner's token and its hello, with the protocol version both speak; ``None``
    once the socket was closed for want of either."""
    raw = bearer_token(request)
    runner = await svc.store.runner_by_token(raw) if raw else None
    if runner is None:
        await ws.close(code=Close.BAD_TOKEN, message=b"invalid runner token")
        return None
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT_S)
        hello = parse_message(first.data) if first.type == WSMsgType.TEXT else None
    except (TimeoutError, ProtocolError) as exc:
        log.info("runner %s: no valid hello: %s", runner.id, exc)
        await ws.close(code=Close.BAD_PROTOCOL, message=b"expected hello")
        return None
    version = negotiate(hello.protocol_version) if isinstance(hello, Hello) else None
    if not isinstance(hello, Hello) or version is None:
        await ws.close(
            code=Close.BAD_PROTOCOL,
            message=f"protocol versions {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION} spoken here".encode(),
        )
        return None
    return runner, hello, version


async def _serve(
    svc: Services,
    ws: web.WebSocketResponse,
    runner: Runner,
    hello: Hello,
    version: int,
    *,
    welcomed: Callable[[], None],
) -> None:
    """Register the runner, welcome it and run its session until the socket closes."""
    conn = AgentConnection(
        runner_id=runner.id,
        account_id=runner.account_id,
        name=runner.name,
        tags=list(runner.tags),
        status=runner.status,
        ws=ws,
        capacity=hello.capacity,
        comfyui=hello.comfyui.model_dump(),
        healthy=hello.healthy,
        unhealthy_reason=hello.unhealthy_reason,
        offers=Offers.of(hello.comfyui.model_dump()),
    )
    old = svc.registry.add(conn)
    if old is not None:
        await old.ws.close(code=Close.REPLACED, message=b"replaced by a newer connection")
    replicas = svc.fleet.replicas
    if replicas is not None:
        # Held here now; a connection another control plane holds is closed there.
        await replicas.connected(conn)
    log.info(
        "runner %s (%s) connected, agent %s speaking protocol %d, holding %d jobs",
        runner.id,
        runner.name,
        hello.agent_version,
        version,
        len(hello.jobs),
    )
    try:
        # What the runner's ComfyUI offers is large and seldom changes: written when it did.
        # Its capacity goes with the next batch (runner_states.py): a fleet reconnecting at
        # once writes nothing for it.
        speaks = (hello.agent_version, version)
        if conn.comfyui != runner.comfyui or speaks != (runner.agent_version, runner.protocol_version):
            await svc.store.save_runner_state(
                runner.id, capacity=conn.capacity.model_dump(), comfyui=conn.comfyui, speaks=speaks
            )
        else:
            svc.fleet.runner_states.changed(conn)
        drop = await svc.fleet.runner_connected(conn, hello.jobs)
        await conn.send(
            Welcome(
                protocol_version=version,
                runner_id=runner.id,
                name=runner.name,
                tags=runner.tags,
                status=runner.status,  # type: ignore[arg-type]
                heartbeat_s=svc.settings.heartbeat_s,
                drop_jobs=drop,
            )
        )
        welcomed()
        await AgentSession(svc, conn).run()
    finally:
        conn.fail_pending()
        svc.fleet.runner_states.forget(conn)
        if replicas is not None:
            await replicas.disconnected(conn)
        if svc.registry.remove(conn):
            # An agent that says goodbye (1001 after a drain) will not finish what it still
            # holds here: those jobs move now rather than after the grace period.
            said_goodbye = ws.close_code == Close.GOING_AWAY and not svc.fleet.stopping
            await svc.fleet.runner_disconnected(conn, left=said_goodbye)
            await svc.store.save_runner_state(conn.runner_id, capacity=conn.capacity.model_dump())
        log.info("runner %s disconnected (close code %s)", runner.id, ws.close_code)
