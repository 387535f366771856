"""Image arithmetic of the simulated nodes, on numpy arrays shaped like ComfyUI's tensors.

IMAGE is float32 [batch, height, width, 3] in 0..1 and MASK is float32 [batch, height,
width]. Every function is synchronous and CPU-bound: nodes call them through
``asyncio.to_thread`` so the event loop keeps serving HTTP and websockets.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

FloatArray = np.ndarray

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
CROP_METHODS = ("disabled", "center")


def empty_image(width: int, height: int, batch_size: int, color: int) -> FloatArray:
    rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), (batch_size, height, width, 3)).copy()


def load_image(path: Path) -> tuple[FloatArray, FloatArray]:
    """IMAGE and MASK of a file the way LoadImage reads it: every frame of the first
    frame's size, the mask being 1 - alpha (or 64x64 zeros without alpha)."""
    images: list[FloatArray] = []
    masks: list[FloatArray] = []
    with Image.open(path) as img:
        size: tuple[int, int] | None = None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                # 16-bit greyscale PNGs arrive as mode I; ComfyUI scales them to 8 bits.
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            images.append(np.asarray(rgb, dtype=np.float32) / 255.0)
            if "A" in frame.getbands():
                alpha = np.asarray(frame.getchannel("A"), dtype=np.float32) / 255.0
                masks.append(1.0 - alpha)
            elif frame.mode == "P" and "transparency" in frame.info:
                alpha = np.asarray(frame.convert("RGBA").getchannel("A"), dtype=np.float32)
                masks.append(1.0 - alpha / 255.0)
            else:
                masks.append(np.zeros((64, 64), dtype=np.float32))
        multi_frame = len(images) > 1 and img.format != "MPO"
    if not multi_frame:
        return images[0][None], masks[0][None]
    return np.stack(images), np.stack(masks)


def invert(images: FloatArray) -> FloatArray:
    return (1.0 - images).astype(np.float32)


def _linear_weights(n_in: int, n_out: int) -> FloatArray:
    # torch's bilinear with align_corners=False and no antialiasing, one axis at a time.
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    scale = n_in / n_out
    for o in range(n_out):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        weights[o, i0] += 1.0 - frac
        weights[o, i1] += frac
    return weights


def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0


def _cubic_weights(n_in: int, n_out: int) -> FloatArray:
    # torch's bicubic (A = -0.75, edge samples clamped), one axis at a time.
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            idx = min(max(base + k, 0), n_in - 1)
            weights[o, idx] += _cubic(k - frac)
    return weights


def _nearest_weights(n_in: int, n_out: int) -> FloatArray:
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    scale = n_in / n_out
    for o in range(n_out):
        weights[o, min(math.floor((o + 0.5) * scale), n_in - 1)] = 1.0
    return weights


def _area_weights(n_in: int, n_out: int) -> FloatArray:
    # adaptive_avg_pool: output cell o averages input cells [floor(o*in/out), ceil(..)).
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    for o in range(n_out):
        start = (o * n_in) // n_out
        end = -((-(o + 1) * n_in) // n_out)
        weights[o, start:end] = 1.0 / (end - start)
    return weights


_WEIGHTS = {
    "nearest-exact": _nearest_weights,
    "bilinear": _linear_weights,
    "bicubic": _cubic_weights,
    "area": _area_weights,
}


def _center_crop(images: FloatArray, width: int, height: int) -> FloatArray:
    old_h, old_w = images.shape[1], images.shape[2]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return images[:, y : old_h - y, x : old_w - x, :]


def _lanczos(images: FloatArray, width: int, height: int) -> FloatArray:
    # ComfyUI goes through 8-bit Pillow images for lanczos, so the result is quantised.
    out = []
    for image in images:
        planes = []
        for c in range(image.shape[-1]):
            plane = Image.fromarray(np.clip(image[..., c] * 255.0, 0, 255).astype(np.uint8))
            planes.append(np.asarray(plane.resize((width, height), Image.Resampling.LANCZOS)))
        out.append(np.stack(planes, axis=-1).astype(np.float32) / 255.0)
    return np.stack(out)


def scale(images: FloatArray, method: str, width: int, height: int, crop: str) -> FloatArray:
    """ImageScale: width or height 0 keeps the aspect ratio, both 0 is a no-op."""
    if width == 0 and height == 0:
        return images
    in_h, in_w = images.shape[1], images.shape[2]
    if width == 0:
        width = max(1, round(in_w * height / in_h))
    elif height == 0:
        height = max(1, round(in_h * width / in_w))
    src = _center_crop(images, width, height) if crop == "center" else images
    if method == "lanczos":
        return _lanczos(src, width, height)
    make = _WEIGHTS[method]
    rows = make(src.shape[1], height)
    cols = make(src.shape[2], width)
    out = np.einsum("oh,bhwc->bowc", rows, src, optimize=True)
    out = np.einsum("pw,bowc->bopc", cols, out, optimize=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def blur(images: FloatArray, radius: int, sigma: float) -> FloatArray:
    """ImageBlur: a (2r+1)² gaussian over a [-1, 1] grid, reflect-padded edges."""
    if radius == 0:
        return images
    size = radius * 2 + 1
    grid = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    # The 2-D kernel exp(-(x²+y²)/2σ²) is a product of two 1-D ones: blur rows, then columns.
    kernel = np.exp(-(grid * grid) / (2.0 * sigma * sigma))
    kernel = (kernel / kernel.sum()).astype(np.float32)
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = images.shape[1], images.shape[2]
    rows = np.zeros((images.shape[0], h, padded.shape[2], images.shape[3]), dtype=np.float32)
    for k, weight in enumerate(kernel):
        rows += weight * padded[:, k : k + h, :, :]
    out = np.zeros_like(images, dtype=np.float32)
    for k, weight in enumerate(kernel):
        out += weight * rows[:, :, k : k + w, :]
    return out


def add_noise(images: FloatArray, seed: int, strength: float) -> FloatArray:
    """ImageAddNoise: the same seed gives the same noise (numpy's generator, not torch's)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(images.shape, dtype=np.float32)
    # numpy's stubs type np.clip on an untyped-dtype array as Any; the annotation pins it.
    clipped: FloatArray = np.clip(images + strength * noise, 0.0, 1.0)
    return clipped.astype(np.float32)


def solid_mask(value: float, width: int, height: int) -> FloatArray:
    return np.full((1, height, width), value, dtype=np.float32)


def mask_to_image(mask: FloatArray) -> FloatArray:
    flat = mask.reshape((-1, mask.shape[-2], mask.shape[-1]))
    return np.repeat(flat[..., None], 3, axis=-1).astype(np.float32)


def to_pil(image: FloatArray) -> Image.Image:
    """One [H, W, C] frame to an 8-bit Pillow image, truncating like ComfyUI's savers."""
    pixels = np.clip(255.0 * image, 0, 255).astype(np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels)


def save_png(image: FloatArray, path: Path, text: dict[str, str] | None, compress_level: int) -> None:
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    to_pil(image).save(path, pnginfo=info, compress_level=compress_level)


def encode_png(image: FloatArray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
