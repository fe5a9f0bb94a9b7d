"""Running batches on one ONNX Runtime session: plain `run`, IO binding, or CUDA graphs.

Split from ort_session.py (which builds sessions): `SessionRunner` runs them, one per instance
thread where IO binding or CUDA graphs make a session's buffers per-runner.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Generic, TypeVar, overload

import numpy as np
import onnxruntime as ort

from genserve_server.gpu_gate import CAPTURE_GATE
from genserve_server.ort_session import _NP_DTYPES, FP16_ATOL, Array, RuntimeConfig, SessionInfo, max_abs_diff

logger = logging.getLogger(__name__)

# CUDA graph ids are never reused in a process: an id names one captured shape of one session.
_GRAPH_IDS: Final = itertools.count(1)
# ORT's run option for "do not capture or replay a graph on this run".
NO_GRAPH: Final = "-1"


# What a runner keeps per input shape (Runner's batch costs, the IO binding's output shapes): a
# fully convolutional model has a shape per input size (Translate at any size, SR's tile sizes:
# thousands within max_input_pixels), so only this many, the most recently used, are kept; one
# dropped is learned again at its next batch (measured, its outputs' shapes read).
MAX_SHAPES_KEPT = 256

# An output's shape and element type, as a run returned it (SessionRunner._output_shapes).
_OutputSpec = tuple[tuple[int, ...], np.dtype[Any]]

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class RecentlyUsed(Generic[_K, _V]):
    """A dict of at most MAX_SHAPES_KEPT (at creation) keys, those read or written last; thread-safe.
    A read is one dict lookup and a stamp written into its entry (atomic under the GIL, no lock): the
    runner reads these on every batch, on the path that exists to save microseconds. Writes take the
    lock; past the limit one evicts the least recently used key (a scan of the stamps: only a model
    of more sizes than the limit pays it, once per new size)."""

    def __init__(self) -> None:
        self.limit = MAX_SHAPES_KEPT
        self._items: dict[_K, list[Any]] = {}  # key -> [value, last use]
        self._clock = itertools.count()  # next() is atomic under the GIL
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def get(self, key: _K) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _V) -> _V: ...
    def get(self, key: _K, default: _V | None = None) -> _V | None:
        entry = self._items.get(key)
        if entry is None:
            return default
        entry[1] = next(self._clock)
        value: _V = entry[0]
        return value

    def __setitem__(self, key: _K, value: _V) -> None:
        with self._lock:
            self._items[key] = [value, next(self._clock)]
            while len(self._items) > self.limit:
                del self._items[min(self._items, key=lambda k: self._items[k][1])]

    def pop(self, key: _K, default: _V | None = None) -> _V | None:
        with self._lock:
            entry = self._items.pop(key, None)
            return default if entry is None else entry[0]


# --------------------------------------------------------------------------- running


class SessionRunner:
    """Runs batches on one session: plain `run`, IO binding, or CUDA graphs (per input shape).

    Not thread-safe for IO binding / CUDA graphs (one binding and one set of buffers per runner):
    use one runner per executor thread, as the server does with one session per instance.

    With CUDA graphs, ORT keeps a session's captured graphs per *thread*: every call of this runner
    goes to one dedicated thread (whoever calls `run`), so graphs captured at load by `capture_all`
    are the ones replayed. Graphs are keyed by the full padded input shape; once `capture_all` has
    run, a shape with no graph runs on CUDA without one (never a capture while serving).
    """

    def __init__(self, info: SessionInfo, config: RuntimeConfig) -> None:
        self.info = info
        self.session = info.session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # From what the session really has (effective provider options), not from the config.
        self.use_cuda_graph = info.cuda_graph
        self.use_io_binding = config.uses_io_binding or self.use_cuda_graph
        self.graph_sizes = sorted(config.cuda_graph_batch_sizes)
        self.device = "cuda" if info.on_gpu else "cpu"
        self.device_id = info.device_id
        # Output shapes and element types seen for each input shape signature, so outputs can be
        # preallocated (of the MAX_SHAPES_KEPT input shapes used last). The types are those ONNX
        # Runtime returned, not a table's: a float64 or int8 output bound as float32 failed every
        # call after the first ("Unexpected output data type").
        self._output_shapes: RecentlyUsed[tuple[tuple[int, ...], ...], list[_OutputSpec]] = RecentlyUsed()
        self._graphs: dict[tuple[tuple[int, ...], ...], _CapturedGraph] = {}
        self.sealed = False  # capture_all ran: no more captures
        # The calls' run options (plain and IO binding; without a graph where graphs are on): what
        # `abort` sets the terminate flag of.
        self.run_options = ort.RunOptions()
        self._no_graph = _no_graph_options()
        self._thread: ThreadPoolExecutor | None = None
        self._thread_id: int | None = None
        if self.use_cuda_graph:
            self._thread = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="cuda-graph", initializer=self._remember_thread
            )

    def _remember_thread(self) -> None:
        self._thread_id = threading.get_ident()

    @property
    def mode(self) -> str:
        if self.use_cuda_graph:
            return "cuda_graph"
        return "io_binding" if self.use_io_binding else "run"

    @property
    def captured_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return list(self._graphs)

    def run(self, feeds: Mapping[str, Array]) -> list[Array]:
        """Outputs in graph order, each with the batch size of the inputs."""
        if self.use_cuda_graph:
            return self._on_graph_thread(self._run_cuda_graph, feeds)
        if self.info.on_gpu:
            with CAPTURE_GATE.gpu_call():
                return self._run_plain(feeds)
        return self._run_plain(feeds)

    def _run_plain(self, feeds: Mapping[str, Array]) -> list[Array]:
        if self.use_io_binding:
            return self._run_io_binding(feeds)
        return list(self.session.run(self.output_names, dict(feeds), self.run_options))

    def capture_all(self, sample: Mapping[str, Array]) -> None:
        """Capture a graph for every size in `cuda_graph_batch_sizes` (at load, on the graph thread),
        from the shapes of `sample`'s rows; later shapes without a graph run without one."""
        if not self.use_cuda_graph:
            return

        def capture() -> None:
            for size in self.graph_sizes:
                rows = {name: np.ascontiguousarray(sample[name][:1]) for name in self.input_names}
                self._graph_for({name: _pad_batch(value, size) for name, value in rows.items()})
            self.sealed = True

        self._on_graph_thread(capture)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    def abort(self) -> None:
        """Fail the calls still running at their next node, and every later one (Runner.abort)."""
        for options in (self.run_options, self._no_graph, *(g.run_options for g in self._graphs.values())):
            options.terminate = True

    def _on_graph_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._thread is not None
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._thread.submit(fn, *args).result()

    def _run_io_binding(
        self, feeds: Mapping[str, Array], run_options: ort.RunOptions | None = None
    ) -> list[Array]:
        binding = self.session.io_binding()
        key = tuple(tuple(feeds[name].shape) for name in self.input_names)
        for name in self.input_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        shapes = self._output_shapes.get(key)
        if self.device == "cpu" and shapes is not None:
            # Bind preallocated numpy outputs: ORT writes into them, nothing is copied afterwards.
            outputs = [np.empty(shape, dtype=dtype) for shape, dtype in shapes]
            for name, array in zip(self.output_names, outputs, strict=True):
                binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
            self.session.run_with_iobinding(binding, run_options or self.run_options)
            return outputs
        for name in self.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding, run_options or self.run_options)
        result: list[Array] = binding.copy_outputs_to_cpu()
        self._output_shapes[key] = [(tuple(r.shape), r.dtype) for r in result]
        return result

    def _run_cuda_graph(self, feeds: Mapping[str, Array]) -> list[Array]:
        n = int(feeds[self.input_names[0]].shape[0])
        index = bisect.bisect_left(self.graph_sizes, n)
        if index == len(self.graph_sizes):
            # Larger than every captured size: run in captured-size chunks.
            step = self.graph_sizes[-1]
            parts = [
                self._run_cuda_graph({k: v[i : i + step] for k, v in feeds.items()})
                for i in range(0, n, step)
            ]
            return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]
        size = self.graph_sizes[index]
        padded = {name: _pad_batch(np.ascontiguousarray(feeds[name]), size) for name in self.input_names}
        graph = self._graph_for(padded)
        if graph is None:
            with CAPTURE_GATE.gpu_call():
                return [out[:n] for out in self._run_io_binding(padded, self._no_graph)]
        with CAPTURE_GATE.gpu_call():
            return [out[:n] for out in graph.run(padded)]

    def _graph_for(self, padded: Mapping[str, Array]) -> _CapturedGraph | None:
        """The graph of this exact input shape, captured now unless sealed (None then)."""
        key = tuple(tuple(padded[name].shape) for name in self.input_names)
        graph = self._graphs.get(key)
        if graph is None and not self.sealed:
            with CAPTURE_GATE.capture():
                graph = _CapturedGraph(
                    self.session,
                    self.input_names,
                    self.output_names,
                    padded,
                    next(_GRAPH_IDS),
                    self.device_id,
                )
            self._graphs[key] = graph
        return graph


_T = TypeVar("_T")


def _no_graph_options() -> ort.RunOptions:
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", NO_GRAPH)
    return options


def _pad_batch(array: Array, size: int) -> Array:
    """Pad the batch axis up to `size` by repeating the last row (valid inputs, results cropped off)."""
    n = array.shape[0]
    if n == size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - n, axis=0)])


# ORT runs a graph id this many times before it captures it (its warm-up runs), then replays it.
CAPTURE_RUNS: Final = 3


class _CapturedGraph:
    """Device buffers with fixed addresses for one input shape, replayed as a CUDA graph."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_names: list[str],
        output_names: list[str],
        feeds: Mapping[str, Array],
        graph_id: int,
        device_id: int = 0,
    ) -> None:
        self.session = session
        self.graph_id = graph_id
        self.inputs = {
            name: ort.OrtValue.ortvalue_from_numpy(feeds[name], "cuda", device_id) for name in input_names
        }
        self.binding = session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        # Outputs at fixed addresses too: learn their shapes from one run without a graph.
        probe = session.io_binding()
        for name, value in self.inputs.items():
            probe.bind_ortvalue_input(name, value)
        for name in output_names:
            probe.bind_output(name, "cuda", device_id)
        session.run_with_iobinding(probe, _no_graph_options())
        self.outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type(
                v.shape(), _NP_DTYPES.get(v.data_type(), np.float32), "cuda", device_id
            )
            for v in probe.get_outputs()
        ]
        for name, value in zip(output_names, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        # ORT's warm-up runs, then the capture; later runs replay it on the same buffers.
        for _ in range(CAPTURE_RUNS):
            session.run_with_iobinding(self.binding, self.run_options)

    def run(self, feeds: Mapping[str, Array]) -> list[Array]:
        for name, value in self.inputs.items():
            value.update_inplace(feeds[name])
        self.session.run_with_iobinding(self.binding, self.run_options)
        return [value.numpy() for value in self.outputs]


# --------------------------------------------------------------------------- fp16


def check_fp16_parity(
    fp32: SessionRunner, fp16: SessionRunner, feeds: Mapping[str, Array], atol: float = FP16_ATOL
) -> tuple[bool, float]:
    """Run both on `feeds` (on the provider really in use); (within atol?, max abs diff)."""
    diff = max_abs_diff(fp32.run(feeds), fp16.run(feeds))
    return diff <= atol, diff
