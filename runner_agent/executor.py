"""Running one job end to end on the local ComfyUI.

inputs downloaded and uploaded to ComfyUI (``uploaded``) → placeholders substituted →
``POST /prompt`` (``queued``) → events followed (``running``, node events, progress) →
outputs copied to the control plane → ``job_done``; or ``failed`` / ``invalid`` /
``cancelled``. Every message carries the job's attempt.

A cancel from the control plane removes a prompt still waiting in ComfyUI's queue, or
interrupts it when it is the one running, and reports ``cancelled``. An *abandon* (the
control plane dropped the job, or the agent is shutting down) does the same on ComfyUI but
reports nothing. A 409 from the control plane means a newer attempt owns the job: stop and
report nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from protocol.messages import Job, JobDone, JobError, JobStatus, JobUpdate, OutputRef
from protocol.placeholders import substitute
from runner_agent.comfy_info import ComfyUIInfoCache
from runner_agent.comfyui import (
    ComfyUIClient,
    ComfyUIError,
    ComfyUIUnavailable,
    PromptRejected,
    queue_position,
)
from runner_agent.config import AgentSettings
from runner_agent.control_files import AttemptSuperseded, ControlPlaneFiles, TransferError
from runner_agent.files import CHUNK_BYTES, guess_content_type, remove_tree, safe_filename, store_stream
from runner_agent.node_events import EventTranslator, Update, nodes_to_run
from runner_agent.outputs import OutputFile, collect_outputs
from runner_agent.prompt_watch import PromptOutcome, PromptWatch

log = logging.getLogger(__name__)

T = TypeVar("T")
JobKey = tuple[str, int]
Send = Callable[[JobUpdate | JobDone], Awaitable[None]]

# ComfyUI's input folder gets one subfolder per workflow so that jobs never collide.
INPUT_SUBFOLDER = "comfyfleet"
# Rounds of "look at the queue, delete or interrupt" before giving up on a cancel.
_CANCEL_ROUNDS = 3


@dataclass
class ExecutorDeps:
    """What every job shares: the clients, the ComfyUI info cache, the settings."""

    settings: AgentSettings
    comfy: ComfyUIClient
    comfy_info: ComfyUIInfoCache
    files: ControlPlaneFiles


class _Stopped(Exception):
    """The job was cancelled or abandoned while it prepared or uploaded."""


class JobExecution:
    def __init__(self, job: Job, deps: ExecutorDeps, send: Send) -> None:
        self.job = job
        self.deps = deps
        self._send = send
        self.key: JobKey = (job.workflow_id, job.attempt)
        self.tag = f"workflow {job.workflow_id} attempt {job.attempt}"
        self.prompt_id: str | None = None
        self._stop = asyncio.Event()
        self._report_stop = True
        self._ended = False
        # Set when a runner-level interrupt from the control plane is about to hit the prompt.
        self._interrupt_requested = False

    # -- control ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """The control plane cancelled the job: stop it and report ``cancelled``."""
        log.info("%s: cancel requested (prompt %s)", self.tag, self.prompt_id)
        self._stop.set()

    def expect_interrupt(self) -> None:
        """The control plane interrupts the whole runner: the prompt's end as interrupted is
        expected, and is reported as the runner interrupt it is."""
        log.info("%s: runner interrupt requested (prompt %s)", self.tag, self.prompt_id)
        self._interrupt_requested = True

    def abandon(self) -> None:
        """Stop the job on ComfyUI and report nothing more about it."""
        log.info("%s: abandoning (prompt %s)", self.tag, self.prompt_id)
        self._report_stop = False
        self._ended = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def ended(self) -> bool:
        """Its last word is said (or it was abandoned): it no longer holds a slot, even while
        its task tidies up or its prompt is being interrupted."""
        return self._ended

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run the job to its end. Never raises (but for cancellation of the task itself):
        every failure becomes a ``failed`` update."""
        workdir = (
            self.deps.settings.data_dir / "jobs" / safe_filename(f"{self.job.workflow_id}-{self.job.attempt}")
        )
        try:
            await self._run(workdir)
        except _Stopped:
            await self._report_stopped()
        except AttemptSuperseded as exc:
            log.info("%s: a newer attempt owns the job, stopping: %s", self.tag, exc)
            self._ended = True
        except ComfyUIUnavailable as exc:
            self.deps.comfy_info.invalidate()
            await self._fail(str(exc), exception_type="ComfyUIUnavailable")
        except (ComfyUIError, TransferError) as exc:
            await self._fail(str(exc), exception_type=type(exc).__name__)
        except Exception as exc:
            # The loop boundary of one job: anything unexpected fails that job, not the agent.
            log.exception("%s: unexpected error", self.tag)
            await self._fail(
                f"agent error: {exc.__class__.__name__}: {exc}", exception_type=type(exc).__name__
            )
        finally:
            await remove_tree(workdir)

    async def _run(self, workdir: Path) -> None:
        file_names = await self._unless_stopped(self._stage_inputs(workdir / "inputs"))
        input_types = await self.deps.comfy_info.input_types()
        try:
            prompt, resolved = substitute(
                self.job.workflow_json,
                self.job.params,
                file_names,
                random_source=lambda: secrets.randbits(64),
                timestamp_ms=self.job.timestamp_ms or int(time.time() * 1000),
                input_types=input_types,
                fixed_random=self.job.fixed_random,
            )
        except ValueError as exc:
            # ParameterError, ConversionError, PlaceholderError: the job cannot run as sent.
            log.info("%s: placeholders cannot be filled: %s", self.tag, exc)
            node_id = getattr(exc, "node_id", None)
            node = self.job.workflow_json.get(node_id) if node_id is not None else None
            await self._finish(
                "invalid",
                JobError(
                    message=str(exc),
                    node_id=node_id,
                    node_type=_str_or_none(node.get("class_type")) if isinstance(node, dict) else None,
                    exception_type=type(exc).__name__,
                ),
            )
            return
        await self._update(status="uploaded", resolved_params=resolved)

        to_run = nodes_to_run(prompt, await self.deps.comfy_info.output_classes())
        translator = EventTranslator(prompt, to_run)
        settings = self.deps.settings
        async with PromptWatch(
            self.deps.comfy,
            poll_slow_s=settings.history_poll_slow_s,
            poll_fast_s=settings.history_poll_fast_s,
            down_grace_s=settings.comfyui_down_grace_s,
            tag=self.tag,
        ) as watch:
            if self.stopping:
                raise _Stopped
            if not await self._post(prompt, watch.client_id):
                return
            assert self.prompt_id is not None
            outcome = await self._follow(watch, self.prompt_id, translator)
        if outcome is None or self.stopping:
            raise _Stopped
        for kind, data in outcome.messages:
            # Events the socket did not bring (it was lost): from the history's record.
            for update in translator.translate(kind, data):
                await self._update_from(update)
        await self._conclude(outcome, workdir / "outputs")

    async def _stage_inputs(self, folder: Path) -> dict[str, str]:
        """Download each input file and put it into ComfyUI's input folder; returns the
        name each got there, by parameter name."""
        names: dict[str, str] = {}
        subfolder = f"{INPUT_SUBFOLDER}/{safe_filename(self.job.workflow_id)}"
        used: set[str] = set()
        for number, file in enumerate(self.job.files):
            stored = await self.deps.files.download_input(file, folder / f"{number}.bin", tag=self.tag)
            filename = safe_filename(file.filename, f"input{number}")
            if filename in used:
                # Two inputs sent under one name must not overwrite each other on ComfyUI.
                filename = f"{number}_{filename}"
            used.add(filename)
            names[file.name] = await self.deps.comfy.upload_image(stored.path, filename, subfolder=subfolder)
            log.info(
                "%s: input %r is %r on ComfyUI (%d bytes)",
                self.tag,
                file.name,
                names[file.name],
                stored.size_bytes,
            )
        return names

    async def _post(self, prompt: dict[str, Any], client_id: str) -> bool:
        try:
            # Our own id (a lowercase UUID, as newer ComfyUI demands) so every log line can
            # name the prompt even if the answer were lost.
            prompt_id, number = await self.deps.comfy.post_prompt(
                prompt, client_id, prompt_id=str(uuid.uuid4())
            )
        except PromptRejected as exc:
            log.info("%s: ComfyUI rejected the prompt: %s", self.tag, exc)
            if exc.error.get("type") == "invalid_prompt":
                # "node X does not exist": maybe custom nodes changed; re-read them next time.
                self.deps.comfy_info.invalidate()
            await self._finish("invalid", JobError(message=str(exc), node_errors=exc.node_errors))
            return False
        self.prompt_id = prompt_id
        log.info("%s: queued as prompt %s (number %s)", self.tag, prompt_id, number)
        await self._update(status="queued", prompt_id=prompt_id, queue_number=number)
        return True

    async def _follow(
        self, watch: PromptWatch, prompt_id: str, translator: EventTranslator
    ) -> PromptOutcome | None:
        """The prompt's outcome, or ``None`` when a stop removed it from ComfyUI's queue."""

        async def on_event(kind: str, data: dict[str, Any]) -> None:
            for update in translator.translate(kind, data):
                await self._update_from(update)

        following = asyncio.create_task(watch.follow(prompt_id, on_event))
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({following, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if following.done():
                return following.result()
            if await self._stop_on_comfyui(prompt_id):
                return None
            # Interrupted: it ends at the next node boundary; its end is the confirmation.
            return await following
        finally:
            for task in (following, stop_wait):
                task.cancel()
            await asyncio.gather(following, stop_wait, return_exceptions=True)

    async def _stop_on_comfyui(self, prompt_id: str) -> bool:
        """Delete the prompt if still pending (``True``: it will never run) or interrupt it
        if running (``False``: wait for its end)."""
        deleted = False
        try:
            for _ in range(_CANCEL_ROUNDS):
                where = queue_position(await self.deps.comfy.queue(), prompt_id)
                if where == "pending":
                    await self.deps.comfy.delete_from_queue([prompt_id])
                    deleted = True
                    continue  # it may have started meanwhile: look again
                if where == "running":
                    log.info("%s: interrupting running prompt %s", self.tag, prompt_id)
                    await self.deps.comfy.interrupt(prompt_id)
                    return False
                if deleted:
                    log.info("%s: deleted prompt %s from ComfyUI's queue", self.tag, prompt_id)
                return deleted
        except ComfyUIError as exc:
            # Unreachable ComfyUI runs nothing we could still stop.
            log.warning("%s: cannot stop prompt %s on ComfyUI: %s", self.tag, prompt_id, exc)
            return True
        return deleted

    async def _conclude(self, outcome: PromptOutcome, folder: Path) -> None:
        if outcome.status == "success":
            refs, texts = await self._unless_stopped(self._copy_outputs(outcome, folder))
            if not self._ended:
                self._ended = True
                await self._send(
                    JobDone(
                        workflow_id=self.job.workflow_id, attempt=self.job.attempt, outputs=refs, texts=texts
                    )
                )
            return
        detail = outcome.detail
        if outcome.status == "error":
            log.info(
                "%s: prompt %s failed in node %s: %s",
                self.tag,
                self.prompt_id,
                detail.get("node_id"),
                outcome.message,
            )
            await self._fail(
                outcome.message or "execution error",
                node_id=_str_or_none(detail.get("node_id")),
                node_type=_str_or_none(detail.get("node_type")),
                exception_type=_str_or_none(detail.get("exception_type")),
            )
        elif outcome.status == "interrupted":
            await self._fail(
                "execution was interrupted by a runner interrupt from the control plane"
                if self._interrupt_requested
                else "execution was interrupted on ComfyUI, not by the control plane",
                node_id=_str_or_none(detail.get("node_id")),
                node_type=_str_or_none(detail.get("node_type")),
                exception_type="Interrupted",
            )
        else:
            await self._fail(outcome.message, exception_type="PromptLost")

    async def _copy_outputs(
        self, outcome: PromptOutcome, folder: Path
    ) -> tuple[list[OutputRef], dict[str, list[str]]]:
        files, texts = collect_outputs(outcome.outputs)
        refs: list[OutputRef] = []
        for number, found in enumerate(files):
            refs.append(await self._copy_output(found, folder / f"{number}.bin"))
        log.info(
            "%s: prompt %s completed with %d files and %d text outputs",
            self.tag,
            self.prompt_id,
            len(refs),
            len(texts),
        )
        return refs, texts

    async def _copy_output(self, found: OutputFile, path: Path) -> OutputRef:
        """ComfyUI → disk (hashing) → control plane; the whole file is never in memory."""
        async with self.deps.comfy.view(found.filename, found.subfolder, found.folder_type) as resp:
            offered = resp.headers.get("Content-Type")
            stored = await store_stream(resp.content.iter_chunked(CHUNK_BYTES), path)
        return await self.deps.files.upload_output(
            workflow_id=self.job.workflow_id,
            attempt=self.job.attempt,
            node_id=found.node_id,
            kind=found.kind,
            filename=found.filename,
            content_type=guess_content_type(found.filename, offered),
            stored=stored,
        )

    # -- helpers ----------------------------------------------------------------------------

    async def _unless_stopped(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` unless and until a cancel or abandon comes; then raise _Stopped."""
        task = asyncio.create_task(work)
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, stop_wait, return_exceptions=True)
        if task.cancelled():
            raise _Stopped
        return task.result()

    async def _update(self, **fields: Any) -> None:
        if self._ended:
            return
        await self._send(JobUpdate(workflow_id=self.job.workflow_id, attempt=self.job.attempt, **fields))

    async def _update_from(self, update: Update) -> None:
        await self._update(status=update.status, node=update.node, progress=update.progress)

    async def _finish(self, status: JobStatus, error: JobError | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        await self._send(
            JobUpdate(
                workflow_id=self.job.workflow_id,
                attempt=self.job.attempt,
                status=status,
                prompt_id=self.prompt_id,
                error=error,
            )
        )

    async def _fail(self, message: str, **error: str | None) -> None:
        log.warning("%s: failed (prompt %s): %s", self.tag, self.prompt_id, message)
        await self._finish("failed", JobError(message=message, **error))

    async def _report_stopped(self) -> None:
        if self._report_stop:
            log.info("%s: cancelled (prompt %s)", self.tag, self.prompt_id)
            await self._finish("cancelled")


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
