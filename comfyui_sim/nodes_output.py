"""Output nodes: they write files or show values, and what they return goes to history."""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import image_ops
from .node_base import HIDDEN_PROMPT_INFO, InputSections, InputSpec, Node, NodeContext, NodeOutput
from .paths import SimPaths, is_within

_PREFIX_TOOLTIP = (
    "The prefix for the file to save. This may include formatting information such as "
    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."
)


def _expand_prefix(prefix: str, width: int, height: int) -> str:
    # The %node.widget% forms are the frontend's job; the server only knows these.
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    for key, value in (
        ("%width%", str(width)),
        ("%height%", str(height)),
        ("%year%", str(now.tm_year)),
        ("%month%", f"{now.tm_mon:02}"),
        ("%day%", f"{now.tm_mday:02}"),
        ("%hour%", f"{now.tm_hour:02}"),
        ("%minute%", f"{now.tm_min:02}"),
        ("%second%", f"{now.tm_sec:02}"),
    ):
        prefix = prefix.replace(key, value)
    return prefix


def _next_counter(folder: str, filename: str) -> int:
    """1 + the highest NNNNN among ``{filename}_NNNNN_*`` files (ComfyUI's rule)."""
    stem_len = len(filename)
    best = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return 1
    for name in names:
        head = name[: stem_len + 1]
        if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
            continue
        try:
            digits = int(name[stem_len + 1 :].split("_")[0])
        except ValueError:
            digits = 0
        best = max(best, digits)
    return best + 1


def save_batch(
    images: np.ndarray,
    root: Path,
    prefix: str,
    kind: str,
    text: dict[str, str] | None,
    compress_level: int,
) -> list[dict[str, str]]:
    """Write each frame as ``{prefix}_{counter:05}_.png``; what ``ui.images`` lists."""
    height, width = int(images.shape[1]), int(images.shape[2])
    prefix = _expand_prefix(prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    filename = os.path.basename(os.path.normpath(prefix))
    root_abs = os.path.abspath(root)
    folder = os.path.abspath(os.path.join(root_abs, subfolder))
    if not is_within(root_abs, folder):
        raise ValueError(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {folder}\n         output_dir: {root_abs}"
        )
    counter = _next_counter(folder, filename)
    results = []
    for batch_number, image in enumerate(images):
        name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
        image_ops.save_png(image, Path(folder) / name, text, compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return results


def _png_text(prompt: Any, extra_pnginfo: Any) -> dict[str, str]:
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    if isinstance(extra_pnginfo, dict):
        for key, value in extra_pnginfo.items():
            text[str(key)] = json.dumps(value)
    return text


class SaveImage(Node):
    class_type = "SaveImage"
    display_name = "Save Image"
    description = "Saves the input images to your ComfyUI output directory."
    category = "image"
    python_module = "nodes"
    output_node = True
    hidden = HIDDEN_PROMPT_INFO
    folder_kind = "output"
    compress_level = 4

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "images": InputSpec("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": InputSpec("STRING", {"default": "ComfyUI", "tooltip": _PREFIX_TOOLTIP}),
            }
        }

    def _prefix_suffix(self) -> str:
        return ""

    async def run(
        self,
        ctx: NodeContext,
        *,
        images: np.ndarray,
        filename_prefix: str = "ComfyUI",
        prompt: Any = None,
        extra_pnginfo: Any = None,
    ) -> NodeOutput:
        root = ctx.paths.directory_for_type(self.folder_kind)
        assert root is not None
        results = await asyncio.to_thread(
            save_batch,
            images,
            root,
            filename_prefix + self._prefix_suffix(),
            self.folder_kind,
            _png_text(prompt, extra_pnginfo),
            self.compress_level,
        )
        return NodeOutput(ui={"images": results})


class PreviewImage(SaveImage):
    class_type = "PreviewImage"
    display_name = "Preview Image"
    folder_kind = "temp"
    compress_level = 1

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"images": InputSpec("IMAGE")}}

    def _prefix_suffix(self) -> str:
        # A random tag per node keeps previews of different nodes apart in temp/.
        return "_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))


class SaveImageWebsocket(Node):
    """Sends each frame as a binary websocket preview instead of writing a file."""

    class_type = "SaveImageWebsocket"
    display_name = "SaveImageWebsocket"
    category = "api/image"
    python_module = "custom_nodes.websocket_image_save"
    output_node = True

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"images": InputSpec("IMAGE")}}

    @classmethod
    def fingerprint(cls, paths: SimPaths, inputs: dict[str, Any]) -> Any:
        # ComfyUI's version returns the time: the node is never taken from the cache.
        return time.time_ns()

    async def run(self, ctx: NodeContext, *, images: np.ndarray) -> NodeOutput:
        frames = await asyncio.to_thread(lambda: [image_ops.encode_png(i, 1) for i in images])
        for step, png in enumerate(frames):
            await ctx.progress(step, len(frames), png)
        return NodeOutput()


def _preview_text(source: Any) -> str:
    if isinstance(source, str):
        return source
    if isinstance(source, bool | int | float):
        return str(source)
    if source is None:
        return "None"
    try:
        return json.dumps(source)
    except (TypeError, ValueError):
        return str(source)


class PreviewAny(Node):
    class_type = "PreviewAny"
    display_name = "Preview Any"
    category = "utils"
    python_module = "comfy_extras.nodes_preview_any"
    output_node = True

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"source": InputSpec("*", {})}}

    async def run(self, ctx: NodeContext, *, source: Any = None) -> NodeOutput:
        return NodeOutput(ui={"text": [_preview_text(source)]})


OUTPUT_NODES: tuple[type[Node], ...] = (SaveImage, PreviewImage, SaveImageWebsocket, PreviewAny)
