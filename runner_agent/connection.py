"""The agent's one websocket to the control plane, kept up for as long as the agent runs.

Each connection starts with ``hello`` (capacity, ComfyUI, the jobs the agent still holds) and
waits for ``welcome``; then the updates buffered while disconnected are flushed, in order,
and messages flow both ways until the connection drops. A drop is followed by a reconnect
after a capped exponential backoff with jitter. Jobs keep running meanwhile.

Close codes from the control plane (protocol/closing.py) either give up (the agent exits:
its token or protocol version will never do) or reconnect with backoff; after ``replaced``
(a newer connection of the same runner) the backoff keeps growing, so that two agents sharing
a token do not duel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from protocol.closing import REASONS, Close, gives_up, retry_after
from protocol.messages import (
    OLDEST_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    CapacityUpdate,
    Hello,
    JobDone,
    JobUpdate,
    Message,
    ProtocolError,
    Ready,
    Reply,
    Welcome,
    dump_message,
    parse_message,
)
from runner_agent.config import AgentSettings, connect_url_of, http_base_url_of

log = logging.getLogger(__name__)

# A Job message carries a whole workflow; allow big ones.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
JobKey = tuple[str, int]
Outgoing = JobUpdate | JobDone | CapacityUpdate | Ready | Reply
Connect = Callable[..., Any]  # websockets.asyncio.client.connect or a stand-in
Sleep = Callable[[float], Awaitable[None]]


class GiveUp(Exception):
    """The control plane will never accept this agent as configured; reconnecting is futile."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(
            f"{REASONS[code].text if code in REASONS else 'connection refused'} (code {code}"
            + (f": {reason})" if reason else ")")
        )


class ConnectionHandler(Protocol):
    """What the connection asks of the agent."""

    async def hello(self, buffered: set[JobKey]) -> Hello: ...

    async def on_welcome(self, welcome: Welcome) -> None: ...

    async def on_connected(self) -> None: ...

    async def on_message(self, message: Message) -> None: ...

    async def capacity(self) -> CapacityUpdate: ...


def backoff_delay(failures: int, *, initial_s: float, max_s: float, jitter: float, rand: float) -> float:
    """Delay before the next attempt after ``failures`` failed ones: doubling from
    ``initial_s`` up to ``max_s``, of which a fraction ``jitter`` is random (``rand`` in
    [0, 1)), so that a fleet cut off at once does not come back at once."""
    # 2.0, not 2: int ** int is typed Any (a negative exponent would give a float).
    base = min(max_s, initial_s * 2.0 ** min(failures, 32))
    return base * (1.0 - jitter * rand)


class UpdateBuffer:
    """Job messages produced while disconnected, flushed in order on reconnect.

    Bounded: past ``limit`` the oldest node event or progress update goes first. Status
    changes and ``job_done`` are never dropped; there are at most a few per job."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: collections.deque[JobUpdate | JobDone] = collections.deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, message: JobUpdate | JobDone) -> None:
        self._items.append(message)
        if len(self._items) > self.limit:
            for index, item in enumerate(self._items):
                if isinstance(item, JobUpdate) and item.status is None:
                    del self._items[index]
                    self.dropped += 1
                    break

    def keys(self) -> set[JobKey]:
        return {(m.workflow_id, m.attempt) for m in self._items}

    def discard_jobs(self, keys: set[JobKey]) -> None:
        self._items = collections.deque(m for m in self._items if (m.workflow_id, m.attempt) not in keys)

    def popleft(self) -> JobUpdate | JobDone:
        return self._items.popleft()

    def appendleft(self, message: JobUpdate | JobDone) -> None:
        self._items.appendleft(message)


class ControlPlaneConnection:
    def __init__(
        self,
        settings: AgentSettings,
        handler: ConnectionHandler,
        *,
        connect_fn: Connect = connect,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        buffer_limit: int = 10_000,
    ) -> None:
        self.settings = settings
        self._handler = handler
        self._connect = connect_fn
        self._sleep = sleep
        self._rand = rand
        self.buffer = UpdateBuffer(buffer_limit)
        # Held while sending, and while flushing the buffer on connect: keeps messages in order.
        self._send_lock = asyncio.Lock()
        # Set once welcomed and flushed; None while disconnected.
        self._ws: ClientConnection | None = None
        self._socket: ClientConnection | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._rehello = False
        self._welcomed = False
        self._last_close_code: int | None = None
        # A busy control plane's "come back in so many seconds", for the next pause only.
        self._retry_after_s: float | None = None
        self.welcome: Welcome | None = None
        self.connected = asyncio.Event()
        # The control plane dialled now: the one that last welcomed us, or the next to try.
        self._urls = settings.server_urls
        self._at = 0

    @property
    def server_url(self) -> str:
        return self._urls[self._at]

    @property
    def connect_url(self) -> str:
        return connect_url_of(self.server_url)

    @property
    def http_base_url(self) -> str:
        """Where the job's files go and come from: the control plane we are connected to."""
        return http_base_url_of(self.server_url)

    # -- public -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect, until :meth:`stop`. Raises :class:`GiveUp`."""
        failures = 0
        while not self._stopping:
            welcomed = await self._connect_once()
            if self._stopping:
                break
            if welcomed and self._last_close_code != Close.REPLACED:
                failures = 0
            if self._rehello:
                self._rehello = False
                continue
            if not welcomed and len(self._urls) > 1:
                # The next control plane; one not tried since the last welcome at once,
                # unless this one asked us to come back later.
                self._at = (self._at + 1) % len(self._urls)
                if (failures + 1) % len(self._urls) and self._retry_after_s is None:
                    failures += 1
                    log.info("trying the control plane at %s", self.server_url)
                    continue
            delay = backoff_delay(
                failures // len(self._urls),
                initial_s=self.settings.reconnect_initial_s,
                max_s=self.settings.reconnect_max_s,
                jitter=self.settings.reconnect_jitter,
                rand=self._rand(),
            )
            failures += 1
            if self._retry_after_s is not None:
                # Never sooner than asked; jittered upwards so that a herd told the same
                # time does not come back as one.
                hint = self._retry_after_s * (1.0 + self.settings.reconnect_jitter * self._rand())
                delay, self._retry_after_s = max(delay, hint), None
            log.info("reconnecting to %s in %.2f s", self.connect_url, delay)
            await self._pause(delay)

    async def send(self, message: Outgoing) -> None:
        """Send now if connected; job messages are buffered while not, others dropped (a
        stale ``ready`` or capacity reading is worth nothing later, and the control plane
        fails a request whose connection dropped)."""
        async with self._send_lock:
            if self._ws is not None:
                try:
                    await self._ws.send(dump_message(message))
                    return
                except ConnectionClosed:
                    self._ws = None
            if isinstance(message, JobUpdate | JobDone):
                self.buffer.append(message)

    async def stop(self) -> None:
        """Close with 1001 (going away) and end :meth:`run`."""
        self._stopping = True
        self._stop_event.set()
        socket = self._socket
        if socket is not None:
            await socket.close(1001, "agent stopping")

    async def reconnect(self, reason: str) -> None:
        """Hang up and connect again at once, to send a fresh hello."""
        socket = self._socket
        if socket is not None:
            log.info("reconnecting to the control plane: %s", reason)
            self._rehello = True
            await socket.close(1000, reason[:100])

    # -- one connection ---------------------------------------------------------------------

    async def _connect_once(self) -> bool:
        """One connection from dial to drop; ``True`` if it got as far as the welcome."""
        self._welcomed = False
        self._last_close_code = None
        try:
            async with self._connect(
                self.connect_url,
                additional_headers={"Authorization": f"Bearer {self.settings.token}"},
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=self.settings.welcome_timeout_s,
                user_agent_header=f"comfyfleet-agent/{self.settings.agent_version}",
            ) as socket:
                self._socket = socket
                if self._stopping:  # stop() came while dialling
                    await socket.close(1001, "agent stopping")
                    return False
                # A drop mid-session is the normal end of a connection, not an error.
                with contextlib.suppress(ConnectionClosed):
                    await self._session(socket)
                self._check_close_code(socket)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise GiveUp(Close.BAD_TOKEN, f"HTTP {status} on connect") from exc
            log.warning("control plane refused the websocket: HTTP %s", status)
        except GiveUp:
            raise
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.warning(
                "cannot reach the control plane at %s: %s: %s",
                self.connect_url,
                exc.__class__.__name__,
                exc,
            )
        except Exception:
            # The connection loop's boundary: a bug in one session must not end the agent.
            log.exception("control-plane session failed")
        finally:
            self._socket = None
            async with self._send_lock:
                self._ws = None
            self.connected.clear()
        return self._welcomed

    def _check_close_code(self, socket: ClientConnection) -> None:
        code = self._last_close_code = socket.close_code
        if code == Close.REPLACED:
            log.warning("another connection with this runner's token replaced this one")
            return
        if code == Close.BUSY:
            self._retry_after_s = retry_after(socket.close_reason)
            log.info("the control plane is busy with other agents: %s", socket.close_reason or "")
            return
        if code is not None and gives_up(code):
            raise GiveUp(code, socket.close_reason or "")
        if self._rehello:
            log.info("closed the control-plane connection to send a fresh hello")
        elif not self._stopping:
            log.warning("control plane connection closed (code %s %s)", code, socket.close_reason or "")

    async def _session(self, socket: ClientConnection) -> None:
        hello = await self._handler.hello(self.buffer.keys())
        await socket.send(dump_message(hello))
        try:
            raw = await asyncio.wait_for(socket.recv(), self.settings.welcome_timeout_s)
        except TimeoutError:
            log.warning("no welcome from the control plane within %s s", self.settings.welcome_timeout_s)
            await socket.close(1002, "no welcome")
            return
        welcome = _parse(raw)
        if not isinstance(welcome, Welcome):
            log.warning("expected a welcome from the control plane, got %r", raw[:200])
            await socket.close(1002, "expected welcome")
            return
        if not OLDEST_PROTOCOL_VERSION <= welcome.protocol_version <= PROTOCOL_VERSION:
            # A control plane answers with a version both speak; one that does not is broken.
            log.warning(
                "the control plane answered protocol version %d; this agent speaks %d to %d",
                welcome.protocol_version,
                OLDEST_PROTOCOL_VERSION,
                PROTOCOL_VERSION,
            )
            await socket.close(1002, "unknown protocol version")
            return
        self.welcome = welcome
        self._welcomed = True
        log.info(
            "connected to the control plane as runner %s (%s), status %s, tags %s, speaking protocol %d",
            welcome.runner_id,
            welcome.name,
            welcome.status,
            welcome.tags,
            welcome.protocol_version,
        )
        dropped = {(j.workflow_id, j.attempt) for j in welcome.drop_jobs}
        self.buffer.discard_jobs(dropped)
        await self._handler.on_welcome(welcome)
        await self._flush(socket)
        self.connected.set()
        heartbeat = asyncio.create_task(self._heartbeat(welcome), name="heartbeat")
        try:
            await self._handler.on_connected()
            async for raw_message in socket:
                await self._dispatch(raw_message)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def _flush(self, socket: ClientConnection) -> None:
        async with self._send_lock:
            if len(self.buffer):
                log.info(
                    "sending %d job updates held while disconnected (%d dropped)",
                    len(self.buffer),
                    self.buffer.dropped,
                )
            while len(self.buffer):
                message = self.buffer.popleft()
                try:
                    await socket.send(dump_message(message))
                except ConnectionClosed:
                    self.buffer.appendleft(message)
                    raise
            self.buffer.dropped = 0
            self._ws = socket

    async def _dispatch(self, raw: str | bytes) -> None:
        message = _parse(raw)
        if message is None or isinstance(message, Welcome):
            return
        try:
            await self._handler.on_message(message)
        except Exception:
            # The receive loop's boundary: one message that breaks must not end the connection.
            log.exception("handling a %s message failed", message.type)

    async def _heartbeat(self, welcome: Welcome) -> None:
        interval = self.settings.heartbeat_s or welcome.heartbeat_s
        if interval <= 0:
            interval = 10.0  # a control plane that asks for no heartbeat still gets one
        while True:
            # A periodic timer, not synchronisation: the heartbeat's own cadence.
            await asyncio.sleep(interval)
            try:
                update = await self._handler.capacity()
            except Exception:
                log.exception("capacity probe failed")
                continue
            await self.send(update)

    async def _pause(self, delay: float) -> None:
        """The backoff pause, cut short by :meth:`stop`."""
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            await asyncio.gather(sleeper, stopper, return_exceptions=True)


def _parse(raw: str | bytes) -> Message | None:
    try:
        return parse_message(raw)
    except ProtocolError as exc:
        log.warning("ignoring a malformed message from the control plane: %s", exc)
        return None
