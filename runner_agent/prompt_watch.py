"""Following one prompt through ComfyUI until it ends.

Each watch opens its own ComfyUI websocket under a fresh client id, before the prompt is
posted, so that no event is missed. ComfyUI sends a prompt's events only to the socket of
the client id it was posted with, and reconnecting under the same id can orphan the new
socket (see the traps in the captured transcripts). So a lost socket is not reopened: the
``/history/{prompt_id}`` poll, which runs all along (slowly while events flow, fast once they
stop), finishes the prompt by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from runner_agent.comfyui import ComfyUIClient, ComfyUIError, ComfyUIUnavailable, queue_position

log = logging.getLogger(__name__)

# Events about a prompt; "status", "progress_state", previews and the like are left out.
PROMPT_EVENTS = frozenset(
    {
        "execution_start",
        "execution_cached",
        "executing",
        "executed",
        "progress",
        "execution_success",
        "execution_error",
        "execution_interrupted",
    }
)
# A prompt missing from both the queue and the history this many polls in a row is gone.
_VANISHED_POLLS = 2

OnEvent = Callable[[str, dict[str, Any]], Awaitable[None]]
# Sockets closing in the background, held so that their tasks are not collected mid-close.
_closing: set[asyncio.Task[bool]] = set()


@dataclass(frozen=True)
class PromptOutcome:
    """How a prompt ended. ``detail`` is ComfyUI's execution_error or execution_interrupted
    data; ``messages`` the history's status messages, for events the socket did not bring."""

    status: Literal["success", "error", "interrupted", "lost"]
    message: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # A lost prompt whose ComfyUI stopped answering: that instance is down.
    comfyui_down: bool = False


def _as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def outcome_from_history(entry: dict[str, Any]) -> PromptOutcome | None:
    """The outcome a ``/history`` entry records, or ``None`` if it does not record an end."""
    status = _as_dict(entry.get("status"))
    messages = [
        (m[0], m[1])
        for m in status.get("messages") or []
        if isinstance(m, list) and len(m) == 2 and isinstance(m[0], str) and isinstance(m[1], dict)
    ]
    outputs = _as_dict(entry.get("outputs"))
    status_str = status.get("status_str")
    if status_str == "error":
        for kind, data in messages:
            if kind == "execution_error":
                return PromptOutcome(
                    "error", str(data.get("exception_message", "")).strip(), outputs, data, messages
                )
            if kind == "execution_interrupted":
                return PromptOutcome("interrupted", "execution interrupted", outputs, data, messages)
        return PromptOutcome("error", "ComfyUI recorded an error without details", outputs, {}, messages)
    if status_str == "success" or status.get("completed") or (not status and outputs):
        return PromptOutcome("success", "", outputs, {}, messages)
    return None


class PromptWatch:
    """``async with PromptWatch(comfy, ...) as watch``: post the prompt with
    ``watch.client_id``, then ``await watch.follow(prompt_id, on_event)``."""

    def __init__(
        self,
        comfy: ComfyUIClient,
        *,
        poll_slow_s: float,
        poll_fast_s: float,
        down_grace_s: float,
        tag: str,
        events: bool = True,
    ) -> None:
        self.comfy = comfy
        self.client_id = uuid.uuid4().hex
        # False for a prompt posted before the agent restarted: its events go to a client id
        # that no longer listens, so the history poll alone follows it.
        self._want_events = events
        self._poll_slow_s = poll_slow_s
        self._poll_fast_s = poll_fast_s
        self._down_grace_s = down_grace_s
        self._tag = tag  # "workflow <id> attempt <n>", for log lines
        # None marks the end of the socket.
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self.socket_open = False

    async def __aenter__(self) -> PromptWatch:
        if not self._want_events:
            return self
        try:
            self._ws = await self.comfy.connect_ws(self.client_id)
        except ComfyUIUnavailable as exc:
            # Posting may still work; the history poll alone then follows the prompt.
            log.warning("%s: no ComfyUI websocket, following by polling: %s", self._tag, exc)
            return self
        self.socket_open = True
        self._reader = asyncio.create_task(self._read(self._ws), name=f"comfy-ws {self._tag}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._ws is not None:
            # The closing handshake is ComfyUI's round trip, not the job's: the outputs need
            # not wait for it.
            closing = asyncio.create_task(self._ws.close(), name=f"comfy-ws close {self._tag}")
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)
            self._ws = None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary previews, pings
                try:
                    message = json.loads(frame.data)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("type") in PROMPT_EVENTS:
                    self._events.put_nowait(message)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: ComfyUI websocket failed: %s", self._tag, exc)
        finally:
            self._events.put_nowait(None)

    async def follow(self, prompt_id: str, on_event: OnEvent) -> PromptOutcome:
        """Pass each event of ``prompt_id`` to ``on_event`` until the prompt ends."""
        schedule = _PollSchedule(self._poll_fast_s, self._poll_slow_s, hurry=not self.socket_open)
        poller = _HistoryPoller(self.comfy, prompt_id, self._down_grace_s, self._tag)
        while True:
            try:
                message = await asyncio.wait_for(self._events.get(), schedule.wait_s())
            except TimeoutError:
                outcome = await poller.poll()
                if outcome is not None:
                    return outcome
                schedule.polled(trouble=poller.trouble)
                continue
            if message is None:
                if self.socket_open:
                    log.warning(
                        "%s: ComfyUI websocket closed; polling history of prompt %s",
                        self._tag,
                        prompt_id,
                    )
                self.socket_open = False
                schedule.poll_now()
                continue
            outcome = await self._pass_event(prompt_id, message, on_event, schedule)
            if outcome is not None:
                return outcome

    async def _pass_event(
        self, prompt_id: str, message: dict[str, Any], on_event: OnEvent, schedule: _PollSchedule
    ) -> PromptOutcome | None:
        """Hand a socket message about ``prompt_id`` to ``on_event``; the outcome if it ends
        the prompt."""
        kind, data = message["type"], message.get("data")
        if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
            return None
        await on_event(kind, data)
        if kind == "execution_error":
            return PromptOutcome("error", str(data.get("exception_message", "")).strip(), detail=data)
        if kind == "execution_interrupted":
            return PromptOutcome("interrupted", "execution interrupted", detail=data)
        if kind == "execution_success":
            # The history is written just after; look soon, not in a slow poll's time.
            schedule.poll_soon()
        elif kind == "executing" and data.get("node") is None:
            # ComfyUI's "prompt done" signal: its history is ready now.
            schedule.poll_now()
        return None


class _PollSchedule:
    """When :meth:`PromptWatch.follow` next polls the history. Polls are slow while the
    socket brings events and fast ("hurry") once it cannot be relied on to."""

    def __init__(self, fast_s: float, slow_s: float, *, hurry: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._fast_s = fast_s
        self._slow_s = slow_s
        self._hurry = hurry
        self._next_at = self._loop.time() + (fast_s if hurry else slow_s)

    def wait_s(self) -> float:
        return max(0.0, self._next_at - self._loop.time())

    def polled(self, *, trouble: bool) -> None:
        # Trouble (ComfyUI unreachable, the prompt unaccounted for) warrants a quick look.
        interval = self._fast_s if self._hurry or trouble else self._slow_s
        self._next_at = self._loop.time() + interval

    def poll_now(self) -> None:
        self._hurry = True
        self._next_at = self._loop.time()

    def poll_soon(self) -> None:
        self._hurry = True
        self._next_at = min(self._next_at, self._loop.time() + self._fast_s)


class _HistoryPoller:
    """One look at ComfyUI's history (and, when that has nothing, its queue)."""

    def __init__(self, comfy: ComfyUIClient, prompt_id: str, down_grace_s: float, tag: str):
        self.comfy = comfy
        self.prompt_id = prompt_id
        self.down_grace_s = down_grace_s
        self.tag = tag
        self._vanished = 0
        self._down_since: float | None = None

    @property
    def trouble(self) -> bool:
        """ComfyUI is unreachable or the prompt is unaccounted for: look again soon."""
        return self._down_since is not None or self._vanished > 0

    async def poll(self) -> PromptOutcome | None:
        loop = asyncio.get_running_loop()
        try:
            outcome = await self._look()
        except ComfyUIError as exc:
            now = loop.time()
            if isinstance(exc, ComfyUIUnavailable) and exc.refused:
                # Nothing listens where ComfyUI was: it stopped or restarted, and its queue,
                # this prompt included, went with it. Waiting would only delay the retry.
                return PromptOutcome(
                    "lost",
                    f"ComfyUI stopped while running prompt {self.prompt_id}: {exc}",
                    comfyui_down=True,
                )
            if self._down_since is None:
                log.warning("%s: cannot poll prompt %s: %s", self.tag, self.prompt_id, exc)
                self._down_since = now
            if now - self._down_since >= self.down_grace_s:
                return PromptOutcome(
                    "lost",
                    f"ComfyUI stayed unreachable for {now - self._down_since:.0f} s "
                    f"while running prompt {self.prompt_id}: {exc}",
                    comfyui_down=True,
                )
            return None
        if self._down_since is not None:
            log.info("%s: ComfyUI answers again (prompt %s)", self.tag, self.prompt_id)
            self._down_since = None
        return outcome

    async def _look(self) -> PromptOutcome | None:
        entry = await self.comfy.history(self.prompt_id)
        if entry is not None:
            return outcome_from_history(entry)
        if queue_position(await self.comfy.queue(), self.prompt_id) is not None:
            self._vanished = 0
            return None
        # It may have finished between the two reads: the history answers that.
        entry = await self.comfy.history(self.prompt_id)
        if entry is not None:
            return outcome_from_history(entry)
        self._vanished += 1
        if self._vanished >= _VANISHED_POLLS:
            return PromptOutcome(
                "lost",
                f"prompt {self.prompt_id} is neither queued nor in ComfyUI's history "
                "(ComfyUI restarted, or the prompt was deleted from its queue)",
            )
        return None
