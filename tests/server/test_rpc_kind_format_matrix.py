"""The matrix of genserve.v1 RPC x model kind x OutputOptions on one real server holding a tiny
model of every kind: each combination works, with formats that agree with each other and latents of
the documented shape, or is refused at once with INVALID_ARGUMENT naming the field; and ModelInfo
describes each kind as the proto comments say."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from code_models import write_code_models
from server_support import (
    FORMATS,
    ServerProcess,
    build_tiny_repo,
    pixels_of,
    start_server,
    tensor_of,
)
from style_models import W_DIM, write_style_models
from translator_models import write_translator

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

CYCLEGAN = "tiny-cyclegan"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = build_tiny_repo(tmp_path_factory.mktemp("matrix-models"), with_slow=False, with_broken=False)
    codes = write_code_models(root)
    styles = write_style_models(root)
    write_translator(root, CYCLEGAN)
    required = [
        "tiny-gen",
        "tiny-sr",
        "tiny-i2i",
        CYCLEGAN,
        codes["prior"],
        codes["decoder"],
        styles["generator"],
    ]
    server = start_server(
        root, tmp_path_factory.mktemp("matrix-server"), extra_args=("--require-models", ",".join(required))
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _raw(h: int, w: int, c: int = 3) -> tpb.Image:
    data = np.random.default_rng(h * w * c).integers(0, 256, (h, w, c), np.uint8)
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=data.tobytes(), shape=[h, w, c])


def _latents(n: int, dim: int) -> tpb.Tensor:
    z = np.random.default_rng(dim).normal(size=(n, dim)).astype("<f4")
    return tpb.Tensor(shape=[n, dim], dtype=tpb.DTYPE_FLOAT32, data=z.tobytes())


# ------------------------------------------------------------------ return_latents where meaningless


@pytest.mark.parametrize(
    ("rpc", "model", "direction"),
    [
        ("SuperResolve", "tiny-sr", pb.DIRECTION_UNSPECIFIED),
        ("Translate", "tiny-i2i", pb.DIRECTION_UNSPECIFIED),
        ("Translate", CYCLEGAN, pb.DIRECTION_B_TO_A),
    ],
)
def test_image_rpcs_refuse_return_latents(
    stub: pb_grpc.GenerationServiceStub, rpc: str, model: str, direction: int
) -> None:
    """An image-to-image response (ImageResponse) has no latents to return: output.return_latents
    there was accepted and silently dropped, as MixStyles and SampleCodes refuse it."""
    request = pb.ImageRequest(
        model=model,
        images=[_raw(12, 12)],
        direction=direction,
        output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG, return_latents=True),
    )
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("output.return_latents:"), details
    assert rpc in details and "Sample" in details  # which RPCs do return latents


@pytest.mark.parametrize(("model", "dim", "labels"), [("tiny-cond", 16, [2]), ("style-gen", 8, [])])
def test_decode_on_generators_it_cannot_take_names_sample(
    stub: pb_grpc.GenerationServiceStub, model: str, dim: int, labels: list[int]
) -> None:
    """DecodeRequest said "a vae_decoder (or any generator)"; a conditional or style generator is
    refused naming only the kinds Decode takes. The refusal says what takes these latents: Sample's
    `latents` (with labels where the model needs them), which works."""
    latents = _latents(2, dim)
    with pytest.raises(grpc.RpcError) as info:
        stub.Decode(pb.DecodeRequest(model=model, latents=latents), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("model:") and "Sample's `latents`" in details, details
    assert ("`labels`" in details) == bool(labels), details
    response = stub.Sample(pb.SampleRequest(model=model, latents=latents, labels=labels), timeout=30)
    assert len(response.images) == 2


# ------------------------------------------------------------------ ModelInfo per kind


def _infos(stub: pb_grpc.GenerationServiceStub) -> dict[str, pb.ModelInfo]:
    """Every model's GetModel (ListModels leaves the versions' card_json out)."""
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]
    return {name: stub.GetModel(pb.GetModelRequest(name=name), timeout=30) for name in names}


def test_model_info_per_kind_matches_the_cards(stub: pb_grpc.GenerationServiceStub) -> None:
    """ModelInfo.output_shape is "Output image [C, H, W] for generators and decoders": a
    code_decoder's fixed-size image (card channels, image_size) was left empty."""
    infos = _infos(stub)
    for name, info in infos.items():
        if not info.versions or not info.versions[0].card_json:
            continue
        card = json.loads(info.versions[-1].card_json)
        kind = card["kind"]
        fixed_image = kind in (
            "generator",
            "conditional_generator",
            "vae_decoder",
            "style_generator",
            "code_decoder",
        )
        expected_shape = [card["channels"], *card["image_size"]] if fixed_image else []
        assert list(info.output_shape) == expected_shape, (name, kind)
        assert list(info.class_names) == (card["class_names"] or []), name
        assert info.scale_factor == (card["scale_factor"] if kind == "super_resolution" else 1), name
        assert info.w_dim == (card.get("w_dim") or 0), name
        assert info.num_layers == (card.get("num_layers") or 0), name
        assert info.latent_dim == (card["latent_dim"] or 0), name
    assert infos["style-gen"].w_dim == W_DIM


# ------------------------------------------------------------------ formats agree, latents' shapes


def _cases(stub: pb_grpc.GenerationServiceStub) -> list[tuple[str, Callable[[tpb.OutputOptions], Any]]]:
    def sample(model: str, labels: list[int], **kw: Any) -> Callable[[tpb.OutputOptions], Any]:
        return lambda out: stub.Sample(
            pb.SampleRequest(model=model, labels=labels, output=out, **kw), timeout=30
        )

    def stream(model: str) -> Callable[[tpb.OutputOptions], Any]:
        def run(out: tpb.OutputOptions) -> Any:
            request = pb.SampleStreamRequest(
                sample=pb.SampleRequest(model=model, count=3, output=out), chunk_size=2
            )
            chunks = list(stub.SampleStream(request, timeout=30))
            merged = pb.SampleResponse(provenance=chunks[0].provenance)
            for chunk in chunks:
                merged.images.extend(chunk.images)
            return merged

        return run

    def interpolate(model: str, dim: int) -> Callable[[tpb.OutputOptions], Any]:
        end = pb.LatentPoint(latent=tpb.Tensor(shape=[dim], data=np.ones(dim, "<f4").tobytes()))
        return lambda out: stub.Interpolate(
            pb.InterpolateRequest(
                model=model,
                start=pb.LatentPoint(seed=3),
                end=end,
                steps=3,
                output=out,
                mode=pb.INTERPOLATION_MODE_LERP,
            ),
            timeout=30,
        )

    return [
        ("tiny-gen/Sample", sample("tiny-gen", [], seeds=[1, 2])),
        ("tiny-cond/Sample", sample("tiny-cond", [3], seeds=[1, 2])),
        ("tiny-vae-dec/Sample", sample("tiny-vae-dec", [], latents=_latents(2, 8))),
        ("style-gen/Sample", sample("style-gen", [], seeds=[1, 2], truncation_psi=0.5)),
        ("tiny-gen/SampleStream", stream("tiny-gen")),
        ("style-gen/SampleStream", stream("style-gen")),
        ("tiny-gen/Interpolate", interpolate("tiny-gen", 16)),
        ("style-gen/Interpolate", interpolate("style-gen", 8)),
        (
            "tiny-vae-dec/Decode",
            lambda out: stub.Decode(
                pb.DecodeRequest(model="tiny-vae-dec", latents=_latents(2, 8), output=out)
            ),
        ),
        (
            "style-gen/MixStyles",
            lambda out: stub.MixStyles(
                pb.MixStylesRequest(
                    model="style-gen",
                    mixes=[pb.StyleMix(coarse_seed=1, fine_seed=2)],
                    crossover=2,
                    output=out,
                )
            ),
        ),
        (
            "prior/SampleCodes",
            lambda out: stub.SampleCodes(
                pb.SampleCodesRequest(model="prior", seeds=[1, 2], labels=[0], output=out)
            ),
        ),
        (
            "tiny-sr/SuperResolve",
            lambda out: stub.SuperResolve(
                pb.ImageRequest(model="tiny-sr", images=[_raw(40, 36)], tile_size=32, output=out)
            ),
        ),
        (
            f"{CYCLEGAN}/Translate",
            lambda out: stub.Translate(
                pb.ImageRequest(
                    model=CYCLEGAN, images=[_raw(12, 10)], direction=pb.DIRECTION_B_TO_A, output=out
                )
            ),
        ),
    ]


def _images(response: Any) -> list[tpb.Image]:
    return [g.image if hasattr(g, "image") else g for g in response.images]


def test_every_format_gives_the_same_pixels_for_every_kind(stub: pb_grpc.GenerationServiceStub) -> None:
    infos = _infos(stub)
    for label, run in _cases(stub):
        model = label.split("/")[0]
        card = json.loads(infos["codes-decoder" if model == "prior" else model].versions[-1].card_json)
        lo, hi = card["output_range"]
        by_format = {fmt: _images(run(tpb.OutputOptions(format=fmt))) for fmt in FORMATS}
        by_format[tpb.IMAGE_FORMAT_UNSPECIFIED] = _images(run(tpb.OutputOptions()))
        for i, png in enumerate(by_format[tpb.IMAGE_FORMAT_PNG]):
            pixels = pixels_of(png)
            assert pixels.shape[2] == card["channels"], label
            assert list(png.shape) == list(pixels.shape), label
            assert np.array_equal(pixels_of(by_format[tpb.IMAGE_FORMAT_RAW_UINT8][i]), pixels), label
            assert np.array_equal(pixels_of(by_format[tpb.IMAGE_FORMAT_UNSPECIFIED][i]), pixels), label
            assert by_format[tpb.IMAGE_FORMAT_UNSPECIFIED][i].format == tpb.IMAGE_FORMAT_PNG, label
            f32 = tensor_of(by_format[tpb.IMAGE_FORMAT_TENSOR_F32][i])
            mapped = np.clip(np.floor((f32 - lo) * 255 / (hi - lo) + 0.5), 0, 255).astype(np.uint8)
            assert np.abs(mapped.transpose(1, 2, 0).astype(int) - pixels.astype(int)).max() <= 1, label
            for lossy in (tpb.IMAGE_FORMAT_JPEG, tpb.IMAGE_FORMAT_WEBP):
                decoded = pixels_of(by_format[lossy][i])
                assert decoded.shape[:2] == pixels.shape[:2], (label, lossy)
                assert list(by_format[lossy][i].shape) == list(decoded.shape), (label, lossy)


def test_return_latents_gives_the_documented_latent_per_kind(stub: pb_grpc.GenerationServiceStub) -> None:
    """z [Z] from Sample, SampleStream, Decode and a latent model's Interpolate (a style generator's
    Sample too: its z); w [w_dim] from a style generator's Interpolate; refused by MixStyles and
    SampleCodes naming output.return_latents."""
    expected = {
        "tiny-gen/Sample": 16,
        "tiny-cond/Sample": 16,
        "tiny-vae-dec/Sample": 8,
        "style-gen/Sample": 8,
        "tiny-gen/SampleStream": 16,
        "style-gen/SampleStream": 8,
        "tiny-gen/Interpolate": 16,
        "style-gen/Interpolate": W_DIM,
        "tiny-vae-dec/Decode": 8,
    }
    for label, run in _cases(stub):
        out = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8, return_latents=True)
        if label in expected:
            response = run(out)
            assert response.images, label
            for g in response.images:
                assert g.HasField("latent"), label
                assert list(g.latent.shape) == [expected[label]], label
                assert len(g.latent.data) == 4 * expected[label], label
            without = run(tpb.OutputOptions(format=tpb.IMAGE_FORMAT_RAW_UINT8))
            assert not any(g.HasField("latent") for g in without.images), label
        else:
            with pytest.raises(grpc.RpcError) as info:
                run(out)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
            assert (info.value.details() or "").startswith("output.return_latents:"), label
