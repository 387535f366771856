"""What both clients do around httpx: the headers, turning a :class:`Call` into a request's
arguments, and an answer into its JSON or a typed error."""

from __future__ import annotations

import time
from typing import Any

import httpx

from comfyfleet.client.calls import Call
from comfyfleet.client.errors import ConnectionFailed, WaitTimeout, error_for
from comfyfleet.client.events import STREAM_READ_TIMEOUT_S

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
STREAM_CONNECT_S = 10.0
USER_AGENT = "comfyfleet-client/0.1"

JSON = dict[str, Any]


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise WaitTimeout("the workflow did not finish in time (it goes on; wait again or cancel it)")
    return left


def stream_timeout(deadline: float | None) -> httpx.Timeout:
    left = remaining(deadline)
    read = STREAM_READ_TIMEOUT_S if left is None else min(STREAM_READ_TIMEOUT_S, left)
    return httpx.Timeout(30.0, connect=STREAM_CONNECT_S, read=read)


def base_headers(token: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def normalise_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    return server


def request_args(call: Call) -> dict[str, Any]:
    args: dict[str, Any] = {"params": call.query, "headers": call.headers}
    if call.json is not None:
        args["json"] = call.json
    elif call.content is not None:
        args["content"] = call.content
    elif call.parts:
        args["files"] = call.parts
    elif call.parts is not None:
        # A form with nothing in it: httpx sends no multipart body without a part, and an
        # empty urlencoded form means the same to the server.
        args["content"] = b""
        args["headers"] = {**(call.headers or {}), "Content-Type": "application/x-www-form-urlencoded"}
    return args


def checked(response: httpx.Response) -> httpx.Response:
    """``response`` when it succeeded; its typed error otherwise (its body read)."""
    if response.status_code >= 400:
        raise error_for(response)
    return response


def decoded(response: httpx.Response) -> Any:
    checked(response)
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return response.text


def unreachable(server: str, exc: httpx.TransportError) -> ConnectionFailed:
    detail = str(exc) or type(exc).__name__
    return ConnectionFailed(f"cannot reach {server}: {detail}")
