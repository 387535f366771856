"""A model loader without models: CheckpointLoaderSimple offers the files placed under
``models/checkpoints/`` (empty files will do) and hands out stand-ins for them. No node of
the simulator consumes MODEL, CLIP or VAE; the loader is there so that runners can differ in
the models they offer and schedulers can be tested against it."""

from __future__ import annotations

import asyncio
from typing import Any

from .node_base import InputSections, InputSpec, Node, NodeContext, NodeOutput
from .paths import SimPaths


class CheckpointLoaderSimple(Node):
    class_type = "CheckpointLoaderSimple"
    display_name = "Load Checkpoint"
    category = "loaders"
    python_module = "nodes"
    return_types = ("MODEL", "CLIP", "VAE")

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"ckpt_name": InputSpec(paths.model_files("checkpoints"), {})}}

    async def run(self, ctx: NodeContext, *, ckpt_name: str, **_: Any) -> NodeOutput:
        files = await asyncio.to_thread(ctx.paths.model_files, "checkpoints")
        if ckpt_name not in files:
            raise FileNotFoundError(f"checkpoint not found: {ckpt_name}")
        return NodeOutput((f"model:{ckpt_name}", f"clip:{ckpt_name}", f"vae:{ckpt_name}"))


MODEL_NODES: tuple[type[Node], ...] = (CheckpointLoaderSimple,)
