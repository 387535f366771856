"""Deleting a workflow: it goes with its tasks, outputs and events, and so do the files that
nothing else uses; a file another workflow or an upload uses stays, and a rerun racing the
delete either finds its original (and keeps its files) or a 404."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest

from tests.conftest import AgentFactory, ControlPlane, png_bytes, rerun_held_after_its_checks
from tests.test_e2e import WORKFLOW, curl_form


@pytest.fixture
def cp(blob_cp: ControlPlane) -> ControlPlane:
    """Deleting works the same on every blob store (and every database)."""
    return blob_cp


async def _run(cp: ControlPlane, image: bytes, prompt: str = "fox") -> dict[str, Any]:
    form = curl_form(WORKFLOW, **{"$prompt": prompt, "$input_image": image})
    status, wf = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 201, wf
    return await cp.wait_for_status(wf["id"], {"completed"})


async def _outputs(cp: ControlPlane, wf_id: str) -> list[dict[str, Any]]:
    status, body = await cp.request("GET", f"/v1/workflow/{wf_id}/outputs")
    assert status == 200, body
    return body["outputs"]  # type: ignore[no-any-return]


async def test_a_deleted_workflow_is_gone_with_the_files_only_it_used(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    blobs = cp.services.blobs
    shared, own = png_bytes((1, 2, 3)), png_bytes((4, 5, 6))
    keeper = await _run(cp, shared, "keeper")
    doomed = await _run(cp, own)
    sibling = await _run(cp, shared, "sibling")
    own_sha, shared_sha = hashlib.sha256(own).hexdigest(), hashlib.sha256(shared).hexdigest()
    outputs = await _outputs(cp, doomed["id"])
    assert outputs and all([await blobs.exists(o["sha256"]) for o in outputs])

    status, _ = await cp.request("DELETE", f"/v1/workflow/{doomed['id']}")
    assert status == 204
    for path in (f"/v1/workflow/{doomed['id']}", f"/v1/workflow/{doomed['id']}/outputs", outputs[0]["src"]):
        status, body = await cp.request("GET", path)
        assert status == 404, (path, body)
    assert not await blobs.exists(own_sha)
    # Its outputs' bytes differ from the others' only where the others' do too: each output
    # file is gone unless another workflow made the same bytes.
    others = {o["sha256"] for wf in (keeper, sibling) for o in await _outputs(cp, wf["id"])}
    for output in outputs:
        assert await blobs.exists(output["sha256"]) == (output["sha256"] in others)

    status, _ = await cp.request("DELETE", f"/v1/workflow/{keeper['id']}")
    assert status == 204
    assert await blobs.exists(shared_sha)  # the sibling still uses it
    rerun = await cp.request(
        "POST", f"/v1/workflow/{sibling['id']}/rerun", data=aiohttp.FormData({"$prompt": "again"})
    )
    assert rerun[0] == 201, rerun
    assert (await cp.wait_for_status(rerun[1]["id"], {"completed"}))["status"] == "completed"
    status, listing = await cp.request("GET", "/v1/workflow")
    assert status == 200 and {w["id"] for w in listing["workflows"]} == {sibling["id"], rerun[1]["id"]}


async def test_a_workflow_that_has_not_finished_or_is_not_yours_is_not_deleted(cp: ControlPlane) -> None:
    await cp.create_runner()  # never connects: the workflow waits
    form = curl_form(WORKFLOW, **{"$prompt": "fox", "$input_image": png_bytes((1, 2, 3))})
    status, wf = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 201, wf
    status, body = await cp.request("DELETE", f"/v1/workflow/{wf['id']}")
    assert status == 409 and "cancel it before deleting it" in body["message"], body
    for account, path in (("bob", wf["id"]), ("alice", "no-such-workflow")):
        status, body = await cp.request("DELETE", f"/v1/workflow/{path}", account=account)
        assert status == 404 and "not found" in body["message"], body
    status, _ = await cp.request("GET", f"/v1/workflow/{wf['id']}")
    assert status == 200  # still there

    status, _ = await cp.request("POST", f"/v1/workflow/{wf['id']}/cancel")
    assert status == 200
    status, _ = await cp.request("DELETE", f"/v1/workflow/{wf['id']}")
    assert status == 204
    status, body = await cp.request("DELETE", f"/v1/workflow/{wf['id']}")
    assert status == 404, body


async def test_reruns_racing_a_delete_either_keep_their_files_or_are_refused(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    await cp.token("alice", tier="pro")  # the free tier's submit rate would refuse the burst
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = png_bytes((7, 8, 9))
    original = await _run(cp, image)
    sha = hashlib.sha256(image).hexdigest()

    async def rerun(n: int) -> tuple[int, Any]:
        data = aiohttp.FormData({"$prompt": f"r{n}"})
        return await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=data)

    async def delete() -> tuple[int, Any]:
        return await cp.request("DELETE", f"/v1/workflow/{original['id']}")

    # The delete goes in as soon as the first rerun is answered, while the rest are in flight.
    reruns = [asyncio.create_task(rerun(n)) for n in range(16)]
    await asyncio.wait(reruns, return_when=asyncio.FIRST_COMPLETED)
    assert (await delete())[0] == 204
    answers = await asyncio.gather(*reruns)
    made = [body for status, body in answers if status == 201]
    refused = [body for status, body in answers if status != 201]
    assert made and all(b["status"] == 404 for b in refused), refused
    # Whichever way each one went, a rerun that was made has its input, and runs.
    assert await blobs_present(cp, sha)
    for wf in made:
        assert (await cp.wait_for_status(wf["id"], {"completed"}))["status"] == "completed"


async def test_a_rerun_whose_original_is_deleted_while_it_is_being_checked_is_a_404_and_makes_nothing(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    image = png_bytes((3, 1, 4))
    original = await _run(cp, image)
    # The rerun is held between its checks and its insert, and the delete goes in there.
    rerun, go_on = await rerun_held_after_its_checks(cp, original["id"], "late")
    status, _ = await cp.request("DELETE", f"/v1/workflow/{original['id']}")
    assert status == 204
    assert not await blobs_present(cp, hashlib.sha256(image).hexdigest())
    go_on.set()
    status, body = await rerun
    assert (status, body["message"]) == (404, f"workflow {original['id']} was deleted")
    status, listing = await cp.request("GET", "/v1/workflow")
    assert status == 200 and listing["total"] == 0


async def blobs_present(cp: ControlPlane, sha: str) -> bool:
    return await cp.services.blobs.exists(sha)
