"""Integration tests: a real genserve server subprocess on 127.0.0.1 over the tiny repository."""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from server_support import (
    F32,
    FORMATS,
    TINY_LATENT,
    ServerProcess,
    build_tiny_repo,
    concurrent_samples,
    pixels_of,
    running_server,
    sample_calls,
    slow_generator_graph,
    tensor_of,
    wait_until,
    write_model,
)

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import codecs
from genserve_server.latents import RNG_ALGORITHM, interpolate, latents_for_seeds, min_truncation_psi


@pytest.fixture(scope="module")
def channel(tiny_server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(tiny_server.target, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationServiceStub:
    return pb_grpc.GenerationServiceStub(channel)


def local_session(repo: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def latent_tensor(z: np.ndarray) -> tpb.Tensor:
    return tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4").tobytes())


def code_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code()


def details_of(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return str(err.details())


# ----------------------------------------------------------------------------- Sample


@pytest.mark.parametrize("model", ["tiny-gen", "tiny-cond", "tiny-vae-dec"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_every_generator_kind_and_format(
    stub: pb_grpc.GenerationServiceStub, model: str, fmt: int
) -> None:
    labels = [3] if model == "tiny-cond" else []
    response = stub.Sample(
        pb.SampleRequest(model=model, seeds=[11, 12], labels=labels, output=tpb.OutputOptions(format=fmt))
    )
    assert len(response.images) == 2
    channels = 3 if model == "tiny-gen" else 1
    for i, generated in enumerate(response.images):
        assert generated.seed == 11 + i and generated.index == i
        assert generated.image.format == fmt
        if fmt == tpb.IMAGE_FORMAT_TENSOR_F32:
            assert tensor_of(generated.image).shape == (channels, 8, 8)
        else:
            assert pixels_of(generated.image).shape[:2] == (8, 8)
            assert list(generated.image.shape)[:2] == [8, 8]
    p = response.provenance
    assert (p.model, p.version, p.precision) == (model, "1", "fp32")
    assert p.execution_provider == "CPUExecutionProvider" and len(p.model_sha256) == 64
    assert p.rng_algorithm == RNG_ALGORITHM and p.onnxruntime_version == ort.__version__
    assert sum(p.executed_batch_sizes) >= 2


def test_sample_matches_local_onnxruntime_on_host_latents(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path
) -> None:
    response = stub.Sample(
        pb.SampleRequest(model="tiny-cond", seeds=[5, 6, 7], labels=[1, 2, 3], truncation_psi=0.7, output=F32)
    )
    z = latents_for_seeds([5, 6, 7], TINY_LATENT, 0.7)
    (expected,) = local_session(tiny_repo, "tiny-cond").run(None, {"z": z, "label": np.array([1, 2, 3])})
    got = np.stack([tensor_of(g.image) for g in response.images])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [g.label for g in response.images] == [1, 2, 3]


def test_sample_returns_latents_and_explicit_latents_reproduce(stub: pb_grpc.GenerationServiceStub) -> None:
    options = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True)
    by_seed = stub.Sample(pb.SampleRequest(model="tiny-gen", count=3, base_seed=40, output=options))
    assert [g.seed for g in by_seed.images] == [40, 41, 42]
    z = np.stack([np.frombuffer(g.latent.data, "<f4") for g in by_seed.images])
    np.testing.assert_array_equal(z, latents_for_seeds([40, 41, 42], TINY_LATENT, None))
    by_latent = stub.Sample(pb.SampleRequest(model="tiny-gen", latents=latent_tensor(z), output=F32))
    for a, b in zip(by_seed.images, by_latent.images, strict=True):
        assert a.image.data == b.image.data
        assert not b.HasField("seed")


def test_strong_truncation_latents_are_drawn_off_the_loop_and_match_the_reference(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # psi below 0.01 is drawn per request on the codec pool (not batched); same latents either way.
    psi = 1.01 * min_truncation_psi(TINY_LATENT)
    options = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True)
    request = pb.SampleRequest(model="tiny-gen", seeds=[7, 8], truncation_psi=psi, output=options)
    response = stub.Sample(request)
    z = np.stack([np.frombuffer(g.latent.data, "<f4") for g in response.images])
    np.testing.assert_array_equal(z, latents_for_seeds([7, 8], TINY_LATENT, psi))
    assert np.abs(z).max() <= psi
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, truncation_psi=psi / 2))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncation_psi" in details_of(excinfo) and "use psi >=" in details_of(excinfo)


def test_sample_without_seed_picks_and_returns_seeds(stub: pb_grpc.GenerationServiceStub) -> None:
    response = stub.Sample(pb.SampleRequest(model="tiny-gen", count=2))
    seeds = [g.seed for g in response.images]
    assert seeds[1] == seeds[0] + 1 and 0 <= seeds[0] < 2**63


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SampleRequest(model="tiny-gen", count=0), "count"),
        (pb.SampleRequest(model="tiny-gen", count=257), "count: must be in 1..256"),
        (pb.SampleRequest(model="tiny-cond", count=1, labels=[12]), "labels[0]: must be in [0, 10), got 12"),
        (pb.SampleRequest(model="tiny-cond", count=1, labels=[-1]), "labels[0]"),
        (pb.SampleRequest(model="tiny-cond", count=1, labels=[10]), "labels[0]: must be in [0, 10), got 10"),
        (
            pb.SampleRequest(model="tiny-cond", count=2, labels=[1, 10]),
            "labels[1]: must be in [0, 10), got 10",
        ),
        (pb.SampleRequest(model="tiny-cond", count=1), "labels: required"),
        (pb.SampleRequest(model="tiny-cond", count=3, labels=[1, 2]), "labels: must have 1 or 3"),
        (
            pb.SampleRequest(model="tiny-cond", count=1, labels=[1, 2]),
            "labels: must have 1 value (one image), got 2",
        ),
        (pb.SampleRequest(model="tiny-gen", count=1, labels=[1]), "labels: only conditional"),
        (pb.SampleRequest(model="tiny-gen", count=1, truncation_psi=0), "truncation_psi"),
        (pb.SampleRequest(model="tiny-gen", count=1, truncation_psi=11), "truncation_psi"),
        (pb.SampleRequest(model="tiny-gen", seeds=[-1]), "seeds"),
        (pb.SampleRequest(model="tiny-gen", seeds=[1, -1]), "seeds[1]: must be in [0, 2^63), got -1"),
        (pb.SampleRequest(model="tiny-gen", seeds=[1, 2], count=3), "count: must be 0 or 2"),
        (pb.SampleRequest(model="tiny-gen", count=2, base_seed=2**63 - 1), "base_seed"),
        (
            pb.SampleRequest(model="tiny-gen", latents=latent_tensor(np.zeros((1, 5), np.float32))),
            "latents.shape: must be [N, 16]",
        ),
        (
            pb.SampleRequest(model="tiny-gen", latents=tpb.Tensor(shape=[-2, 16], dtype=tpb.DTYPE_FLOAT32)),
            "latents.shape: dimensions must be >= 0, got [-2, 16]",
        ),
        (
            pb.SampleRequest(model="tiny-gen", latents=latent_tensor(np.full((1, 16), np.inf, np.float32))),
            "latents: values must be finite",
        ),
        (
            pb.SampleRequest(model="tiny-gen", latents=latent_tensor(np.full((1, 16), 2e4, np.float32))),
            "|z| <= 10000",
        ),
        (
            pb.SampleRequest(
                model="tiny-gen", seeds=[1], latents=latent_tensor(np.zeros((1, 16), np.float32))
            ),
            "seeds: cannot be combined",
        ),
        (
            pb.SampleRequest(model="tiny-gen", seeds=[1], base_seed=5),
            "base_seed: cannot be combined with seeds",
        ),
        (
            pb.SampleRequest(model="tiny-gen", count=1, output=tpb.OutputOptions(quality=101)),
            "output.quality",
        ),
        (
            pb.SampleRequest(model="tiny-gen", count=1, output=tpb.OutputOptions(png_compression=10)),
            "output.png_compression",
        ),
        (pb.SampleRequest(model="tiny-sr", count=1), "model: tiny-sr is a super_resolution model"),
        (pb.SampleRequest(count=1), "model: required"),
    ],
)
def test_sample_invalid_arguments_name_the_field(
    stub: pb_grpc.GenerationServiceStub, request_: pb.SampleRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(request_)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details_of(excinfo)


@pytest.mark.parametrize(
    ("request_", "seeds"),
    [
        # base_seed .. base_seed + count - 1 all below 2^63 (genserve.proto): the last base that fits.
        (pb.SampleRequest(model="tiny-gen", count=2, base_seed=2**63 - 2), [2**63 - 2, 2**63 - 1]),
        (pb.SampleRequest(model="tiny-gen", seeds=[2**63 - 1]), [2**63 - 1]),
        (pb.SampleRequest(model="tiny-gen", seeds=[1], truncation_psi=10), [1]),
        (pb.SampleRequest(model="tiny-cond", seeds=[1], labels=[9]), [1]),
        (pb.SampleRequest(model="tiny-cond", seeds=[1, 2], labels=[0, 9]), [1, 2]),
        (pb.SampleRequest(model="tiny-gen", seeds=[1], output=tpb.OutputOptions(png_compression=9)), [1]),
        (
            pb.SampleRequest(
                model="tiny-gen",
                seeds=[1],
                output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=100),
            ),
            [1],
        ),
        (
            pb.SampleRequest(
                model="tiny-gen",
                latents=latent_tensor(np.array([[1e4, -1e4] * (TINY_LATENT // 2)], np.float32)),
            ),
            [],
        ),
    ],
)
def test_a_value_at_its_documented_limit_is_accepted(
    stub: pb_grpc.GenerationServiceStub, request_: pb.SampleRequest, seeds: list[int]
) -> None:
    """Each limit is inclusive where the protos say so: seeds below 2^63 (the last base of a count),
    truncation_psi in (0, 10], labels in [0, classes), output.png_compression 0..9, quality 1..100,
    latents |z| <= 1e4. A value at the limit is served; one past it is refused (above)."""
    response = stub.Sample(request_)
    assert [image.seed for image in response.images if image.HasField("seed")] == seeds
    assert len(response.images) == max(1, len(seeds))


@pytest.mark.parametrize(
    "output",
    [
        tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=10),
        tpb.OutputOptions(format=tpb.IMAGE_FORMAT_JPEG, quality=95),
        tpb.OutputOptions(format=tpb.IMAGE_FORMAT_WEBP, quality=10),
        tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG, png_compression=0),
        tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG, png_compression=9),
    ],
    ids=["jpeg-q10", "jpeg-q95", "webp-q10", "png-0", "png-9"],
)
def test_the_quality_and_png_compression_asked_for_are_the_ones_encoded(
    stub: pb_grpc.GenerationServiceStub, output: tpb.OutputOptions
) -> None:
    """OutputOptions.quality and png_compression (types.proto) reach the encoder: the image is the
    model's pixels (its RAW_UINT8) encoded at the level asked for, byte for byte."""
    raw_output = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8)
    raw = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[5], output=raw_output)).images[0]
    expected, _ = codecs.encode_image(
        pixels_of(raw.image),
        output.format,
        quality=output.quality or codecs.DEFAULT_QUALITY,
        png_compression=output.png_compression,
    )
    got = stub.Sample(pb.SampleRequest(model="tiny-gen", seeds=[5], output=output)).images[0]
    assert got.image.data == expected


@pytest.mark.parametrize(
    "fmt",
    [
        tpb.IMAGE_FORMAT_UNSPECIFIED,
        tpb.IMAGE_FORMAT_PNG,
        tpb.IMAGE_FORMAT_RAW_UINT8,
        tpb.IMAGE_FORMAT_TENSOR_F32,
    ],
)
def test_quality_with_a_format_that_has_none_is_refused_naming_it(
    stub: pb_grpc.GenerationServiceStub, fmt: tpb.ImageFormat.ValueType
) -> None:
    """`OutputOptions(format=PNG, quality=50)` (wanting smaller files) got full PNGs: quality is
    JPEG's and WEBP's (types.proto), and the server ignored it elsewhere, silently. Like
    return_latents where there are none, it is refused naming the field; 0 (unset) still works."""
    output = tpb.OutputOptions(format=fmt, quality=50)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, output=output))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("output.quality: applies to JPEG and WEBP only"), details_of(
        excinfo
    )
    stream = pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=2, output=output))
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.SampleStream(stream))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("sample.output.quality: "), details_of(excinfo)
    assert stub.Sample(
        pb.SampleRequest(model="tiny-gen", count=1, output=tpb.OutputOptions(format=fmt))
    ).images
    for lossy in (tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_WEBP):
        options = tpb.OutputOptions(format=lossy, quality=50)
        assert stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, output=options)).images


@pytest.mark.parametrize(
    "fmt",
    [tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_WEBP, tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_TENSOR_F32],
)
def test_png_compression_with_another_format_is_refused_naming_it(
    stub: pb_grpc.GenerationServiceStub, fmt: tpb.ImageFormat.ValueType
) -> None:
    """png_compression is PNG's (types.proto): set with JPEG, WEBP or a raw format it changed
    nothing, silently, as quality did with PNG. Refused naming the field; unset still works."""
    output = tpb.OutputOptions(format=fmt, png_compression=9)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, output=output))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("output.png_compression: applies to PNG only"), details_of(excinfo)
    assert stub.Sample(
        pb.SampleRequest(model="tiny-gen", count=1, output=tpb.OutputOptions(format=fmt))
    ).images
    for png in (tpb.IMAGE_FORMAT_PNG, tpb.IMAGE_FORMAT_UNSPECIFIED):
        options = tpb.OutputOptions(format=png, png_compression=9)
        assert stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, output=options)).images


def test_unknown_model_lists_the_models(stub: pb_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="nope", count=1))
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert "tiny-gen" in details_of(excinfo) and "tiny-cond" in details_of(excinfo)


def test_broken_model_is_unavailable_while_others_serve(stub: pb_grpc.GenerationServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-broken", count=1))
    assert code_of(excinfo) == grpc.StatusCode.UNAVAILABLE
    assert "sha256 mismatch" in details_of(excinfo)
    assert stub.Sample(pb.SampleRequest(model="tiny-gen", count=1)).images


def test_request_id_round_trips_in_trailing_metadata(stub: pb_grpc.GenerationServiceStub) -> None:
    _, call = stub.Sample.with_call(
        pb.SampleRequest(model="tiny-gen", count=1), metadata=(("x-request-id", "abc-123"),)
    )
    assert ("x-request-id", "abc-123") in [(m.key, m.value) for m in call.trailing_metadata()]
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", count=0), metadata=(("x-request-id", "bad-1"),))
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert ("x-request-id", "bad-1") in [(m.key, m.value) for m in err.trailing_metadata()]
    _, call = stub.Sample.with_call(pb.SampleRequest(model="tiny-gen", count=1))
    assert len(dict((m.key, m.value) for m in call.trailing_metadata())["x-request-id"]) >= 16


# ----------------------------------------------------------------------------- SampleStream


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_stream_in_order_resumable_labels_cycled(
    stub: pb_grpc.GenerationServiceStub, fmt: int
) -> None:
    sample = pb.SampleRequest(
        model="tiny-cond", count=10, base_seed=100, labels=[1, 2, 3], output=tpb.OutputOptions(format=fmt)
    )
    chunks = list(stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=4)))
    assert [len(c.images) for c in chunks] == [4, 4, 2]
    images = [g for c in chunks for g in c.images]
    assert [g.index for g in images] == list(range(10))
    assert [g.seed for g in images] == list(range(100, 110))
    assert [g.label for g in images] == [[1, 2, 3][i % 3] for i in range(10)]
    resumed = [
        g
        for c in stub.SampleStream(pb.SampleStreamRequest(sample=sample, start_index=7, chunk_size=4))
        for g in c.images
    ]
    assert [g.index for g in resumed] == [7, 8, 9]
    if fmt in (tpb.IMAGE_FORMAT_TENSOR_F32, tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_PNG):
        assert [g.image.data for g in resumed] == [g.image.data for g in images[7:]]


def test_sample_stream_equals_sample(stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess) -> None:
    def waits(lane: str) -> float:
        return tiny_server.metric("genserve_queue_duration_seconds_count", model="tiny-gen", lane=lane)

    before = {lane: waits(lane) for lane in ("bulk", "interactive")}
    sample = pb.SampleRequest(model="tiny-gen", count=5, base_seed=9, output=F32)
    streamed = [
        g.image.data for c in stub.SampleStream(pb.SampleStreamRequest(sample=sample)) for g in c.images
    ]
    assert waits("bulk") > before["bulk"]  # a stream's rows wait in the bulk lane
    assert waits("interactive") == before["interactive"]
    direct = [g.image.data for g in stub.Sample(sample).images]
    assert streamed == direct
    assert waits("interactive") > before["interactive"]


def test_a_sample_stream_with_a_label_out_of_range_is_refused_before_any_chunk(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """The label cycle is checked whole up front, as Sample checks its labels: a stream whose
    second label is out of range sends no chunk (its first chunk's label is valid)."""
    sample = pb.SampleRequest(model="tiny-cond", count=4, base_seed=1, labels=[1, 10])
    received: list[pb.SampleStreamChunk] = []
    with pytest.raises(grpc.RpcError) as excinfo:
        received.extend(stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=1)))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo) == "sample.labels[1]: must be in [0, 10), got 10"
    assert received == []


def test_sample_stream_rejects_seeds_and_bad_start(stub: pb_grpc.GenerationServiceStub) -> None:
    bad = [
        (pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", seeds=[1])), "sample.seeds"),
        (
            pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=3), start_index=4),
            "start_index",
        ),
        (
            pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=3), chunk_size=300),
            "chunk_size",
        ),
    ]
    for request, field in bad:
        with pytest.raises(grpc.RpcError) as excinfo:
            list(stub.SampleStream(request))
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert field in details_of(excinfo)
    # start_index == count: a stream resumed after its last image has nothing left to send, an
    # empty stream that ends OK (genserve.proto: 0 <= start_index <= count).
    done = pb.SampleStreamRequest(sample=pb.SampleRequest(model="tiny-gen", count=3), start_index=3)
    assert list(stub.SampleStream(done)) == []


# ----------------------------------------------------------------------------- Interpolate / Decode / Encode


@pytest.mark.parametrize("model", ["tiny-gen", "tiny-cond", "tiny-vae-dec"])
@pytest.mark.parametrize("mode", [pb.INTERPOLATION_MODE_LERP, pb.INTERPOLATION_MODE_SLERP])
def test_interpolate_between_seeds_ends_match_sample(
    stub: pb_grpc.GenerationServiceStub, model: str, mode: int
) -> None:
    labels = [2] if model == "tiny-cond" else []
    options = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True)
    path = stub.Interpolate(
        pb.InterpolateRequest(
            model=model,
            start=pb.LatentPoint(seed=1),
            end=pb.LatentPoint(seed=2),
            steps=5,
            mode=mode,
            labels=labels,
            output=options,
        )
    )
    assert len(path.images) == 5
    dim = 8 if model == "tiny-vae-dec" else TINY_LATENT
    a, b = latents_for_seeds([1, 2], dim, None)
    expected = interpolate(a, b, 5, mode)
    got = np.stack([np.frombuffer(g.latent.data, "<f4") for g in path.images])
    np.testing.assert_array_equal(got, expected)
    ends = stub.Sample(pb.SampleRequest(model=model, seeds=[1, 2], labels=labels, output=F32))
    assert path.images[0].image.data == ends.images[0].image.data
    assert path.images[-1].image.data == ends.images[1].image.data


def test_interpolate_gives_each_seed_end_its_own_seed_and_no_seed_to_the_rest(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """GeneratedImage.seed is the seed whose stream gave the latent: a seed end's image carries
    that end's seed, the path between and a latent end's image none."""
    a = latent_tensor(latents_for_seeds([5], TINY_LATENT)[0])
    cases = [
        (pb.LatentPoint(seed=11), pb.LatentPoint(seed=22), (11, 22)),
        (pb.LatentPoint(latent=a), pb.LatentPoint(seed=22), (None, 22)),
        (pb.LatentPoint(seed=11), pb.LatentPoint(latent=a), (11, None)),
    ]
    for start, end, (first, last) in cases:
        path = stub.Interpolate(pb.InterpolateRequest(model="tiny-gen", start=start, end=end, steps=4))
        seeds = [g.seed if g.HasField("seed") else None for g in path.images]
        assert seeds == [first, None, None, last]


def test_interpolate_between_nearly_opposite_latents_stays_decodable(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """An end and about -2 times it (179.99 degrees apart): the textbook SLERP formula put path
    elements above 10^4, which Decode then refused; the path now stays within the ends' norms."""
    a = 2 * latents_for_seeds([1], 8)[0]
    u, e = a / np.linalg.norm(a), latents_for_seeds([2], 8)[0].astype(np.float64)
    e -= np.dot(e, u) * u
    e /= np.linalg.norm(e)
    angle = np.radians(179.99)
    b = (2 * np.linalg.norm(a) * (np.cos(angle) * u + np.sin(angle) * e)).astype(np.float32)
    path = stub.Interpolate(
        pb.InterpolateRequest(
            model="tiny-vae-dec",
            start=pb.LatentPoint(latent=latent_tensor(a)),
            end=pb.LatentPoint(latent=latent_tensor(b)),
            steps=9,
            mode=pb.INTERPOLATION_MODE_SLERP,
            output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True),
        )
    )
    z = np.stack([np.frombuffer(g.latent.data, "<f4") for g in path.images])
    assert np.linalg.norm(z, axis=1).max() <= np.linalg.norm(b) * (1 + 1e-6)
    decoded = stub.Decode(pb.DecodeRequest(model="tiny-vae-dec", latents=latent_tensor(z), output=F32))
    assert [g.image.data for g in decoded.images] == [g.image.data for g in path.images]


def test_interpolate_seed_out_of_range_names_the_field(stub: pb_grpc.GenerationServiceStub) -> None:
    request = pb.InterpolateRequest(
        model="tiny-gen", start=pb.LatentPoint(seed=-1), end=pb.LatentPoint(seed=2), steps=3
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Interpolate(request)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("start.seed: must be in [0, 2^63)"), details_of(excinfo)


def test_interpolate_between_latents_and_two_labels(stub: pb_grpc.GenerationServiceStub) -> None:
    a = np.zeros(TINY_LATENT, np.float32)
    b = np.ones(TINY_LATENT, np.float32)
    path = stub.Interpolate(
        pb.InterpolateRequest(
            model="tiny-cond",
            start=pb.LatentPoint(latent=latent_tensor(a)),
            end=pb.LatentPoint(latent=latent_tensor(b)),
            steps=4,
            labels=[1, 7],
            output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG),
        )
    )
    assert [g.label for g in path.images] == [1, 1, 7, 7]
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Interpolate(pb.InterpolateRequest(model="tiny-gen", start=pb.LatentPoint(seed=1), steps=1))
    assert "steps" in details_of(excinfo)
    # truncation_psi truncates seeds' latents: with two explicit ends it was silently ignored.
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Interpolate(
            pb.InterpolateRequest(
                model="tiny-gen",
                start=pb.LatentPoint(latent=latent_tensor(a)),
                end=pb.LatentPoint(latent=latent_tensor(b)),
                steps=3,
                truncation_psi=0.7,
            )
        )
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("truncation_psi: truncates the latents drawn from seeds")


def test_an_odd_path_between_two_labels_gives_its_middle_image_the_first_label(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """genserve.proto InterpolateRequest.labels and docs/client.md: the first ceil(steps / 2) images
    take the first label, so an odd path's middle image is the first label's."""
    for steps, expected in ((5, [1, 1, 1, 7, 7]), (3, [1, 1, 7]), (2, [1, 7])):
        path = stub.Interpolate(
            pb.InterpolateRequest(
                model="tiny-cond",
                start=pb.LatentPoint(seed=1),
                end=pb.LatentPoint(seed=2),
                steps=steps,
                labels=[1, 7],
                output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG),
            )
        )
        assert [g.label for g in path.images] == expected, steps


def test_sample_refuses_truncation_psi_with_explicit_latents_on_a_latent_model(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A latent model truncates z as drawn from seeds; explicit z would go through untruncated
    (a style generator takes psi with z: it truncates in w space, tests/server/test_style_server.py)."""
    z = np.zeros((2, TINY_LATENT), np.float32)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", latents=latent_tensor(z), truncation_psi=0.5))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo) == "truncation_psi: cannot be combined with explicit latents"


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_latents(stub: pb_grpc.GenerationServiceStub, tiny_repo: Path, fmt: int) -> None:
    z = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    response = stub.Decode(
        pb.DecodeRequest(model="tiny-vae-dec", latents=latent_tensor(z), output=tpb.OutputOptions(format=fmt))
    )
    assert len(response.images) == 3
    if fmt == tpb.IMAGE_FORMAT_TENSOR_F32:
        (expected,) = local_session(tiny_repo, "tiny-vae-dec").run(None, {"z": z})
        np.testing.assert_allclose(
            np.stack([tensor_of(g.image) for g in response.images]), expected, atol=1e-6
        )
    else:
        assert pixels_of(response.images[0].image).shape[:2] == (8, 8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_images_to_latent_distributions(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path, fmt: int
) -> None:
    gray = (np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4).astype(np.uint8)
    if fmt == tpb.IMAGE_FORMAT_TENSOR_F32:
        chw = gray.transpose(2, 0, 1).astype(np.float32) / 255
        image = tpb.Image(format=fmt, data=chw.tobytes(), shape=[1, 8, 8])
    elif fmt == tpb.IMAGE_FORMAT_RAW_UINT8:
        image = tpb.Image(format=fmt, data=gray.tobytes(), shape=[8, 8, 1])
    else:
        buf = io.BytesIO()
        name = {tpb.IMAGE_FORMAT_PNG: "PNG", tpb.IMAGE_FORMAT_JPEG: "JPEG", tpb.IMAGE_FORMAT_WEBP: "WEBP"}[
            fmt
        ]
        Image.fromarray(gray[:, :, 0]).save(
            buf, format=name, **({"lossless": True} if name == "WEBP" else {})
        )
        image = tpb.Image(format=fmt, data=buf.getvalue())
    response = stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[image, image], sample=True, seed=3))
    assert len(response.latents) == 2
    mu = np.frombuffer(response.latents[0].mu.data, "<f4")
    logvar = np.frombuffer(response.latents[0].logvar.data, "<f4")
    z = np.frombuffer(response.latents[1].z.data, "<f4")
    assert mu.shape == logvar.shape == z.shape == (8,)
    if fmt in (tpb.IMAGE_FORMAT_TENSOR_F32, tpb.IMAGE_FORMAT_RAW_UINT8, tpb.IMAGE_FORMAT_PNG):
        x = (gray.transpose(2, 0, 1).astype(np.float32) / 255)[np.newaxis]
        exp_mu, exp_logvar = local_session(tiny_repo, "tiny-vae-enc").run(None, {"image": x})
        np.testing.assert_allclose(mu, exp_mu[0], atol=1e-6)
        eps = latents_for_seeds([4], 8, None)[0]  # image 1 uses seed + 1
        np.testing.assert_allclose(z, exp_mu[0] + np.exp(exp_logvar[0] / 2) * eps, atol=1e-5)


def test_a_gray_image_encodes_to_the_same_latents_in_every_lossless_format(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A gray picture as PNG, as lossless WebP (which stores gray as RGB) and as an RGB PNG of equal
    channels is one image to a gray encoder: the same mu and logvar bytes (the RGB ones differed by
    an ulp where the luma of three equal values was not the value)."""
    gray = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4 + 1).astype(np.uint8)

    def saved(picture: Image.Image, name: str) -> tpb.Image:
        buf = io.BytesIO()
        picture.save(buf, format=name, **({"lossless": True} if name == "WEBP" else {}))
        return tpb.Image(data=buf.getvalue())

    images = [
        saved(Image.fromarray(gray), "PNG"),
        saved(Image.fromarray(gray), "WEBP"),
        saved(Image.fromarray(gray).convert("RGB"), "PNG"),
        tpb.Image(
            format=tpb.IMAGE_FORMAT_RAW_UINT8,
            data=np.repeat(gray[..., None], 3, 2).tobytes(),
            shape=[8, 8, 3],
        ),
    ]
    response = stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=images))
    first = response.latents[0]
    for i, got in enumerate(response.latents):
        assert (got.mu.data, got.logvar.data) == (first.mu.data, first.logvar.data), f"images[{i}]"


def test_encode_rejects_wrong_size_naming_the_image(stub: pb_grpc.GenerationServiceStub) -> None:
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(9 * 8), shape=[9, 8, 1])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[image]))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]: must be 8x8" in details_of(excinfo)


def test_encode_refuses_a_seed_without_sample_naming_both(stub: pb_grpc.GenerationServiceStub) -> None:
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(8 * 8), shape=[8, 8, 1])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[image], seed=5))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(excinfo)
    assert details.startswith("seed:") and "sample" in details, details
    # No seed (proto3's 0) without sample is the plain distribution, as before.
    plain = stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[image]))
    assert len(plain.latents) == 1 and not plain.latents[0].HasField("z")


def test_encode_refuses_a_large_png_from_its_header_without_decoding_it(
    stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess
) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4000, 4000), np.uint8)).save(buf, format="PNG")  # 16 MP, a few KiB
    big = tpb.Image(format=tpb.IMAGE_FORMAT_PNG, data=buf.getvalue())
    decodes = tiny_server.metric("genserve_decode_duration_seconds_count", model="tiny-vae-enc")
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[big] * 32))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    details = details_of(excinfo)
    assert details.startswith("images[0]: must be 8x8 (tiny-vae-enc's input size, its card's image_size; ")
    assert details.endswith("never resized), got 4000x4000"), details
    # Refused from the header: no decode ran (decoding the 32 of them took seconds and ~0.5 GB).
    assert tiny_server.metric("genserve_decode_duration_seconds_count", model="tiny-vae-enc") == decodes


def test_tensor_f32_input_outside_the_input_range_is_invalid(stub: pb_grpc.GenerationServiceStub) -> None:
    chw = np.full((1, 8, 8), 3e38, np.float32)  # the encoder's input_range is [0, 1]
    image = tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=chw.tobytes(), shape=[1, 8, 8])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[image], sample=True))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "images[0]: TENSOR_F32 values must be in the model's input_range [0, 1]" in details_of(excinfo)
    inside = tpb.Image(
        format=tpb.IMAGE_FORMAT_TENSOR_F32,
        data=np.full((1, 8, 8), 1.005, np.float32).tobytes(),
        shape=[1, 8, 8],
    )
    assert len(stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[inside])).latents) == 1  # 1 % slack


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_tensor_f32_image_sent_to_encode_is_invalid_naming_the_image(
    stub: pb_grpc.GenerationServiceStub, bad: float
) -> None:
    chw = np.full((1, 8, 8), 0.5, np.float32)
    good = tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=chw.tobytes(), shape=[1, 8, 8])
    chw[0, 3, 5] = bad
    image = tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=chw.tobytes(), shape=[1, 8, 8])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Encode(pb.EncodeRequest(model="tiny-vae-enc", images=[good, image], sample=True))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("images[1]: "), details_of(excinfo)


# ----------------------------------------------------------------------------- SuperResolve / Translate


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def raw(image: np.ndarray) -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=image.tobytes(), shape=image.shape)


def test_super_resolve_tiled_equals_untiled(stub: pb_grpc.GenerationServiceStub, tiny_repo: Path) -> None:
    img = photo(200, 300)  # H=200, W=300
    response = stub.SuperResolve(
        pb.ImageRequest(model="tiny-sr", images=[raw(img)], output=F32, tile_size=96, tile_overlap=8)
    )
    assert response.tiles[0] >= 4
    got = tensor_of(response.images[0])
    x = (img.transpose(2, 0, 1).astype(np.float32) / 255)[np.newaxis]
    (untiled,) = local_session(tiny_repo, "tiny-sr").run(None, {"image": x})
    assert got.shape == (3, 400, 600)
    np.testing.assert_allclose(got, untiled[0], atol=1e-5)


def test_super_resolve_of_several_tiled_images_gives_each_its_own_untiled_result(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path
) -> None:
    """The tiles of every image of a request share batches; each image is blended from its own: two
    different 200x300 images and a 150x250 one, all cut into tiles, each equal the untiled run."""
    images = [photo(200, 300, 6), photo(200, 300, 7), photo(150, 250, 8)]
    response = stub.SuperResolve(
        pb.ImageRequest(
            model="tiny-sr", images=[raw(i) for i in images], output=F32, tile_size=96, tile_overlap=8
        )
    )
    assert all(t >= 4 for t in response.tiles), list(response.tiles)
    session = local_session(tiny_repo, "tiny-sr")
    for img, got in zip(images, response.images, strict=True):
        x = (img.transpose(2, 0, 1).astype(np.float32) / 255)[np.newaxis]
        (untiled,) = session.run(None, {"image": x})
        np.testing.assert_allclose(tensor_of(got), untiled[0], rtol=0, atol=1e-5)


def test_super_resolve_with_more_tiles_than_the_queue_holds_is_invalid_naming_tile_size(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # 200x300 in 8x8 tiles is 950 tiles; tiny-sr's queue holds 256. No retry could ever succeed.
    request = pb.ImageRequest(model="tiny-sr", images=[raw(photo(200, 300))], tile_size=8, tile_overlap=0)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SuperResolve(request)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("tile_size: 1 image(s) cut into 950 tiles of 8x8")
    assert "max_queue_size=256" in details_of(excinfo)


def test_super_resolve_refuses_a_direction_rather_than_ignoring_it(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # ImageRequest.direction is Translate's: a SuperResolve that sets it is refused, not served as if
    # it were unset.
    for direction in (pb.DIRECTION_A_TO_B, pb.DIRECTION_B_TO_A):
        request = pb.ImageRequest(model="tiny-sr", images=[raw(photo(8, 8))], direction=direction)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SuperResolve(request)
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(excinfo) == "direction: only Translate takes a direction"


def test_super_resolve_takes_a_tile_size_of_1024_and_refuses_one_past_it(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """tile_size is at most 1024 (genserve.proto): 1024 itself is served, 1025 refused naming it."""
    request = pb.ImageRequest(model="tiny-sr", images=[raw(photo(20, 30))], output=F32, tile_size=1024)
    assert list(stub.SuperResolve(request).tiles) == [1]
    request.tile_size = 1025
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SuperResolve(request)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("tile_size: must be in ") and "..1024 " in details_of(excinfo)
    assert details_of(excinfo).endswith("got 1025"), details_of(excinfo)


def test_an_output_wider_than_the_format_holds_is_invalid_before_compute(
    stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess
) -> None:
    images_before = tiny_server.metric("genserve_images_total", model="tiny-sr")
    wide = raw(photo(4, 8200))  # x2: 8x16400, above WebP's 16383
    for fmt, name in ((tpb.IMAGE_FORMAT_WEBP, "WEBP holds at most 16383"),):
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SuperResolve(
                pb.ImageRequest(model="tiny-sr", images=[wide], output=tpb.OutputOptions(format=fmt))
            )
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(excinfo).startswith(
            f"output.format: {name} pixels a side; output image 0 would be 8x16400"
        )
    assert tiny_server.metric("genserve_images_total", model="tiny-sr") == images_before


def test_a_tile_overlap_no_tile_can_hold_names_tile_overlap(stub: pb_grpc.GenerationServiceStub) -> None:
    for overlap in (1000, 2**32 - 1):
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SuperResolve(
                pb.ImageRequest(model="tiny-sr", images=[raw(photo(16, 16))], tile_overlap=overlap)
            )
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            details_of(excinfo)
            == f"tile_overlap: must be in 0..256 (tile_size / 4, tile_size <= 1024), got {overlap}"
        )


def test_sample_stream_errors_name_the_nested_fields(stub: pb_grpc.GenerationServiceStub) -> None:
    cases = [
        (pb.SampleRequest(count=2), "sample.model: required"),
        (pb.SampleRequest(model="tiny-gen", count=2, truncation_psi=-1), "sample.truncation_psi: must be in"),
        (pb.SampleRequest(model="tiny-gen", count=2, priority=7), "sample.priority: unknown priority 7"),  # type: ignore[arg-type]
    ]
    for sample, prefix in cases:
        with pytest.raises(grpc.RpcError) as excinfo:
            list(stub.SampleStream(pb.SampleStreamRequest(sample=sample)))
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert details_of(excinfo).startswith(prefix), details_of(excinfo)


def test_super_resolve_of_an_image_within_one_tile_equals_untiled(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path
) -> None:
    img = photo(30, 45, 2)  # smaller than the default tile: one tile, no blending
    response = stub.SuperResolve(
        pb.ImageRequest(model="tiny-sr", images=[raw(img), raw(img[:20])], output=F32)
    )
    assert list(response.tiles) == [1, 1]
    x = (img.transpose(2, 0, 1).astype(np.float32) / 255)[np.newaxis]
    (untiled,) = local_session(tiny_repo, "tiny-sr").run(None, {"image": x})
    assert tensor_of(response.images[0]).shape == (3, 60, 90)
    np.testing.assert_allclose(tensor_of(response.images[0]), untiled[0], atol=1e-5)
    (untiled_top,) = local_session(tiny_repo, "tiny-sr").run(None, {"image": x[:, :, :20]})
    np.testing.assert_allclose(tensor_of(response.images[1]), untiled_top[0], atol=1e-5)


def test_super_resolve_defaults_are_exact_for_a_wide_receptive_field(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path
) -> None:
    img = photo(200, 300, 5)
    response = stub.SuperResolve(pb.ImageRequest(model="tiny-sr-wide", images=[raw(img)], output=F32))
    assert response.tiles[0] >= 4
    x = (img.transpose(2, 0, 1).astype(np.float32) / 255)[np.newaxis]
    (untiled,) = local_session(tiny_repo, "tiny-sr-wide").run(None, {"image": x})
    np.testing.assert_allclose(tensor_of(response.images[0]), untiled[0], atol=1e-5)


def test_super_resolve_tiles_of_concurrent_requests_share_a_batch(
    stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess
) -> None:
    def shared_batches() -> float:
        total = tiny_server.metric("genserve_batch_requests_count", model="tiny-sr")
        alone = tiny_server.metric("genserve_batch_requests_bucket", model="tiny-sr", le="1.0")
        return total - alone

    before = shared_batches()
    # Four concurrent requests of 12 tiles each (max_batch_size 16): while the first computes, the
    # others queue, and their tiles fill batches together.
    images = [photo(200, 300, seed) for seed in (1, 2, 3, 4)]
    futures = [
        stub.SuperResolve.future(
            pb.ImageRequest(model="tiny-sr", images=[raw(im)], output=F32, tile_size=96, tile_overlap=8)
        )
        for im in images
    ]
    results = [f.result() for f in futures]
    assert all(r.tiles[0] >= 4 for r in results)
    assert shared_batches() > before


@pytest.mark.parametrize("fmt", FORMATS)
def test_super_resolve_every_format(stub: pb_grpc.GenerationServiceStub, fmt: int) -> None:
    response = stub.SuperResolve(
        pb.ImageRequest(model="tiny-sr", images=[raw(photo(20, 30))], output=tpb.OutputOptions(format=fmt))
    )
    image = response.images[0]
    if fmt == tpb.IMAGE_FORMAT_TENSOR_F32:
        assert tensor_of(image).shape == (3, 40, 60)
    else:
        assert pixels_of(image).shape == (40, 60, 3)


def test_refusals_name_the_field_the_client_set(stub: pb_grpc.GenerationServiceStub) -> None:
    """A stream's psi is `sample.truncation_psi`; a Translate with only tile_overlap set names it."""
    too_small = pb.SampleStreamRequest(
        sample=pb.SampleRequest(model="tiny-gen", count=2, truncation_psi=1e-4)
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.SampleStream(too_small))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(excinfo).startswith("sample.truncation_psi: psi=0.0001 is too small")
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Translate(pb.ImageRequest(model="tiny-i2i", images=[raw(photo(16, 16, 1))], tile_overlap=0))
    assert details_of(excinfo).startswith("tile_overlap: only SuperResolve takes tile_size/tile_overlap")
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(
            pb.SampleRequest(
                model="tiny-gen", count=1, truncation_psi=float(np.nextafter(np.float32(10), np.float32(11)))
            )
        )
    # The float32 the client sent, shortest: not "got 10", which is in range, nor its double
    assert details_of(excinfo).endswith("got 10.000001")


@pytest.mark.parametrize("fmt", FORMATS)
def test_translate_pads_to_multiple_and_crops_back(
    stub: pb_grpc.GenerationServiceStub, tiny_repo: Path, fmt: int
) -> None:
    images = [photo(22, 30, 1), photo(22, 30, 2), photo(16, 16, 3)]
    response = stub.Translate(
        pb.ImageRequest(
            model="tiny-i2i", images=[raw(i) for i in images], output=tpb.OutputOptions(format=fmt)
        )
    )
    assert len(response.images) == 3
    if fmt == tpb.IMAGE_FORMAT_TENSOR_F32:
        x = images[0].transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1
        padded = np.pad(x, ((0, 0), (0, 2), (0, 2)), mode="reflect")[np.newaxis]
        (expected,) = local_session(tiny_repo, "tiny-i2i").run(None, {"image": padded})
        got = tensor_of(response.images[0])
        np.testing.assert_allclose(got, expected[0, :, :22, :30], atol=1e-6)
        assert tensor_of(response.images[2]).shape == (3, 16, 16)
    else:
        assert pixels_of(response.images[0]).shape == (22, 30, 3)
        assert pixels_of(response.images[2]).shape == (16, 16, 3)


def test_image_requests_validate_fields(stub: pb_grpc.GenerationServiceStub) -> None:
    cases = [
        (stub.SuperResolve, pb.ImageRequest(model="tiny-sr"), "images: must have 1..16"),
        (stub.SuperResolve, pb.ImageRequest(model="tiny-sr", images=[raw(photo(2, 2))]), "at least 4 pixels"),
        (
            stub.SuperResolve,
            pb.ImageRequest(model="tiny-sr", images=[raw(photo(8, 8))], tile_size=10, tile_overlap=8),
            "tile_size",
        ),
        (
            stub.SuperResolve,
            pb.ImageRequest(model="tiny-sr", images=[raw(photo(8, 8))], tile_size=64, tile_overlap=20),
            "tile_overlap",
        ),
        (stub.SuperResolve, pb.ImageRequest(model="tiny-sr", images=[tpb.Image(data=b"junk")]), "images[0]"),
        (stub.SuperResolve, pb.ImageRequest(model="tiny-sr", images=[raw(photo(1025, 1025))]), "images[0]"),
        (stub.Translate, pb.ImageRequest(model="tiny-sr", images=[raw(photo(8, 8))]), "super_resolution"),
        (
            stub.Translate,
            pb.ImageRequest(model="tiny-i2i", images=[raw(photo(8, 8))], tile_size=64),
            "tile_size",
        ),
    ]
    for method, request, field in cases:
        with pytest.raises(grpc.RpcError) as excinfo:
            method(request)
        assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in details_of(excinfo)


# ----------------------------------------------------------------------------- ListModels / GetModel / health


def test_list_and_get_models(stub: pb_grpc.GenerationServiceStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"tiny-gen", "tiny-cond", "tiny-vae-dec", "tiny-vae-enc", "tiny-sr", "tiny-i2i"} <= set(models)
    assert models["tiny-cond"].class_names == [str(i) for i in range(10)]
    assert list(models["tiny-gen"].output_shape) == [3, 8, 8]
    assert models["tiny-sr"].scale_factor == 2 and models["tiny-i2i"].size_multiple == 4
    assert models["tiny-gen"].versions[0].state == pb.MODEL_STATE_READY
    broken = stub.GetModel(pb.GetModelRequest(name="tiny-broken"))
    assert broken.versions[0].state == pb.MODEL_STATE_UNAVAILABLE
    assert "sha256 mismatch for model.onnx" in broken.versions[0].reason
    gen = stub.GetModel(pb.GetModelRequest(name="tiny-gen", version="1"))
    assert '"kind": "generator"' in gen.versions[0].card_json
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetModel(pb.GetModelRequest(name="tiny-gen", version="7"))
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


def test_an_error_that_echoes_a_long_client_string_still_reaches_the_client(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """A status message rides in a header: one that echoed a 20,000-character name whole went past
    the client's metadata limit, which then answered RESOURCE_EXHAUSTED in place of the error."""
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.GetModel(pb.GetModelRequest(name="a" * 20_000))
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND
    assert "characters left out" in details_of(excinfo) and len(details_of(excinfo)) < 2_000
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model="tiny-gen", version="9" * 20_000, count=1))
    assert code_of(excinfo) == grpc.StatusCode.NOT_FOUND


def test_a_superresolve_input_over_its_pixel_limit_names_max_sr_input_pixels(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """SuperResolve inputs are bounded by max_sr_input_pixels (1024^2 by default), not by
    max_input_pixels (2048^2): the refusal names the limit an operator would raise."""
    too_big = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=b"", shape=[1100, 1000, 3])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SuperResolve(pb.ImageRequest(model="tiny-sr", images=[too_big]))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "1100x1000 = 1100000 pixels exceeds max_sr_input_pixels 1048576" in details_of(excinfo)


def test_health_per_server_and_model(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
    assert health.Check(health_pb2.HealthCheckRequest(service="tiny-gen")).status == serving
    broken = health.Check(health_pb2.HealthCheckRequest(service="tiny-broken")).status
    assert broken == health_pb2.HealthCheckResponse.NOT_SERVING
    # List (grpc.health.v1's snapshot of every service): what Check answers, key by key.
    listed = health.List(health_pb2.HealthListRequest(), timeout=10).statuses
    assert listed[""].status == serving and listed["tiny-gen"].status == serving
    assert listed["tiny-broken"].status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert "genserve.v1.GenerationService" in services
    assert "grpc.health.v1.Health" in services


@pytest.mark.parametrize(
    "method",
    [
        "genserve.v1.GenerationService.Sample",
        "inference.GRPCInferenceService.ModelInfer",
        "grpc.health.v1.Health.Watch",
    ],
)
def test_reflection_finds_the_file_declaring_a_method(channel: grpc.Channel, method: str) -> None:
    """`grpcurl describe <service>.<method>` asks for the file containing the method's full name
    (grpc.reflection's `<package>.<service>[.<method>]`): it is the service's file."""
    database = ProtoReflectionDescriptorDatabase(channel)
    service, _, name = method.rpartition(".")
    found = database.FindFileContainingSymbol(method)
    assert found.name == database.FindFileContainingSymbol(service).name
    methods = [m.name for s in found.service if f"{found.package}.{s.name}" == service for m in s.method]
    assert name in methods
    with pytest.raises(KeyError):  # asked of the server: a fresh database has nothing cached
        ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(f"{service}.NoSuchMethod")


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("/genserve.v1.GenerationService/Sample", "unary_unary"),
        ("/genserve.v1.GenerationService/SampleStream", "unary_stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ],
)
def test_request_bytes_that_do_not_parse_are_invalid_argument_naming_the_method(
    channel: grpc.Channel, method: str, shape: str
) -> None:
    """Bytes that are not a request of the method's type are the client's fault, whatever the
    method's shape: INVALID_ARGUMENT naming the method (limits.guard_malformed), never grpc's
    INTERNAL 'Exception deserializing request!' nor a handler's UNKNOWN."""
    garbage = b"\xff\xff\xff\xff"
    call = getattr(channel, shape)(method)
    with pytest.raises(grpc.RpcError) as excinfo:
        if shape == "unary_unary":
            call(garbage, timeout=10)
        elif shape == "unary_stream":
            list(call(garbage, timeout=10))
        else:
            list(call(iter([garbage]), timeout=10))
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT, details_of(excinfo)
    assert details_of(excinfo).startswith(f"the request is not a valid protobuf message for {method}: "), (
        details_of(excinfo)
    )


def test_metrics_endpoint_exports_the_contract_names(tiny_server: ServerProcess) -> None:
    text = tiny_server.metrics_text()
    for name in (
        "genserve_requests_total",
        "genserve_request_duration_seconds",
        "genserve_queue_duration_seconds",
        "genserve_compute_duration_seconds",
        "genserve_encode_duration_seconds",
        "genserve_decode_duration_seconds",
        "genserve_batch_size",
        "genserve_batch_requests",
        "genserve_queue_depth",
        "genserve_requests_in_flight",
        "genserve_images_total",
        "genserve_requests_rejected_total",
        "genserve_requests_dropped_total",
        "genserve_batch_failures_total",
        "genserve_model_load_duration_seconds",
        "genserve_model_ready",
        "process_cpu_seconds_total",
        "python_info",
    ):
        assert f"# TYPE {name} " in text, name
    assert tiny_server.metric("genserve_model_ready", model="tiny-broken") == 0
    assert tiny_server.metric("genserve_model_ready", model="tiny-gen") == 1
    assert tiny_server.metric("genserve_requests_total", model="tiny-gen", method="Sample", code="OK") > 0


# ----------------------------------------------------------------------------- batching, deadlines, overload


LES = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0")


def test_concurrent_single_image_requests_are_batched_and_batch_invariant(
    stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess
) -> None:
    model = "tiny-gen"
    count_before = tiny_server.metric("genserve_batch_size_count", model=model)
    sum_before = tiny_server.metric("genserve_batch_size_sum", model=model)
    buckets_before = {le: tiny_server.metric("genserve_batch_size_bucket", model=model, le=le) for le in LES}
    seeds = list(range(1000, 1256))
    by_seed = concurrent_samples(tiny_server.target, model, seeds, 64)
    together = [by_seed[s][0] for s in seeds]
    batches = tiny_server.metric("genserve_batch_size_count", model=model) - count_before
    images = tiny_server.metric("genserve_batch_size_sum", model=model) - sum_before
    buckets = {
        le: tiny_server.metric("genserve_batch_size_bucket", model=model, le=le) - buckets_before[le]
        for le in LES
    }
    assert images == 256
    # The metric and the responses' provenance agree on how many model calls there were...
    sizes = [by_seed[s][1] for s in seeds]
    assert sum(1 / size for size in sizes) == pytest.approx(batches), buckets
    # ...and 64 callers on one runner were batched: fewer calls than images. How many share a call
    # depends on the machine's speed and load (a busy one runs more singletons), so no size is asserted.
    assert max(sizes) > 1 and batches < images, f"batches <= size: {buckets}"
    alone = [
        stub.Sample(pb.SampleRequest(model=model, seeds=[s], output=F32)).images[0].image.data for s in seeds
    ]
    assert together == alone


def test_one_channel_may_carry_more_than_256_calls_at_once(tiny_server: ServerProcess) -> None:
    # With grpcio 1.85 the server refuses streams above max_concurrent_streams (UNAVAILABLE, REFUSED_STREAM)
    # instead of the client queueing them; the default now matches max_concurrent_rpcs.
    async def burst() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(tiny_server.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            await stub.ListModels(pb.ListModelsRequest(), timeout=10)

            async def one(i: int) -> grpc.StatusCode:
                try:
                    await stub.Sample(pb.SampleRequest(model="tiny-gen", count=1, base_seed=i), timeout=30)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            return await asyncio.gather(*(one(i) for i in range(400)))

    codes = asyncio.run(burst())
    assert set(codes) == {grpc.StatusCode.OK}, {c: codes.count(c) for c in set(codes)}


@dataclass
class Held:
    """A server whose one model ("held", one instance, batches of 4, a queue of 64) takes a while a batch."""

    server: ServerProcess
    stub: pb_grpc.GenerationServiceStub
    model: str = "held"

    def batch_s(self) -> float:
        """A batch's duration on this machine now: measured once for the module, under another load
        (a busy moment as its server started, gone by the test), it could be twice what a batch
        takes by then (4 images)."""
        started = time.monotonic()
        self.stub.Sample(pb.SampleRequest(model=self.model, count=4), timeout=60)
        return time.monotonic() - started


HELD_QUEUE = 64  # rows: room for 15 batches of 4 queued behind a running one, and one row more


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Held]:
    # Slower than the shared tiny-slow: rows stay queued behind a running batch for longer than a
    # /metrics scrape takes on a loaded machine, so a test can see them there before they run.
    repo = tmp_path_factory.mktemp("held-models")
    write_model(
        repo,
        "held",
        "generator",
        slow_generator_graph(TINY_LATENT, 40000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": HELD_QUEUE}},
    )
    work = tmp_path_factory.mktemp("held-server")
    with running_server(repo, work, config={"warmup": False}) as server:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            stub.Sample(pb.SampleRequest(model="held", count=4), timeout=60)  # loads the session's kernels
            yield Held(server, stub)


def occupy(held: Held, n: int = 2) -> list[grpc.Future]:
    """`n` 4-row requests: one batch runs, the others wait, all surely in the server on return."""
    calls_before = sample_calls(held.server, held.model)
    busy = [
        held.stub.Sample.future(pb.SampleRequest(model=held.model, count=4, base_seed=i)) for i in range(n)
    ]
    wait_until(
        lambda: sample_calls(held.server, held.model) - calls_before >= n, 10, "the busy requests", 0.01
    )
    return busy


def test_expired_deadline_is_never_computed(held: Held) -> None:
    server, stub, model = held.server, held.stub, held.model
    batch_s = held.batch_s()
    dropped_before = server.metric("genserve_requests_dropped_total", model=model, reason="deadline")
    images_before = server.metric("genserve_images_total", model=model)

    def finished(code: str) -> float:
        return server.metric("genserve_requests_total", model=model, method="Sample", code=code)

    expired_before, cancelled_before = finished("DEADLINE_EXCEEDED"), finished("CANCELLED")
    # A deadline long enough for the server to admit the request on a loaded machine (a second, or two
    # batches), behind whole batches that take 3 times as long (batch_s, measured at a busier moment,
    # can be twice a batch's time by then): its deadline passes while its row is queued. Its rows are
    # latents, not seeds: another batch key, served after every request of the busy key admitted
    # before it (batcher.py's scheduling; a one-row request of their key would go in the next batch).
    # Where batches are too fast for the queue to hold that much, the deadline is a third of the rows.
    deadline_s = max(1.0, 2 * batch_s)
    waiting = min((HELD_QUEUE - 1) // 4, math.ceil(3 * deadline_s / batch_s))
    deadline_s = min(deadline_s, waiting * batch_s / 3)
    calls_before = sample_calls(server, model)
    busy = occupy(held, 1 + waiting)
    z = latents_for_seeds([99], TINY_LATENT, None)
    doomed = stub.Sample.future(pb.SampleRequest(model=model, latents=latent_tensor(z)), timeout=deadline_s)
    wait_until(  # it reached the queue: not a call that timed out before the server held it
        lambda: sample_calls(server, model) - calls_before >= len(busy) + 1, 10, "the doomed request", 0.01
    )
    with pytest.raises(grpc.RpcError) as excinfo:
        doomed.result()
    assert code_of(excinfo) == grpc.StatusCode.DEADLINE_EXCEEDED
    for f in busy:
        f.result()
    deadline_s = time.monotonic() + 5
    while time.monotonic() < deadline_s:
        dropped = server.metric("genserve_requests_dropped_total", model=model, reason="deadline")
        if dropped > dropped_before:
            break
        time.sleep(0.05)
    stub.Sample(
        pb.SampleRequest(model=model, count=1)
    )  # a later batch sweeps the expired row if still queued
    assert (
        server.metric("genserve_requests_dropped_total", model=model, reason="deadline") == dropped_before + 1
    )
    assert server.metric("genserve_images_total", model=model) == images_before + 4 * len(busy) + 1
    # gRPC cancels the handler at the deadline: counted as the deadline, not as a client's cancel.
    assert finished("DEADLINE_EXCEEDED") == expired_before + 1
    assert finished("CANCELLED") == cancelled_before


def test_cancelled_call_is_dropped_before_compute(held: Held) -> None:
    server, stub, model = held.server, held.stub, held.model
    batch_s = held.batch_s()
    dropped_before = server.metric("genserve_requests_dropped_total", model=model, reason="cancelled")
    images_before = server.metric("genserve_images_total", model=model)
    # Its row is latents, not seeds: another batch key, served after every request of the busy key
    # admitted before it (batcher.py's scheduling; a one-row request of their key would go in the
    # next batch). Behind at least 2 seconds of queued batches (batch_s, measured at a busier moment,
    # can be twice a batch's time by then), or as many as the queue holds: its cancel, sent once the
    # server holds it, arrives long before its batch could start.
    waiting = min((HELD_QUEUE - 1) // 4, max(2, math.ceil(4 / batch_s)))
    calls_before = sample_calls(server, model)
    busy = occupy(held, 1 + waiting)
    z = latents_for_seeds([99], TINY_LATENT, None)
    doomed = stub.Sample.future(pb.SampleRequest(model=model, latents=latent_tensor(z)))
    # Cancelled once the server holds it (queued behind the busy rows), not before it was sent.
    wait_until(
        lambda: sample_calls(server, model) - calls_before >= len(busy) + 1, 10, "the doomed request", 0.01
    )
    assert doomed.cancel()
    for f in busy:
        f.result()
    stub.Sample(
        pb.SampleRequest(model=model, count=1)
    )  # a later batch sweeps the cancelled row if still queued
    assert (
        server.metric("genserve_requests_dropped_total", model=model, reason="cancelled")
        == dropped_before + 1
    )
    # The busy rows and the sweeping one were computed; the cancelled row never was.
    assert server.metric("genserve_images_total", model=model) == images_before + 4 * len(busy) + 1


def test_flood_beyond_the_queue_bound_is_refused_while_accepted_requests_succeed(
    tiny_server: ServerProcess,
) -> None:
    async def flood() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(tiny_server.target) as ch:
            s = pb_grpc.GenerationServiceStub(ch)

            async def one(i: int) -> grpc.StatusCode:
                try:
                    r = await s.Sample(pb.SampleRequest(model="tiny-slow", count=2, base_seed=i))
                    assert len(r.images) == 2
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    assert "max_queue_size=8" in str(err.details())
                    return err.code()

            return await asyncio.gather(*(one(i) for i in range(40)))

    rejected_before = tiny_server.metric(
        "genserve_requests_rejected_total", model="tiny-slow", reason="queue_full"
    )
    codes = asyncio.run(flood())
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    n_rejected = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    after = tiny_server.metric("genserve_requests_rejected_total", model="tiny-slow", reason="queue_full")
    assert after - rejected_before == n_rejected


# ----------------------------------------------------------------------------- lifecycle (own server)


def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    repo = build_tiny_repo(tmp_path / "models", with_slow=False, with_broken=False)
    # Slower than the shared tiny-slow (~0.3 s a batch of 4) so that work is surely queued at SIGTERM.
    write_model(
        repo,
        "tiny-slow",
        "generator",
        slow_generator_graph(TINY_LATENT, 20000),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 16}},
    )
    config = {"limits": {"max_send_message_bytes": 1 << 20}, "drain_grace_s": 20, "warmup": False}
    with running_server(repo, tmp_path / "server", config=config) as server:
        # An output above max_send_message_bytes is a clear error naming the limit.
        with grpc.insecure_channel(server.target) as ch:
            s = pb_grpc.GenerationServiceStub(ch)
            with pytest.raises(grpc.RpcError) as excinfo:
                s.SuperResolve(pb.ImageRequest(model="tiny-sr", images=[raw(photo(300, 300))], output=F32))
            # Not RESOURCE_EXHAUSTED: clients retry that, and the same request would fail every time.
            assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_send_message_bytes=1048576" in details_of(excinfo)
            # PNG is admitted by its worst case (about the raw pixels): refused before compute as
            # well, and the hint does not suggest the encoded format the request already asked for.
            images_before = server.metric("genserve_images_total", model="tiny-sr")
            png0 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG, png_compression=0)
            with pytest.raises(grpc.RpcError) as excinfo:
                s.SuperResolve(pb.ImageRequest(model="tiny-sr", images=[raw(photo(300, 300))], output=png0))
            assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
            assert "lossy format" in details_of(excinfo) and "worst case" in details_of(excinfo)
            assert server.metric("genserve_images_total", model="tiny-sr") == images_before

        results: list[object] = []

        def load() -> None:
            with grpc.insecure_channel(server.target) as ch:
                s = pb_grpc.GenerationServiceStub(ch)
                futures = [
                    s.Sample.future(pb.SampleRequest(model="tiny-slow", count=1, base_seed=i))
                    for i in range(12)
                ]
                for f in futures:
                    try:
                        results.append(f.result(timeout=30))
                    except grpc.RpcError as err:
                        results.append(err)

        thread = threading.Thread(target=load)
        thread.start()

        # SIGTERM once every request is accepted (in a handler) and work is queued: a request still
        # on the wire at SIGTERM may be refused UNAVAILABLE (retryable), which is not "lost".
        def accepted() -> bool:
            in_flight = server.metric("genserve_requests_in_flight", method="Sample")
            queued = server.metric("genserve_queue_depth", model="tiny-slow")
            return in_flight + len(results) >= 12 and queued >= 1

        deadline_s = time.monotonic() + 10
        while not accepted() and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert server.metric("genserve_queue_depth", model="tiny-slow") >= 1  # work is queued
        rc = server.stop(timeout_s=30)
        thread.join(30)
        assert rc == 0
        failures = [r for r in results if isinstance(r, grpc.RpcError)]
        assert not failures, failures
        assert len(results) == 12


def test_no_metrics_and_json_logs(tiny_repo: Path, tmp_path: Path) -> None:
    with running_server(
        tiny_repo, tmp_path, extra_args=("--no-metrics", "--log-json", "--log-level", "DEBUG")
    ) as server:
        assert server.metrics_port == 0
        with grpc.insecure_channel(server.target) as ch:
            pb_grpc.GenerationServiceStub(ch).Sample(
                pb.SampleRequest(model="tiny-gen", count=2), metadata=(("x-request-id", "json-1"),)
            )
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines]
    assert any(m.startswith("batch model=tiny-gen version=1 rows=2") for m in messages)
    assert any("request_id=json-1 method=Sample model=tiny-gen" in m and "code=OK" in m for m in messages)
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in lines)


def test_the_debug_batch_line_names_its_model_version_queue_time_and_request_ids_as_fields(
    tiny_repo: Path, tmp_path: Path
) -> None:
    """docs/metrics.md: one debug line per executed batch (model/version, rows, requests in the batch,
    queue and compute time, ok), its fields `key=value` pairs as the request line's, and the request
    id on every log line about a request. The batch line wrote `model=model tiny-gen version 1` (a
    `model=model` field, no version=), no queue time, and no request id to find a slow call's batch by."""
    with running_server(tiny_repo, tmp_path, extra_args=("--log-level", "DEBUG")) as server:
        with grpc.insecure_channel(server.target) as ch:
            pb_grpc.GenerationServiceStub(ch).Sample(
                pb.SampleRequest(model="tiny-gen", count=2), metadata=(("x-request-id", "batch-line-1"),)
            )
        assert server.stop() == 0
    batch_lines = [line for line in server.log().splitlines() if "genserve_server.batcher: batch " in line]
    assert batch_lines, server.log()[-2000:]
    fields = dict(pair.split("=", 1) for pair in batch_lines[0].split(": batch ", 1)[1].split())
    assert fields["model"] == "tiny-gen" and fields["version"] == "1", batch_lines[0]
    assert fields["rows"] == "2" and fields["requests"] == "1" and fields["ok"] == "True", batch_lines[0]
    assert fields["request_ids"] == "batch-line-1", batch_lines[0]
    assert float(fields["queue_ms"]) >= 0 and float(fields["compute_ms"]) >= 0, batch_lines[0]


def test_a_call_refused_for_its_models_kind_counts_under_that_model(
    stub: pb_grpc.GenerationServiceStub, tiny_server: ServerProcess
) -> None:
    """docs/metrics.md: the model label is the repository name, model="" the calls that named no
    model there (an unknown name). SuperResolve on tiny-gen (a generator) names a model that exists
    and is refused for its kind, yet it counted under model="", read by the runbook as unknown names."""

    def refused(model: str) -> float:
        labels = {"method": "SuperResolve", "code": "INVALID_ARGUMENT"}
        return tiny_server.metric("genserve_requests_total", model=model, **labels)

    named, unnamed = refused("tiny-gen"), refused("")
    image = tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(8 * 8 * 3), shape=[8, 8, 3])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SuperResolve(pb.ImageRequest(model="tiny-gen", images=[image]), timeout=30)
    assert code_of(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
    assert "tiny-gen is a generator model" in details_of(excinfo), details_of(excinfo)
    wait_until(lambda: refused("tiny-gen") + refused("") > named + unnamed, 10, "the refusal counted")
    assert (refused("tiny-gen") - named, refused("") - unnamed) == (1, 0)
