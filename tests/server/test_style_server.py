"""Style-based generators (style_mapping + style_generator) served by a real server on 127.0.0.1:
Sample with truncation in w space, style mixing (MixStyles), interpolation in w space. References
are computed here with ONNX Runtime on the same tiny graphs (style_models.py), from the seeds'
latents by the proto's algorithm."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from server_support import (
    F32,
    ServerProcess,
    fails_within,
    healthy_models,
    running_server,
    start_server,
    tensor_of,
)
from style_models import (
    NUM_LAYERS,
    STYLE_LATENT,
    W_AVG,
    W_DIM,
    mapping_graph,
    synthesis_graph,
    write_style_models,
)

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server import latents, validate
from genserve_server.batch_keys import LatentRows
from genserve_server.batcher import Lane
from genserve_server.config import ConfigError, ServerConfig, load_card
from genserve_server.core import Call, GenerationCore
from genserve_server.metrics import Metrics
from genserve_server.reload import Reloader
from genserve_server.repository import Repository
from genserve_server.style_sampling import truncate

PNG = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_PNG)


@pytest.fixture(scope="module")
def style_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("style-models")
    names = write_style_models(root)
    server = start_server(
        root, tmp_path_factory.mktemp("style-server"), extra_args=healthy_models(root, (names["unmapped"],))
    )
    yield server, names
    server.stop()


@pytest.fixture(scope="module")
def stub(style_server: tuple[ServerProcess, dict[str, str]]) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(style_server[0].target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def gen(style_server: tuple[ServerProcess, dict[str, str]]) -> str:
    return style_server[1]["generator"]


def _session(model: object) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]


MAPPING = _session(mapping_graph())
SYNTHESIS = _session(synthesis_graph())


def w_of(seeds: list[int]) -> np.ndarray:
    z = latents.latents_for_seeds(seeds, STYLE_LATENT, None)
    w: np.ndarray = MAPPING.run(["w"], {"z": z})[0]
    return w


def synth(ws: np.ndarray) -> np.ndarray:
    image: np.ndarray = SYNTHESIS.run(["image"], {"ws": ws.astype(np.float32)})[0]
    return image


def truncated(w: np.ndarray, psi: float) -> np.ndarray:
    avg = np.asarray(W_AVG, np.float32)
    out: np.ndarray = (avg + np.float32(psi) * (w - avg)).astype(np.float32)
    return out


def broadcast(w: np.ndarray) -> np.ndarray:
    return np.repeat(w[:, np.newaxis, :], NUM_LAYERS, axis=1)


def code_and_details(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code(), str(err.details())


def test_sample_maps_seeds_to_w_and_truncates_in_w_space(
    stub: pb_grpc.GenerationServiceStub, gen: str
) -> None:
    seeds = [3, 4, 11]
    plain = stub.Sample(pb.SampleRequest(model=gen, seeds=seeds, output=F32))
    np.testing.assert_allclose(
        np.stack([tensor_of(g.image) for g in plain.images]), synth(broadcast(w_of(seeds))), atol=1e-5
    )
    half = stub.Sample(pb.SampleRequest(model=gen, seeds=seeds, truncation_psi=0.5, output=F32))
    want = synth(broadcast(truncated(w_of(seeds), 0.5)))
    np.testing.assert_allclose(np.stack([tensor_of(g.image) for g in half.images]), want, atol=1e-5)
    assert not np.allclose(want, synth(broadcast(w_of(seeds))), atol=1e-3)  # truncation changed them
    # The same images from a SampleStream (the bulk lane) and from the seeds' latents given explicitly.
    stream = pb.SampleStreamRequest(
        sample=pb.SampleRequest(model=gen, count=3, base_seed=3, truncation_psi=0.5, output=F32)
    )
    streamed = [g.image.data for chunk in stub.SampleStream(stream) for g in chunk.images]
    assert streamed[:2] == [g.image.data for g in half.images[:2]]
    z = latents.latents_for_seeds(seeds, STYLE_LATENT, None)
    given = stub.Sample(
        pb.SampleRequest(
            model=gen,
            latents=tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.tobytes()),
            output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True),
        )
    )
    assert [g.image.data for g in given.images] == [g.image.data for g in plain.images]
    assert given.images[1].latent.data == z[1].tobytes()
    # psi applies in w space, after the mapping, to explicit latents as to seeds: a seed's returned z
    # sampled again with the same psi is the same image (vector arithmetic under truncation).
    given_half = stub.Sample(
        pb.SampleRequest(
            model=gen,
            latents=tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.tobytes()),
            truncation_psi=0.5,
            output=F32,
        )
    )
    assert [g.image.data for g in given_half.images] == [g.image.data for g in half.images]


def test_psi_zero_gives_the_image_of_w_avg_for_every_seed(
    stub: pb_grpc.GenerationServiceStub, gen: str
) -> None:
    response = stub.Sample(pb.SampleRequest(model=gen, seeds=[1, 2, 99], truncation_psi=0.0, output=F32))
    images = [tensor_of(g.image) for g in response.images]
    assert images[0].tobytes() == images[1].tobytes() == images[2].tobytes()
    np.testing.assert_allclose(images[0], synth(broadcast(np.asarray([W_AVG], np.float32)))[0], atol=1e-5)


def test_psi_one_is_no_truncation_byte_for_byte(stub: pb_grpc.GenerationServiceStub, gen: str) -> None:
    """docs/client.md: psi 1 = none. In float32, w_avg + 1 * (w - w_avg) is not always w."""
    rng = np.random.default_rng(5)
    w = rng.normal(size=(64, 32)).astype(np.float32)
    w_avg = rng.normal(size=32).astype(np.float32)
    psi = np.array([1.0] * 32 + [np.nan] * 32)
    assert truncate(w, w_avg, psi).tobytes() == w.tobytes()
    seeds = list(range(40))
    plain = stub.Sample(pb.SampleRequest(model=gen, seeds=seeds, output=F32))
    one = stub.Sample(pb.SampleRequest(model=gen, seeds=seeds, truncation_psi=1.0, output=F32))
    assert [g.image.data for g in one.images] == [g.image.data for g in plain.images]


def test_mixing_equals_synthesising_ws_built_by_hand(stub: pb_grpc.GenerationServiceStub, gen: str) -> None:
    mixes = [(1, 2, 1, None), (2, 1, 3, None), (5, 7, 2, 0.6)]
    request = pb.MixStylesRequest(model=gen, output=F32)
    for coarse, fine, k, psi in mixes:
        mix = request.mixes.add(coarse_seed=coarse, fine_seed=fine, crossover=k)
        if psi is not None:
            mix.truncation_psi = psi
    response = stub.MixStyles(request)
    assert [g.seed for g in response.images] == [1, 2, 5]
    assert list(response.provenance.executed_batch_sizes) == [3]  # every crossover and psi in one batch
    # The mapping is part of what made the images: a reload of it changes them, not `model`.
    (mapping,) = response.provenance.used_models
    assert (mapping.model, mapping.version) == ("style-mapping", "1")
    assert len(mapping.model_sha256) == 64 and mapping.model_sha256 != response.provenance.model_sha256
    sampled = stub.Sample(pb.SampleRequest(model=gen, seeds=[1], output=F32))
    assert list(sampled.provenance.used_models) == [mapping]
    for g, (coarse, fine, k, psi) in zip(response.images, mixes, strict=True):
        wc, wf = w_of([coarse])[0], w_of([fine])[0]
        if psi is not None:
            wc, wf = truncated(wc, psi), truncated(wf, psi)
        ws = np.stack([wc if layer < k else wf for layer in range(NUM_LAYERS)])[np.newaxis]
        np.testing.assert_allclose(tensor_of(g.image), synth(ws)[0], atol=1e-5)
    # Mixing changes the image: neither seed's own.
    alone = stub.Sample(pb.SampleRequest(model=gen, seeds=[1, 2], output=F32))
    for own in alone.images:
        assert not np.allclose(tensor_of(own.image), tensor_of(response.images[0].image), atol=1e-3)


def test_every_style_call_names_the_mapping_its_images_went_through(
    stub: pb_grpc.GenerationServiceStub, gen: str
) -> None:
    """A style generator's images go through its mapping: Sample's provenance names it in
    used_models, and so do each SampleStream chunk's and Interpolate's (a reload of the mapping
    changes their images too)."""
    (mapping,) = stub.Sample(pb.SampleRequest(model=gen, seeds=[1], output=PNG)).provenance.used_models
    assert (mapping.model, mapping.version) == ("style-mapping", "1")
    sample = pb.SampleRequest(model=gen, count=5, base_seed=3, output=PNG)
    chunks = list(stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=2)))
    assert len(chunks) == 3
    for chunk in chunks:
        assert list(chunk.provenance.used_models) == [mapping]
    path = stub.Interpolate(
        pb.InterpolateRequest(
            model=gen, start=pb.LatentPoint(seed=1), end=pb.LatentPoint(seed=2), steps=3, output=PNG
        )
    )
    assert list(path.provenance.used_models) == [mapping]


@pytest.mark.parametrize("output", [F32, PNG], ids=["tensor_f32", "png"])
def test_a_mixed_image_is_byte_identical_alone_and_inside_any_batch(
    stub: pb_grpc.GenerationServiceStub, gen: str, output: tpb.OutputOptions
) -> None:
    target = pb.StyleMix(coarse_seed=12, fine_seed=40, crossover=2, truncation_psi=0.7)
    alone = bytes(
        stub.MixStyles(pb.MixStylesRequest(model=gen, mixes=[target], output=output)).images[0].image.data
    )
    others = [
        pb.StyleMix(
            coarse_seed=s, fine_seed=s + 1, crossover=1 + s % (NUM_LAYERS - 1), truncation_psi=0.1 * s
        )
        for s in range(1, 8)
    ]
    mixed = stub.MixStyles(
        pb.MixStylesRequest(model=gen, mixes=[*others[:3], target, *others[3:]], crossover=3, output=output)
    ).images[3]
    assert mixed.image.data == alone

    def one(i: int) -> bytes:
        """Concurrent requests of other crossovers, psi and plain samples share its batches."""
        if i % 3 == 0:
            request = pb.MixStylesRequest(model=gen, mixes=[*others[i % 4 :], target], output=output)
            return bytes(stub.MixStyles(request).images[-1].image.data)
        if i % 3 == 1:
            stub.Sample(pb.SampleRequest(model=gen, seeds=[i, i + 1], truncation_psi=0.3, output=output))
        else:
            stub.MixStyles(pb.MixStylesRequest(model=gen, mixes=others, crossover=1, output=output))
        return alone

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert set(results) == {alone}


def test_interpolate_is_a_straight_line_in_w_space(stub: pb_grpc.GenerationServiceStub, gen: str) -> None:
    request = pb.InterpolateRequest(
        model=gen,
        start=pb.LatentPoint(seed=3),
        end=pb.LatentPoint(seed=8),
        steps=5,
        truncation_psi=0.8,
        output=tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32, return_latents=True),
    )
    response = stub.Interpolate(request)
    ends = truncated(w_of([3, 8]), 0.8)
    t = np.linspace(0.0, 1.0, 5)[:, np.newaxis]
    path = ((1 - t) * ends[0] + t * ends[1]).astype(np.float32)
    got_w = np.stack([np.frombuffer(g.latent.data, "<f4") for g in response.images])
    np.testing.assert_allclose(got_w, path, atol=1e-6)
    np.testing.assert_allclose(
        np.stack([tensor_of(g.image) for g in response.images]), synth(broadcast(path)), atol=1e-5
    )
    assert (response.images[0].seed, response.images[-1].seed) == (3, 8)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Interpolate(
            pb.InterpolateRequest(
                model=gen, start=request.start, end=request.end, steps=3, mode=pb.INTERPOLATION_MODE_SLERP
            )
        )
    code, details = code_and_details(excinfo)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("mode: ")


@pytest.mark.parametrize(
    ("request_kwargs", "field", "text"),
    [
        (
            {"mixes": [pb.StyleMix(coarse_seed=1, fine_seed=2, crossover=NUM_LAYERS)]},
            "mixes[0].crossover",
            f"must be in 1..{NUM_LAYERS - 1}",
        ),
        ({"mixes": [pb.StyleMix(coarse_seed=1, fine_seed=2)]}, "mixes[0].crossover", "required"),
        (
            {"mixes": [pb.StyleMix(coarse_seed=1, fine_seed=2)], "crossover": 9},
            "crossover",
            f"must be in 1..{NUM_LAYERS - 1}",
        ),
        (
            {"mixes": [pb.StyleMix(coarse_seed=-1, fine_seed=2, crossover=1)]},
            "mixes[0].coarse_seed",
            "[0, 2^63)",
        ),
        (
            {"mixes": [pb.StyleMix(coarse_seed=1, fine_seed=2, crossover=1, truncation_psi=-0.5)]},
            "mixes[0].truncation_psi",
            "[0, 10]",
        ),
        (
            {"mixes": [pb.StyleMix(coarse_seed=1, fine_seed=2, crossover=1, truncation_psi=math.nan)]},
            "mixes[0].truncation_psi",
            "not a number (NaN); must be in [0, 10]",
        ),
        ({"mixes": []}, "mixes", ""),
    ],
)
def test_bad_mixes_are_invalid_argument_naming_the_field(
    stub: pb_grpc.GenerationServiceStub, gen: str, request_kwargs: dict[str, object], field: str, text: str
) -> None:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.MixStyles(pb.MixStylesRequest(model=gen, **request_kwargs))  # type: ignore[arg-type]
    code, details = code_and_details(excinfo)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}: ") and text in details, details


def test_model_info_and_a_mapping_that_does_not_fit(
    stub: pb_grpc.GenerationServiceStub, style_server: tuple[ServerProcess, dict[str, str]]
) -> None:
    names = style_server[1]
    info = stub.GetModel(pb.GetModelRequest(name=names["generator"]))
    assert (info.kind, info.w_dim, info.num_layers, info.latent_dim) == (
        "style_generator",
        W_DIM,
        NUM_LAYERS,
        STYLE_LATENT,
    )
    assert list(info.output_shape) == [1, 8, 8]
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.MixStyles(
            pb.MixStylesRequest(
                model=names["mapping"], mixes=[pb.StyleMix(coarse_seed=1, fine_seed=2, crossover=1)]
            )
        )
    code, details = code_and_details(excinfo)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("model: ")
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.Sample(pb.SampleRequest(model=names["misfit"], seeds=[1]))
    code, details = code_and_details(excinfo)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "w_dim 7" in details and "config.json mapping" in details, details
    # GetModel says so too: the version loaded (READY) and its mapping may be fixed on its own, but an
    # operator reading it saw no reason while every request failed.
    misfit = stub.GetModel(pb.GetModelRequest(name=names["misfit"])).versions[0]
    assert misfit.state == pb.MODEL_STATE_READY
    assert misfit.reason.startswith("every request fails: its mapping ") and "w_dim 7" in misfit.reason
    assert stub.GetModel(pb.GetModelRequest(name=names["generator"])).versions[0].reason == ""
    unmapped = stub.GetModel(pb.GetModelRequest(name=names["unmapped"]))
    assert unmapped.versions[0].state == pb.MODEL_STATE_UNAVAILABLE
    assert "config.json: mapping is required for kind style_generator" in unmapped.versions[0].reason


def test_kserve_model_config_of_a_style_kind_admits_no_model_infer_rows(
    style_server: tuple[ServerProcess, dict[str, str]],
) -> None:
    """ModelInfer refuses the style kinds (genserve.v1 serves them), so their ModelConfig offers no
    rows and no dynamic batching: max_batch_size 0, dims then the whole shapes as Triton reads them,
    those of ModelMetadata. It said the generator's config.json batch limit, which a KServe client
    read as the rows ModelInfer takes."""
    server, names = style_server
    with grpc.insecure_channel(server.target) as channel:
        kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
        for name in (names["generator"], names["mapping"]):
            config = kstub.ModelConfig(kpb.ModelConfigRequest(name=name), timeout=10).config
            metadata = kstub.ModelMetadata(kpb.ModelMetadataRequest(name=name), timeout=10)
            assert config.max_batch_size == 0, name
            assert config.WhichOneof("scheduling_choice") is None, name
            shapes = {t.name: list(t.shape) for t in [*metadata.inputs, *metadata.outputs]}
            assert {t.name: list(t.dims) for t in [*config.input, *config.output]} == shapes, name
            assert kstub.ModelReady(kpb.ModelReadyRequest(name=name), timeout=10).ready
            first = metadata.inputs[0]
            request = kpb.ModelInferRequest(
                model_name=name,
                inputs=[
                    kpb.ModelInferRequest.InferInputTensor(
                        name=first.name, datatype=first.datatype, shape=[1, *first.shape[1:]]
                    )
                ],
            )
            with pytest.raises(grpc.RpcError) as excinfo:
                kstub.ModelInfer(request, timeout=10)
            code, details = code_and_details(excinfo)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "genserve.v1 " in details, details


def test_card_rules_of_the_style_kinds_name_the_field(tmp_path: Path) -> None:
    base = {
        "name": "s",
        "version": "1",
        "kind": "style_generator",
        "latent_dim": 8,
        "w_dim": 3,
        "num_layers": 4,
        "w_avg": [0.0, 1.0, 2.0],
        "image_size": [8, 8],
        "output_range": [-1, 1],
        "inputs": [{"name": "ws", "dtype": "float32", "shape": [-1, 4, 3]}],
        "outputs": [{"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8]}],
    }
    path = tmp_path / "card.json"
    path.write_text(json.dumps(base))
    assert load_card(path).w_avg == (0.0, 1.0, 2.0)
    for change, field in (
        ({"w_avg": [0.0, 1.0]}, "w_avg"),
        ({"w_avg": None}, "w_avg"),
        ({"num_layers": 1}, "num_layers"),
        ({"w_dim": None}, "w_dim"),
        ({"latent_dim": None}, "latent_dim"),
    ):
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError) as excinfo:
            load_card(path)
        assert excinfo.value.field == field, str(excinfo.value)


def test_a_bulk_call_keeps_the_mapping_it_resolved_through_a_reload(tmp_path: Path) -> None:
    """A BULK Sample on a style generator resolves its mapping, then waits for room in the mapping's
    bulk share; a reload that publishes a new mapping version meanwhile drains the old one only after
    the call (it failed with UNAVAILABLE "... is draining": the drain closed the batcher under it)."""
    names = write_style_models(tmp_path)

    async def main() -> None:
        config = ServerConfig()
        metrics = Metrics(enabled=False)
        repo = Repository(tmp_path, config, metrics)
        repo.scan()
        await repo.load_all()
        pool = ThreadPoolExecutor(1)
        core = GenerationCore(repo, config, metrics, pool)
        reloader = Reloader(repo, drain_grace_s=30)
        out = validate.output_spec(tpb.IMAGE_FORMAT_PNG, 0, None, False)

        async def until(predicate: Callable[[], bool]) -> None:
            while not predicate():
                await asyncio.sleep(0)

        async def sample(lane: Lane) -> list[bytes]:
            call = Call("Sample", "test", time.monotonic(), metrics.unresolved())
            mv = core.resolve(call, names["generator"], "", ("style_generator",), "Sample")
            try:
                generated = await core.generate(mv, call, None, out, lane, seeds=[1, 2])
                return [image.data for image in generated.images]
            finally:
                if call.batcher is not None:
                    call.batcher.release()
                call.release_uses()

        try:
            expected = await sample(Lane.INTERACTIVE)
            old = repo.get(names["mapping"]).resolve("")
            batcher = old.batcher
            assert batcher is not None
            # The mapping's bulk share full behind a batch that cannot finish until `go`.
            go = asyncio.Event()
            run_bulk = batcher._run_bulk_batch

            async def gated(key: Any, inputs: Any) -> Any:
                await go.wait()
                return await run_bulk(key, inputs)

            batcher._run_bulk_batch = gated
            share = batcher.max_queue_size // 2

            def rows(n: int) -> asyncio.Future[Any]:
                z = {"z": np.zeros((n, STYLE_LATENT), np.float32)}
                return asyncio.ensure_future(batcher.submit(LatentRows(), z, n, lane=Lane.BULK))

            running_batch = rows(1)
            await until(lambda: batcher._batches_in_flight == 1)
            queued = rows(share)
            await until(lambda: batcher._bulk_rows == share)
            running = asyncio.ensure_future(sample(Lane.BULK))
            await until(lambda: len(batcher._bulk_line) == 1)  # resolved the mapping; waits for room
            shutil.copytree(tmp_path / names["mapping"] / "1", tmp_path / names["mapping"] / "2")
            report = await reloader.rescan()
            assert report.retired == [old.label]
            model = repo.get(names["mapping"])
            await until(lambda: not batcher._released.is_set() or batcher._closing)  # held, or closing
            go.set()
            assert await running == expected
            await asyncio.gather(running_batch, queued)
            await reloader.close(10)
            assert "1" not in model.versions  # released at the call's end: drained and unloaded
        finally:
            await reloader.close(1)
            await repo.close(1)
            pool.shutdown()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_provenance_names_the_card_a_style_generators_images_were_made_with(tmp_path: Path) -> None:
    """A style generator's card.json is part of what makes its images (w_avg, which truncation pulls
    toward; output_range; a tiler's defaults): two versions whose graphs are the same bytes and whose
    cards differ in w_avg alone give a seed different images, so their provenance must tell them
    apart. Provenance, its UsedModel (the mapping) and GetModel carry card_sha256, the sha256 of the
    card.json bytes each version loaded."""
    import hashlib

    root = tmp_path / "models"
    names = write_style_models(root)
    half = "style-gen-half"
    shutil.copytree(root / names["generator"], root / half)
    card_path = root / half / "1" / "card.json"
    card = json.loads(card_path.read_text())
    card["w_avg"] = [v / 2 for v in card["w_avg"]]
    card_path.write_text(json.dumps(card, indent=2))

    def card_sha256(model: str) -> str:
        return hashlib.sha256((root / model / "1" / "card.json").read_bytes()).hexdigest()

    with (
        fails_within(60),
        running_server(
            root, tmp_path / "work", extra_args=healthy_models(root, (names["unmapped"],))
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GenerationServiceStub(channel)
        answers = {
            model: stub.Sample(pb.SampleRequest(model=model, seeds=[7], truncation_psi=0.5, output=F32))
            for model in (names["generator"], half)
        }
        full, halved = (answers[m] for m in (names["generator"], half))
        assert full.images[0].image.data != halved.images[0].image.data  # the card changed the image
        assert full.provenance.model_sha256 == halved.provenance.model_sha256  # not the graph
        for model, answer in answers.items():
            assert answer.provenance.card_sha256 == card_sha256(model)
            (mapping,) = answer.provenance.used_models
            assert mapping.card_sha256 == card_sha256(names["mapping"])
            (version,) = stub.GetModel(pb.GetModelRequest(name=model)).versions
            assert version.card_sha256 == card_sha256(model)
        assert full.provenance.card_sha256 != halved.provenance.card_sha256
        stream = pb.SampleStreamRequest(
            sample=pb.SampleRequest(model=half, count=1, base_seed=7, truncation_psi=0.5, output=F32)
        )
        (chunk,) = stub.SampleStream(stream)
        assert chunk.provenance.card_sha256 == card_sha256(half)
