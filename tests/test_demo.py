"""``comfyfleet demo``, the main job, as a newcomer runs it: the sample workflow runs to its
output, and what is printed says how to go on (tokens, the dashboard, a download that
works), and how it stopped."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from comfyfleet.processes import free_port


async def _demo(tmp_path: Path, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "comfyfleet",
        "demo",
        "--port",
        str(free_port()),
        "--simulator-port",
        str(free_port()),
        "--data-dir",
        str(tmp_path / "demo"),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_the_demo_runs_the_sample_and_says_how_to_go_on(tmp_path: Path) -> None:
    proc = await _demo(tmp_path, "--exit-after-run")
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "finished: completed" in text and "operator token    cf_" in text
    assert "/dashboard (sign in with the operator token)" in text
    assert "curl -OJ -H 'Authorization: Bearer cf_" in text  # the output, fetched with its token
    assert text.rstrip().endswith("stopped (--exit-after-run)")
    assert "try it yourself" not in text  # nothing is left running to try
    saved = list((tmp_path / "demo" / "outputs").glob("*.png"))
    assert len(saved) == 1 and saved[0].stat().st_size > 0


async def test_ctrl_c_stops_the_demo_and_says_so(tmp_path: Path) -> None:
    proc = await _demo(tmp_path)
    assert proc.stdout is not None
    told: list[str] = []
    async with asyncio.timeout(120):
        while not told or "Ctrl-C to stop" not in told[-1]:
            line = await proc.stdout.readline()
            assert line, "".join(told)
            told.append(line.decode())
    assert any("try it yourself, while this runs" in line for line in told)
    proc.send_signal(signal.SIGINT)
    rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert "stopping the agent, the control plane and the simulator" in rest.decode()
    assert "stopped; what it made is kept under" in rest.decode()
