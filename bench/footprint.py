"""Memory footprint: idle RSS after warm-up per model and for the whole repository, peak RSS under a
few heavy requests, and RSS once they are done (issue 22, "Footprint").

For each model alone (a repository holding only it) and for the whole repository, it starts
`genserve-server serve` (warm-up on, as shipped), waits until it is ready and then `--settle-s`
seconds, and reads VmRSS from /proc. For the whole repository it then sends the heavy requests at
once from threads (`HEAVY`: 4 x Sample(count=256) of bench-dcgan-256, PNG; 4 x SuperResolve of a
512x512 photo with tile_size 512; 2 x Translate of a 1024x1024 photo), reads the peak (VmHWM) and,
after they are done and `--settle-s`, the RSS again.

`--variants` runs the whole-repository measurement once per runtime setting in the same run (an
A/B: every model's config.json `runtime` overridden in a copy of the repository), so that a
setting's effect is compared on one machine at one time:

    .venv/bin/python -m bench.footprint                       # shipped settings
    .venv/bin/python -m bench.footprint --per-model --variants shipped no_shrink solo_off mem_pattern_off

Variants: shipped, no_shrink, mem_pattern_off, solo_off, arena_off, shrink_after_warmup,
malloc_tuned, shrink_and_malloc (VARIANTS).

Not part of `make bench` (each server start warms every model: tens of seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import DEFAULT_MODELS, ctrl_c_exits_130, write_line
from bench.models import BENCH_DCGAN_256, model_dir
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.launcher import ServerSubprocess, genserve_command

MIB = 1024 * 1024
# glibc: a fixed mmap threshold (no dynamic raise to 32 MB after the first large free), so large
# buffers (tensors, encoded responses) go back to the kernel when freed; two malloc arenas instead
# of 8 per core for the server's many threads.
MALLOC_TUNED = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576:glibc.malloc.arena_max=2"}
# Settings compared by --variants: (config.json `runtime` of every model, server config, environment).
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, str]]] = {
    "shipped": ({}, {}, {}),
    "no_shrink": ({}, {"shrink_arena_after_warmup": False}, {}),  # the arena as warm-up left it
    "mem_pattern_off": ({"mem_pattern": False}, {}, {}),
    "solo_off": ({"solo_session": False}, {}, {}),
    "arena_off": ({"cpu_mem_arena": False}, {}, {}),
    "shrink_after_warmup": ({}, {"shrink_arena_after_warmup": True}, {}),
    "malloc_tuned": ({}, {}, MALLOC_TUNED),
    "shrink_and_malloc": ({}, {"shrink_arena_after_warmup": True}, MALLOC_TUNED),
}


def status_bytes(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident so far) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def photo(side: int, seed: int) -> tpb.Image:
    """A smooth random RGB image (noise would make PNG outputs their worst case)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
    pixels = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=pixels.tobytes(), shape=pixels.shape)


def heavy_calls(stub: pb_grpc.GenerationServiceStub) -> list[tuple[str, Callable[[], Any]]]:
    calls: list[tuple[str, Callable[[], Any]]] = []
    for i in range(4):
        request = pb.SampleRequest(model=BENCH_DCGAN_256, count=256, base_seed=i * 1000)
        calls.append((f"Sample {BENCH_DCGAN_256} x256", functools.partial(stub.Sample, request, timeout=300)))
    for i in range(4):
        sr = pb.ImageRequest(model="sr-photos-x4", images=[photo(512, i)], tile_size=512)
        calls.append(("SuperResolve 512x512 tile 512", functools.partial(stub.SuperResolve, sr, timeout=300)))
    for i in range(2):
        tr = pb.ImageRequest(model="unet-denoise", images=[photo(1024, 10 + i)])
        calls.append(("Translate 1024x1024", functools.partial(stub.Translate, tr, timeout=300)))
    return calls


def run_heavy(target: str) -> dict[str, Any]:
    options = [("grpc.max_receive_message_length", 256 * MIB)]
    outcomes: list[str] = []
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        def one(name: str, call: Callable[[], Any]) -> None:
            try:
                call()
                outcomes.append(f"{name}: OK")
            except grpc.RpcError as exc:
                outcomes.append(f"{name}: {exc.code().name} {exc.details()}")

        started = time.monotonic()
        threads = [threading.Thread(target=one, args=c) for c in heavy_calls(stub)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"heavy_s": round(time.monotonic() - started, 1), "outcomes": sorted(outcomes)}


def repository_copy(models: Path, names: list[str], runtime: dict[str, Any], root: Path) -> Path:
    """`names` of `models` under `root` (version directories linked, config.json rewritten)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        source = model_dir(models, name)
        target = root / name
        target.mkdir()
        for entry in source.iterdir():
            if entry.name == "config.json":
                config = json.loads(entry.read_text())
                config["runtime"] = {**config.get("runtime", {}), **runtime}
                (target / "config.json").write_text(json.dumps(config))
            else:
                (target / entry.name).symlink_to(entry.resolve())
    return root


def timed_ms(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return round(1e3 * (time.perf_counter() - started), 1)


def measure(
    models: Path, names: list[str], variant: str, work: Path, heavy: bool, settle_s: float
) -> dict[str, Any]:
    runtime, server_config, env = VARIANTS[variant]
    repo = repository_copy(models, names, runtime, work / "models")
    config = work / "server.json"
    config.write_text(json.dumps(server_config))
    command = genserve_command(repo, "--no-metrics", "--config", str(config))
    server = ServerSubprocess.start(command, work / "server", timeout_s=600, env=env)
    try:
        time.sleep(settle_s)
        result: dict[str, Any] = {"idle_rss_mb": round(status_bytes(server.pid, "VmRSS") / MIB)}
        if heavy:
            # What an idle arena costs the next large batch: a 512x512 SuperResolve (36 tiles, full
            # batches), first after idle and again.
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                request = pb.ImageRequest(model="sr-photos-x4", images=[photo(512, 99)])
                sr = functools.partial(stub.SuperResolve, request, timeout=300)
                result["sr512_first_ms"] = timed_ms(sr)
                result["sr512_second_ms"] = timed_ms(sr)
            result |= run_heavy(server.target)
            result["peak_rss_mb"] = round(status_bytes(server.pid, "VmHWM") / MIB)
            time.sleep(settle_s)
            result["after_heavy_rss_mb"] = round(status_bytes(server.pid, "VmRSS") / MIB)
        return result
    finally:
        server.stop()


@ctrl_c_exits_130("bench.footprint")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--per-model", action="store_true", help="also each model alone (idle only)")
    parser.add_argument("--per-model-variant", default="shipped", choices=sorted(VARIANTS))
    parser.add_argument("--variants", nargs="*", default=["shipped"], choices=sorted(VARIANTS))
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # The repository's models plus the bench-only large generator the heavy requests sample.
    names = sorted(
        {p.name for p in args.models.iterdir() if (p / "config.json").exists()} | {BENCH_DCGAN_256}
    )
    report: dict[str, Any] = {"per_model": {}, "repository": {}}
    with tempfile.TemporaryDirectory(prefix="genserve-footprint-") as tmp:
        work = Path(tmp)
        if args.per_model:
            for name in names:
                r = measure(
                    args.models, [name], args.per_model_variant, work / f"one-{name}", False, args.settle_s
                )
                report["per_model"][name] = r
                write_line(f"{name:22s} idle RSS {r['idle_rss_mb']:6d} MB")
        for variant in args.variants:
            r = measure(args.models, names, variant, work / f"all-{variant}", True, args.settle_s)
            report["repository"][variant] = r
            write_line(
                f"repository [{variant:15s}] idle {r['idle_rss_mb']} MB, peak {r['peak_rss_mb']} MB under "
                f"heavy requests ({r['heavy_s']} s), {r['after_heavy_rss_mb']} MB after; SuperResolve "
                f"512x512 {r['sr512_first_ms']} ms first after idle, {r['sr512_second_ms']} ms again"
            )
            for outcome in r["outcomes"]:
                if not outcome.endswith(": OK"):
                    write_line(f"    {outcome[:200]}")
            shutil.rmtree(work / f"all-{variant}", ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
