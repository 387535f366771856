"""ComfyUI's JSON endpoints: prompts, queue, history, interrupt, node and system info."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

from aiohttp import web

from .object_info import all_node_info, node_info
from .registry import NODE_CLASSES
from .state import SIM_STATE, SimState
from .validation import validate_prompt
from .ws_hub import SERVER_FEATURES

# Keys ComfyUI strips from extra_data before queueing (API credentials).
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")

MODEL_FOLDERS = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet",
    "gligen", "upscale_models", "custom_nodes", "hypernetworks", "photomaker", "classifiers",
    "model_patches", "audio_encoders",
]  # fmt: skip


def _state(request: web.Request) -> SimState:
    return request.app[SIM_STATE]


def server_error() -> web.Response:
    """What aiohttp answers when a ComfyUI handler raises (a body that is not JSON...)."""
    return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself in trouble")


async def _json_or_none(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


# -- prompts ------------------------------------------------------------------------------


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response(_state(request).queue_info())


def _prompt_number(state: SimState, body: dict[str, Any]) -> float | None:
    """The queue position ``body`` asks for, ``None`` if it cannot be read as a number.
    Without one the prompt takes the next number, negated for ``front`` so that it sorts
    before the others."""
    if "number" in body:
        try:
            return float(body["number"])
        except (TypeError, ValueError):
            return None
    number = state.queue.take_number()
    return -number if body.get("front") else number


def _no_prompt() -> web.Response:
    error = {
        "type": "no_prompt",
        "message": "No prompt provided",
        "details": "No prompt provided",
        "extra_info": {},
    }
    return web.json_response({"error": error, "node_errors": {}}, status=400)


def _well_formed(prompt: Any, extra_data: Any, targets: Any) -> bool:
    return (
        isinstance(prompt, dict)
        and isinstance(extra_data, dict)
        and (targets is None or isinstance(targets, list))
    )


async def post_prompt(request: web.Request) -> web.Response:
    state = _state(request)
    if state.settings.prompt_accept_delay_s:
        await asyncio.sleep(state.settings.prompt_accept_delay_s)  # the simulated busy server
    body = await _json_or_none(request)
    if not isinstance(body, dict):
        return server_error()
    # As in ComfyUI, the number is taken before the prompt is looked at: a refused prompt
    # uses one up too.
    number = _prompt_number(state, body)
    if number is None:
        return server_error()
    if "prompt" not in body:
        return _no_prompt()
    prompt = body["prompt"]
    extra_data = body.get("extra_data", {})
    targets = body.get("partial_execution_targets")
    if not _well_formed(prompt, extra_data, targets):
        return server_error()
    prompt_id = str(body.get("prompt_id", uuid.uuid4()))
    result = await asyncio.to_thread(validate_prompt, prompt, state.paths, targets)
    if "client_id" in body:
        extra_data["client_id"] = body["client_id"]
    if not result.ok:
        return web.json_response({"error": result.error, "node_errors": result.node_errors}, status=400)
    for key in SENSITIVE_EXTRA_DATA_KEYS:
        extra_data.pop(key, None)
    state.queue.put([number, prompt_id, prompt, extra_data, result.outputs])
    state.queued.append(prompt_id)
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors})


# -- queue and history --------------------------------------------------------------------


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response(_state(request).queue.snapshot())


async def post_queue(request: web.Request) -> web.Response:
    queue = _state(request).queue
    body = await _json_or_none(request)
    if not isinstance(body, dict):
        return server_error()
    if body.get("clear"):
        queue.wipe()
    for prompt_id in body.get("delete") or []:
        queue.delete(prompt_id)
    return web.Response(status=200)


async def get_history(request: web.Request) -> web.Response:
    query = request.rel_url.query
    try:
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query.get("offset", -1))
    except ValueError:
        return server_error()
    history = _state(request).queue.get_history(max_items=max_items, offset=offset)
    return web.json_response(history)


async def get_history_item(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    return web.json_response(_state(request).queue.get_history(prompt_id))


async def post_history(request: web.Request) -> web.Response:
    queue = _state(request).queue
    body = await _json_or_none(request)
    if not isinstance(body, dict):
        return server_error()
    if body.get("clear"):
        queue.history.clear()
    for prompt_id in body.get("delete") or []:
        queue.history.pop(prompt_id, None)
    return web.Response(status=200)


async def post_interrupt(request: web.Request) -> web.Response:
    state = _state(request)
    body = await _json_or_none(request)
    prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
    # With a prompt id, only that prompt may be interrupted, and only while it runs.
    if not prompt_id or state.queue.is_running(prompt_id):
        state.executor.request_interrupt()
        running = prompt_id or next(iter(state.queue.running_ids()), None)
        if running is not None:
            state.interrupted.append(running)
    return web.Response(status=200)


# -- node and system information ----------------------------------------------------------


async def get_object_info(request: web.Request) -> web.Response:
    state = _state(request)
    info = await asyncio.to_thread(all_node_info, state.paths)
    for hidden in state.settings.hidden_nodes:
        info.pop(hidden, None)
    return web.json_response(info)


async def get_object_info_node(request: web.Request) -> web.Response:
    name = request.match_info["node_class"]
    cls = NODE_CLASSES.get(name)
    if cls is None or name in _state(request).settings.hidden_nodes:
        return web.json_response({})
    info = await asyncio.to_thread(node_info, cls, _state(request).paths)
    return web.json_response({name: info})


def _memory() -> tuple[int, int]:
    """(total, available) bytes of RAM; the simulator's "device" is the CPU."""
    total = free = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    free = int(rest.split()[0]) * 1024
    except OSError:
        pass
    if not total and hasattr(os, "sysconf"):
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
    return total, free


async def get_system_stats(request: web.Request) -> web.Response:
    total, free = await asyncio.to_thread(_memory)
    settings = _state(request).settings
    return web.json_response(
        {
            "system": {
                "os": os.name,
                "ram_total": total,
                "ram_free": free,
                "comfyui_version": settings.version,
                "required_frontend_version": "1.27.10",
                "installed_templates_version": "0.1.95",
                "required_templates_version": "0.1.95",
                "python_version": sys.version,
                "pytorch_version": "none (simulated ComfyUI)",
                "embedded_python": False,
                "argv": list(sys.argv),
            },
            "devices": [
                {
                    "name": "cpu",
                    "type": "cpu",
                    "index": None,
                    "vram_total": total,
                    "vram_free": free,
                    "torch_vram_total": total,
                    "torch_vram_free": free,
                }
            ],
        }
    )


async def get_features(request: web.Request) -> web.Response:
    return web.json_response(SERVER_FEATURES)


async def get_empty_list(request: web.Request) -> web.Response:
    # /embeddings and /extensions: nothing is installed.
    return web.json_response([])


async def get_models(request: web.Request) -> web.Response:
    return web.json_response(MODEL_FOLDERS)


async def get_model_folder(request: web.Request) -> web.Response:
    if request.match_info["folder"] not in MODEL_FOLDERS:
        return web.Response(status=404)
    return web.json_response([])


async def websocket(request: web.Request) -> web.WebSocketResponse:
    state = _state(request)
    return await state.hub.serve(request, state.queue_info, state.executor.running_node_for)


ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/prompt", get_prompt),
    ("POST", "/prompt", post_prompt),
    ("GET", "/queue", get_queue),
    ("POST", "/queue", post_queue),
    ("GET", "/history", get_history),
    ("GET", "/history/{prompt_id}", get_history_item),
    ("POST", "/history", post_history),
    ("POST", "/interrupt", post_interrupt),
    ("GET", "/object_info", get_object_info),
    ("GET", "/object_info/{node_class}", get_object_info_node),
    ("GET", "/system_stats", get_system_stats),
    ("GET", "/features", get_features),
    ("GET", "/embeddings", get_empty_list),
    ("GET", "/extensions", get_empty_list),
    ("GET", "/models", get_models),
    ("GET", "/models/{folder}", get_model_folder),
    ("GET", "/ws", websocket),
]
