"""Running one job end to end on the local ComfyUI.

inputs downloaded and uploaded to ComfyUI (``uploaded``) → the control plane's ``proceed`` →
placeholders substituted → ``POST /prompt`` (``queued``) → events followed (``running``, node
events, progress) → outputs copied to the control plane → ``job_done``; or ``failed`` /
``invalid`` / ``cancelled``. Every message carries the job's attempt.

The prompt is posted only after ``proceed``: the control plane sends it from the transaction
that records ``uploaded``, and ``cancel`` instead once the workflow is cancelled, so a cancel
that comes before that point keeps the prompt off ComfyUI altogether. A cancel that comes
later removes the prompt from ComfyUI's queue, or interrupts it while it runs, looking again
until ComfyUI is done with it, and reports ``cancelled``. An *abandon* (the control plane
dropped the job, or the agent is shutting down) does the same on ComfyUI but reports nothing.
A 409 from the control plane means a newer attempt owns the job: stop and report nothing.

Failures say whose they are (``JobError.kind``): the workflow's own (ComfyUI rejected the
prompt, a node raised) or the fleet's (ComfyUI unreachable or restarted, the prompt lost, a
transfer that could not get through, a bug here), which the control plane retries as the next
attempt. A ComfyUI found unreachable is reported down at once, so it gets no more work.

The job's folder (``job_folder``) keeps the posted prompt, then its outputs, then its last
report, so that a restarted agent picks the job up where it was (:attr:`saved`).
"""

from __future__ import annotations

import asyncio
import contextlib
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
from runner_agent.comfyui_files import input_subfolder
from runner_agent.config import AgentSettings
from runner_agent.control_files import AttemptSuperseded, ControlPlaneFiles, OutputRefused, TransferError
from runner_agent.files import (
    CHUNK_BYTES,
    SMALL_FILE_BYTES,
    guess_content_type,
    safe_filename,
    store_bytes,
    store_stream,
)
from runner_agent.job_folder import FinalReport, JobFolder, SavedJob, SavedOutput, SavedPrompt, SavedResult
from runner_agent.node_events import EventTranslator, Update, nodes_to_run
from runner_agent.outputs import collect_outputs
from runner_agent.prompt_watch import PromptOutcome, PromptWatch

log = logging.getLogger(__name__)

T = TypeVar("T")
JobKey = tuple[str, int]
Send = Callable[[JobUpdate | JobDone], Awaitable[None]]

# While stopping a prompt, how soon to look at ComfyUI's queue again (doubling to the max).
_STOP_RECHECK_S = 0.05
_STOP_RECHECK_MAX_S = 1.0


@dataclass
class ExecutorDeps:
    """What every job on one ComfyUI instance shares."""

    settings: AgentSettings
    comfy: ComfyUIClient
    comfy_info: ComfyUIInfoCache
    files: ControlPlaneFiles
    # The instance did not answer: take it out of service now (the heartbeat brings it back).
    on_unreachable: Callable[[str], None]
    # The instance's own folder, when it runs on this host: a job's files there are removed
    # once the control plane has them.
    comfyui_dir: Path | None = None


class _Stopped(Exception):
    """The job was cancelled or abandoned before it ended."""


class _Ended(Exception):
    """The job has said its last word (``invalid``, say): nothing more to do."""


class _Failed(Exception):
    """The job cannot go on; ``error`` says why and whose fault it is."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


class JobExecution:
    def __init__(
        self, job: Job, deps: ExecutorDeps, send: Send, folder: JobFolder, saved: SavedJob | None = None
    ) -> None:
        self.job = job
        self.deps = deps
        self._send = send
        self.folder = folder
        # Set when the job was found in its folder at start: it resumes from there.
        self.saved = saved
        self.key: JobKey = (job.workflow_id, job.attempt)
        self.tag = f"workflow {job.workflow_id} attempt {job.attempt}"
        self.prompt_id: str | None = saved.prompt.prompt_id if saved is not None else None
        # The last report, once said; kept in the folder until the control plane acknowledges it.
        self.final: FinalReport | None = None
        self.acked = False
        # The "uploaded" report while it waits for the go-ahead: said again after a reconnect,
        # since a message sent just before a connection drops may never have arrived.
        self.awaiting_go: JobUpdate | None = None
        self._stop = asyncio.Event()
        self._go = asyncio.Event()
        self._report_stop = True
        self._ended = False
        # Set when a runner-level interrupt from the control plane is about to hit the prompt.
        self._interrupt_requested = False

    # -- control ----------------------------------------------------------------------------

    def cancel(self) -> None:
        """The control plane cancelled the job: stop it and report ``cancelled``."""
        log.info("%s: cancel requested (prompt %s)", self.tag, self.prompt_id)
        self._stop.set()

    def proceed(self) -> None:
        """The control plane's go-ahead to post the prompt."""
        self._go.set()

    def restore_final(self, report: FinalReport) -> None:
        """The job had ended before a restart: this was its last report."""
        self.final = report
        self._ended = True

    def acknowledge(self) -> None:
        """The control plane has the last report: the folder may go."""
        self.acked = True

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
        try:
            await self._run()
        except _Stopped:
            await self._report_stopped()
        except _Ended:
            pass
        except AttemptSuperseded as exc:
            log.info("%s: a newer attempt owns the job, stopping: %s", self.tag, exc)
            self._ended = True
        except OutputRefused as exc:
            await self._fail(JobError(message=str(exc), exception_type="OutputRefused"))
        except _Failed as failed:
            await self._fail(failed.error)
        except ComfyUIUnavailable as exc:
            self._comfyui_down(str(exc))
            await self._fail(_infrastructure(str(exc), "ComfyUIUnavailable"))
        except (ComfyUIError, TransferError) as exc:
            await self._fail(_infrastructure(str(exc), type(exc).__name__))
        except Exception as exc:
            # The loop boundary of one job: anything unexpected fails that job, not the agent;
            # the fault is ours, so the control plane runs it again.
            log.exception("%s: unexpected error", self.tag)
            await self._fail(
                _infrastructure(f"agent error: {exc.__class__.__name__}: {exc}", type(exc).__name__)
            )
        finally:
            await self.folder.drop_inputs()

    async def _run(self) -> None:
        if self.saved is not None:
            if self.saved.result is not None:
                await self._deliver(self.saved.result)
            else:
                await self._conclude(await self._follow_again(self.saved.prompt))
            return
        file_names = await self._unless_stopped(self._stage_inputs(self.folder.inputs))
        prompt, resolved = await self._fill_in(file_names)
        uploaded = JobUpdate(
            workflow_id=self.job.workflow_id,
            attempt=self.job.attempt,
            status="uploaded",
            resolved_params=resolved,
        )
        translator = EventTranslator(
            prompt, nodes_to_run(prompt, await self.deps.comfy_info.output_classes())
        )
        prompt_id = str(uuid.uuid4())
        saved = SavedPrompt(prompt_id, self.deps.comfy.base_url, prompt)
        async with contextlib.AsyncExitStack() as stack:
            # While the go-ahead is on its way, the socket to ComfyUI opens and the prompt
            # goes to disk (before ComfyUI has it: a restarted agent then follows it rather
            # than leave it running for nobody). Neither waits for the control plane.
            ready = asyncio.gather(
                stack.enter_async_context(self._watch(events=True)), self.folder.save_prompt(self.job, saved)
            )
            try:
                await self._go_ahead(uploaded)
            finally:
                watch, _ = await ready
            if self.stopping:
                raise _Stopped
            await self._post(prompt, watch.client_id, prompt_id)
            outcome = await self._follow(watch, prompt_id, translator)
        await self._conclude(await self._replay(outcome, translator))

    async def _go_ahead(self, uploaded: JobUpdate) -> None:
        """Say ``uploaded`` and wait for the control plane's go-ahead."""
        self.awaiting_go = uploaded
        try:
            await self._send(uploaded)
            await self._wait_for_go()
        finally:
            self.awaiting_go = None

    async def _fill_in(self, file_names: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
        input_types = await self.deps.comfy_info.input_types()
        try:
            return substitute(
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
            raise _Ended from exc

    async def _wait_for_go(self) -> None:
        timeout_s = self.deps.settings.transfer_retry_s
        try:
            await self._unless_stopped(asyncio.wait_for(self._go.wait(), timeout_s))
        except TimeoutError:
            raise _Failed(
                _infrastructure(f"no go-ahead from the control plane within {timeout_s:g} s", "NoProceed")
            ) from None

    def _watch(self, *, events: bool) -> PromptWatch:
        settings = self.deps.settings
        return PromptWatch(
            self.deps.comfy,
            poll_slow_s=settings.history_poll_slow_s,
            poll_fast_s=settings.history_poll_fast_s,
            down_grace_s=settings.comfyui_down_grace_s,
            tag=self.tag,
            events=events,
        )

    async def _follow_again(self, saved: SavedPrompt) -> PromptOutcome:
        """A prompt posted before the agent restarted: followed by ComfyUI's history."""
        log.info("%s: following prompt %s again after a restart", self.tag, saved.prompt_id)
        translator = EventTranslator(
            saved.prompt, nodes_to_run(saved.prompt, await self.deps.comfy_info.output_classes())
        )
        async with self._watch(events=False) as watch:
            outcome = await self._follow(watch, saved.prompt_id, translator)
        return await self._replay(outcome, translator)

    async def _replay(self, outcome: PromptOutcome | None, translator: EventTranslator) -> PromptOutcome:
        """The outcome, once the events the socket did not bring (it was lost, or there was
        none) are reported from the history's record."""
        if outcome is None or self.stopping:
            raise _Stopped
        for kind, data in outcome.messages:
            for update in translator.translate(kind, data):
                await self._update_from(update)
        return outcome

    async def _stage_inputs(self, folder: Path) -> dict[str, str]:
        """Download each input file and put it into ComfyUI's input folder; returns the
        name each got there, by parameter name."""
        names: dict[str, str] = {}
        subfolder = input_subfolder(self.job.workflow_id)
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

    async def _post(self, prompt: dict[str, Any], client_id: str, prompt_id: str) -> None:
        self.prompt_id = prompt_id
        try:
            # Our own id (a lowercase UUID, as newer ComfyUI demands) so every log line can
            # name the prompt even if the answer were lost.
            _, number = await self.deps.comfy.post_prompt(prompt, client_id, prompt_id=prompt_id)
        except PromptRejected as exc:
            log.info("%s: ComfyUI rejected the prompt: %s", self.tag, exc)
            if exc.error.get("type") == "invalid_prompt":
                # "node X does not exist": maybe custom nodes changed; re-read them next time.
                self.deps.comfy_info.invalidate()
            await self._finish("invalid", JobError(message=str(exc), node_errors=exc.node_errors))
            raise _Ended from exc
        log.info("%s: queued as prompt %s (number %s)", self.tag, prompt_id, number)
        await self._update(status="queued", prompt_id=prompt_id, queue_number=number)

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
            if await self._stop_on_comfyui(following, prompt_id):
                return None
            # Interrupted: it ends at the next node boundary; its end is the confirmation.
            return await following
        finally:
            for task in (following, stop_wait):
                task.cancel()
            await asyncio.gather(following, stop_wait, return_exceptions=True)

    async def _stop_on_comfyui(self, following: asyncio.Task[PromptOutcome], prompt_id: str) -> bool:
        """Until ComfyUI is done with the prompt: delete it while it waits in the queue,
        interrupt it while it runs. ComfyUI forgets an interrupt that lands just before it
        starts a prompt, hence the repeated look. ``True``: it was taken off the queue and
        never ran; ``False``: its end, which is on its way, is the confirmation."""
        pause_s = _STOP_RECHECK_S
        deleted = False
        interrupts = 0
        while not following.done():
            try:
                where = queue_position(await self.deps.comfy.queue(), prompt_id)
                if where == "pending":
                    await self.deps.comfy.delete_from_queue([prompt_id])
                    deleted = True
                elif where == "running":
                    # Said once; the look again and again that follows is not news.
                    log.log(
                        logging.DEBUG if interrupts else logging.INFO,
                        "%s: interrupting running prompt %s",
                        self.tag,
                        prompt_id,
                    )
                    interrupts += 1
                    await self.deps.comfy.interrupt(prompt_id)
                elif deleted:
                    log.info("%s: deleted prompt %s from ComfyUI's queue", self.tag, prompt_id)
                    return True
                else:
                    return False  # it ended just now
            except ComfyUIError as exc:
                # Unreachable ComfyUI runs nothing we could still stop.
                log.warning("%s: cannot stop prompt %s on ComfyUI: %s", self.tag, prompt_id, exc)
                return True
            await asyncio.wait({following}, timeout=pause_s)
            pause_s = min(pause_s * 2, _STOP_RECHECK_MAX_S)
        return False

    async def _conclude(self, outcome: PromptOutcome) -> None:
        detail = outcome.detail
        if outcome.status == "success":
            result = await self._unless_stopped(self._copy_outputs(outcome))
            await self._deliver(result)
        elif outcome.status == "error":
            log.info(
                "%s: prompt %s failed in node %s: %s",
                self.tag,
                self.prompt_id,
                detail.get("node_id"),
                outcome.message,
            )
            await self._fail(
                JobError(
                    message=outcome.message or "execution error",
                    node_id=_str_or_none(detail.get("node_id")),
                    node_type=_str_or_none(detail.get("node_type")),
                    exception_type=_str_or_none(detail.get("exception_type")),
                    kind="out_of_memory" if out_of_memory(detail) else "workflow",
                )
            )
        elif outcome.status == "interrupted":
            # An operator's runner interrupt is meant to end the work; an interrupt from
            # someone at the ComfyUI itself is not the workflow's doing: it runs again.
            operator = self._interrupt_requested
            await self._fail(
                JobError(
                    message="execution was interrupted by a runner interrupt from the control plane"
                    if operator
                    else "execution was interrupted on ComfyUI, not by the control plane",
                    node_id=_str_or_none(detail.get("node_id")),
                    node_type=_str_or_none(detail.get("node_type")),
                    exception_type="Interrupted",
                    kind="workflow" if operator else "infrastructure",
                )
            )
        else:
            if outcome.comfyui_down:
                self._comfyui_down(outcome.message)
            await self._fail(_infrastructure(outcome.message, "PromptLost"))

    async def _copy_outputs(self, outcome: PromptOutcome) -> SavedResult:
        """ComfyUI → the job folder (hashing on the way); the whole file is never in memory."""
        files, texts = collect_outputs(outcome.outputs)
        saved: list[SavedOutput] = []
        for number, found in enumerate(files):
            relative = f"outputs/{number}.bin"
            async with self.deps.comfy.view(found.filename, found.subfolder, found.folder_type) as resp:
                offered = resp.headers.get("Content-Type")
                length = resp.content_length
                if length is not None and length <= SMALL_FILE_BYTES:
                    stored = await store_bytes(await resp.read(), self.folder.path / relative)
                else:
                    stored = await store_stream(
                        resp.content.iter_chunked(CHUNK_BYTES), self.folder.path / relative
                    )
            saved.append(
                SavedOutput(
                    node_id=found.node_id,
                    kind=found.kind,
                    filename=found.filename,
                    content_type=guess_content_type(found.filename, offered),
                    sha256=stored.sha256,
                    size_bytes=stored.size_bytes,
                    path=relative,
                    subfolder=found.subfolder,
                    folder_type=found.folder_type,
                )
            )
        result = SavedResult(saved, texts)
        await self.folder.save_result(result)
        log.info(
            "%s: prompt %s completed with %d files and %d text outputs",
            self.tag,
            self.prompt_id,
            len(saved),
            len(texts),
        )
        return result

    async def _deliver(self, result: SavedResult) -> None:
        """Upload the outputs (the control plane answers a repeated upload with the output it
        already has) and say ``job_done``."""
        refs = await self._unless_stopped(self._upload_all(result))
        await self._say_last(
            JobDone(
                workflow_id=self.job.workflow_id, attempt=self.job.attempt, outputs=refs, texts=result.texts
            )
        )

    async def _upload_all(self, result: SavedResult) -> list[OutputRef]:
        refs = []
        for output in result.outputs:
            refs.append(
                await self.deps.files.upload_output(
                    workflow_id=self.job.workflow_id,
                    attempt=self.job.attempt,
                    node_id=output.node_id,
                    kind=output.kind,
                    filename=output.filename,
                    content_type=output.content_type,
                    path=self.folder.path / output.path,
                    sha256=output.sha256,
                    size_bytes=output.size_bytes,
                )
            )
        return refs

    # -- helpers ----------------------------------------------------------------------------

    def _comfyui_down(self, reason: str) -> None:
        self.deps.comfy_info.invalidate()
        self.deps.on_unreachable(reason)

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

    async def _say_last(self, report: FinalReport) -> None:
        """The job's last report: on disk first, so that it survives until acknowledged."""
        if self._ended:
            return
        self._ended = True
        self.final = report
        await self.folder.save_final(report)
        await self._send(report)

    async def _finish(self, status: JobStatus, error: JobError | None = None) -> None:
        await self._say_last(
            JobUpdate(
                workflow_id=self.job.workflow_id,
                attempt=self.job.attempt,
                status=status,
                prompt_id=self.prompt_id,
                error=error,
            )
        )

    async def _fail(self, error: JobError) -> None:
        log.warning("%s: failed (prompt %s, %s): %s", self.tag, self.prompt_id, error.kind, error.message)
        await self._finish("failed", error)

    async def _report_stopped(self) -> None:
        if self._report_stop and not self._ended:
            log.info("%s: cancelled (prompt %s)", self.tag, self.prompt_id)
            await self._finish("cancelled")


def _infrastructure(message: str, exception_type: str) -> JobError:
    return JobError(message=message, exception_type=exception_type, kind="infrastructure")


def out_of_memory(detail: dict[str, Any]) -> bool:
    """ComfyUI's execution_error for a node that ran out of GPU memory (torch's
    OutOfMemoryError, or the allocator's message when it comes wrapped in another error)."""
    exception_type = str(detail.get("exception_type") or "")
    message = str(detail.get("exception_message") or "").lower()
    return "OutOfMemory" in exception_type or "out of memory" in message or "allocation on device" in message


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)
