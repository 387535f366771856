"""Endpoints that exist only on the simulator: steering it and seeing what really ran.

``POST /sim/config`` replaces ``node_delays_s`` and/or ``fail_nodes`` (each key given
replaces that whole map). A node that is sleeping through a delay re-reads it, so dropping
a delay releases a node that is running now. ``GET /sim/log`` lists, for the last 100
prompts, the nodes executed (in order), the nodes ComfyUI reported as cached and whether the
prompt succeeded; the ids of the last 100 prompts queued; and those an interrupt hit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .state import SIM_STATE, SimState


def _config(state: SimState) -> dict[str, Any]:
    return {
        "node_delays_s": dict(state.settings.node_delays_s),
        "fail_nodes": dict(state.settings.fail_nodes),
        "prompt_accept_delay_s": state.settings.prompt_accept_delay_s,
    }


def _is_seconds(value: Any) -> bool:
    """A JSON number that is not negative. JSON booleans arrive as ``bool``, which Python
    counts as an ``int``: they are refused."""
    return not (isinstance(value, bool) or not isinstance(value, int | float) or value < 0)


def _parse_delays(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        return None
    delays: dict[str, float] = {}
    for key, seconds in value.items():
        if not _is_seconds(seconds):
            return None
        delays[str(key)] = float(seconds)
    return delays


def _parse_failures(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return {str(k): v for k, v in value.items()}


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(_config(request.app[SIM_STATE]))


@dataclass
class _ConfigChange:
    """What a ``POST /sim/config`` replaces; ``None``: left as it is."""

    node_delays_s: dict[str, float] | None = None
    fail_nodes: dict[str, str] | None = None
    prompt_accept_delay_s: float | None = None


def _parse_config(body: dict[str, Any]) -> _ConfigChange | str:
    """The change ``body`` asks for, or why it is refused."""
    change = _ConfigChange()
    if "node_delays_s" in body:
        change.node_delays_s = _parse_delays(body["node_delays_s"])
        if change.node_delays_s is None:
            return "node_delays_s must map names to seconds >= 0"
    if "fail_nodes" in body:
        change.fail_nodes = _parse_failures(body["fail_nodes"])
        if change.fail_nodes is None:
            return "fail_nodes must map names to messages"
    accept_delay = body.get("prompt_accept_delay_s")
    if accept_delay is not None:
        if not _is_seconds(accept_delay):
            return "prompt_accept_delay_s must be seconds >= 0"
        change.prompt_accept_delay_s = float(accept_delay)
    return change


def _apply_config(state: SimState, change: _ConfigChange) -> None:
    if change.prompt_accept_delay_s is not None:
        state.settings.prompt_accept_delay_s = change.prompt_accept_delay_s
    if change.node_delays_s is not None:
        state.settings.node_delays_s = change.node_delays_s
    if change.fail_nodes is not None:
        state.settings.fail_nodes = change.fail_nodes
    state.executor.hooks_changed()


def _bad_config(error: str) -> web.Response:
    return web.json_response({"error": error}, status=400)


async def post_config(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        body = await request.json()
    except ValueError:
        return _bad_config("body must be JSON")
    if not isinstance(body, dict):
        return _bad_config("body must be a JSON object")
    # Everything is checked before anything is applied: a bad request changes nothing.
    change = _parse_config(body)
    if isinstance(change, str):
        return _bad_config(change)
    _apply_config(state, change)
    return web.json_response(_config(state))


async def get_log(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    return web.json_response(
        {"prompts": list(state.log), "queued": list(state.queued), "interrupted": list(state.interrupted)}
    )


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/sim/config", get_config),
    ("POST", "/sim/config", post_config),
    ("GET", "/sim/log", get_log),
]
