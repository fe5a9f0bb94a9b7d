"""Soak: mixed traffic against one server for a long time; RSS and open file descriptors over time.

Not part of CI. Starts `genserve-server` on a model repository (by default a tiny repository of
every kind, written by tests/server/server_support.py), drives it from a few closed-loop threads with
a weighted mix of every RPC -- valid calls in every format, streams, cancelled calls, calls with
expired deadlines, invalid and unknown-model requests, KServe inference -- and samples the server's
RSS, open file descriptors and threads every `--sample-s` seconds. Growth is measured from the
end of the warm-up (allocator arenas and caches fill first) to the end; the target is under 5 %.

    python -m bench.soak [--duration-s 600] [--warmup-s 60] [--sample-s 10] [--threads 3]
                         [--models DIR] [--out build/bench/soak.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import REPO_ROOT, SCRATCH, ctrl_c_exits_130, write_line
from bench.servers import ServerProcess
from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

TARGET_GROWTH = 0.05
FORMATS = (tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_WEBP)


def proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split()[1] for line in status if ":" in line and len(line.split()) > 1}
    return {
        "rss_bytes": int(fields["VmRSS"]) * 1024,
        "open_fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": int(fields["Threads"]),
    }


def tiny_repository(root: Path) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "tests" / "server"))
    from server_support import build_tiny_repo  # the test suite's tiny models of every kind

    return Path(build_tiny_repo(root, with_slow=False, with_broken=True))


def _png(h: int, w: int, c: int, rng: np.random.Generator) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", rng.integers(0, 256, (h, w, c), dtype=np.uint8))
    if not ok:
        raise RuntimeError("PNG encode failed")
    return bytes(buf.tobytes())


class Mix:
    """The weighted operations; each returns the status code of one call."""

    def __init__(self, channel: grpc.Channel, seed: int) -> None:
        self.stub = pb_grpc.GenerationServiceStub(channel)
        self.kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
        self.rng = np.random.default_rng(seed)
        self.random = random.Random(seed)
        self.sr_image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_png(48, 40, 3, self.rng))
        self.i2i_image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_png(32, 32, 3, self.rng))
        self.enc_image = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=_png(8, 8, 1, self.rng))
        self.ops: list[tuple[int, Callable[[], Any]]] = [
            (20, self.sample),
            (8, self.sample_cond),
            (4, self.stream),
            (4, self.interpolate),
            (4, self.encode),
            (4, self.decode),
            (4, self.super_resolve),
            (4, self.translate),
            (4, self.infer),
            (3, lambda: self.stub.ListModels(pb.ListModelsRequest(), timeout=10)),
            (3, lambda: self.stub.GetModel(pb.GetModelRequest(name="tiny-gen"), timeout=10)),
            (4, lambda: self.stub.Sample(pb.SampleRequest(model="tiny-gen", count=0), timeout=10)),
            (3, lambda: self.stub.Sample(pb.SampleRequest(model="../../etc/passwd", count=1), timeout=10)),
            (2, lambda: self.stub.Sample(pb.SampleRequest(model="tiny-broken", count=1), timeout=10)),
            (3, self.cancelled),
            (2, lambda: self.stub.Sample(pb.SampleRequest(model="tiny-gen", count=64), timeout=0.0005)),
        ]
        self.weights = [w for w, _ in self.ops]

    def seed(self) -> int:
        return self.random.randrange(2**40)

    def output(self) -> tpb.OutputOptions:
        return tpb.OutputOptions(
            format=self.random.choice(FORMATS), return_latents=self.random.random() < 0.2
        )

    def sample(self) -> None:
        count = self.random.choice((1, 1, 2, 4, 16))
        self.stub.Sample(
            pb.SampleRequest(model="tiny-gen", count=count, base_seed=self.seed(), output=self.output()),
            timeout=10,
        )

    def sample_cond(self) -> None:
        request = pb.SampleRequest(
            model="tiny-cond", seeds=[self.seed(), self.seed()], labels=[3], output=self.output()
        )
        request.truncation_psi = 0.7
        self.stub.Sample(request, timeout=10)

    def stream(self) -> None:
        sample = pb.SampleRequest(model="tiny-gen", count=48, base_seed=self.seed())
        for _ in self.stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=16), timeout=20):
            pass

    def interpolate(self) -> None:
        request = pb.InterpolateRequest(
            model="tiny-gen",
            start=pb.LatentPoint(seed=self.seed()),
            end=pb.LatentPoint(seed=self.seed()),
            steps=8,
        )
        self.stub.Interpolate(request, timeout=10)

    def encode(self) -> None:
        self.stub.Encode(
            pb.EncodeRequest(model="tiny-vae-enc", images=[self.enc_image], sample=True), timeout=10
        )

    def decode(self) -> None:
        z = self.rng.normal(size=(3, 8)).astype("<f4")
        latents = tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.tobytes())
        self.stub.Decode(pb.DecodeRequest(model="tiny-vae-dec", latents=latents), timeout=10)

    def super_resolve(self) -> None:
        self.stub.SuperResolve(
            pb.ImageRequest(model="tiny-sr", images=[self.sr_image], output=self.output()), timeout=20
        )

    def translate(self) -> None:
        self.stub.Translate(pb.ImageRequest(model="tiny-i2i", images=[self.i2i_image]), timeout=10)

    def infer(self) -> None:
        z = self.rng.normal(size=(2, 16)).astype("<f4")
        request = kpb.ModelInferRequest(model_name="tiny-gen")
        request.inputs.add(name="z", datatype="FP32", shape=[2, 16])
        request.raw_input_contents.append(z.tobytes())
        self.kstub.ModelInfer(request, timeout=10)

    def cancelled(self) -> str:
        future = self.stub.SuperResolve.future(
            pb.ImageRequest(model="tiny-sr", images=[self.sr_image] * 4), timeout=10
        )
        time.sleep(0.001)
        future.cancel()  # usually while its tiles are queued: they must leave the queue uncomputed
        return "CANCELLED"

    def one(self) -> str:
        _, op = self.random.choices(self.ops, weights=self.weights)[0]
        try:
            outcome = op()
        except grpc.RpcError as exc:
            return str(exc.code().name)
        return outcome if isinstance(outcome, str) else "OK"


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        return _soak(args, args.models or tiny_repository(work / "models"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _soak(args: argparse.Namespace, models: Path) -> dict[str, Any]:
    codes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    samples: list[dict[str, Any]] = []
    with ServerProcess.genserve(models) as server:

        def client(i: int) -> None:
            with grpc.insecure_channel(server.target) as channel:
                mix = Mix(channel, seed=i)
                while not stop.is_set():
                    code = mix.one()
                    with lock:
                        codes[code] += 1
                    if args.pause_ms:
                        time.sleep(args.pause_ms / 1e3)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.threads)]
        started = time.monotonic()
        for t in threads:
            t.start()
        next_at = started
        while (now := time.monotonic()) < started + args.duration_s:
            if now >= next_at:
                server.check_alive()
                with lock:
                    calls = sum(codes.values())
                sample = {"t_s": round(now - started, 1), **proc_sample(server.pid), "calls": calls}
                samples.append(sample)
                write_line(
                    f"t={sample['t_s']:>6.0f}s rss={sample['rss_bytes'] / 2**20:7.1f} MiB "
                    f"fds={sample['open_fds']:4d} threads={sample['threads']:3d} calls={calls}"
                )
                next_at += args.sample_s
            time.sleep(min(1.0, max(0.0, next_at - time.monotonic())))
        stop.set()
        for t in threads:
            t.join(30)
        final = {
            "t_s": round(time.monotonic() - started, 1),
            **proc_sample(server.pid),
            "calls": sum(codes.values()),
        }
        samples.append(final)
        server.check_alive()
    baseline = next((s for s in samples if s["t_s"] >= args.warmup_s), samples[0])

    def growth(key: str) -> float:
        return float(final[key] - baseline[key]) / max(1, int(baseline[key]))

    bad = {c: n for c, n in codes.items() if c in ("UNKNOWN", "INTERNAL")}
    result = {
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "threads": args.threads,
        "calls": sum(codes.values()),
        "calls_per_s": round(sum(codes.values()) / final["t_s"], 1),
        "codes": dict(codes.most_common()),
        "baseline": baseline,
        "final": final,
        "rss_growth": round(growth("rss_bytes"), 4),
        "fd_growth": round(growth("open_fds"), 4),
        "rss_growth_from_start": round(
            (final["rss_bytes"] - samples[0]["rss_bytes"]) / samples[0]["rss_bytes"], 4
        ),
        "target_growth": TARGET_GROWTH,
        "unexpected_codes": bad,
        "samples": samples,
    }
    result["pass"] = result["rss_growth"] < TARGET_GROWTH and result["fd_growth"] < TARGET_GROWTH and not bad
    return result


@ctrl_c_exits_130("bench.soak")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="how long (default 600)")
    parser.add_argument(
        "--warmup-s", type=float, default=60.0, help="growth is measured from here (default 60)"
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS/fd sampling interval (default 10)")
    parser.add_argument("--threads", type=int, default=3, help="closed-loop client threads (default 3)")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="pause between a thread's calls")
    parser.add_argument("--models", type=Path, default=None, help="model repository (default: tiny models)")
    parser.add_argument("--out", type=Path, default=SCRATCH / "soak.json")
    args = parser.parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    mib = 2**20
    write_line(
        f"calls {result['calls']} ({result['calls_per_s']}/s), codes {result['codes']}\n"
        f"RSS {result['baseline']['rss_bytes'] / mib:.1f} -> {result['final']['rss_bytes'] / mib:.1f} MiB "
        f"({100 * result['rss_growth']:+.2f} % after {args.warmup_s:g} s warm-up; "
        f"{100 * result['rss_growth_from_start']:+.2f} % from the first sample)\n"
        f"open fds {result['baseline']['open_fds']} -> {result['final']['open_fds']} "
        f"({100 * result['fd_growth']:+.2f} %); target < {100 * TARGET_GROWTH:.0f} %: "
        f"{'PASS' if result['pass'] else 'FAIL'}; written to {args.out}"
    )
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
