"""Webhooks against a real receiver on loopback: signed as the Standard Webhooks
specification says (checked with its ``standardwebhooks`` library), each event as the README
documents it, delivered after the receiver was down for a while and after the control plane
restarted in between, listed with every attempt's answer, and an endpoint that keeps failing
disabled with the reason."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until, start_control_plane
from tests.test_e2e import WORKFLOW, curl_form

# Quick retries, so that a test sees several attempts in a second or two.
FAST = {
    "webhook_private_urls": True,
    "webhook_poll_s": 0.05,
    "webhook_backoff_s": 0.1,
    "webhook_max_backoff_s": 0.4,
    "runner_grace_s": 1.0,
    "heartbeat_s": 1.0,
}


# What the README documents a workflow event's data to hold.
WORKFLOW_FIELDS = [
    "id",
    "name",
    "status",
    "attempt",
    "tags",
    "correlation_id",
    "parent_id",
    "sweep_id",
    "priority",
    "failure_reason",
    "error_node",
    "exception_type",
    "exception_message",
    "created_at",
    "started_at",
    "completed_at",
    "url",
]
OUTPUT_FIELDS = ["id", "workflow_id", "node_id", "filename", "kind", "content_type", "size", "sha256", "url"]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """An HTTP server on loopback that records every request and answers ``status``; it can
    go down (nothing listens: connections are refused) and come back on the same port."""

    port: int = 0
    status: int = 200
    got: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        async def take(request: web.Request) -> web.Response:
            body = await request.text()
            self.got.append(Received(request.path, dict(request.headers), body, self.status))
            return web.Response(status=self.status, text="thanks" if self.status < 300 else "not now")

        app = web.Application()
        app.router.add_post("/{path:.*}", take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self, path: str = "/hook") -> list[Received]:
        return [r for r in self.got if r.path == path and r.answered < 300]

    async def until(self, count: int, path: str = "/hook", timeout_s: float = 30) -> list[Received]:
        async def enough() -> bool:
            return len(self.delivered(path)) >= count

        await poll_until(enough, timeout_s)
        return self.delivered(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def _control_plane(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str, **overrides: Any
) -> AsyncIterator[ControlPlane]:
    port = _free_port()
    settings = {**FAST, "public_url": f"http://127.0.0.1:{port}", **overrides}
    runner, base, app, made = await start_control_plane(
        tmp_path, port=port, database_url=database_url, **settings
    )
    try:
        yield ControlPlane(base, made, app, runner, http)
    finally:
        await runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(port=_free_port())
    yield found
    await found.stop()


async def _endpoint(cp: ControlPlane, url: str, events: list[str]) -> dict[str, Any]:
    status, body = await cp.request("POST", "/v1/webhook", json={"url": url, "events": events})
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def _submit(cp: ControlPlane, **fields: str) -> dict[str, Any]:
    form = curl_form(WORKFLOW, **{"$prompt": "fox", "$input_image": png_bytes((1, 2, 3)), **fields})
    status, body = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def _deliveries(cp: ControlPlane, path: str) -> list[dict[str, Any]]:
    status, body = await cp.request("GET", path)
    assert status == 200, body
    return body["deliveries"]  # type: ignore[no-any-return]


async def test_deliveries_are_signed_as_the_standard_says_and_carry_the_workflow_and_its_outputs(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    database_url: str,
    sim: str,
    start_agent: AgentFactory,
    receiver: Receiver,
) -> None:
    await receiver.start()
    async with _control_plane(tmp_path, http, database_url) as cp:
        runner = await cp.create_runner()
        await start_agent(cp.base, runner["token"], sim)
        hook = await _endpoint(cp, receiver.url(), ["workflow.completed", "workflow.status"])
        assert hook["secret"].startswith("whsec_") and hook["status"] == "active"
        status, listed = await cp.request("GET", "/v1/webhook")
        assert status == 200 and listed["total"] == 1 and "secret" not in listed["webhooks"][0]
        status, account = await cp.request("POST", "/v1/webhook-secret")
        assert status == 201 and account["secret"].startswith("whsec_")

        wf = await _submit(cp, webhook_url=receiver.url("/own"))
        assert wf["webhook_url"] == receiver.url("/own")
        done = await cp.wait_for_status(wf["id"], {"completed"})
        (own,) = await receiver.until(1, "/own")
        await poll_until(lambda: _has(receiver, "workflow.completed"))

        for got, secret in [(r, hook["secret"]) for r in receiver.delivered()] + [(own, account["secret"])]:
            assert Webhook(secret).verify(got.body, got.headers) == got.payload
            assert got.headers["Content-Type"] == "application/json"
        with pytest.raises(WebhookVerificationError):
            Webhook(hook["secret"]).verify(own.body, own.headers)  # each is signed with its own secret

        by_type: dict[str, list[dict[str, Any]]] = {}
        for got in receiver.delivered():
            by_type.setdefault(got.payload["type"], []).append(got.payload)
        (completed,) = by_type["workflow.completed"]
        statuses = {p["data"]["workflow"]["status"] for p in by_type["workflow.status"]}
        assert {"accepted", "running", "completed"} <= statuses, statuses
        assert own.payload["type"] == "workflow.completed" and own.payload["data"] == completed["data"]
        workflow = completed["data"]["workflow"]
        assert set(workflow) == set(WORKFLOW_FIELDS) and set(completed) == {"type", "timestamp", "data"}
        assert all(set(o) == set(OUTPUT_FIELDS) for o in completed["data"]["outputs"])
        assert (workflow["id"], workflow["status"], workflow["attempt"]) == (wf["id"], "completed", 1)
        assert workflow["url"] == f"{cp.base}/v1/workflow/{wf['id']}"
        assert completed["timestamp"] and workflow["completed_at"] == done["completed_at"]
        outputs = completed["data"]["outputs"]
        assert len(outputs) == 2 and all(o["url"].startswith(f"{cp.base}/v1/output/") for o in outputs)
        async with http.get(outputs[0]["url"], headers=await cp.headers()) as resp:
            assert resp.status == 200 and len(await resp.read()) == outputs[0]["size"]
        ids = [r.headers["webhook-id"] for r in receiver.got]
        assert len(ids) == len(set(ids))  # each message once: nothing failed, nothing repeated

        listed_deliveries = await _deliveries(cp, f"/v1/webhook/{hook['id']}/deliveries?per_page=100")
        assert len(listed_deliveries) == len(receiver.delivered())
        assert all(
            d["status"] == "delivered" and d["attempts"][0]["status_code"] == 200 for d in listed_deliveries
        )
        about = await _deliveries(cp, f"/v1/workflow/{wf['id']}/deliveries?per_page=100")
        assert {d["url"] for d in about} == {receiver.url(), receiver.url("/own")}


async def _has(receiver: Receiver, event_type: str) -> bool:
    return any(r.payload["type"] == event_type for r in receiver.delivered())


async def test_a_receiver_down_for_a_while_gets_the_delivery_once_it_is_back(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    database_url: str,
    sim: str,
    start_agent: AgentFactory,
    receiver: Receiver,
) -> None:
    async with _control_plane(tmp_path, http, database_url) as cp:
        runner = await cp.create_runner()
        await start_agent(cp.base, runner["token"], sim)
        hook = await _endpoint(cp, receiver.url(), ["workflow.completed"])
        wf = await _submit(cp)
        await cp.wait_for_status(wf["id"], {"completed"})
        path = f"/v1/webhook/{hook['id']}/deliveries"

        async def attempted(n: int, answered: int | None = None) -> bool:
            made = await _deliveries(cp, path)  # none until the sender has seen the change
            tries = [
                a for d in made for a in d["attempts"] if answered is None or a["status_code"] == answered
            ]
            return len(tries) >= n

        await poll_until(lambda: attempted(2))  # nothing listens: refused, and tried again
        receiver.status = 503
        await receiver.start()
        await poll_until(lambda: attempted(1, answered=503))
        receiver.status = 200
        (got,) = await receiver.until(1)

        (delivery,) = await _deliveries(cp, path)
        assert delivery["status"] == "delivered" and delivery["id"] == got.headers["webhook-id"]
        answers = [a["status_code"] for a in delivery["attempts"]]
        assert answers[0] is None and answers[-1] == 200 and 503 in answers
        assert delivery["attempts"][0]["error"]  # why the first attempt failed, in words
        assert {r.headers["webhook-id"] for r in receiver.got} == {delivery["id"]}  # one message, tried again
        assert got.payload["data"]["workflow"]["id"] == wf["id"]


async def test_a_restart_between_the_change_and_its_delivery_still_delivers_it_once(
    tmp_path: Path,
    http: aiohttp.ClientSession,
    database_url: str,
    sim: str,
    start_agent: AgentFactory,
    receiver: Receiver,
) -> None:
    # The receiver is down while the workflow completes: nothing can be delivered before the
    # control plane stops.
    async with _control_plane(tmp_path, http, database_url) as cp:
        runner = await cp.create_runner()
        agent = await start_agent(cp.base, runner["token"], sim)
        hook = await _endpoint(cp, receiver.url(), ["workflow.completed"])
        wf = await _submit(cp)
        await cp.wait_for_status(wf["id"], {"completed"})
        await agent.stop()
    await receiver.start()
    async with _control_plane(tmp_path, http, database_url) as cp:
        (got,) = await receiver.until(1)
        assert (
            got.payload["type"] == "workflow.completed" and got.payload["data"]["workflow"]["id"] == wf["id"]
        )
        assert Webhook(hook["secret"]).verify(got.body, got.headers)
        (delivery,) = await _deliveries(cp, f"/v1/webhook/{hook['id']}/deliveries")
        assert delivery["status"] == "delivered" and delivery["id"] == got.headers["webhook-id"]
    assert len(receiver.delivered()) == 1


async def test_an_endpoint_that_keeps_failing_is_disabled_with_the_reason(
    tmp_path: Path, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory, receiver: Receiver
) -> None:
    receiver.status = 500
    await receiver.start()
    async with _control_plane(tmp_path, http, "", webhook_disable_after_s=0.5, webhook_give_up_s=30) as cp:
        runner = await cp.create_runner()
        await start_agent(cp.base, runner["token"], sim)
        hook = await _endpoint(cp, receiver.url(), ["workflow.completed", "workflow.status"])
        wf = await _submit(cp)
        await cp.wait_for_status(wf["id"], {"completed"})

        async def disabled() -> bool:
            _, body = await cp.request("GET", f"/v1/webhook/{hook['id']}")
            return body["status"] == "disabled"  # type: ignore[no-any-return]

        await poll_until(disabled)
        _, body = await cp.request("GET", f"/v1/webhook/{hook['id']}")
        assert (
            "every attempt failed for 0.5 s" in body["disabled_reason"]
            and "HTTP 500" in body["disabled_reason"]
        )

        async def all_ended() -> bool:
            listed = await _deliveries(cp, f"/v1/webhook/{hook['id']}/deliveries?per_page=100")
            return bool(listed) and all(d["status"] == "failed" for d in listed)

        await poll_until(all_ended)  # what was still to send is dropped, with the reason
        listed = await _deliveries(cp, f"/v1/webhook/{hook['id']}/deliveries?per_page=100")
        assert any("its webhook is disabled" in (a.get("error") or "") for d in listed for a in d["attempts"])

        status, body = await cp.request("PUT", f"/v1/webhook/{hook['id']}", json={"status": "active"})
        assert (status, body["status"], body["disabled_reason"]) == (200, "active", None)


async def test_a_runner_that_does_not_come_back_is_announced(
    tmp_path: Path, http: aiohttp.ClientSession, sim: str, start_agent: AgentFactory, receiver: Receiver
) -> None:
    await receiver.start()
    async with _control_plane(tmp_path, http, "") as cp:
        runner = await cp.create_runner(name="gpu-7", tags=["sdxl"])
        agent = await start_agent(cp.base, runner["token"], sim)
        hook = await _endpoint(cp, receiver.url(), ["runner.offline"])

        async def connected() -> bool:
            _, body = await cp.request("GET", f"/v1/runner/{runner['id']}")
            return body["connected"] is True  # type: ignore[no-any-return]

        await poll_until(connected)
        await agent.stop()
        (got,) = await receiver.until(1)
        assert Webhook(hook["secret"]).verify(got.body, got.headers)
        assert got.payload["type"] == "runner.offline"
        assert got.payload["data"] == {
            "runner": {"id": runner["id"], "name": "gpu-7", "tags": ["sdxl"]},
            "requeued": [],
        }


async def test_webhooks_that_cannot_be_are_refused_with_a_message_and_nothing_is_made(
    cp: ControlPlane,
) -> None:
    await cp.create_runner()
    refused: list[tuple[Any, str]] = [
        (
            {"url": "http://127.0.0.1:9/hook", "events": ["workflow.completed"]},
            "private, loopback or link-local",
        ),
        (
            {"url": "http://localhost:9/hook", "events": ["workflow.completed"]},
            "private, loopback or link-local",
        ),
        ({"url": "http://10.1.2.3/hook", "events": ["workflow.completed"]}, "webhook_private_urls"),
        ({"url": "ftp://example.org/x", "events": ["workflow.completed"]}, "http:// or https://"),
        ({"url": "https://example.org/x", "events": []}, "non-empty list"),
        ({"url": "https://example.org/x", "events": ["workflow.done"]}, "unknown event 'workflow.done'"),
        (
            {"url": "https://example.org/x", "events": ["workflow.completed"], "secret": "x"},
            "unknown field 'secret'",
        ),
        ({"events": ["workflow.completed"]}, "takes url and events"),
        ({"url": 7, "events": ["workflow.completed"]}, "url must be a string"),
    ]
    for body, message in refused:
        status, answer = await cp.request("POST", "/v1/webhook", json=body)
        assert status == 400 and message in answer["message"], (body, answer)
    status, listed = await cp.request("GET", "/v1/webhook")
    assert status == 200 and listed["total"] == 0

    form = curl_form(
        WORKFLOW,
        **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3)), "webhook_url": "https://example.org/x"},
    )
    status, answer = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 400 and "POST /v1/webhook-secret" in answer["message"], answer
    await cp.request("POST", "/v1/webhook-secret")
    form = curl_form(
        WORKFLOW,
        **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3)), "webhook_url": "http://127.0.0.1/x"},
    )
    status, answer = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 400 and "webhook_url: 127.0.0.1 is a private" in answer["message"], answer
    status, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0

    for method in ("GET", "PUT", "DELETE"):
        status, answer = await cp.request(method, "/v1/webhook/no-such-webhook", json={"status": "active"})
        assert status == 404 and "webhook no-such-webhook not found" in answer["message"], answer
