"""Hostile input gets a clear 4xx with a message, costs only its sender and stores nothing:
malformed multipart bodies, JSON nested too deep, bytes that are not a token, numbers past
any list, NUL characters (which PostgreSQL cannot store), graphs of the wrong shape, tags
past the rules. On SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import ControlPlane, png_bytes
from tests.test_e2e import seed_form
from tests.test_faults import SLOW


async def raw_request(cp: ControlPlane, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Bytes as sent, for what a well-behaved client library refuses to send."""
    host, port = cp.base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
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
        ("multipart/form-data", b"--b\r\n", "boundary missed"),
        ("multipart/form-data; boundary=", b"--b\r\n", "Could not find starting boundary"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nabc',
            "malformed multipart body",
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="na\x01me"\r\n\r\nabc\r\n--b--\r\n',
            "Invalid HTTP header",
        ),
    ],
    ids=["no boundary", "empty boundary", "cut mid-part", "control byte in a part header"],
)
async def test_a_malformed_multipart_body_is_a_400(
    cp: ControlPlane, content_type: str, body: bytes, message: str
) -> None:
    await cp.create_runner()
    for path in ("/v1/workflow", "/v1/template"):
        headers = {**await cp.headers(), "Content-Type": content_type}
        status, answer = await cp.request("POST", path, data=body, headers=headers)
        assert status == 400 and answer["message"].startswith("malformed multipart body"), answer
        assert message in answer["message"]
    await nothing_stored(cp)


async def test_a_form_of_very_many_parts_is_refused_without_reading_it_all(cp: ControlPlane) -> None:
    await cp.create_runner()
    form = aiohttp.FormData()
    form.add_field("workflow_json", json.dumps(SLOW), filename="w.json")
    for n in range(5000):
        form.add_field(f"f{n}", "x")
    status, answer = await cp.request("POST", "/v1/workflow", data=form)
    assert (status, answer["message"]) == (400, "a form has at most 1000 parts")
    body = "&".join(f"f{n}=x" for n in range(5000))
    headers = {**await cp.headers(), "Content-Type": "application/x-www-form-urlencoded"}
    status, answer = await cp.request("POST", "/v1/workflow", data=body, headers=headers)
    assert (status, answer["message"]) == (400, "a form has at most 1000 fields")
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
    status, answer = await cp.request("POST", "/v1/workflow", data=seed_form({"1": node}, **{"$w": "8"}))
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
        status, answer = await cp.request("POST", "/v1/workflow", data=seed_form(SLOW, **fields))
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
        + b"\r\n--b\r\nContent-Disposition: form-data; name=\"$image\"; filename*=UTF-8''a%00.png\r\n"
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
        status, answer = await cp.request("POST", "/v1/workflow", data=seed_form(SLOW, tags=tags))
        assert status == 400 and answer["message"].startswith(message), answer
    status, answer = await cp.request("POST", "/v1/workflow", data=seed_form(SLOW, name="n" * 201))
    assert (status, answer["message"]) == (400, "name is at most 200 characters")
    await nothing_stored(cp)
