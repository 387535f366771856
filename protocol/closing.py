"""Why a control plane closes an agent's websocket, and what the agent does about it: the one
table both sides read. Codes 4000-4999 are the application's own (RFC 6455, 7.4.2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum


class Close(IntEnum):
    GOING_AWAY = 1001  # the control plane shuts down: another one (or this one) comes back
    BAD_TOKEN = 4001
    BAD_PROTOCOL = 4002
    RUNNER_DELETED = 4003
    REPLACED = 4004  # a newer connection of the same runner took over
    SILENT = 4005  # nothing heard from the runner within the runner timeout
    BUSY = 4006  # too many agents connecting at once: the reason says when to come back


@dataclass(frozen=True)
class Reason:
    text: str
    retry: bool  # reconnect (with backoff) rather than exit


REASONS: dict[int, Reason] = {
    Close.GOING_AWAY: Reason("the control plane is shutting down", retry=True),
    Close.BAD_TOKEN: Reason("the control plane refused the runner token", retry=False),
    Close.BAD_PROTOCOL: Reason(
        "the control plane does not support this agent's protocol version", retry=False
    ),
    Close.RUNNER_DELETED: Reason("the runner was deleted on the control plane", retry=False),
    Close.REPLACED: Reason("replaced by a newer connection of the same runner", retry=True),
    Close.SILENT: Reason("nothing heard from the runner in time", retry=True),
    Close.BUSY: Reason("the control plane is busy with other agents connecting", retry=True),
}
_RETRY_AFTER = re.compile(r"retry after (\d+(?:\.\d+)?) s")


def busy_reason(retry_after_s: float) -> str:
    """The close reason of ``BUSY``: when to come back (the agent adds its own jitter)."""
    return f"busy: retry after {retry_after_s:.1f} s"


def retry_after(reason: str | None) -> float | None:
    """The seconds a ``BUSY`` close reason asks the agent to wait, if it names any."""
    found = _RETRY_AFTER.search(reason or "")
    return float(found.group(1)) if found else None


def gives_up(code: int | None) -> bool:
    """An agent closed with this code stops for good (its token or version will not do)."""
    reason = REASONS.get(code) if code is not None else None
    return reason is not None and not reason.retry
