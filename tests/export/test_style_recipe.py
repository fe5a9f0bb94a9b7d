"""The style-based generator recipe (stylegan-digits), quickly: a few training steps, both graphs
exported through ``export_model`` in the format the server expects (kinds style_mapping and
style_generator, card w_dim / num_layers / w_avg, config.json mapping), the recipe's quality
figures from the ONNX graphs, and a real server sampling and mixing them. Never a real training run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from server_support import F32, running_server, tensor_of

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve_export import export_model
from genserve_export.card import validate_card
from genserve_export.data import digits
from genserve_export.recipes import stylegan_digits as style
from genserve_export.recipes._clusters import ClusterFromZ, pixel_clusters, z_thresholds

pytestmark = pytest.mark.skipif(not digits.available(), reason="MNIST not fetched (make mnist-data)")
STEPS = 3  # smoke only: the recipe is never trained by the tests


def _run(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(feeds: Any) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, dict(feeds)), strict=True))

    return run


def test_stylegan_recipe_exports_two_graphs_the_server_serves(tmp_path: Path) -> None:
    recipe = style.StyleganDigitsRecipe()
    specs = recipe.train(seed=0, steps=STEPS, device="cpu", progress=False)
    assert [s.name for s in specs] == [style.MAPPING_NAME, style.NAME]
    models = tmp_path / "models"
    dirs = {}
    for spec in specs:
        dirs[spec.name] = export_model(
            spec.module,
            kind=spec.kind,
            name=spec.name,
            version=spec.version,
            out_dir=models,
            example_inputs=spec.example_inputs,
            card=spec.card,
            config=spec.config,
            quality=spec.quality,
            holdout=spec.holdout,
            training=spec.training,
            fp16=False,
        )
    mapping_card = json.loads((dirs[style.MAPPING_NAME] / "card.json").read_text())
    card = json.loads((dirs[style.NAME] / "card.json").read_text())
    assert validate_card(card) == [] and validate_card(mapping_card) == []
    assert (mapping_card["latent_dim"], mapping_card["w_dim"], mapping_card["image_size"]) == (
        style.LATENT_DIM,
        style.W_DIM,
        None,
    )
    assert (card["latent_dim"], card["w_dim"], card["num_layers"]) == (
        style.LATENT_DIM,
        style.W_DIM,
        style.NUM_LAYERS,
    )
    assert len(card["w_avg"]) == style.W_DIM and card["image_size"] == [style.IMAGE_SIDE, style.IMAGE_SIDE]
    config = json.loads((models / style.NAME / "config.json").read_text())
    assert config["mapping"] == style.MAPPING_NAME and config["kind"] == "style_generator"
    broken = dict(card, w_avg=card["w_avg"][:-1])
    assert any("'w_avg'" in p for p in validate_card(broken))

    # The recipe's figures from the exported graphs (what verify computes), the mixing ones included.
    mapping_run, synthesis_run = (
        _run(dirs[style.MAPPING_NAME] / "model.onnx"),
        _run(dirs[style.NAME] / "model.onnx"),
    )
    figures = recipe.evaluate_with_siblings(style.NAME, card, synthesis_run, lambda name: mapping_run)
    assert {"mixing_coarse_agreement", "mixing_fine_agreement", "min_class_fraction"} <= set(figures)
    assert all(np.isfinite(v) for v in figures.values())

    # Served as exported: psi 0 is w_avg's image for every seed; a mix equals its hand-built ws.
    with running_server(models, tmp_path / "work") as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        flat = stub.Sample(pb.SampleRequest(model=style.NAME, seeds=[1, 2], truncation_psi=0.0, output=F32))
        assert flat.images[0].image.data == flat.images[1].image.data
        w_avg = np.asarray(card["w_avg"], np.float32)
        want = synthesis_run({"ws": np.repeat(w_avg[None, None, :], style.NUM_LAYERS, axis=1)})["image"][0]
        np.testing.assert_allclose(tensor_of(flat.images[0].image), want, atol=1e-5)
        mixed = stub.MixStyles(
            pb.MixStylesRequest(
                model=style.NAME, mixes=[pb.StyleMix(coarse_seed=3, fine_seed=4, crossover=2)], output=F32
            )
        )
        from genserve_server.latents import latents_for_seeds

        w = mapping_run({"z": latents_for_seeds([3, 4], style.LATENT_DIM, None)})["w"]
        ws = np.stack([w[0] if layer < 2 else w[1] for layer in range(style.NUM_LAYERS)])[None]
        np.testing.assert_allclose(
            tensor_of(mixed.images[0].image), synthesis_run({"ws": ws})["image"][0], atol=1e-5
        )


def test_verify_draws_no_grid_for_a_mapping(tmp_path: Path) -> None:
    """A style_mapping has z in but no image out: no picture, rather than a KeyError on 'image'."""
    from genserve_export.grids import write_grid

    def run(feeds: Any) -> dict[str, np.ndarray]:
        return {"w": np.zeros((len(feeds["z"]), style.W_DIM), dtype=np.float32)}

    card = {"kind": "style_mapping", "name": style.MAPPING_NAME, "latent_dim": style.LATENT_DIM}
    assert write_grid(card, run, tmp_path / "mapping.png") is None
    assert not (tmp_path / "mapping.png").exists()


def test_self_conditioning_draws_clusters_from_z_in_the_data_proportions() -> None:
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.random((30, 1, 4, 4)) * 0.1, 0.9 + rng.random((10, 1, 4, 4)) * 0.1])
    assignment, sizes = pixel_clusters(images, 2, seed=0)
    assert sorted(sizes.tolist()) == [10, 30] and len(set(assignment[:30].tolist())) == 1
    pick = ClusterFromZ(z_thresholds(np.array([1, 2, 7])))
    z = torch.from_numpy(rng.standard_normal((100_000, 3)).astype(np.float32))
    shares = np.bincount(pick(z).numpy(), minlength=3) / len(z)
    np.testing.assert_allclose(shares, [0.1, 0.2, 0.7], atol=0.01)
    assert torch.equal(pick(z[:5]), pick(z)[:5])  # a row's cluster depends on its own z only
