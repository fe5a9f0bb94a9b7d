"""Fuzzing every RPC of a real server: random, truncated and mutated protobufs, hostile field values,
corrupt and bomb images, path-traversal model names, wrong tokens.

Every case must get a proper status (never UNKNOWN or INTERNAL, never DEADLINE_EXCEEDED: each call
has its own deadline), the server must stay up, healthy and serving, and its memory bounded.

GENSERVE_FUZZ_CASES sets the number of cases: 2000 by default, 10000+ in the nightly run.
Hypothesis runs derandomized with no example database, so every run sends the same cases.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from code_models import write_code_models
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reliability_support import health_status, jpeg_bytes, png_bomb, png_bytes, rss_bytes
from server_support import ServerProcess, build_tiny_repo, start_server
from style_models import write_style_models

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb

FUZZ_CASES = int(os.environ.get("GENSERVE_FUZZ_CASES", "2000"))
CALL_TIMEOUT_S = 10.0
# A leak grows with the cases sent; the bound is relative to the server's own footprint in this run
# (what the allocator keeps differs between machines).
RSS_GROWTH_FRACTION = 0.25
TOKEN = "fuzz-token"
GOOD_AUTH = (("authorization", f"Bearer {TOKEN}"),)
ACCEPTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNAVAILABLE,  # only for the broken models; checked below
}

G = "/genserve.v1.GenerationService/"
K = "/inference.GRPCInferenceService/"
# method -> (request type, server streaming)
METHODS: dict[str, tuple[type[Message], bool]] = {
    G + "Sample": (pb.SampleRequest, False),
    G + "SampleStream": (pb.SampleStreamRequest, True),
    G + "Interpolate": (pb.InterpolateRequest, False),
    G + "Encode": (pb.EncodeRequest, False),
    G + "Decode": (pb.DecodeRequest, False),
    G + "SuperResolve": (pb.ImageRequest, False),
    G + "Translate": (pb.ImageRequest, False),
    G + "SampleCodes": (pb.SampleCodesRequest, False),
    G + "SampleCodesStream": (pb.SampleCodesRequest, True),
    G + "MixStyles": (pb.MixStylesRequest, False),
    G + "ListModels": (pb.ListModelsRequest, False),
    G + "GetModel": (pb.GetModelRequest, False),
    K + "ServerLive": (kpb.ServerLiveRequest, False),
    K + "ServerReady": (kpb.ServerReadyRequest, False),
    K + "ModelReady": (kpb.ModelReadyRequest, False),
    K + "ServerMetadata": (kpb.ServerMetadataRequest, False),
    K + "ModelMetadata": (kpb.ModelMetadataRequest, False),
    K + "ModelInfer": (kpb.ModelInferRequest, False),
    K + "ModelConfig": (kpb.ModelConfigRequest, False),
    K + "ModelStatistics": (kpb.ModelStatisticsRequest, False),
    "/grpc.health.v1.Health/Check": (health_pb2.HealthCheckRequest, False),
}

MODELS = ["tiny-gen", "tiny-cond", "tiny-vae-dec", "tiny-vae-enc", "tiny-sr", "tiny-i2i", "tiny-broken"]
# write_code_models / write_style_models: priors (class-conditional, top, bottom given its top grid,
# chained) with their decoders; a style generator, its mapping, one whose mapping does not fit and
# one naming no mapping.
CODE_MODELS = ["prior", "top-prior", "bottom-prior", "chain-prior", "codes-decoder", "codes-decoder2"]
STYLE_MODELS = ["style-gen", "style-mapping", "style-misfit", "style-mapping-wide", "style-unmapped"]
ALL_MODELS = MODELS + CODE_MODELS + STYLE_MODELS
# Failed to load (tiny-broken, style-unmapped) or READY with every call failing (style-misfit): their
# calls are UNAVAILABLE, naming them; every other model is required to be ready.
BROKEN = ("tiny-broken", "style-unmapped", "style-misfit")
HOSTILE_NAMES = [
    "", "nope", "../../etc/passwd", "..", ".", "%2e%2e", "%2e%2e%2fetc%2fpasswd", "tiny-gen\x00",
    "\x00", "tiny-gen/../tiny-cond", "/etc/passwd", "TINY-GEN", "tiny-gen ", "x" * 5000, "é\u202e",
    "tiny-gen\\..\\..", "tiny-slow/1",
]  # fmt: skip
VERSIONS = [
    "",
    "1",
    "2",
    "0",
    "-1",
    "01",
    "../1",
    "%2e%2e",
    "1\x00",
    "9" * 30,
    " 1",
    "../../etc/passwd",
    "1/../1",
]

# --------------------------------------------------------------------------------------------- values


def model_names(models: list[str]) -> st.SearchStrategy[str]:
    """Mostly the models of the RPC's kinds, so the cases get past the lookup into the field checks;
    any model of the repository (a kind the RPC refuses), hostile names and random text too."""
    return st.one_of(
        st.sampled_from(models),
        st.sampled_from(ALL_MODELS),
        st.sampled_from(HOSTILE_NAMES),
        st.text(max_size=40),
    )


names = model_names(MODELS + ["style-gen"])
code_names = model_names(CODE_MODELS[:4])
style_names = model_names(["style-gen", "style-misfit"])
versions = st.one_of(
    st.sampled_from(["", "1"]), st.sampled_from(["", "1"]), st.sampled_from(VERSIONS), st.text(max_size=12)
)
u32 = st.one_of(st.integers(0, 16), st.sampled_from([0, 1, 255, 256, 257, 4096, 2**31, 2**32 - 1]))
i32 = st.one_of(st.integers(-3, 12), st.sampled_from([-(2**31), 2**31 - 1, 1000]))
i64 = st.one_of(
    st.integers(-3, 1000), st.sampled_from([-(2**63), 2**63 - 1, 2**63 - 2, -1, 2**62, 2**53 + 1])
)
small_u32 = st.one_of(st.integers(0, 4), u32)  # counts and crossovers: mostly in range
u64 = st.one_of(st.integers(0, 100), st.sampled_from([2**63, 2**64 - 1, 10**9]))
floats32 = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, 3.4e38, -1.0, 0.7, 10.0, 10.5]),
    st.floats(width=32, allow_nan=True, allow_infinity=True),
)
SPECIAL_F32 = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, 1.0, -2.5], np.float32)


@st.composite
def tensors(draw: st.DrawFn, dim: int | None = None) -> tpb.Tensor:
    """Latent-like tensors: sometimes right, mostly wrong in shape, size, dtype or values."""
    rows = draw(st.integers(0, 4))
    cols = dim if dim is not None and draw(st.booleans()) else draw(st.sampled_from([0, 1, 8, 15, 16, 17]))
    shape = draw(
        st.one_of(
            st.just([rows, cols]),
            st.lists(st.integers(-2, 20), max_size=4),
            st.sampled_from([[2**31, 16], [-1, 16], [2**62, 2**62], [1, 16, 1], [16]]),
        )
    )
    n = rows * cols
    kind = draw(st.sampled_from(["normal", "special", "short", "long", "random"]))
    if kind == "normal":
        data = np.random.default_rng(draw(st.integers(0, 9))).normal(size=n).astype("<f4").tobytes()
    elif kind == "special":
        data = np.resize(SPECIAL_F32, max(n, 1))[: max(n, 1)].tobytes()
    elif kind == "short":
        data = b"\x00" * max(0, 4 * n - draw(st.integers(1, 3)))
    elif kind == "long":
        data = b"\x00" * (4 * n + draw(st.integers(1, 9)))
    else:
        data = draw(st.binary(max_size=64))
    dtype = draw(st.sampled_from([tpb.DTYPE_UNSPECIFIED, tpb.DTYPE_FLOAT32, tpb.DTYPE_UINT8, 7, -1]))
    return tpb.Tensor(shape=shape, dtype=dtype, data=data)


@st.composite
def code_grids(draw: st.DrawFn) -> tpb.Tensor:
    """Top grids for a bottom prior (DTYPE_INT64 [N, 3, 3] or [3, 3], codes in [0, 16)), and
    grids of other shapes, dtypes and lengths, codes out of range."""
    n = draw(st.sampled_from([1, 2, 3]))
    shape = draw(
        st.one_of(
            st.sampled_from([[n, 3, 3], [3, 3], [n, 6, 6], [n, 3], [0, 3, 3], [n, 3, 3, 1]]),
            st.lists(st.integers(-2, 20), max_size=4),
            st.sampled_from([[2**31, 3, 3], [-1, 3, 3], [2**62, 2**62, 2]]),
        )
    )
    count = min(math.prod(d for d in shape if 0 < d <= 64), 1024) if shape else 0
    codes = draw(st.sampled_from(["good", "out of range", "short", "random"]))
    if codes == "good":
        data = np.random.default_rng(draw(st.integers(0, 9))).integers(0, 16, count).astype("<i8").tobytes()
    elif codes == "out of range":
        data = np.resize(np.array([16, -1, 2**62, -(2**63)], "<i8"), max(count, 1)).tobytes()
    elif codes == "short":
        data = b"\x00" * max(0, 8 * count - draw(st.integers(1, 7)))
    else:
        data = draw(st.binary(max_size=64))
    dtype = draw(st.sampled_from([tpb.DTYPE_INT64, tpb.DTYPE_INT64, tpb.DTYPE_FLOAT32, 0, 7]))
    return tpb.Tensor(shape=shape, dtype=dtype, data=data)


def _images_pool() -> list[tuple[int, bytes, list[int]]]:
    png = png_bytes(8, 8, 1)
    png_rgb = png_bytes(16, 16, 3)
    jpg = jpeg_bytes(16, 16)
    raw = np.zeros((8, 8, 1), np.uint8).tobytes()
    f32 = np.zeros((3, 16, 16), "<f4").tobytes()
    nan32 = np.full((3, 8, 8), np.nan, "<f4").tobytes()
    corrupt_png = bytearray(png_rgb)
    corrupt_png[40:60] = b"\xff" * 20
    fake_ihdr = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 0, 7) + b"\x08\x02\0\0\0"
    )
    return [
        (tpb.IMAGE_FORMAT_PNG, png, []),
        (tpb.IMAGE_FORMAT_UNSPECIFIED, png_rgb, []),
        (tpb.IMAGE_FORMAT_JPEG, jpg, []),
        (tpb.IMAGE_FORMAT_PNG, jpg, []),  # format says PNG, bytes are JPEG
        (tpb.IMAGE_FORMAT_PNG, bytes(corrupt_png), []),
        (tpb.IMAGE_FORMAT_PNG, png_rgb[: len(png_rgb) // 2], []),  # truncated
        (tpb.IMAGE_FORMAT_JPEG, jpg[: len(jpg) // 2], []),
        (tpb.IMAGE_FORMAT_JPEG, jpg[:4], []),
        (tpb.IMAGE_FORMAT_PNG, png_bomb(), []),  # 50k x 50k declared in ~100 bytes
        (tpb.IMAGE_FORMAT_PNG, png_bomb(1, 2**31 - 1), []),
        (tpb.IMAGE_FORMAT_PNG, fake_ihdr, []),
        (tpb.IMAGE_FORMAT_WEBP, b"RIFF\x00\x00\x00\x00WEBPVP8 ", []),
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [8, 8, 1]),
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [8, 8, 5]),  # wrong channel count
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [8, 8, 3]),  # too few bytes
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [50000, 50000, 3]),
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [-8, -8, 1]),
        (tpb.IMAGE_FORMAT_RAW_UINT8, raw, [2**62, 2**62, 2]),
        (tpb.IMAGE_FORMAT_TENSOR_F32, f32, [3, 16, 16]),
        (tpb.IMAGE_FORMAT_TENSOR_F32, nan32, [3, 8, 8]),
        (tpb.IMAGE_FORMAT_TENSOR_F32, f32, [16, 16, 3, 1]),
        (tpb.IMAGE_FORMAT_TENSOR_F32, f32, [2, 16, 16]),
        (99, png, []),
        (tpb.IMAGE_FORMAT_UNSPECIFIED, b"", []),
        (tpb.IMAGE_FORMAT_UNSPECIFIED, b"GIF89a\x01\x00\x01\x00", []),
    ]


IMAGES = _images_pool()


@st.composite
def images(draw: st.DrawFn) -> tpb.Image:
    if draw(st.integers(0, 9)) == 0:
        return tpb.Image(format=draw(st.integers(0, 6)), data=draw(st.binary(max_size=80)),
                         shape=draw(st.lists(st.integers(-5, 70000), max_size=4)))  # fmt: skip
    fmt, data, shape = draw(st.sampled_from(IMAGES))
    return tpb.Image(format=fmt, data=data, shape=shape)


@st.composite
def outputs(draw: st.DrawFn) -> tpb.OutputOptions:
    options = tpb.OutputOptions(format=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99])), quality=draw(u32))
    if draw(st.booleans()):
        options.png_compression = draw(u32)
    options.return_latents = draw(st.booleans())
    return options


@st.composite
def sample_requests(draw: st.DrawFn) -> pb.SampleRequest:
    r = pb.SampleRequest(model=draw(names), version=draw(versions), count=draw(u32))
    if draw(st.booleans()):
        r.seeds.extend(draw(st.lists(i64, max_size=5)))
    if draw(st.booleans()):
        r.base_seed = draw(i64)
    if draw(st.integers(0, 3)) == 0:
        r.latents.CopyFrom(draw(tensors(16)))
    r.labels.extend(draw(st.lists(i32, max_size=4)))
    if draw(st.booleans()):
        r.truncation_psi = draw(floats32)
    if draw(st.booleans()):
        r.output.CopyFrom(draw(outputs()))
    r.priority = draw(st.sampled_from([0, 1, 2, 3, -1]))
    return r


@st.composite
def points(draw: st.DrawFn) -> pb.LatentPoint:
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return pb.LatentPoint(seed=draw(i64))
    if choice == 1:
        return pb.LatentPoint(latent=draw(tensors(16)))
    return pb.LatentPoint()


@st.composite
def interpolate_requests(draw: st.DrawFn) -> pb.InterpolateRequest:
    r = pb.InterpolateRequest(
        model=draw(names), version=draw(versions), start=draw(points()), end=draw(points())
    )
    r.steps, r.mode = draw(u32), draw(st.sampled_from([0, 1, 2, 5]))
    r.labels.extend(draw(st.lists(i32, max_size=3)))
    if draw(st.booleans()):
        r.truncation_psi = draw(floats32)
    return r


@st.composite
def image_requests(draw: st.DrawFn) -> pb.ImageRequest:
    r = pb.ImageRequest(model=draw(names), version=draw(versions), tile_size=draw(u32))
    r.images.extend(draw(st.lists(images(), max_size=3)))
    if draw(st.booleans()):
        r.tile_overlap = draw(u32)
    if draw(st.booleans()):
        r.output.CopyFrom(draw(outputs()))
    return r


@st.composite
def encode_requests(draw: st.DrawFn) -> pb.EncodeRequest:
    sample = draw(st.booleans())
    # A seed without sample is refused up front (667d5eb): mostly send one only with sample, so
    # that the images behind it are still reached either way.
    seed = draw(i64) if sample or not draw(st.integers(0, 3)) else 0
    r = pb.EncodeRequest(model=draw(names), version=draw(versions), sample=sample, seed=seed)
    r.images.extend(draw(st.lists(images(), max_size=3)))
    return r


@st.composite
def decode_requests(draw: st.DrawFn) -> pb.DecodeRequest:
    r = pb.DecodeRequest(model=draw(names), version=draw(versions))
    if draw(st.integers(0, 4)):
        r.latents.CopyFrom(draw(tensors(8)))
    return r


@st.composite
def code_requests(draw: st.DrawFn) -> pb.SampleCodesRequest:
    # Output options and preview_every (SampleCodes refuses it) one time in four, so that most cases
    # reach the prior's own fields.
    r = pb.SampleCodesRequest(model=draw(code_names), version=draw(versions), count=draw(small_u32))
    if draw(st.booleans()):
        r.seeds.extend(draw(st.lists(i64, max_size=5)))
    if draw(st.booleans()):
        r.base_seed = draw(i64)
    if draw(st.booleans()):
        r.labels.extend(draw(st.lists(i32, max_size=4)))
    if draw(st.booleans()):
        r.temperature = draw(floats32)
    if draw(st.booleans()):
        r.top_k = draw(u32)
    if draw(st.booleans()):
        r.top_codes.CopyFrom(draw(code_grids()))
    if draw(st.integers(0, 3)) == 0:
        r.output.CopyFrom(draw(outputs()))
    r.return_codes = draw(st.booleans())
    if draw(st.integers(0, 3)) == 0:
        r.preview_every = draw(u32)
    return r


@st.composite
def mix_requests(draw: st.DrawFn) -> pb.MixStylesRequest:
    r = pb.MixStylesRequest(model=draw(style_names), version=draw(versions), crossover=draw(small_u32))
    for _ in range(draw(st.integers(0, 4))):
        mix = r.mixes.add(coarse_seed=draw(i64), fine_seed=draw(i64))
        if draw(st.booleans()):
            mix.crossover = draw(small_u32)
        if draw(st.booleans()):
            mix.truncation_psi = draw(floats32)
    if draw(st.booleans()):
        r.truncation_psi = draw(floats32)
    if draw(st.integers(0, 3)) == 0:
        r.output.CopyFrom(draw(outputs()))
    r.priority = draw(st.sampled_from([0, 1, 2, 3, -1]))
    return r


@st.composite
def stream_requests(draw: st.DrawFn) -> pb.SampleStreamRequest:
    return pb.SampleStreamRequest(sample=draw(sample_requests()), start_index=draw(u64), chunk_size=draw(u32))


@st.composite
def infer_requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    r = kpb.ModelInferRequest(
        model_name=draw(names), model_version=draw(versions), id=draw(st.text(max_size=8))
    )
    for _ in range(draw(st.integers(0, 3))):
        t = r.inputs.add(
            name=draw(st.sampled_from(["z", "label", "image", "", "../x"])),
            datatype=draw(st.sampled_from(["FP32", "INT64", "UINT8", "BYTES", "FP16", "", "??"])),
            shape=draw(st.lists(st.integers(-2, 40), max_size=5)),
        )
        if draw(st.booleans()):
            t.contents.fp32_contents.extend(draw(st.lists(floats32, max_size=40)))
        if draw(st.booleans()):
            t.contents.int64_contents.extend(draw(st.lists(i64, max_size=8)))
    for _ in range(draw(st.integers(0, 3))):
        r.raw_input_contents.append(draw(st.binary(max_size=2048)))
    for _ in range(draw(st.integers(0, 2))):
        r.outputs.add(name=draw(st.sampled_from(["image", "mu", "nope", ""])))
    for key in draw(st.lists(st.sampled_from(["seed", "seeds", "truncation_psi", "label", "x"]), max_size=2)):
        param = r.parameters[key]
        which = draw(st.integers(0, 3))
        if which == 0:
            param.int64_param = draw(i64)
        elif which == 1:
            param.double_param = draw(st.floats(allow_nan=True))
        elif which == 2:
            param.string_param = draw(st.text(max_size=5))
        else:
            param.bool_param = True
    return r


def name_requests(kind: type[Message]) -> st.SearchStrategy[Message]:
    fields = {f.name for f in kind.DESCRIPTOR.fields}
    if "model_name" in fields:  # kserve ModelReady/Metadata/Config/Statistics use name+version
        return st.builds(lambda n, v: kind(model_name=n), names, versions)
    if "name" in fields and "version" in fields:
        return st.builds(lambda n, v: kind(name=n, version=v), names, versions)
    if "service" in fields:
        return st.builds(lambda n: kind(service=n), names)
    return st.just(kind())


STRUCTURED: dict[str, st.SearchStrategy[Message]] = {
    G + "Sample": sample_requests(),
    G + "SampleStream": stream_requests(),
    G + "Interpolate": interpolate_requests(),
    G + "Encode": encode_requests(),
    G + "Decode": decode_requests(),
    G + "SuperResolve": image_requests(),
    G + "Translate": image_requests(),
    G + "SampleCodes": code_requests(),
    G + "SampleCodesStream": code_requests(),
    G + "MixStyles": mix_requests(),
    K + "ModelInfer": infer_requests(),
}
for _method, (_kind, _) in METHODS.items():
    STRUCTURED.setdefault(_method, name_requests(_kind))


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, bytes, tuple[tuple[str, str], ...]]:
    method = draw(st.sampled_from(sorted(METHODS)))
    how = draw(st.sampled_from(["structured"] * 6 + ["raw", "truncated", "mutated", "appended"]))
    if how == "raw":
        body = draw(st.binary(max_size=300))
    else:
        body = draw(STRUCTURED[method]).SerializeToString()
        if how == "truncated" and body:
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif how == "mutated" and body:
            data = bytearray(body)
            for _ in range(draw(st.integers(1, 4))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            body = bytes(data)
        elif how == "appended":
            body += draw(st.binary(min_size=1, max_size=40))
    auth = draw(
        st.sampled_from(
            [GOOD_AUTH] * 8
            + [(), (("authorization", "Bearer nope"),), (("authorization", f"Basic {TOKEN}"),)]
        )
    )
    return method, body, auth


# --------------------------------------------------------------------------------------------- harness


@dataclass
class FuzzStats:
    sent: int = 0
    codes: collections.Counter[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.codes = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny repository with code priors and style generators beside it (every kind an RPC serves)."""
    root = build_tiny_repo(tmp_path_factory.mktemp("fuzz-models"))
    assert sorted(write_code_models(root).values()) == sorted(CODE_MODELS)
    assert sorted(write_style_models(root).values()) == sorted(STYLE_MODELS)
    required = ",".join(sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in BROKEN))
    work = tmp_path_factory.mktemp("fuzz-server")
    (work / "tokens").write_text(TOKEN + "\n")
    server = start_server(
        root, work, extra_args=("--token-file", str(work / "tokens"), "--require-models", required)
    )
    yield server
    server.stop()


def _identity(data: bytes) -> bytes:
    return data


def call_raw(
    channel: grpc.Channel, method: str, body: bytes, auth: tuple[tuple[str, str], ...]
) -> tuple[grpc.StatusCode, str]:
    """Send raw bytes as `method`'s request; reads at most 2 messages of a stream, then cancels."""
    streaming = METHODS[method][1]
    try:
        if not streaming:
            unary: Callable[..., Any] = channel.unary_unary(
                method, request_serializer=_identity, response_deserializer=_identity
            )
            unary(body, timeout=CALL_TIMEOUT_S, metadata=auth)
            return grpc.StatusCode.OK, ""
        stream = channel.unary_stream(method, request_serializer=_identity, response_deserializer=_identity)
        responses = stream(body, timeout=CALL_TIMEOUT_S, metadata=auth)
        for i, _ in enumerate(responses):
            if i >= 1:
                responses.cancel()
                break
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and streaming:
            return grpc.StatusCode.OK, "cancelled by the client after 2 chunks"
        return exc.code(), exc.details() or ""


def _serving_sample(channel: grpc.Channel) -> None:
    unary = channel.unary_unary(G + "Sample", request_serializer=_identity, response_deserializer=_identity)
    body = unary(pb.SampleRequest(model="tiny-gen", count=4, base_seed=7).SerializeToString(),
                 timeout=CALL_TIMEOUT_S, metadata=GOOD_AUTH)  # fmt: skip
    assert len(pb.SampleResponse.FromString(body).images) == 4


def test_fuzz_every_rpc_gets_a_proper_status(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    stats = FuzzStats()
    with grpc.insecure_channel(
        fuzz_server.target, options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        for _ in range(20):  # warm every code path once before the memory baseline
            _serving_sample(channel)
        rss_before = rss_bytes(fuzz_server.proc.pid)
        started = time.monotonic()

        @settings(
            max_examples=FUZZ_CASES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(cases())
        def one_case(case: tuple[str, bytes, tuple[tuple[str, str], ...]]) -> None:
            method, body, auth = case
            code, details = call_raw(channel, method, body, auth)
            stats.sent += 1
            stats.codes[code.name] += 1
            assert code in ACCEPTED, (method, body[:200], code, details)
            if code == grpc.StatusCode.UNAVAILABLE:  # a broken model, never the transport
                assert any(name in details for name in BROKEN), (method, code, details)
            assert fuzz_server.proc.poll() is None, f"server died on {method} {body[:200]!r}"

        one_case()
        elapsed_s = time.monotonic() - started
        assert fuzz_server.proc.poll() is None, fuzz_server.log()[-3000:]
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        _serving_sample(channel)
        rss_after = rss_bytes(fuzz_server.proc.pid)
    report = {
        "cases": stats.sent,
        "requested": FUZZ_CASES,
        "elapsed_s": round(elapsed_s, 1),
        "codes": dict(stats.codes.most_common()),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }
    report_dir = os.environ.get("GENSERVE_REPORT_DIR")
    (Path(report_dir) if report_dir else tmp_path).joinpath("fuzz.json").write_text(json.dumps(report))
    assert stats.sent >= FUZZ_CASES, report
    assert rss_after - rss_before < RSS_GROWTH_FRACTION * rss_before, report
    assert stats.codes["OK"] > 0 and stats.codes["INVALID_ARGUMENT"] > 0, report
    assert "failed with an unexpected error" not in fuzz_server.log()  # no INTERNAL behind a proper status
