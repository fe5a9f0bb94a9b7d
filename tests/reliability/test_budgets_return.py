"""Every budget is whole again once a storm of calls that hit them has settled.

A seeded, bounded storm (a few hundred calls) under small limits, so that each budget is hit:
unary calls in both lanes (a BULK unary call gives its response bytes back while it waits for room
in its lane and takes them back first in line: batch_parts.Held), streams read, cancelled part-way
or never read (on a channel without BDP probing, so that their windows stay 64 KiB), short
deadlines, client cancels, requests over the limits, KServe ModelInfer on the super-resolution and
image-to-image models (their working sets), code priors and a style generator. Then:

- the idle gauges (queue rows per model, step rows, response bytes, both working sets, in-flight
  calls) read 0;
- what /metrics does not show is whole too: max_concurrent_rpcs slow calls at once are all admitted,
  max_concurrent_sample_streams streams too, a request of the whole queue of a model is queued,
  and a code prior's call of its whole row budget runs;
- a good request of each kind is served.

test_chaos.py storms with the default limits (the small ones only with GENSERVE_CHAOS_TIGHT=1), no
BULK unary calls, no KServe calls on image models, and checks the gauges only.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from code_models import write_code_models
from reliability_support import NO_BDP_PROBE, write_slow
from server_support import TINY_LATENT, ServerProcess, build_tiny_repo, metric_in, start_server, wait_until
from style_models import write_style_models
from translator_models import write_translator

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

SEED = 20240917
CALLS = 300
WORKERS = 14
HANG_MARGIN_S = 5.0
LIMITS = {
    "max_concurrent_rpcs": 16,
    "max_concurrent_sample_streams": 2,
    "response_budget_bytes": 1 << 20,
    "sr_working_set_bytes": 1 << 20,
    "translate_working_set_bytes": 1 << 20,
    "stream_write_timeout_s": 0.3,
    "budget_max_wait_s": 0.5,
}
IDLE_GAUGES = (
    "genserve_queue_depth",
    "genserve_requests_in_flight",
    "genserve_step_running_rows",
    "genserve_response_bytes_pending",
    "genserve_sr_working_set_bytes",
    "genserve_translate_working_set_bytes",
)
EXPECTED = {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}
FORMATS = [
    tpb.IMAGE_FORMAT_PNG,
    tpb.IMAGE_FORMAT_JPEG,
    tpb.IMAGE_FORMAT_RAW_UINT8,
    tpb.IMAGE_FORMAT_TENSOR_F32,
]
OPS = [
    "sample",
    "sample_bulk",
    "sample_bulk",
    "sample_bulk",
    "oversize",
    "style",
    "mix",
    "interpolate",
    "stream",
    "stream_unread",
    "sr",
    "sr_large",
    "translate",
    "cyclegan",
    "kserve_sr",
    "kserve_i2i",
    "kserve_gen",
    "codes",
    "codes_stream",
]


def _raw(rng: random.Random, h: int, w: int, c: int = 3) -> tpb.Image:
    data = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (h, w, c), np.uint8)
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=data.tobytes(), shape=[h, w, c])


def _infer(model: str, name: str, x: np.ndarray) -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=list(x.shape))
    return kpb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])


class Storm:
    def __init__(self, target: str, names: dict[str, str]) -> None:
        self.names = names
        self.channels = [grpc.aio.insecure_channel(target) for _ in range(3)]
        self.unread_channel = grpc.aio.insecure_channel(target, options=NO_BDP_PROBE)
        self.unread: list[Any] = []  # streams never read, cancelled after the gauges went idle
        self.codes: Counter[tuple[str, str]] = Counter()
        self.left = CALLS

    async def close(self) -> None:
        for call in self.unread:
            call.cancel()
        for channel in [*self.channels, self.unread_channel]:
            await channel.close()

    async def _end(self, op: str, call: Any, budget: float, cancel_at: float | None, read: str) -> None:
        async def run() -> str:
            try:
                if read == "all":
                    async for _ in call:
                        pass
                elif read == "some":
                    async for _ in call:
                        break
                    call.cancel()
                elif cancel_at is not None:
                    await asyncio.sleep(cancel_at)
                    call.cancel()
            except grpc.aio.AioRpcError:
                pass
            return str((await call.code()).name)

        try:
            code = await asyncio.wait_for(run(), budget + HANG_MARGIN_S)
        except TimeoutError:
            call.cancel()
            code = "HUNG"
        self.codes[(op, code)] += 1

    async def one(self, rng: random.Random, channel: grpc.aio.Channel) -> None:
        gen = pb_grpc.GenerationServiceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        unread = pb_grpc.GenerationServiceStub(self.unread_channel)
        names = self.names
        op = rng.choice(OPS)
        budget = rng.uniform(0.001, 0.05) if rng.random() < 0.25 else rng.uniform(0.5, 3.0)
        cancel_at = rng.uniform(0.0, 0.05) if rng.random() < 0.25 else None
        bulk = op == "sample_bulk" or rng.random() < 0.3
        priority = tpb.PRIORITY_BULK if bulk else tpb.PRIORITY_INTERACTIVE
        output = tpb.OutputOptions(format=rng.choice(FORMATS))
        call: Any
        read = "none"
        if op in ("sample", "sample_bulk", "oversize", "style"):
            model = (
                names["generator"] if op == "style" else rng.choice(["tiny-gen", "tiny-cond", "tiny-vae-dec"])
            )
            count = 5000 if op == "oversize" else rng.randrange(1, 257)
            if op == "sample_bulk":  # slow: queue 64, so BULK calls wait for its bulk share (32 rows)
                model, count = "slow", rng.randrange(4, 33)
            request = pb.SampleRequest(
                model=model,
                count=count,
                labels=[rng.randrange(10)] if model == "tiny-cond" else [],
                base_seed=rng.randrange(1 << 30),
                priority=priority,
                output=output,
            )
            call = gen.Sample(request, timeout=budget)
        elif op == "mix":
            mixes = [
                pb.StyleMix(
                    coarse_seed=rng.randrange(100),
                    fine_seed=rng.randrange(100),
                    crossover=rng.randrange(1, 4),
                )
                for _ in range(rng.randrange(1, 8))
            ]
            request = pb.MixStylesRequest(
                model=names["generator"], mixes=mixes, priority=priority, output=output
            )
            call = gen.MixStyles(request, timeout=budget)
        elif op == "interpolate":
            request = pb.InterpolateRequest(
                model="tiny-gen",
                start=pb.LatentPoint(seed=rng.randrange(100)),
                end=pb.LatentPoint(seed=rng.randrange(100)),
                steps=rng.randrange(2, 257),
                output=output,
            )
            call = gen.Interpolate(request, timeout=budget)
        elif op in ("stream", "stream_unread"):
            sample = pb.SampleRequest(
                model=rng.choice(["tiny-gen", "tiny-cond"]),
                count=rng.randrange(1, 3000),
                labels=[rng.randrange(10)],
                priority=priority,
                output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32),
            )
            request = pb.SampleStreamRequest(sample=sample, chunk_size=rng.randrange(0, 64))
            if op == "stream_unread":
                self.unread.append(unread.SampleStream(request, timeout=budget))
                return
            call, read = gen.SampleStream(request, timeout=budget), rng.choice(["all", "some"])
        elif op in ("sr", "sr_large"):
            low, high = (400, 900) if op == "sr_large" else (4, 80)
            images = [
                _raw(rng, rng.randrange(low, high), rng.randrange(low, high))
                for _ in range(rng.randrange(1, 4))
            ]
            model = rng.choice(["tiny-sr", "tiny-sr-wide"])
            call = gen.SuperResolve(
                pb.ImageRequest(model=model, images=images, output=output), timeout=budget
            )
        elif op == "translate":
            side = rng.choice([8, 64, 256, 400])
            images = [_raw(rng, side, side) for _ in range(rng.randrange(1, 4))]
            call = gen.Translate(
                pb.ImageRequest(model="tiny-i2i", images=images, output=output), timeout=budget
            )
        elif op == "cyclegan":
            side = rng.choice([8, 16, 24])
            request = pb.ImageRequest(
                model="tiny-cyclegan",
                images=[_raw(rng, side, side, 1)],
                direction=rng.choice([1, 2]),
                output=output,
            )
            call = gen.Translate(request, timeout=budget)
        elif op in ("kserve_sr", "kserve_i2i"):
            side = rng.choice([8, 64, 200, 300])
            x = np.zeros((rng.randrange(1, 4), 3, side, side), np.float32)
            model = "tiny-sr" if op == "kserve_sr" else "tiny-i2i"
            call = kserve.ModelInfer(_infer(model, "image", x), timeout=budget)
        elif op == "kserve_gen":
            x = np.zeros((rng.randrange(1, 200), TINY_LATENT), np.float32)  # over max_batch_size 64 too
            call = kserve.ModelInfer(_infer("tiny-gen", "z", x), timeout=budget)
        else:  # codes, codes_stream
            model = rng.choice([names["prior"], names["chain"]])
            request = pb.SampleCodesRequest(
                model=model,
                count=rng.randrange(1, 10),  # 9: over the row budget
                base_seed=rng.randrange(1000),
                labels=[rng.randrange(3)] if model == names["prior"] else [],
                output=output,
            )
            if op == "codes":
                call = gen.SampleCodes(request, timeout=budget)
            else:
                request.preview_every = rng.randrange(0, 4)
                if rng.random() < 0.5:
                    self.unread.append(unread.SampleCodesStream(request, timeout=budget))
                    return
                call, read = gen.SampleCodesStream(request, timeout=budget), "all"
        await self._end(op, call, budget, cancel_at, read)

    async def run(self) -> None:
        async def worker(i: int) -> None:
            rng = random.Random(SEED * 100 + i)
            while self.left > 0:
                self.left -= 1
                await self.one(rng, self.channels[i % len(self.channels)])

        await asyncio.gather(*(worker(i) for i in range(WORKERS)))


def _not_idle(server: ServerProcess) -> list[str]:
    text = server.metrics_text()
    return [line for line in text.splitlines() if line.startswith(IDLE_GAUGES) and not line.endswith(" 0.0")]


async def _whole_again(server: ServerProcess, names: dict[str, str]) -> list[str]:
    """What /metrics does not show: admission slots, a whole queue, a whole row budget; then a good
    request of each kind."""
    problems = []
    async with grpc.aio.insecure_channel(server.target) as channel:
        gen = pb_grpc.GenerationServiceStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        slots = int(LIMITS["max_concurrent_rpcs"])
        calls = [
            gen.Sample(pb.SampleRequest(model="slow", count=1, base_seed=i), timeout=20) for i in range(slots)
        ]
        codes = Counter([(await call.code()).name for call in calls])
        if codes != Counter({"OK": slots}):
            problems.append(f"{slots} slow Samples at once (max_concurrent_rpcs={slots}): {dict(codes)}")
        streams = [
            gen.SampleStream(
                pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=20)), timeout=20
            )
            for _ in range(int(LIMITS["max_concurrent_sample_streams"]))
        ]
        for stream in streams:
            try:
                async for _ in stream:
                    pass
            except grpc.aio.AioRpcError as exc:
                problems.append(f"SampleStream beside another: {exc.code().name} {exc.details()}")
        whole_queue = np.zeros((64, 8), np.float32)  # tiny-vae-dec: max_queue_size 64 (the default)
        kinds: list[tuple[str, Any, Any]] = [
            ("whole queue of tiny-vae-dec", kserve.ModelInfer, _infer("tiny-vae-dec", "z", whole_queue)),
            (
                "whole row budget of the prior",
                gen.SampleCodes,
                pb.SampleCodesRequest(model=names["prior"], count=8, labels=[0]),
            ),
            (
                "whole row budget of the chained prior",
                gen.SampleCodes,
                pb.SampleCodesRequest(model=names["chain"], count=8),
            ),
            ("generator", gen.Sample, pb.SampleRequest(model="tiny-gen", count=256)),
            ("conditional", gen.Sample, pb.SampleRequest(model="tiny-cond", count=64, labels=[3])),
            ("style generator", gen.Sample, pb.SampleRequest(model=names["generator"], count=4)),
            (
                "style mix",
                gen.MixStyles,
                pb.MixStylesRequest(
                    model=names["generator"], mixes=[pb.StyleMix(coarse_seed=1, fine_seed=2, crossover=2)]
                ),
            ),
            (
                "super-resolution",
                gen.SuperResolve,
                pb.ImageRequest(model="tiny-sr", images=[_raw(random.Random(0), 200, 200)]),
            ),
            (
                "translator",
                gen.Translate,
                pb.ImageRequest(model="tiny-i2i", images=[_raw(random.Random(1), 200, 200)]),
            ),
            (
                "two-way translator",
                gen.Translate,
                pb.ImageRequest(
                    model="tiny-cyclegan", images=[_raw(random.Random(2), 16, 16, 1)], direction=1
                ),
            ),
        ]
        for what, method, request in kinds:
            try:
                await method(request, timeout=20)
            except grpc.aio.AioRpcError as exc:
                problems.append(f"{what}: {exc.code().name} {exc.details()}")
    return problems


def test_every_budget_is_whole_again_after_a_storm_that_hit_them(tmp_path: Path) -> None:
    root = tmp_path / "models"
    build_tiny_repo(root, with_slow=False, with_broken=False)
    names = write_code_models(root)
    names.update(write_style_models(root))
    write_translator(root)
    write_slow(root, "slow", iterations=400, queue=64, batch=1)
    server = start_server(root, tmp_path / "work", config={"limits": LIMITS})
    try:

        async def storm_then_checks() -> tuple[Storm, list[str]]:
            storm = Storm(server.target, names)
            problems: list[str] = []
            try:
                await storm.run()
                # The unread streams stay open on the client: the server ends them itself.
                try:
                    await asyncio.to_thread(wait_until, lambda: not _not_idle(server), 15.0, "idle gauges")
                except AssertionError:
                    problems += [f"not idle: {line}" for line in _not_idle(server)]
            finally:
                await storm.close()
            return storm, problems + await _whole_again(server, names)

        storm, problems = asyncio.run(storm_then_checks())
        problems += [f"{op}: {code}" for (op, code), _ in storm.codes.items() if code not in EXPECTED]
        problems += [f"not idle at the end: {line}" for line in _not_idle(server)]
        seen = Counter(code for (_, code), n in storm.codes.items() for _ in range(n))
        assert not problems, (
            f"{dict(seen)}\n" + "\n".join(problems) + "\n--- log tail ---\n" + server.log()[-4000:]
        )
        # The storm hit what it is for: refusals of each kind of limit, and work done.
        assert {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"} <= set(seen), dict(seen)
        text = server.metrics_text()
        assert metric_in(text, "genserve_requests_rejected_total", reason="budget") > 0
    finally:
        server.stop()
