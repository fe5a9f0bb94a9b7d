"""The CLI as a tool people script: printed seeds, provenance in PNGs, bounded grids, defaults in
help, GENSERVE_TARGET and connection flags on either side of the command (fake server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from client_fakes import FAKE_SHA256, FakeServer, cli_main, fake_pixels
from PIL import Image

from genserve_client.cli import MAX_GRID_IMAGES


def test_sample_prints_the_seed_it_picked_and_the_pngs_carry_provenance(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    args = ("sample", "--model", "fake-cond", "--labels", "2,5", "--n", "3", "--format", "png")
    code, out, err = cli_main(
        capsys, *t, *args, "--grid", str(tmp_path / "g.png"), "--out", str(tmp_path / "d")
    )
    assert code == 0, err
    seed = int(out.split("seed ")[1].split()[0])
    assert f"--seed {seed}" in out
    with Image.open(tmp_path / "g.png") as grid:
        text = dict(grid.text)  # type: ignore[attr-defined]
        pixels = np.asarray(grid)
    assert text["seeds"] == f"{seed}..{seed + 2}" and text["labels"] == "2,5"
    assert (text["model"], text["version"], text["model_sha256"]) == ("fake-cond", "1", FAKE_SHA256)
    files = sorted((tmp_path / "d").iterdir())
    assert len(files) == 6
    for f in files:
        with Image.open(f) as picture:
            meta = dict(picture.text)  # type: ignore[attr-defined]
            s, label = int(meta["seed"]), int(meta["label"])
            assert f.name.endswith(f"_seed{s}_label{label}.png") and meta["model_sha256"] == FAKE_SHA256
            # The server's PNG is not re-encoded: same pixels, only the text chunks added.
            np.testing.assert_array_equal(np.asarray(picture)[:, :, None], fake_pixels(s, label))
    # The printed seed reproduces the grid.
    code, out, err = cli_main(capsys, *t, *args, "--seed", str(seed), "--grid", str(tmp_path / "g2.png"))
    assert code == 0, err
    assert "seed " not in out
    with Image.open(tmp_path / "g2.png") as again:
        np.testing.assert_array_equal(np.asarray(again), pixels)


def test_raw_images_and_other_commands_carry_provenance_too(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    code, _, err = cli_main(
        capsys,
        *t,
        "sample",
        "--model",
        "fake-gen",
        "--n",
        "2",
        "--seed",
        "9",
        "--format",
        "raw",
        "--out",
        str(tmp_path),
    )
    assert code == 0, err
    seeds = []
    for f in sorted(tmp_path.iterdir()):
        with Image.open(f) as picture:
            seeds.append(picture.text["seed"])  # type: ignore[attr-defined]
            assert picture.text["model_sha256"] == FAKE_SHA256  # type: ignore[attr-defined]
    assert seeds == ["9", "10"]


def png_texts(folder: Path) -> list[dict[str, str]]:
    found = []
    for f in sorted(folder.iterdir()):
        with Image.open(f) as picture:
            found.append(dict(picture.text))  # type: ignore[attr-defined]
    return found


def test_sample_files_record_psi_as_the_grid_does(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/client.md, Provenance in PNGs: the per-image files of `sample --out` (server PNGs and
    raw pixels) carry `psi` with the grid's key and format, and only when it was given."""
    t = ("--target", fake_server.target)
    sample = ("sample", "--model", "fake-gen", "--n", "2", "--seed", "3", "--psi", "0.7")
    code, _, err = cli_main(
        capsys, *t, *sample, "--out", str(tmp_path / "s"), "--grid", str(tmp_path / "g.png")
    )
    assert code == 0, err
    with Image.open(tmp_path / "g.png") as grid:
        assert grid.text["psi"] == "0.7"  # type: ignore[attr-defined]
    code, _, err = cli_main(capsys, *t, *sample, "--format", "raw", "--out", str(tmp_path / "raw"))
    assert code == 0, err
    for folder in ("s", "raw"):
        assert [(m["seed"], m.get("psi")) for m in png_texts(tmp_path / folder)] == [
            ("3", "0.7"),
            ("4", "0.7"),
        ]
    code, _, err = cli_main(capsys, *t, *sample[:-2], "--out", str(tmp_path / "none"))
    assert code == 0, err
    assert all("psi" not in m for m in png_texts(tmp_path / "none"))


def test_bulk_images_record_the_jobs_psi(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    job = tmp_path / "job"
    bulk = ("bulk", "--model", "fake-cond", "--labels", "1,2", "--n", "3", "--psi", "0.7")
    code, _, err = cli_main(capsys, *t, *bulk, "--out", str(job))
    assert code == 0, err
    assert [(m["index"], m["label"], m.get("psi")) for m in png_texts(job / "images")] == [
        ("0", "1", "0.7"),
        ("1", "2", "0.7"),
        ("2", "1", "0.7"),
    ]
    # A grown job takes psi from job.json, and so do its new images.
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(job), "--n", "5")
    assert code == 0, err
    assert [m.get("psi") for m in png_texts(job / "images")] == ["0.7"] * 5


def test_a_grid_too_large_is_refused_before_any_call(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    grid = tmp_path / "g.png"
    code, _, err = cli_main(capsys, *t, "sample", "--model", "fake-gen", "--n", "100000", "--grid", str(grid))
    assert code == 2 and f"at most {MAX_GRID_IMAGES} images" in err and "--n 100000" in err
    assert not fake_server.service.calls and not grid.exists()
    # Per class rows count too: 200 x 10 classes.
    code, _, err = cli_main(capsys, *t, "sample", "--model", "fake-cond", "--n", "200", "--grid", str(grid))
    assert code == 2 and "--n 200 x 10 classes asks for 2000" in err
    assert fake_server.service.calls["Sample"] == 0 and not grid.exists()
    code, _, err = cli_main(capsys, *t, "sample", "--model", "fake-gen", "--n", "0", "--grid", str(grid))
    assert code == 2 and "--n must be >= 1" in err


def test_an_interpolate_grid_too_large_does_not_advise_what_the_server_refuses_too(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One Interpolate call draws the whole path, at most max_images_per_request steps (256 by
    default): the grid's refusal advised --out or `bulk`, which cannot draw a path of 5000 either."""
    grid = tmp_path / "i.png"
    argv = ("--target", fake_server.target, "interpolate", "--model", "fake-gen", "--from-seed", "1")
    code, out, err = cli_main(capsys, *argv, "--to-seed", "2", "--steps", "5000", "--grid", str(grid))
    assert code == 2 and not out and f"at most {MAX_GRID_IMAGES} images" in err and "--steps 5000" in err
    assert "--out" not in err and "bulk" not in err and "max_images_per_request" in err
    assert not fake_server.service.calls and not grid.exists()


def test_an_arithmetic_grid_too_large_is_refused_before_any_call(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = tmp_path / "a.png"
    many = ",".join(map(str, range(2000)))
    argv = ("--target", fake_server.target, "arithmetic", "--model", "fake-gen", "--grid", str(grid))
    code, out, err = cli_main(capsys, *argv, "--a", many, "--b", "1", "--c", "2")
    # 2000 + 1 + 1 members and the 4 means: a picture of 2001 columns, refused like any other grid.
    assert code == 2 and f"at most {MAX_GRID_IMAGES} images" in err and "asks for 2006" in err
    assert "Traceback" not in err and not out
    assert not fake_server.service.calls["Sample"] and not grid.exists()


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ([], ["(default: 60"]),
        (["sample"], ["(default: 8)", "(default: png)"]),
        (["bulk"], ["(default: 300.0)", "(default: 1)", "(default: 0)", "(default: png)"]),
        (["bench"], ["(default: 10.0)", "(default: 256)", "(default: poisson)"]),
        (["edit"], ["(default: 2.0)", "(default: 9)"]),
    ],
)
def test_help_shows_the_defaults(
    capsys: pytest.CaptureFixture[str], command: list[str], shown: list[str]
) -> None:
    code, out, _ = cli_main(capsys, *command, "--help")
    assert code == 0
    flat = " ".join(out.split())
    for text in shown:
        assert text in flat, text
    assert "default: None" not in flat and "==SUPPRESS==" not in flat


@pytest.mark.parametrize("form", ["{host}:{port}", "dns:///{host}:{port}"])
def test_a_target_port_past_65535_is_refused_not_wrapped_onto_another_port(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    host, port = fake_server.target.rsplit(":", 1)
    # 65536 more than the fake's port: gRPC took it modulo 65536 and reached the fake (another
    # server than the one named) instead of refusing it, as it refuses a list's.
    wrapped = form.format(host=host, port=int(port) + 65536)
    code, out, err = cli_main(capsys, "--target", wrapped, "--timeout", "5", "models")
    assert code == 2 and not out, out
    assert err.count("\n") == 1 and "--target" in err and "1..65535" in err and str(int(port) + 65536) in err
    assert not fake_server.service.calls


def test_target_from_the_environment_and_flags_after_the_command(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GENSERVE_TARGET", fake_server.target)
    code, out, err = cli_main(capsys, "models")
    assert code == 0, err
    assert "fake-cond" in out
    monkeypatch.setenv("GENSERVE_TARGET", "127.0.0.1:1")  # nothing listens there
    code, out, err = cli_main(capsys, "models", "--target", fake_server.target, "--timeout", "5")
    assert code == 0, err
    assert "fake-gen" in out
    # A flag before the command is kept (the command's own default does not overwrite it).
    code, out, err = cli_main(capsys, "--target", fake_server.target, "models")
    assert code == 0, err
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, "models", "--target", "127.0.0.1:1", "--timeout", "1"
    )
    assert code == 1 and "UNAVAILABLE" in err  # the later one wins


def test_version_prints_the_package_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`genserve-client --version`: the distribution and its version, exit 0, no server needed; a
    command's own --version (a model version) stays the command's."""
    import genserve_client

    code, out, err = cli_main(capsys, "--version")
    assert (code, out, err) == (0, f"genserve-client {genserve_client.__version__}\n", "")
