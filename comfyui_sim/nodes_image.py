"""Image and mask nodes that need no model: they really compute, with numpy and Pillow."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from . import image_ops
from .node_base import InputSections, InputSpec, Node, NodeContext, NodeOutput
from .paths import SimPaths

_SIZE = {"default": 512, "min": 1, "max": 16384, "step": 1}


class EmptyImage(Node):
    class_type = "EmptyImage"
    display_name = "EmptyImage"
    category = "image"
    python_module = "nodes"
    return_types = ("IMAGE",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "width": InputSpec("INT", dict(_SIZE)),
                "height": InputSpec("INT", dict(_SIZE)),
                "batch_size": InputSpec("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": InputSpec(
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"},
                ),
            }
        }

    async def run(
        self, ctx: NodeContext, *, width: int, height: int, batch_size: int, color: int
    ) -> NodeOutput:
        image = await asyncio.to_thread(image_ops.empty_image, width, height, batch_size, color)
        return NodeOutput((image,))


def _file_sha256(paths: SimPaths, name: str) -> str:
    path = paths.annotated_path(name)
    digest = hashlib.sha256()
    if path is None or not path.is_file():
        # Nothing to hash: running the node reports the missing file.
        return f"missing:{name}"
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoadImage(Node):
    class_type = "LoadImage"
    display_name = "Load Image"
    category = "image"
    python_module = "nodes"
    return_types = ("IMAGE", "MASK")
    self_validated = ("image",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"image": InputSpec(paths.input_images(), {"image_upload": True})}}

    @classmethod
    def check_inputs(cls, paths: SimPaths, values: dict[str, Any]) -> bool | str:
        image = values.get("image")
        if not isinstance(image, str) or not paths.input_exists(image):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def fingerprint(cls, paths: SimPaths, inputs: dict[str, Any]) -> Any:
        # Re-uploading different bytes under the same name must not hit the cache.
        image = inputs.get("image")
        return _file_sha256(paths, image) if isinstance(image, str) else None

    async def run(self, ctx: NodeContext, *, image: str) -> NodeOutput:
        path = ctx.paths.annotated_path(image)
        if path is None:
            raise FileNotFoundError(f"Invalid image file: {image}")
        pixels, mask = await asyncio.to_thread(image_ops.load_image, path)
        return NodeOutput((pixels, mask))


class ImageInvert(Node):
    class_type = "ImageInvert"
    display_name = "Invert Image"
    category = "image"
    python_module = "nodes"
    return_types = ("IMAGE",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"image": InputSpec("IMAGE")}}

    async def run(self, ctx: NodeContext, *, image: Any) -> NodeOutput:
        return NodeOutput((await asyncio.to_thread(image_ops.invert, image),))


class ImageScale(Node):
    class_type = "ImageScale"
    display_name = "Upscale Image"
    category = "image/upscaling"
    python_module = "nodes"
    return_types = ("IMAGE",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        size = {"default": 512, "min": 0, "max": 16384, "step": 1}
        return {
            "required": {
                "image": InputSpec("IMAGE"),
                "upscale_method": InputSpec(list(image_ops.UPSCALE_METHODS)),
                "width": InputSpec("INT", dict(size)),
                "height": InputSpec("INT", dict(size)),
                "crop": InputSpec(list(image_ops.CROP_METHODS)),
            }
        }

    async def run(
        self,
        ctx: NodeContext,
        *,
        image: Any,
        upscale_method: str,
        width: int,
        height: int,
        crop: str,
    ) -> NodeOutput:
        scaled = await asyncio.to_thread(image_ops.scale, image, upscale_method, width, height, crop)
        return NodeOutput((scaled,))


class ImageBlur(Node):
    class_type = "ImageBlur"
    display_name = None
    category = "image/postprocessing"
    python_module = "comfy_extras.nodes_post_processing"
    return_types = ("IMAGE",)
    output_tooltips = (None,)
    v3_schema = True

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "image": InputSpec("IMAGE", {}),
                "blur_radius": InputSpec("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
                "sigma": InputSpec("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
            }
        }

    async def run(self, ctx: NodeContext, *, image: Any, blur_radius: int, sigma: float) -> NodeOutput:
        return NodeOutput((await asyncio.to_thread(image_ops.blur, image, blur_radius, sigma),))


class ImageAddNoise(Node):
    class_type = "ImageAddNoise"
    display_name = "ImageAddNoise"
    category = "image"
    python_module = "comfy_extras.nodes_images"
    return_types = ("IMAGE",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "image": InputSpec("IMAGE"),
                "seed": InputSpec(
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "control_after_generate": True,
                        "tooltip": "The random seed used for creating the noise.",
                    },
                ),
                "strength": InputSpec("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        }

    async def run(self, ctx: NodeContext, *, image: Any, seed: int, strength: float) -> NodeOutput:
        noisy = await asyncio.to_thread(image_ops.add_noise, image, seed, strength)
        return NodeOutput((noisy,))


class SolidMask(Node):
    class_type = "SolidMask"
    display_name = "SolidMask"
    category = "mask"
    python_module = "comfy_extras.nodes_mask"
    return_types = ("MASK",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {
            "required": {
                "value": InputSpec("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "width": InputSpec("INT", dict(_SIZE)),
                "height": InputSpec("INT", dict(_SIZE)),
            }
        }

    async def run(self, ctx: NodeContext, *, value: float, width: int, height: int) -> NodeOutput:
        return NodeOutput((await asyncio.to_thread(image_ops.solid_mask, value, width, height),))


class InvertMask(Node):
    class_type = "InvertMask"
    display_name = "InvertMask"
    category = "mask"
    python_module = "comfy_extras.nodes_mask"
    return_types = ("MASK",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"mask": InputSpec("MASK")}}

    async def run(self, ctx: NodeContext, *, mask: Any) -> NodeOutput:
        return NodeOutput((await asyncio.to_thread(image_ops.invert, mask),))


class MaskToImage(Node):
    class_type = "MaskToImage"
    display_name = "Convert Mask to Image"
    category = "mask"
    python_module = "comfy_extras.nodes_mask"
    return_types = ("IMAGE",)

    @classmethod
    def input_types(cls, paths: SimPaths) -> InputSections:
        return {"required": {"mask": InputSpec("MASK")}}

    async def run(self, ctx: NodeContext, *, mask: Any) -> NodeOutput:
        return NodeOutput((await asyncio.to_thread(image_ops.mask_to_image, mask),))


IMAGE_NODES: tuple[type[Node], ...] = (
    EmptyImage,
    LoadImage,
    ImageInvert,
    ImageScale,
    ImageBlur,
    ImageAddNoise,
    SolidMask,
    InvertMask,
    MaskToImage,
)
