"""Starting and supervising a local ComfyUI (``--comfyui-cmd``).

The command is split like a shell would (no shell runs it) and started in a process group of
its own (see :mod:`runner_agent.process_group`). It counts as running once ``/system_stats``
answers. When it exits it is started again after a backoff that doubles up to
``comfyui_restart_max_s`` (and starts over once a run lasted that long). On stop the group
gets SIGTERM and, after ``comfyui_stop_grace_s``, SIGKILL.

Its output is logged line by line, so that ``--log-json`` holds for ComfyUI's lines too and a
full pipe never stalls it. Every change of state goes to ``on_state``: why it cannot serve
("starting", "restarting (exited with code -9)", ...) or ``None`` once it answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Callable

from runner_agent.comfyui import ComfyUIClient, ComfyUIError
from runner_agent.connection import backoff_delay
from runner_agent.process_group import GroupProcess

log = logging.getLogger(__name__)

OnState = Callable[[str | None], None]

# How often a starting ComfyUI is asked whether it answers yet.
_READY_POLL_S = 0.2
# One readiness probe may take this long before it counts as "not yet".
_PROBE_TIMEOUT_S = 5.0
# The first restart delay, unless restart_max_s is shorter.
_RESTART_INITIAL_S = 1.0


class ComfyUIProcess:
    def __init__(
        self,
        cmd: str,
        comfy: ComfyUIClient,
        *,
        on_state: OnState,
        start_timeout_s: float,
        restart_max_s: float,
        stop_grace_s: float,
    ) -> None:
        self.argv = shlex.split(cmd)
        self.comfy = comfy
        self._on_state = on_state
        self._start_timeout_s = start_timeout_s
        self._restart_max_s = restart_max_s
        self._stop_grace_s = stop_grace_s
        self._proc: GroupProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self.starts = 0

    @property
    def pid(self) -> int | None:
        """The running process's id (its process group's too), or ``None``."""
        proc = self._proc
        return proc.pid if proc is not None and not proc.exited else None

    @property
    def returncode(self) -> int | None:
        """How the last process ended (negative: the signal that ended it); ``None`` while it
        runs or before the first start."""
        return self._proc.returncode if self._proc is not None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"supervise ComfyUI {self.comfy.base_url}")

    async def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after the grace) and stop restarting."""
        self._stopping = True
        self._stop_event.set()
        proc = self._proc
        if proc is not None and not proc.exited:
            await self._terminate(proc)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        initial_s = min(_RESTART_INITIAL_S, self._restart_max_s)
        while not self._stopping:
            started_at = loop.time()
            reason = await self._run_once()
            if self._stopping:
                break
            if loop.time() - started_at >= self._restart_max_s:
                failures = 0  # it ran long enough: this is a fresh failure, not a crash loop
            delay = backoff_delay(
                failures, initial_s=initial_s, max_s=self._restart_max_s, jitter=0.0, rand=0.0
            )
            failures += 1
            self._report(f"restarting ({reason})")
            log.warning("ComfyUI at %s %s; starting it again in %.1f s", self.comfy.base_url, reason, delay)
            await self._pause(delay)

    async def _run_once(self) -> str:
        """Start the process, wait until it answers, then until it ends; returns what ended it."""
        self._report("starting")
        try:
            proc = await GroupProcess.spawn(
                self.argv,
                on_line=self._log_line,
                # Python-based ComfyUI writes its lines as they happen, not at exit.
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            log.error("cannot start ComfyUI with %r: %s", shlex.join(self.argv), exc)
            return f"could not be started: {exc.strerror or exc}"
        self._proc = proc
        self.starts += 1
        url = self.comfy.base_url
        log.info("started ComfyUI at %s as process %d: %s", url, proc.pid, shlex.join(self.argv))
        try:
            failure = await self._wait_until_answering(proc)
            if failure is not None:
                return failure
            log.info("ComfyUI at %s (process %d) answers", url, proc.pid)
            self._report(None)
            code = await proc.wait()
            if not self._stopping:
                log.warning("ComfyUI at %s (process %d) exited with code %s", url, proc.pid, code)
            return f"exited with code {code}"
        finally:
            # Also when cancelled while the agent stops: nothing of it is left running, and
            # nothing it started goes on holding ComfyUI's port.
            await proc.close()

    async def _wait_until_answering(self, proc: GroupProcess) -> str | None:
        """``None`` once ``/system_stats`` answers; otherwise why it never will: the process
        ended, or did not answer within the start timeout (it is then terminated)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout_s
        exited = asyncio.create_task(proc.wait())
        try:
            while not exited.done():
                try:
                    async with asyncio.timeout(_PROBE_TIMEOUT_S):
                        await self.comfy.system_stats()
                    return None
                except (ComfyUIError, TimeoutError):
                    pass
                if loop.time() >= deadline:
                    log.error(
                        "ComfyUI at %s (process %d) did not answer within %.0f s; terminating it",
                        self.comfy.base_url,
                        proc.pid,
                        self._start_timeout_s,
                    )
                    await self._terminate(proc)
                    return f"did not answer within {self._start_timeout_s:g} s of its start"
                # A poll of a server that is still importing its modules, not synchronisation.
                await asyncio.wait({exited}, timeout=_READY_POLL_S)
            log.warning(
                "ComfyUI at %s (process %d) exited with code %s before it answered",
                self.comfy.base_url,
                proc.pid,
                proc.returncode,
            )
            return f"exited with code {proc.returncode} while starting"
        finally:
            exited.cancel()
            await asyncio.gather(exited, return_exceptions=True)

    async def _terminate(self, proc: GroupProcess) -> None:
        if await proc.terminate(self._stop_grace_s):
            log.info("ComfyUI (process %d) stopped with code %s", proc.pid, proc.returncode)
        else:
            log.warning(
                "ComfyUI (process %d) still ran %.0f s after SIGTERM; killed it", proc.pid, self._stop_grace_s
            )

    def _report(self, down: str | None) -> None:
        # While stopping, nobody should act on the state of a process being terminated.
        if not self._stopping:
            self._on_state(down)

    def _log_line(self, line: str) -> None:
        log.info("ComfyUI %s: %s", self.comfy.base_url, line)

    async def _pause(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except TimeoutError:
            return
