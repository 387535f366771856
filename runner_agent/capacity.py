"""Capacity probe: GPUs through NVML (nvidia-ml-py), the host through psutil.

No driver is a normal case (a CPU box, a container without the GPU mounted): the GPUs are
then taken from ComfyUI's ``/system_stats`` devices, or there are none. A single sensor a
board lacks is ``None``, never an error.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil

from protocol.capacity import Capacity, GpuInfo, HostInfo

__all__ = [
    "NvmlProbe",
    "NvmlReading",
    "devices_of_instances",
    "gpus_from_comfyui",
    "probe_capacity",
    "read_host",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class NvmlReading:
    """What one NVML pass saw."""

    driver_version: str | None = None
    cuda_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)


def _text(value: object) -> str:
    # Older nvidia-ml-py releases return bytes where newer ones return str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version integer (12040) as people write it ("12.4")."""
    return f"{version // 1000}.{version % 1000 // 10}"


class NvmlProbe:
    """Reads the GPUs through NVML; blocking, so call :meth:`read` from a worker thread.

    NVML is initialised on the first read and kept until :meth:`close`. When it cannot
    start, or the driver goes away later, the probe reports no GPUs, keeps the reason in
    ``unavailable_reason`` and tries again on the next read.
    """

    def __init__(self, nvml: Any = None) -> None:
        # ``nvml``: the pynvml module, or a stand-in with the same names (tests).
        self._nvml = nvml
        self._initialised = False
        self._closed = False
        self._lock = threading.Lock()
        self.unavailable_reason: str | None = None

    @property
    def available(self) -> bool:
        return self._initialised

    def read(self) -> NvmlReading | None:
        """One reading, or ``None`` when NVML does not answer (see ``unavailable_reason``)."""
        # NVML calls from two threads at once (two overlapping probes) would race on init.
        with self._lock:
            if self._closed or not self._ensure_init():
                return None
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as exc:
                # The driver went away (unloaded, GPU reset): start again next time.
                self._mark_unavailable(f"nvmlDeviceGetCount failed: {exc}")
                self._shutdown()
                return None
            return NvmlReading(
                driver_version=self._field(lambda: _text(nvml.nvmlSystemGetDriverVersion())),
                cuda_version=self._field(lambda: cuda_version_text(nvml.nvmlSystemGetCudaDriverVersion())),
                gpus=[self._gpu(index) for index in range(count)],
            )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._shutdown()

    def _ensure_init(self) -> bool:
        if self._initialised:
            return True
        if self._nvml is None:
            try:
                self._nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                self._mark_unavailable(f"nvidia-ml-py is not installed: {exc}")
                return False
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            self._mark_unavailable(f"nvmlInit failed: {exc}")
            return False
        self._initialised = True
        if self.unavailable_reason is not None:
            logger.info("NVML is available again")
        self.unavailable_reason = None
        return True

    def _mark_unavailable(self, reason: str) -> None:
        # Logged once per change, not on every heartbeat of a GPU-less host.
        if reason != self.unavailable_reason:
            logger.info("NVML unavailable: %s", reason)
        self.unavailable_reason = reason

    def _shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", exc)

    def _field(self, read: Callable[[], T]) -> T | None:
        """One sensor: ``None`` when this board or driver does not offer it."""
        try:
            return read()
        except self._nvml.NVMLError as exc:
            logger.debug("NVML sensor unavailable: %s", exc)
            return None

    def _gpu(self, index: int) -> GpuInfo:
        nvml = self._nvml
        handle = self._field(lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if handle is None:
            # Listed but unreachable (fallen off the bus): still counted, without figures.
            return GpuInfo(index=index)
        memory = self._field(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        utilization = self._field(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        temperature_sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        power_draw_mw = self._field(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        power_limit_mw = self._field(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        return GpuInfo(
            index=index,
            uuid=self._field(lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
            name=self._field(lambda: _text(nvml.nvmlDeviceGetName(handle))),
            memory_total_bytes=None if memory is None else int(memory.total),
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_free_bytes=None if memory is None else int(memory.free),
            utilization_pct=None if utilization is None else float(utilization.gpu),
            temperature_c=self._field(
                lambda: float(nvml.nvmlDeviceGetTemperature(handle, temperature_sensor))
            ),
            power_draw_w=None if power_draw_mw is None else power_draw_mw / 1000,
            power_limit_w=None if power_limit_mw is None else power_limit_mw / 1000,
        )


def read_host(disk_path: str) -> HostInfo:
    """Host figures from psutil; the disk is the one holding ``disk_path``."""
    memory = psutil.virtual_memory()
    try:
        disk_free_bytes: int | None = psutil.disk_usage(disk_path).free
    except OSError as exc:
        logger.warning("cannot read free space of %s: %s", disk_path, exc)
        disk_free_bytes = None
    return HostInfo(
        cpu_count=psutil.cpu_count(),
        # interval=None: the load since the previous call, without blocking for a sample.
        cpu_pct=psutil.cpu_percent(interval=None),
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        disk_free_bytes=disk_free_bytes,
    )


def gpus_from_comfyui(devices: list[dict[str, Any]]) -> list[GpuInfo]:
    """GPUs as ComfyUI's ``/system_stats`` lists them; its "cpu" device is not a GPU."""
    gpus: list[GpuInfo] = []
    for device in devices:
        if not isinstance(device, dict) or device.get("type") == "cpu":
            continue
        index = device.get("index")
        total = device.get("vram_total")
        free = device.get("vram_free")
        name = device.get("name")
        gpus.append(
            GpuInfo(
                index=index if isinstance(index, int) else len(gpus),
                name=name if isinstance(name, str) else None,
                memory_total_bytes=total if isinstance(total, int) else None,
                memory_free_bytes=free if isinstance(free, int) else None,
            )
        )
    return gpus


def devices_of_instances(
    answers: list[tuple[int, list[dict[str, Any]] | None]],
) -> list[dict[str, Any]] | None:
    """One device list for several ComfyUI instances, from ``(gpu_index, devices)`` pairs
    (``devices`` ``None`` for an instance that did not answer).

    Each instance runs on one GPU and reports it as its own device 0 (CUDA numbers the
    visible devices from 0), so its first GPU device is renumbered to the GPU index the
    instance was configured with. ``None`` when no instance answered."""
    if all(devices is None for _, devices in answers):
        return None
    merged: dict[int, dict[str, Any]] = {}
    for gpu_index, devices in answers:
        gpu = next((d for d in devices or [] if isinstance(d, dict) and d.get("type") != "cpu"), None)
        if gpu is not None and gpu_index not in merged:
            merged[gpu_index] = {**gpu, "index": gpu_index}
    return [merged[index] for index in sorted(merged)]


def _read_blocking(nvml: NvmlProbe, disk_path: str) -> tuple[NvmlReading | None, HostInfo]:
    return nvml.read(), read_host(disk_path)


async def probe_capacity(
    nvml: NvmlProbe,
    *,
    disk_path: str,
    comfyui_devices: list[dict[str, Any]] | None,
    slots: int,
) -> Capacity:
    """A capacity snapshot; NVML and psutil run in a worker thread, off the event loop."""
    reading, host = await asyncio.to_thread(_read_blocking, nvml, disk_path)
    if reading is not None:
        return Capacity(
            gpu_source="nvml",
            driver_version=reading.driver_version,
            cuda_version=reading.cuda_version,
            gpus=reading.gpus,
            host=host,
            slots=slots,
        )
    gpus = gpus_from_comfyui(comfyui_devices or [])
    return Capacity(gpu_source="comfyui" if gpus else "none", gpus=gpus, host=host, slots=slots)
