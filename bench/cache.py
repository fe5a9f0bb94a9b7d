"""The image cache on a gallery workload: repeated seeds, cache off vs on, side by side.

A gallery page, a preview that refreshes, a client that retries: Sample requests of one image whose
seed is drawn at random from a pool of `--pool` seeds, so seeds repeat. Two servers on the same
models, one with `image_cache_bytes` and one without, driven in turns (off, on, on, off, ...) by the
client's own LoadGenerator, closed loop. The cache-on server is fresh for each round, so every
round starts cold and the hit ratio it reports is what that round earned. Prints images/s and
p50/p99 per round, the medians, and the speed-up.

    .venv/bin/python -m bench.cache [--model bench-dcgan-256] [--pool 256] [--concurrency 8]

`make bench` does not run it: the issue's ratios use fresh seeds on purpose (the client's
PayloadFactory never repeats one), so that no cache can flatter them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_MODELS, ctrl_c_exits_130, write_line
from bench.models import BENCH_DCGAN_256, BENCH_ONLY, link_repository
from bench.servers import ServerProcess
from genserve.v1 import genserve_pb2
from genserve_client.bench import LoadGenerator, varint
from genserve_client.channel import ChannelConfig
from genserve_client.requests import output_options


class GalleryPayloads:
    """Serialized single-image SampleRequests, each seed drawn uniformly from `pool` seeds."""

    def __init__(self, model: str, fmt: str, pool: int, seed: int = 0) -> None:
        self._prefix = genserve_pb2.SampleRequest(
            model=model, output=output_options({"format": fmt})
        ).SerializeToString()
        self._pool = pool
        self._rng = random.Random(seed)

    def __call__(self) -> bytes:
        encoded = varint(self._rng.randrange(self._pool))
        return self._prefix + b"\x22" + varint(len(encoded)) + encoded


def hit_ratio(server: ServerProcess, model: str) -> float | None:
    """The fraction of image-cache lookups that hit, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for line in text.splitlines():
        if line.startswith("genserve_image_cache_lookups_total{") and f'model="{model}"' in line:
            for result in counts:
                if f'result="{result}"' in line:
                    counts[result] += float(line.rsplit(" ", 1)[1])
    total = counts["hit"] + counts["miss"]
    return counts["hit"] / total if total else None


def one_round(models: Path, config: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    extra = ["--config", str(config)] if config is not None else []
    with ServerProcess.genserve(models, extra) as server:

        async def drive() -> dict[str, Any]:
            gen = LoadGenerator(
                ChannelConfig(server.target), GalleryPayloads(args.model, args.format, args.pool)
            )
            try:
                result = await gen.closed_loop(args.concurrency, args.duration_s)
            finally:
                await gen.close()
            return result.to_json()

        measured = asyncio.run(drive())
        measured["hit_ratio"] = hit_ratio(server, args.model) if config else None
        return measured


@ctrl_c_exits_130("bench.cache")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS)
    parser.add_argument("--model", default=BENCH_DCGAN_256)
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp", "raw"])
    parser.add_argument("--pool", type=int, default=256, help="distinct seeds the requests draw from")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per server (off, on, on, off, ...)")
    parser.add_argument("--cache-mib", type=int, default=64)
    args = parser.parse_args(argv)
    if args.pool < 1:
        parser.error(f"--pool must be >= 1, got {args.pool}")
    if args.model not in BENCH_ONLY and not (args.models_dir / args.model / "config.json").is_file():
        parser.error(f"--model: no model {args.model} in {args.models_dir}")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        config = Path(tmp) / "server.json"
        config.write_text(json.dumps({"image_cache_bytes": args.cache_mib << 20}))
        # The repository's models plus the measured one (a bench-only model is exported once).
        names = {p.name for p in args.models_dir.iterdir() if (p / "config.json").is_file()} | {args.model}
        models = link_repository(args.models_dir, sorted(names), Path(tmp) / "models")
        results: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        order = ["off", "on"]
        for r in range(args.rounds):
            for variant in order if r % 2 == 0 else order[::-1]:
                m = one_round(models, config if variant == "on" else None, args)
                results[variant].append(m)
                hits = "" if m["hit_ratio"] is None else f"  hits {m['hit_ratio']:.2f}"
                write_line(
                    f"round {r} cache {variant:>3}: {m['images_per_s']:8.1f} img/s  p50 {m['p50_ms']} ms"
                    f"  p99 {m['p99_ms']} ms{hits}"
                )
    median = {v: statistics.median(m["images_per_s"] for m in ms) for v, ms in results.items()}
    p50 = {v: statistics.median(m["p50_ms"] for m in ms) for v, ms in results.items()}
    write_line(
        f"{args.model} {args.format}, pool {args.pool} seeds, c={args.concurrency}, {args.duration_s:g} s: "
        f"cache off {median['off']:.1f} img/s (p50 {p50['off']} ms), on {median['on']:.1f} img/s "
        f"(p50 {p50['on']} ms): {median['on'] / median['off']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
