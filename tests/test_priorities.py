"""Priorities: waiting workflows go to runners highest priority first, then oldest first,
and ``queue_number`` says so; a priority is bounded by the account's tier."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import AgentFactory, ControlPlane, png_bytes
from tests.test_e2e import WORKFLOW, curl_form


def _form(**fields: str) -> aiohttp.FormData:
    return curl_form(WORKFLOW, **{"$prompt": "x", "$input_image": png_bytes((1, 2, 3)), **fields})


async def _submit(cp: ControlPlane, account: str = "alice", **fields: str) -> dict[str, Any]:
    status, body = await cp.request("POST", "/v1/workflow", account=account, data=_form(**fields))
    assert status == 201, body
    return body  # type: ignore[no-any-return]


async def _queue_numbers(cp: ControlPlane, ids: list[str]) -> list[int | None]:
    numbers = []
    for wf_id in ids:
        status, body = await cp.request("GET", f"/v1/workflow/{wf_id}")
        assert status == 200, body
        numbers.append(body["queue_number"])
    return numbers


async def test_waiting_workflows_run_highest_priority_first_then_oldest_first(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner()  # not connected yet: everything waits
    low_1 = await _submit(cp)
    high_1 = await _submit(cp, priority="1")
    low_2 = await _submit(cp, priority="0")
    high_2 = await _submit(cp, priority="1")
    assert [high_1["priority"], low_1["priority"]] == [1, 0]
    submitted = [low_1["id"], high_1["id"], low_2["id"], high_2["id"]]
    in_turn = [high_1["id"], high_2["id"], low_1["id"], low_2["id"]]
    assert await _queue_numbers(cp, in_turn) == [1, 2, 3, 4]

    await start_agent(cp.base, runner["token"], sim)  # one runner: one job at a time
    done = [await cp.wait_for_status(wf_id, {"completed"}) for wf_id in submitted]
    started = sorted(done, key=lambda wf: wf["started_at"])
    assert [wf["id"] for wf in started] == in_turn


async def test_a_priority_past_the_tier_or_not_a_number_is_refused_with_the_range(cp: ControlPlane) -> None:
    await cp.create_runner()
    refused = (("2", "between 0 and 1 on the free tier"), ("-1", "between 0 and 1"), ("high", "whole number"))
    for value, message in refused:
        status, body = await cp.request("POST", "/v1/workflow", data=_form(priority=value))
        assert status == 400, body
        assert message in body["message"], body
    status, body = await cp.request("GET", "/v1/workflow")
    assert status == 200 and body["workflows"] == []  # nothing was made of them

    await cp.token("bob", tier="pro")
    await cp.create_runner(account="bob")
    assert (await _submit(cp, account="bob", priority="5"))["priority"] == 5


async def test_a_rerun_keeps_its_originals_priority_unless_it_asks_for_another(cp: ControlPlane) -> None:
    await cp.create_runner()
    original = await _submit(cp, priority="1")
    for fields, expected in (({}, 1), ({"priority": "0"}, 0)):
        data = aiohttp.FormData({"$prompt": "y", **fields})
        status, body = await cp.request("POST", f"/v1/workflow/{original['id']}/rerun", data=data)
        assert status == 201, body
        assert body["priority"] == expected
