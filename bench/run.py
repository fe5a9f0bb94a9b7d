"""genserve's benchmark: the limit, genserve and the naive servers, side by side in one run.

    python -m bench.run [--quick] [--models NAME ...] [--duration-s 5] [--out bench/results/latest.json]

1. The limit: raw ONNX Runtime in-process at batch 1, 4, 16, 64 (bench.raw_limit).
2. genserve (`genserve-server serve`) and the two naive servers (bench.naive_server: asyncio, and
   `--sync`, a synchronous grpc.server with a thread pool, Sample only) on the same model files,
   each driven by `genserve-client bench --json`, closed loop at concurrency 1, 8, 32, 64, one
   image per request, RAW_UINT8 and PNG outputs; the server's CPU seconds per request from /proc.
3. Priority (bench.priority): interactive p99 idle vs while a bulk SampleStream saturates the server.
4. The ratios and the targets of issue 8, printed and written to the JSON file and bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from bench import priority, raw_limit
from bench.common import (
    DEFAULT_MODELS,
    METHOD_BY_KIND,
    SCRATCH,
    BenchModel,
    ctrl_c_exits_130,
    find_models,
    machine,
    write_json,
    write_line,
)
from bench.report import merge_rounds, render_markdown, summarise, update_readme
from bench.servers import BenchError, ServerProcess, client_bench, measured_level

CONCURRENCY = (1, 8, 32, 64)
FORMATS = ("raw", "png")
DEFAULT_OUT = Path("bench/results/latest.json")  # a run's --out
# The kinds driven through the servers: those the load generator has a method for (METHOD_BY_KIND;
# a style generator, a code prior or decoder is measured in the raw limit only), less the encoder
# (raw limit only too) and a two-way translator (not at all: the naive server feeds no direction).
SERVED_KINDS = tuple(k for k in METHOD_BY_KIND if not k.gives_latent and not k.two_way)
PRIORITY_MODEL_PREFERENCE = ("bench-dcgan-64", "bench-dcgan-256", "dcgan-digits")


def assemble_repository(source: Path, names: list[str] | None, with_bench_models: bool) -> Path:
    """A scratch repository: links to `source`'s models plus the bench-only random-weight generators
    (bench-dcgan-64 always, bench-dcgan-256 unless `names` leaves it out, bench-cgan-resnet-32 only
    where `names` has it)."""
    repo = SCRATCH / "models"
    repo.mkdir(parents=True, exist_ok=True)
    for entry in repo.iterdir():
        if entry.is_symlink():
            entry.unlink()
    if source.is_dir():
        for model_dir in source.iterdir():
            if (
                model_dir.is_dir()
                and not model_dir.name.startswith(".")
                and (names is None or model_dir.name in names)
            ):
                (repo / model_dir.name).symlink_to(model_dir.resolve(), target_is_directory=True)
    if with_bench_models:
        from bench.models import BENCH_DCGAN_64, BENCH_ON_REQUEST, BENCH_ONLY

        for name, ensure in BENCH_ONLY.items():
            named = names is not None and name in names
            wanted = name == BENCH_DCGAN_64 or named or (names is None and name not in BENCH_ON_REQUEST)
            if (repo / name).exists() or not wanted:
                continue
            try:
                (repo / name).symlink_to(ensure(SCRATCH / "generated").resolve(), target_is_directory=True)
            except ImportError as exc:  # genserve-export (torch) not installed: the bench runs without it
                write_line(f"{name} skipped: {exc}")
    return repo


def _measure(server: ServerProcess, model: BenchModel, fmt: str, c: int, duration_s: float) -> dict[str, Any]:
    try:
        return measured_level(server, model.name, c, duration_s, fmt, **model.client_options())
    except BenchError as exc:
        return {"concurrency": c, "error": str(exc)[-500:]}


def serve_pair(
    servers: Sequence[ServerProcess],
    model: BenchModel,
    fmt: str,
    concurrency: Sequence[int],
    duration_s: float,
    rounds: int,
) -> dict[str, list[dict[str, Any]]]:
    """Every level for every server, interleaved; the ratio levels (c=1 and the top) `rounds` times.

    One server is loaded at a time. At c=1 and at the top concurrency, which the ratios use, the
    servers take turns `rounds` times (the first server alternates between rounds), so a change in
    the machine's load lands on both and the median of the paired ratios cancels it
    (report.merge_rounds).
    """
    for server in servers:  # warm the model and the connection path, unmeasured
        try:
            client_bench(server.target, model.name, max(concurrency), 1.0, fmt, **model.client_options())
        except BenchError as exc:  # its levels will fail too, and be kept as failed: the run goes on
            write_line(f"  {server.name:8s} {model.name:22s} {fmt:4s} warm-up FAILED {str(exc)[-200:]}")
    per_server: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for c in concurrency:
        repeats = rounds if c in (1, max(concurrency)) else 1
        measured: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
        for r in range(repeats):
            for server in servers if r % 2 == 0 else list(reversed(servers)):
                level = _measure(server, model, fmt, c, duration_s)
                measured[server.name].append(level)
                write_line(f"  {server.name:8s} {model.name:22s} {fmt:4s} c={c:<3d} " + _describe(level))
        for server in servers:
            per_server[server.name].append(merge_rounds(measured[server.name]))
    return per_server


def _describe(level: dict[str, Any]) -> str:
    if "images_per_s" not in level:
        return f"FAILED {level['error'][:200]}"
    return (
        f"{level['images_per_s']:8.1f} img/s  p50 {level['p50_ms']:7.2f} ms  p99 {level['p99_ms']:7.2f} ms"
        f"  cpu {level['server_cpu_ms_per_request']:.3f} ms/req"
    )


@ctrl_c_exits_130("bench.run")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s levels, c=1 and 64, raw output only")
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: all served kinds)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="model repository (default models/; --report-only: the run's own, from its JSON)",
    )
    parser.add_argument("--duration-s", type=float, default=None, help="seconds per level (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="turns per server at c=1 and the top level (default 3)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results JSON (default {DEFAULT_OUT}; --report-only: none, the tables are printed)",
    )
    parser.add_argument(
        "--no-bench-models",
        "--no-dcgan64",
        dest="no_bench_models",
        action="store_true",
        help="skip the bench-only random-weight generators (bench-dcgan-64, bench-dcgan-256)",
    )
    parser.add_argument("--no-priority", action="store_true")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md's table")
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: recompute the ratios and tables of an earlier run's JSON (after a "
        "change to bench/report.py), print them, write them to --out if given and the README's table",
    )
    args = parser.parse_args(argv)
    ort.set_default_logger_severity(4)  # 3 still prints the CUDA/TensorRT load errors
    if args.report_only is not None:
        return report_only(
            args.report_only, args.out, args.models_dir, not args.no_bench_models, args.no_readme
        )
    models_dir: Path = args.models_dir or DEFAULT_MODELS

    duration_s = args.duration_s or (2.0 if args.quick else 5.0)
    concurrency = (1, 64) if args.quick else CONCURRENCY
    formats = ("raw",) if args.quick else FORMATS
    rounds = max(1, args.rounds or (1 if args.quick else 3))
    started = time.monotonic()
    info = machine()
    write_line(f"machine: {info['cpu_model']}, {info['cores']} cores, load {info['load_avg_1m_at_start']}")

    repo = assemble_repository(models_dir, args.models, not args.no_bench_models)
    ort.set_default_logger_severity(4)  # again: importing genserve-export (bench models) sets 3
    models = find_models(repo)
    # A name not found would be measured on no server and left out of the tables without a word.
    if args.models is not None and (missing := [n for n in args.models if n not in {m.name for m in models}]):
        parser.error(f"--models: no model {', '.join(missing)} in {models_dir}")
    if not models:
        raise SystemExit(f"no models found in {models_dir}")

    write_line("== raw ONNX Runtime (in-process) ==")
    raw: dict[str, dict[str, Any]] = {}
    for model in models:
        raw[model.name] = raw_limit.measure_model(model, duration_s=1.0 if args.quick else 2.0)
        concurrent = {p["batch"]: p["images_per_s"] for p in raw[model.name]["concurrent_points"]}
        points = "  ".join(
            f"b{p['batch']}: {p['images_per_s']:.0f}"
            + (f"/{concurrent[p['batch']]:.0f}" if p["batch"] in concurrent else "")
            + f" img/s {p['latency_p50_ms']:.2f} ms"
            for p in raw[model.name]["points"]
        )
        write_line(f"  {model.name:22s} {points}")

    served = [m for m in models if m.kind in SERVED_KINDS]
    serving: list[dict[str, Any]] = []
    write_line("== servers under genserve-client bench (closed loop, 1 image per request) ==")
    with (
        ServerProcess.genserve(repo) as genserve,
        ServerProcess.naive(repo) as naive,
        ServerProcess.naive_sync(repo) as naive_sync,
    ):
        write_line(
            f"  genserve pid {genserve.pid} port {genserve.port}; naive pid {naive.pid} port {naive.port}; "
            f"naive-sync pid {naive_sync.pid} port {naive_sync.port}"
        )
        for model in served:
            # The synchronous baseline serves Sample only (bench.naive_server.SyncNaiveServicer).
            servers = (genserve, naive, naive_sync) if model.method == "Sample" else (genserve, naive)
            for fmt in formats:
                levels = serve_pair(servers, model, fmt, concurrency, duration_s, rounds)
                for name, lv in levels.items():
                    serving.append({"server": name, "model": model.name, "format": fmt, "levels": lv})

    priority_result: dict[str, Any] | None = None
    if not args.no_priority:
        names = {m.name: m for m in served}
        chosen = next((names[n] for n in PRIORITY_MODEL_PREFERENCE if n in names), None)
        if chosen is not None:
            write_line(f"== priority: interactive p99 idle vs under a bulk SampleStream ({chosen.name}) ==")
            try:
                priority_result = priority.run_priority(
                    repo, chosen, duration_s=max(duration_s, 5.0), raw=raw[chosen.name]
                )
                write_line(f"  {priority.describe(priority_result)}")
            except BenchError as exc:  # the levels measured so far are kept: the run fails at its end
                priority_result = {"model": chosen.name, "error": str(exc)[-500:]}
                write_line(f"  FAILED {priority_result['error'][:200]}")

    results: dict[str, Any] = {
        "machine": info,
        "settings": {
            "duration_s_per_level": duration_s,
            "rounds": rounds,
            "concurrency": list(concurrency),
            "formats": list(formats),
            "quick": args.quick,
            "models_dir": str(models_dir),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "wall_s": round(time.monotonic() - started, 1),
        },
        "raw": list(raw.values()),
        "serving": serving,
        "priority": priority_result,
    }
    results["summary"] = summarise(results, models)
    out: Path = args.out or DEFAULT_OUT
    code = publish(results, out, args.no_readme)
    write_line(f"results: {out}")
    return code


def failed_levels(results: dict[str, Any]) -> list[str]:
    """Every serving level no turn of which was measured ("server model format c=N"), and the
    priority bench if it failed."""
    failed = [
        f"{e['server']} {e['model']} {e['format']} c={lvl['concurrency']}"
        for e in results["serving"]
        for lvl in e["levels"]
        if "images_per_s" not in lvl
    ]
    prio = results.get("priority")
    if prio and "error" in prio:
        failed.append(f"priority {prio['model']}")
    return failed


def publish(results: dict[str, Any], out: Path | None, no_readme: bool) -> int:
    """Write the JSON (to `out`, if any) and print the tables; the README's table only from a run
    whose every level was measured. Returns the exit code: 1 when a level failed in every turn, or
    the priority bench failed (their figures and the targets resting on them are missing, so the run
    is no result)."""
    if out is not None:  # --report-only without --out: the last run's results stay as they are
        write_json(out, results)
    table = render_markdown(results)
    write_line(table)
    failed = failed_levels(results)
    if failed:
        write_line(f"FAILED: {len(failed)} level(s) measured nothing: {'; '.join(failed)}")
        if not no_readme:
            write_line("bench/README.md left as it was")
        return 1
    if not no_readme:
        update_readme(Path(__file__).parent / "README.md", table)
    return 0


def report_only(
    source: Path, out: Path | None, models_dir: Path | None, with_bench_models: bool, no_readme: bool
) -> int:
    """The run's models are looked up where it found them (its settings' models_dir, unless
    `models_dir` is given), by name, so a bench-only model built on request is found too."""
    results: dict[str, Any] = json.loads(source.read_text())
    if models_dir is None:
        models_dir = Path(results.get("settings", {}).get("models_dir") or DEFAULT_MODELS)
        if not models_dir.is_dir():  # measured in another checkout or on another machine
            models_dir = DEFAULT_MODELS
    names = sorted({r["model"] for r in results["raw"]} | {e["model"] for e in results["serving"]})
    models = find_models(assemble_repository(models_dir, names, with_bench_models))
    if missing := sorted(set(names) - {m.name for m in models}):
        raise SystemExit(f"--report-only: no model {', '.join(missing)} of {source} in {models_dir}")
    results["summary"] = summarise(results, models)
    return publish(results, out, no_readme)


if __name__ == "__main__":
    raise SystemExit(main())
