"""Scheduling across several runners and runners that vanish."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyui_sim import SimSettings, start_simulator
from control_plane.fleet.capabilities import Needs, Offers, can_run, missing
from runner_agent.capacity import NvmlProbe
from tests.conftest import AgentFactory, ControlPlane, png_bytes
from tests.fake_nvml import FakeNvml, h100
from tests.test_e2e import curl_form


def workflow(
    ckpt: str | None = "$choice(ckpt, sdxl.safetensors, flux.safetensors)", blur: bool = False
) -> dict[str, Any]:
    nodes: dict[str, Any] = {
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "s"}},
    }
    if ckpt is not None:
        nodes["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
    if blur:
        nodes["4"] = {
            "class_type": "ImageBlur",
            "inputs": {"image": ["2", 0], "blur_radius": 1, "sigma": 1.0},
        }
        nodes["3"]["inputs"]["images"] = ["4", 0]
    return nodes


async def start_sim(
    tmp_path: Path, name: str, checkpoints: list[str], hidden: set[str] | None = None
) -> tuple[Any, str]:
    root = tmp_path / name
    (root / "models" / "checkpoints").mkdir(parents=True)
    for ckpt in checkpoints:
        (root / "models" / "checkpoints" / ckpt).write_bytes(b"")
    return await start_simulator(SimSettings(data_dir=root, hidden_nodes=hidden or set()), port=0)


@pytest.fixture
async def three(cp: ControlPlane, tmp_path: Path, start_agent: AgentFactory) -> Any:
    """A: tag sdxl, has sdxl, one idle H100; B: tag flux, has flux but no ImageBlur, two
    idle H100s; C: untagged, has both checkpoints, no GPU driver (ComfyUI's devices)."""
    sims = [
        await start_sim(tmp_path, "a", ["sdxl.safetensors"]),
        await start_sim(tmp_path, "b", ["flux.safetensors"], {"ImageBlur"}),
        await start_sim(tmp_path, "c", ["sdxl.safetensors", "flux.safetensors"]),
    ]
    runners: dict[str, Any] = {"sims": {}}
    gpus = {"A": [h100(0, 0, 1, 35, 70)], "B": [h100(0, 5, 2, 40, 90), h100(1, 5, 2, 41, 92)], "C": None}
    for (_, url), (name, tags) in zip(sims, (("A", ["sdxl"]), ("B", ["flux"]), ("C", [])), strict=True):
        runner = await cp.create_runner(name=name, tags=tags)
        fake = gpus[name]
        await start_agent(cp.base, runner["token"], url, nvml=NvmlProbe(FakeNvml(fake)) if fake else None)
        runners[name] = runner
        runners["sims"][name] = url
        # One connected after the other: ties go to the longest connected, and the tests say
        # which that is (on a busy machine a later agent could otherwise get in first).
        await cp.services.fleet.wait_for(
            lambda rid=runner["id"]: cp.services.registry.get(rid) is not None, timeout_s=10
        )
    registry = cp.services.registry
    await cp.services.fleet.wait_for(
        lambda: len(registry.all()) == 3 and all(c.free_slots > 0 for c in registry.all()), timeout_s=10
    )
    yield runners
    for sim_runner, _ in sims:
        await sim_runner.cleanup()


async def run(cp: ControlPlane, wf: dict[str, Any], tags: str = "", **fields: str) -> dict[str, Any]:
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(wf, tags=tags, **fields))
    assert status == 201, body
    done = await cp.wait_for_status(body["id"], {"completed", "failed", "invalid"})
    assert done["status"] == "completed", done
    return done


async def test_each_runner_reports_its_own_gpus(cp: ControlPlane, three: dict[str, Any]) -> None:
    runners = {}
    for name in ("A", "B", "C"):
        _, runners[name] = await cp.request("GET", f"/v1/runner/{three[name]['id']}")
    assert [g["utilization_pct"] for g in runners["A"]["capacity"]["gpus"]] == [0]
    assert [g["index"] for g in runners["B"]["capacity"]["gpus"]] == [0, 1]
    assert runners["B"]["capacity"]["gpu_source"] == "nvml"
    assert runners["C"]["capacity"]["gpu_source"] != "nvml"


async def test_each_workflow_lands_on_a_runner_that_can_run_it(
    cp: ControlPlane, three: dict[str, Any]
) -> None:
    # flux + ImageBlur: B has flux but lacks ImageBlur; A lacks flux; only C can.
    done = await run(cp, workflow(blur=True), **{"#ckpt": "flux.safetensors"})
    assert done["runner_id"] == three["C"]["id"]
    # tag flux: B (tagged flux) and C (untagged) qualify; without ImageBlur both can run it.
    done = await run(cp, workflow(), tags="flux", **{"#ckpt": "flux.safetensors"})
    assert done["runner_id"] in {three["B"]["id"], three["C"]["id"]}
    # tag sdxl with the sdxl checkpoint: never B.
    done = await run(cp, workflow(), tags="sdxl", **{"#ckpt": "sdxl.safetensors"})
    assert done["runner_id"] in {three["A"]["id"], three["C"]["id"]}


async def test_warm_model_runner_wins_ties(cp: ControlPlane, three: dict[str, Any]) -> None:
    # Make C the one that last loaded sdxl: A (connected first) is disabled for that run.
    await cp.request("PUT", f"/v1/runner/{three['A']['id']}", json={"status": "disabled"})
    first = await run(cp, workflow(), **{"#ckpt": "sdxl.safetensors"})
    assert first["runner_id"] == three["C"]["id"]
    await cp.request("PUT", f"/v1/runner/{three['A']['id']}", json={"status": "active"})
    # A and C are both idle and both have sdxl; A connected earlier, C has it warm.
    second = await run(cp, workflow(), **{"#ckpt": "sdxl.safetensors"})
    assert second["runner_id"] == three["C"]["id"]
    # A model C has not loaded last goes by the other rules: A connected first.
    third = await run(cp, workflow(ckpt=None))
    assert third["runner_id"] == three["A"]["id"]


async def test_missing_model_or_node_class_is_rejected_by_name(
    cp: ControlPlane, three: dict[str, Any]
) -> None:
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(workflow(ckpt="nope.safetensors")))
    assert status == 400
    assert "models ckpt_name=nope.safetensors" in body["message"]
    wf = workflow()
    wf["9"] = {"class_type": "KSampler", "inputs": {}}
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(wf))
    assert status == 400
    assert "node classes KSampler" in body["message"]
    # flux with ImageBlur, tag flux: B is the only flux-tagged runner besides wildcard C...
    await cp.request("PUT", f"/v1/runner/{three['C']['id']}", json={"status": "disabled"})
    status, body = await cp.request(
        "POST",
        "/v1/workflow",
        data=curl_form(workflow(blur=True), tags="flux", **{"#ckpt": "flux.safetensors"}),
    )
    assert status == 400
    assert body["message"] == "no runner can run this workflow: B lacks node classes ImageBlur"


async def test_disabled_runner_finishes_its_job_and_gets_nothing_new(
    cp: ControlPlane, three: dict[str, Any], http: aiohttp.ClientSession
) -> None:
    # A's ComfyUI takes a while over EmptyImage: the job is still running when A is disabled.
    async with http.post(
        f"{three['sims']['A']}/sim/config", json={"node_delays_s": {"EmptyImage": 1.0}}
    ) as resp:
        assert resp.status == 200
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(workflow(ckpt=None)))
    assert status == 201
    first = await cp.wait_for_status(body["id"], {"running"})
    assert first["runner_id"] == three["A"]["id"]  # connected first, all idle
    await cp.request("PUT", f"/v1/runner/{three['A']['id']}", json={"status": "disabled"})
    others = [await run(cp, workflow(ckpt=None)) for _ in range(2)]
    assert all(o["runner_id"] != three["A"]["id"] for o in others)
    done = await cp.wait_for_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed"  # what it had, it finished
    assert done["runner_id"] == three["A"]["id"]


async def test_a_runner_given_new_tags_gets_the_work_they_ask_for(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner(tags=["sdxl"])
    await start_agent(cp.base, runner["token"], sim)
    assert (await run(cp, workflow(ckpt=None), tags="sdxl"))["runner_id"] == runner["id"]
    status, _ = await cp.request("PUT", f"/v1/runner/{runner['id']}", json={"tags": "flux"})
    assert status == 200
    # Connected all along, it now takes flux work and no longer sdxl work.
    assert (await run(cp, workflow(ckpt=None), tags="flux"))["runner_id"] == runner["id"]
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(workflow(ckpt=None), tags="sdxl"))
    assert status == 400 and "no runner" in body["message"], body


async def test_runner_killed_mid_job_goes_offline_and_its_job_completes_elsewhere(
    cp: ControlPlane, sim: str, tmp_path: Path, start_agent: AgentFactory, http: aiohttp.ClientSession
) -> None:
    doomed = await cp.create_runner(name="doomed")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runner_agent",
        "--server",
        cp.base,
        "--token",
        doomed["token"],
        "--comfyui",
        sim,
        "--data-dir",
        str(tmp_path / "doomed"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with http.post(f"{sim}/sim/config", json={"node_delays_s": {"LoadImage": 30}}) as resp:
            assert resp.status == 200
        wf = workflow(ckpt=None)
        wf["1"] = {"class_type": "LoadImage", "inputs": {"image": "$file(img)"}}
        wf["3"]["inputs"]["images"] = ["1", 0]
        status, body = await cp.request(
            "POST", "/v1/workflow", data=curl_form(wf, **{"$img": png_bytes((1, 2, 3))})
        )
        assert status == 201
        running = await cp.wait_for_status(body["id"], {"running"})
        assert running["runner_id"] == doomed["id"]
        operator = {"Authorization": f"Bearer {await cp.token('alice', scope='operator')}"}
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        # Offline on the dashboard within the timeout (a killed process closes its socket at
        # once; a silent one is dropped after runner_timeout_s).
        async with asyncio.timeout(cp.settings.runner_timeout_s):
            await cp.services.fleet.wait_for(lambda: cp.services.registry.get(doomed["id"]) is None, 60)
        async with http.get(f"{cp.base}/v1/dashboard", headers=operator) as resp:
            board = await resp.json()
        assert [r["online"] for r in board["runners"] if r["id"] == doomed["id"]] == [False]
        # offline at once (the socket closed); the job waits out the grace period, then moves.
        rescuer_sim_runner, rescuer_sim = await start_simulator(
            SimSettings(data_dir=tmp_path / "rescue"), port=0
        )
        try:
            rescuer = await cp.create_runner(name="rescuer")
            await start_agent(cp.base, rescuer["token"], rescuer_sim)
            done = await cp.wait_for_status(body["id"], {"completed", "failed"}, timeout_s=30)
            assert done["status"] == "completed"
            assert done["attempt"] == 2
            assert done["runner_id"] == rescuer["id"]
            _, runner = await cp.request("GET", f"/v1/runner/{doomed['id']}")
            assert runner["connected"] is False
        finally:
            await rescuer_sim_runner.cleanup()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_dispatch_and_submit_agree_on_what_a_runner_can_run() -> None:
    # Dispatch asks can_run of every free runner; submit explains with missing: one answer.
    offers = Offers(
        node_classes=frozenset({"CheckpointLoaderSimple", "SaveImage"}),
        models={"ckpt_name": frozenset({"sdxl.safetensors"})},
    )
    cases = [
        Needs(frozenset({"SaveImage"})),
        Needs(frozenset({"SaveImage", "ImageBlur"})),
        Needs(frozenset({"CheckpointLoaderSimple"}), frozenset({("ckpt_name", "sdxl.safetensors")})),
        Needs(frozenset({"CheckpointLoaderSimple"}), frozenset({("ckpt_name", "flux.safetensors")})),
        Needs(frozenset({"CheckpointLoaderSimple"}), frozenset({("vae_name", "sdxl.safetensors")})),
    ]
    assert [can_run(n, offers) for n in cases] == [not missing(n, offers) for n in cases]
    assert [can_run(n, offers) for n in cases] == [True, False, True, False, False]
    assert can_run(cases[1], None)  # a runner that never said what it has may have it all
