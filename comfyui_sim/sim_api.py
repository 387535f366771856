"""Endpoints that exist only on the simulator: steering it and seeing what really ran.

``POST /sim/config`` replaces ``node_delays_s`` and/or ``fail_nodes`` (each key given
replaces that whole map). A node that is sleeping through a delay re-reads it, so dropping
a delay releases a node that is running now. ``GET /sim/log`` lists, for the last 100
prompts, the nodes executed (in order), the nodes ComfyUI reported as cached and whether the
prompt succeeded; the ids of the last 100 prompts queued; and those an interrupt hit.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .state import SIM_STATE, SimState


def _config(state: SimState) -> dict[str, Any]:
    return {
        "node_delays_s": dict(state.settings.node_delays_s),
        "fail_nodes": dict(state.settings.fail_nodes),
        "prompt_accept_delay_s": state.settings.prompt_accept_delay_s,
    }


def _parse_delays(value: Any) -> dict[str, float] | None:
    if not isinstance(value, dict):
        return None
    delays: dict[str, float] = {}
    for key, seconds in value.items():
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            return None
        delays[str(key)] = float(seconds)
    return delays


def _parse_failures(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return {str(k): v for k, v in value.items()}


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(_config(request.app[SIM_STATE]))


async def post_config(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body must be JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    delays = failures = None
    if "node_delays_s" in body:
        delays = _parse_delays(body["node_delays_s"])
        if delays is None:
            return web.json_response({"error": "node_delays_s must map names to seconds >= 0"}, status=400)
    if "fail_nodes" in body:
        failures = _parse_failures(body["fail_nodes"])
        if failures is None:
            return web.json_response({"error": "fail_nodes must map names to messages"}, status=400)
    accept_delay = body.get("prompt_accept_delay_s")
    if accept_delay is not None and (
        isinstance(accept_delay, bool) or not isinstance(accept_delay, int | float) or accept_delay < 0
    ):
        return web.json_response({"error": "prompt_accept_delay_s must be seconds >= 0"}, status=400)
    # Everything checked before anything is applied: a bad request changes nothing.
    if accept_delay is not None:
        state.settings.prompt_accept_delay_s = float(accept_delay)
    if delays is not None:
        state.settings.node_delays_s = delays
    if failures is not None:
        state.settings.fail_nodes = failures
    state.executor.hooks_changed()
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
