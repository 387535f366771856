"""Nothing of one account shows to another. Every route that takes an id or lists, asked with
another account's token, a runner token, a client token where an agent or operator is
expected, or no token: 404 or 401 as specified, never a hint. The agent protocol answers an
unknown workflow id and another account's alike; /metrics and the dashboard show each
operator their own account, and an admin token every account."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import aiohttp
import pytest
from sqlmodel import Session
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from control_plane.db.tables import Output
from protocol.capacity import Capacity
from protocol.messages import ComfyUIInfo, Hello, JobDone, JobUpdate, Ready, dump_message
from tests.conftest import ControlPlane
from tests.test_e2e import curl_form
from tests.test_faults import SLOW, next_of

# (method, path template, body kind). {wf} a workflow, {run} a runner, {tpl} a template,
# {out} an output of alice's.
ID_ROUTES = [
    ("GET", "/v1/workflow/{wf}", None),
    ("POST", "/v1/workflow/{wf}/cancel", None),
    ("GET", "/v1/workflow/{wf}/outputs", None),
    ("GET", "/v1/workflow/{wf}/tasks", None),
    ("GET", "/v1/workflow/{wf}/subscribe", None),
    ("POST", "/v1/workflow/{wf}/rerun", "form"),
    ("GET", "/api/workflow/{wf}", None),
    ("POST", "/api/workflow/{wf}/rerun", "json"),
    ("DELETE", "/api/workflow/{wf}", None),
    ("POST", "/api/workflow/{wf}/retry", None),
    ("POST", "/api/workflow/{wf}/restart", None),
    ("GET", "/v1/output/{out}", None),
    ("GET", "/v1/runner/{run}", None),
    ("PUT", "/v1/runner/{run}", "json"),
    ("DELETE", "/v1/runner/{run}", None),
    ("POST", "/v1/runner/{run}/interrupt", None),
    ("GET", "/v1/runner/{run}/stats", None),
    ("GET", "/v1/template/{tpl}", None),
    ("PUT", "/v1/template/{tpl}", "form"),
    ("POST", "/v1/template/{tpl}/run", "form"),
]
LIST_ROUTES = ["/v1/workflow", "/v1/runner", "/v1/template"]


def body(kind: str | None) -> dict[str, Any]:
    if kind == "json":
        return {"json": {}}
    if kind == "form":
        form = aiohttp.FormData()
        form.add_field("name", "x")
        return {"data": form}
    return {}


@pytest.fixture
async def alices(cp: ControlPlane) -> dict[str, str]:
    """Alice's objects: a completed workflow with an output, a runner, a template."""
    store = cp.services.store
    runner = await cp.create_runner(name="alices")
    status, wf = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW))
    assert status == 201
    form = aiohttp.FormData()
    form.add_field("name", "t")
    form.add_field("body", json.dumps(SLOW), filename="b.json")
    status, tpl = await cp.request("POST", "/v1/template", data=form)
    assert status == 201
    account = await store.get_or_create_account("alice")
    out = Output(
        workflow_id=wf["id"],
        account_id=account.id,
        attempt=1,
        node_id="3",
        filename="a.png",
        kind="images",
        content_type="image/png",
        size_bytes=0,
        sha256="0" * 64,
    )

    def add(s: Session) -> None:
        s.add(out)
        s.commit()

    await store.run(add)
    return {
        "wf": wf["id"],
        "run": runner["id"],
        "tpl": tpl["id"],
        "out": out.id,
        "runner_token": runner["token"],
    }


async def test_every_id_route_is_404_to_another_account_and_401_without_a_client_token(
    cp: ControlPlane, alices: dict[str, str]
) -> None:
    mallory = {"Authorization": f"Bearer {await cp.token('mallory')}"}
    runner = {"Authorization": f"Bearer {alices['runner_token']}"}
    for method, template, kind in ID_ROUTES:
        path = template.format(**alices)
        status, answer = await cp.request(method, path, headers=mallory, **body(kind))
        assert status == 404, (method, path, status, answer)
        assert alices["wf"] not in json.dumps(answer) or "not found" in answer["message"]
        for headers, label in ((runner, "runner token"), ({}, "no token")):
            status, answer = await cp.request(method, path, headers=headers, **body(kind))
            assert status == 401, (method, path, label, status, answer)
    # Lists show mallory nothing of alice's.
    for path in LIST_ROUTES:
        status, answer = await cp.request("GET", path, headers=mallory)
        assert (status, answer["total"]) == (200, 0), path
        for headers in (runner, {}):
            status, _ = await cp.request("GET", path, headers=headers)
            assert status == 401, path


async def test_agent_routes_refuse_client_tokens_and_other_accounts_runners(
    cp: ControlPlane, alices: dict[str, str]
) -> None:
    client = await cp.headers("alice")
    bobs = await cp.create_runner(account="bob", name="bobs")
    bob = {"Authorization": f"Bearer {bobs['token']}"}
    files = f"/v1/agent/jobs/{alices['wf']}/files/{'0' * 64}"
    outputs = f"/v1/agent/jobs/{alices['wf']}/outputs?attempt=1&node_id=3&filename=a.png"
    for headers, want in ((client, 401), ({}, 401), (bob, 404)):
        status, _ = await cp.request("GET", files, headers=headers)
        assert status == want, headers
        status, _ = await cp.request("PUT", outputs, headers=headers, data=b"x")
        assert status == want, headers
    # Well formed, so read and stored before the workflow is looked up: still a 404, and the
    # bytes are not kept.
    body = b"bob's bytes"
    sha = hashlib.sha256(body).hexdigest()
    status, _ = await cp.request("PUT", outputs, headers={**bob, "X-Content-SHA256": sha}, data=body)
    assert status == 404
    assert not await cp.services.blobs.exists(sha)
    url = cp.base.replace("http", "ws") + "/v1/agent/connect"
    for headers in (client, {}):
        async with connect(url, additional_headers=headers) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4001


async def test_the_agent_protocol_answers_unknown_and_foreign_ids_alike(
    cp: ControlPlane, alices: dict[str, str]
) -> None:
    bobs = await cp.create_runner(account="bob", name="bobs")
    url = cp.base.replace("http", "ws") + "/v1/agent/connect"
    async with connect(url, additional_headers={"Authorization": f"Bearer {bobs['token']}"}) as ws:
        hello = Hello(agent_version="t", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))
        await ws.send(dump_message(hello))
        assert json.loads(await ws.recv())["type"] == "welcome"
        answers = []
        for workflow_id in (alices["wf"], "no-such-workflow"):
            await ws.send(dump_message(JobUpdate(workflow_id=workflow_id, attempt=1, status="running")))
            running = await next_of(ws, "cancel")
            await ws.send(dump_message(JobDone(workflow_id=workflow_id, attempt=1)))
            done = await next_of(ws, "job_ack")
            answers.append((running["type"], done["type"]))
        # A frame nested far too deep is ignored; the connection stays.
        await ws.send(
            '{"type": "job_update", "workflow_id": "x", "attempt": 1, "node": '
            + "[" * 10_000
            + "]" * 10_000
            + "}"
        )
        await ws.send(dump_message(Ready(free_slots=0)))
        await ws.send(dump_message(JobDone(workflow_id="still-here", attempt=1)))
        assert (await next_of(ws, "job_ack"))["workflow_id"] == "still-here"
    assert answers[0] == answers[1] == ("cancel", "job_ack")
    _, wf = await cp.request("GET", f"/v1/workflow/{alices['wf']}")
    assert (wf["status"], wf["runner_id"]) == ("accepted", None)  # untouched


async def test_an_admin_token_sees_every_account_and_an_operator_only_their_own(
    cp: ControlPlane, alices: dict[str, str]
) -> None:
    await cp.create_runner(account="bob", name="bobs")
    for scope, names in (("operator", {"alices"}), ("admin", {"alices", "bobs"})):
        token = await cp.token("alice", scope=scope)
        status, snap = await cp.request("GET", "/v1/dashboard", headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        assert {r["name"] for r in snap["runners"]} == names, scope
    status, _ = await cp.request("GET", "/v1/dashboard", headers=await cp.headers("alice"))
    assert status == 403  # a client token: known, but not allowed here
