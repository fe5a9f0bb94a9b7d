"""GPU utilisation and memory from NVML, exported as a custom Prometheus collector.

NVML comes from ``nvidia-ml-py`` (module ``pynvml``), the server's optional ``gpu-metrics`` extra.
It is imported lazily, at registration, so a CPU-only server neither needs the package nor pays for
it. Where the package, the driver or a GPU is missing, :func:`register_gpu_collector` registers
nothing and returns ``None``: the series are then absent (not zero), so dashboards show "no data"
rather than an idle GPU.

Series (see docs/metrics-contract.md), read from NVML at scrape time:

- ``genserve_gpu_utilization_ratio{gpu}``: fraction of the last sample period in which a kernel ran
  (NVML's ``utilization.gpu`` percent / 100), 0..1.
- ``genserve_gpu_memory_used_bytes{gpu}``: device memory in use, all processes.

``gpu`` is the NVML device index as a string ("0", "1", ...).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

logger = logging.getLogger(__name__)

GPU_UTILIZATION_METRIC = "genserve_gpu_utilization_ratio"
GPU_MEMORY_USED_METRIC = "genserve_gpu_memory_used_bytes"
NVML_MODULE = "pynvml"

_UTILIZATION_DOC = "GPU busy fraction over NVML's last sample period (0..1), per device"
_MEMORY_DOC = "GPU device memory in use, all processes, per device"


class NvmlCollector(Collector):
    """Reads utilisation and used memory of every NVML device on each scrape.

    Build it through :func:`register_gpu_collector`; it expects NVML already initialised and owns
    the matching ``nvmlShutdown`` in :meth:`close`.
    """

    def __init__(self, nvml: Any, device_count: int) -> None:
        self._nvml = nvml
        self._device_count = device_count
        self._closed = False
        self._lock = threading.Lock()
        # (gpu index, metric name) pairs whose read failed once: warn once, then stay quiet.
        self._warned: set[tuple[int, str]] = set()

    @property
    def device_count(self) -> int:
        return self._device_count

    def describe(self) -> Iterator[Metric]:
        # Names only, so that registering does not call into NVML.
        yield GaugeMetricFamily(GPU_UTILIZATION_METRIC, _UTILIZATION_DOC, labels=["gpu"])
        yield GaugeMetricFamily(GPU_MEMORY_USED_METRIC, _MEMORY_DOC, labels=["gpu"])

    def collect(self) -> Iterator[Metric]:
        utilization = GaugeMetricFamily(GPU_UTILIZATION_METRIC, _UTILIZATION_DOC, labels=["gpu"])
        memory_used = GaugeMetricFamily(GPU_MEMORY_USED_METRIC, _MEMORY_DOC, labels=["gpu"])
        with self._lock:
            if not self._closed:
                for index in range(self._device_count):
                    self._collect_device(index, utilization, memory_used)
        yield utilization
        yield memory_used

    def _collect_device(
        self, index: int, utilization: GaugeMetricFamily, memory_used: GaugeMetricFamily
    ) -> None:
        gpu = str(index)
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        except self._nvml.NVMLError as err:
            self._warn_once(index, "handle", err)
            return
        try:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            utilization.add_metric([gpu], float(rates.gpu) / 100.0)
        except self._nvml.NVMLError as err:
            # e.g. NVML_ERROR_NOT_SUPPORTED on a MIG slice: leave the series out for this device.
            self._warn_once(index, GPU_UTILIZATION_METRIC, err)
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            memory_used.add_metric([gpu], float(info.used))
        except self._nvml.NVMLError as err:
            self._warn_once(index, GPU_MEMORY_USED_METRIC, err)

    def _warn_once(self, index: int, what: str, err: Exception) -> None:
        key = (index, what)
        if key in self._warned:
            logger.debug("NVML read of %s failed for gpu %d: %s", what, index, err)
            return
        self._warned.add(key)
        logger.warning("NVML read of %s failed for gpu %d (series left out): %s", what, index, err)

    def close(self) -> None:
        """Shut NVML down; later scrapes yield empty families. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as err:
                logger.warning("nvmlShutdown failed: %s", err)


def _import_nvml() -> ModuleType | None:
    try:
        return importlib.import_module(NVML_MODULE)
    except ImportError:
        logger.info(
            "GPU metrics off: %s not installed (pip install 'genserve-server[gpu-metrics]')", NVML_MODULE
        )
        return None


def register_gpu_collector(
    registry: CollectorRegistry, nvml: ModuleType | None = None
) -> NvmlCollector | None:
    """Register the NVML collector on ``registry`` when a GPU is present.

    Args:
        registry: where the two ``genserve_gpu_*`` gauges are registered.
        nvml: the ``pynvml`` module, or a stand-in with the same functions (tests); ``None``
            imports ``pynvml`` lazily.

    Returns:
        The registered collector (call ``close()`` at shutdown and unregister it if the registry
        outlives it), or ``None`` when NVML, its driver or any GPU is missing; then nothing is
        registered and nothing is raised.
    """
    module = nvml if nvml is not None else _import_nvml()
    if module is None:
        return None
    try:
        module.nvmlInit()
    except module.NVMLError as err:
        logger.info("GPU metrics off: NVML could not start (no NVIDIA driver?): %s", err)
        return None
    try:
        device_count = int(module.nvmlDeviceGetCount())
    except module.NVMLError as err:
        logger.info("GPU metrics off: NVML could not count devices: %s", err)
        _shutdown_quietly(module)
        return None
    if device_count <= 0:
        logger.info("GPU metrics off: NVML sees no GPU")
        _shutdown_quietly(module)
        return None
    collector = NvmlCollector(module, device_count)
    registry.register(collector)
    logger.info("GPU metrics on: %d NVML device(s)", device_count)
    return collector


def _shutdown_quietly(module: Any) -> None:
    try:
        module.nvmlShutdown()
    except module.NVMLError as err:
        logger.debug("nvmlShutdown after a failed start: %s", err)


def gpu_metric_names() -> Sequence[str]:
    """The metric names this module may export (present only where a GPU is)."""
    return (GPU_UTILIZATION_METRIC, GPU_MEMORY_USED_METRIC)
