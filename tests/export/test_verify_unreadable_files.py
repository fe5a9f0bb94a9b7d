"""`genserve-export verify` reports a repository file it cannot read (a directory where a file should
be, a file that is not UTF-8, one without read permission, a FIFO or a device that would block or read
without end) as that model's error naming the file and the cause, and goes on checking the other
models: never a traceback that checks nothing more, nor a hang."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from server_support import fails_within
from torch import nn

from genserve_export import export_model
from genserve_export import verify as verify_module
from genserve_export.cli import main as cli_main


class GrayGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(z)).view(-1, 1, 8, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    torch.manual_seed(0)
    for name in ("broken", "healthy"):
        export_model(
            GrayGenerator(),
            kind="generator",
            name=name,
            out_dir=root,
            example_inputs={"z": torch.randn(4, 8)},
            card={"description": "gray 8x8 generator", "output_range": [-1, 1]},
            fp16=False,
        )
    return root


def _a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe{}")


def _a_fifo(path: Path) -> None:
    """A named pipe no one writes to: opening it to read waits for a writer, forever."""
    path.unlink()
    os.mkfifo(path)


def _a_link_to_dev_zero(path: Path) -> None:
    """A device that reads without end."""
    path.unlink()
    path.symlink_to("/dev/zero")


FAULTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "config.json is a directory": ("broken/config.json", _a_directory, "Is a directory"),
    "config.json is not UTF-8": ("broken/config.json", _not_utf8, "UTF-8"),
    "card.json is not UTF-8": ("broken/1/card.json", _not_utf8, "UTF-8"),
    "model.onnx is a directory": ("broken/1/model.onnx", _a_directory, "Is a directory"),
    "config.json is a FIFO": ("broken/config.json", _a_fifo, "not a regular file (a FIFO)"),
    "card.json is a FIFO": ("broken/1/card.json", _a_fifo, "not a regular file (a FIFO)"),
    "model.onnx is a FIFO": ("broken/1/model.onnx", _a_fifo, "not a regular file (a FIFO)"),
    "model.onnx is a link to /dev/zero": (
        "broken/1/model.onnx",
        _a_link_to_dev_zero,
        "not a regular file (a character device)",
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_file_verify_cannot_read_is_an_error_naming_it_and_the_other_models_are_checked(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    relative, damage, cause = FAULTS[fault]
    damage(repo / relative)
    with fails_within(60):
        code = cli_main(["verify", str(repo), "--no-quality", "--no-thresholds"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert Path(relative).name in out and cause in out, out
    assert "[OK] healthy/1" in out, out


def test_a_model_file_without_read_permission_is_an_error_naming_it(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod 000 does not stop root (tests may run as root): the read is refused as the OS would.
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    victim = repo / "broken" / "1" / "model.onnx"
    real = verify_module.sha256_file

    def refused(path: Path) -> str:
        if path == victim:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    monkeypatch.setattr(verify_module, "sha256_file", refused)
    code = cli_main(["verify", str(repo), "--no-quality", "--no-thresholds"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "model.onnx" in out and "Permission denied" in out, out
    assert "[OK] healthy/1" in out, out


@pytest.mark.parametrize("content", ["null", "5", '"a card"', "[1, 2]"])
def test_a_card_that_is_not_a_json_object_is_an_error_saying_so(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    (repo / "broken" / "1" / "card.json").write_text(content)
    code = cli_main(["verify", str(repo), "--no-quality", "--no-thresholds"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "broken/1/card.json: must be a JSON object" in out, out
    assert "missing field" not in out, out
    assert "[OK] healthy/1" in out, out


@pytest.mark.parametrize("recipe", [["dcgan-digits"], {"name": "dcgan-digits"}, 5])
def test_a_card_whose_recipe_is_not_a_string_is_an_error_naming_the_field(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], recipe: object
) -> None:
    """A card's `recipe` is a string or null (docs/model-repository.md): a list or an object crashed
    verify's quality step (TypeError: unhashable type), checking no other model; a number passed."""
    repo = tmp_path / "repo"
    shutil.copytree(exported, repo)
    path = repo / "broken" / "1" / "card.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "recipe": recipe}))
    code = cli_main(["verify", str(repo), "--no-thresholds"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "broken/1/card.json: field 'recipe' must be a string or null" in out, out
    assert "[OK] healthy/1" in out, out


def test_a_repository_in_a_non_ascii_folder_verifies_under_a_c_locale(exported: Path, tmp_path: Path) -> None:
    """On a machine whose locale is not UTF-8 (LANG=C, Python's UTF-8 mode and locale coercion off),
    Python holds a non-ASCII path's bytes as lone surrogates, which ONNX Runtime's binding refused:
    every model of a repository under /srv/modèles failed verify with 'model.onnx does not load in
    ONNX Runtime: __init__(): incompatible constructor arguments'. They load and pass."""
    repo = tmp_path / "modèles dir"
    shutil.copytree(exported, repo)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "genserve_export.cli", "verify", str(repo), "--no-quality", "--no-thresholds"],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    out = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, out
    assert "[OK] broken/1" in out and "[OK] healthy/1" in out, out
