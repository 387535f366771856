"""Every write on behalf of a runner goes through one fence: the runner must hold the
workflow's current attempt, and the workflow must not have finished. Reports and uploads that
arrive after the attempt ended (cancelled, replaced by a rerun) change nothing a client sees."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from protocol.messages import JobDone, JobUpdate, Ready, dump_message
from tests.conftest import ControlPlane
from tests.test_faults import bare_agent, next_of
from tests.test_hostile_input import submit_slow


async def test_an_output_whose_attempt_ends_mid_upload_is_refused_and_not_kept(cp: ControlPlane) -> None:
    ws, runner = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit_slow(cp)
        await next_of(ws, "job")
        payload = b"\x89PNG" + b"x" * 300_000
        first_part_read = asyncio.Event()
        cancelled = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield payload[:1000]
            first_part_read.set()
            await cancelled.wait()  # the rest comes only after the workflow was cancelled
            yield payload[1000:]

        headers = {
            "Authorization": f"Bearer {runner['token']}",
            "X-Content-SHA256": hashlib.sha256(payload).hexdigest(),
        }
        url = f"/v1/agent/jobs/{wf}/outputs?attempt=1&node_id=3&filename=late.png"
        upload = asyncio.create_task(cp.request("PUT", url, headers=headers, data=body()))
        await asyncio.wait_for(first_part_read.wait(), 10)
        status, _ = await cp.request("POST", f"/v1/workflow/{wf}/cancel")
        assert status == 200
        cancelled.set()
        status, answer = await upload
        assert status == 409 and "ended while its output was uploaded" in answer["message"]
        status, outputs = await cp.request("GET", f"/v1/workflow/{wf}/outputs")
        assert status == 200 and outputs["outputs"] == []
        assert not cp.services.blobs.path(hashlib.sha256(payload).hexdigest()).exists()
    finally:
        await ws.close()


async def test_reports_of_an_attempt_that_ended_change_nothing(cp: ControlPlane) -> None:
    ws, _ = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit_slow(cp)
        await next_of(ws, "job")
        status, _ = await cp.request("POST", f"/v1/workflow/{wf}/cancel")
        assert status == 200
        await next_of(ws, "cancel")
        # The runner had already finished: its last reports arrive after the cancel.
        await ws.send(
            dump_message(
                JobUpdate(
                    workflow_id=wf,
                    attempt=1,
                    status="running",
                    resolved_params={"values": {}, "random": {"1.seed": 7}},
                )
            )
        )
        await ws.send(dump_message(JobDone(workflow_id=wf, attempt=1, texts={"9": ["too late"]})))
        ack = await next_of(ws, "job_ack")
        assert (ack["workflow_id"], ack["attempt"]) == (wf, 1)
        status, body = await cp.request("GET", f"/v1/workflow/{wf}")
        assert status == 200 and body["status"] == "cancelled"
        assert "texts" not in body["workflow_params"] and "resolved" not in body["workflow_params"]
    finally:
        await ws.close()
