"""Hostile input gets a clear 4xx with a message, costs only its sender and stores nothing:
malformed multipart bodies, JSON nested too deep, bytes that are not a token, numbers past
any list, NUL characters (which PostgreSQL cannot store), graphs of the wrong shape, tags
past the rules. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlmodel import Session
from websockets.asyncio.client import connect

from control_plane.db.tables import Output
from control_plane.settings import DEFAULT_TIERS
from control_plane.web.forms import PLAIN_PARTS, FormGates
from protocol.capacity import Capacity
from protocol.messages import CapacityUpdate, ComfyUIInfo, Hello, Ready, dump_message
from tests.conftest import AgentFactory, ControlPlane, png_bytes, start_control_plane
from tests.test_e2e import curl_form
from tests.test_faults import SLOW


async def raw_request(
    cp: ControlPlane, head: bytes, body: bytes = b"", declared: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Bytes as sent, for what a well-behaved client library refuses to send (``declared``:
    a Content-Length other than the body's)."""
    host, port = cp.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    length = len(body) if declared is None else declared
    try:
        writer.write(head + b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        payload = await reader.readexactly(int(headers.get("content-length", "0")))
    finally:
        writer.close()
    return int(status_line.split()[1]), json.loads(payload or b"{}")


async def nothing_stored(cp: ControlPlane) -> None:
    _, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 0


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("multipart/form-data", b"--b\r\n", "malformed multipart body: the Content-Type names no boundary"),
        (
            "multipart/form-data; boundary=",
            b"--b\r\n",
            "malformed multipart body: the Content-Type names no boundary",
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nabc',
            "malformed multipart body: it ends before its closing boundary",
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="na\x01me"\r\n\r\nabc\r\n--b--\r\n',
            "unknown field 'na\\x01me'",
        ),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: attachment\r\n\r\nabc\r\n--b--\r\n",
            "every part needs a name",
        ),
        (
            "multipart/form-data; boundary=b",
            b"--b\r\n" + b"X-Long: " + b"a" * 9000 + b"\r\n\r\nabc\r\n--b--\r\n",
            "malformed multipart body",
        ),
    ],
    ids=[
        "no boundary",
        "empty boundary",
        "cut mid-part",
        "control byte in a part header",
        "no name",
        "long header",
    ],
)
async def test_a_malformed_multipart_body_is_a_400(
    cp: ControlPlane, content_type: str, body: bytes, message: str
) -> None:
    await cp.create_runner()
    for path in ("/v1/workflow", "/v1/template"):
        headers = {**await cp.headers(), "Content-Type": content_type}
        status, answer = await cp.request("POST", path, data=body, headers=headers)
        assert status == 400 and answer["message"].startswith(message), (path, answer)
    await nothing_stored(cp)


async def test_a_form_of_very_many_parts_is_refused_without_reading_it_all(cp: ControlPlane) -> None:
    await cp.create_runner()
    form = aiohttp.FormData()
    form.add_field("workflow_json", json.dumps(SLOW), filename="w.json")
    for n in range(5000):
        form.add_field(f"f{n}", "x")
    status, answer = await cp.request("POST", "/v1/workflow", data=form)
    limit = DEFAULT_TIERS["free"].max_parameters + PLAIN_PARTS
    assert (status, answer["message"]) == (400, f"a form has at most {limit} parts on this account's tier")
    body = "&".join(f"f{n}=x" for n in range(5000))
    headers = {**await cp.headers(), "Content-Type": "application/x-www-form-urlencoded"}
    status, answer = await cp.request("POST", "/v1/workflow", data=body, headers=headers)
    assert (status, answer["message"]) == (400, f"a form has at most {limit} fields on this account's tier")
    await nothing_stored(cp)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_json_nested_ten_thousand_deep_is_a_400_on_every_json_route(cp: ControlPlane) -> None:
    await cp.create_runner()
    limit = "nested more than 64 levels deep"
    wf_json = json.dumps(SLOW)[:-1] + f', "9": {deep(10_000)}' + "}"
    form = aiohttp.FormData()
    form.add_field("workflow_json", wf_json, filename="w.json")
    status, answer = await cp.request("POST", "/v1/workflow", data=form)
    assert (status, answer["message"]) == (400, f"workflow_json is {limit}")
    form = aiohttp.FormData()
    form.add_field("name", "t")
    form.add_field("body", wf_json, filename="b.json")
    status, answer = await cp.request("POST", "/v1/template", data=form)
    assert (status, answer["message"]) == (400, f"body is {limit}")
    headers = {**await cp.headers(), "Content-Type": "application/json"}
    for method, path in (("POST", "/v1/runner"), ("POST", "/api/workflow/x/rerun")):
        status, answer = await cp.request(method, path, data=deep(10_000), headers=headers)
        assert (status, answer["message"]) == (400, f"body is {limit}"), path
    await nothing_stored(cp)


async def test_a_token_that_is_not_printable_ascii_is_a_401(cp: ControlPlane) -> None:
    # (Control bytes never get this far: aiohttp's HTTP parser answers 400 to those itself.)
    for token in ("caf\u00e9".encode(), b"\xff\xfe", b"cf_\xc3\x28"):
        status, answer = await raw_request(
            cp, b"GET /v1/workflow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token
        )
        assert (status, answer["message"]) == (401, "invalid token: a token is printable ASCII"), token
    status, answer = await raw_request(
        cp, b"GET /v1/workflow HTTP/1.1\r\nHost: x\r\nX-Authorization: \xc3\x28"
    )
    assert status == 401


async def test_page_numbers_past_any_list_are_a_400(cp: ControlPlane) -> None:
    for path in ("/v1/workflow", "/v1/runner", "/v1/template"):
        for page in ("9223372036854775808", "1000001", "0", "-1"):
            status, answer = await cp.request("GET", f"{path}?page={page}")
            assert (status, answer["message"]) == (400, "page must be between 1 and 1000000"), (path, page)
        status, answer = await cp.request("GET", f"{path}?page=1000000")
        assert status == 200 and answer["total"] == 0


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            {"class_type": ["EmptyImage"], "inputs": {"width": "$text(w)"}},
            "node 1: class_type must be a non-empty string",
        ),
        (
            {"class_type": {"a": 1}, "inputs": {"width": "$text(w)"}},
            "node 1: class_type must be a non-empty string",
        ),
        ({"class_type": "EmptyImage", "inputs": ["$text(w)"]}, "node 1: inputs must be an object"),
        (
            {"class_type": "EmptyImage", "inputs": {"image": ["1", "0"]}},
            "node 1 input 'image': a link is [node id, output index]",
        ),
        (
            {"class_type": "EmptyImage", "inputs": {"image": ["7", 0]}},
            "node 1 input 'image' links to node 7, which the workflow lacks",
        ),
    ],
)
async def test_a_graph_of_the_wrong_shape_is_a_400_before_anything_uses_it(
    cp: ControlPlane, node: dict[str, Any], message: str
) -> None:
    await cp.create_runner()
    status, answer = await cp.request("POST", "/v1/workflow", data=curl_form({"1": node}, **{"$w": "8"}))
    assert status == 400 and answer["message"].startswith(message), answer
    await nothing_stored(cp)


async def test_a_nul_character_is_a_400_on_every_database(cp: ControlPlane) -> None:
    runner = await cp.create_runner()
    for fields, where in (
        ({"name": "a\x00b"}, "field 'name'"),
        ({"tags": "gpu\x00"}, "field 'tags'"),
        ({"correlation_id": "c\x00"}, "field 'correlation_id'"),
        ({"$w": "8\x00"}, "field '$w'"),
    ):
        status, answer = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW, **fields))
        assert (status, answer["message"]) == (400, f"{where} holds a NUL character"), fields
    for path in (
        "/v1/workflow?status=a%00",
        "/v1/workflow?tag=a%00",
        "/v1/workflow/a%00b",
        f"/v1/runner/{runner['id']}%00",
    ):
        status, answer = await cp.request("GET", path)
        assert (status, answer["message"]) == (400, "the URL holds a NUL character (%00)"), path
    status, answer = await cp.request("POST", "/v1/runner", json={"name": "r\x00"})
    assert status == 400 and "NUL" in answer["message"]
    status, answer = await cp.request("POST", "/api/workflow/x/rerun", json={"correlationId": "\x00"})
    assert status == 400 and "NUL" in answer["message"]
    # A file name with a NUL, as no client library would send it.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="workflow_json"; filename="w.json"\r\n\r\n'
        + json.dumps(SLOW).encode()
        + b'\r\n--b\r\nContent-Disposition: form-data; name="$image"; filename="a\x00.png"\r\n'
        + b"Content-Type: image/png\r\n\r\n"
        + png_bytes((1, 2, 3))
        + b"\r\n--b--\r\n"
    )
    headers = {**await cp.headers(), "Content-Type": "multipart/form-data; boundary=b"}
    status, answer = await cp.request("POST", "/v1/workflow", data=body, headers=headers)
    assert status == 400 and "NUL" in answer["message"], answer
    await nothing_stored(cp)


async def test_workflow_tags_follow_the_runner_rules(cp: ControlPlane) -> None:
    await cp.create_runner()
    for tags, message in (
        ("x" * 5000, "bad tag"),
        (",".join(f"t{n}" for n in range(500)), "at most 10 tags"),
        ("gpu,bad tag", "bad tag 'bad tag'"),
    ):
        status, answer = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW, tags=tags))
        assert status == 400 and answer["message"].startswith(message), answer
    status, answer = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW, name="n" * 201))
    assert (status, answer["message"]) == (400, "name is at most 200 characters")
    await nothing_stored(cp)


# -- uploads and downloads ---------------------------------------------------------------------------


async def test_an_output_over_the_limits_is_a_413_before_its_body(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str
) -> None:
    from tests.test_faults import bare_agent, next_of

    runner1, base, app, settings = await start_control_plane(
        tmp_path, database_url=database_url, max_job_output_bytes=1000
    )
    cp = ControlPlane(base, settings, app, runner1, http)
    try:
        ws, runner = await bare_agent(cp, "hand")
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit_slow(cp)
        await next_of(ws, "job")
        url = f"/v1/agent/jobs/{wf}/outputs?attempt=1&node_id=3&filename=a.png"
        auth = {"Authorization": f"Bearer {runner['token']}"}
        # Declared past the single-output cap: refused on the header alone (the body never sent).
        head = (
            f"PUT {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {runner['token']}\r\n"
            f"X-Content-SHA256: {'0' * 64}\r\n"
        ).encode()
        status, answer = await raw_request(cp, head.rstrip(b"\r\n"), b"", declared=5 * 1024**3)
        assert status == 413 and "an output is at most" in answer["message"]
        # Past what the attempt may upload in all.
        payload = b"\x89PNG" * 200
        headers = {**auth, "X-Content-SHA256": hashlib.sha256(payload).hexdigest()}
        status, _ = await cp.request("PUT", url, headers=headers, data=payload)
        assert status == 201
        url2 = url.replace("a.png", "b.png")
        status, answer = await cp.request("PUT", url2, headers=headers, data=payload)
        assert status == 413 and "may upload 1000 bytes of outputs in all; 200 are left" in answer["message"]
        # Other bytes refused for the same reason are not kept; nor are those of an attempt
        # the runner does not hold.
        other = b"GIF8" * 200
        other_headers = {**auth, "X-Content-SHA256": hashlib.sha256(other).hexdigest()}
        for where, want in ((url2, 413), (url.replace("attempt=1", "attempt=2"), 409)):
            status, answer = await cp.request("PUT", where, headers=other_headers, data=other)
            assert status == want, answer
            assert not await cp.services.blobs.exists(hashlib.sha256(other).hexdigest())
        await ws.close()
    finally:
        await runner1.cleanup()


async def test_an_output_that_is_not_what_its_sha256_says_is_a_400_and_kept_nowhere(cp: ControlPlane) -> None:
    from tests.test_faults import bare_agent, next_of

    ws, runner = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit_slow(cp)
        await next_of(ws, "job")
        auth = {"Authorization": f"Bearer {runner['token']}"}
        # A small output is read whole, a large one streamed: both are checked.
        for size in (1000, 6 * 1024**2):
            sent = b"\x89PNG" * (size // 4)
            claimed = hashlib.sha256(sent[:-1] + b"!").hexdigest()  # one byte damaged on the way
            url = f"/v1/agent/jobs/{wf}/outputs?attempt=1&node_id=3&filename=a{size}.png"
            status, answer = await cp.request(
                "PUT", url, headers={**auth, "X-Content-SHA256": claimed}, data=sent
            )
            assert status == 400 and "sha256 mismatch" in answer["message"], (size, answer)
            assert not await cp.services.blobs.exists(hashlib.sha256(sent).hexdigest())
            # Sent for an attempt the runner does not hold, that is what it is told.
            status, answer = await cp.request(
                "PUT",
                url.replace("attempt=1", "attempt=2"),
                headers={**auth, "X-Content-SHA256": claimed},
                data=sent,
            )
            assert status == 409 and "not current" in answer["message"], (size, answer)
        _, listing = await cp.request("GET", f"/v1/workflow/{wf}/outputs")
        assert listing["outputs"] == []
        assert list((cp.settings.blob_dir / "tmp").iterdir()) == []  # no half-written file left
    finally:
        await ws.close()


async def test_outputs_download_with_nosniff_and_only_harmless_types_as_declared(cp: ControlPlane) -> None:
    from control_plane.web.workflows import safe_content_type

    assert safe_content_type("image/png") == "image/png"
    assert safe_content_type("video/mp4; codecs=avc1") == "video/mp4"
    for declared in ("text/html", "image/svg+xml", "application/javascript", "text/xml", "nonsense"):
        assert safe_content_type(declared) == "application/octet-stream", declared
    store = cp.services.store
    account = await store.get_or_create_account("alice")
    await cp.create_runner()
    wf = await submit_slow(cp)
    stored = await cp.services.blobs.write(_chunks(b"<script>alert(1)</script>"), max_bytes=1000)
    out = Output(
        workflow_id=wf,
        account_id=account.id,
        attempt=1,
        node_id="3",
        filename="page.html",
        kind="text",
        content_type="text/html",
        size_bytes=stored.size_bytes,
        sha256=stored.sha256,
    )

    def add(s: Session) -> None:
        s.add(out)
        s.commit()

    await store.run(add)
    async with cp.http.get(f"{cp.base}/v1/output/{out.id}", headers=await cp.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "sandbox" in resp.headers["Content-Security-Policy"]
        assert resp.headers["Content-Disposition"].startswith("attachment")


async def _chunks(data: bytes) -> Any:
    yield data


async def submit_slow(cp: ControlPlane) -> str:
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW))
    assert status == 201, body
    return str(body["id"])


# -- tokens ------------------------------------------------------------------------------------------


async def test_token_commands_refuse_a_token_that_never_expires_by_mistake_and_list_and_revoke(
    tmp_path: Path,
) -> None:
    from tests.test_cli import run

    data = ["--data-dir", str(tmp_path)]
    code, _, err = await run("admin", "token", "create", "--account", "acme", "--expires-in-days", "0", *data)
    assert code == 2 and "--expires-in-days must be a number of days above 0" in err
    code, out, _ = await run("admin", "token", "create", "--account", "acme", "--scope", "admin", *data)
    assert code == 0
    token = out.strip().splitlines()[-1]
    code, out, _ = await run("admin", "token", "list", "--account", "acme", *data)
    assert code == 0 and token not in out
    [row] = [line for line in out.splitlines() if " admin " in line]
    token_id = row.split()[0]
    code, out, _ = await run("admin", "token", "revoke", token_id, *data)
    assert code == 0 and f"revoked token {token_id}" in out
    code, _, err = await run("admin", "token", "revoke", token_id, *data)
    assert code == 1 and "no token" in err


# -- fairness ----------------------------------------------------------------------------------------


async def test_submits_past_the_tiers_rate_are_a_429_with_retry_after(cp: ControlPlane) -> None:
    await cp.create_runner()
    burst = DEFAULT_TIERS["free"].submit_burst
    statuses = []
    while len(statuses) < 3 * burst:  # the bucket refills a little meanwhile
        status, answer = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW))
        statuses.append(status)
        if status != 201:
            break
    assert statuses[:burst] == [201] * burst and statuses[-1] == 429
    assert "the free tier submits at most 2 workflows a second" in answer["message"]
    async with cp.http.post(
        f"{cp.base}/v1/workflow", data=curl_form(SLOW), headers=await cp.headers()
    ) as resp:
        assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    # Another account (another token) is not held back.
    status, _ = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW), account="bob")
    assert status in (201, 400)  # bob has no runner: refused for that, not for alice's rate


async def test_a_control_plane_too_busy_to_listen_does_not_drop_a_runner(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner1, base, app, settings = await start_control_plane(
        tmp_path, heartbeat_s=0.5, runner_timeout_s=1.5, runner_grace_s=30
    )
    cp = ControlPlane(base, settings, app, runner1, http)
    try:
        runner = await cp.create_runner()
        url = cp.base.replace("http", "ws") + "/v1/agent/connect"
        async with connect(url, additional_headers={"Authorization": f"Bearer {runner['token']}"}) as ws:
            hello = Hello(agent_version="t", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))
            await ws.send(dump_message(hello))
            assert json.loads(await ws.recv())["type"] == "welcome"
            conn = cp.services.registry.get(runner["id"])
            assert conn is not None

            async def heartbeats() -> None:
                while True:
                    await ws.send(dump_message(CapacityUpdate(capacity=Capacity())))
                    await asyncio.sleep(0.3)  # the agent's own heartbeat pace

            first = conn.heard_at
            beating = asyncio.create_task(heartbeats())
            await cp.services.fleet.wait_for(lambda: conn.heard_at > first, timeout_s=10)
            # The fault: the control plane's event loop (which this test shares) is stuck for
            # twice the runner timeout, as under a request that hogs it, while the agent's
            # heartbeats pile up unread.
            time.sleep(2 * settings.runner_timeout_s)  # noqa: ASYNC251  (the stall is the point)
            loop = asyncio.get_running_loop()
            after = loop.time()
            # Heartbeats wake the wait; it ends once a whole runner timeout has passed since.
            await cp.services.fleet.wait_for(
                lambda: loop.time() - after > settings.runner_timeout_s or conn.ws.closed, timeout_s=10
            )
            beating.cancel()
            assert cp.services.registry.get(runner["id"]) is conn and not conn.ws.closed
    finally:
        await runner1.cleanup()


def many_fields(count: int) -> bytes:
    """A multipart body of ``count`` tiny fields (100,000 make about 7 MB)."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    return part * count + b"--b--\r\n"


async def test_three_huge_forms_at_once_cost_only_their_sender(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    bobs = await cp.create_runner(account="bob", name="bobs")
    await start_agent(cp.base, bobs["token"], sim)
    registry = cp.services.registry
    await cp.services.fleet.wait_for(lambda: registry.get(bobs["id"]) is not None, timeout_s=10)
    conn = registry.get(bobs["id"])
    body = many_fields(100_000)
    headers = {**await cp.headers("alice"), "Content-Type": "multipart/form-data; boundary=b"}
    forms = [
        asyncio.create_task(cp.request("POST", "/v1/workflow", data=body, headers=headers)) for _ in range(3)
    ]
    # While they are sent: the control plane answers everyone else.
    health = 0
    while not all(f.done() for f in forms) or health == 0:
        status, _ = await cp.request("GET", "/healthz", account=None)
        assert status == 200
        health += 1
    status, wf = await cp.request("POST", "/v1/workflow", data=curl_form(SLOW), account="bob")
    assert status == 201
    done = await cp.wait_for_status(wf["id"], {"completed", "failed"}, account="bob")
    assert done["status"] == "completed"
    limit = DEFAULT_TIERS["free"].max_parameters + PLAIN_PARTS
    for form in forms:
        status, answer = form.result()
        assert (status, answer["message"]) == (
            400,
            f"a form has at most {limit} parts on this account's tier",
        )
    assert registry.get(bobs["id"]) is conn and conn is not None and not conn.ws.closed
    await nothing_stored(cp)


async def test_an_account_reads_a_few_forms_at_once_and_its_others_wait_their_turn() -> None:
    gates = FormGates(per_account=2)
    release = asyncio.Event()
    entered: asyncio.Queue[str] = asyncio.Queue()

    async def read(account: str) -> None:
        async with gates.turn(account):
            entered.put_nowait(account)
            await release.wait()

    alices = [asyncio.create_task(read("alice")) for _ in range(3)]
    assert [await asyncio.wait_for(entered.get(), 10) for _ in range(2)] == ["alice", "alice"]
    bobs = asyncio.create_task(read("bob"))
    # Bob's form is read at once; Alice's third waits for one of hers to end.
    assert await asyncio.wait_for(entered.get(), 10) == "bob"
    assert gates.waiting("alice") == 3 and entered.empty()
    release.set()
    await asyncio.gather(*alices, bobs)
    assert entered.get_nowait() == "alice" and gates.waiting("alice") == 0
