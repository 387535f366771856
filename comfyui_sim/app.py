"""Builds the simulator's aiohttp application and starts it on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from . import files_api, http_api, sim_api
from .settings import SimSettings
from .state import SIM_STATE, SimState
from .ws_hub import SERVER_FEATURES


def create_app(settings: SimSettings) -> web.Application:
    """The application; folders are created and background tasks started only when the
    app starts (``runner.setup()`` / ``web.run_app``)."""
    app = web.Application(client_max_size=SERVER_FEATURES["max_upload_size"])
    app[SIM_STATE] = SimState(settings)
    for method, path, handler in (*http_api.ROUTES, *files_api.ROUTES):
        # Newer ComfyUI serves every route under /api as well; clients use either.
        app.router.add_route(method, path, handler)
        app.router.add_route(method, "/api" + path, handler)
    for method, path, handler in sim_api.ROUTES:
        app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_stop)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    state = app[SIM_STATE]
    await asyncio.to_thread(state.paths.prepare)
    state.start_tasks()
    yield
    await _stop(app)


async def _stop(app: web.Application) -> None:
    # Runs at on_shutdown, before aiohttp waits for open requests: open websockets are
    # such requests, and a running prompt's delay must not hold the server up either.
    state = app[SIM_STATE]
    await state.stop_tasks()
    await state.hub.close_all()


async def start_simulator(
    settings: SimSettings, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Start on ``host:port`` (0 picks a free port); returns the runner (``cleanup()`` stops
    it) and the base URL with the real port."""
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{url_host}:{bound_port}"
