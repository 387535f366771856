"""Text outputs (ComfyUI's ``text`` entries) are outputs like files: listed with the workflow's
outputs, downloadable, and recorded once however often the runner says them."""

from __future__ import annotations

from protocol.messages import JobDone, JobUpdate, Ready, dump_message
from tests.conftest import ControlPlane
from tests.test_faults import bare_agent, next_of
from tests.test_hostile_input import submit_slow


async def test_text_outputs_are_listed_and_downloaded_like_files(cp: ControlPlane) -> None:
    ws, _ = await bare_agent(cp, "hand")
    try:
        await ws.send(dump_message(Ready(free_slots=1)))
        wf = await submit_slow(cp)
        await next_of(ws, "job")
        await ws.send(dump_message(JobUpdate(workflow_id=wf, attempt=1, status="uploaded")))
        await next_of(ws, "proceed")
        done = JobDone(workflow_id=wf, attempt=1, texts={"9": ["a red fox", "42"]})
        await ws.send(dump_message(done))
        await next_of(ws, "job_ack")
        # Said again (an agent that did not hear the ack): nothing is recorded twice.
        await ws.send(dump_message(done))
        await next_of(ws, "job_ack")
        status, body = await cp.request("GET", f"/v1/workflow/{wf}/outputs")
        assert status == 200
        texts = [o for o in body["outputs"] if o["kind"] == "text"]
        assert [(o["node_id"], o["filename"], o["content_type"]) for o in texts] == [
            ("9", "9_0.txt", "text/plain; charset=utf-8"),
            ("9", "9_1.txt", "text/plain; charset=utf-8"),
        ]
        contents = []
        for out in texts:
            async with cp.http.get(cp.base + out["src"], headers=await cp.headers()) as resp:
                assert resp.status == 200
                contents.append(await resp.text())
        assert contents == ["a red fox", "42"]
        status, workflow = await cp.request("GET", f"/v1/workflow/{wf}")
        assert workflow["status"] == "completed" and "texts" not in workflow["workflow_params"]
    finally:
        await ws.close()
