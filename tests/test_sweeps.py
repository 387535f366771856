"""Parameter sweeps: one request makes a rerun with new parameters for each set of a grid or
a list, all of them or none; the sweep is followed and cancelled as one."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp

from control_plane.settings import Tier
from tests.conftest import AgentFactory, ControlPlane, png_bytes, start_control_plane
from tests.test_e2e import WORKFLOW, curl_form


async def _original(cp: ControlPlane) -> dict[str, Any]:
    form = curl_form(WORKFLOW, **{"$prompt": "fox", "$input_image": png_bytes((1, 2, 3))})
    status, body = await cp.request("POST", "/v1/workflow", data=form)
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def _sweep(cp: ControlPlane, wf_id: str, body: Any, **kw: Any) -> tuple[int, Any]:
    return await cp.request("POST", f"/v1/workflow/{wf_id}/sweep", json=body, **kw)


async def _total(cp: ControlPlane) -> int:
    status, listing = await cp.request("GET", "/v1/workflow")
    assert status == 200, listing
    return int(listing["total"])


async def test_a_grid_makes_every_combination_in_order_and_they_run_in_that_order(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()  # not connected yet: everything waits
    original = await _original(cp)
    grid = {"$prompt": ["cat", "owl"], "#sampler": ["bilinear", "nearest-exact"], "$width": [8]}
    status, sweep = await _sweep(cp, original["id"], {"grid": grid, "priority": 1})
    assert status == 201, sweep
    assert (sweep["total"], sweep["parent_id"], sweep["counts"]) == (4, original["id"], {"accepted": 4})
    ids = [wf["id"] for wf in sweep["workflows"]]

    combinations = []
    for wf_id in ids:
        status, wf = await cp.request("GET", f"/v1/workflow/{wf_id}")
        assert status == 200, wf
        assert (wf["sweep_id"], wf["parent_id"], wf["priority"]) == (sweep["sweep_id"], original["id"], 1)
        values = wf["workflow_params"]["values"]
        combinations.append((values["prompt"], values["sampler"], values["width"]))
        # What a set does not name keeps the original's value: here, its image.
        assert wf["workflow_params"]["files"] == original["workflow_params"]["files"]
    assert combinations == [
        ("cat", "bilinear", "8"),
        ("cat", "nearest-exact", "8"),
        ("owl", "bilinear", "8"),
        ("owl", "nearest-exact", "8"),
    ]
    status, listing = await cp.request("GET", f"/v1/workflow?sweep_id={sweep['sweep_id']}")
    assert status == 200 and listing["total"] == 4

    await start_agent(cp.base, runner["token"], sim)  # one runner: one job at a time
    done = [await cp.wait_for_status(wf_id, {"completed"}) for wf_id in ids]
    started = sorted(done, key=lambda wf: wf["started_at"])
    assert [wf["id"] for wf in started] == ids  # priority 1 before the original's 0, then in order
    status, followed = await cp.request("GET", f"/v1/sweep/{sweep['sweep_id']}")
    assert status == 200 and followed["counts"] == {"completed": 4}
    assert [wf["id"] for wf in followed["workflows"]] == ids


async def test_a_list_of_sets_may_name_uploaded_files_and_a_key_makes_it_once(cp: ControlPlane) -> None:
    await cp.create_runner()
    original = await _original(cp)
    image = png_bytes((9, 9, 9))
    headers = await cp.headers() | {"Content-Type": "image/png"}
    status, blob = await cp.request("POST", "/v1/blob?filename=owl.png", data=image, headers=headers)
    assert status == 201, blob
    sets = [{"$prompt": "cat"}, {"$prompt": "owl", "$input_image": {"sha256": blob["sha256"]}}, {}]
    keyed = await cp.headers() | {"Idempotency-Key": "sweep-1"}
    status, sweep = await _sweep(cp, original["id"], {"sets": sets}, headers=keyed)
    assert status == 201 and sweep["total"] == 3, sweep
    files = []
    for wf in sweep["workflows"]:
        _, full = await cp.request("GET", f"/v1/workflow/{wf['id']}")
        files.append(full["workflow_params"]["files"]["input_image"]["filename"])
    assert files[1] == "owl.png" and files[0] == files[2] != "owl.png"
    assert hashlib.sha256(image).hexdigest() == blob["sha256"]

    status, again = await _sweep(cp, original["id"], {"sets": sets}, headers=keyed)
    assert (status, again["sweep_id"]) == (201, sweep["sweep_id"])
    assert await _total(cp) == 4  # the original and one sweep's three


async def test_a_sweep_with_one_bad_set_makes_nothing_and_says_which(cp: ControlPlane) -> None:
    await cp.token("alice", tier="pro")  # the free tier's submit rate would refuse this many
    await cp.create_runner()
    original = await _original(cp)
    path = f"/v1/workflow/{original['id']}/sweep"
    refused: list[tuple[Any, str]] = [
        ({"sets": [{"$prompt": "a"}, {"$nope": "b"}]}, "set 2: "),
        ({"sets": [{"$prompt": "a"}, {"#sampler": "lanczos"}]}, "set 2: "),
        ({"grid": {"$prompt": ["a", "b"], "#sampler": ["bilinear", "sinc"]}}, "set 2: "),
        ({"sets": [{"$input_image": {"base64": "AAAA", "filename": "a.png"}}]}, "POST /v1/blob"),
        ({"sets": [{"$input_image": {"sha256": "0" * 64}}]}, "uploaded no file with sha256"),
        ({"sets": [{"prompt": "a"}]}, "is not a parameter"),
        ({"grid": {"$prompt": [str(n) for n in range(50)], "$width": list(range(21))}}, "makes 1050"),
        ({"sets": [{}] * 1001}, "at most 1000"),
        ({"sets": []}, "non-empty list"),
        ({"grid": {"$prompt": []}}, "non-empty list"),
        ({"grid": {}, "sets": [{}]}, "one of them"),
        ({"sets": [{}], "name": "x"}, "unknown field 'name'"),
        ({"sets": [{}], "priority": 6}, "between 0 and 5 on the pro tier"),
        ({"sets": [{}], "priority": None}, "priority must be a whole number"),
        ({"sets": [{}], "timeout_s": "60"}, "timeout_s must be a whole number"),
        ({"sets": [{}], "correlation_id": "a\x00b"}, "NUL"),
        ({"sets": [{"$prompt": "a\x00b"}]}, "NUL"),
        ({"sets": [{"$prompt": ["a"]}]}, "must be a string, a number or true/false"),
        ([1], "one object"),
    ]
    for body, message in refused:
        status, answer = await cp.request("POST", path, json=body)
        assert status == 400 and message in answer["message"], (body, answer)
    status, answer = await cp.request("POST", path, data=aiohttp.FormData({"$prompt": "x"}))
    assert status == 400 and "JSON object" in answer["message"], answer
    status, answer = await cp.request("POST", path, json={"sets": [{}]}, account="bob")
    assert status == 404, answer
    assert await _total(cp) == 1  # only the original: no refused sweep left anything


async def test_the_daily_limit_counts_every_workflow_of_a_sweep(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    tiers = {"free": Tier("free", max_parameters=2, max_workflows_per_day=4)}
    runner, base, app, settings = await start_control_plane(tmp_path, tiers=tiers)
    try:
        cp = ControlPlane(base, settings, app, runner, http)
        await cp.create_runner()
        original = await _original(cp)
        status, answer = await _sweep(cp, original["id"], {"sets": [{}] * 4})
        assert (status, answer["message"]) == (
            403,
            "this sweep makes 4 workflows; the free tier allows 4 a day and 3 are left",
        )
        assert await _total(cp) == 1
        status, answer = await _sweep(cp, original["id"], {"grid": {"$prompt": ["a", "b", "c"]}})
        assert status == 201 and answer["total"] == 3, answer
        status, answer = await _sweep(cp, original["id"], {"sets": [{}]})
        assert (status, answer["message"]) == (403, "workflow limit of the free tier reached (4 a day)")
    finally:
        await runner.cleanup()


async def test_cancelling_a_sweep_cancels_what_has_not_finished_and_keeps_what_has(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()
    await start_agent(cp.base, runner["token"], sim)
    original = await _original(cp)
    status, sweep = await _sweep(cp, original["id"], {"sets": [{"$prompt": str(n)} for n in range(6)]})
    assert status == 201, sweep
    first = sweep["workflows"][0]["id"]
    await cp.wait_for_status(first, {"completed"})

    status, after = await cp.request("POST", f"/v1/sweep/{sweep['sweep_id']}/cancel")
    assert status == 200, after
    counts = after["counts"]
    assert set(counts) <= {"completed", "cancelled"} and sum(counts.values()) == 6, counts
    assert (
        after["cancelled_now"] == counts.get("cancelled", 0)
        and after["workflows"][0]["status"] == "completed"
    )
    status, again = await cp.request("POST", f"/v1/sweep/{sweep['sweep_id']}/cancel")
    assert (status, again["cancelled_now"], again["counts"]) == (200, 0, counts)

    for path in (f"/v1/sweep/{sweep['sweep_id']}", "/v1/sweep/no-such-sweep"):
        status, answer = await cp.request("GET", path, account="bob")
        assert status == 404 and "not found" in answer["message"], answer
    status, answer = await cp.request("POST", f"/v1/sweep/{sweep['sweep_id']}/cancel", account="bob")
    assert status == 404, answer
