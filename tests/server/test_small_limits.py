"""Limits an operator may lower, against each other: a model's queue below a request's rows, the
server's max_images_per_request below a prior's row budget, the server's default queue below a
model's batch. Each request that can never succeed must say so naming its field and the limit (never
an unnamed 'split it into smaller requests', never a RESOURCE_EXHAUSTED a client retries forever),
and the CLI must send calls within what ModelInfo advertises."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from client_fakes import cli_main
from code_models import decoder_graph, prior_graph, write_code_models
from PIL import Image
from server_support import (
    TINY_LATENT,
    ServerProcess,
    generator_graph,
    image_to_image_graph,
    start_server,
    vae_decoder_graph,
    write_model,
    write_vae_encoder,
)
from translator_models import translator_card, two_way_graph

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_server.config import ConfigError, Kind, load_model_config

SERVER_LIMIT = 6  # the server's max_images_per_request here
STREAM_LIMIT = 24  # its max_stream_images: below bulk's default of 1,024 images per stream
QUEUE_4 = {"max_batch_size": 4, "max_queue_delay_ms": 1.0, "max_queue_size": 4}
# The server's limits.default_max_queue_size here: the default batch (64) still fits it.
DEFAULT_QUEUE = 64


def _set_batching(root: Path, name: str, batching: dict[str, Any]) -> None:
    path = root / name / "config.json"
    config = json.loads(path.read_text())
    config["batching"] = batching
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("limits-models")
    write_model(
        root, "tr", "two_way_translator", two_way_graph(), translator_card(), config={"batching": QUEUE_4}
    )
    write_model(
        root,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 4},
    )
    # A prior whose row budget (8) is above the server's limit (6); decoder queue 64.
    write_code_models(root)
    # The same, with a decoder whose queue holds 4 (below both).
    q = write_code_models(root, prefix="q-")
    _set_batching(root, q["decoder"], QUEUE_4)
    _set_batching(root, q["top"], QUEUE_4)  # q-chain-prior's top prior: a row budget of 4
    # Priors sampled step by step, never queued: one whose own queue is below its row budget, and
    # one whose row budget is above the server's default queue (its config.json sets none).
    prior_card = {"grid": [6, 6], "codebook_size": 16, "output_range": None}
    for name, batching in (
        ("small-queue-prior", {"max_batch_size": 8, "max_queue_size": 2}),
        ("big-budget-prior", {"max_batch_size": 2 * DEFAULT_QUEUE}),
    ):
        config = {"decoder": "codes-decoder", "batching": batching}
        write_model(root, name, "code_prior", prior_graph(6, 6, 16), prior_card, config=config)
    # A prior without a top_grid whose config.json names a top_prior (of a row budget of 4): no
    # request calls it (it samples no top grids), so its row budget bounds none.
    config = {"decoder": "codes-decoder", "top_prior": q["top"]}
    write_model(root, "stray-top-prior", "code_prior", prior_graph(6, 6, 16), prior_card, config=config)
    # A decoder whose queue (5) is above its batch (2) and below the rest: a prior's limit is the queue.
    decoder_card = {
        "grid": [6, 6],
        "codebook_size": 16,
        "image_size": [6, 6],
        "channels": 1,
        "output_range": [0.0, 1.0],
    }
    wide_queue = {"max_batch_size": 2, "max_queue_delay_ms": 1.0, "max_queue_size": 5}
    write_model(
        root,
        "wq-decoder",
        "code_decoder",
        decoder_graph(6, 6, 16),
        decoder_card,
        config={"batching": wide_queue},
    )
    config = {"decoder": "wq-decoder"}
    write_model(root, "wq-prior", "code_prior", prior_graph(6, 6, 16), prior_card, config=config)
    write_model(
        root,
        "v-dec",
        "vae_decoder",
        vae_decoder_graph(8, 8, 8),
        {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [0.0, 1.0]},
        config={"batching": QUEUE_4},
    )
    write_vae_encoder(root, "v-enc")
    write_model(
        root,
        "g4",
        "generator",
        generator_graph(TINY_LATENT, 1, 8, 8),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": QUEUE_4},
    )
    proc = start_server(
        root,
        tmp_path_factory.mktemp("limits-server"),
        config={
            "limits": {
                "max_images_per_request": SERVER_LIMIT,
                "default_max_queue_size": DEFAULT_QUEUE,
                "max_stream_images": STREAM_LIMIT,
            }
        },
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GenerationServiceStub(channel)


def _gray(side: int) -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(side * side), shape=[side, side, 1])


def _rgb(side: int) -> tpb.Image:
    return tpb.Image(format=tpb.IMAGE_FORMAT_RAW_UINT8, data=bytes(3 * side * side), shape=[side, side, 3])


def _refusal(call: Any, request: Any) -> grpc.Call:
    with pytest.raises(grpc.RpcError) as excinfo:
        call(request, timeout=30)
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err


# ---------------------------------------------------------------------------- Translate


@pytest.mark.parametrize(
    "images",
    [
        [8] * 5,  # one shape: one request of 5 rows to a queue of 4
        [8] * 3 + [16] * 2,  # two shapes: 3 + 2 rows, two requests to a queue of 4
    ],
)
def test_translate_of_more_images_than_the_translators_queue_names_images_and_the_queue(
    stub: pb_grpc.GenerationServiceStub, images: list[int]
) -> None:
    # Was INVALID_ARGUMENT "the request needs 5 items ... split it into smaller requests" (one
    # shape), or RESOURCE_EXHAUSTED "queue full ... retry with backoff" on an idle server (two
    # shapes: the second bucket never fits beside the first), which clients retry forever.
    err = _refusal(stub.Translate, pb.ImageRequest(model="tr", images=[_gray(s) for s in images]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "images: must have 1..4 images (tr's batching.max_queue_size), got 5"
    # Four images (both shapes) are served.
    four = pb.ImageRequest(model="tr", images=[_gray(s) for s in images[1:]])
    assert len(stub.Translate(four, timeout=30).images) == 4


def test_an_image_count_above_max_images_per_image_request_names_the_limit(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # "images: must have 1..16 images, got 17" named no limit.
    err = _refusal(stub.Translate, pb.ImageRequest(model="i2i", images=[_rgb(8)] * 17))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "images: must have 1..16 images (max_images_per_image_request), got 17"


def test_a_decode_of_more_latents_than_the_decoders_queue_names_the_latents_and_the_queue(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # The rows are in the decoder's queue at once: 5 never fit a queue of 4, refused up front by
    # name, not found full (RESOURCE_EXHAUSTED 'retry with backoff') on every retry.
    z = np.zeros((5, 8), "<f4")
    latents = tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.tobytes())
    err = _refusal(stub.Decode, pb.DecodeRequest(model="v-dec", latents=latents))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "latents.shape[0]: must be in 1..4 (v-dec's batching.max_queue_size), got 5"


# ---------------------------------------------------------------------------- SampleCodes


@pytest.mark.parametrize("rpc", ["SampleCodes", "SampleCodesStream"])
def test_sample_codes_above_its_decoders_queue_names_count_and_the_decoders_queue(
    stub: pb_grpc.GenerationServiceStub, rpc: str
) -> None:
    # The grids of 5 samples were computed, then their decode failed with "model q-codes-decoder
    # version 1: the request needs 5 items ... split it into smaller requests", naming no field.
    request = pb.SampleCodesRequest(model="q-prior", count=5, labels=[0], base_seed=1)
    if rpc == "SampleCodes":
        err = _refusal(stub.SampleCodes, request)
    else:
        err = _refusal(lambda r, timeout: list(stub.SampleCodesStream(r, timeout=timeout)), request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "count: must be in 1..4 (q-codes-decoder's batching.max_queue_size), got 5"
    request.count = 4
    assert len(stub.SampleCodes(request, timeout=30).images) == 4


def test_a_count_of_0_without_seeds_says_what_else_gives_the_count(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # count may be 0 where seeds (or Sample's latents) give it: the refusal of count 0 alone said
    # only 'count: must be in 1..4', as if 0 were never allowed.
    err = _refusal(stub.Sample, pb.SampleRequest(model="g4"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("count: must be in 1..4"), err.details()
    assert "seeds or latents" in err.details(), err.details()
    err = _refusal(stub.SampleCodes, pb.SampleCodesRequest(model="q-prior", labels=[0]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("count: must be in 1..4"), err.details()
    assert "seeds" in err.details() and "latents" not in err.details(), err.details()


def test_a_sample_codes_stream_with_previews_is_not_refused_for_its_own_decodes(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # A preview's decode and the result's ran side by side: 4 + 4 rows in the decoder's queue of 4,
    # and the second was refused 'queue full ... retry with backoff' on an idle server (17 of 40
    # streams of 4 samples with a preview every step).
    for seed in range(20):
        request = pb.SampleCodesRequest(model="q-prior", count=4, labels=[0], base_seed=seed, preview_every=1)
        chunks = list(stub.SampleCodesStream(request, timeout=30))
        assert len(chunks[-1].result.images) == 4


def test_model_info_says_how_many_samples_a_sample_codes_may_ask_for(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # The smallest of the server's limit, the row budget and the decoder's queue; was 0, so the CLI
    # could only guess from max_batch_size (the row budget).
    assert stub.GetModel(pb.GetModelRequest(name="prior")).max_images_per_request == SERVER_LIMIT
    assert stub.GetModel(pb.GetModelRequest(name="q-prior")).max_images_per_request == 4
    assert stub.GetModel(pb.GetModelRequest(name="top-prior")).max_images_per_request == SERVER_LIMIT


def test_model_info_of_a_prior_bounds_its_samples_by_its_decoders_queue_not_its_batch(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # A request's grids go to the decoder in one request, split into batches there: 5 fit its queue
    # of 5 though its batch is 2, and 6 do not.
    assert stub.GetModel(pb.GetModelRequest(name="wq-prior")).max_images_per_request == 5
    reply = stub.SampleCodes(pb.SampleCodesRequest(model="wq-prior", count=5, base_seed=1), timeout=30)
    assert len(reply.images) == 5
    err = _refusal(stub.SampleCodes, pb.SampleCodesRequest(model="wq-prior", count=6, base_seed=1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "wq-decoder's batching.max_queue_size" in (err.details() or "")


@pytest.mark.parametrize("prior", ["small-queue-prior", "big-budget-prior"])
def test_a_code_prior_serves_whatever_its_own_queue_size_since_it_is_never_queued(
    stub: pb_grpc.GenerationServiceStub, prior: str
) -> None:
    # A prior's max_queue_size (its config.json's, or the server's default) below its row budget
    # made the version UNAVAILABLE at load ('batching.max_queue_size must be >= batching.
    # max_batch_size'), though a prior is sampled step by step (its row budget) and never queued.
    info = stub.GetModel(pb.GetModelRequest(name=prior))
    # Bounded by the server's limit, the row budget and the decoder's queue (64), not its own queue.
    assert info.max_images_per_request == SERVER_LIMIT
    request = pb.SampleCodesRequest(model=prior, count=SERVER_LIMIT, base_seed=1)
    assert len(stub.SampleCodes(request, timeout=30).images) == SERVER_LIMIT


def test_model_info_of_a_prior_without_a_top_grid_ignores_the_top_prior_its_config_names(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # GetModel counted q-top-prior's row budget (4), though a SampleCodes of 6 samples is served.
    info = stub.GetModel(pb.GetModelRequest(name="stray-top-prior"))
    assert info.max_images_per_request == SERVER_LIMIT
    request = pb.SampleCodesRequest(model="stray-top-prior", count=SERVER_LIMIT, base_seed=1)
    assert len(stub.SampleCodes(request, timeout=30).images) == SERVER_LIMIT


def test_sample_codes_above_its_top_priors_row_budget_names_count_and_that_budget(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # Was refused only once the top level began, naming 'seeds' for a request that gave a count.
    request = pb.SampleCodesRequest(model="q-chain-prior", count=5, base_seed=1)
    err = _refusal(stub.SampleCodes, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "count: must be in 1..4 (q-top-prior's row budget, batching.max_batch_size), got 5"
    )
    assert stub.GetModel(pb.GetModelRequest(name="q-chain-prior")).max_images_per_request == 4
    request.count = 4
    assert len(stub.SampleCodes(request, timeout=30).images) == 4


def test_the_cli_samples_a_code_prior_in_calls_within_the_servers_limit(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CLI sent calls of the row budget (8, ModelInfo.max_batch_size), above the server's
    # max_images_per_request (6): 'count: must be in 1..6'.
    out = tmp_path / "out"
    args = ("--target", server.target, "sample", "--model", "prior", "--n", "10", "--seed", "1")
    code, _, err = cli_main(capsys, *args, "--label", "0", "--out", str(out))
    assert code == 0, err
    assert len(list(out.glob("*.png"))) == 10


# ---------------------------------------------------------------------------- SampleStream


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_an_interactive_stream_is_not_refused_for_its_own_chunks_ahead(
    stub: pb_grpc.GenerationServiceStub, chunk_size: int
) -> None:
    # An INTERACTIVE stream's chunks go to the queue like unary requests (refused at once when it
    # is full), and it kept 3 chunks in it (the one being sent and 2 ahead): on an idle server its
    # second chunk of 4 (or third of 2) found the queue of 4 full of its own rows and the stream
    # ended RESOURCE_EXHAUSTED 'queue full ... retry with backoff', on every retry.
    sample = pb.SampleRequest(model="g4", count=20, base_seed=5, priority=tpb.PRIORITY_INTERACTIVE)
    chunks = stub.SampleStream(pb.SampleStreamRequest(sample=sample, chunk_size=chunk_size), timeout=30)
    assert [g.index for c in chunks for g in c.images] == list(range(20))


def test_model_info_says_how_many_images_a_sample_stream_may_send(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # max_stream_images was nowhere in ModelInfo: a client could only find it by being refused.
    assert stub.GetModel(pb.GetModelRequest(name="g4")).max_stream_images == STREAM_LIMIT
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert listed["g4"].max_stream_images == STREAM_LIMIT
    assert listed["v-dec"].max_stream_images == STREAM_LIMIT  # a VAE decoder samples its prior
    assert listed["i2i"].max_stream_images == 0  # not a model SampleStream takes


def test_max_stream_images_bounds_the_images_a_stream_sends_not_its_last_index(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    # A stream sends images [start_index, count): one resumed (or a bulk job's later stream) at
    # index 100 of 110 sends 10 images, and was refused 'sample.count: must be in 1..24'.
    sample = pb.SampleRequest(model="g4", count=100 + 10, base_seed=5)
    chunks = stub.SampleStream(pb.SampleStreamRequest(sample=sample, start_index=100), timeout=30)
    assert [g.index for c in chunks for g in c.images] == list(range(100, 110))
    sample.count = 100 + STREAM_LIMIT + 1
    request = pb.SampleStreamRequest(sample=sample, start_index=100)
    err = _refusal(lambda r, timeout: list(stub.SampleStream(r, timeout=timeout)), request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_stream_images" in (err.details() or "") and str(STREAM_LIMIT) in (err.details() or "")


def test_a_bulk_job_adapts_its_streams_to_the_servers_max_stream_images(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job's one stream of 60 images (default --stream-images 1,024) was refused 'sample.count:
    # must be in 1..24 (max_stream_images)', and so was every stream ending past index 24 whatever
    # --stream-images the user tried.
    out = tmp_path / "job"
    args = ("--target", server.target, "bulk", "--model", "g4", "--n", "60", "--seed", "3")
    code, _, err = cli_main(capsys, *args, "--out", str(out))
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 60


def test_a_bulk_job_refuses_stream_images_above_max_stream_images_before_any_stream(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "job"
    args = ("--target", server.target, "bulk", "--model", "g4", "--n", "60", "--out", str(out))
    code, _, err = cli_main(capsys, *args, "--stream-images", str(STREAM_LIMIT + 1))
    assert code == 2
    assert f"--stream-images {STREAM_LIMIT + 1}" in err and f"max_stream_images {STREAM_LIMIT}" in err
    assert not (out / "job.json").exists() and not list(out.glob("images/*.png"))
    # Its own limit is accepted.
    code, _, err = cli_main(capsys, *args, "--stream-images", str(STREAM_LIMIT))
    assert code == 0, err
    assert len(list((out / "images").glob("*.png"))) == 60


# ---------------------------------------------------------------------------- CLI edit / arithmetic


def test_the_cli_edit_sweep_decodes_in_calls_the_decoder_holds(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The sweep's latents went out in calls of 256 (the server's default limit): a decoder whose
    # queue holds 4 refused the sweep of 6.
    picture = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(picture)
    grid = tmp_path / "sweep.png"
    args = ("--target", server.target, "edit", str(picture), "--model", "v-enc")
    code, _, err = cli_main(capsys, *args, "--sweep", "--sweep-steps", "6", "--dim", "0", "--out", str(grid))
    assert code == 0, err
    assert grid.exists()


def test_the_cli_arithmetic_samples_its_members_in_calls_the_model_holds(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The 6 member seeds went out in one Sample of 6 to a model whose queue holds 4.
    grid = tmp_path / "arith.png"
    args = ("--target", server.target, "arithmetic", "--model", "g4", "--grid", str(grid))
    code, _, err = cli_main(capsys, *args, "--a", "1,2", "--b", "3,4", "--c", "5,6")
    assert code == 0, err
    with Image.open(io.BytesIO(grid.read_bytes())) as picture:
        assert picture.width > 0


# ---------------------------------------------------------------------------- config at load


def test_a_server_default_queue_below_a_models_batch_names_the_server_limit(tmp_path: Path) -> None:
    # config.json sets no max_queue_size: the server's limits.default_max_queue_size (16) applies,
    # and the refusal named only config.json's batching.max_queue_size, a field the file lacks.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "generator", "batching": {"max_batch_size": 64}}))
    with pytest.raises(ConfigError) as excinfo:
        load_model_config(path, default_max_queue_size=16)
    message = str(excinfo.value)
    assert "limits.default_max_queue_size" in message
    assert "64" in message and "16" in message
    # Given in config.json, the message stays about config.json's field.
    path.write_text(
        json.dumps({"kind": "generator", "batching": {"max_batch_size": 64, "max_queue_size": 16}})
    )
    with pytest.raises(ConfigError) as excinfo:
        load_model_config(path, default_max_queue_size=1024)
    assert "default_max_queue_size" not in str(excinfo.value)


def test_a_code_priors_queue_size_is_not_checked_against_its_row_budget(tmp_path: Path) -> None:
    # A prior is never queued: its max_queue_size (given, or the server's default) does not apply.
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({"kind": "code_prior", "batching": {"max_batch_size": 64, "max_queue_size": 8}})
    )
    assert load_model_config(path).batching.max_batch_size == 64
    path.write_text(json.dumps({"kind": "code_prior", "batching": {"max_batch_size": 64}}))
    assert load_model_config(path, default_max_queue_size=16).batching.max_batch_size == 64


@pytest.mark.parametrize("kind", [k for k in Kind if k != Kind.CODE_PRIOR])
def test_every_queued_kinds_queue_size_must_hold_its_batch(tmp_path: Path, kind: Kind) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": kind.value, "batching": {"max_batch_size": 64, "max_queue_size": 8}}))
    with pytest.raises(ConfigError) as excinfo:
        load_model_config(path)
    assert str(excinfo.value) == (
        f"{path}: batching.max_queue_size must be >= batching.max_batch_size (64), got 8"
    )
    path.write_text(json.dumps({"kind": kind.value, "batching": {"max_batch_size": 64}}))
    with pytest.raises(ConfigError, match="limits.default_max_queue_size"):
        load_model_config(path, default_max_queue_size=16)


def test_a_code_priors_bulk_budgets_are_not_checked_against_each_other(tmp_path: Path) -> None:
    # Bulk budgets cut a batcher's BULK batches; a prior has none (step-level batching), yet its
    # config.json was refused for a bulk budget above its idle budget.
    budgets = {"bulk_budget_s": 0.08, "bulk_idle_budget_s": 0.05}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "code_prior", "batching": budgets}))
    assert load_model_config(path).batching.bulk_budget_s == pytest.approx(0.08)
    path.write_text(json.dumps({"kind": "code_decoder", "batching": budgets}))
    with pytest.raises(ConfigError, match=r"batching.bulk_budget_s must be <= batching.bulk_idle_budget_s"):
        load_model_config(path)
