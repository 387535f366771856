"""Answers to the control plane's runner-level requests: ``interrupt`` and ``stats_request``.

Both concern every ComfyUI instance of the agent, so the instances are asked at once and a
slow or dead one costs its own timeout, not the others'.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from protocol.capacity import Capacity
from runner_agent.comfyui import ComfyUIError, running_prompt_ids
from runner_agent.instances import ComfyUIInstance, unhealthy_reason

log = logging.getLogger(__name__)


@dataclass
class InterruptResult:
    interrupted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def interrupt_running(instances: list[ComfyUIInstance]) -> InterruptResult:
    """Interrupt the prompt each instance is running, whoever queued it. Jobs of this agent
    whose prompt is hit end as ``failed`` with exception type ``Interrupted``."""
    result = InterruptResult()
    for interrupted, error in await asyncio.gather(*(_interrupt_one(i) for i in instances)):
        result.interrupted.extend(interrupted)
        if error is not None:
            result.errors.append(error)
    return result


async def _interrupt_one(instance: ComfyUIInstance) -> tuple[list[str], str | None]:
    try:
        running = running_prompt_ids(await instance.comfy.queue())
    except ComfyUIError as exc:
        return [], str(exc)
    # Marked before the interrupt goes out: the job may end as soon as it lands.
    for execution in instance.jobs.values():
        if execution.prompt_id in running:
            execution.expect_interrupt()
    interrupted: list[str] = []
    for prompt_id in running:
        try:
            # With the prompt id, a prompt that ended meanwhile leaves the next one alone.
            await instance.comfy.interrupt(prompt_id)
        except ComfyUIError as exc:
            return interrupted, str(exc)
        log.info("interrupted prompt %s on ComfyUI at %s", prompt_id, instance.url)
        interrupted.append(prompt_id)
    return interrupted, None


def stats_data(
    instances: list[ComfyUIInstance],
    capacity: Capacity,
    answers: list[tuple[dict[str, Any] | None, str | None]],
) -> dict[str, Any]:
    """The ``data`` of a stats reply; ``answers`` are each instance's ``/system_stats`` or
    why it has none."""
    reason = unhealthy_reason(instances)
    return {
        "capacity": capacity.model_dump(mode="json"),
        "system_stats": [stats if stats is not None else {"error": error} for stats, error in answers],
        "instances": [i.state() for i in instances],
        "healthy": reason is None,
        "unhealthy_reason": reason,
    }
