"""Runs one prompt the way ComfyUI does, emitting the same websocket events in the same order.

Per prompt: ``execution_start``, ``execution_cached``, then for each scheduled node either
the cached path (an output node replays ``executed`` with its old output) or
``progress_state`` running, ``executing``, the work, ``executed`` for nodes that show
something, ``progress_state`` finished. The prompt ends with ``execution_success``,
``execution_error`` or ``execution_interrupted``; the worker then files history and sends
``status`` and ``executing {node: null}``.

Events go to the prompt's client id only. A prompt without one sends no events except the
ones ComfyUI broadcasts to everybody in that case: ``progress_state``, ``progress``,
preview frames and ``execution_interrupted``.

An interrupt is noticed when the next node starts, or at a progress tick: a slow node
without a progress bar always runs to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .cache import CachedNode, OutputCache, compute_signatures, is_link
from .execution_list import DependencyCycleError, ExecutionList
from .node_base import NodeContext, NodeOutput, ProgressFn
from .paths import SimPaths
from .progress import ProgressTracker
from .registry import NODE_CLASSES
from .settings import SimSettings
from .validation import full_type_name
from .ws_hub import WsHub


class InterruptProcessing(Exception):
    """Raised at a node start or progress tick after ``POST /interrupt``."""


def now_ms() -> int:
    return int(time.time() * 1000)


def format_value(value: Any) -> Any:
    """How ComfyUI shows a node's inputs in ``execution_error.current_inputs``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _lookup(table: dict[str, Any], node_id: str, class_type: str) -> Any:
    # A node id is more specific than a class, so it wins.
    if node_id in table:
        return table[node_id]
    return table.get(class_type)


@dataclass
class _Plan:
    """What the executor needs to know before starting; built in a worker thread because
    fingerprints and LoadImage's input list touch the disk."""

    signatures: dict[str, str]
    links: dict[str, list[tuple[str, int]]]
    declared: dict[str, list[str]]


def _make_plan(prompt: dict[str, Any], paths: SimPaths) -> _Plan:
    signatures = compute_signatures(prompt, paths)
    links: dict[str, list[tuple[str, int]]] = {}
    declared: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        sections = NODE_CLASSES[node["class_type"]].input_types(paths)
        # Inputs a class does not declare are ignored, links included.
        names = [n for section in ("required", "optional") for n in sections.get(section, {})]
        declared[node_id] = names
        inputs = node.get("inputs", {})
        links[node_id] = [
            (inputs[n][0], int(inputs[n][1])) for n in names if n in inputs and is_link(inputs[n])
        ]
    return _Plan(signatures, links, declared)


@dataclass
class PromptOutcome:
    prompt_id: str
    client_id: str | None
    success: bool
    messages: list[tuple[str, dict[str, Any]]]
    outputs: dict[str, Any]
    meta: dict[str, Any]
    executed: list[str]
    cached: list[str]

    def history_result(self) -> dict[str, Any]:
        return {
            "outputs": self.outputs,
            "status": {
                "status_str": "success" if self.success else "error",
                "completed": self.success,
                "messages": [[event, data] for event, data in self.messages],
            },
            "meta": self.meta,
        }


@dataclass
class _Run:
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    client_id: str | None
    plan: _Plan
    progress: ProgressTracker
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ui: dict[str, dict[str, Any]] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)


class _NodeFailed(Exception):
    def __init__(self, node_id: str, details: dict[str, Any]) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.details = details


class _NodeInterrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class Executor:
    def __init__(self, settings: SimSettings, paths: SimPaths, hub: WsHub) -> None:
        self.settings = settings
        self.paths = paths
        self.hub = hub
        self.cache = OutputCache()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._interrupt = False
        self._hooks_changed = asyncio.Event()

    # -- steering -------------------------------------------------------------------------

    def request_interrupt(self) -> None:
        self._interrupt = True

    def hooks_changed(self) -> None:
        """Delays were edited: a node sleeping now re-reads its delay."""
        self._hooks_changed.set()
        self._hooks_changed = asyncio.Event()

    def running_node_for(self, sid: str) -> str | None:
        return self.last_node_id if self.client_id == sid else None

    def _check_interrupt(self) -> None:
        if self._interrupt:
            self._interrupt = False
            raise InterruptProcessing()

    # -- one prompt -----------------------------------------------------------------------

    async def execute(self, item: list[Any]) -> PromptOutcome:
        _number, prompt_id, prompt, extra_data, outputs = item[:5]
        client_id = extra_data.get("client_id")
        self.client_id = client_id
        # An interrupt that arrived while idle must not kill the next prompt.
        self._interrupt = False
        messages: list[tuple[str, dict[str, Any]]] = []
        self._message(messages, client_id, "execution_start", {"prompt_id": prompt_id})
        plan = await asyncio.to_thread(_make_plan, prompt, self.paths)
        self.cache.keep_only(plan.signatures.values())
        cached = [n for n in prompt if self.cache.get(plan.signatures[n]) is not None]
        self._message(messages, client_id, "execution_cached", {"nodes": cached, "prompt_id": prompt_id})
        run = _Run(
            prompt_id,
            prompt,
            extra_data,
            client_id,
            plan,
            ProgressTracker(prompt_id, lambda ev, data: self.hub.send(ev, data, client_id)),
            messages,
        )

        order = ExecutionList(
            plan.links,
            is_cached=lambda n: self.cache.get(plan.signatures[n]) is not None,
            is_output=lambda n: NODE_CLASSES[prompt[n]["class_type"]].output_node,
        )
        for output_id in outputs:
            order.add_node(output_id)
        success = True
        try:
            while not order.is_empty():
                try:
                    node_id = order.next_node()
                except DependencyCycleError as exc:
                    raise _NodeFailed(order.blocked_node() or "", self._error_details(exc, {})) from exc
                await self._execute_node(run, node_id)
                order.complete(node_id)
        except _NodeInterrupted as stop:
            success = False
            self._message(
                messages,
                client_id,
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": stop.node_id,
                    "node_type": prompt[stop.node_id]["class_type"],
                    "executed": list(run.executed),
                },
                broadcast=True,
            )
        except _NodeFailed as failure:
            success = False
            self._message(
                messages,
                client_id,
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": failure.node_id,
                    "node_type": prompt.get(failure.node_id, {}).get("class_type"),
                    "executed": list(run.executed),
                    **failure.details,
                    # ComfyUI reports every node of the prompt here.
                    "current_outputs": list(prompt),
                },
            )
        else:
            self._message(messages, client_id, "execution_success", {"prompt_id": prompt_id})
        finally:
            self.last_node_id = None
        return PromptOutcome(
            prompt_id=prompt_id,
            client_id=client_id,
            success=success,
            messages=messages,
            outputs={n: ui["output"] for n, ui in run.ui.items()},
            meta={n: ui["meta"] for n, ui in run.ui.items()},
            executed=run.executed,
            cached=cached,
        )

    def _message(
        self,
        messages: list[tuple[str, dict[str, Any]]],
        client_id: str | None,
        event: str,
        data: dict[str, Any],
        *,
        broadcast: bool = False,
    ) -> None:
        """A prompt-level event: kept for history, sent to the prompt's client (or to all
        sockets, for the few events ComfyUI broadcasts when the prompt has no client)."""
        stamped = {**data, "timestamp": now_ms()}
        messages.append((event, stamped))
        if client_id is not None or broadcast:
            self.hub.send(event, stamped, client_id)

    # -- one node -------------------------------------------------------------------------

    async def _execute_node(self, run: _Run, node_id: str) -> None:
        node = run.prompt[node_id]
        class_type = node["class_type"]
        signature = run.plan.signatures[node_id]
        hit = self.cache.get(signature)
        if hit is not None:
            if run.client_id is not None:
                self.hub.send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": hit.ui["output"] if hit.ui else None,
                        "prompt_id": run.prompt_id,
                    },
                    run.client_id,
                )
            if hit.ui is not None:
                run.ui[node_id] = hit.ui
            run.progress.finish(node_id)
            run.values[node_id] = hit.values
            return

        run.progress.start(node_id)
        cls = NODE_CLASSES[class_type]
        inputs = self._gather_inputs(run, node_id)
        if run.client_id is not None:
            self.last_node_id = node_id
            self.hub.send(
                "executing",
                {"node": node_id, "display_node": node_id, "prompt_id": run.prompt_id},
                run.client_id,
            )
        ctx = NodeContext(
            node_id=node_id,
            prompt=run.prompt,
            extra_data=run.extra_data,
            paths=self.paths,
            progress=self._progress_hook(run, node_id),
        )
        try:
            self._check_interrupt()
            await self._simulated_work(node_id, class_type)
            result: NodeOutput = await cls().run(ctx, **inputs)
        except InterruptProcessing as exc:
            raise _NodeInterrupted(node_id) from exc
        except Exception as exc:
            current = {name: [format_value(value)] for name, value in inputs.items()}
            raise _NodeFailed(node_id, self._error_details(exc, current)) from exc

        ui = None
        if result.ui:
            ui = {
                "output": result.ui,
                "meta": {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                },
            }
            run.ui[node_id] = ui
            if run.client_id is not None:
                self.hub.send(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": result.ui,
                        "prompt_id": run.prompt_id,
                    },
                    run.client_id,
                )
        self.cache.put(signature, CachedNode(result.values, ui))
        run.values[node_id] = result.values
        run.progress.finish(node_id)
        run.executed.append(node_id)

    @staticmethod
    def _error_details(exc: BaseException, current_inputs: dict[str, Any]) -> dict[str, Any]:
        return {
            "exception_message": f"{exc}\n",
            "exception_type": full_type_name(type(exc)),
            "traceback": traceback.format_tb(exc.__traceback__),
            "current_inputs": current_inputs,
        }

    def _gather_inputs(self, run: _Run, node_id: str) -> dict[str, Any]:
        node = run.prompt[node_id]
        raw = node.get("inputs", {})
        inputs: dict[str, Any] = {}
        for name in run.plan.declared[node_id]:
            if name not in raw:
                continue
            value = raw[name]
            if is_link(value):
                source = value[0]
                if source not in run.values:
                    # A cached source was never scheduled: its outputs are in the cache.
                    hit = self.cache.get(run.plan.signatures[source])
                    assert hit is not None, f"node {source} neither ran nor is cached"
                    run.values[source] = hit.values
                value = run.values[source][int(value[1])]
            inputs[name] = value
        hidden = NODE_CLASSES[node["class_type"]].hidden
        if "prompt" in hidden:
            inputs["prompt"] = run.prompt
        if "extra_pnginfo" in hidden:
            inputs["extra_pnginfo"] = run.extra_data.get("extra_pnginfo")
        return inputs

    def _progress_hook(self, run: _Run, node_id: str) -> ProgressFn:
        async def progress(value: int, total: int, png: bytes | None) -> None:
            # ComfyUI's progress hook is also an interrupt point.
            self._check_interrupt()
            value = min(value, total)
            run.progress.update(node_id, value, total)
            metadata = {
                "node_id": node_id,
                "prompt_id": run.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            # Clients that negotiated metadata get the new frame before "progress", others
            # get the old frame after it: the order ComfyUI produces.
            new_style = self.hub.supports_preview_metadata(run.client_id)
            if png is not None and new_style:
                self.hub.send_preview(png, metadata, run.client_id)
            self.hub.send(
                "progress",
                {"value": value, "max": total, "prompt_id": run.prompt_id, "node": node_id},
                run.client_id,
            )
            if png is not None and not new_style:
                self.hub.send_preview(png, metadata, run.client_id)
            # Let the publisher drain between frames of a long batch.
            await asyncio.sleep(0)

        return progress

    async def _simulated_work(self, node_id: str, class_type: str) -> None:
        """Test hooks: a configured delay (re-read when the config changes, cut short only
        by cancellation, i.e. shutdown) and an injected failure."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            delay = _lookup(self.settings.node_delays_s, node_id, class_type) or 0.0
            remaining = started + float(delay) - loop.time()
            if remaining <= 0:
                break
            changed = self._hooks_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        message = _lookup(self.settings.fail_nodes, node_id, class_type)
        if message is not None:
            raise RuntimeError(str(message))
