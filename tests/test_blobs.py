"""The blob stores, each the same way: local disk and an S3-speaking server on loopback.
Bytes are kept once per sha256, a write that fails leaves nothing, and a download is the
bytes (disk, or S3 streamed through) or a short-lived presigned URL to them (S3)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web

from comfyfleet.processes import free_port
from control_plane.db.blobs import BlobStore, DiskBlobStore, open_blob_store
from control_plane.db.blobs.s3 import PART_BYTES, S3BlobStore
from control_plane.db.refusals import BlobStoreUnusable
from control_plane.model.errors import BadRequest, TooLarge
from control_plane.settings import load_settings
from tests.conftest import AgentFactory, ControlPlane, png_bytes, read_png, start_control_plane
from tests.s3_server import S3Server
from tests.test_e2e import WORKFLOW, curl_form


@pytest.fixture
async def store(tmp_path: Path, blob_url: str) -> AsyncIterator[BlobStore]:
    blobs = open_blob_store(blob_url, tmp_path / "blobs", presign_s=300)
    await blobs.setup()
    yield blobs
    await blobs.close()


async def contents(store: BlobStore, request: pytest.FixtureRequest) -> list[str]:
    """Everything the store holds, as paths under its root or prefix (unfinished S3 uploads
    as ``upload:<key>``)."""
    if isinstance(store, DiskBlobStore):
        return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert isinstance(store, S3BlobStore)
    server: S3Server = request.getfixturevalue("s3_server")
    return [k.replace(store.prefix, "", 1) for k in await server.keys(store.bucket)]


def address(data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    return f"{sha[:2]}/{sha}"


async def pieces(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_the_same_bytes_are_kept_once_whether_put_or_streamed(
    store: BlobStore, request: pytest.FixtureRequest
) -> None:
    small, large = b"a small output", os.urandom(2 * PART_BYTES + 12345)  # three parts
    first = await store.put(small, max_bytes=100)
    again = await store.write(pieces(small, 3), max_bytes=100)
    assert (first.created, again.created, first.sha256) == (True, False, again.sha256)
    streamed = await store.write(
        pieces(large), max_bytes=len(large), expected_sha256=hashlib.sha256(large).hexdigest()
    )
    repeated = await store.write(pieces(large), max_bytes=len(large))
    assert (streamed.created, repeated.created, streamed.size_bytes) == (True, False, len(large))
    assert await store.exists(streamed.sha256) and await store.exists(first.sha256)
    assert await contents(store, request) == sorted([address(small), address(large)])


@pytest.mark.parametrize("size", [10, PART_BYTES + 10], ids=["one-part", "multipart"])
async def test_a_write_over_its_limit_or_with_the_wrong_digest_leaves_nothing(
    store: BlobStore, request: pytest.FixtureRequest, size: int
) -> None:
    data = os.urandom(size)
    with pytest.raises(TooLarge, match=f"exceeds the limit of {size - 1} bytes"):
        await store.write(pieces(data), max_bytes=size - 1)
    with pytest.raises(BadRequest, match="sha256 mismatch"):
        await store.write(pieces(data), max_bytes=size, expected_sha256="0" * 64)
    with pytest.raises(TooLarge):
        await store.put(data, max_bytes=size - 1)
    with pytest.raises(BadRequest, match="sha256 mismatch"):
        await store.put(data, max_bytes=size, expected_sha256="f" * 64)
    assert await contents(store, request) == []
    assert not await store.exists(hashlib.sha256(data).hexdigest())


async def test_a_writer_aborted_halfway_leaves_nothing(
    store: BlobStore, request: pytest.FixtureRequest
) -> None:
    writer = await store.open_writer(10 * PART_BYTES)
    for chunk in [os.urandom(PART_BYTES), os.urandom(1000)]:  # one part sent, some pending
        await writer.write(chunk)
    await writer.abort()
    await writer.abort()  # safe twice
    assert await contents(store, request) == []


async def test_a_deleted_blob_is_gone_and_deleting_it_again_is_no_error(store: BlobStore) -> None:
    stored = await store.put(b"short-lived", max_bytes=100)
    await store.delete(stored.sha256)
    await store.delete(stored.sha256)
    assert not await store.exists(stored.sha256)
    with pytest.raises(BadRequest, match="not a sha256"):
        await store.exists("../../etc/passwd")


async def test_outputs_and_inputs_go_through_each_store_and_come_back_whole(
    blob_cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    cp = blob_cp
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = png_bytes((10, 200, 30))
    status, wf = await cp.request(
        "POST", "/v1/workflow", data=curl_form(WORKFLOW, **{"$prompt": "x", "$input_image": image})
    )
    assert status == 201, wf
    done = await cp.wait_for_status(wf["id"], {"completed"})
    assert done["status"] == "completed", done
    _, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    for output in listing["outputs"]:
        status, body = await cp.request("GET", output["src"])  # a redirect is followed
        assert status == 200 and hashlib.sha256(body).hexdigest() == output["sha256"]
        # The agent got the input through the same store: node 6 saved it inverted.
        if output["node_id"] == "6":
            pixel = read_png(body).getpixel((0, 0))
            assert isinstance(pixel, tuple)
            # (ComfyUI's float pixels round to within 1 of 255 - value.)
            assert all(abs(got - want) <= 1 for got, want in zip(pixel, (245, 55, 225), strict=True))


async def _one_output(cp: ControlPlane, sim: str, start_agent: AgentFactory) -> dict[str, Any]:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    form = curl_form(WORKFLOW, **{"$prompt": "fox", "$input_image": png_bytes((1, 2, 3))})
    status, wf = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 201, wf
    assert (await cp.wait_for_status(wf["id"], {"completed"}))["status"] == "completed"
    _, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    return next(o for o in listing["outputs"] if o["node_id"] == "5")


@pytest.fixture
async def s3_plane(
    tmp_path: Path, http: aiohttp.ClientSession, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[ControlPlane]]]:
    """Starts a control plane on a bucket of its own of the S3 server, with these settings."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    started: list[web.AppRunner] = []

    async def start(**settings: Any) -> ControlPlane:
        blob_url = f"s3://{await s3_server.new_bucket()}/p"
        runner, base, app, resolved = await start_control_plane(tmp_path, blob_url=blob_url, **settings)
        started.append(runner)
        return ControlPlane(base, resolved, app, runner, http)

    yield start
    for runner in started:
        await runner.cleanup()


async def test_an_s3_download_is_a_presigned_url_that_names_the_file_and_expires(
    s3_plane: Callable[..., Awaitable[ControlPlane]],
    s3_server: S3Server,
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
) -> None:
    cp = await s3_plane(blob_presign_s=120)
    output = await _one_output(cp, sim, start_agent)
    async with http.get(cp.base + output["src"], headers=await cp.headers(), allow_redirects=False) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(s3_server.endpoint + "/")
    assert parse_qs(urlsplit(location).query)["X-Amz-Expires"] == ["120"]
    # The URL is the credential: no token goes with it.
    async with http.get(location) as resp:
        body = await resp.read()
        assert resp.status == 200, body[:300]
        assert resp.headers["Content-Type"] == "image/png"
        assert output["filename"] in resp.headers["Content-Disposition"]
    assert hashlib.sha256(body).hexdigest() == output["sha256"]
    # Someone else's token gets no URL at all.
    status, _ = await cp.request("GET", output["src"], account="mallory")
    assert status == 404


async def test_with_presigning_off_the_control_plane_streams_s3_bytes_itself(
    s3_plane: Callable[..., Awaitable[ControlPlane]],
    http: aiohttp.ClientSession,
    sim: str,
    start_agent: AgentFactory,
) -> None:
    cp = await s3_plane(blob_presign_s=0)
    output = await _one_output(cp, sim, start_agent)
    async with http.get(cp.base + output["src"], headers=await cp.headers(), allow_redirects=False) as resp:
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Length"] == str(output["size"])
    assert hashlib.sha256(body).hexdigest() == output["sha256"]


async def test_a_control_plane_whose_bucket_is_missing_says_so_at_start(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    store = open_blob_store("s3://no-such-bucket-here/x", tmp_path, presign_s=60)
    with pytest.raises(BlobStoreUnusable, match="blob store s3://no-such-bucket-here/x/ cannot be used"):
        await asyncio.wait_for(store.setup(), 60)


@pytest.mark.parametrize(
    ("blob_url", "message"),
    [
        ("ftp://host/x", "use s3://bucket/prefix, a folder or file:///folder"),
        ("s3:///prefix", "names no bucket"),
    ],
)
def test_a_blob_url_that_names_no_store_is_refused_with_what_to_write(blob_url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings({"blob_url": blob_url}, environ={})


async def test_serve_on_a_bucket_that_does_not_exist_says_so_and_exits_2(
    tmp_path: Path, s3_server: S3Server
) -> None:
    env = {**os.environ, **s3_server.env, "COMFYFLEET_BLOB_URL": "s3://no-such-bucket-here/x"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyfleet",
        "serve",
        "--data-dir",
        str(tmp_path),
        "--port",
        str(free_port()),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert (
        err.decode()
        .strip()
        .splitlines()[-1]
        .startswith("comfyfleet: error: blob store s3://no-such-bucket-here/x/ cannot be used")
    )
