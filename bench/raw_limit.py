"""The limit: ONNX Runtime in-process, no gRPC, at batch 1, 4, 16 and 64 for each model.

Sessions are built the way the server builds them (genserve_server.runner.Runner when its
constructor matches, else genserve_server.ort_session.create_session with the same settings), in the
two layouts a model can be served with, and the limit is the better of the two at each batch size:

* serial (`points`): one caller, intra-op threads = cores. Its batch-1 latency is the reference for
  "p50 at c=1 minus raw".
* concurrent (`concurrent_points`): one caller per core on one session with one intra-op thread
  each, as a model with `instances` = cores runs. Small convolutions parallelise badly inside one
  call, so on 2 cores this layout is up to ~1.5x the serial one (super-resolution, 256x256 GAN).

So the limit is a property of the ONNX file and the machine, not of a model's genserve config.

    python -m bench.raw_limit --models models [--duration-s 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench.common import DEFAULT_MODELS, BenchModel, ctrl_c_exits_130, find_models, make_feeds, write_line
from genserve_server.config import cpu_count

BATCH_SIZES = (1, 4, 16, 64)


def server_session(model: BenchModel, cores: int, intra_op_threads: int | None = None) -> tuple[Any, str]:
    """(session, how it was built): the server's own Runner if possible.

    `intra_op_threads` defaults to what the server gives each of the model's instances.
    """
    intra = intra_op_threads or max(1, cores // model.config.instances)
    providers = list(model.config.execution_providers)
    try:
        from genserve_server.runner import Runner, select_providers

        runner = Runner(
            model.model_path,
            label=f"bench-{model.name}",
            providers=select_providers(providers),
            instances=model.config.instances,
            intra_op_threads=intra,
        )
        session = runner.session
        runner.close()
        return session, "genserve_server.runner.Runner"
    except (ImportError, TypeError):
        from genserve_server.ort_session import RuntimeConfig, create_session

        info = create_session(model.model_path, providers, RuntimeConfig(intra_op_threads=intra), cores=cores)
        return info.session, "genserve_server.ort_session.create_session"


def measure(
    session: Any, model: BenchModel, batch: int, duration_s: float, min_calls: int = 5
) -> dict[str, float]:
    """Time `session.run` at one batch size: images/s and per-call latency (ms)."""
    feeds = make_feeds(model, batch)
    for _ in range(2):
        session.run(None, feeds)
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < min_calls or time.perf_counter() - started < duration_s:
        t0 = time.perf_counter()
        session.run(None, feeds)
        latencies.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    latencies.sort()
    p50 = statistics.median(latencies)
    return {
        "batch": batch,
        "calls": len(latencies),
        # From the median call: a few calls stalled by other work on a shared machine (the 23:58
        # run once measured SR at 18 img/s with a 21 ms p50) must not lower a limit.
        "images_per_s": batch / p50,
        "images_per_s_mean": batch * len(latencies) / total,
        "latency_p50_ms": 1e3 * p50,
        "latency_min_ms": 1e3 * latencies[0],
        "ms_per_image": 1e3 * p50 / batch,
    }


def measure_concurrent(
    session: Any, model: BenchModel, batch: int, duration_s: float, callers: int
) -> dict[str, float]:
    """`callers` threads calling `session.run` at once (ORT releases the GIL): total images/s."""
    feeds = [make_feeds(model, batch) for _ in range(callers)]
    for f in feeds:
        session.run(None, f)
    latencies: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)
    stop_at = [0.0]

    def call(i: int) -> None:
        start.wait()
        while time.perf_counter() < stop_at[0] or len(latencies[i]) < 2:
            t0 = time.perf_counter()
            session.run(None, feeds[i])
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    stop_at[0] = started + duration_s
    start.wait()
    for t in threads:
        t.join()
    total = time.perf_counter() - started
    calls = sorted(x for per_caller in latencies for x in per_caller)
    p50 = statistics.median(calls)
    return {
        "batch": batch,
        "callers": callers,
        "calls": len(calls),
        "images_per_s": callers * batch / p50,  # median call, as in `measure`
        "images_per_s_mean": batch * len(calls) / total,
        "latency_p50_ms": 1e3 * p50,
        "ms_per_image": 1e3 * p50 / (callers * batch),
    }


def measure_model(
    model: BenchModel, *, batches: Sequence[int] = BATCH_SIZES, duration_s: float = 2.0
) -> dict[str, Any]:
    cores = cpu_count()
    session, built_by = server_session(model, cores, intra_op_threads=cores)
    points = [measure(session, model, b, duration_s) for b in batches]
    concurrent_points: list[dict[str, float]] = []
    if cores > 1:
        narrow, _ = server_session(model, cores, intra_op_threads=1)
        concurrent_points = [measure_concurrent(narrow, model, b, duration_s, cores) for b in batches]
    input_shapes = {k: list(v.shape[1:]) for k, v in make_feeds(model, 1).items()}
    return {
        "model": model.name,
        "kind": model.kind,
        "provider": session.get_providers()[0],
        "session_built_by": built_by,
        "input_shapes": input_shapes,
        "max_batch_size": model.max_batch_size,
        "points": points,
        "concurrent_points": concurrent_points,
    }


def best_within(result: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """The fastest point at a batch size the server may form (<= its max_batch_size)."""
    points = [*result["points"], *result.get("concurrent_points", [])]
    eligible = [p for p in points if p["batch"] <= max_batch] or result["points"][:1]
    return max(eligible, key=lambda p: p["images_per_s"])


@ctrl_c_exits_130("bench.raw_limit")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--only", nargs="*", default=None, help="model names (default: all)")
    parser.add_argument("--duration-s", type=float, default=2.0)
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(4)  # 3 still prints the CUDA/TensorRT load errors
    models = find_models(args.models, args.only)
    if args.only is not None and (missing := [n for n in args.only if n not in {m.name for m in models}]):
        parser.error(f"--only: no model {', '.join(missing)} in {args.models}")
    results = [measure_model(m, duration_s=args.duration_s) for m in models]
    write_line(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
