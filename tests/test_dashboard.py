"""The operator dashboard: the JSON snapshot and its stream against a real control plane, real
agents and the ComfyUI simulator, and the page itself in headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Dialog, Page, async_playwright, expect

from control_plane.app import create_app
from control_plane.db.tables import Workflow, tag_index, utcnow
from control_plane.settings import Settings
from runner_agent.agent import Agent
from runner_agent.capacity import NvmlProbe
from tests.conftest import AgentFactory, ControlPlane
from tests.fake_nvml import FakeNvml, h100

ROOT = Path(__file__).resolve().parents[1]
# The README's picture; the test refreshes it only when asked, so a test run leaves the
# checkout as it found it.
README_SCREENSHOT = ROOT / "docs" / "dashboard.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_TIMEOUT_MS = 15_000
GIB = 1024**3
EVIL = "<img src=x onerror=alert(1)>"

QUICK: dict[str, Any] = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 3355443},
    },
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "$text(prefix, out)"}},
}
# ImageInvert fails and ImageBlur is slow once the simulator is told so (sim_config).
FAILING: dict[str, Any] = {
    "1": QUICK["1"],
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}
SLOW: dict[str, Any] = {
    "1": QUICK["1"],
    "2": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 2, "sigma": 1.0}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "blur"}},
}
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"


# -- a control plane with the dashboard's routes, and agents with (stand-in) GPUs -----------


@pytest.fixture
def dcp(cp: ControlPlane) -> ControlPlane:
    """The control plane (it serves the dashboard's routes)."""
    return cp


TWO_H100 = [h100(0, 87, 61, 66, 512), h100(1, 23, 18, 48, 164)]

GpuAgentFactory = Callable[..., Awaitable[Agent]]


@pytest.fixture
def gpu_agent(start_agent: AgentFactory) -> GpuAgentFactory:
    """Real agents against the simulator whose NVML answers with the GPUs given."""

    async def start(server: str, token: str, comfyui: str, gpus: list[dict[str, Any]]) -> Agent:
        agent: Agent = await start_agent(
            server, token, comfyui, nvml=NvmlProbe(FakeNvml(gpus)), shutdown_grace_s=1.0
        )
        return agent

    return start


# -- helpers ----------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sim_config(http: aiohttp.ClientSession, sim: str, **config: Any) -> None:
    async with http.post(f"{sim}/sim/config", json=config) as resp:
        assert resp.status == 200, await resp.text()


async def submit(
    cp: ControlPlane, workflow: dict[str, Any], name: str, tags: str = "", account: str = "alice"
) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field(
        "workflow_json", json.dumps(workflow), filename="workflow.json", content_type="application/json"
    )
    if tags:
        form.add_field("tags", tags)
    status, body = await cp.request("POST", "/v1/workflow", account, data=form)
    assert status == 201, body
    return body


async def snapshot(cp: ControlPlane, token: str) -> dict[str, Any]:
    status, body = await cp.request("GET", "/v1/dashboard", headers=bearer(token))
    assert status == 200, body
    return body


async def snapshots(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    event = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "snapshot":
            yield json.loads(line[6:])


async def wait_snapshot(
    cp: ControlPlane, token: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 20
) -> dict[str, Any]:
    """Follow the dashboard stream until a snapshot satisfies ``predicate``."""
    async with (
        asyncio.timeout(timeout_s),
        cp.http.get(f"{cp.base}/v1/dashboard/stream", headers=bearer(token)) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        async for snap in snapshots(resp):
            if predicate(snap):
                return snap
    raise AssertionError("the dashboard stream ended")


def runner_in(snap: dict[str, Any], runner_id: str) -> dict[str, Any]:
    return next(r for r in snap["runners"] if r["id"] == runner_id)


def recent_in(snap: dict[str, Any], wf_id: str) -> dict[str, Any]:
    return next(w for w in snap["recent"] if w["id"] == wf_id)


async def account_id(cp: ControlPlane, name: str) -> str:
    return (await cp.services.store.get_or_create_account(name)).id


async def add_finished(
    cp: ControlPlane,
    account: str,
    name: str,
    status: str,
    ago: timedelta,
    *,
    runner_id: str | None = None,
    run_s: float = 6.0,
    error: str | None = None,
) -> Workflow:
    """A workflow that finished ``ago``: history from before the test started."""
    done = utcnow() - ago
    started = done - timedelta(seconds=run_s)
    return await cp.services.store.add_workflow(
        Workflow(
            account_id=await account_id(cp, account),
            name=name,
            tags=["gpu"],
            tag_index=tag_index(["gpu"]),
            status=status,
            workflow_json=QUICK,
            runner_id=runner_id,
            created_at=started - timedelta(seconds=2),
            updated_at=done,
            started_at=started,
            completed_at=done,
            error_node="2" if error else None,
            exception_type="torch.OutOfMemoryError" if error else None,
            exception_message=error,
        )
    )


# -- JSON --------------------------------------------------------------------------------------


async def test_snapshot_shows_an_online_runner_its_gpus_and_its_running_job(
    dcp: ControlPlane, sim: str, http: aiohttp.ClientSession, gpu_agent: GpuAgentFactory
) -> None:
    op = await dcp.token("alice", scope="operator")
    runner = await dcp.create_runner(name="gpu-a", tags=["gpu"])
    before = runner_in(await snapshot(dcp, op), runner["id"])
    assert before["online"] is False and before["last_seen"] is None and before["jobs"] == []

    await sim_config(http, sim, node_delays_s={"ImageBlur": 30})
    await gpu_agent(dcp.base, runner["token"], sim, TWO_H100)
    wf = await submit(dcp, SLOW, "slow-render", tags="gpu")

    def running_blur(snap: dict[str, Any]) -> bool:
        jobs = runner_in(snap, runner["id"])["jobs"]
        return bool(jobs) and jobs[0]["status"] == "running" and jobs[0]["node"] == "ImageBlur"

    await wait_snapshot(dcp, op, running_blur)
    snap = await snapshot(dcp, op)
    r = runner_in(snap, runner["id"])
    assert r["online"] is True and r["status"] == "active" and r["healthy"] is True
    assert r["name"] == "gpu-a" and r["tags"] == ["gpu"]
    assert r["last_seen"] is not None and r["connected_at"] is not None
    assert (r["slots"], r["free_slots"]) == (1, 0)
    assert r["gpu_source"] == "nvml" and r["driver_version"] == "550.54.15" and r["cuda_version"] == "12.4"
    assert [g["index"] for g in r["gpus"]] == [0, 1]
    gpu0 = r["gpus"][0]
    assert gpu0["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu0["utilization_pct"] == 87 and gpu0["temperature_c"] == 66
    assert (gpu0["memory_used_bytes"], gpu0["memory_total_bytes"]) == (61 * GIB, 80 * GIB)
    assert gpu0["memory_pct"] == 76.2
    assert (gpu0["power_draw_w"], gpu0["power_limit_w"]) == (512, 700)
    [job] = r["jobs"]
    assert (job["id"], job["name"], job["status"], job["attempt"]) == (wf["id"], "slow-render", "running", 1)
    assert 0 <= job["progress"] < 1 and job["started_at"] is not None and job["run_s"] >= 0
    assert snap["summary"] == {
        "runners": 1,
        "runners_online": 1,
        "gpus_online": 2,
        "jobs_running": 1,
        "waiting": 0,
        "completed_last_hour": 0,
        "failed_last_hour": 0,
    }
    row = recent_in(snap, wf["id"])
    assert (row["status"], row["runner_name"], row["completed_at"]) == ("running", "gpu-a", None)
    assert row["run_s"] is not None and row["queued_s"] is not None

    await sim_config(http, sim, node_delays_s={})
    done = await dcp.wait_for_status(wf["id"], {"completed", "failed"})
    assert done["status"] == "completed"
    snap = await wait_snapshot(dcp, op, lambda s: recent_in(s, wf["id"])["status"] == "completed")
    assert runner_in(snap, runner["id"])["jobs"] == []
    row = recent_in(snap, wf["id"])
    assert row["runner_id"] == runner["id"] and row["runner_name"] == "gpu-a"
    assert row["run_s"] >= 0 and row["queued_s"] >= 0 and row["exception_message"] is None
    assert snap["summary"]["completed_last_hour"] == 1 and snap["summary"]["jobs_running"] == 0


async def test_queue_recent_errors_and_throughput(
    dcp: ControlPlane, sim: str, http: aiohttp.ClientSession, gpu_agent: GpuAgentFactory
) -> None:
    op = await dcp.token("alice", scope="operator")
    # Never connects: what is submitted for its tags waits.
    await dcp.create_runner(name="sdxl-box", tags=["gpu", "sdxl"])
    live = await dcp.create_runner(name="live-box", tags=["live"])
    await gpu_agent(dcp.base, live["token"], sim, TWO_H100[:1])

    waiting = [
        await submit(dcp, QUICK, "w1", tags="gpu"),
        await submit(dcp, QUICK, "w2", tags="gpu,sdxl"),
        await submit(dcp, QUICK, "w3", tags="gpu"),
        await submit(dcp, QUICK, "w4", tags="sdxl,gpu"),
    ]
    await sim_config(http, sim, fail_nodes={"ImageInvert": OOM})
    ok = await submit(dcp, QUICK, "ok", tags="live")
    bad = await submit(dcp, FAILING, "bad", tags="live")
    assert (await dcp.wait_for_status(ok["id"], {"completed", "failed"}))["status"] == "completed"
    assert (await dcp.wait_for_status(bad["id"], {"completed", "failed"}))["status"] == "failed"

    # History: one completed 7 minutes ago, one failed 20 minutes ago, one too old to count,
    # and another account's, which never counts here.
    older = await add_finished(dcp, "alice", "older-ok", "completed", timedelta(minutes=7))
    older_bad = await add_finished(dcp, "alice", "older-bad", "failed", timedelta(minutes=20), error=OOM)
    await add_finished(dcp, "alice", "ancient", "completed", timedelta(minutes=70))
    await add_finished(dcp, "bob", "bobs", "completed", timedelta(minutes=3))

    snap = await snapshot(dcp, op)
    queue = snap["queue"]
    assert queue["total"] == 4 and snap["summary"]["waiting"] == 4
    groups = {tuple(g["tags"]): g for g in queue["groups"]}
    assert set(groups) == {("gpu",), ("gpu", "sdxl")}
    assert groups[("gpu",)]["count"] == 2 and groups[("gpu", "sdxl")]["count"] == 2
    assert groups[("gpu",)]["oldest_created_at"] == recent_in(snap, waiting[0]["id"])["created_at"]
    assert groups[("gpu", "sdxl")]["oldest_created_at"] == recent_in(snap, waiting[1]["id"])["created_at"]
    assert all(g["oldest_age_s"] >= 0 and g["runners_online"] == 0 for g in queue["groups"])
    # Oldest first.
    assert [g["tags"] for g in queue["groups"]] == [["gpu"], ["gpu", "sdxl"]]

    recent = snap["recent"]
    assert [w["name"] for w in recent[:6]] == ["bad", "ok", "w4", "w3", "w2", "w1"]
    assert {w["name"] for w in recent} == {
        "bad",
        "ok",
        "w1",
        "w2",
        "w3",
        "w4",
        "older-ok",
        "older-bad",
        "ancient",
    }
    failed = recent_in(snap, bad["id"])
    assert failed["status"] == "failed" and failed["runner_name"] == "live-box"
    assert OOM in failed["exception_message"] and failed["exception_type"] and failed["error_node"] == "2"
    waiting_row = recent_in(snap, waiting[0]["id"])
    assert waiting_row["status"] == "accepted" and waiting_row["runner_id"] is None
    assert waiting_row["run_s"] is None and waiting_row["queued_s"] >= 0
    assert recent_in(snap, older_bad.id)["exception_message"] == OOM
    assert recent_in(snap, older.id)["run_s"] == 6.0

    tp = snap["throughput"]
    assert tp["bucket_s"] == 300 and len(tp["buckets"]) == 12
    assert (tp["completed"], tp["failed"]) == (2, 2)
    assert (snap["summary"]["completed_last_hour"], snap["summary"]["failed_last_hour"]) == (2, 2)
    by_start = {datetime.fromisoformat(b["start"]): b for b in tp["buckets"]}

    def bucket_of(iso_time: str) -> dict[str, Any]:
        # As times, not strings: "12:40:00.5Z" sorts before "12:40:00Z" as text.
        at = datetime.fromisoformat(iso_time)
        return by_start[max(s for s in by_start if s <= at)]

    assert bucket_of(recent_in(snap, older.id)["completed_at"])["completed"] == 1
    assert bucket_of(recent_in(snap, older_bad.id)["completed_at"])["failed"] == 1
    generated = datetime.fromisoformat(snap["generated_at"])
    assert datetime.fromisoformat(tp["buckets"][-1]["start"]) <= generated < datetime.fromisoformat(tp["end"])
    just_now = bucket_of(recent_in(snap, ok["id"])["completed_at"])
    assert just_now["completed"] >= 1 and bucket_of(recent_in(snap, bad["id"])["completed_at"])["failed"] >= 1


async def test_an_account_sees_only_its_own_fleet(
    dcp: ControlPlane, sim: str, gpu_agent: GpuAgentFactory
) -> None:
    alice_op = await dcp.token("alice", scope="operator")
    bob_op = await dcp.token("bob", scope="operator")
    alices = await dcp.create_runner("alice", name="alice-runner", tags=["gpu"])
    bobs = await dcp.create_runner("bob", name="bob-runner", tags=["gpu"])
    await gpu_agent(dcp.base, bobs["token"], sim, TWO_H100)
    bob_done = await submit(dcp, QUICK, "bob-job", tags="gpu", account="bob")
    await dcp.wait_for_status(bob_done["id"], {"completed"}, account="bob")
    await dcp.create_runner("bob", name="bob-other", tags=["gpu", "other"])  # never connects
    bob_waiting = await submit(dcp, QUICK, "bob-waits", tags="gpu,other", account="bob")
    alice_wf = await submit(dcp, QUICK, "alice-job", tags="gpu")

    alice_snap = await snapshot(dcp, alice_op)
    text = json.dumps(alice_snap)
    for secret in (bobs["id"], "bob-runner", bob_done["id"], "bob-job", bob_waiting["id"], "bob-waits"):
        assert secret not in text
    assert [r["id"] for r in alice_snap["runners"]] == [alices["id"]]
    assert [w["id"] for w in alice_snap["recent"]] == [alice_wf["id"]]
    assert alice_snap["account"]["name"] == "alice"
    assert alice_snap["summary"]["runners_online"] == 0 and alice_snap["summary"]["completed_last_hour"] == 0

    # The stream is scoped the same way.
    streamed = await wait_snapshot(dcp, alice_op, lambda s: True)
    assert bobs["id"] not in json.dumps(streamed) and streamed["account"]["name"] == "alice"

    bob_snap = await snapshot(dcp, bob_op)
    assert {r["name"] for r in bob_snap["runners"]} == {"bob-runner", "bob-other"}
    assert alices["id"] not in json.dumps(bob_snap) and alice_wf["id"] not in json.dumps(bob_snap)
    assert runner_in(bob_snap, bobs["id"])["online"] is True
    assert bob_snap["summary"]["completed_last_hour"] == 1


async def test_data_routes_need_an_operator_token(dcp: ControlPlane) -> None:
    client = await dcp.token("alice")
    runner = await dcp.create_runner(name="r")
    for path in ("/v1/dashboard", "/v1/dashboard/stream"):
        status, body = await dcp.request("GET", path, account=None)
        assert (status, body["status"]) == (401, 401)
        assert "token" in body["message"]
        status, body = await dcp.request("GET", path, headers=bearer(client))
        assert status == 403 and body["message"] == "this needs an operator token"
        status, body = await dcp.request("GET", path, headers=bearer(runner["token"]))
        assert status == 401
        status, body = await dcp.request("GET", path, headers=bearer("cf_not-a-token"))
        assert status == 401


async def test_page_and_assets_are_served_by_the_control_plane(dcp: ControlPlane) -> None:
    async with dcp.http.get(f"{dcp.base}/dashboard") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert '<script src="/dashboard/assets/dashboard.js"' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        async with dcp.http.get(f"{dcp.base}/dashboard/assets/{name}") as resp:
            assert resp.status == 200 and resp.content_type == kind
            body = await resp.text()
        assert "innerHTML" not in body and "https://" not in body
    status, _ = await dcp.request("GET", "/dashboard/assets/..%2Fdashboard.py", account=None)
    assert status == 404
    status, _ = await dcp.request("GET", "/dashboard/assets/secrets.txt", account=None)
    assert status == 404
    # Someone who types the bare address lands on the dashboard.
    async with dcp.http.get(f"{dcp.base}/", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (302, "/dashboard")


async def test_stream_sends_a_snapshot_at_once_and_then_each_change(dcp: ControlPlane) -> None:
    op = await dcp.token("alice", scope="operator")
    async with (
        asyncio.timeout(15),
        dcp.http.get(f"{dcp.base}/v1/dashboard/stream", headers=bearer(op)) as resp,
    ):
        assert resp.status == 200
        stream = snapshots(resp)
        first = await anext(stream)
        assert first["runners"] == [] and first["account"]["name"] == "alice"
        created = await dcp.create_runner(name="late")
        nxt = await anext(stream)
        assert [r["id"] for r in nxt["runners"]] == [created["id"]]
        assert datetime.fromisoformat(nxt["generated_at"]) >= datetime.fromisoformat(first["generated_at"])
        await stream.aclose()


async def test_open_streams_end_when_the_server_shuts_down(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = Settings(data_dir=tmp_path / "cp").validate()
    app = create_app(settings)
    # aiohttp's default: a stream that ignored the shutdown would hold it up for a minute.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    cp = ControlPlane(f"http://127.0.0.1:{port}", settings, app, runner, http)
    op = await cp.token("alice", scope="operator")
    try:
        async with http.get(f"{cp.base}/v1/dashboard/stream", headers=bearer(op)) as resp:
            stream = snapshots(resp)
            assert (await anext(stream))["account"]["name"] == "alice"
            async with asyncio.timeout(10):
                await runner.cleanup()
                rest = [snap async for snap in stream]
            assert rest == []
    finally:
        await runner.cleanup()


# -- the page in a browser --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Page, list[str], list[str]]]:
    """A page in headless Chromium; yields it with the dialogs it opened and the URLs it asked for."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 900})
            dialogs: list[str] = []
            urls: list[str] = []

            async def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on("request", lambda request: urls.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, dialogs, urls
            assert errors == [], errors  # no script error on the page
        finally:
            await browser.close()


async def sign_in(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/dashboard")
    await page.fill("#token-input", token)
    await page.click("#login-submit")
    await expect(page.locator("#conn-state")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    # Marks this document: a reload would lose it.
    await page.evaluate("window.__sameDocument = true")


async def test_browser_follows_the_fleet_live_and_screenshot(
    dcp: ControlPlane, sim: str, http: aiohttp.ClientSession, gpu_agent: GpuAgentFactory, tmp_path: Path
) -> None:
    op = await dcp.token("alice", scope="operator")
    node_a = await dcp.create_runner(name="gpu-node-a", tags=["gpu", "sdxl"])
    node_b = await dcp.create_runner(name="gpu-node-b", tags=["gpu"])
    # Earlier in the hour (seeded straight into the store): what the throughput chart shows.
    history = [
        ("product-shots", "completed", 52, node_b, 41.5, None),
        ("product-shots", "completed", 47, node_b, 39.8, None),
        ("upscale-4x", "failed", 41, node_a, 12.3, OOM),
        ("sdxl-hero-render", "completed", 33, node_a, 74.1, None),
        ("thumbnails", "completed", 26, node_b, 3.2, None),
        ("thumbnails", "completed", 24, node_b, 2.9, None),
        ("sdxl-hero-render", "completed", 14, node_a, 71.6, None),
    ]
    for name, status, minutes, runner, run_s, error in history:
        await add_finished(
            dcp,
            "alice",
            name,
            status,
            timedelta(minutes=minutes),
            runner_id=runner["id"],
            run_s=run_s,
            error=error,
        )
    await sim_config(http, sim, node_delays_s={"ImageBlur": 60}, fail_nodes={"ImageInvert": OOM})

    async with browser_page() as (page, dialogs, urls):
        await sign_in(page, dcp.base, op)
        card_a = page.locator(f'[data-runner-id="{node_a["id"]}"]')
        await expect(card_a.locator(".runner-online")).to_have_text("offline", timeout=UI_TIMEOUT_MS)
        await expect(page.locator(f'[data-runner-id="{node_b["id"]}"] .runner-name')).to_have_text(
            "gpu-node-b"
        )

        # An agent comes online: its card turns online with its two GPUs.
        await gpu_agent(dcp.base, node_a["token"], sim, TWO_H100)
        await expect(card_a.locator(".runner-online")).to_have_text("online", timeout=UI_TIMEOUT_MS)
        await expect(card_a.locator(".gpu")).to_have_count(2, timeout=UI_TIMEOUT_MS)
        await expect(card_a.locator(".gpu").first).to_contain_text("NVIDIA H100 80GB HBM3")

        # A workflow is submitted: it appears and reaches completed.
        quick = await submit(dcp, QUICK, "thumbnails", tags="gpu")
        row = page.locator(f'tr[data-workflow-id="{quick["id"]}"]')
        await expect(row.locator(".wf-status")).to_have_text("completed", timeout=UI_TIMEOUT_MS)
        await expect(row.locator(".wf-runner")).to_have_text("gpu-node-a")

        failing = await submit(dcp, FAILING, "upscale-4x", tags="gpu")
        failed_row = page.locator(f'tr[data-workflow-id="{failing["id"]}"]')
        await expect(failed_row.locator(".wf-status")).to_have_text("failed", timeout=UI_TIMEOUT_MS)
        await expect(failed_row.locator(".error-text")).to_contain_text("CUDA out of memory")

        slow = await submit(dcp, SLOW, "sdxl-hero-render", tags="gpu,sdxl")
        job = card_a.locator(f'.job[data-workflow-id="{slow["id"]}"]')
        await expect(job.locator(".wf-status")).to_have_text("running", timeout=UI_TIMEOUT_MS)
        await expect(job.locator(".job-node")).to_have_text("ImageBlur", timeout=UI_TIMEOUT_MS)

        # The only runner that could take it is busy: it waits in the queue.
        await submit(dcp, QUICK, "poster-variations", tags="gpu,sdxl")
        group = page.locator(".queue-group")
        await expect(group).to_have_count(1, timeout=UI_TIMEOUT_MS)
        await expect(group.locator(".queue-count")).to_have_text("1")
        await expect(page.locator(".throughput-completed")).to_have_text("7 completed", timeout=UI_TIMEOUT_MS)
        await expect(page.locator(".throughput-failed")).to_have_text("2 failed")

        assert await page.evaluate("window.__sameDocument") is True  # never reloaded
        assert dialogs == []
        assert not any(op in url for url in urls)  # the token travels in headers only
        assert any(url.endswith("/v1/dashboard/stream") for url in urls)
        update_readme = os.environ.get("COMFYFLEET_UPDATE_SCREENSHOT") == "1"
        shot = README_SCREENSHOT if update_readme else tmp_path / "dashboard.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert (await asyncio.to_thread(shot.stat)).st_size > 10_000

    await sim_config(http, sim, node_delays_s={})  # let the slow job end before teardown


async def test_browser_shows_what_users_typed_as_text(dcp: ControlPlane) -> None:
    op = await dcp.token("alice", scope="operator")
    runner = await dcp.create_runner(name=EVIL, tags=["gpu"])
    script_name = "<script>alert(2)</script>"
    waiting = await submit(dcp, QUICK, script_name, tags="gpu")  # nobody online: it waits
    failed = await add_finished(
        dcp, "alice", "<b>bold</b>", "failed", timedelta(minutes=2), error="<img src=y onerror=alert(3)>"
    )

    async with browser_page() as (page, dialogs, _urls):
        await sign_in(page, dcp.base, op)
        name = page.locator(f'[data-runner-id="{runner["id"]}"] .runner-name')
        await expect(name).to_have_text(EVIL, timeout=UI_TIMEOUT_MS)
        await expect(page.locator(f'tr[data-workflow-id="{waiting["id"]}"] .wf-name')).to_have_text(
            script_name
        )
        failed_row = page.locator(f'tr[data-workflow-id="{failed.id}"]')
        await expect(failed_row.locator(".wf-name")).to_have_text("<b>bold</b>")
        await expect(failed_row.locator(".error-text")).to_contain_text("<img src=y onerror=alert(3)>")
        assert await page.locator("#board img").count() == 0
        assert await page.locator("#board script").count() == 0
        assert await page.locator("#board b").count() == 0
        assert dialogs == []
        # Signing out forgets the token and shows the form again.
        await page.click("#sign-out")
        await expect(page.locator("#login-form")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0


async def test_browser_refuses_a_client_token(dcp: ControlPlane) -> None:
    client = await dcp.token("alice")
    async with browser_page() as (page, _dialogs, _urls):
        await page.goto(f"{dcp.base}/dashboard")
        await page.fill("#token-input", client)
        await page.click("#login-submit")
        await expect(page.locator("#login-error")).to_have_text("this needs an operator token")
        assert await page.locator("#board").is_hidden()
