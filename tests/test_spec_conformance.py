"""The spec and the server agree: schemathesis generates over a thousand requests from
/openapi.json (valid and invalid, every check: no server error, every status and content type
declared, answers that fit their schemas, invalid input refused, valid input accepted, auth
not ignored) against ``comfyfleet serve`` as a process of its own, on SQLite and PostgreSQL,
with a fixed seed. Nothing may fail."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from comfyfleet import processes
from comfyfleet.admin import create_token
from control_plane.settings import Settings
from protocol.capacity import Capacity
from protocol.messages import ComfyUIInfo, Hello, JobDone, JobUpdate, Ready, dump_message
from tests.test_e2e import curl_form
from tests.test_faults import SLOW

pytestmark = pytest.mark.timeout(600)
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 18


async def make_objects(base: str, client: dict[str, str], http: aiohttp.ClientSession) -> dict[str, str]:
    """A completed workflow with an output (through a hand-rolled agent), a runner that stays
    offline, one to delete, a template, a sweep, a cancelled workflow to delete, two webhooks
    (one to delete): what the generated requests act on."""
    async with http.post(f"{base}/v1/runner", json={"name": "main"}, headers=client) as resp:
        runner = await resp.json()
    async with http.post(f"{base}/v1/runner", json={"name": "doomed"}, headers=client) as resp:
        doomed = await resp.json()
    form = aiohttp.FormData()
    form.add_field("name", "t")
    form.add_field("body", json.dumps(SLOW), filename="b.json")
    async with http.post(f"{base}/v1/template", data=form, headers=client) as resp:
        template = await resp.json()
    url = base.replace("http", "ws") + "/v1/agent/connect"
    async with connect(url, additional_headers={"Authorization": f"Bearer {runner['token']}"}) as ws:
        hello = Hello(agent_version="t", capacity=Capacity(), comfyui=ComfyUIInfo(url="http://x"))
        await ws.send(dump_message(hello))
        await ws.recv()
        await ws.send(dump_message(Ready(free_slots=1)))
        async with http.post(f"{base}/v1/workflow", data=curl_form(SLOW), headers=client) as resp:
            wf = await resp.json()
        while json.loads(await ws.recv())["type"] != "job":
            pass
        await ws.send(dump_message(JobUpdate(workflow_id=wf["id"], attempt=1, status="uploaded")))
        png = b"\x89PNG\r\n\x1a\n" + b"0" * 100
        upload = f"{base}/v1/agent/jobs/{wf['id']}/outputs?attempt=1&node_id=3&filename=f.png&kind=images"
        headers = {
            "Authorization": f"Bearer {runner['token']}",
            "Content-Type": "image/png",
            "X-Content-SHA256": hashlib.sha256(png).hexdigest(),
        }
        async with http.put(upload, data=png, headers=headers) as resp:
            output = await resp.json()
        await ws.send(dump_message(JobDone(workflow_id=wf["id"], attempt=1)))
        while json.loads(await ws.recv())["type"] != "job_ack":
            pass
    async with http.post(f"{base}/v1/workflow/{wf['id']}/sweep", json={"sets": [{}]}, headers=client) as resp:
        sweep = await resp.json()
    async with http.post(f"{base}/v1/workflow", data=curl_form(SLOW), headers=client) as resp:
        doomed_wf = await resp.json()
    async with http.post(f"{base}/v1/workflow/{doomed_wf['id']}/cancel", headers=client) as resp:
        assert resp.status == 200, await resp.text()
    hooks = []
    for name in ("kept", "doomed"):
        body = {"url": f"https://{name}.example.org/hook", "events": ["workflow.completed"]}
        async with http.post(f"{base}/v1/webhook", json=body, headers=client) as resp:
            assert resp.status == 201, await resp.text()
            hooks.append(await resp.json())
    return {
        "CF_RUNNER_ID": runner["id"],
        "CF_RUNNER_TOKEN": runner["token"],
        "CF_DOOMED_RUNNER_ID": doomed["id"],
        "CF_TEMPLATE_ID": template["id"],
        "CF_WORKFLOW_ID": wf["id"],
        "CF_OUTPUT_ID": output["output_id"],
        "CF_SWEEP_ID": sweep["sweep_id"],
        "CF_DOOMED_WORKFLOW_ID": doomed_wf["id"],
        "CF_WEBHOOK_ID": hooks[0]["id"],
        "CF_DOOMED_WEBHOOK_ID": hooks[1]["id"],
    }


async def test_schemathesis_finds_no_disagreement_between_the_spec_and_the_server(
    tmp_path: Path, database_url: str, http: aiohttp.ClientSession
) -> None:
    root = tmp_path / "cp"
    settings = Settings(data_dir=root, database_url=database_url).validate()
    client = {"Authorization": f"Bearer {await create_token(settings, 'acme', 'enterprise', 'client', None)}"}
    operator = await create_token(settings, "acme", "enterprise", "operator", None)
    port = processes.free_port()
    base = f"http://127.0.0.1:{port}"
    # Generated $file URLs name hosts that do not exist: a short time for each to fail.
    served = processes.control_plane(
        root, port, database_url=database_url, settings={"input_fetch_timeout_s": "2"}
    )
    await served.start()
    try:
        await processes.wait_until_answers(f"{base}/healthz")
        env: dict[str, Any] = await make_objects(base, client, http)
        env["CF_OPERATOR_TOKEN"] = operator
        report = tmp_path / "report.json"
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{base}/openapi.json",
            "--checks",
            "all",
            "--seed",
            "7",
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--header",
            client["Authorization"].join(("Authorization: ", "")),
            "--no-color",
            "--report",
            "json",
            "--report-json-path",
            str(report),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=tmp_path,
        )
        out, _ = await proc.communicate()
        # The workflow the other operations act on outlived the run (deletes took their own).
        async with http.get(f"{base}/v1/workflow/{env['CF_WORKFLOW_ID']}", headers=client) as resp:
            kept = resp.status
    finally:
        await served.stop()
    text = out.decode()
    result = json.loads(report.read_text())
    print(f"schemathesis: {result['test_cases']['generated']} cases generated")
    assert result["test_cases"]["generated"] >= 1000, text[-3000:]
    assert result["failures"] == [] and result["errors"] == [], text[-6000:]
    assert proc.returncode == 0, text[-3000:]
    assert kept == 200
