"""The ComfyUI instances one agent serves (one per GPU): their clients, slots and health.

An instance is healthy while it answers and, when the agent supervises its process, while
that process runs. Health is kept as two separate reasons so that a probe that succeeds does
not hide a process the supervisor knows to be restarting, and the other way round.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner_agent.comfy_info import ComfyUIInfoCache
from runner_agent.comfyui import ComfyUIClient, ComfyUIError
from runner_agent.config import AgentSettings
from runner_agent.control_files import ControlPlaneFiles
from runner_agent.executor import ExecutorDeps, JobExecution, JobKey

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ComfyUIInstance:
    number: int
    url: str
    gpu_index: int
    slots: int
    comfy: ComfyUIClient
    info: ComfyUIInfoCache
    deps: ExecutorDeps
    supervised: bool = False
    # Why the supervised process cannot serve now ("starting", "restarting ..."); None while
    # it runs, and always None for an instance the agent does not start itself.
    process_down: str | None = None
    # What the last probe of the instance failed with; None once it answers.
    answer_error: str | None = None
    jobs: dict[JobKey, JobExecution] = field(default_factory=dict)

    @property
    def down_reason(self) -> str | None:
        if self.process_down is not None:
            return f"ComfyUI at {self.url} is {self.process_down}"
        if self.answer_error is not None:
            return f"ComfyUI at {self.url} does not answer: {self.answer_error}"
        return None

    @property
    def healthy(self) -> bool:
        return self.down_reason is None

    @property
    def active(self) -> int:
        """Jobs placed here that still hold a slot."""
        return sum(1 for execution in self.jobs.values() if not execution.ended)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.active)

    @property
    def busy_workflow_id(self) -> str | None:
        for key, execution in self.jobs.items():
            if not execution.ended:
                return key[0]
        return None

    def state(self) -> dict[str, Any]:
        """This instance as a stats reply lists it."""
        return {
            "url": self.url,
            "gpu_index": self.gpu_index,
            "healthy": self.healthy,
            "unhealthy_reason": self.down_reason,
            "supervised": self.supervised,
            "busy_workflow_id": self.busy_workflow_id,
            "free_slots": self.free,
        }


def build_instances(
    settings: AgentSettings,
    files: ControlPlaneFiles,
    on_unreachable: Callable[[int, str], None],
) -> list[ComfyUIInstance]:
    """``on_unreachable(number, reason)``: a job found instance ``number`` not answering."""
    instances = []
    for number, (url, gpu_index) in enumerate(zip(settings.comfyui_urls, settings.comfyui_gpus, strict=True)):
        comfy = ComfyUIClient(
            url, headers=settings.comfyui_headers, read_timeout_s=settings.http_read_timeout_s
        )
        info = ComfyUIInfoCache(comfy)
        supervised = bool(settings.comfyui_cmds)
        instances.append(
            ComfyUIInstance(
                number=number,
                url=comfy.base_url,
                gpu_index=gpu_index,
                slots=settings.slots,
                comfy=comfy,
                info=info,
                deps=ExecutorDeps(
                    settings,
                    comfy,
                    info,
                    files,
                    functools.partial(on_unreachable, number),
                    comfyui_dir=Path(settings.comfyui_dirs[number]) if settings.comfyui_dirs else None,
                ),
                supervised=supervised,
                process_down="starting" if supervised else None,
            )
        )
    return instances


def choose_instance(instances: list[ComfyUIInstance]) -> ComfyUIInstance:
    """Where a new job runs: a healthy instance with a free slot, the least loaded first (the
    first listed on a tie). When none has one (the control plane sent more than was offered)
    the least loaded healthy one, whose ComfyUI queues the prompt; when none is healthy, the
    least loaded of all, where the job fails with the reason if its ComfyUI stays down."""
    healthy = [i for i in instances if i.healthy]
    pool = [i for i in healthy if i.free > 0] or healthy or instances
    return min(pool, key=lambda i: (i.active, i.number))


def healthy_free_slots(instances: list[ComfyUIInstance]) -> int:
    """The slots worth offering: an unhealthy instance's free slots would only fail jobs."""
    return sum(i.free for i in instances if i.healthy)


def unhealthy_reason(instances: list[ComfyUIInstance]) -> str | None:
    reasons = [reason for i in instances if (reason := i.down_reason) is not None]
    return "; ".join(reasons) if reasons else None


async def probe_system_stats(
    instance: ComfyUIInstance, timeout_s: float | None
) -> tuple[dict[str, Any] | None, str | None]:
    """``(stats, None)`` from the instance's ``/system_stats``, or ``(None, error)`` when it
    does not answer (in time)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await instance.comfy.system_stats(), None
    except ComfyUIError as exc:
        return None, str(exc)
    except TimeoutError:
        return None, f"no answer to /system_stats within {timeout_s:g} s"
