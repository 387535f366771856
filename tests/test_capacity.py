"""The capacity probe against a stand-in NVML: what the control plane learns of a host."""

from __future__ import annotations

import inspect
import json
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from protocol.capacity import GpuInfo
from runner_agent.capacity import NvmlProbe, cuda_version_text, probe_capacity

CAPTURED = Path(__file__).resolve().parent / "fixtures" / "comfyui"
NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error {self.value}"


class FakeNvml:
    """The part of pynvml the probe uses, with the same names and parameters.

    ``broken`` names functions that raise NVMLError (a sensor the board lacks); ``gone``
    makes the device count fail, as when the driver is unloaded under a running agent."""

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]], *, broken: set[str] | None = None) -> None:
        self.gpus = gpus
        self.broken = broken or set()
        self.init_error: int | None = None
        self.gone = False
        self.calls: Counter[str] = Counter()
        self.count_thread: int | None = None

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.broken:
            raise FakeNvmlError(NOT_SUPPORTED)

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        if self.init_error is not None:
            raise FakeNvmlError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        self.count_thread = threading.get_ident()
        if self.gone:
            raise FakeNvmlError(DRIVER_NOT_LOADED)
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call("nvmlSystemGetDriverVersion")
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call("nvmlSystemGetCudaDriverVersion")
        return 12040

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        self._call("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str | bytes:
        self._call("nvmlDeviceGetUUID")
        return handle["uuid"]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str | bytes:
        self._call("nvmlDeviceGetName")
        return handle["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any], version: Any = None) -> Any:
        self._call("nvmlDeviceGetMemoryInfo")
        total, used = handle["memory"]
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> Any:
        self._call("nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=handle["util"], memory=10)

    def nvmlDeviceGetTemperature(self, handle: dict[str, Any], sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle["temp"]

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        self._call("nvmlDeviceGetPowerUsage")
        return handle["power_mw"]

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: dict[str, Any]) -> int:
        self._call("nvmlDeviceGetEnforcedPowerLimit")
        return handle["limit_mw"]


GIB = 1024**3
H100 = {
    "uuid": "GPU-1f3c0a2e-0000-4000-8000-000000000001",
    "name": "NVIDIA H100 80GB HBM3",
    "memory": (80 * GIB, 2 * GIB),
    "util": 37,
    "temp": 41,
    "power_mw": 71234,
    "limit_mw": 700000,
}
# Older nvidia-ml-py releases hand back bytes for strings.
OLD_BINDINGS_GPU = {
    **H100,
    "uuid": b"GPU-1f3c0a2e-0000-4000-8000-000000000002",
    "name": b"NVIDIA A10",
}
CUDA_DEVICE = {
    "name": "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
    "type": "cuda",
    "index": 0,
    "vram_total": 25_386_352_640,
    "vram_free": 24_000_000_000,
    "torch_vram_total": 0,
    "torch_vram_free": 0,
}


def cpu_devices() -> list[dict[str, Any]]:
    return json.loads((CAPTURED / "system_stats.json").read_text())["devices"]


async def probe(fake: FakeNvml | NvmlProbe, tmp_path: Path, **kwargs: Any) -> Any:
    nvml = fake if isinstance(fake, NvmlProbe) else NvmlProbe(fake)
    kwargs.setdefault("comfyui_devices", [CUDA_DEVICE])
    kwargs.setdefault("slots", 2)
    return await probe_capacity(nvml, disk_path=str(tmp_path), **kwargs)


def test_fake_matches_the_real_pynvml_signatures() -> None:
    # The fake is only worth its tests if the probe could call real pynvml the same way.
    for name, member in vars(FakeNvml).items():
        if not name.startswith("nvml"):
            continue
        real = inspect.signature(getattr(pynvml, name))
        fake = inspect.signature(member)
        assert list(real.parameters) == list(fake.parameters)[1:], name
    assert pynvml.NVML_TEMPERATURE_GPU == FakeNvml.NVML_TEMPERATURE_GPU


async def test_every_gpu_figure_is_reported(tmp_path: Path) -> None:
    capacity = await probe(FakeNvml([H100, OLD_BINDINGS_GPU]), tmp_path)
    assert capacity.gpu_source == "nvml"
    assert capacity.driver_version == "550.54.15"
    assert capacity.cuda_version == "12.4"
    assert capacity.slots == 2
    assert capacity.gpus[0] == GpuInfo(
        index=0,
        uuid=H100["uuid"],
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=2 * GIB,
        memory_free_bytes=78 * GIB,
        utilization_pct=37.0,
        temperature_c=41.0,
        power_draw_w=71.234,
        power_limit_w=700.0,
    )
    assert capacity.gpus[1].index == 1
    assert capacity.gpus[1].uuid == "GPU-1f3c0a2e-0000-4000-8000-000000000002"
    assert capacity.gpus[1].name == "NVIDIA A10"


async def test_host_figures_come_along(tmp_path: Path) -> None:
    host = (await probe(FakeNvml([]), tmp_path)).host
    assert host.cpu_count is not None and host.cpu_count >= 1
    assert host.cpu_pct is not None and 0 <= host.cpu_pct <= 100 * host.cpu_count
    assert host.memory_total_bytes is not None
    assert host.memory_available_bytes is not None
    assert 0 < host.memory_available_bytes <= host.memory_total_bytes
    assert host.disk_free_bytes is not None and host.disk_free_bytes > 0


async def test_a_missing_disk_path_loses_only_that_figure(tmp_path: Path) -> None:
    host = (await probe(FakeNvml([]), tmp_path / "not-there")).host
    assert host.disk_free_bytes is None
    assert host.memory_total_bytes is not None


async def test_missing_sensors_are_none_and_the_rest_still_reads(tmp_path: Path) -> None:
    fake = FakeNvml(
        [H100],
        broken={
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetEnforcedPowerLimit",
            "nvmlSystemGetCudaDriverVersion",
        },
    )
    capacity = await probe(fake, tmp_path)
    assert capacity.gpu_source == "nvml"
    assert capacity.cuda_version is None
    assert capacity.driver_version == "550.54.15"
    gpu = capacity.gpus[0]
    assert (gpu.temperature_c, gpu.power_draw_w, gpu.power_limit_w) == (None, None, None)
    assert gpu.memory_free_bytes == 78 * GIB
    assert gpu.utilization_pct == 37.0
    assert gpu.name == "NVIDIA H100 80GB HBM3"


async def test_a_gpu_without_a_handle_is_still_counted(tmp_path: Path) -> None:
    fake = FakeNvml([H100], broken={"nvmlDeviceGetHandleByIndex"})
    capacity = await probe(fake, tmp_path)
    assert capacity.gpus == [GpuInfo(index=0)]


async def test_no_driver_falls_back_to_comfyui_devices(tmp_path: Path) -> None:
    fake = FakeNvml([H100])
    fake.init_error = DRIVER_NOT_LOADED
    nvml = NvmlProbe(fake)
    capacity = await probe(nvml, tmp_path)
    assert capacity.gpu_source == "comfyui"
    assert capacity.driver_version is None
    assert capacity.gpus == [
        GpuInfo(
            index=0,
            name="cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync",
            memory_total_bytes=25_386_352_640,
            memory_free_bytes=24_000_000_000,
        )
    ]
    assert nvml.available is False
    assert nvml.unavailable_reason == f"nvmlInit failed: NVML error {DRIVER_NOT_LOADED}"


async def test_a_cpu_only_comfyui_means_no_gpus(tmp_path: Path) -> None:
    fake = FakeNvml([])
    fake.init_error = DRIVER_NOT_LOADED
    for devices in (cpu_devices(), None, []):
        capacity = await probe(fake, tmp_path, comfyui_devices=devices)
        assert (capacity.gpu_source, capacity.gpus) == ("none", [])


async def test_missing_bindings_are_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes "import pynvml" fail, as on a host without nvidia-ml-py.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    nvml = NvmlProbe()
    capacity = await probe(nvml, tmp_path, comfyui_devices=cpu_devices())
    assert capacity.gpu_source == "none"
    assert nvml.unavailable_reason is not None
    assert nvml.unavailable_reason.startswith("nvidia-ml-py is not installed")


async def test_a_driver_that_disappears_and_comes_back(tmp_path: Path) -> None:
    fake = FakeNvml([H100])
    nvml = NvmlProbe(fake)
    assert (await probe(nvml, tmp_path)).gpu_source == "nvml"

    fake.gone = True
    capacity = await probe(nvml, tmp_path, comfyui_devices=cpu_devices())
    assert (capacity.gpu_source, capacity.gpus) == ("none", [])
    assert nvml.available is False
    assert nvml.unavailable_reason == f"nvmlDeviceGetCount failed: NVML error {DRIVER_NOT_LOADED}"
    # The dead session is let go so that the next init starts clean.
    assert fake.calls["nvmlShutdown"] == 1

    fake.gone = False
    capacity = await probe(nvml, tmp_path)
    assert capacity.gpu_source == "nvml"
    assert len(capacity.gpus) == 1
    assert fake.calls["nvmlInit"] == 2
    assert nvml.unavailable_reason is None


async def test_nvml_is_initialised_once_and_shut_down_once(tmp_path: Path) -> None:
    fake = FakeNvml([H100])
    nvml = NvmlProbe(fake)
    for _ in range(3):
        await probe(nvml, tmp_path)
    assert fake.calls["nvmlInit"] == 1
    nvml.close()
    nvml.close()
    assert fake.calls["nvmlShutdown"] == 1
    # A closed probe does not bring NVML back up.
    assert (await probe(nvml, tmp_path)).gpu_source == "comfyui"
    assert fake.calls["nvmlInit"] == 1


def test_closing_a_probe_that_never_started_calls_nothing() -> None:
    fake = FakeNvml([H100])
    NvmlProbe(fake).close()
    assert fake.calls == Counter()


async def test_nvml_is_read_off_the_event_loop(tmp_path: Path) -> None:
    fake = FakeNvml([H100])
    await probe(fake, tmp_path)
    assert fake.count_thread is not None
    assert fake.count_thread != threading.get_ident()


@pytest.mark.parametrize(
    ("raw", "text"), [(12040, "12.4"), (11080, "11.8"), (12090, "12.9"), (13000, "13.0")]
)
def test_cuda_version_reads_as_people_write_it(raw: int, text: str) -> None:
    assert cuda_version_text(raw) == text


def test_the_real_bindings_on_this_host_never_raise() -> None:
    # With or without a GPU here, a reading and a reason never both exist.
    nvml = NvmlProbe()
    try:
        reading = nvml.read()
        assert (reading is None) == (nvml.unavailable_reason is not None)
    finally:
        nvml.close()
