"""Large files go through object storage without the control plane holding them: a 50 MB
input and a 50 MB output through ``comfyfleet serve`` on the S3 path, its peak resident
memory measured by the kernel (VmHWM, reset just before)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

from comfyfleet.admin import create_token
from comfyfleet.processes import control_plane, free_port, wait_until_answers
from control_plane.settings import Settings
from tests.conftest import AgentFactory
from tests.s3_server import S3Server

BIG_WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "$file(image)"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "big"}},
}
MiB = 1024**2


def noise_png(side: int) -> bytes:
    """A PNG that does not compress: about side² × 3 bytes."""
    pixels = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (proc(5), clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")


async def _run(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], image: bytes
) -> dict[str, object]:
    form = aiohttp.FormData()
    form.add_field(
        "workflow_json", json.dumps(BIG_WORKFLOW), filename="w.json", content_type="application/json"
    )
    form.add_field("$image", image, filename="in.png", content_type="image/png")
    async with http.post(f"{base}/v1/workflow", data=form, headers=headers) as resp:
        wf = await resp.json()
        assert resp.status == 201, wf
    async with http.get(f"{base}/v1/workflow/{wf['id']}/subscribe", headers=headers) as resp:
        async for line in resp.content:
            if line.startswith(b"data:") and json.loads(line[5:]).get("status") in ("completed", "failed"):
                break
    async with http.get(f"{base}/v1/workflow/{wf['id']}/outputs", headers=headers) as resp:
        listing = await resp.json()
    async with http.get(f"{base}/v1/workflow/{wf['id']}", headers=headers) as resp:
        done = await resp.json()
    assert done["status"] == "completed", done
    (output,) = listing["outputs"]
    return output  # type: ignore[no-any-return]


async def test_50_mb_in_and_out_through_s3_grow_the_serve_process_by_at_most_16_mib(
    tmp_path: Path, s3_server: S3Server, sim: str, start_agent: AgentFactory
) -> None:
    root, port = tmp_path / "cp", free_port()
    token = await create_token(Settings(data_dir=root), "alice", "pro", "client", None)
    bucket = await s3_server.new_bucket()
    serve = control_plane(root, port, settings={"blob_url": f"s3://{bucket}/big"})
    serve.env.update(s3_server.env)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    await serve.start()
    try:
        await wait_until_answers(base + "/healthz")
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/runner", json={"name": "r1"}, headers=headers) as resp:
                runner = await resp.json()
                assert resp.status == 201, runner
            await start_agent(base, runner["token"], sim)
            # Every code path once, small: what it imports and caches is not what is measured.
            await _run(http, base, headers, noise_png(64))

            big = noise_png(4096)
            assert len(big) >= 50_000_000
            assert serve.pid is not None
            before = memory_kib(serve.pid)["VmRSS"]
            reset_peak(serve.pid)
            output = await _run(http, base, headers, big)
            peak = memory_kib(serve.pid)["VmHWM"]

            assert output["size"] >= 50_000_000
            # The client fetches it from the store itself, by the presigned URL it is sent to.
            async with http.get(f"{base}{output['src']}", headers=headers) as resp:
                digest = hashlib.sha256()
                async for chunk in resp.content.iter_chunked(MiB):
                    digest.update(chunk)
                assert resp.status == 200
                assert resp.url.port == s3_server.port
            assert digest.hexdigest() == output["sha256"]
        growth_mib = (peak - before) / 1024
        print(f"serve RSS {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB: +{growth_mib:.1f} MiB")
        assert growth_mib <= 16
    finally:
        await serve.stop()
