"""The background task that runs queued prompts one at a time, lowest number first."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .executor import Executor, PromptOutcome
from .prompt_queue import PromptQueue
from .ws_hub import WsHub

log = logging.getLogger(__name__)


async def run_worker(
    queue: PromptQueue,
    executor: Executor,
    hub: WsHub,
    record: Callable[[PromptOutcome], None],
) -> None:
    while True:
        task_id, item = await queue.get()
        prompt_id = item[1]
        client_id = item[3].get("client_id")
        try:
            outcome = await executor.execute(item)
        except Exception:
            # A bug here must not stop the queue: file the prompt as failed and go on.
            log.exception("prompt %s crashed the simulator's executor", prompt_id)
            outcome = PromptOutcome(prompt_id, client_id, False, [], {}, {}, [], [])
        record(outcome)
        # History first: clients treat the events below as "history is ready".
        queue.task_done(task_id, outcome.history_result())
        if client_id is not None:
            hub.send("executing", {"node": None, "prompt_id": prompt_id}, client_id)
