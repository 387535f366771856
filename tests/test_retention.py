"""Retention: a finished workflow's files go once its tier's retention period is over, and
exactly those that nothing else uses; its record stays. A rerun racing the sweep either keeps
the files in use or is refused, never left without them."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import update

from control_plane.db.tables import Workflow, utcnow
from tests.conftest import (
    AgentFactory,
    ControlPlane,
    png_bytes,
    poll_until,
    rerun_held_after_its_checks,
    start_control_plane,
)
from tests.test_e2e import WORKFLOW, curl_form


async def _run(cp: ControlPlane, image: bytes, prompt: str, account: str = "alice") -> dict[str, Any]:
    form = curl_form(WORKFLOW, **{"$prompt": prompt, "$input_image": image})
    status, wf = await cp.request("POST", "/v1/workflow", account=account, data=form)
    assert status == 201, wf
    return await cp.wait_for_status(wf["id"], {"completed"}, account=account)


async def _outputs(cp: ControlPlane, wf_id: str, account: str = "alice") -> set[str]:
    status, body = await cp.request("GET", f"/v1/workflow/{wf_id}/outputs", account=account)
    assert status == 200, body
    return {o["sha256"] for o in body["outputs"]}


async def _age(cp: ControlPlane, days: float, *workflow_ids: str) -> None:
    """As if they had finished ``days`` ago."""
    then = utcnow() - timedelta(days=days)
    async with cp.services.store.engine.begin() as conn:
        await conn.execute(
            update(Workflow).where(Workflow.id.in_(workflow_ids)).values(completed_at=then)  # type: ignore[attr-defined]
        )


def _stored(cp: ControlPlane) -> set[str]:
    root = cp.settings.blob_dir
    return {p.name for p in root.rglob("*") if p.is_file() and p.parent != root / "tmp"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_the_sweep_removes_exactly_the_files_of_aged_workflows_that_nothing_else_uses(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    await cp.token("bob", tier="pro")  # keeps files 30 days; free keeps them 7
    alice_runner = await cp.create_runner()
    await start_agent(cp.base, alice_runner["token"], sim)
    bob_runner = await cp.create_runner("bob", name="b1")
    await start_agent(cp.base, bob_runner["token"], sim)
    shared, own, uploaded, bobs = (png_bytes(c) for c in [(1, 1, 1), (2, 2, 2), (3, 3, 3), (4, 4, 4)])
    status, blob = await cp.request("POST", "/v1/blob?filename=up.png", data=uploaded)
    assert status == 201, blob

    old = await _run(cp, shared, "old")  # aged: its own files go, the shared one stays
    old_own = await _run(cp, own, "own")  # aged: all of its files go
    old_uploaded = await _run(cp, uploaded, "up")  # aged: the account's upload stays
    recent = await _run(cp, shared, "recent")  # not aged: keeps the shared input
    bob_old = await _run(cp, bobs, "bob", account="bob")  # aged 8 days, but pro keeps 30
    aged = [old["id"], old_own["id"], old_uploaded["id"]]
    await _age(cp, 8, *aged, bob_old["id"])

    kept_outputs = await _outputs(cp, recent["id"]) | await _outputs(cp, bob_old["id"], "bob")
    before = _stored(cp)
    result = await cp.services.retention.sweep()
    assert result.workflows == 3

    # What stays: whatever a workflow not past its retention uses, and the account's upload.
    in_use = {sha(shared), sha(uploaded), sha(bobs)} | kept_outputs
    assert _stored(cp) == before & in_use
    assert result.blobs == len(before - in_use)
    for wf_id in aged:
        status, wf = await cp.request("GET", f"/v1/workflow/{wf_id}")
        assert (status, wf["status"]) == (200, "completed")  # the record stays
        assert wf["files_removed_at"] is not None
        assert await _outputs(cp, wf_id) == set()
    status, wf = await cp.request("GET", f"/v1/workflow/{recent['id']}")
    assert wf["files_removed_at"] is None and await _outputs(cp, recent["id"])

    # Nothing more is due: a second sweep removes nothing.
    again = await cp.services.retention.sweep()
    assert (again.workflows, again.blobs) == (0, 0)
    assert _stored(cp) == before & in_use

    # A rerun of a workflow whose files went says so; one whose files stay runs.
    status, body = await cp.request(
        "POST", f"/v1/workflow/{old_own['id']}/rerun", data=aiohttp.FormData({"$prompt": "again"})
    )
    assert status == 409 and "were removed" in body["message"], body
    # And so does Conductor's rerun of it from the start (the same workflow, again).
    status, body = await cp.request("POST", f"/api/workflow/{old_own['id']}/rerun", json={})
    assert status == 409 and "were removed" in body["message"], body
    status, body = await cp.request(
        "POST", f"/v1/workflow/{recent['id']}/rerun", data=aiohttp.FormData({"$prompt": "again"})
    )
    assert status == 201, body
    assert (await cp.wait_for_status(body["id"], {"completed"}))["status"] == "completed"


async def test_a_rerun_that_went_in_before_the_sweep_keeps_its_files_and_one_after_is_refused(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    await cp.token("alice", tier="pro")
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = png_bytes((9, 9, 9))
    original = await _run(cp, image, "orig")
    await _age(cp, 31, original["id"])

    async def rerun(n: int) -> tuple[int, Any]:
        data = aiohttp.FormData({"$prompt": f"r{n}"})
        return await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=data)

    # The sweep goes in as soon as the first rerun is answered, while the rest are in flight.
    reruns = [asyncio.create_task(rerun(n)) for n in range(16)]
    await asyncio.wait(reruns, return_when=asyncio.FIRST_COMPLETED)
    assert (await cp.services.retention.sweep()).workflows == 1
    answers = await asyncio.gather(*reruns)
    made = [body for status, body in answers if status == 201]
    refused = [body for status, body in answers if status != 201]
    assert made and all(b["status"] == 409 for b in refused), refused
    # A rerun that was made refers to the input itself: it stayed, and each one runs.
    assert await cp.services.blobs.exists(sha(image))
    for wf in made:
        assert (await cp.wait_for_status(wf["id"], {"completed"}))["status"] == "completed"


async def test_a_rerun_held_between_its_checks_and_its_insert_while_the_sweep_runs_is_refused(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = png_bytes((5, 9, 5))
    original = await _run(cp, image, "orig")
    await _age(cp, 8, original["id"])
    rerun, go_on = await rerun_held_after_its_checks(cp, original["id"], "late")
    assert (await cp.services.retention.sweep()).workflows == 1
    assert not await cp.services.blobs.exists(sha(image))
    go_on.set()
    status, body = await rerun
    assert status == 409 and "were removed" in body["message"], body
    status, listing = await cp.request("GET", "/v1/workflow")
    assert listing["total"] == 1  # the rerun made nothing


async def test_the_control_plane_sweeps_on_its_own(
    tmp_path: Path, http: aiohttp.ClientSession, database_url: str, sim: str, start_agent: AgentFactory
) -> None:
    runner, base, app, settings = await start_control_plane(
        tmp_path, database_url=database_url, retention_sweep_s=0.2
    )
    cp = ControlPlane(base, settings, app, runner, http)
    try:
        agent_runner = await cp.create_runner()
        await start_agent(cp.base, agent_runner["token"], sim)
        wf = await _run(cp, png_bytes((7, 1, 7)), "auto")
        assert await _outputs(cp, wf["id"])
        await _age(cp, 8, wf["id"])

        async def removed() -> bool:
            _, body = await cp.request("GET", f"/v1/workflow/{wf['id']}")
            return body["files_removed_at"] is not None

        await poll_until(removed, timeout_s=30)
        assert await _outputs(cp, wf["id"]) == set()
    finally:
        await runner.cleanup()
