"""What the local ComfyUI offers, fetched once per ComfyUI start and reused.

``/object_info`` is half a megabyte; jobs need its input types (to convert placeholder values)
and its output classes (to count the nodes a prompt will run). It only changes when ComfyUI
restarts (new custom nodes, new model files), so it is dropped whenever ComfyUI was seen
unreachable and fetched again on next use.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from protocol.comfy_types import combo_options, input_types, model_files
from protocol.messages import ComfyUIInfo
from runner_agent.comfyui import ComfyUIClient, ComfyUIError

log = logging.getLogger(__name__)


class ComfyUIInfoCache:
    def __init__(self, comfy: ComfyUIClient) -> None:
        self.comfy = comfy
        self._object_info: dict[str, Any] | None = None
        self._input_types: dict[str, dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._object_info = None
        self._input_types = None

    async def object_info(self) -> dict[str, Any]:
        # One fetch however many jobs start at once.
        async with self._lock:
            if self._object_info is None:
                self._object_info = await self.comfy.object_info()
                self._input_types = None
            return self._object_info

    async def input_types(self) -> dict[str, dict[str, str]]:
        info = await self.object_info()
        if self._input_types is None:
            self._input_types = input_types(info)
        return self._input_types

    async def output_classes(self) -> set[str]:
        info = await self.object_info()
        return {name for name, spec in info.items() if isinstance(spec, dict) and spec.get("output_node")}

    async def describe(self) -> tuple[ComfyUIInfo, list[dict[str, Any]] | None]:
        """Fresh info for a hello, and ComfyUI's devices (``None`` when it does not answer).
        A ComfyUI that is down gives an info with its URL only: the agent still connects."""
        self.invalidate()
        try:
            stats = await self.comfy.system_stats()
            info = await self.object_info()
        except ComfyUIError as exc:
            log.warning(
                "ComfyUI at %s does not answer; announcing it without details: %s", self.comfy.base_url, exc
            )
            return ComfyUIInfo(url=self.comfy.base_url), None
        system = stats.get("system") if isinstance(stats.get("system"), dict) else {}
        version = system.get("comfyui_version") if isinstance(system, dict) else None
        devices = [d for d in stats.get("devices") or [] if isinstance(d, dict)]
        return (
            ComfyUIInfo(
                url=self.comfy.base_url,
                version=version if isinstance(version, str) else None,
                node_classes=sorted(info),
                models=model_files(info),
                devices=devices,
                input_types=input_types(info),
                combo_options=combo_options(info),
            ),
            devices,
        )
