"""Why a control plane closes an agent's websocket, and what the agent does about it: the one
table both sides read. Codes 4000-4999 are the application's own (RFC 6455, 7.4.2)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Close(IntEnum):
    GOING_AWAY = 1001  # the control plane shuts down: another one (or this one) comes back
    BAD_TOKEN = 4001
    BAD_PROTOCOL = 4002
    RUNNER_DELETED = 4003
    REPLACED = 4004  # a newer connection of the same runner took over
    SILENT = 4005  # nothing heard from the runner within the runner timeout


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
}


def gives_up(code: int | None) -> bool:
    """An agent closed with this code stops for good (its token or version will not do)."""
    reason = REASONS.get(code) if code is not None else None
    return reason is not None and not reason.retry
