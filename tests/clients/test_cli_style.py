"""`genserve-client mix` (the style-mixing grid) and the library's mix_styles, against a real server
holding tiny synthetic style models (tests/server/style_models.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client_fakes import cli_main, run_cli
from PIL import Image
from server_support import ServerProcess, running_server
from style_models import MIX_CROSSOVER, NUM_LAYERS, write_style_models

from genserve.v1 import genserve_pb2 as pb
from genserve_client import GenserveClient, calls, cli
from genserve_client.cli import default_crossover
from genserve_client.grid import make_grid


@pytest.fixture(scope="module")
def style_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("style-models")
    names = write_style_models(root)
    with running_server(root, tmp_path_factory.mktemp("style-server")) as server:
        yield server, names


def test_the_library_mixes_styles(style_server: tuple[ServerProcess, dict[str, str]]) -> None:
    server, names = style_server
    with GenserveClient(server.target) as client:
        result = client.mix_styles(
            names["generator"], [(1, 2), (3, 4, 1)], crossover=2, format="raw", psi=0.5
        )
        again = client.mix_styles(names["generator"], [(3, 4)], crossover=1, format="raw", psi=0.5)
    assert result.seeds == [1, 3]
    assert result.raw[1] == again.raw[0]  # the per-mix crossover, not the default
    with pytest.raises(ValueError, match="return_latents"):
        client.mix_styles(names["generator"], [(1, 2)], crossover=1, return_latents=True)


def test_the_library_refuses_a_crossover_of_0_rather_than_mixing_at_another(
    style_server: tuple[ServerProcess, dict[str, str]],
) -> None:
    """A crossover is 0 < crossover < num_layers (genserve.proto, docs/client.md), but 0 is proto3's
    unset: mix_styles(m, [(1, 2, 0)], crossover=2) sent the mix as giving none and got back an image
    mixed at 2, not the refusal the docs promise (nor the fine seed's own image 0 would mean), and
    crossover=0 came back as 'mixes[0].crossover: required', naming a field not given. An explicit 0
    is a ValueError naming its field and the range, before any call."""
    server, names = style_server
    with GenserveClient(server.target) as client:
        for mixes, options, field in (
            ([(1, 2), (3, 4, 0)], {"crossover": 2}, "mixes[1].crossover"),
            ([(1, 2)], {"crossover": 0}, "crossover"),
        ):
            with pytest.raises(ValueError, match=rf"^{re.escape(field)}: must be in 1\.\.num_layers - 1"):
                client.mix_styles(names["generator"], mixes, format="raw", **options)
        assert len(client.mix_styles(names["generator"], [(3, 4, 1)], crossover=2, format="raw").raw) == 1


@pytest.mark.parametrize("zero", [np.int64(0), np.uint32(0), np.int32(0)])
def test_a_numpy_crossover_of_0_is_refused_as_an_int_0_is(zero: Any) -> None:
    """The refusal of an explicit crossover 0 looked for a Python int only: a numpy integer 0 (a
    crossover taken from np.arange or an array of mixes) went on the wire as proto3's unset, the mix
    then mixed at the request's crossover and the request's came back 'mixes[0].crossover:
    required'. It is refused naming the field, as 0 is."""
    for mixes, options, field in (
        ([(1, 2), (3, 4, zero)], {"crossover": 2}, "mixes[1].crossover"),
        ([(1, 2)], {"crossover": zero}, "crossover"),
    ):
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}: must be in 1\.\.num_layers - 1"):
            calls.mix_styles("g", mixes, **options)
    assert calls.mix_styles("g", [(3, 4, np.int64(1))], crossover=np.int64(2)).request.mixes[0].crossover == 1


def test_cli_mix_draws_the_grid_and_interpolates_in_w_space(
    style_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    server, names = style_server
    grid = tmp_path / "mix.png"
    args = (
        "--target",
        server.target,
        "mix",
        "--model",
        names["generator"],
        "--rows",
        "1,2,3",
        "--cols",
        "7,8",
    )
    proc = run_cli(*args, "--psi", "0.7", "--grid", str(grid))
    assert proc.returncode == 0, proc.stderr
    with Image.open(grid) as picture:
        assert picture.text["crossover"] == str(MIX_CROSSOVER)  # type: ignore[attr-defined]
        assert picture.text["rows"] == "1,2,3" and picture.text["cols"] == "7,8"  # type: ignore[attr-defined]
        assert picture.height > picture.width  # 4 rows (header + 3) of 3 cells
        pixels = np.asarray(picture)
    assert pixels.std() > 0
    bad = run_cli(*args, "--crossover", str(NUM_LAYERS), "--grid", str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and "crossover" in bad.stderr and f"1..{NUM_LAYERS - 1}" in bad.stderr
    target = ("--target", server.target)
    wrong = run_cli(*target, "mix", "--model", names["mapping"], "--rows", "1", "--cols", "2",
                    "--grid", str(tmp_path / "w.png"))  # fmt: skip
    assert wrong.returncode == 2 and "style_generator" in wrong.stderr
    strip = tmp_path / "path.png"
    interp = run_cli(*target, "interpolate", "--model", names["generator"], "--from-seed", "1",
                     "--to-seed", "2", "--steps", "4", "--grid", str(strip))  # fmt: skip
    assert interp.returncode == 0, interp.stderr


@pytest.mark.parametrize(
    ("card_json", "expected"),
    [
        ('{"mix_crossover": 6}', 6),
        ("{}", 4),
        ('{"mix_crossover": 8}', 4),
        ('{"mix_crossover": 0}', 4),
        ('{"mix_crossover": true}', 4),
        ('{"mix_crossover": false}', 4),
    ],
)
def test_mix_defaults_to_the_cards_crossover(card_json: str, expected: int) -> None:
    """A card's crossover out of range, or not an int (JSON true, which Python's bool makes an int
    1), is no crossover: num_layers // 2, as the library refuses a bool crossover."""
    info = pb.ModelInfo(name="m", kind="style_generator", num_layers=8)
    info.versions.add(version="1", card_json=card_json)
    assert default_crossover(info) == expected


def test_mix_reads_the_card_of_the_version_it_will_use() -> None:
    """The newest READY version serves a call without --version: its card decides, not version 1's;
    --version N reads N's card."""
    info = pb.ModelInfo(name="m", kind="style_generator", num_layers=8)
    ready = pb.MODEL_STATE_READY
    info.versions.add(version="1", state=ready, card_json='{"mix_crossover": 2}')
    info.versions.add(version="10", state=ready, card_json='{"mix_crossover": 6}')
    info.versions.add(version="11", state=pb.MODEL_STATE_LOADING, card_json='{"mix_crossover": 7}')
    info.versions.add(version="9", state=ready, card_json='{"mix_crossover": 5}')
    assert default_crossover(info) == 6
    assert default_crossover(info, "1") == 2
    assert default_crossover(info, "11") == 7


def test_arithmetic_on_a_style_generator_truncates_every_image_of_its_grid_in_w_space(
    style_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A style generator's --psi truncates in w space, the mean and A - B + C images (explicit z) as
    the sets' images (seeds): a one-seed set's mean is the seed's own image. It was refused while
    explicit z took no psi (the means came out untruncated beside truncated members)."""
    server, names = style_server
    drawn: dict[str | None, list[cli.GridRow]] = {}
    for psi in ("0.5", None):

        def keep_rows(rows: list[cli.GridRow], psi: str | None = psi, **kw: Any) -> Image.Image:
            drawn[psi] = rows
            return make_grid(rows, **kw)

        monkeypatch.setattr(cli, "make_grid", keep_rows)
        grid = tmp_path / f"sum-{psi}.png"
        extra = ["--psi", psi] if psi is not None else []
        argv = ["--target", server.target, "arithmetic", "--model", names["generator"]]
        assert cli.main([*argv, "--a", "1", "--b", "2", "--c", "3", *extra, "--grid", str(grid)]) == 0
        with Image.open(grid) as img:
            assert img.text.get("psi") == psi
    for rows in drawn.values():
        member, mean = (np.asarray(im) for im in rows[0].images)  # set A: seed 1, then its mean
        np.testing.assert_array_equal(member, mean)
    assert not np.array_equal(np.asarray(drawn["0.5"][0].images[0]), np.asarray(drawn[None][0].images[0]))


def test_mix_refuses_a_crossover_outside_the_layers_naming_the_flag(
    style_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    # `mix --crossover 0` reached the server as "unset" and came back as "mixes[0].crossover:
    # required here or in crossover", for a flag the user did give.
    server, names = style_server
    grid = tmp_path / "mix.png"
    for bad in ("0", str(NUM_LAYERS)):
        proc = run_cli("--target", server.target, "mix", "--model", names["generator"], "--rows", "1",
                       "--cols", "2", "--crossover", bad, "--grid", str(grid))  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert f"--crossover must be in 1..{NUM_LAYERS - 1}" in proc.stderr and f"got {bad}" in proc.stderr
        assert not grid.exists()


def test_a_mix_grid_too_large_is_refused_counting_the_images_it_would_hold(
    style_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `mix --rows` 32 seeds `--cols` 32 seeds was refused as asking for 1089 images: (32 + 1) x (32 + 1)
    # cells, the blank corner cell counted as an image and the rows' and columns' own images left
    # unsaid, so the number matched nothing the user asked for (32 x 32 = 1024 mixes); and it said
    # "write files with --out", a flag mix does not have.
    server, names = style_server
    seeds = ",".join(map(str, range(1, 33)))
    grid = tmp_path / "mix.png"
    code, _, err = cli_main(capsys, "--target", server.target, "mix", "--model", names["generator"],
                            "--rows", seeds, "--cols", seeds, "--grid", str(grid))  # fmt: skip
    assert code == 2 and not grid.exists(), err
    assert "1024 mixes" in err and "own 64 images" in err and "asks for 1088" in err, err
    assert "1089" not in err and "--out" not in err, err  # mix has no --out to suggest


def test_mix_calls_hold_at_most_per_call_mixes_and_distinct_seeds() -> None:
    # The server maps a call's distinct seeds in one request to the mapping's queue.
    pairs = [(r, c) for r in range(10, 16) for c in range(20, 26)]  # 36 mixes of 12 seeds
    calls = cli.mix_calls(pairs, 8)
    assert [p for call in calls for p in call] == pairs
    assert all(len(call) <= 8 and len({s for p in call for s in p}) <= 8 for call in calls)
    assert cli.mix_calls(pairs, 256) == [pairs]


def test_a_style_generators_pngs_name_the_mapping_version_that_made_them(
    style_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path
) -> None:
    """types.proto Provenance.used_models: a style generator's images are a function of its mapping's
    version too (a reload of the mapping changes them, not `model`). A PNG that names only the
    generator does not say what made it: the file and a bulk job's files record the mapping."""
    server, names = style_server
    with GenserveClient(server.target) as client:
        used = client.sample(names["generator"], seeds=[5], format="png").provenance.used_models
    assert [m for m, _, _ in used] == [names["mapping"]]
    (mapping, version, sha256) = used[0]
    out = tmp_path / "out"
    proc = run_cli("--target", server.target, "sample", "--model", names["generator"], "--n", "1",
                   "--seed", "5", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = tmp_path / "job"
    bulk = run_cli("--target", server.target, "bulk", "--model", names["generator"], "--n", "2",
                   "--out", str(job))  # fmt: skip
    assert bulk.returncode == 0, bulk.stderr
    for path in [*out.glob("*.png"), *(job / "images").glob("*.png")]:
        with Image.open(path) as picture:
            text = picture.text  # type: ignore[attr-defined]
        assert f"{mapping} version {version} sha256 {sha256}" in text.get("used_models", ""), (path, text)
