"""Test helpers for the client: an in-process fake GenerationService (fast, no models) and a CLI
runner. (A uniquely named module: `conftest` is ambiguous between test folders.)"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from PIL import Image

from genserve.v1 import genserve_pb2, genserve_pb2_grpc, types_pb2
from genserve_contract.kinds import SAMPLE_KINDS, TRANSLATE_KINDS, Kind

FAKE_LATENT = 4
FAKE_CLASSES = [str(i) for i in range(10)]
FAKE_SHA256 = hashlib.sha256(b"fake model").hexdigest()


def fake_pixels(seed: int, label: int | None) -> np.ndarray:
    """A 4x4 gray image that depends only on (seed, label), like a real generator."""
    return np.random.default_rng([seed, (label or 0) + 1]).integers(0, 256, (4, 4, 1), dtype=np.uint8)


def fake_latent(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(FAKE_LATENT).astype(np.float32)


def encode_fake(pixels: np.ndarray, fmt: int) -> types_pb2.Image:
    if fmt == types_pb2.IMAGE_FORMAT_RAW_UINT8:
        return types_pb2.Image(format=fmt, data=pixels.tobytes(), shape=pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).save(buf, format="PNG")
    return types_pb2.Image(format=types_pb2.IMAGE_FORMAT_PNG, data=buf.getvalue(), shape=pixels.shape)


@dataclass
class FakeService(genserve_pb2_grpc.GenerationServiceServicer):
    """Deterministic images from (seed, label); failures injected per method, in order (a code, or
    a code and the status details to send with it). Model "bad" is rejected as INVALID_ARGUMENT."""

    # The models it serves (a name's ending gives its kind, _kind): ListModels lists them, and every
    # RPC naming a model answers as the server does for one its repository does not have (NOT_FOUND)
    # or one of a kind the RPC does not take (INVALID_ARGUMENT), and, of the versions _info lists,
    # for a version it does not have (NOT_FOUND) or one not READY (UNAVAILABLE).
    models: list[str] = field(
        default_factory=lambda: ["fake-gen", "fake-cond", "fake-i2i", "fake-prior", "bad"]
    )

    fail: dict[str, list[grpc.StatusCode | tuple[grpc.StatusCode, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    calls: Counter[str] = field(default_factory=Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)
    # SampleStream: fail with UNAVAILABLE after this many chunks, as often as listed.
    stream_breaks_after_chunks: list[int] = field(default_factory=list)
    # SampleCodesStream: fail with UNAVAILABLE after its progress chunk, as often as listed.
    codes_stream_breaks: list[bool] = field(default_factory=list)
    # SampleCodesStream: after its progress chunk, send nothing more until its client cancels
    # (a long sampling); codes_stream_ended is set when a SampleCodesStream call ends on the server.
    codes_stream_hangs: bool = False
    codes_stream_ended: threading.Event = field(default_factory=threading.Event)
    # Set when a SampleStream call ends on the server (finished, failed or cancelled).
    stream_ended: threading.Event = field(default_factory=threading.Event)
    # What every model serves (GetModel, provenance); tests change them to "replace" the model, or
    # _info to serve other versions (the one served is the one asked for, else the highest READY).
    version: str = "1"
    model_sha256: str = FAKE_SHA256
    # Provenance.used_models: (model, version, sha256) of a mapping or decoder beside the model.
    used_models: list[tuple[str, str, str]] = field(default_factory=list)
    # UsedModel.weights_sha256 of those of them with external data files, by model.
    used_weights_sha256: dict[str, str] = field(default_factory=dict)
    # Provenance/ModelVersionInfo.weights_sha256: a model with external data files ("": none).
    weights_sha256: str = ""
    # Provenance/ModelVersionInfo.card_sha256: the card.json the version loaded ("": not reported).
    card_sha256: str = ""
    # UsedModel.card_sha256 of the used models, by model.
    used_card_sha256: dict[str, str] = field(default_factory=dict)
    # Sample: each call takes this long (a server whose latency the test controls), and the most
    # Sample calls in progress at once so far.
    sample_delay_s: float = 0.0
    # Sample: the first this many calls hang, never answered while their client waits (a server
    # that stops answering).
    sample_hangs: int = 0
    sample_peak: int = 0
    # Sample: each call's SampleRequest.version, in order ("" for the highest ready).
    sample_versions: list[str] = field(default_factory=list)
    # SampleStream: each call's (sample.version, start_index, sample.count), in order.
    stream_requests: list[tuple[str, int, int]] = field(default_factory=list)
    # GetModel: each call's GetModelRequest.version, in order ("" for all versions; a version _info
    # does not list is answered NOT_FOUND, as the server answers).
    model_versions: list[str] = field(default_factory=list)
    _sample_now: int = 0
    _sample_lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls[method] += 1
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.metadata.append(md)
        context.set_trailing_metadata((("x-request-id", "srv-" + md.get("x-request-id", "none")),))
        if self.fail[method]:
            failure = self.fail[method].pop(0)
            code, details = failure if isinstance(failure, tuple) else (failure, "")
            context.abort(code, details or f"injected {code.name} for {method}")

    def _serve(
        self,
        context: grpc.ServicerContext,
        name: str,
        kinds: tuple[str, ...],
        method: str,
        field: str = "model",
        version: str = "",
    ) -> str:
        """As the server's resolve answers a call of `method` naming model `name` in request field
        `field`: INVALID_ARGUMENT for none, NOT_FOUND naming the models served for one it does not
        serve, INVALID_ARGUMENT for one of a kind not in `kinds`; then the version it serves (of
        those _info lists): `version`, else the highest READY one. NOT_FOUND naming the versions
        served for a `version` it does not have, UNAVAILABLE for one not READY, or where none is."""
        if not name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: required (see ListModels)")
        if name not in self.models:
            served = ", ".join(sorted(self.models)) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {name!r} not found; models: {served}")
        kind = _kind(name)
        if kind not in kinds:
            needs = " or ".join(kinds)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {name} is a {kind} model; {method} needs {needs}"
            )
        versions = self._info(name).versions
        ready = genserve_pb2.MODEL_STATE_READY
        if version:
            found = [v for v in versions if v.version == version]
            if not found:
                served = ", ".join(v.version for v in versions) or "none"
                context.abort(
                    grpc.StatusCode.NOT_FOUND, f"model {name} has no version {version!r}; versions: {served}"
                )
            if found[0].state != ready:
                state = genserve_pb2.ModelState.Name(found[0].state).removeprefix("MODEL_STATE_")
                context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model {name} version {version} is {state}: {found[0].reason or 'not ready'}",
                )
            return version
        served_ready = [v.version for v in versions if v.state == ready]
        if not served_ready:
            reasons = "; ".join(
                f"v{v.version}: {genserve_pb2.ModelState.Name(v.state).removeprefix('MODEL_STATE_')} "
                f"{v.reason}".rstrip()
                for v in versions
            )
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"model {name} has no ready version ({reasons or 'no versions'})"
            )
        return max(served_ready, key=int)

    def _item(
        self, index: int, seed: int, label: int | None, out: types_pb2.OutputOptions
    ) -> types_pb2.GeneratedImage:
        g = types_pb2.GeneratedImage(
            image=encode_fake(fake_pixels(seed, label), out.format), seed=seed, index=index
        )
        if label is not None:
            g.label = label
        if out.return_latents:
            z = fake_latent(seed)
            g.latent.CopyFrom(
                types_pb2.Tensor(shape=z.shape, dtype=types_pb2.DTYPE_FLOAT32, data=z.tobytes())
            )
        return g

    def Sample(
        self, request: genserve_pb2.SampleRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.SampleResponse:
        self._enter("Sample", context)
        served = self._serve(context, request.model, SAMPLE_KINDS, "Sample", version=request.version)
        with self._sample_lock:
            self.sample_versions.append(request.version)
            self._sample_now += 1
            self.sample_peak = max(self.sample_peak, self._sample_now)
            hang, self.sample_hangs = self.sample_hangs > 0, max(0, self.sample_hangs - 1)
        while hang and context.is_active():
            time.sleep(0.02)
        try:
            time.sleep(self.sample_delay_s)
        finally:
            with self._sample_lock:
                self._sample_now -= 1
        if request.model == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model: 'bad' is rejected by the fake")
        # Explicit latents (arithmetic's means) are one image each, drawn as seed 0's.
        rows = request.latents.shape[0] if request.HasField("latents") and request.latents.shape else 0
        n = len(request.seeds) or rows or request.count
        if not 1 <= n <= 256:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"count: must be in 1..256, got {n}")
        seeds = list(request.seeds) or ([0] * rows if rows else [request.base_seed + i for i in range(n)])
        labels = list(request.labels)
        items = [
            self._item(i, s, labels[i % len(labels)] if labels else None, request.output)
            for i, s in enumerate(seeds)
        ]
        return genserve_pb2.SampleResponse(images=items, provenance=self._provenance(request.model, served))

    def SampleStream(
        self, request: genserve_pb2.SampleStreamRequest, context: grpc.ServicerContext
    ) -> Iterator[genserve_pb2.SampleStreamChunk]:
        context.add_callback(self.stream_ended.set)
        self._enter("SampleStream", context)
        s = request.sample
        self.stream_requests.append((s.version, request.start_index, s.count))
        served = self._serve(context, s.model, SAMPLE_KINDS, "SampleStream", "sample.model", s.version)
        if s.model == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model: 'bad' is rejected by the fake")
        size = request.chunk_size or 64
        labels = list(s.labels)
        break_after = self.stream_breaks_after_chunks.pop(0) if self.stream_breaks_after_chunks else None
        for n_chunk, start in enumerate(range(request.start_index, s.count, size)):
            if n_chunk == break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected stream break")
            items = [
                self._item(i, s.base_seed + i, labels[i % len(labels)] if labels else None, s.output)
                for i in range(start, min(start + size, s.count))
            ]
            yield genserve_pb2.SampleStreamChunk(images=items, provenance=self._provenance(s.model, served))

    def SampleCodesStream(
        self, request: genserve_pb2.SampleCodesRequest, context: grpc.ServicerContext
    ) -> Iterator[genserve_pb2.SampleCodesChunk]:
        """One progress chunk, then the answer: a 4x4 image per seed (the fake's "grid")."""
        context.add_callback(self.codes_stream_ended.set)
        self._enter("SampleCodesStream", context)
        served = self._serve(
            context, request.model, (Kind.CODE_PRIOR,), "SampleCodesStream", version=request.version
        )
        seeds = list(request.seeds) or [request.base_seed + i for i in range(request.count)]
        yield genserve_pb2.SampleCodesChunk(level="codes", filled=8, positions=16)
        while self.codes_stream_hangs and context.is_active():
            time.sleep(0.01)
        if self.codes_stream_breaks and self.codes_stream_breaks.pop(0):
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected stream break")
        items = [self._item(i, s, None, request.output) for i, s in enumerate(seeds)]
        result = genserve_pb2.SampleCodesResponse(
            images=items, seeds=seeds, provenance=self._provenance(request.model, served)
        )
        yield genserve_pb2.SampleCodesChunk(level="codes", filled=16, positions=16, result=result)

    def Translate(
        self, request: genserve_pb2.ImageRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ImageResponse:
        """The images back as they came: the fake's models ("...i2i": image_to_image) translate
        A -> B only, and it reads no `direction`, as a server older than that field."""
        self._enter("Translate", context)
        served = self._serve(context, request.model, TRANSLATE_KINDS, "Translate", version=request.version)
        return genserve_pb2.ImageResponse(
            images=request.images, provenance=self._provenance(request.model, served)
        )

    def GetModel(
        self, request: genserve_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ModelInfo:
        """As the server answers: the version asked for alone (of the versions _info lists), and
        NOT_FOUND naming the versions served for one it does not have, or the models served for a
        model it does not serve."""
        self._enter("GetModel", context)
        self.model_versions.append(request.version)
        if request.name not in self.models:
            served = ", ".join(sorted(self.models)) or "none"
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found; models: {served}")
        info = self._info(request.name)
        if request.version:
            asked = [v for v in info.versions if v.version == request.version]
            if not asked:
                served = ", ".join(v.version for v in info.versions) or "none"
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"model {request.name} has no version {request.version!r}; versions: {served}",
                )
            del info.versions[:]
            info.versions.extend(asked)
        return info

    def ListModels(
        self, request: genserve_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> genserve_pb2.ListModelsResponse:
        self._enter("ListModels", context)
        return genserve_pb2.ListModelsResponse(models=[self._info(name) for name in self.models])

    def _provenance(self, model: str, version: str) -> types_pb2.Provenance:
        """The provenance of a call of `model` that `version` served."""
        used = [
            types_pb2.UsedModel(
                model=m,
                version=v,
                model_sha256=h,
                weights_sha256=self.used_weights_sha256.get(m, ""),
                card_sha256=self.used_card_sha256.get(m, ""),
            )
            for m, v, h in self.used_models
        ]
        return types_pb2.Provenance(
            model=model,
            version=version,
            model_sha256=self.model_sha256,
            used_models=used,
            weights_sha256=self.weights_sha256,
            card_sha256=self.card_sha256,
        )

    def _info(self, name: str) -> genserve_pb2.ModelInfo:
        kind = _kind(name)
        cond = kind == Kind.CONDITIONAL_GENERATOR
        return genserve_pb2.ModelInfo(
            name=name,
            kind=kind,
            latent_dim=FAKE_LATENT,
            class_names=FAKE_CLASSES if cond else [],
            output_shape=[1, 4, 4],
            versions=[
                genserve_pb2.ModelVersionInfo(
                    version=self.version,
                    state=genserve_pb2.MODEL_STATE_READY,
                    model_sha256=self.model_sha256,
                    weights_sha256=self.weights_sha256,
                    card_sha256=self.card_sha256,
                )
            ],
        )


def _kind(name: str) -> Kind:
    """A fake model's kind, by its name's ending: "...cond" a conditional generator, "...i2i" an
    image-to-image model, "...prior" a code prior, any other a generator."""
    endings = {"cond": Kind.CONDITIONAL_GENERATOR, "i2i": Kind.IMAGE_TO_IMAGE, "prior": Kind.CODE_PRIOR}
    return next((kind for end, kind in endings.items() if name.endswith(end)), Kind.GENERATOR)


@dataclass
class FakeServer:
    service: FakeService
    target: str


def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `genserve-client` as a subprocess (as a user would), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "genserve_client", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `genserve-client ARGS`, argparse's own exits included."""
    from genserve_client.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
