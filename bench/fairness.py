"""Fair tails and fair shares (issues 20 and 22), before and after a change, in one run.

Per side (A = `--base REV` checked out in a temporary worktree, B = this tree; fresh server each,
the sides taking turns round after round, as bench.ab does), one image a request, RAW_UINT8:

1. saturation: p50 and p99 at concurrency 32 and 64 for each `--saturate` model, and p99 / p50;
2. a small client (concurrency 1) of the heavy model and of another model, on the idle server;
3. the same two small clients while `--heavy-clients` processes' threads loop on
   Sample(count=`--heavy-count`) of the heavy model: p99 loaded / idle says how much the heavy load
   multiplies a small client's tail, of the same model and of another one.

    python -m bench.fairness --base main [--rounds 2] [--duration-s 5]
    python -m bench.fairness            # this tree only

A benchmark, not a test: on a shared 2-core machine single figures move by 20-30 %; read the ratios
of one run (same machine, same moment, only the server's code differs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from bench.ab import _serve, _subset
from bench.common import REPO_ROOT, BenchModel, ctrl_c_exits_130, find_models, temporary_worktree, write_line
from bench.models import BENCH_DCGAN_256
from bench.servers import ServerProcess, check_no_failures, client_bench
from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2

# What the heavy clients' process may take to start and queue its first request on a busy machine.
HEAVY_START_S = 15.0
RAW = types_pb2.OutputOptions(format=types_pb2.IMAGE_FORMAT_RAW_UINT8)


def heavy_worker(target: str, model: str, clients: int, count: int, duration_s: float, out: Path) -> None:
    """`clients` threads, each looping on Sample(count) for `duration_s` or until a file named like
    `out` with a .stop suffix appears; images/s to `out`."""
    stop = out.with_suffix(".stop")
    images = [0] * clients
    errors: list[str] = []
    deadline = time.monotonic() + duration_s
    options = [("grpc.max_receive_message_length", 1 << 30)]

    def loop(i: int) -> None:
        with grpc.insecure_channel(target, options=options) as channel:
            stub = genserve_pb2_grpc.GenerationServiceStub(channel)
            seed = 10**9 * (i + 1)
            while time.monotonic() < deadline and not stop.exists():
                request = genserve_pb2.SampleRequest(model=model, count=count, base_seed=seed, output=RAW)
                try:
                    images[i] += len(stub.Sample(request, timeout=300).images)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")
                    time.sleep(0.1)
                seed += count

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(images) / (time.monotonic() - started)
    out.write_text(json.dumps({"images_per_s": rate, "errors": len(errors), "first_error": errors[:1]}))


@contextmanager
def heavy_load(
    target: str, model: str, clients: int, count: int, duration_s: float
) -> Iterator[dict[str, Any]]:
    """The heavy clients in a process of their own; yields a dict that holds their result (images/s,
    errors) once the block is done and they have stopped."""
    with tempfile.TemporaryDirectory(prefix="bench-heavy-") as tmp:
        out = Path(tmp) / "heavy.json"
        command = [
            sys.executable,
            "-m",
            "bench.fairness",
            "--heavy-worker",
            f"--target={target}",
            f"--heavy-model={model}",
            f"--heavy-clients={clients}",
            f"--heavy-count={count}",
            f"--duration-s={duration_s:g}",
            f"--out={out}",
        ]
        worker = subprocess.Popen(command, cwd=REPO_ROOT)
        result: dict[str, Any] = {}
        try:
            yield result
            out.with_suffix(".stop").touch()  # the clients stop once their requests in flight end
            worker.wait(timeout=duration_s + 600)
            result.update(json.loads(out.read_text()) if out.exists() else {"error": worker.returncode})
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def queued_rows(server: ServerProcess, model: str) -> float:
    """The model's queue depth in rows, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = "genserve_queue_depth{"
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(prefix) and f'model="{model}"' in line
    )


def until_heavy_queued(server: ServerProcess, model: str, rows: int, timeout_s: float = 60.0) -> float:
    """Seconds until at least `rows` of the heavy model are queued (its clients are running)."""
    started = time.monotonic()
    while queued_rows(server, model) < rows and time.monotonic() - started < timeout_s:
        time.sleep(0.05)
    return time.monotonic() - started


def _level(server: ServerProcess, model: BenchModel, concurrency: int, duration_s: float) -> dict[str, float]:
    labels = model.client_options()["labels"]  # a conditional model's classes, from its card
    result = client_bench(
        server.target, model.name, concurrency, duration_s, "raw", labels=labels, warmup_s=0.5
    )
    check_no_failures(result, f"{model.name} c={concurrency}")  # a refused call is in no p99
    p50, p99 = float(result["p50_ms"]), float(result["p99_ms"])
    return {"p50_ms": p50, "p99_ms": p99, "p99/p50": p99 / p50, "img_s": float(result["images_per_s"])}


def _model_names(args: argparse.Namespace) -> list[str]:
    return sorted({*args.saturate, args.heavy_model, args.other_model})


def one_round(tree: Path, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    by_name = {m.name: m for m in find_models(models, _model_names(args))}  # how each is driven (labels)
    with _serve(tree, models) as server:
        for name in args.saturate:
            for c in (32, 64):
                figures[f"{name} c={c}"] = _level(server, by_name[name], c, args.duration_s)
        small = {"same": args.heavy_model, "other": args.other_model}
        for which, name in small.items():
            figures[f"small {which} idle"] = _level(server, by_name[name], 1, args.duration_s)
        for which, name in small.items():
            # The heavy clients run for as long as it takes them to start and queue a request, and
            # the small client's level, plus a margin.
            with heavy_load(
                server.target,
                args.heavy_model,
                args.heavy_clients,
                args.heavy_count,
                args.duration_s + HEAVY_START_S,
            ) as heavy:
                waited_s = until_heavy_queued(server, args.heavy_model, args.heavy_count)
                figures[f"small {which} loaded"] = _level(server, by_name[name], 1, args.duration_s)
                heavy["started_after_s"] = waited_s
            figures[f"heavy during {which}"] = heavy
    return figures


def _median(rounds: list[dict[str, Any]], row: str, figure: str) -> float:
    return statistics.median(float(r[row][figure]) for r in rounds if figure in r.get(row, {}))


def report(sides: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    names = [s for s in sides if sides[s]]
    write_line(
        f"medians of {args.rounds} round(s), {args.duration_s:g} s a level, RAW_UINT8, one image a request; "
        f"heavy = {args.heavy_clients} clients x Sample(count={args.heavy_count}) of {args.heavy_model}"
    )
    header = f"{'level':<34}{'figure':<9}" + "".join(f"{s:>10}" for s in names)
    write_line(header + ("   B/A" if len(names) == 2 else ""))
    out: dict[str, Any] = {}
    rows = [r for r in sides[names[0]][0] if not r.startswith("heavy")]
    for row in rows:
        for figure in ("p50_ms", "p99_ms", "p99/p50", "img_s"):
            values = {s: _median(sides[s], row, figure) for s in names}
            out.setdefault(row, {})[figure] = values
            line = f"{row:<34}{figure:<9}" + "".join(f"{values[s]:>10.2f}" for s in names)
            if len(names) == 2 and values["A"]:
                line += f"{values['B'] / values['A']:>8.2f}"
            write_line(line)
    for which in ("same", "other"):
        ratios = {
            s: _median(sides[s], f"small {which} loaded", "p99_ms")
            / _median(sides[s], f"small {which} idle", "p99_ms")
            for s in names
        }
        heavy = {s: _median(sides[s], f"heavy during {which}", "images_per_s") for s in names}
        out[f"small {which}: p99 loaded / idle"] = ratios
        out[f"heavy img/s during small {which}"] = heavy
        write_line(
            f"small client of the {which} model, p99 loaded / idle: "
            + ", ".join(f"{s} {ratios[s]:.2f}x (heavy {heavy[s]:.0f} img/s)" for s in names)
        )
    return out


@ctrl_c_exits_130("bench.fairness")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="git revision of side A (side B: this tree); none: B alone")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--saturate", nargs="*", default=[BENCH_DCGAN_256, "cgan-digits"])
    parser.add_argument("--heavy-model", default=BENCH_DCGAN_256)
    parser.add_argument("--other-model", default="dcgan-digits")
    parser.add_argument("--heavy-clients", type=int, default=8)
    parser.add_argument("--heavy-count", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--heavy-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.heavy_worker:
        heavy_worker(
            args.target, args.heavy_model, args.heavy_clients, args.heavy_count, args.duration_s, args.out
        )
        return 0
    names = _model_names(args)
    sides: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        trees = {"B": (REPO_ROOT, _subset(args.models_dir, names, Path(tmp) / "B"))}
        base = Path(tmp) / "base"
        with contextlib.ExitStack() as stack:
            if args.base:  # in the with: Ctrl-C or a failed export here still removes the worktree
                stack.enter_context(temporary_worktree(REPO_ROOT, args.base, base))
                trees["A"] = (base, _subset(base / "models", names, Path(tmp) / "A"))
            for side, (tree, repo) in sorted(trees.items()):  # a name not found fails only mid-round
                found = {m.name for m in find_models(repo, names)}
                if missing := [name for name in names if name not in found]:
                    where = args.models_dir if side == "B" else tree / "models"
                    parser.error(f"no model {', '.join(missing)} in {where} (side {side})")
            order = sorted(trees)
            for i in range(args.rounds):
                for side in order if i % 2 == 0 else order[::-1]:
                    tree, repo = trees[side]
                    sides[side].append(one_round(tree, repo, args))
                    write_line(f"round {i + 1} side {side}: {json.dumps(sides[side][-1])}")
    summary = report(sides, args)
    if args.json is not None:
        args.json.write_text(json.dumps({"base": args.base, "rounds": sides, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
