"""genserve_export checks: verify (both directions, file digests), CLI limits, build-defaults order."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from genserve_export import (
    CardFieldError,
    KindMismatchError,
    RepositoryExistsError,
    cli,
    export_model,
    import_sr,
    verify_repository,
)
from genserve_export.card import check_thresholds


class SkewedTwoWay(nn.Module):
    """A two-way translator whose B->A generator leaves the card's output_range [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 1, 3, padding=1)
        self.b = nn.Conv2d(1, 1, 3, padding=1)

    def a_to_b(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a(x))

    def b_to_a(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.b(x)) * 4.0 - 1.5  # [-1.5, 2.5]: outside [0, 1]

    def forward(self, image: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):
            return self.b_to_a(image) if int(direction[0]) == 1 else self.a_to_b(image)
        out: torch.Tensor = torch.cond(
            direction[0] == 1, lambda x: self.b_to_a(x), lambda x: self.a_to_b(x), (image,)
        )
        return out


SKEWED_CARD = {
    "description": "B->A out of range",
    "output_range": [0, 1],
    "input_range": [0, 1],
    "domains": ["a", "b"],
}


def test_verify_checks_a_two_way_translators_b_to_a_direction_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify promises finite outputs inside output_range (and fp16 within fp16_atol) for every
    graph; a two_way_translator's second generator (direction 1) must be run too, not only A->B."""
    from genserve_export import export as export_module

    image = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    example = {"image": image, "direction": np.zeros(2, np.int64)}
    # export refuses this module itself (its parity cases run both directions) ...
    with pytest.raises(CardFieldError, match="output_range.*direction 1"):
        export_model(
            SkewedTwoWay(),
            kind="two_way_translator",
            name="skewed",
            out_dir=tmp_path,
            example_inputs=example,
            card=SKEWED_CARD,
            fp16=False,
        )
    # ... so write it past that check, as a hand-made or older entry would be, for verify to judge
    monkeypatch.setattr(export_module, "_check_output_range", lambda *args: None)
    export_model(
        SkewedTwoWay(),
        kind="two_way_translator",
        name="skewed",
        out_dir=tmp_path,
        fp16=False,
        example_inputs=example,
        card=SKEWED_CARD,
    )
    report = verify_repository(tmp_path, recompute_quality=False)
    assert not report.ok, report.format()
    assert any("outside output_range" in e and "direction" in e for e in report.models[0].errors), (
        report.format()
    )


# --- the CLI: bad numbers and missing inputs are refused by name, before any work -------------


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training or importing would mean the CLI accepted the bad argument."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CLI started work with a bad argument")

    monkeypatch.setattr(cli, "train_and_export", refuse)
    monkeypatch.setattr(import_sr, "import_tfjs_sr", refuse)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "dcgan-digits", "--threads", "0"], "--threads"),
        (["train", "dcgan-digits", "--steps", "-5"], "--steps"),
        (["train", "dcgan-digits", "--steps", "0"], "--steps"),
        (["build-defaults", "--steps-scale", "0"], "--steps-scale"),
        (["build-defaults", "--steps-scale", "-1"], "--steps-scale"),
        (["build-defaults", "--threads", "0"], "--threads"),
        (["import-rrdn", "PKG", "--threads", "0"], "--threads"),
        (["import-rrdn", "PKG", "--scale", "0"], "--scale"),
        (["import-rrdn", "PKG", "--max-batch-size", "0"], "--max-batch-size"),
        (["import-rrdn", "PKG", "--tile-size", "0"], "--tile-size"),
        (["import-rrdn", "PKG", "--tile-overlap", "-1"], "--tile-overlap"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_cli_refuses_bad_numbers_naming_the_flag_and_the_limit(
    argv: list[str], flag: str, tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    argv = [str(package) if a == "PKG" else a for a in argv] + ["--out", str(tmp_path / "models")]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and (">= 1" in err or ">= 0" in err or "> 0" in err), err
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", ["liveness", "Bad_Name", "../escape"])
def test_cli_import_refuses_a_name_no_model_may_have_naming_the_flag_before_any_work(
    name: str, tmp_path: Path, no_work: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """`import-rrdn --name liveness` (a reserved name, the server's own health key) or a name the
    repository's pattern refuses converted, checked and measured the whole model before export_model
    refused it. argparse refuses it up front, naming --name, exit 2."""
    package = tmp_path / "pkg"
    package.mkdir()
    argv = ["import-rrdn", str(package), "--name", name, "--out", str(tmp_path / "models")]
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--name" in err and repr(name) in err, err
    assert not (tmp_path / "models").exists()


def test_cli_import_of_a_missing_package_names_it_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent-1.0.0.tgz"
    assert cli.main(["import-rrdn", str(missing), "--out", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "not found" in err, err
    assert not (tmp_path / "models").exists()


def test_cli_import_of_a_scale_the_package_lacks_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.export.test_tfjs_import import write_package

    package = write_package(tmp_path, scale=2)  # holds models/x2 only
    code = cli.main(["import-rrdn", str(package), "--scale", "3", "--out", str(tmp_path / "models")])
    assert code == 1
    assert "models/x3/model.json not found" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_build_defaults_one_at_a_time_starts_srgan_from_the_sr_model_it_just_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """srgan-photos-x4 fine-tunes sr-photos-x4 (its `after`). `--jobs 2` points it at the model built
    into --out; `--jobs 1` (the default) must too, or the two build different models and the card's
    training.init names a model that is not the repository's sr-photos-x4 (which verify compares with)."""
    from genserve_export.recipes import photos_srgan

    out = tmp_path / "models"
    seen: dict[str, str | None] = {}

    def fake_train(name: str, out_dir: Path, **kwargs: object) -> object:
        seen[name] = os.environ.get(photos_srgan.INIT_ENV)
        version = out_dir / name / "1"
        version.mkdir(parents=True)
        (version / "model.onnx").write_bytes(b"fresh")
        return SimpleNamespace(steps=1, train_s=0.0, export_s=0.0, paths=[version])

    monkeypatch.delenv(photos_srgan.INIT_ENV, raising=False)
    monkeypatch.setattr(cli, "train_and_export", fake_train)
    # in the order given: the dependency second, as `--only` lets a user write it
    argv = ["build-defaults", "--out", str(out), "--only", "srgan-photos-x4", "sr-photos-x4", "--no-verify"]
    assert cli.main(argv) == 0
    assert seen["srgan-photos-x4"] == str(out / "sr-photos-x4" / "1" / "model.onnx"), seen
    assert photos_srgan.INIT_ENV not in os.environ  # set for that recipe only


class FiveBandTranslator(nn.Module):
    """image [N, 5, H, W] (e.g. RGB + two masks) -> gray."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(5, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(image))


def test_export_refuses_input_channels_the_server_cannot_load(tmp_path: Path) -> None:
    """The server reads a card's input_channels as 1..4 (config.load_card) and marks a version with
    more UNAVAILABLE; export (and verify) must refuse it, naming the field and the limit, instead of
    writing an entry that verifies OK and never serves."""
    from genserve_export.errors import ExportError
    from genserve_server.config import ConfigError, load_card

    example = {"image": np.random.default_rng(0).random((2, 5, 16, 16), dtype=np.float32)}
    card = {"description": "five bands to gray", "output_range": [0, 1], "input_range": [0, 1]}
    try:
        path = export_model(
            FiveBandTranslator(),
            kind="image_to_image",
            name="five",
            out_dir=tmp_path,
            fp16=False,
            example_inputs=example,
            card=card,
        )
    except ExportError as exc:
        assert "input_channels" in str(exc) and "4" in str(exc), exc
        assert not any(tmp_path.rglob("*.onnx"))
        return
    with pytest.raises(ConfigError, match="input_channels"):
        load_card(path / "card.json")  # what the server does with it
    report = verify_repository(tmp_path, recompute_quality=False)
    raise AssertionError(f"export wrote an entry the server refuses; verify says:\n{report.format()}")


def test_verify_checks_the_digests_an_imported_card_records_for_its_licence_and_reference(
    tmp_path: Path,
) -> None:
    """An imported model's card records source.files_sha256 for LICENSE and the reference pair, and
    verify scores the gated reference_max_abs_diff_255 against that pair: a changed file must fail."""
    from genserve_export.import_sr import REFERENCE_OUTPUT, import_tfjs_sr
    from tests.export.test_tfjs_import import write_package

    out = tmp_path / "models"
    target = import_tfjs_sr(
        write_package(tmp_path), out_dir=out, name="tiny-x2", scale=2, fp16=False, tile_size=32
    )
    assert verify_repository(out, recompute_quality=False).ok
    (target / "LICENSE").write_text("All rights reserved.\n")
    reference = target / REFERENCE_OUTPUT
    reference.write_bytes(reference.read_bytes()[:-1] + b"\x00")
    report = verify_repository(out, recompute_quality=False)
    assert not report.ok, report.format()
    errors = " ".join(report.models[0].errors)
    assert "LICENSE" in errors and REFERENCE_OUTPUT in errors, report.format()


def test_verify_holds_a_graphs_external_weights_to_the_cards_sha256_as_the_server_does(
    tmp_path: Path,
) -> None:
    """A graph saved with external data (model.onnx.data, torch.onnx.export's default) loads its
    weights from that file: verify passes it where card.json's sha256 lists it under its location,
    as the server loads it, and refuses it changed, unlisted or missing, naming it, as the server
    refuses the version; it is never opened as a graph of its own."""
    from server_support import externalize_weights

    out = tmp_path / "models"
    target = export_model(
        _TinyImage(0),
        kind="generator",
        name="user-gen",
        out_dir=out,
        example_inputs={"z": torch.randn(2, 4)},
        card={"description": "a user's generator", "output_range": [-1, 1]},
        fp16=False,
    )
    external = externalize_weights(target)
    report = verify_repository(out, recompute_quality=False)
    assert report.ok, report.format()

    weights = external.read_bytes()
    external.write_bytes(bytes(len(weights)))  # zeroed in place: the graph and the card unchanged
    report = verify_repository(out, recompute_quality=False)
    assert not report.ok and "model.onnx.data" in " ".join(report.models[0].errors), report.format()

    external.write_bytes(weights)
    card = json.loads((target / "card.json").read_text())
    del card["sha256"]["model.onnx.data"]  # a card that never named the file vouches for nothing
    (target / "card.json").write_text(json.dumps(card))
    report = verify_repository(out, recompute_quality=False)
    errors = " ".join(report.models[0].errors)
    assert not report.ok and "model.onnx.data" in errors and "not listed" in errors, report.format()

    external.unlink()
    report = verify_repository(out, recompute_quality=False)
    errors = " ".join(report.models[0].errors)
    assert not report.ok and "model.onnx.data" in errors and "missing" in errors, report.format()


def test_verify_holds_an_auxiliary_graphs_external_weights_to_the_cards_sha256_as_the_main_graphs(
    tmp_path: Path,
) -> None:
    """An auxiliary graph (a code decoder's encoder.onnx) saved with external data loads its weights
    from that file as model.onnx does: verify holds the file to card.json's sha256 under its
    location (unlisted or changed: an error naming it), never opens it as a graph, and a sibling's
    quality run (latest_run) refuses the auxiliary graph whose weights changed."""
    import hashlib

    import onnx

    from genserve_export.verify import _SessionCache

    out = tmp_path / "models"
    target = export_model(
        _TinyImage(0),
        kind="generator",
        name="user-gen",
        out_dir=out,
        example_inputs={"z": torch.randn(2, 4)},
        card={"description": "a user's generator", "output_range": [-1, 1]},
        fp16=False,
    )
    aux, external = target / "aux.onnx", target / "aux.onnx.data"
    onnx.save(
        onnx.load(str(target / "model.onnx")),
        str(aux),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=external.name,
        size_threshold=128,
    )
    card = json.loads((target / "card.json").read_text())
    card["aux_graphs"] = {aux.name: {"sha256": hashlib.sha256(aux.read_bytes()).hexdigest(), "role": "test"}}
    (target / "card.json").write_text(json.dumps(card))
    report = verify_repository(out, recompute_quality=False)
    errors = " ".join(report.models[0].errors)
    assert not report.ok and "aux.onnx.data" in errors and "not listed" in errors, report.format()

    card["sha256"][external.name] = hashlib.sha256(external.read_bytes()).hexdigest()
    (target / "card.json").write_text(json.dumps(card))
    report = verify_repository(out, recompute_quality=False)
    assert report.ok, report.format()
    assert _SessionCache(out).latest_run("user-gen/aux.onnx") is not None

    external.write_bytes(bytes(len(external.read_bytes())))  # zeroed in place: graph and card unchanged
    report = verify_repository(out, recompute_quality=False)
    assert not report.ok and "aux.onnx.data" in " ".join(report.models[0].errors), report.format()
    assert _SessionCache(out).latest_run("user-gen/aux.onnx") is None


@pytest.mark.parametrize(
    "card",
    [[], "a card", {"aux_graphs": ["aux.onnx"]}, {"aux_graphs": {"aux.onnx": "0" * 64}}],
    ids=["a-list", "a-string", "aux-graphs-a-list", "aux-entry-not-an-object"],
)
def test_a_siblings_card_of_the_wrong_shape_gives_no_auxiliary_graph_to_a_quality_run(
    tmp_path: Path, card: object
) -> None:
    """A sibling's card.json that is valid JSON but not the object a card is (or whose aux_graphs is
    not a mapping of objects) is refused by latest_run as unreadable JSON is (None: the recipe skips
    the figures needing that graph, the sibling's own verify names its card), where it raised
    AttributeError/TypeError into the recipe's quality run."""
    from genserve_export.verify import _SessionCache

    version = tmp_path / "user-gen" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"")
    (version / "aux.onnx").write_bytes(b"")
    (version / "card.json").write_text(json.dumps(card))
    assert _SessionCache(tmp_path).latest_run("user-gen/aux.onnx") is None


def test_source_commit_is_dirty_for_changes_to_the_contract_too(tmp_path: Path) -> None:
    """+dirty covered only export/genserve_export: a build from an edited api/genserve_contract (the
    card and config rules it writes to) was recorded as the clean commit. models/ stays out."""
    from genserve_export.provenance import SOURCE_PATHS, source_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for path in (*SOURCE_PATHS, "models"):
        (tmp_path / path).mkdir(parents=True)
        (tmp_path / path / "f.txt").write_text("a")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    package = tmp_path / SOURCE_PATHS[0]
    assert not source_commit(package).endswith("+dirty")
    (tmp_path / "models" / "f.txt").write_text("built")
    assert not source_commit(package).endswith("+dirty")
    (tmp_path / "api" / "genserve_contract" / "f.txt").write_text("edited")
    assert source_commit(package).endswith("+dirty")


def test_an_installed_export_in_a_venv_inside_another_repository_records_no_commit_of_it(
    tmp_path: Path,
) -> None:
    """A non-editable install (pip install genserve-export) in a project's git-ignored .venv: git
    run from site-packages/genserve_export answered with the project's HEAD, clean (its status has
    no export/genserve_export), so every card claimed genserve was built from a commit of another
    repository. Only a checkout holding the package at export/genserve_export is its source."""
    from genserve_export.provenance import source_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "train.py").write_text("print('my project')\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "my project")
    installed = tmp_path / ".venv" / "lib" / "python3.11" / "site-packages" / "genserve_export"
    installed.mkdir(parents=True)
    (installed / "provenance.py").write_text("# the installed copy\n")
    assert source_commit(installed) == "uncommitted"


# --- a published version is immutable: train / build-defaults / import-rrdn refuse to overwrite one


class _TinyImage(nn.Module):
    """z [N, 4] -> image [N, 1, 8, 8] in [-1, 1]: what a fake recipe "trains"."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(4, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(z)).reshape(-1, 1, 8, 8)


class _FakeRecipe:
    """A recipe that trains nothing: one tiny generator entry (its seed picks the weights)."""

    names: tuple[str, ...] = ("tiny-gen",)

    def __init__(self) -> None:
        self.trained = 0

    def train(self, *, seed: int, steps: int | None, device: str, progress: bool) -> list[object]:
        from genserve_export.recipe import ExportSpec

        self.trained += 1
        z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
        card = {"description": "fake recipe", "output_range": [-1.0, 1.0]}
        return [ExportSpec("tiny-gen", "generator", _TinyImage(seed), {"z": z}, card, fp16=False)]

    def evaluate(self, name: str, card: object, run: object) -> dict[str, float]:
        return {}


@pytest.fixture
def fake_recipe(monkeypatch: pytest.MonkeyPatch) -> _FakeRecipe:
    from genserve_export import recipes

    recipe = _FakeRecipe()
    monkeypatch.setitem(recipes.RECIPES, "tiny-gen", recipe)
    return recipe


def _published(out: Path, name: str = "tiny-gen", version: str = "1") -> Path:
    """A version directory as a server would be serving it."""
    target = out / name / version
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"the published graph")
    (target / "card.json").write_text("{}")
    return target


def test_cli_train_refuses_to_overwrite_a_published_version_before_training(
    tmp_path: Path, fake_recipe: _FakeRecipe, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/model-repository.md: a published version directory is immutable (a server may be serving
    it, a client's provenance names it). `train` silently replaced models/<name>/1; it must refuse,
    naming the path and the two ways on (--version N, --replace), before spending time training."""
    out = tmp_path / "models"
    published = _published(out)
    code = cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert str(published) in err and "--replace" in err and "--version" in err, err
    assert fake_recipe.trained == 0
    assert (published / "model.onnx").read_bytes() == b"the published graph"
    # a new version beside it
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16", "--version", "2"]) == 0
    assert (out / "tiny-gen" / "2" / "model.onnx").is_file()
    assert (published / "model.onnx").read_bytes() == b"the published graph"


def test_cli_train_replace_swaps_the_version_whole(tmp_path: Path, fake_recipe: _FakeRecipe) -> None:
    """--replace rebuilds in place: the new version directory replaces the old one in one rename
    (built in a hidden sibling first), leaving nothing else behind in the entry."""
    out = tmp_path / "models"
    published = _published(out)
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16", "--replace"]) == 0
    assert (published / "model.onnx").read_bytes() != b"the published graph"
    assert sorted(p.name for p in (out / "tiny-gen").iterdir()) == ["1", "config.json"]
    assert verify_repository(out, recompute_quality=False).ok


def test_cli_train_writes_into_an_empty_version_directory(tmp_path: Path, fake_recipe: _FakeRecipe) -> None:
    """An empty version directory publishes nothing yet: no --replace needed."""
    out = tmp_path / "models"
    (out / "tiny-gen" / "1").mkdir(parents=True)
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16"]) == 0
    assert (out / "tiny-gen" / "1" / "model.onnx").is_file()


def test_build_defaults_refuses_published_versions_before_training_any_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """build-defaults into a repository that holds one of its entries refuses up front (not after
    hours of training the recipes before it), naming every published path; --replace rebuilds, and
    reaches each recipe's training, one at a time or in processes."""
    out = tmp_path / "models"
    published = _published(out, "vae-digits-encoder")
    calls: list[dict[str, object]] = []

    def fake_train(name: str, out_dir: Path, **kwargs: object) -> object:
        calls.append({"name": name, **kwargs})
        return SimpleNamespace(steps=1, train_s=0.0, export_s=0.0, paths=[])

    monkeypatch.setattr(cli, "train_and_export", fake_train)
    argv = ["build-defaults", "--out", str(out), "--only", "dcgan-digits", "vae-digits", "--no-verify"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert str(published) in err and "--replace" in err, err
    assert calls == []
    assert cli.main([*argv, "--replace"]) == 0
    assert [(c["name"], c["overwrite"]) for c in calls] == [("dcgan-digits", True), ("vae-digits", True)]

    commands: list[list[str]] = []

    class Done:
        returncode = 0

        def __init__(self, command: list[str], **kwargs: object) -> None:
            commands.append(command)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", Done)
    assert cli.main([*argv, "--replace", "--jobs", "2"]) == 0
    assert len(commands) == 2 and all("--replace" in c for c in commands), commands


def test_cli_import_refuses_to_overwrite_a_published_version_before_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """import-rrdn replaced models/<name>/<version> silently (import_tfjs_sr defaulted to overwrite):
    it must refuse, naming the path, --version and --replace; --replace rebuilds in place."""
    from tests.export.test_tfjs_import import write_package

    package = write_package(tmp_path, scale=2)
    out = tmp_path / "models"
    published = _published(out, "tiny-x2")
    argv = ["import-rrdn", str(package), "--scale", "2", "--out", str(out), "--name", "tiny-x2", "--no-fp16"]
    argv += ["--tile-size", "32"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert str(published) in err and "--replace" in err and "--version" in err, err
    assert (published / "model.onnx").read_bytes() == b"the published graph"
    # the library refuses too (its default was overwrite=True), before the import's work
    monkeypatch.setattr(import_sr, "Package", None)  # reading the package would fail with a TypeError
    with pytest.raises(RepositoryExistsError, match="tiny-x2"):
        import_sr.import_tfjs_sr(package, out_dir=out, name="tiny-x2", scale=2, fp16=False)
    monkeypatch.undo()
    assert cli.main([*argv, "--replace"]) == 0
    assert (published / "model.onnx").read_bytes() != b"the published graph"
    assert sorted(p.name for p in (out / "tiny-x2").iterdir()) == ["1", "config.json"]


# --- output_range: checked on export's seeded parity inputs, not only on the example ---------


class _RangeByLatent(nn.Module):
    """image = z[:, 0] everywhere: inside [-1, 1] for small latents, outside for N(0, 1) ones."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, :1, None, None].expand(-1, 1, 8, 8) * 1.0


def test_export_checks_output_range_on_its_seeded_inputs_not_only_the_example(tmp_path: Path) -> None:
    """export checked output_range against the example inputs only, so an example of small latents
    wrote a card whose output_range verify (N(0, 1) latents) then refutes. The parity cases (seeded
    latents, labels, images over input_range, batch 1 and 7) are checked too, before any write."""
    z = np.full((2, 4), 0.1, np.float32)
    card = {"description": "range depends on z", "output_range": [-1.0, 1.0]}
    out = tmp_path / "models"
    with pytest.raises(CardFieldError, match="output_range"):
        export_model(
            _RangeByLatent(), kind="generator", name="r", out_dir=out, example_inputs={"z": z}, card=card
        )
    assert not out.exists() or not any(out.rglob("*.onnx"))


def test_cli_train_of_a_new_version_keeps_the_models_config_json(
    tmp_path: Path, fake_recipe: _FakeRecipe
) -> None:
    """config.json is the model's, shared by its versions: `train --version 2` rewrote it with the
    recipe's, discarding what an operator had set (version_policy, batching) for the versions a
    server is serving. A new version leaves it as it is; --replace writes the recipe's."""
    out = tmp_path / "models"
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16"]) == 0
    config_path = out / "tiny-gen" / "config.json"
    recipes = json.loads(config_path.read_text())
    edited = {**recipes, "version_policy": {"specific": {"versions": [1]}}}
    config_path.write_text(json.dumps(edited))
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16", "--version", "2"]) == 0
    assert (out / "tiny-gen" / "2" / "model.onnx").is_file()
    assert json.loads(config_path.read_text()) == edited
    assert cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16", "--version", "2", "--replace"]) == 0
    assert json.loads(config_path.read_text()) == recipes


def test_export_fsyncs_what_it_publishes_before_each_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename is durable only after the renamed file's bytes are: without an fsync of each file
    before it (and of the directory after), a power loss or a VM crash could leave model.onnx,
    card.json or config.json under their published names empty or truncated, for a server to refuse
    (or a rescan to load). Both paths: a new version with a new config.json, and --replace's swap."""
    out = tmp_path.resolve() / "models"
    events: list[tuple[str, str]] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(name: str) -> object:
        real = rename if name == "rename" else replace

        def move(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
            events.append((name, f"{os.fspath(source)} -> {os.fspath(target)}"))
            real(source, target)

        return move

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename("rename"))
    monkeypatch.setattr(os, "replace", recording_rename("replace"))
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}
    for overwrite in (False, True):
        events.clear()
        target = export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False, overwrite=overwrite,
        )  # fmt: skip
        entry = target.parent
        moves = [(i, what.split(" -> ")) for i, (kind, what) in enumerate(events) if kind != "fsync"]
        synced = {what: i for i, (kind, what) in enumerate(events) if kind == "fsync"}
        published = [(i, Path(src), Path(dst)) for i, (src, dst) in moves if Path(dst).parent == entry]
        published = [m for m in published if not m[2].name.startswith(".")]  # not the old version retired
        assert sorted(dst.name for _, _, dst in published) == ["1", "config.json"], events
        for i, src, dst in published:
            files = [src / f.name for f in dst.iterdir()] if dst.is_dir() else [src]
            for file in [*files, src] if dst.is_dir() else files:
                assert synced.get(str(file), i) < i, (f"{file} not fsynced before its rename", events)
            after = any(kind == "fsync" and what == str(entry) for kind, what in events[i + 1 :])
            assert after, (f"{entry} not fsynced after renaming {dst.name} into it", events)
        assert sorted(f.name for f in target.iterdir()) == ["card.json", "model.onnx"]


def test_an_export_of_a_new_model_that_cannot_be_written_leaves_no_model_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export of a new model whose files could not be written (a full disk midway) removed its
    staging folder but left <name>/ behind, empty: a model without config.json or version that a
    server reports unavailable (genserve_model_config_error) and verify fails. The folder it made
    goes too; a model that was there before keeps its folder and versions."""
    import shutil

    out = tmp_path / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(name: str, version: str = "1") -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name=name, version=version, out_dir=out,
            example_inputs={"z": z}, card=card, fp16=False,
        )  # fmt: skip

    export("kept")
    copy = shutil.copyfile

    def full_disk(source: str, target: str, *args: object, **kwargs: object) -> object:
        if "/.tmp-" in str(target):
            raise OSError(28, "No space left on device", str(target))
        return copy(source, target)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export("tiny-gen")
    with pytest.raises(OSError, match="No space left"):
        export("kept", version="2")
    assert sorted(p.name for p in out.iterdir()) == ["kept"]
    assert sorted(p.name for p in (out / "kept").iterdir()) == ["1", "config.json"]


def test_an_export_of_a_new_model_whose_config_cannot_be_written_publishes_no_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.json of a new model was written after its version directory was renamed in: a full
    disk (or any failure) writing it failed the export but left <name>/1 published without a
    config.json, which a server reports unavailable and verify fails. Everything is written before
    the version's rename: the failed export publishes nothing and leaves no model folder."""
    out = tmp_path / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}
    write_text = Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        if "config.json" in self.name:
            raise OSError(28, "No space left on device", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False,
        )  # fmt: skip
    assert not (out / "tiny-gen").exists(), sorted(str(p) for p in out.rglob("*"))
    monkeypatch.setattr(Path, "write_text", write_text)
    target = export_model(
        _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
        card=card, fp16=False,
    )  # fmt: skip
    assert sorted(p.name for p in target.parent.iterdir()) == ["1", "config.json"]


def test_an_export_removes_the_config_temp_files_killed_exports_left_and_no_live_ones(tmp_path: Path) -> None:
    """An export killed after staging its config.json (<name>/.config.json.tmp-<rand>) left it
    behind for good: the stale cleanup matched staging folders alone. Those of its naming that are
    unchanged for an hour and whose export holds no staging folder go; a fresh one, one of a live
    export and any other name stay."""
    out = tmp_path / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(version: str) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", version=version, out_dir=out,
            example_inputs={"z": z}, card=card, fp16=False,
        )  # fmt: skip

    entry = export("1").parent
    killed, fresh, live, other = (
        entry / ".config.json.tmp-0123abcd",
        entry / ".config.json.tmp-4567abcd",
        entry / ".config.json.tmp-89abcdef",
        entry / ".config.json.tmp-mine",
    )
    held = entry / ".tmp-3-89abcdef"  # the live export's staging folder, locked while it writes
    held.mkdir()
    hours_ago = time.time() - 7200
    for path in (killed, fresh, live, other):
        path.write_text("{}")
        if path is not fresh:
            os.utime(path, (hours_ago, hours_ago))
    os.utime(held, (hours_ago, hours_ago))
    fd = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        export("2")
    finally:
        os.close(fd)
    assert not killed.exists(), "the killed export's config temp file is left"
    assert fresh.is_file() and live.is_file() and other.is_file() and held.is_dir()


def test_replace_keeps_the_old_version_served_until_the_new_one_is_on_disk_and_back_if_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--replace swaps a version by two renames, the old one aside, then the new one in: the new
    files' fsync (which takes as long as the disk needs for a large model) comes before the old
    version leaves, so the instant with no version stays an instant; and where the new one cannot be
    renamed in, the old one goes back under its name rather than staying hidden as .old-*."""
    out = tmp_path.resolve() / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(overwrite: bool) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False, overwrite=overwrite,
        )  # fmt: skip

    target = export(False)
    old = {f.name: f.read_bytes() for f in target.iterdir()}
    events: list[str] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        fsync(fd)

    def recording_rename(source: str | os.PathLike[str], target_: str | os.PathLike[str]) -> None:
        events.append(f"rename {os.fspath(source)} -> {os.fspath(target_)}")
        rename(source, target_)

    def failing_replace(source: str | os.PathLike[str], target_: str | os.PathLike[str]) -> None:
        if Path(target_) == target:
            raise OSError(28, "No space left on device")
        replace(source, target_)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        export(True)
    retire = next(i for i, e in enumerate(events) if e.startswith(f"rename {target} -> "))
    staged_onnx = [i for i, e in enumerate(events) if e.startswith("fsync ") and e.endswith("model.onnx")]
    assert staged_onnx and staged_onnx[0] < retire, events
    assert {f.name: f.read_bytes() for f in target.iterdir()} == old
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_replace_interrupted_right_after_the_old_version_left_puts_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C, or a SIGTERM (genserve-export turns it into an exception for its cleanup), that
    lands just after --replace renamed the old version aside and before the new one arrived left
    the model without that version, the old one hidden as .old-*: it goes back under its name."""
    out = tmp_path.resolve() / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(overwrite: bool) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False, overwrite=overwrite,
        )  # fmt: skip

    target = export(False)
    old = {f.name: f.read_bytes() for f in target.iterdir()}
    rename = os.rename

    def interrupted_after(source: str | os.PathLike[str], target_: str | os.PathLike[str]) -> None:
        rename(source, target_)
        if Path(source) == target:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        export(True)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == old
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_replace_interrupted_after_the_new_version_arrived_leaves_no_old_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C or SIGTERM in --replace's last steps, once the new version was renamed into place
    (the fsync of the model's directory after it), left the old version behind as a hidden .old-*
    directory that nothing removes: a copy of the model no reader looks at. The new version stays;
    the old copy goes."""
    out = tmp_path.resolve() / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(overwrite: bool) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False, overwrite=overwrite,
        )  # fmt: skip

    target = export(False)
    replace, fsync = os.replace, os.fsync
    arrived = False

    def replacing(source: str | os.PathLike[str], target_: str | os.PathLike[str]) -> None:
        nonlocal arrived
        replace(source, target_)
        arrived = arrived or Path(target_) == target

    def interrupted_fsync(fd: int) -> None:
        if arrived and os.readlink(f"/proc/self/fd/{fd}") == str(target.parent):
            raise KeyboardInterrupt
        fsync(fd)

    monkeypatch.setattr(os, "replace", replacing)
    monkeypatch.setattr(os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        export(True)
    assert arrived
    assert sorted(f.name for f in target.iterdir()) == ["card.json", "model.onnx"]
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_replace_of_a_symlinked_version_leaves_no_old_link_and_keeps_what_it_pointed_to(
    tmp_path: Path,
) -> None:
    """--replace of a version that is a link to a directory (a repository assembled from links)
    renamed the link aside as .old-*, and removing it failed unseen (rmtree refuses a link): the link
    stayed behind. It is unlinked; the directory it pointed to is not the export's to delete."""
    out = tmp_path.resolve() / "models"
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}

    def export(out_dir: Path, overwrite: bool) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out_dir, example_inputs={"z": z},
            card=card, fp16=False, overwrite=overwrite,
        )  # fmt: skip

    elsewhere = export(tmp_path.resolve() / "elsewhere", False)
    kept = sorted(f.name for f in elsewhere.iterdir())
    (out / "tiny-gen").mkdir(parents=True)
    (out / "tiny-gen" / "1").symlink_to(elsewhere, target_is_directory=True)
    target = export(out, True)
    assert not target.is_symlink() and sorted(f.name for f in target.iterdir()) == ["card.json", "model.onnx"]
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []
    assert sorted(f.name for f in elsewhere.iterdir()) == kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_export_of_a_module_whose_weights_are_not_float32_names_the_weight_and_the_fix(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """A module left in float64 (`.double()`) or float16 (`.half()`) failed with torch's own
    RuntimeError 'mat1 and mat2 must have the same dtype', no ExportError (which export_model
    promises for every failure) and no word of which weight or of the fix."""
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    with pytest.raises(KindMismatchError, match=rf"fc\.weight.*{dtype}.*float\(\)"):
        export_model(
            _TinyImage(0).to(dtype), kind="generator", name="tiny-gen", out_dir=tmp_path / "models",
            example_inputs={"z": z}, card={"description": "tiny", "output_range": [-1.0, 1.0]}, fp16=False,
        )  # fmt: skip
    assert not (tmp_path / "models").exists()


def test_a_quality_figure_meets_its_threshold_at_the_bound_and_fails_just_past_it() -> None:
    """A threshold is a bound the figure must meet: equal to its min or max passes, past it fails,
    each naming the metric; a figure not computed fails too."""
    thresholds = {"psnr": {"min": 20.0}, "fid": {"max": 5.0}, "both": {"min": 0.0, "max": 1.0}}
    assert check_thresholds({"psnr": 20.0, "fid": 5.0, "both": 1.0}, thresholds) == []
    assert check_thresholds({"psnr": 21.0, "fid": 4.0, "both": 0.0}, thresholds) == []
    failures = check_thresholds({"psnr": 19.99, "fid": 5.01, "both": -0.01}, thresholds)
    assert failures == [
        "quality psnr = 19.99 is below the minimum 20.0",
        "quality fid = 5.01 is above the maximum 5.0",
        "quality both = -0.01 is below the minimum 0.0",
    ]
    assert check_thresholds({"psnr": 20.0, "fid": 5.0, "both": 1.01}, thresholds) == [
        "quality both = 1.01 is above the maximum 1.0"
    ]
    assert check_thresholds({"psnr": 20.0, "fid": 5.0}, thresholds) == [
        "quality figure 'both' was not computed (threshold {'min': 0.0, 'max': 1.0})"
    ]


@pytest.mark.parametrize("given_as", ["path", "bytes"])  # a recipe's auxiliary graph comes as its bytes
def test_an_extra_file_whose_digest_the_card_does_not_record_is_refused_naming_it_before_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    """export_model's extra_files travel with the graph, and every caller of this package records
    their digests in the card (a recipe's auxiliary graph in aux_graphs, an import's licence and
    reference pair in source.files_sha256), which verify holds them to. A library caller's extra file
    listed in neither was published with no digest anywhere (verify never checked it, an .onnx one
    failed verify as unlisted), and one listed under another digest failed verify only once
    published. Both are refused naming the file, before the export's work; one listed with its
    digest is published beside the graph and verify checks it."""
    import hashlib

    from genserve_export import InvalidArgumentError
    from genserve_export import export as export_module

    notes = tmp_path / "notes.txt"
    notes.write_text("how this model was made\n")
    digest = hashlib.sha256(notes.read_bytes()).hexdigest()
    z = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    card = {"description": "tiny", "output_range": [-1.0, 1.0]}
    out = tmp_path / "models"
    extra = notes.read_bytes() if given_as == "bytes" else notes

    def export(card: dict[str, object]) -> Path:
        return export_model(
            _TinyImage(0), kind="generator", name="tiny-gen", out_dir=out, example_inputs={"z": z},
            card=card, fp16=False, extra_files={"notes.txt": extra},
        )  # fmt: skip

    def exported(*args: object, **kwargs: object) -> None:
        raise AssertionError("the graph was exported with an extra file that is refused")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "_export_and_optimize", exported)
        with pytest.raises(InvalidArgumentError, match=r"'notes\.txt'.*neither.*aux_graphs.*files_sha256"):
            export(card)
        for listed in (
            {"source": {"files_sha256": {"notes.txt": "0" * 64}}},
            {"aux_graphs": {"notes.txt": {"sha256": "0" * 64}}},
        ):
            with pytest.raises(InvalidArgumentError, match=r"'notes\.txt'.*sha256.*differs"):
                export({**card, **listed})
    assert not out.exists() or not any(out.rglob("*"))

    target = export({**card, "source": {"files_sha256": {"notes.txt": digest}}})
    assert (target / "notes.txt").read_bytes() == notes.read_bytes()
    assert verify_repository(out, recompute_quality=False).ok
    (target / "notes.txt").write_text("changed\n")
    report = verify_repository(out, recompute_quality=False)
    assert not report.ok and "notes.txt" in " ".join(report.models[0].errors), report.format()
