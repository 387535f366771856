"""``comfyfleet demo``: the control plane, the ComfyUI simulator and one runner agent in one
process (each on its own real socket), an account and a token, and the sample workflow
submitted and followed to its output. Everything stays up until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from comfyfleet import logs
from comfyfleet.admin import create_token
from comfyui_sim import SimSettings, start_simulator
from control_plane.app import create_app
from control_plane.settings import load_settings
from runner_agent.agent import Agent
from runner_agent.config import AgentSettings


def sample_workflow() -> bytes:
    return resources.files("comfyfleet").joinpath("samples/invert_scale.json").read_bytes()


def sample_image() -> bytes:
    """A 64×64 gradient (red left to right, green top to bottom), shipped beside the sample."""
    return resources.files("comfyfleet").joinpath("samples/gradient.png").read_bytes()


async def submit_sample(http: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("name", "demo: invert and scale")
    form.add_field("tags", "demo")
    form.add_field(
        "workflow_json", sample_workflow(), filename="invert_scale.json", content_type="application/json"
    )
    form.add_field("$input_image", sample_image(), filename="gradient.png", content_type="image/png")
    form.add_field("$prefix", "demo")
    form.add_field("$width", "128")
    form.add_field("#method", "bilinear")
    async with http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
        body: dict[str, Any] = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"submit failed: {resp.status} {body}")
        return body


async def follow(http: aiohttp.ClientSession, base: str, headers: dict[str, str], wf_id: str) -> str:
    """Print each event of the workflow's SSE stream; return its final status."""
    status = "?"
    async with http.get(f"{base}/v1/workflow/{wf_id}/subscribe", headers=headers) as resp:
        event = ""
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "status":
                    status = data["status"]
                    extra = f" (queue position {data['queue_number']})" if data.get("queue_number") else ""
                    print(f"  status: {status}{extra}", flush=True)
                elif event == "node" and data["event"] in ("executing", "cached"):
                    print(
                        f"    node {data['node_id']} {data.get('class_type') or ''}: {data['event']}",
                        flush=True,
                    )
                elif event == "cause":
                    print(f"  error: {data}", flush=True)
    return status


async def forget_old_demo_runners(http: aiohttp.ClientSession, base: str, headers: dict[str, str]) -> None:
    """A demo run on the same data directory replaces the previous run's runner."""
    async with http.get(f"{base}/v1/runner?per_page=100", headers=headers) as r:
        runners = (await r.json())["runners"]
    for runner in runners:
        if runner["name"] == "demo-runner":
            async with http.delete(f"{base}/v1/runner/{runner['id']}", headers=headers):
                pass


async def _demo(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    settings = load_settings({"data_dir": str(data_dir / "control-plane"), "port": args.port})
    cp_runner = web.AppRunner(create_app(settings), access_log=None)
    sim_runner, sim_url = await start_simulator(
        SimSettings(data_dir=data_dir / "comfyui"), port=args.simulator_port
    )
    base = f"http://127.0.0.1:{args.port}"
    agent: Agent | None = None
    agent_task: asyncio.Task[Any] | None = None
    try:
        await cp_runner.setup()
        await web.TCPSite(cp_runner, "127.0.0.1", args.port).start()
        token = await create_token(settings, "demo", "pro", "client", None)
        operator = await create_token(settings, "demo", "pro", "operator", None)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            await forget_old_demo_runners(http, base, headers)
            async with http.post(
                f"{base}/v1/runner", json={"name": "demo-runner", "tags": ["demo"]}, headers=headers
            ) as r:
                runner = await r.json()
            agent = Agent(
                AgentSettings(
                    server_url=base,
                    token=runner["token"],
                    comfyui_url=sim_url,
                    data_dir=data_dir / "agent",
                )
            )
            agent_task = asyncio.create_task(agent.run())
            print(f"control plane     {base}", flush=True)
            print(f"ComfyUI simulator {sim_url}", flush=True)
            print(f"runner            {runner['name']} ({runner['id']}), tags {runner['tags']}", flush=True)
            print(f"client token      {token}", flush=True)
            print(f"dashboard         {base}/dashboard (sign in with the operator token)", flush=True)
            print(f"operator token    {operator}", flush=True)
            wf = await submit_sample(http, base, headers)
            print(f"submitted workflow {wf['id']} ({wf['name']})", flush=True)
            status = await follow(http, base, headers, wf["id"])
            async with http.get(f"{base}/v1/workflow/{wf['id']}/outputs", headers=headers) as r:
                outputs = (await r.json())["outputs"]
            out_dir = data_dir / "outputs"
            await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
            for out in outputs:
                async with http.get(base + out["src"], headers=headers) as r:
                    path = out_dir / f"{wf['id']}_{out['filename']}"
                    await asyncio.to_thread(path.write_bytes, await r.read())
                print(f"output {out['filename']} ({out['size']} bytes), saved to {path}", flush=True)
                # Downloads need the token, so a browser cannot open the URL by itself.
                print(f"  curl -OJ -H 'Authorization: Bearer {token}' {base}{out['src']}", flush=True)
            print(f"workflow {wf['id']} finished: {status}", flush=True)
            if args.exit_after_run:
                print("stopped (--exit-after-run)", flush=True)
                return 0 if status == "completed" else 1
            print("\ntry it yourself, while this runs:", flush=True)
            print(f"  curl -H 'Authorization: Bearer {token}' {base}/v1/workflow/{wf['id']}", flush=True)
            print(f"  open {base}/dashboard and sign in with the operator token", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)  # before saying so: Ctrl-C may come at once
            print("\neverything keeps running; Ctrl-C to stop", flush=True)
            await stop.wait()
            print("\nstopping the agent, the control plane and the simulator ...", flush=True)
            return 0
    finally:
        if agent is not None:
            await agent.stop()
        if agent_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(agent_task, 10)
        await cp_runner.cleanup()
        await sim_runner.cleanup()
        if not args.exit_after_run:
            print(f"stopped; what it made is kept under {data_dir}", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    logs.configure(level="WARNING")
    args.data_dir = str(Path(args.data_dir).resolve())
    try:
        return asyncio.run(_demo(args))
    except KeyboardInterrupt:  # Ctrl-C before the sample finished
        print("\ninterrupted; stopped", flush=True)
        return 130
