"""Closed-loop load for SuperResolve / Translate through the client's own load generator.

`genserve-client bench` drives Sample; for the image-input methods the benchmark reuses its
LoadGenerator (same closed loop, same latency recording, same JSON) with a pre-serialized
ImageRequest of one RAW_UINT8 image of a fixed size. The command line mirrors the client's:

    python -m bench.image_load --target 127.0.0.1:PORT --model sr-photos-x4 --method SuperResolve \
        --image-size 64x64 --concurrency 1,8 --duration 5 --format raw --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import ctrl_c_exits_130, write_line
from genserve.v1 import genserve_pb2, types_pb2
from genserve_client.bench import LoadGenerator, format_table
from genserve_client.channel import ChannelConfig
from genserve_client.requests import output_options

METHODS = ("SuperResolve", "Translate")


class ImagePayload:
    """The same serialized ImageRequest every call (one image; no server-side cache applies)."""

    def __init__(self, model: str, height: int, width: int, channels: int, fmt: str) -> None:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = types_pb2.Image(
            format=types_pb2.IMAGE_FORMAT_RAW_UINT8, data=pixels.tobytes(), shape=pixels.shape
        )
        request = genserve_pb2.ImageRequest(
            model=model, images=[image], output=output_options({"format": fmt})
        )
        self.payload: bytes = request.SerializeToString()

    def __call__(self) -> bytes:
        return self.payload


class ImageLoadGenerator(LoadGenerator):
    """The client's LoadGenerator pointed at another unary method."""

    def __init__(self, config: ChannelConfig, payloads: ImagePayload, method: str, **kwargs: Any) -> None:
        super().__init__(config, payloads, method=f"/genserve.v1.GenerationService/{method}", **kwargs)


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    payload = ImagePayload(args.model, height, width, args.channels_in, args.format)
    config = ChannelConfig(target=args.target)
    gen = ImageLoadGenerator(config, payload, args.method, timeout_s=args.timeout)
    try:
        if args.warmup > 0:
            await gen.closed_loop(max(args.concurrency), args.warmup)
        results = [await gen.closed_loop(c, args.duration) for c in args.concurrency]
    finally:
        await gen.close()
    if not args.json:
        write_line(format_table(results))
    return [r.to_json() for r in results]


@ctrl_c_exits_130("bench.image_load")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--image-size", default="64x64", help="HxW of the input image")
    parser.add_argument("--channels-in", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32, 64]
    )
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--format", default="raw", choices=("raw", "png", "jpeg", "webp"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = asyncio.run(_run(args))
    if args.json:
        write_line(json.dumps(results, indent=2))
    # A level where nothing succeeded measured nothing: fail, as genserve-client bench does.
    failed = [r for r in results if r["images"] == 0]
    for r in failed:
        reasons = "".join(f"; {code}: {msg}" for code, msg in r["error_messages"].items() if msg)
        # On stderr, as the CLI's: --json's stdout stays JSON, and bench.servers quotes stderr.
        conc = r["concurrency"]
        sys.stderr.write(f"bench.image_load: no successful request at concurrency {conc} ")
        sys.stderr.write(f"(errors: {r['errors']}{reasons})\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
