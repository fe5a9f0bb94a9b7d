"""NVML collector against a fake ``pynvml``: series present with a GPU, absent (no error) without."""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from genserve_server import gpu_metrics
from genserve_server.gpu_metrics import register_gpu_collector


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeRates:
    gpu: int
    memory: int = 0


@dataclass
class FakeMemory:
    used: int
    total: int = 80 * 2**30
    free: int = 0


@dataclass
class FakeNvml:
    """The slice of the pynvml API the collector uses, with switchable failures."""

    utilization_percent: list[int]
    memory_used_bytes: list[int]
    init_error: bool = False
    unsupported_utilization: set[int] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)

    NVMLError = FakeNVMLError

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.utilization_percent)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.utilization_percent):
            raise FakeNVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> FakeRates:
        self.calls.append(f"util{handle}")
        if handle in self.unsupported_utilization:
            raise FakeNVMLError("Not Supported")
        return FakeRates(gpu=self.utilization_percent[handle])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeMemory:
        return FakeMemory(used=self.memory_used_bytes[handle])


def scrape(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """{metric name: {gpu label: value}} from the text exposition."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("gpu", "")] = sample.value
    return out


def test_two_gpus_export_ratio_and_bytes() -> None:
    fake = FakeNvml(utilization_percent=[37, 100], memory_used_bytes=[1_500_000_000, 3])
    registry = CollectorRegistry()
    collector = register_gpu_collector(registry, nvml=fake)  # type: ignore[arg-type]
    assert collector is not None and collector.device_count == 2
    # Registration reads no device: describe() gives the names.
    assert not any(c.startswith("util") for c in fake.calls)

    series = scrape(registry)
    assert series["genserve_gpu_utilization_ratio"] == {"0": pytest.approx(0.37), "1": 1.0}
    assert series["genserve_gpu_memory_used_bytes"] == {"0": 1_500_000_000.0, "1": 3.0}

    # Values are read at scrape time, not at registration.
    fake.utilization_percent[0] = 5
    assert scrape(registry)["genserve_gpu_utilization_ratio"]["0"] == pytest.approx(0.05)

    text = generate_latest(registry).decode()
    assert "# TYPE genserve_gpu_utilization_ratio gauge" in text
    assert "# TYPE genserve_gpu_memory_used_bytes gauge" in text


def test_unsupported_reading_leaves_that_series_out(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(utilization_percent=[10, 20], memory_used_bytes=[7, 8], unsupported_utilization={1})
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, nvml=fake) is not None  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger=gpu_metrics.__name__):
        series = scrape(registry)
        scrape(registry)
    assert series["genserve_gpu_utilization_ratio"] == {"0": pytest.approx(0.1)}
    assert series["genserve_gpu_memory_used_bytes"] == {"0": 7.0, "1": 8.0}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "a failing read warns once, not on every scrape"


def test_no_driver_registers_nothing_and_raises_nothing() -> None:
    fake = FakeNvml(utilization_percent=[50], memory_used_bytes=[1], init_error=True)
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, nvml=fake) is None  # type: ignore[arg-type]
    assert generate_latest(registry) == b""


def test_no_gpu_registers_nothing_and_shuts_nvml_down() -> None:
    fake = FakeNvml(utilization_percent=[], memory_used_bytes=[])
    registry = CollectorRegistry()
    assert register_gpu_collector(registry, nvml=fake) is None  # type: ignore[arg-type]
    assert generate_latest(registry) == b""
    assert fake.calls == ["init", "shutdown"]


def test_package_missing_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import pynvml` raise ImportError.
    monkeypatch.setitem(sys.modules, gpu_metrics.NVML_MODULE, None)
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is None
    assert generate_latest(registry) == b""


def test_lazy_import_uses_pynvml_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(utilization_percent=[0], memory_used_bytes=[0])
    module = types.ModuleType(gpu_metrics.NVML_MODULE)
    for name in (
        "nvmlInit",
        "nvmlShutdown",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo",
    ):
        setattr(module, name, getattr(fake, name))
    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, gpu_metrics.NVML_MODULE, module)
    registry = CollectorRegistry()
    assert register_gpu_collector(registry) is not None
    assert scrape(registry)["genserve_gpu_memory_used_bytes"] == {"0": 0.0}


def test_close_shuts_down_once_and_empties_scrapes() -> None:
    fake = FakeNvml(utilization_percent=[1], memory_used_bytes=[2])
    registry = CollectorRegistry()
    collector = register_gpu_collector(registry, nvml=fake)  # type: ignore[arg-type]
    assert collector is not None
    collector.close()
    collector.close()
    assert fake.calls.count("shutdown") == 1
    assert "genserve_gpu_memory_used_bytes{" not in generate_latest(registry).decode()
