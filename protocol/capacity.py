"""Capacity snapshot of a runner host: its GPUs (from NVML) and the host (from psutil)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GpuInfo(BaseModel):
    """One GPU. Every sensor may be missing on some boards: a missing one is ``None``."""

    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None


class HostInfo(BaseModel):
    cpu_count: int | None = None
    cpu_pct: float | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    disk_free_bytes: int | None = None


class Capacity(BaseModel):
    """What the agent measured. ``gpu_source`` says where the GPU list came from:
    ``nvml`` (a driver answered), ``comfyui`` (no driver: ComfyUI's /system_stats devices),
    or ``none``."""

    gpu_source: str = "none"
    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = Field(default_factory=list)
    host: HostInfo = Field(default_factory=HostInfo)
    slots: int = 1
