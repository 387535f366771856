"""Races and edges: fenced writes that run at the same time, a cancel racing a dispatch,
agents that over-report free slots, open streams at shutdown, shared blobs, odd names."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from control_plane.db.blobs import DiskBlobStore
from control_plane.db.store import Fault
from control_plane.db.tables import Workflow
from control_plane.fleet.registry import AgentConnection
from control_plane.web.forms import SubmittedForm, _discard, _release
from control_plane.web.workflows import content_disposition
from protocol.capacity import Capacity
from tests.conftest import AgentFactory, ControlPlane, png_bytes, start_control_plane
from tests.test_e2e import WORKFLOW, curl_form, sim_config, submit

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "r"}},
}


async def new_running(cp: ControlPlane, account_id: str) -> Workflow:
    wf = await cp.services.store.add_workflow(
        Workflow(
            account_id=account_id, name="r", workflow_json=TRIVIAL, runner_id="runner-1", status="running"
        )
    )
    return wf


async def test_cancel_and_a_runner_report_at_the_same_time_agree(cp: ControlPlane) -> None:
    store = cp.services.store
    account = await store.get_or_create_account("alice")
    for _ in range(40):
        wf = await new_running(cp, account.id)
        cancelled, _ = await asyncio.gather(
            store.cancel_workflow(wf.id), store.update_current(wf.id, 1, "runner-1", {"status": "running"})
        )
        final = await store.get_workflow(None, wf.id)
        # What the client was told is what the row says.
        assert final.status == ("cancelled" if cancelled is not None else "running")


async def test_requeue_and_a_completion_at_the_same_time_do_not_both_apply(cp: ControlPlane) -> None:
    store = cp.services.store
    account = await store.get_or_create_account("alice")
    for _ in range(40):
        wf = await new_running(cp, account.id)
        requeued, completed = await asyncio.gather(
            store.retry(wf.id, 1, "runner-1", Fault("infrastructure", "lost", max_attempts=3, backoff_s=0)),
            store.update_current(wf.id, 1, "runner-1", {"status": "completed"}),
        )
        final = await store.get_workflow(None, wf.id)
        assert (requeued is None) != (completed is None)
        assert (final.status, final.attempt) in {("completed", 1), ("accepted", 2)}


async def test_cancel_reaches_the_runner_even_when_dispatched_meanwhile(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    await sim_config(http, sim, node_delays_s={"LoadImage": 5.0})
    runner = await cp.create_runner()
    wf = await submit(cp, WORKFLOW, **{"$prompt": "p", "$input_image": png_bytes((1, 2, 3))})
    stale = await cp.services.store.get_workflow(None, wf["id"])  # read before any runner had it
    assert stale.runner_id is None
    await start_agent(cp.base, runner["token"], sim)
    running = await cp.wait_for_status(wf["id"], {"running"})
    cancelled = await cp.services.fleet.cancel(stale)
    assert cancelled is not None and cancelled.status == "cancelled"
    await sim_config(http, sim, node_delays_s={})
    # The agent got the cancel: ComfyUI records the interruption, and the runner is free.
    nxt = await submit(cp, WORKFLOW, **{"$prompt": "q", "$input_image": png_bytes((1, 2, 3))})
    assert (await cp.wait_for_status(nxt["id"], {"completed", "failed"}))["status"] == "completed"
    async with http.get(f"{sim}/history/{running['prompt_id']}") as resp:
        history = (await resp.json())[running["prompt_id"]]
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"])
    _, fetched = await cp.request("GET", f"/v1/runner/{runner['id']}")
    assert fetched["current_jobs"] == []


async def test_ready_never_offers_more_than_the_runner_has(cp: ControlPlane) -> None:
    conn = AgentConnection(
        runner_id="r",
        account_id="a",
        name="r",
        tags=[],
        status="active",
        ws=None,  # type: ignore[arg-type]
        capacity=Capacity(slots=2),
    )
    conn.jobs.add("in-flight")
    await cp.services.fleet.runner_ready(conn, 2)
    assert conn.free_slots == 1


async def test_open_event_streams_end_when_the_control_plane_stops(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, base, app, settings = await start_control_plane(tmp_path)
    cp = ControlPlane(base, settings, app, runner, http)
    await cp.create_runner()
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(TRIVIAL))
    assert status == 201
    resp = await http.get(f"{base}/v1/workflow/{body['id']}/subscribe", headers=await cp.headers())
    assert (await resp.content.readline()).startswith(b"event: status")
    async with asyncio.timeout(5):  # without the end marker this waits out aiohttp's 60 s
        await runner.cleanup()
    resp.close()


async def test_a_failed_upload_keeps_a_blob_another_request_relies_on(tmp_path: Path) -> None:
    blobs = DiskBlobStore(tmp_path)
    await blobs.setup()

    async def chunks() -> Any:
        yield b"same bytes"

    stored = await blobs.write(chunks(), max_bytes=100)
    failing, succeeding = (
        SubmittedForm(new_blobs=[stored.sha256], held=[stored.sha256]),
        SubmittedForm(held=[stored.sha256]),
    )
    blobs.hold(stored.sha256)
    blobs.hold(stored.sha256)

    async def nowhere(_: str) -> bool:
        return False

    await _discard(failing, blobs, nowhere)  # the other request still holds it
    _release(failing, blobs)
    assert await blobs.exists(stored.sha256)
    _release(succeeding, blobs)

    async def referenced(_: str) -> bool:
        return True

    again = SubmittedForm(new_blobs=[stored.sha256], held=[stored.sha256])
    blobs.hold(stored.sha256)
    await _discard(again, blobs, referenced)  # a workflow refers to it
    assert await blobs.exists(stored.sha256)
    again = SubmittedForm(new_blobs=[stored.sha256], held=[stored.sha256])
    await _discard(again, blobs, nowhere)  # nobody: it goes
    assert not await blobs.exists(stored.sha256)


def test_download_names_survive_quotes_and_non_ascii() -> None:
    header = content_disposition('fox "red"_ü_00001_.png')
    disposition, params = parse_content_disposition(header)
    assert disposition == "attachment"
    assert content_disposition_filename(params, "filename") == 'fox "red"_ü_00001_.png'
    assert params["filename"] == "fox _red____00001_.png"  # the ASCII fallback for old clients


async def test_serve_on_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "comfyfleet",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path),
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            env=dict(os.environ),
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "address already in use" in err.decode() and "--port" in err.decode()
