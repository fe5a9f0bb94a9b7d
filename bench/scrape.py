"""What one /metrics scrape costs with many loaded model versions (bench/profile.md).

Binds the series of `--versions` loaded versions (every kind in turn, some traffic on each) in one
`Metrics`, then times, best of `--repeat`, in this process: prometheus_client's own encoder and the
server's (genserve_server/exposition.py) for the text format and for OpenMetrics (what Prometheus
asks for), gzip at level 9 (gzip.compress's default) and at the server's level, and a whole
`Exposition.answer` with Prometheus 3's Accept and Accept-Encoding headers. Wall and CPU seconds.

    .venv/bin/python bench/scrape.py --versions 900
"""

from __future__ import annotations

import argparse
import functools
import gzip
import sys
import time
from collections.abc import Callable

from prometheus_client.exposition import choose_encoder

from bench.common import ctrl_c_exits_130
from genserve_server.batcher import Lane
from genserve_server.exposition import choose
from genserve_server.metrics import KIND_METHODS, Metrics
from genserve_server.metrics_http import GZIP_LEVEL, Exposition

PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def populated(versions: int) -> Metrics:
    metrics = Metrics()
    kinds = sorted(KIND_METHODS)
    for i in range(versions):
        mm = metrics.for_model(f"model-{i // 3}", str(i % 3 + 1), 16, kinds[i % len(kinds)])
        mm.set_runtime("CPUExecutionProvider", "fp32", False, 16)
        mm.ready.set(1)
        mm.load_duration.set(0.5)
        for method in list(mm.request_duration)[:2]:
            mm.request_done(method, "OK", 0.001 * (i % 50))
        mm.queue_duration[Lane.INTERACTIVE].observe(0.001)
        mm.compute_duration.observe(0.01)
        mm.batch_size.observe(3)
        mm.batch_requests.observe(2)
    return metrics


def best(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(wall s, CPU s) of the fastest of `repeat` calls."""
    runs = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(runs)


@ctrl_c_exits_130("bench.scrape")
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--versions", type=int, default=900, help="loaded model versions (default 900)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    args = parser.parse_args()
    out = sys.stdout
    registry = populated(args.versions).registry
    body = choose(None)[0](registry)
    lines = body.count(b"\n")
    out.write(f"{args.versions} versions: {lines} lines, {len(body) / 1e6:.1f} MB (text format)\n")

    def show(what: str, call: Callable[[], object]) -> None:
        wall, cpu = best(call, args.repeat)
        out.write(f"  {what:<58} {wall:6.3f} s wall {cpu:6.3f} s CPU\n")

    for label, accept in (("text", None), ("OpenMetrics", PROMETHEUS_3_ACCEPT)):
        for who, encoder in (
            ("prometheus_client", choose_encoder(accept or "")[0]),
            ("genserve", choose(accept)[0]),
        ):
            show(f"render {label}, {who}", functools.partial(encoder, registry))
    for level in (9, GZIP_LEVEL):
        size = len(gzip.compress(body, level))
        show(f"gzip level {level} ({size} bytes)", functools.partial(gzip.compress, body, level))
    library = choose_encoder(PROMETHEUS_3_ACCEPT)[0]
    show("scrape before: prometheus_client OpenMetrics + gzip 9", lambda: gzip.compress(library(registry), 9))
    exposition = Exposition(registry)
    show(
        "scrape now: Exposition.answer, Prometheus 3 headers, gzip",
        lambda: exposition.answer(PROMETHEUS_3_ACCEPT, "gzip", []),
    )


if __name__ == "__main__":
    raise SystemExit(main())
