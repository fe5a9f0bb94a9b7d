"""What metrics cost: server CPU-seconds per request with metrics on vs off (--no-metrics).

Starts two genserve-server processes on the same model repository, one with /metrics and one with
``--no-metrics``, and sends the same closed-loop Sample traffic to one at a time in interleaved
rounds (on, off, on, off, ...), so that drift of the shared machine hits both alike. Each round
reads the driven server's ``utime + stime`` from ``/proc/<pid>/stat`` before and after; the
metrics-on round also scrapes /metrics once (as Prometheus would), and that scrape is counted.

    .venv/bin/python bench/metrics_overhead.py                     # tiny model (worst case)
    .venv/bin/python bench/metrics_overhead.py --models models --model dcgan

Prints CPU-seconds per request per round, the medians, and the overhead ratio on/off - 1.
The tiny default model computes almost nothing, so the per-request bookkeeping weighs most there:
it is the worst case for the relative overhead. Exits 1 when ``--max-overhead`` is given and
exceeded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.common import ctrl_c_exits_130

REPO = Path(__file__).resolve().parents[1]
# Server launch, tiny model repository and traffic helpers are shared with tests/monitoring.
sys.path[:0] = [str(REPO / "tests" / "monitoring"), str(REPO / "tests" / "server")]  # test support modules

from monitoring_support import (  # noqa: E402
    TINY_MODEL,
    MonitoredServer,
    drive_sample_traffic,
    start_server,
    write_tiny_repository,
)


def recording_cost_s(iterations: int = 50_000) -> tuple[float, float]:
    """In-process cost of what the server records for one single-image request (batch of one, the
    worst case), metrics on minus off, in CPU seconds; and the CPU seconds of one /metrics render.
    Insensitive to the machine's load, unlike the subprocess rounds."""
    from genserve_server.exposition import choose
    from genserve_server.metrics import Metrics

    render, _ = choose(None)  # the server's text-format render

    per_mode: dict[bool, float] = {}
    scrape_s = 0.0
    for enabled in (True, False):
        metrics = Metrics(enabled=enabled)
        model = metrics.for_model(TINY_MODEL, "1", 8)
        in_flight = metrics.in_flight_children["Sample"]
        encode = model.encode_duration["raw_uint8"]
        started = time.process_time()
        for _ in range(iterations):
            in_flight.inc()
            model.queue_depth.set(1)
            model.queue_depth.set(0)
            model.queue_duration[0].observe(0.0004)  # the interactive lane
            model.batch_size.observe(1)
            model.batch_requests.observe(1)
            model.compute_duration.observe(0.0002)
            model.images.inc(1)
            encode.observe(0.00001)
            in_flight.dec()
            model.request_done("Sample", "OK", 0.001)
        per_mode[enabled] = (time.process_time() - started) / iterations
        if enabled:
            metrics.unresolved()
            started = time.process_time()
            for _ in range(50):
                render(metrics.registry)
            scrape_s = (time.process_time() - started) / 50
        metrics.close()
    return per_mode[True] - per_mode[False], scrape_s


@dataclass
class Round:
    mode: str
    requests: int
    cpu_s: float
    wall_s: float

    @property
    def cpu_per_request_s(self) -> float:
        return self.cpu_s / self.requests


def run_round(server: MonitoredServer, mode: str, args: argparse.Namespace) -> Round:
    counts = [args.images] * args.requests
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    stats = drive_sample_traffic(server.target, counts, model=args.model, concurrency=args.concurrency)
    if server.metrics_port is not None:
        with urllib.request.urlopen(server.metrics_url(), timeout=10) as response:
            response.read()
    wall_s = time.monotonic() - started
    cpu_s = server.cpu_seconds() - cpu_before
    if stats.codes != {"OK": args.requests}:
        raise RuntimeError(f"{mode} round: not every request succeeded: {stats.codes}")
    return Round(mode, args.requests, cpu_s, wall_s)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=None, help="model repository (default: a tiny one)")
    parser.add_argument("--model", default=TINY_MODEL, help="model to sample from")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per mode (default 8)")
    parser.add_argument("--requests", type=int, default=400, help="Sample RPCs per round (default 400)")
    parser.add_argument("--images", type=int, default=1, help="images per request (default 1)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="RPCs in flight (default 1: every batch holds one request, the worst case for per-request"
        " bookkeeping, and batch sizes cannot differ between the two servers)",
    )
    parser.add_argument(
        "--queue-delay-ms",
        type=float,
        default=0.0,
        help="tiny model's batch window (default 0: batches form from what is queued, so both servers batch"
        " alike; a window makes throughput bistable and batch sizes differ between runs)",
    )
    parser.add_argument("--max-overhead", type=float, default=None, help="fail above this ratio, e.g. 0.05")
    return parser.parse_args(argv)


@ctrl_c_exits_130("bench.metrics_overhead")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="genserve-metrics-overhead-") as tmp:
        work = Path(tmp)
        if args.models is not None:
            models = args.models
        else:
            models = write_tiny_repository(work / "models", queue_delay_ms=args.queue_delay_ms)
        servers: dict[str, MonitoredServer] = {}
        try:  # each server started inside: the second failing to start stops the first
            servers["on"] = start_server(models, work / "on", metrics=True)
            servers["off"] = start_server(models, work / "off", metrics=False)
            for mode, server in servers.items():  # warm-up: sessions, thread pools, first batches
                run_round(server, mode, argparse.Namespace(**{**vars(args), "requests": args.requests // 4}))
            rounds: list[Round] = []
            for index in range(args.rounds):
                # Alternate which mode goes first, so neither always follows the other.
                order = ("on", "off") if index % 2 == 0 else ("off", "on")
                for mode in order:
                    result = run_round(servers[mode], mode, args)
                    rounds.append(result)
                    cpu_ms = result.cpu_per_request_s * 1e3
                    out.write(
                        f"round {index + 1:2d} metrics {mode:3s}: {cpu_ms:7.3f} ms CPU/request"
                        f"  ({result.cpu_s:.2f} s CPU, {result.requests / result.wall_s:6.0f} req/s)\n"
                    )
        finally:
            for server in servers.values():
                server.stop()
    per_request = {
        mode: statistics.median(r.cpu_per_request_s for r in rounds if r.mode == mode)
        for mode in ("on", "off")
    }
    totals = {
        mode: sum(r.cpu_s for r in rounds if r.mode == mode)
        / sum(r.requests for r in rounds if r.mode == mode)
        for mode in ("on", "off")
    }
    # Each round index ran on and off back to back: their ratio cancels the machine's slower drift.
    on_rounds = [r for r in rounds if r.mode == "on"]
    off_rounds = [r for r in rounds if r.mode == "off"]
    paired = sorted(
        a.cpu_per_request_s / b.cpu_per_request_s - 1 for a, b in zip(on_rounds, off_rounds, strict=True)
    )
    overhead = statistics.median(paired)
    overhead_total = totals["on"] / totals["off"] - 1
    quartiles = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [overhead, overhead, overhead]
    on_ms, off_ms = per_request["on"] * 1e3, per_request["off"] * 1e3
    out.write(
        f"median CPU/request: metrics on {on_ms:.3f} ms, off {off_ms:.3f} ms\n"
        f"metrics overhead: {overhead:+.1%} server CPU-seconds per request (median of {args.rounds} paired"
        f" on/off rounds, quartiles {quartiles[0]:+.1%} .. {quartiles[2]:+.1%};"
        f" {overhead_total:+.1%} over all rounds)\n"
    )
    record_s, scrape_s = recording_cost_s()
    out.write(
        f"in-process: the recording calls of one request cost {record_s * 1e6:.1f} us CPU"
        f" ({record_s / per_request['off']:.1%} of the server's CPU per request without metrics);"
        f" one /metrics render {scrape_s * 1e3:.1f} ms CPU\n"
    )
    if args.max_overhead is not None and overhead > args.max_overhead:
        out.write(f"FAIL: overhead {overhead:.1%} > {args.max_overhead:.1%}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
