"""The bench's own random-weight generators: built when absent, found next to the default models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench import models as bench_models


def test_bench_builds_its_own_large_generator(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    target = bench_models.ensure_bench_dcgan_256(tmp_path)
    card = json.loads((target / "1" / "card.json").read_text())
    assert card["kind"] == "generator" and card["image_size"] == [256, 256] and card["channels"] == 3
    assert card["latent_dim"] == bench_models.DCGAN_256_LATENT and "random weights" in card["description"]
    config = json.loads((target / "config.json").read_text())
    assert config["batching"]["max_batch_size"] == 16 and config["instances"] == 2
    sess = ort.InferenceSession(str(target / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(1).standard_normal((3, bench_models.DCGAN_256_LATENT)).astype(np.float32)
    (out,) = sess.run(None, {"z": z})
    assert out.shape == (3, 3, 256, 256) and -1.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out[0] - out[1]).mean() > 1e-3  # the seed reaches the pixels
    # A second call reuses the export.
    stamp = (target / "1" / "model.onnx").stat().st_mtime_ns
    assert bench_models.ensure_bench_dcgan_256(tmp_path) == target
    assert (target / "1" / "model.onnx").stat().st_mtime_ns == stamp


def test_bench_only_models_are_built_unless_the_models_dir_has_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []

    def fake_build(repo: Path) -> Path:
        built.append(repo)
        (repo / "bench-x").mkdir(parents=True, exist_ok=True)
        return repo / "bench-x"

    monkeypatch.setattr(bench_models, "BENCH_ONLY", {"bench-x": fake_build})
    monkeypatch.setattr(bench_models, "SCRATCH", tmp_path / "scratch")
    models = tmp_path / "models"
    (models / "real").mkdir(parents=True)
    repo = bench_models.link_repository(models, ["real", "bench-x"], tmp_path / "repo")
    assert (repo / "real").resolve() == (models / "real").resolve()
    assert (repo / "bench-x").resolve() == (tmp_path / "scratch" / "generated" / "bench-x").resolve()
    assert built == [tmp_path / "scratch" / "generated"]
    # A models dir that has the name serves its own copy; nothing is built.
    (models / "bench-x").mkdir()
    assert bench_models.model_dir(models, "bench-x") == models / "bench-x"
    assert len(built) == 1


def test_the_raw_limit_feeds_every_default_model_as_its_graph_expects() -> None:
    """bench.run's raw ONNX Runtime limit builds inputs from each card (bench.common.make_feeds): they
    must match the graph's inputs (names, dtypes, ranks) for every kind in the default repository."""
    from bench.common import DEFAULT_MODELS, find_models, make_feeds

    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64}
    models = find_models(DEFAULT_MODELS)
    assert len(models) >= 10
    for model in models:
        feeds = make_feeds(model, 2)
        sess = ort.InferenceSession(str(model.model_path), providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in sess.get_inputs()}
        assert set(feeds) == set(inputs), model.name
        for name, value in feeds.items():
            assert value.dtype == dtypes[inputs[name].type], (model.name, name, value.dtype)
            rank = len(inputs[name].shape)
            assert value.ndim == rank and value.shape[0] == 2, (model.name, name, value.shape)


def test_the_servers_part_drives_every_default_model_it_picks_through_a_known_method() -> None:
    """bench.run serves the models of SERVED_KINDS through the load generator: each needs a method
    (a style generator has none, and a run once stopped at stylegan-digits with a KeyError)."""
    from bench.common import DEFAULT_MODELS, find_models
    from bench.run import SERVED_KINDS

    served = [m for m in find_models(DEFAULT_MODELS) if m.kind in SERVED_KINDS]
    assert {"dcgan-digits", "sr-photos-x4", "pix2pix-colorize"} <= {m.name for m in served}
    assert all(m.method in {"Sample", "SuperResolve", "Translate"} for m in served)


def test_bench_builds_the_slow_conditional_resnet_generator(tmp_path: Path) -> None:
    """Issue 20's slow class-conditional model (ResNet, conditional BN), narrowed to keep the test fast:
    a conditional card with ten classes, 32x32 RGB, and both the seed and the label reach the pixels."""
    pytest.importorskip("torch")
    target = bench_models.ensure_bench_cgan_resnet_32(tmp_path, channels=16)
    card = json.loads((target / "1" / "card.json").read_text())
    assert (
        card["kind"] == "conditional_generator" and card["image_size"] == [32, 32] and card["channels"] == 3
    )
    assert card["latent_dim"] == bench_models.CGAN_RESNET_LATENT and len(card["class_names"]) == 10
    sess = ort.InferenceSession(str(target / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(1).standard_normal((1, bench_models.CGAN_RESNET_LATENT)).astype(np.float32)
    zz = np.concatenate([z, z, np.random.default_rng(2).standard_normal(z.shape).astype(np.float32)])
    (out,) = sess.run(None, {"z": zz, "label": np.array([3, 7, 3], dtype=np.int64)})
    assert out.shape == (3, 3, 32, 32) and -1.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out[0] - out[1]).mean() > 1e-3  # the label reaches the pixels
    assert np.abs(out[0] - out[2]).mean() > 1e-3  # and the seed


def test_a_full_run_leaves_out_the_models_built_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench.run builds bench-cgan-resnet-32 (minutes a run at ~60 images/s) only when it is named."""
    from bench import run as bench_run

    built: list[str] = []

    def fake(name: str):  # type: ignore[no-untyped-def]
        def build(repo: Path) -> Path:
            built.append(name)
            (repo / name).mkdir(parents=True, exist_ok=True)
            return repo / name

        return build

    only = {name: fake(name) for name in bench_models.BENCH_ONLY}
    monkeypatch.setattr(bench_models, "BENCH_ONLY", only)
    monkeypatch.setattr(bench_run, "SCRATCH", tmp_path / "scratch")
    (tmp_path / "models").mkdir()
    bench_run.assemble_repository(tmp_path / "models", None, True)
    assert bench_models.BENCH_CGAN_RESNET_32 not in built and bench_models.BENCH_DCGAN_256 in built
    built.clear()
    bench_run.assemble_repository(tmp_path / "models", [bench_models.BENCH_CGAN_RESNET_32], True)
    assert built == [bench_models.BENCH_DCGAN_64, bench_models.BENCH_CGAN_RESNET_32]


def test_the_priority_bench_runs_on_a_bench_only_model_as_its_usage_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -m bench.priority --model bench-dcgan-64` (its docstring's usage; bench.run's first
    # choice) stopped at once with "model bench-dcgan-64 not found in models": unlike bench.run and
    # bench.cache it looked only in --models-dir, where no bench-only generator is.
    import shutil

    from bench import priority
    from bench.common import DEFAULT_MODELS

    def fake_build(repo: Path) -> Path:
        shutil.copytree(DEFAULT_MODELS / "dcgan-digits", repo / "bench-x", dirs_exist_ok=True)
        return repo / "bench-x"

    monkeypatch.setattr(bench_models, "BENCH_ONLY", {"bench-x": fake_build})
    monkeypatch.setattr(bench_models, "SCRATCH", tmp_path / "scratch")
    ran: list[tuple[str, bool]] = []

    def run_priority(models_dir: Path, model: object, duration_s: float) -> dict[str, object]:
        ran.append((getattr(model, "name", ""), (models_dir / "bench-x" / "config.json").is_file()))
        return {}

    monkeypatch.setattr(priority, "run_priority", run_priority)
    monkeypatch.setattr(priority, "describe", lambda result: "")
    assert priority.main(["--model", "bench-x", "--duration-s", "1"]) == 0
    assert ran == [("bench-x", True)]  # the server it starts serves the model


def test_the_raw_limit_refuses_a_model_name_it_cannot_find(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--only dcgan-digits cgan-digitz` (a typo) measured dcgan-digits alone and exited 0 with no word
    # about the other; `--only cgan-digitz` printed [] and exited 0.
    from bench import raw_limit

    measured: list[str] = []
    monkeypatch.setattr(raw_limit, "measure_model", lambda m, duration_s: measured.append(m.name) or {})
    with pytest.raises(SystemExit) as exited:
        raw_limit.main(["--only", "dcgan-digits", "cgan-digitz", "--duration-s", "0.1"])
    assert exited.value.code != 0 and "--only: no model cgan-digitz" in capsys.readouterr().err
    assert measured == []
