"""The CycleGAN recipe (cyclegan-digits), quickly: a few training steps, one two_way_translator graph
exported through ``export_model`` (both generators behind an ONNX If, parity in both directions,
card ``domains``), the recipe's quality figures recomputed from the ONNX graph, and a real server
translating both ways. Never a real training run, and never the real MNIST: domain B is a tiny
synthetic stand-in (200 images), so the held-out figures cost seconds, not a minute."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from server_support import F32, running_server, tensor_of

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_export import export_model
from genserve_export.card import validate_card
from genserve_export.data import digits
from genserve_export.recipes import cyclegan_digits as cg

STEPS = 3  # smoke only: the recipe is never trained by the tests


@pytest.fixture(scope="module", autouse=True)
def synthetic_mnist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 200-image stand-in for the MNIST cache (domain B), 20 a class."""
    folder = tmp_path_factory.mktemp("data") / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    pixels = (rng.random((len(labels), 28 * 28)) ** 4 * 255).astype(np.uint8)
    np.savez_compressed(folder / digits.ARRAY_FILE, pixels=pixels, labels=labels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENSERVE_DATA_DIR", str(folder.parent))
        assert digits.load().holdout_images.shape == (40, 1, 28, 28)
        yield folder


def _run(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(feeds: Any) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))

    return run


def test_domain_a_is_framed_like_mnist() -> None:
    framed = cg.frame_sk_digits(np.full((2, 8, 8), 16.0))
    assert framed.shape == (2, 1, 28, 28) and framed.dtype == np.float32
    assert framed[:, :, :4].max() == 0 and framed[:, :, 24:].max() == 0  # a 4-pixel empty margin
    assert framed[:, :, 4:24, 4:24].min() > 0.99


def test_semantic_classifiers_are_not_verifys() -> None:
    # The semantic term's classifiers must differ from the scoring ones (the card says so).
    net_a, net_b = cg.semantic_classifiers(epochs=1, max_batches=2)
    scoring = cg.digits_classifier.cnn()
    for net in (net_a, net_b):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
        assert [tuple(p.shape) for p in net.parameters()] != [tuple(p.shape) for p in scoring.parameters()]
    assert net_a(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_domain_a_classifier_weights_are_kept_and_reloaded(synthetic_mnist: Path) -> None:
    cg.domain_a_classifier.cache_clear()  # fitted here, into this test's data folder
    net, accuracy = cg.domain_a_classifier()
    (kept,) = synthetic_mnist.parent.glob("cyclegan-domain-a-classifier-*.pt")
    reloaded, again = cg.domain_a_classifier.__wrapped__()  # the file, not the in-process cache
    assert again == accuracy
    for name, value in net.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name
    assert kept.stat().st_size > 0


@pytest.mark.slow  # ~25 s (export of the If graph ~13 s of CPU, a server; was ~1 min on real MNIST)
def test_cyclegan_recipe_exports_one_graph_the_server_serves_both_ways(tmp_path: Path) -> None:
    recipe = cg.CycleGanDigitsRecipe()
    (spec,) = recipe.train(seed=0, steps=STEPS, device="cpu", progress=False)
    assert spec.kind == "two_way_translator" and spec.training["cpu_s"] > 0
    models = tmp_path / "models"
    version_dir = export_model(
        spec.module,
        kind=spec.kind,
        name=spec.name,
        out_dir=models,
        example_inputs=spec.example_inputs,
        card=spec.card,
        config=spec.config,
        quality=spec.quality,
        holdout=spec.holdout,
        training=spec.training,
        fp16=spec.fp16,
    )
    card = json.loads((version_dir / "card.json").read_text())
    assert validate_card(card) == []
    assert card["domains"] == list(cg.DOMAINS) and card["size_multiple"] == cg.SIZE_MULTIPLE
    assert [t["name"] for t in card["inputs"]] == ["image", "direction"]
    assert card["parity"]["fp32_max_abs_diff"] <= 1e-4
    assert sum("direction" in c for c in card["parity"]["cases"]) == len(card["parity"]["cases"]) == 8
    graph = onnx.load(str(version_dir / "model.onnx"))
    assert "If" in {n.op_type for n in graph.graph.node}  # one generator runs per call

    # Each direction of the graph is its own generator, on the same input.
    run = _run(version_dir / "model.onnx")
    a, b = cg.held_out_strip(3)
    with torch.no_grad():
        want_ab = spec.module.a_to_b(torch.from_numpy(a)).numpy()
        want_ba = spec.module.b_to_a(torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(cg.translate_with(run, a, cg.A_TO_B), want_ab, atol=1e-4)
    np.testing.assert_allclose(cg.translate_with(run, b, cg.B_TO_A), want_ba, atol=1e-4)

    # verify's figures from the ONNX graph are the card's (measured in PyTorch at train time).
    figures = recipe.evaluate(spec.name, card, run)
    for key in ("class_preservation_a_to_b", "class_preservation_b_to_a", "cycle_l1_a", "cycle_l1_b"):
        assert figures[key] == pytest.approx(card["quality"][key], abs=2e-3), key

    with (
        running_server(models, tmp_path / "work") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GenerationServiceStub(channel)
        for direction, images, want in ((pb.DIRECTION_A_TO_B, a, want_ab), (pb.DIRECTION_B_TO_A, b, want_ba)):
            request = pb.ImageRequest(
                model=cg.NAME,
                images=[
                    tpb.Image(format=tpb.IMAGE_FORMAT_TENSOR_F32, data=i.tobytes(), shape=i.shape)
                    for i in images
                ],
                output=F32,
                direction=direction,
            )
            got = np.stack([tensor_of(i) for i in stub.Translate(request).images])
            np.testing.assert_allclose(got, want, atol=1e-4)
