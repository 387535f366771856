"""The README's walk-through runs as written: its marked shell blocks, in order, in one
shell, from a fresh folder, against a control plane, simulator and agent started by the
blocks themselves (on ports of their own: the only change made to them)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- readme-walkthrough -->\n```sh\n"


def walkthrough() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = []
    for piece in text.split(MARK)[1:]:
        blocks.append(piece[: piece.index("\n```\n")])
    return blocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_readmes_walkthrough_runs_as_written(tmp_path: Path) -> None:
    blocks = walkthrough()
    assert len(blocks) >= 5, "the README lost its walk-through marks"
    script = "\n".join(blocks).replace("8080", str(free_port())).replace("8288", str(free_port()))
    # A fresh folder with what a clone has that the blocks use: the samples and the venv.
    (tmp_path / "comfyfleet").mkdir()
    (tmp_path / "comfyfleet" / "samples").symlink_to(ROOT / "comfyfleet" / "samples")
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYFLEET_")}
    env |= {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    # What the blocks start in the background stops with the shell.
    prelude = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n"
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        prelude + script,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    told = out.decode(errors="replace")
    assert proc.returncode == 0, told[-4000:]
    assert '"status": "completed"' in told  # the stream followed the sample to its end
    assert (tmp_path / "fox_00001_.png").stat().st_size > 0  # the download, with its name
    saved = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert any(name.startswith("cli-fox") for name in saved), saved
