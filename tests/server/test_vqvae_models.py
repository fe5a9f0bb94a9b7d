"""The trained VQ-VAE-2 digit models of models/ (recipe vqvae-digits) in a real server on 127.0.0.1:
SampleCodes on the bottom prior samples the top grid, then the bottom grid, and decodes digits that the
separate digits classifier reads as the requested classes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_support import ServerProcess, running_server, tensor_of

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb

MODELS = Path(__file__).resolve().parents[2] / "models"
DECODER, TOP_PRIOR, PRIOR = "vqvae-digits-decoder", "vqvae-digits-top-prior", "vqvae-digits-prior"
ENTRIES = (DECODER, TOP_PRIOR, PRIOR)
MISSING = [name for name in ENTRIES if not (MODELS / name / "config.json").is_file()]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"models/ lacks {', '.join(MISSING)} (genserve-export build-defaults --only vqvae-digits)",
)
F32 = tpb.OutputOptions(format=tpb.IMAGE_FORMAT_TENSOR_F32)


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.GenerationServiceStub]:
    # Only the three entries: the whole default repository loads photo models for minutes.
    root = tmp_path_factory.mktemp("vqvae-models")
    for name in ENTRIES:
        shutil.copytree(MODELS / name, root / name)
    server: ServerProcess
    with running_server(root, tmp_path_factory.mktemp("vqvae-server"), timeout_s=120) as server:
        with grpc.insecure_channel(server.target) as channel:
            yield pb_grpc.GenerationServiceStub(channel)


def _images(response: pb.SampleCodesResponse) -> np.ndarray:
    return np.stack([tensor_of(g.image) for g in response.images])


def test_sample_codes_gives_digits_of_the_requested_classes(stub: pb_grpc.GenerationServiceStub) -> None:
    digits = pytest.importorskip("genserve_export.data.digits", reason="the digits classifier is in export/")
    if not digits.available():
        pytest.skip("MNIST not fetched (make mnist-data): the digits classifier trains on it")
    from genserve_export.quality.digits_classifier import classifier

    labels = list(range(10))
    seeds = [11, 12, 13]
    requests = [
        pb.SampleCodesRequest(model=PRIOR, seeds=seeds, labels=[label], output=F32, return_codes=True)
        for label in labels
    ]
    responses = [stub.SampleCodes(r, timeout=120) for r in requests]
    images = np.concatenate([_images(r) for r in responses])
    assert images.shape == (30, 1, 28, 28)
    assert 0.0 <= images.min() and images.max() <= 1.0
    first = responses[0]
    assert [tuple(t.shape) for t in first.top_codes] == [(7, 7)] * 3  # both levels in one call
    assert [tuple(t.shape) for t in first.codes] == [(14, 14)] * 3
    answers = classifier().probabilities(images.astype(np.float32)).argmax(axis=1)
    requested = np.repeat(labels, len(seeds))
    accuracy = float((answers == requested).mean())
    # A plain request (no temperature): the priors' config.json default, the setting the card scores
    # (300 samples against the 0.9 bar); seeded, so the same 30 digits every run.
    assert accuracy >= 0.8, (accuracy, answers.tolist())


def test_a_plain_request_is_sampled_at_the_cards_temperature(stub: pb_grpc.GenerationServiceStub) -> None:
    card = json.loads((MODELS / DECODER / "1" / "card.json").read_text())
    at = card["quality"]["sampling_temperature"]
    plain = stub.SampleCodes(
        pb.SampleCodesRequest(model=PRIOR, seeds=[7], labels=[4], output=F32), timeout=60
    )
    asked = stub.SampleCodes(
        pb.SampleCodesRequest(model=PRIOR, seeds=[7], labels=[4], temperature=at, output=F32), timeout=60
    )
    assert plain.images[0].image.data == asked.images[0].image.data


def test_the_top_prior_alone_and_a_given_top_grid_reproduce_the_chained_call(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    chained = stub.SampleCodes(
        pb.SampleCodesRequest(model=PRIOR, seeds=[5], labels=[3], output=F32, return_codes=True), timeout=60
    )
    top = stub.SampleCodes(
        pb.SampleCodesRequest(model=TOP_PRIOR, seeds=[5], labels=[3], return_codes=True), timeout=60
    )
    assert not top.images  # a top prior names no decoder: grids only
    assert top.codes[0].SerializeToString() == chained.top_codes[0].SerializeToString()
    given = stub.SampleCodes(
        pb.SampleCodesRequest(model=PRIOR, seeds=[5], labels=[3], top_codes=top.codes[0], output=F32),
        timeout=60,
    )
    assert given.images[0].image.data == chained.images[0].image.data


def test_a_unary_sample_codes_refuses_preview_every_which_only_its_stream_uses(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """preview_every is documented "SampleCodesStream only"; the unary call took any value and
    dropped it silently (as SuperResolve refuses return_latents and Translate tile_size, it names it)."""
    request = pb.SampleCodesRequest(model=PRIOR, seeds=[1], labels=[3], output=F32, preview_every=4)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.SampleCodes(request, timeout=60)
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "preview_every" in err.details() and "SampleCodesStream" in err.details(), err.details()
    request.preview_every = 0
    assert len(stub.SampleCodes(request, timeout=60).images) == 1


def test_a_stream_refuses_a_preview_every_that_would_send_no_progress_chunk(
    stub: pb_grpc.GenerationServiceStub,
) -> None:
    """preview_every took 0..positions, but a level sends a chunk at each multiple short of its last
    step: at the prior's 196 positions the stream sent no chunk at either level, the result alone,
    which a client asking for progress cannot tell from a stuck call. INVALID_ARGUMENT naming the
    field and the largest value that still gives one (and SampleCodes for no progress)."""
    grid = json.loads((MODELS / PRIOR / "1" / "card.json").read_text())["grid"]
    positions = grid[0] * grid[1]
    request = pb.SampleCodesRequest(model=PRIOR, seeds=[1], labels=[3], output=F32, preview_every=positions)
    with pytest.raises(grpc.RpcError) as excinfo:
        list(stub.SampleCodesStream(request, timeout=60))
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    details = err.details() or ""
    assert details.startswith("preview_every: ") and f"0..{positions - 1}" in details, details
    assert "SampleCodes" in details, details
    request.preview_every = positions - 1  # the largest useful value: one `codes` chunk, then the result
    chunks = list(stub.SampleCodesStream(request, timeout=60))
    assert [(c.level, c.filled) for c in chunks[:-1]] == [("codes", positions - 1)]
    assert chunks[-1].HasField("result") and len(chunks[-1].result.images) == 1
