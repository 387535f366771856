"""A job's files in its ComfyUI's own folders: the inputs the agent put there and the
outputs ComfyUI saved. With ``comfyui_dirs`` (``--comfyui-dir``, ComfyUI on the same host)
they are removed once the control plane has acknowledged the job's last report, when
nothing of them is needed any more; without it they stay (ComfyUI has no endpoint that
deletes a file).

Only what the job itself made goes: its workflow's input subfolder (kept while another
attempt of the same workflow runs here, which uses it) and the output files its history
named, each checked to lie inside ComfyUI's ``output`` or ``temp`` folder.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from runner_agent.files import safe_filename
from runner_agent.job_folder import SavedOutput

log = logging.getLogger(__name__)

# ComfyUI's input folder gets one subfolder per workflow so that jobs never collide.
INPUT_SUBFOLDER = "comfyfleet"
# Where ComfyUI saves what a node makes; an output of type "input" is someone's input file.
_OUTPUT_TYPES = ("output", "temp")


def input_subfolder(workflow_id: str) -> str:
    return f"{INPUT_SUBFOLDER}/{safe_filename(workflow_id)}"


def output_paths(comfyui_dir: Path, outputs: list[SavedOutput]) -> list[Path]:
    """The files on disk that ComfyUI's history named as the job's outputs; a name that
    would lead outside its folder is left alone."""
    found = []
    for output in outputs:
        if output.folder_type not in _OUTPUT_TYPES:
            continue
        folder = (comfyui_dir / output.folder_type).resolve()
        path = (folder / output.subfolder / output.filename).resolve()
        if path.is_relative_to(folder) and path != folder:
            found.append(path)
    return found


async def remove_job_files(
    comfyui_dir: Path, workflow_id: str, outputs: list[SavedOutput], *, inputs: bool
) -> int:
    """Remove the job's output files (and, with ``inputs``, its input subfolder) from
    ComfyUI's folders; returns how many files went."""

    def remove() -> int:
        removed = 0
        for path in output_paths(comfyui_dir.resolve(), outputs):
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        folder = comfyui_dir / "input" / input_subfolder(workflow_id)
        if inputs and folder.is_dir():
            removed += sum(1 for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
        return removed

    try:
        return await asyncio.to_thread(remove)
    except OSError as exc:
        # A file that cannot go (permissions) costs disk, not the job.
        log.warning("workflow %s: could not remove its files from %s: %s", workflow_id, comfyui_dir, exc)
        return 0
