"""A Python client for the comfyfleet control plane's REST API.

    from comfyfleet.client import Client

    with Client("http://127.0.0.1:8080", token) as fleet:
        wf = fleet.submit("workflow.json", params={"prompt": "a red fox"},
                          files={"input_image": "fox.png"}, choices={"sampler": "dpm_2"})
        done = fleet.wait(wf["id"])
        paths = fleet.save_outputs(wf["id"], "outputs")

:class:`AsyncClient` has the same calls, awaited. Every failure is a
:class:`ClientError`; the server's own answers are :class:`ApiError` subclasses.
"""

from comfyfleet.client.async_client import AsyncClient
from comfyfleet.client.config import ClientConfig, config_path, resolve
from comfyfleet.client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unprocessable,
    WaitTimeout,
)
from comfyfleet.client.events import TERMINAL, Event
from comfyfleet.client.progress import Progress
from comfyfleet.client.sync_client import Client

__all__ = [
    "TERMINAL",
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientConfig",
    "ClientError",
    "Conflict",
    "ConnectionFailed",
    "Event",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "Progress",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unprocessable",
    "WaitTimeout",
    "config_path",
    "resolve",
]
