"""The naive baselines: plain genserve.v1 servers, one ONNX Runtime call per request.

What a user would write first: no batcher, no queue, no encode pool. Each request derives its
latents (the same Philox streams as genserve), runs the session once on the default thread pool
(`workers` threads, one per core, so ORT's GIL-free compute overlaps the event loop) and encodes
its images inline with the same codec settings (OpenCV PNG at the request's level, default 1; raw
uint8 HWC). The session is built with the same settings as the server's (bench.raw_limit), so
genserve / naive isolates what batching and the serving path add or save.

    python -m bench.naive_server --models models --port 0 --ready-file /tmp/naive.json

`--sync`: the same on the synchronous `grpc.server` with a pool of 10 handler threads, each request
computed start to end on its thread (latents, `session.run`, encode) — what most tutorials write,
and on tiny models the faster of the two (no event-loop hand-offs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from bench.common import BenchModel, ctrl_c_exits_130, find_models, write_text_whole
from bench.raw_limit import server_session
from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2
from genserve_contract.kinds import Kind
from genserve_server.codecs import DEFAULT_PNG_COMPRESSION, decode_image, encode_image, from_uint8, to_uint8
from genserve_server.config import cpu_count
from genserve_server.latents import RNG_ALGORITHM, latents_for_seeds

logger = logging.getLogger("bench.naive_server")

_KIND_RPCS = {
    "Sample": (Kind.GENERATOR, Kind.CONDITIONAL_GENERATOR, Kind.VAE_DECODER),
    "SuperResolve": (Kind.SUPER_RESOLUTION,),
    "Translate": (Kind.IMAGE_TO_IMAGE,),
}


class NaiveModel:
    def __init__(self, model: BenchModel, cores: int) -> None:
        self.model = model
        self.card = model.card
        self.session, _ = server_session(model, cores)
        self.provider = self.session.get_providers()[0]
        self.output_name = self.session.get_outputs()[0].name
        self.info = genserve_pb2.ModelInfo(
            name=model.name,
            kind=model.kind,
            description=self.card.description,
            versions=[
                genserve_pb2.ModelVersionInfo(
                    version=model.version_dir.name,
                    state=genserve_pb2.MODEL_STATE_READY,
                    precision="fp32",
                    execution_provider=self.provider,
                    card_json=self.card.raw_json,
                )
            ],
            latent_dim=self.card.latent_dim or 0,
            class_names=list(self.card.class_names),
            output_shape=[self.card.channels, *self.card.image_size] if self.card.image_size else [],
            max_batch_size=model.max_batch_size,
            scale_factor=self.card.scale_factor,
            size_multiple=self.card.size_multiple,
        )

    def provenance(self, batch: int) -> types_pb2.Provenance:
        return types_pb2.Provenance(
            model=self.model.name,
            version=self.model.version_dir.name,
            onnxruntime_version=ort.__version__,
            execution_provider=self.provider,
            precision="fp32",
            executed_batch_sizes=[batch],
            rng_algorithm=RNG_ALGORITHM,
            server_version="naive",
        )


def encode(pixels: NDArray[np.uint8], options: types_pb2.OutputOptions) -> types_pb2.Image:
    """One response image with the server's own codec (OpenCV PNG at the request's level, default 1)."""
    level = options.png_compression if options.HasField("png_compression") else DEFAULT_PNG_COMPRESSION
    fmt = options.format or types_pb2.IMAGE_FORMAT_PNG
    data, shape = encode_image(pixels, fmt, quality=options.quality or 90, png_compression=level)
    return types_pb2.Image(format=fmt, data=data, shape=shape)


def sample_feeds(
    model: NaiveModel, request: genserve_pb2.SampleRequest
) -> tuple[list[int], list[int], dict[str, NDArray[Any]]]:
    """A Sample request's seeds, labels and session feeds (the same Philox latents as genserve)."""
    count = len(request.seeds) or request.count
    base = request.base_seed if request.HasField("base_seed") else 0
    seeds = list(request.seeds) or [base + i for i in range(count)]
    psi = request.truncation_psi if request.HasField("truncation_psi") else None
    feeds: dict[str, NDArray[Any]] = {"z": latents_for_seeds(seeds, model.card.latent_dim or 1, psi)}
    labels: list[int] = []
    if model.model.kind.conditional:
        given = list(request.labels) or [0]
        labels = [given[i % len(given)] for i in range(count)]
        feeds["label"] = np.asarray(labels, dtype=np.int64)
    return seeds, labels, feeds


def sample_response(
    model: NaiveModel,
    request: genserve_pb2.SampleRequest,
    seeds: list[int],
    labels: list[int],
    output: NDArray[np.float32],
) -> genserve_pb2.SampleResponse:
    """The response for the model's output: pixels encoded inline, one image per seed."""
    pixels = to_uint8(output, model.card.output_range)
    response = genserve_pb2.SampleResponse(provenance=model.provenance(len(seeds)))
    for i, seed in enumerate(seeds):
        item = response.images.add(image=encode(pixels[i], request.output), seed=seed, index=i)
        if labels:
            item.label = labels[i]
    return response


class SyncNaiveServicer(genserve_pb2_grpc.GenerationServiceServicer):
    """The plain synchronous server (issue 20's second baseline): `grpc.server` with a thread pool,
    each request handled start to end on one pool thread, `session.run` called inline. Serves
    Sample (and ListModels/GetModel, which the load generator asks first)."""

    def __init__(self, models: dict[str, NaiveModel]) -> None:
        self.models = models

    def _get(self, name: str, context: grpc.ServicerContext) -> NaiveModel:
        model = self.models.get(name)
        if model is None or model.model.kind not in _KIND_RPCS["Sample"]:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} not served for Sample")
        assert model is not None  # context.abort raised otherwise
        return model

    def Sample(  # noqa: N802 - gRPC method name
        self, request: genserve_pb2.SampleRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.SampleResponse:
        model = self._get(request.model, context)
        seeds, labels, feeds = sample_feeds(model, request)
        output: NDArray[np.float32] = model.session.run([model.output_name], feeds)[0]
        return sample_response(model, request, seeds, labels, output)

    def ListModels(  # noqa: N802
        self, request: genserve_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ListModelsResponse:
        return genserve_pb2.ListModelsResponse(models=[m.info for m in self.models.values()])

    def GetModel(  # noqa: N802
        self, request: genserve_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ModelInfo:
        model = self.models.get(request.name)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
        assert model is not None
        return model.info

    def _unimplemented(self, context: grpc.ServicerContext, rpc: str) -> NoReturn:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"the sync baseline serves Sample only, not {rpc}")
        raise AssertionError("abort returned")

    def SampleStream(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "SampleStream")

    def Interpolate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "Interpolate")

    def Encode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "Encode")

    def Decode(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "Decode")

    def SuperResolve(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "SuperResolve")

    def Translate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "Translate")

    def SampleCodes(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "SampleCodes")

    def SampleCodesStream(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "SampleCodesStream")

    def MixStyles(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._unimplemented(context, "MixStyles")


class NaiveServicer(genserve_pb2_grpc.GenerationServiceServicer):
    def __init__(self, models: dict[str, NaiveModel], executor: ThreadPoolExecutor) -> None:
        self.models = models
        self.executor = executor

    async def _get(self, name: str, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> NaiveModel:
        model = self.models.get(name)
        if model is None or model.model.kind not in _KIND_RPCS[rpc]:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} not served for {rpc}")
            raise AssertionError("abort returned")  # context.abort always raises
        return model

    async def _run(self, model: NaiveModel, feeds: dict[str, NDArray[Any]]) -> NDArray[np.float32]:
        loop = asyncio.get_running_loop()
        outputs = await loop.run_in_executor(self.executor, model.session.run, [model.output_name], feeds)
        result: NDArray[np.float32] = outputs[0]
        return result

    async def Sample(  # noqa: N802 - gRPC method name
        self, request: genserve_pb2.SampleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.SampleResponse:
        model = await self._get(request.model, "Sample", context)
        seeds, labels, feeds = sample_feeds(model, request)
        return sample_response(model, request, seeds, labels, await self._run(model, feeds))

    async def _image_to_image(
        self, request: genserve_pb2.ImageRequest, context: grpc.aio.ServicerContext[Any, Any], rpc: str
    ) -> genserve_pb2.ImageResponse:
        model = await self._get(request.model, rpc, context)
        card = model.card
        input_range = card.input_range or (0.0, 1.0)
        channels = card.input_channels or 3
        response = genserve_pb2.ImageResponse(provenance=model.provenance(len(request.images)))
        for i, message in enumerate(request.images):
            pixels = decode_image(
                message.data, message.format, message.shape, max_pixels=1 << 24, field=f"images[{i}]"
            )
            chw = from_uint8(np.asarray(pixels, dtype=np.uint8), input_range, channels)
            output = await self._run(model, {"image": chw[np.newaxis]})
            response.images.append(encode(to_uint8(output, card.output_range)[0], request.output))
            response.tiles.append(1)
        return response

    async def SuperResolve(  # noqa: N802
        self, request: genserve_pb2.ImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.ImageResponse:
        return await self._image_to_image(request, context, "SuperResolve")

    async def Translate(  # noqa: N802
        self, request: genserve_pb2.ImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.ImageResponse:
        return await self._image_to_image(request, context, "Translate")

    async def _unimplemented(self, context: grpc.aio.ServicerContext[Any, Any], rpc: str) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"the naive baseline does not serve {rpc}")
        raise AssertionError("abort returned")

    async def SampleStream(  # noqa: N802
        self, request: genserve_pb2.SampleStreamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[genserve_pb2.SampleStreamChunk]:
        await self._unimplemented(context, "SampleStream")
        yield genserve_pb2.SampleStreamChunk()  # unreachable: makes this an async generator

    async def Interpolate(  # noqa: N802
        self, request: genserve_pb2.InterpolateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.SampleResponse:
        await self._unimplemented(context, "Interpolate")

    async def Encode(  # noqa: N802
        self, request: genserve_pb2.EncodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.EncodeResponse:
        await self._unimplemented(context, "Encode")

    async def Decode(  # noqa: N802
        self, request: genserve_pb2.DecodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.SampleResponse:
        await self._unimplemented(context, "Decode")

    async def SampleCodes(  # noqa: N802
        self, request: genserve_pb2.SampleCodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.SampleCodesResponse:
        await self._unimplemented(context, "SampleCodes")

    async def SampleCodesStream(  # noqa: N802
        self, request: genserve_pb2.SampleCodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[genserve_pb2.SampleCodesChunk]:
        await self._unimplemented(context, "SampleCodesStream")
        yield genserve_pb2.SampleCodesChunk()  # unreachable: makes this an async generator

    async def MixStyles(  # noqa: N802
        self, request: genserve_pb2.MixStylesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.SampleResponse:
        await self._unimplemented(context, "MixStyles")

    async def ListModels(  # noqa: N802
        self, request: genserve_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.ListModelsResponse:
        return genserve_pb2.ListModelsResponse(models=[m.info for m in self.models.values()])

    async def GetModel(  # noqa: N802
        self, request: genserve_pb2.GetModelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> genserve_pb2.ModelInfo:
        model = self.models.get(request.name)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.name!r}")
            raise AssertionError("abort returned")
        return model.info


def _load_models(models_dir: Path) -> dict[str, NaiveModel]:
    cores = cpu_count()
    return {
        m.name: NaiveModel(m, cores)
        for m in find_models(models_dir)
        if m.kind in sum(_KIND_RPCS.values(), ())
    }


_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def _write_ready(ready_file: Path | None, port: int) -> None:
    if ready_file is not None:  # through a temporary of its own: `x.json` and `x.ready` shared `x.tmp`
        write_text_whole(ready_file, json.dumps({"port": port, "metrics_port": 0, "pid": os.getpid()}))


async def serve(models_dir: Path, host: str, port: int, ready_file: Path | None, workers: int) -> int:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, which stop the server; returns that signal's number."""
    models = _load_models(models_dir)
    executor = ThreadPoolExecutor(max_workers=workers or cpu_count(), thread_name_prefix="naive-ort")
    server = grpc.aio.server(options=_OPTIONS)
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(NaiveServicer(models, executor), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    _write_ready(ready_file, bound)
    logger.info("naive server on %s:%d serving %s", host, bound, sorted(models))
    # Handled here, not as KeyboardInterrupt through asyncio.run: that leaves the server to a closed
    # loop (grpc's 'Event loop is closed' traceback), and SIGTERM's default would kill the process.
    signals: list[int] = []
    stop = asyncio.Event()

    def stopped_by(sig: int) -> None:
        signals.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stopped_by, sig)
    try:
        await stop.wait()
        await server.stop(0)
    finally:
        executor.shutdown(wait=False)
    return signals[0]


def serve_sync(models_dir: Path, host: str, port: int, ready_file: Path | None, workers: int) -> None:
    """The synchronous baseline: `grpc.server(ThreadPoolExecutor(max_workers=10))` by default."""
    models = _load_models(models_dir)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers or 10), options=_OPTIONS)
    genserve_pb2_grpc.add_GenerationServiceServicer_to_server(SyncNaiveServicer(models), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    _write_ready(ready_file, bound)
    logger.info("naive sync server on %s:%d serving %s", host, bound, sorted(models))
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


@ctrl_c_exits_130("bench.naive_server")
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument(
        "--workers", type=int, default=0, help="session.run threads (default: cores; --sync: 10 handlers)"
    )
    parser.add_argument("--sync", action="store_true", help="the synchronous grpc.server baseline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ort.set_default_logger_severity(4)  # 3 still prints the CUDA/TensorRT load errors
    # Stopped by SIGTERM (how bench stops it): exit 0; by Ctrl-C: ctrl_c_exits_130's line, exit 130.
    if args.sync:
        serve_sync(args.models, args.host, args.port, args.ready_file, args.workers)
    elif (
        asyncio.run(serve(args.models, args.host, args.port, args.ready_file, args.workers)) == signal.SIGINT
    ):
        raise KeyboardInterrupt
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
