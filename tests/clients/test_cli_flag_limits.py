"""The CLI's commands other than bulk: a flag value the request cannot carry, or a file
name no picture can be written to, is refused before any call with a message naming the flag and
its limit (exit 2), never protobuf's bare `Value out of range: N` or PIL's `unknown file
extension` after all the work."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from client_fakes import FakeServer, cli_main
from code_models import write_code_models
from PIL import Image
from server_support import ServerProcess, running_server, vae_decoder_graph, vae_encoder_graph, write_model

from genserve_client import cli
from genserve_client.cli import MAX_GRID_IMAGES

U32 = "0..4294967295"
POSITIVE = "1..4294967295"
BIG = str(2**63)
INTERP = ["interpolate", "--model", "fake-gen", "--from-seed", "1"]
UPSCALE = ["upscale", "in.png", "out.png", "--model", "fake-gen"]
EDIT = ["edit", "in.png", "--model", "vae", "--out", "e.png", "--sweep"]
ARITH = ["arithmetic", "--model", "fake-gen"]
MIX = ["mix", "--model", "fake-gen"]


@pytest.mark.parametrize(
    ("args", "flag", "limit"),
    [
        (["sample", "--model", "fake-gen", "--n", "2", "--seed", str(2**63 - 1)], "--seed", "2^63 - n"),
        (["sample", "--model", "fake-gen", "--n", "1", "--seed", BIG], "--seed", "2^63"),
        (["sample", "--model", "fake-cond", "--n", "1", "--label", str(2**40)], "--label", "2^31"),
        (["sample", "--model", "fake-gen", "--n", "1", "--top-k", "-1"], "--top-k", U32),
        (["sample", "--model", "fake-gen", "--n", "4", "--cols", "-1"], "--cols", POSITIVE),
        ([*INTERP, "--to-seed", BIG], "--to-seed", "2^63"),
        ([*INTERP, "--to-seed", "2", "--steps", "-5"], "--steps", U32),
        ([*INTERP, "--to-seed", "2", "--label", str(2**40)], "--label", "2^31"),
        ([*MIX, "--rows", "1", "--cols", "2", "--crossover", "-1"], "--crossover", U32),
        ([*MIX, "--rows", "", "--cols", "2"], "--rows", "one or more"),
        ([*ARITH, "--a", "", "--b", "1", "--c", "2"], "--a", "one or more"),
        ([*ARITH, "--a", BIG, "--b", "1", "--c", "2"], "--a", "2^63"),
        ([*UPSCALE, "--tile-size", "-1"], "--tile-size", U32),
        ([*UPSCALE, "--tile-overlap", str(2**32)], "--tile-overlap", U32),
        ([*EDIT, "--sweep-steps", "0"], "--sweep-steps", POSITIVE),
        (
            ["sample", "--model", "fake-cond", "--n", "1", "--label", "3", "--labels", "1,2"],
            "--labels",
            "not both",
        ),
        (["bench", "--model", "fake-cond", "--labels", str(2**40), "--duration", "1"], "--labels", "2^31"),
        (["bench", "--model", "fake-cond", "--labels", "-1", "--duration", "1"], "--labels", "2^31"),
        (["models", "--timeout", "0"], "--timeout", "> 0"),
        (["--target", " ", "models"], "--target", "empty"),
        (["models", "--timeout", "nan"], "--timeout", "> 0"),
        (["--timeout", "-1", "models"], "--timeout", "> 0"),
    ],
)
def test_a_flag_out_of_range_is_refused_naming_the_flag_and_its_limit(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    flag: str,
    limit: str,
) -> None:
    grid = tmp_path / "g.png"
    extra = ["--grid", str(grid)] if args[0] in ("sample", "interpolate", "mix", "arithmetic") else []
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args, *extra)
    assert code == 2, err
    assert flag in err and limit in err, err
    assert "Value out of range" not in err and "Traceback" not in err
    assert not fake_server.service.calls and not grid.exists()


def test_edit_all_dims_without_sweep_is_refused_rather_than_editing_dim_0(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all-dims draws a row per dimension of the --sweep grid: without --sweep it was ignored, and
    the command wrote one picture of z[0] moved by --delta (exit 0), not what was asked for."""
    image, out = tmp_path / "in.png", tmp_path / "e.png"
    Image.new("L", (8, 8), 128).save(image)
    args = ["edit", str(image), "--model", "vae", "--out", str(out), "--all-dims"]
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args)
    assert code == 2, err
    assert "--all-dims" in err and "--sweep" in err, err
    assert not fake_server.service.calls and not out.exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--sweep-from", "-1"), "--sweep-from"),
        (("--sweep-to", "1"), "--sweep-to"),
        (("--sweep-steps", "9"), "--sweep-steps"),  # its default given is given all the same
        (("--sweep-from", "-1", "--sweep-to", "1"), "--sweep-from, --sweep-to"),
        (("--sweep", "--delta", "1"), "--delta"),
        (("--sweep", "--delta", "2"), "--delta"),
        (("--sweep", "--all-dims", "--dim", "3"), "--dim"),
        (("--sweep", "--all-dims", "--dim", "0"), "--dim"),  # its default given is given all the same
    ],
)
def test_an_edit_flag_given_where_it_has_no_effect_is_refused_naming_it(
    review_server: tuple[ServerProcess, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    named: str,
) -> None:
    """--sweep-from/--sweep-to/--sweep-steps shape the --sweep grid and --delta the single edit:
    given to the other they were ignored without a word (argparse defaults), as --all-dims was, and
    the command wrote what the flag did not ask for (exit 0); --dim likewise beside --all-dims, which
    sweeps every dimension."""
    server, _ = review_server
    image, out = tmp_path / "in.png", tmp_path / "e.png"
    Image.new("L", (8, 8), 128).save(image)
    args = ["edit", str(image), "--model", "vae", "--out", str(out), *flags]
    code, _, err = cli_main(capsys, "--target", server.target, *args)
    assert code == 2, err
    assert f"edit: {named} " in err and "--sweep" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["grid.txt", "grid", "."])
@pytest.mark.parametrize("flag", ["--grid", "--progress"])
def test_a_picture_name_without_an_image_suffix_is_refused_before_any_call(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flag: str
) -> None:
    target = tmp_path / name
    args = ["sample", "--model", "fake-gen", "--n", "2", "--seed", "1", "--out", str(tmp_path / "d"), flag]
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args, str(target))
    assert code == 2, err
    assert flag in err and ".png" in err and "unknown file extension" not in err, err
    assert not fake_server.service.calls


@pytest.fixture(scope="module")
def review_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("review-models")
    names = write_code_models(root)
    card = {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [0.0, 1.0]}
    write_model(root, "vae-decoder", "vae_decoder", vae_decoder_graph(8, 8, 8), card)
    enc_card = {**card, "channels": None, "input_channels": 1, "output_range": None}
    enc_card["input_range"] = [0.0, 1.0]
    write_model(root, "vae-encoder", "vae_encoder", vae_encoder_graph(8, 8, 8), enc_card)
    with running_server(root, tmp_path_factory.mktemp("review-server")) as server:
        yield server, names


def test_sample_on_a_class_conditional_code_prior_defaults_to_all_classes(
    review_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--labels: "default for conditional models: all"; a code prior with class names refuses a
    request without labels, so the default must give it its classes, as it does a conditional GAN."""
    server, names = review_server
    grid = tmp_path / "g.png"
    args = ("--target", server.target, "sample", "--model", names["prior"], "--n", "2", "--seed", "3")
    code, _, err = cli_main(capsys, *args, "--grid", str(grid))
    assert code == 0, err
    code, _, err = cli_main(capsys, *args, "--labels", "all", "--grid", str(tmp_path / "all.png"))
    assert code == 0, err
    with Image.open(grid) as default, Image.open(tmp_path / "all.png") as every:
        assert default.text["labels"] == every.text["labels"] == "0,1,2"  # type: ignore[attr-defined]
        assert default.tobytes() == every.tobytes()


def test_an_edit_sweep_grid_captions_the_values_z_dim_is_set_to(
    review_server: tuple[ServerProcess, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--sweep sets z[dim] to each value (--delta is what adds): its columns were captioned +0.00,
    +0.75..., which read as offsets added to the image's z[dim]."""
    server, _ = review_server
    image, out = tmp_path / "in.png", tmp_path / "sweep.png"
    Image.new("L", (8, 8), 128).save(image)
    drawn: list[list[str]] = []
    real = cli.make_grid

    def recording(rows: Any, *, captions: Any = (), **kwargs: Any) -> Any:
        drawn.append(list(captions))
        return real(rows, captions=captions, **kwargs)

    monkeypatch.setattr(cli, "make_grid", recording)
    code, _, err = cli_main(capsys, "--target", server.target, "edit", str(image), "--model", "vae",
                            "--out", str(out), "--sweep", "--dim", "3", "--sweep-from", "-1",
                            "--sweep-to", "1", "--sweep-steps", "3")  # fmt: skip
    assert code == 0, err
    assert drawn == [["input", "=-1.00", "=0.00", "=1.00"]]  # beside the row's label z[3]


def test_an_edit_sweep_grid_is_bounded_like_every_other_grid(
    review_server: tuple[ServerProcess, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, _ = review_server
    image, out = tmp_path / "in.png", tmp_path / "sweep.png"
    Image.new("L", (8, 8), 128).save(image)
    base = ("--target", server.target, "edit", str(image), "--model", "vae", "--out", str(out), "--sweep")
    code, _, err = cli_main(capsys, *base, "--sweep-steps", "100000")
    assert code == 2 and f"at most {MAX_GRID_IMAGES} images" in err and "--sweep-steps 100000" in err, err
    code, _, err = cli_main(capsys, *base, "--all-dims", "--sweep-steps", "200")  # 8 x 201 cells
    assert code == 2 and "asks for 1608" in err, err
    assert not out.exists()
    code, _, err = cli_main(capsys, *base, "--all-dims", "--sweep-steps", "5")
    assert code == 0, err
    with Image.open(out) as picture:
        assert picture.height > picture.width  # 8 rows (one per dimension), 6 columns (input + 5 values)


@pytest.mark.parametrize(
    ("args", "flag", "limit"),
    [
        (["sample", "--model", "fake-gen", "--n", "100001"], "--n", "100000"),
        (["sample", "--model", "fake-cond", "--labels", "all", "--n", "10001"], "--n", "100000"),
        (["bench", "--model", "fake-gen", "--concurrency", "1,4097"], "--concurrency", "4096"),
        (["bench", "--model", "fake-gen", "--channels", "4097", "--duration", "0.1"], "--channels", "4096"),
        (["bench", "--model", "fake-gen", "--rate", "100001", "--duration", "0.1"], "--rate", "100000"),
        (["bulk", "--model", "fake-gen", "--n", "2", "--concurrency", "4097"], "--concurrency", "4096"),
    ],
)
def test_a_sample_count_or_bench_concurrency_past_its_limit_is_refused_before_any_call(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    flag: str,
    limit: str,
) -> None:
    """`sample --n` and `bench --concurrency` had no upper bound: a typo (--n 5000000000) built a
    list of that many seeds (or workers) and the process was killed for memory, with nothing said.
    Past sample's 100,000 images (--n x classes: it holds every image until written; `bulk` streams
    any number to disk) and bench's 4,096 workers, the flag is refused naming its limit, exit 2.
    bench --channels (a connection each, ~7 KB apiece before any call) and bulk --concurrency (a
    stream planned per worker, up to --n of them) are bounded the same way."""
    out = ["--out", str(tmp_path / "out")] if args[0] in ("sample", "bulk") else []
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args, *out)
    assert code == 2, err
    assert flag in err and limit in err and "Traceback" not in err, err
    assert not fake_server.service.calls.get("Sample") and not (tmp_path / "out").exists()


def test_a_negative_number_in_exponent_form_is_taken_as_its_flags_value() -> None:
    # Python < 3.13's argparse took only -3 and -0.5 for negative numbers: `edit --delta -1e-3` and
    # `--sweep-from -1e5` were refused 'argument --delta: expected one argument', the number read
    # as an unknown option.
    args = cli.build_parser().parse_args(
        ["edit", "in.png", "--model", "vae", "--delta", "-1e-3", "--sweep-from", "-1e3", "--sweep-to",
         "-.5", "--out", "o.png"]
    )  # fmt: skip
    assert (args.delta, args.sweep_from, args.sweep_to) == (-1e-3, -1e3, -0.5)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--model", "fake-cond", "--grid", "g.png"], "a row per class"),
        (["--model", "fake-cond", "--label", "1", "--grid", "g.png"], "a row per class"),
        (["--model", "fake-gen", "--out", "d"], "--grid"),
    ],
)
def test_sample_cols_where_it_lays_out_nothing_is_refused_naming_it(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    said: str,
) -> None:
    """--cols lays out an unconditional model's grid; a conditional model's grid has a row per
    class, so `sample --label 3 --n 64 --cols 8` wrote a strip of 64 images, the flag dropped without
    a word (as it was without --grid) -> refused, exit 2, naming --cols, before any Sample."""
    monkeypatch.chdir(tmp_path)
    argv = ["--target", fake_server.target, "sample", "--n", "4", "--seed", "1", "--cols", "2", *args]
    code, out, err = cli_main(capsys, *argv)
    assert code == 2 and not out, (code, out, err)
    assert "--cols" in err and said in err and "Traceback" not in err, err
    assert not fake_server.service.calls.get("Sample")
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--tls-ca", "", "models"], "--tls-ca"),
        (["models", "--tls-cert", "", "--tls-key", "k.pem"], "--tls-cert"),
        (["models", "--tls-cert", "c.pem", "--tls-key", ""], "--tls-key"),
        (["--token-file", "", "models"], "--token-file"),
        (["sample", "--model", "fake-gen", "--n", "1", "--out", ""], "--out"),
        (["sample", "--model", "fake-gen", "--n", "1", "--grid", ""], "--grid"),
        ([*INTERP, "--to-seed", "2", "--out", ""], "--out"),
        ([*MIX, "--rows", "1", "--cols", "2", "--grid", ""], "--grid"),
        ([*EDIT[:-3], "--out", ""], "--out"),
        (["upscale", "", "out.png", "--model", "fake-gen"], "input"),
        (["upscale", "in.png", "", "--model", "fake-gen"], "output"),
        (["bulk", "--model", "fake-gen", "--n", "3", "--out", ""], "--out"),
        (["bulk", "--resume", ""], "--resume"),
        (["verify", ""], "DIR"),
    ],
)
def test_an_empty_path_flag_is_refused_naming_the_flag_not_taken_as_the_working_folder_or_as_not_given(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    flag: str,
) -> None:
    """An empty path (`--tls-ca "$CA"` with the variable unset) was taken as no flag at all (a
    plaintext connection where TLS was asked for, no token sent) or as the working folder (a bulk
    job, a verify of `.`): a usage error naming the flag, before any call."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(capsys, "--target", fake_server.target, *args)
    assert code == 2, err
    assert flag in err and "empty" in err, err
    assert "Traceback" not in err
    assert not fake_server.service.calls
    assert list(tmp_path.iterdir()) == []
