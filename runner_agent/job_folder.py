"""What the agent keeps on disk about each job, so that neither its own restart nor the
control plane's loses a result or runs a finished job again.

One folder per job under ``<data_dir>/jobs/<workflow_id>-<attempt>/``::

    inputs/        the job's input files, downloaded from the control plane; removed once
                   they are on ComfyUI
    job.json       written just before the prompt is posted: the job as received, the prompt
                   as posted, its prompt id, the ComfyUI instance and the values it used. A
                   restarted agent follows that prompt to its end instead of dropping it.
    outputs/N.bin  the outputs, copied from ComfyUI, while they are uploaded
    result.json    what those output files are (node, kind, name, type, sha256, size); a
                   restarted agent uploads them from here, even if ComfyUI lost its history
    final.json     the job's last report (``job_done`` or a final ``job_update``), written
                   before it is sent; the output files are removed then

The folder goes when the control plane acknowledges the last report (``job_ack``), drops the
job, or when the job ends without a report (abandoned, superseded). It is bounded: output
files exist only while a job uploads them (one job per slot), and what waits for an
acknowledgement is a small JSON file per finished job; folders older than ``keep_s`` are
removed at start whatever they hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from protocol.messages import Job, JobDone, JobUpdate, parse_message
from runner_agent.files import safe_filename

log = logging.getLogger(__name__)

JobKey = tuple[str, int]
FinalReport = JobDone | JobUpdate


@dataclass(frozen=True)
class SavedOutput:
    """One output file copied from ComfyUI, waiting in the folder to be uploaded."""

    node_id: str
    kind: str
    filename: str
    content_type: str
    sha256: str
    size_bytes: int
    path: str  # relative to the job folder
    # Where ComfyUI keeps it (its history's subfolder and type): removed from there once
    # the job is acknowledged, when the agent knows ComfyUI's folder.
    subfolder: str = ""
    folder_type: str = "output"

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class SavedResult:
    outputs: list[SavedOutput]
    texts: dict[str, list[str]]


@dataclass(frozen=True)
class SavedPrompt:
    """A prompt as it was posted: enough to follow it again after a restart."""

    prompt_id: str
    instance_url: str
    prompt: dict[str, Any]


@dataclass
class SavedJob:
    """What a folder held when the agent started."""

    folder: JobFolder
    job: Job
    prompt: SavedPrompt
    result: SavedResult | None = None
    final: FinalReport | None = None


class JobFolder:
    def __init__(self, root: Path, workflow_id: str, attempt: int) -> None:
        self.key: JobKey = (workflow_id, attempt)
        self.path = root / safe_filename(f"{workflow_id}-{attempt}")

    @property
    def inputs(self) -> Path:
        return self.path / "inputs"

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    async def save_prompt(self, job: Job, saved: SavedPrompt) -> None:
        record = {
            "job": job.model_dump(mode="json"),
            "prompt_id": saved.prompt_id,
            "instance_url": saved.instance_url,
            "prompt": saved.prompt,
        }
        await asyncio.to_thread(_write_json, self.path / "job.json", record, durable=True)

    async def save_result(self, result: SavedResult) -> None:
        record = {"outputs": [o.to_json() for o in result.outputs], "texts": result.texts}
        await asyncio.to_thread(_write_json, self.path / "result.json", record)

    async def save_final(self, report: FinalReport) -> None:
        def save() -> None:
            _write_json(self.path / "final.json", report.model_dump(mode="json"))
            shutil.rmtree(self.outputs, True)

        await asyncio.to_thread(save)

    async def drop_inputs(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.inputs, True)

    async def saved_outputs(self) -> list[SavedOutput]:
        """The outputs ``result.json`` lists (none when the job made none or never finished)."""
        try:
            result = await asyncio.to_thread(_read_json, self.path / "result.json")
            return [SavedOutput(**o) for o in result["outputs"]] if result is not None else []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: result.json cannot be read: %s", self.path.name, exc)
            return []

    async def remove(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.path, True)


def _write_json(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    """Write through a temporary name, so a crash of the agent leaves the old file or the new
    one. Only ``durable`` files are synced to disk as well: ``job.json`` says a prompt was
    posted, and is written while the go-ahead is on its way. The later files are on the path
    of every job's end, and a host that loses them in a power cut has lost its ComfyUI's
    outputs and history with them: the job runs again either way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    with partial.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(data))  # one write: json.dump writes each token on its own
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    partial.replace(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _load_one(root: Path, path: Path) -> SavedJob | None:
    """A folder's contents, or ``None`` when it holds nothing worth resuming (the job had not
    posted its prompt yet: the control plane runs it again)."""
    record = _read_json(path / "job.json")
    if record is None:
        return None
    job = Job.model_validate(record["job"])
    folder = JobFolder(root, job.workflow_id, job.attempt)
    if folder.path != path:
        raise ValueError("the folder's name does not match its job")
    prompt = SavedPrompt(
        prompt_id=str(record["prompt_id"]),
        instance_url=str(record["instance_url"]),
        prompt=dict(record["prompt"]),
    )
    saved = SavedJob(folder, job, prompt)
    result = _read_json(path / "result.json")
    if result is not None:
        saved.result = SavedResult(
            outputs=[SavedOutput(**o) for o in result["outputs"]],
            texts={str(k): [str(t) for t in v] for k, v in result["texts"].items()},
        )
    final = _read_json(path / "final.json")
    if final is not None:
        message = parse_message(json.dumps(final))
        if not isinstance(message, JobDone | JobUpdate):
            raise ValueError("final.json is not a job report")
        saved.final = message
    return saved


def load_saved_jobs(root: Path, keep_s: float) -> list[SavedJob]:
    """Every job folder under ``root`` worth resuming; the others are removed. Blocking: call
    it off the event loop."""
    found: list[SavedJob] = []
    if not root.is_dir():
        return found
    now = time.time()
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        try:
            saved = None if now - path.stat().st_mtime > keep_s else _load_one(root, path)
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning("job folder %s cannot be read, removing it: %s", path.name, exc)
            saved = None
        if saved is None:
            shutil.rmtree(path, ignore_errors=True)
        else:
            found.append(saved)
    return found
