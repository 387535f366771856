"""A stand-in for the part of pynvml the agent's capacity probe reads: fixed boards with the
load given, for tests that need runners with GPUs on a machine without one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

GIB = 1024**3


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """The part of pynvml the agent's probe reads: fixed boards, load as given."""

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str:
        return str(handle["uuid"])

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str:
        return str(handle["name"])

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any], version: Any = None) -> Any:
        total, used = handle["memory"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        return int(handle["temp"])

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        return int(handle["power_mw"])

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: dict[str, Any]) -> int:
        return 700_000


def h100(index: int, util: int, used_gib: int, temp: int, power_w: int) -> dict[str, Any]:
    return {
        "uuid": f"GPU-5d1c7a90-0000-4000-8000-00000000000{index}",
        "name": "NVIDIA H100 80GB HBM3",
        "memory": (80 * GIB, used_gib * GIB),
        "util": util,
        "temp": temp,
        "power_mw": power_w * 1000,
    }
