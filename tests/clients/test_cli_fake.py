"""The CLI's argument checks and exit codes, in-process against the fake server (no models)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from client_fakes import FakeServer, cli_main, run_cli
from PIL import Image

from genserve.v1 import genserve_pb2, types_pb2
from genserve_client import cli
from genserve_client.cli import UsageError, resolve_labels


def test_bad_labels_are_a_usage_error(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = ("--target", fake_server.target)
    for args in (
        ("sample", "--model", "fake-cond", "--labels", "1,x", "--out", str(tmp_path)),
        ("bulk", "--model", "fake-cond", "--labels", "odd", "--n", "4", "--out", str(tmp_path)),
    ):
        code, _, err = cli_main(capsys, *t, *args)
        assert code == 2, err
        assert "--labels" in err and "Traceback" not in err
    # Refused before any call but GetModel's (a class name is checked against the model's classes).
    assert set(fake_server.service.calls) <= {"GetModel"}
    # resolve_labels is called after parsing: it raises the CLI's usage error, not argparse's.
    info = genserve_pb2.ModelInfo(name="m", kind="generator")
    with pytest.raises(UsageError, match="--labels"):
        resolve_labels(info, "1,x")
    assert resolve_labels(info, "1,2") == [1, 2]
    # Valid labels still work.
    code, _, err = cli_main(
        capsys, *t, "sample", "--model", "fake-cond", "--labels", "1,2", "--n", "2", "--out", str(tmp_path)
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("model", "bad", "message"),
    [
        ("fake-gen", ("--seed", str(2**63)), "--seed must be in [0, 2^63 - n] = [0, 9223372036854775798]"),
        ("fake-gen", ("--seed", str(2**63 - 5)), "--seed must be in"),  # seed + 9 is past 2^63 - 1
        ("fake-gen", ("--seed", "-1"), "--seed must be in"),
        ("fake-gen", ("--chunk-size", "-1"), "--chunk-size must be 0 (the server's default) or 1.."),
        ("fake-gen", ("--chunk-size", str(2**32)), "--chunk-size must be 0"),
        ("fake-cond", ("--labels", "3,99999999999"), "class indices in [0, 2^31), got 99999999999"),
        ("fake-cond", ("--labels", "-1"), "class indices in [0, 2^31), got -1"),
    ],
)
def test_bulk_refuses_values_its_requests_cannot_carry_before_it_starts(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    model: str,
    bad: tuple[str, str],
    message: str,
) -> None:
    # They used to fail building a stream's request in a worker thread: a traceback on stderr, and
    # the job reported success (exit 0) with no image written.
    out = tmp_path / "job"
    t = ("--target", fake_server.target)
    code, stdout, err = cli_main(capsys, *t, "bulk", "--model", model, "--n", "10", "--out", str(out), *bad)
    assert code == 2, (stdout, err)
    assert message in err and "Traceback" not in err
    assert not out.exists()  # no job.json, no lock, nothing
    assert fake_server.service.calls["SampleStream"] == 0


def test_a_resume_with_values_its_requests_cannot_carry_changes_nothing(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "job"
    t = ("--target", fake_server.target)
    seed = str(2**63 - 15)  # room for 15 images
    assert (
        cli_main(capsys, *t, "bulk", "--model", "fake-gen", "--n", "10", "--seed", seed, "--out", str(out))[0]
        == 0
    )
    job, manifest = (out / "job.json").read_bytes(), (out / "manifest.jsonl").read_bytes()
    streams = fake_server.service.calls["SampleStream"]
    for bad, message in (
        (("--chunk-size", "-1"), "--chunk-size must be 0"),
        (
            (),
            "--n 20 takes the job's seeds past 2^63 - 1 (its base seed is 9223372036854775793): "
            "--n can be at most 15",
        ),
    ):
        code, stdout, err = cli_main(capsys, *t, "bulk", "--resume", str(out), "--n", "20", *bad)
        assert code == 2, (stdout, err)
        assert message in err and "Traceback" not in err
        # Refused before the grown job.json is written: the job is still the 10-image job.
        assert (out / "job.json").read_bytes() == job
        assert (out / "manifest.jsonl").read_bytes() == manifest
    assert fake_server.service.calls["SampleStream"] == streams
    code, _, err = cli_main(capsys, *t, "bulk", "--resume", str(out), "--n", "15")
    assert code == 0, err
    assert json.loads((out / "job.json").read_text())["params"]["n"] == 15
    assert (out / "manifest.jsonl").read_text().count("\n") == 15


@pytest.mark.parametrize(
    "bad",
    [
        ("--rate", "0"),
        ("--concurrency", "0"),
        ("--duration", "0"),
        ("--duration", "-1"),
        ("--warmup", "-1"),
        ("--max-outstanding", "0"),
        ("--channels", "0"),
    ],
)
def test_bench_refuses_settings_it_cannot_run(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], bad: tuple[str, str]
) -> None:
    code, _, err = cli_main(capsys, "--target", fake_server.target, "bench", "--model", "fake-gen", *bad)
    assert code == 2, err
    assert bad[0] in err and "Traceback" not in err
    assert not fake_server.service.calls


@pytest.mark.parametrize("rate", ["-5", "nan", "10,inf"])
def test_bench_refuses_rates_that_never_end(fake_server: FakeServer, rate: str) -> None:
    # A subprocess with a timeout: these rates used to spin the event loop forever.
    proc = run_cli(
        "--target", fake_server.target, "bench", "--model", "fake-gen", "--rate", rate, timeout_s=60
    )
    assert proc.returncode == 2, proc.stderr
    assert "--rate values must be finite and > 0" in proc.stderr
    assert not fake_server.service.calls


def test_bench_fails_when_no_request_succeeds(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run = ("bench", "--concurrency", "1", "--duration", "0.2", "--warmup", "0")
    code, out, err = cli_main(capsys, "--target", fake_server.target, *run, "--model", "bad")
    assert code == 1, err
    assert "INVALID_ARGUMENT=" in out  # the errors are still printed in the table
    assert "no successful request" in err
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run, "--model", "fake-gen", "--json")
    assert code == 0, err


@pytest.mark.parametrize(
    "flags",
    [("--top-k", "0"), ("--top-top-k", "0"), ("--top-k", "3"), ("--temperature", "0.5")],
)
def test_a_code_prior_option_on_a_generator_is_refused_whatever_its_value(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, str]
) -> None:
    # --top-k 0 and --top-top-k 0 (the prior's default) on a generator were taken without a word,
    # while any other code-prior option given to it (--top-k 3, --temperature) is refused.
    grid = tmp_path / "g.png"
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, "sample", "--model", "fake-gen", "--n", "1", *flags,
        "--grid", str(grid),
    )  # fmt: skip
    assert code == 2, err
    assert flags[0] in err and "code priors" in err, err
    assert not grid.exists()
    assert set(fake_server.service.calls) <= {"GetModel"}


def test_image_commands_refuse_unknown_output_suffixes(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(src)
    for command in ("upscale", "translate"):
        out = tmp_path / "big.tiff"
        code, _, err = cli_main(
            capsys, "--target", fake_server.target, command, str(src), str(out), "--model", "m"
        )
        assert code == 2, err
        assert ".png .jpg .jpeg .webp" in err
        assert not out.exists()
    assert not fake_server.service.calls


def test_translate_b_to_a_on_a_model_without_that_direction_is_refused_before_any_translation(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server older than ImageRequest.direction ignores the field: `translate --direction b_to_a`
    on its image_to_image model came back A -> B, written as b_to_a, exit 0. Only a
    two_way_translator (a kind as new as the field) translates B -> A: the CLI asks the model's
    kind first, and refuses any other (exit 2) before any Translate."""
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (8, 8)).save(src)
    t = ("--target", fake_server.target, "translate", str(src), str(out), "--model", "fake-i2i")
    code, _, err = cli_main(capsys, *t, "--direction", "b_to_a")
    assert code == 2, err
    assert "two_way_translator" in err and "image_to_image" in err and "b_to_a" in err, err
    assert not out.exists() and fake_server.service.calls["Translate"] == 0
    code, _, err = cli_main(capsys, *t, "--direction", "a_to_b")
    assert code == 0 and out.exists(), err


def test_interpolate_needs_an_output(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli_main(
        capsys,
        "--target",
        fake_server.target,
        "interpolate",
        "--model",
        "fake-gen",
        "--from-seed",
        "1",
        "--to-seed",
        "2",
    )
    assert code == 2, err
    assert "--out" in err and "--grid" in err
    assert not fake_server.service.calls


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker"]


@pytest.mark.parametrize(
    ("command", "labels"),
    [
        (("sample", "--label", "Dress", "--n", "1"), [3]),
        (("sample", "--label", "t-shirt/top", "--n", "1"), [0]),  # case-insensitive
        (("sample", "--labels", "trouser,2,DRESS", "--n", "1"), [1, 2, 3]),
        (("bulk", "--labels", "Dress,Coat", "--n", "2"), [3, 4]),
    ],
)
def test_labels_may_name_the_models_classes(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
    labels: list[int],
) -> None:
    """GetModel gives a conditional model's class names (cgan-fashion's 'Dress'), yet --label and
    --labels took indices only: `sample --label Dress` was refused 'expected an integer'. A class
    name (its case aside) is that class's index."""
    import client_fakes

    monkeypatch.setattr(client_fakes, "FAKE_CLASSES", FASHION_CLASSES)
    out = tmp_path / "out"
    code, _, err = cli_main(
        capsys,
        "--target",
        fake_server.target,
        command[0],
        "--model",
        "fake-cond",
        *command[1:],
        "--out",
        str(out),
    )
    assert code == 0, err
    if command[0] == "bulk":
        written = [json.loads(line)["label"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    else:
        written = sorted(int(p.stem.rsplit("_label", 1)[1]) for p in out.iterdir())
    assert written == labels


@pytest.mark.parametrize(
    "command",
    [
        ("sample", "--label", "Dres", "--out", "x"),
        ("sample", "--labels", "Dress,Dres", "--out", "x"),
        ("bulk", "--labels", "Dres", "--n", "2", "--out", "x"),
        ("arithmetic", "--a", "1", "--b", "2", "--c", "3", "--label", "Dres", "--grid", "x.png"),
        ("interpolate", "--from-seed", "1", "--to-seed", "2", "--label", "Dress,Dres", "--grid", "x.png"),
        ("bench", "--labels", "Dres", "--duration", "0.2", "--warmup", "0", "--concurrency", "1"),
    ],
)
def test_an_unknown_class_name_is_refused_listing_the_models_classes(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    import client_fakes

    classes = FASHION_CLASSES + [f"extra-{i}" for i in range(20)]
    monkeypatch.setattr(client_fakes, "FAKE_CLASSES", classes)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, command[0], "--model", "fake-cond", *command[1:]
    )
    assert code == 2, err
    assert "has no class named 'Dres'" in err and "Traceback" not in err, err
    assert "0: T-shirt/top, 1: Trouser" in err and "19: extra-11, ... (28 in all)" in err, err
    assert "extra-12" not in err, err
    generating = ("Sample", "SampleStream", "Interpolate")
    assert not any(fake_server.service.calls[m] for m in generating)


@pytest.mark.parametrize(
    "command",
    [
        ("sample", "--label", "dress", "--out", "x"),
        ("bulk", "--labels", "0,dress", "--n", "2", "--out", "x"),
    ],
)
def test_a_class_name_matching_two_classes_ignoring_case_is_refused_as_ambiguous(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
) -> None:
    """A model whose class names differ only in case ('Dress', 'DRESS' aside 'dress'): a name equal
    to two of them ignoring case was refused 'has no class named', though it names both -> it is
    refused as ambiguous, naming the classes it matches."""
    import client_fakes

    monkeypatch.setattr(client_fakes, "FAKE_CLASSES", ["T-shirt/top", "Dress", "DRESS"])
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, command[0], "--model", "fake-cond", *command[1:]
    )
    assert code == 2, err
    assert "has no class named" not in err and "Traceback" not in err, err
    assert "ambiguous" in err and "1: Dress" in err and "2: DRESS" in err, err
    assert "give the exact name or the index" in err, err
    generating = ("Sample", "SampleStream", "Interpolate")
    assert not any(fake_server.service.calls[m] for m in generating)


def test_labels_all_expands_for_a_class_conditional_code_prior() -> None:
    prior = genserve_pb2.ModelInfo(name="p", kind="code_prior", class_names=[str(d) for d in range(10)])
    assert resolve_labels(prior, "all") == list(range(10))
    # No --labels: all classes, as for a conditional GAN (the server refuses a class-conditional
    # prior's request without labels: step_sampler.check_labels); a prior without classes gets none.
    assert resolve_labels(prior, None) == list(range(10))
    assert resolve_labels(genserve_pb2.ModelInfo(name="u", kind="code_prior"), None) == []
    assert resolve_labels(genserve_pb2.ModelInfo(name="g", kind="generator"), "all") == []


def test_bench_that_no_request_passes_prints_the_servers_reason(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # `bench --model sr-photos-x4` (a model Sample refuses) printed only INVALID_ARGUMENT=505: the
    # server's message, the only thing that says why, was dropped.
    run = ("bench", "--concurrency", "1", "--duration", "0.2", "--warmup", "0")
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run, "--model", "bad")
    assert code == 1, err
    assert "model: 'bad' is rejected by the fake" in err


def test_models_prints_the_servers_reasons_on_one_line_without_terminal_escapes(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reason quotes whatever the model repository holds (a config.json key, a card value, ONNX
    Runtime's message naming the graph's nodes): `models` printed it as it came, so a newline broke
    the table with a line of the repository writer's choosing and ESC sequences reached the user's
    terminal. Each cell and reason is printed with its control characters escaped."""
    evil = "bad key\n fake-gen  generator  1  READY\x1b[2J\x1b]0;title\x07"
    plain = fake_server.service._info

    def info(name: str) -> genserve_pb2.ModelInfo:
        answer = plain(name)
        answer.reason = f"config.json: {evil} is not a known field"
        answer.versions[0].reason = evil
        return answer

    monkeypatch.setattr(fake_server.service, "_info", info)
    code, out, _ = cli_main(capsys, "--target", fake_server.target, "models")
    assert code == 0
    assert not any(c in out for c in "\x1b\x07\r"), repr(out)
    lines = out.splitlines()
    served = len(fake_server.service.models)
    assert len(lines) == 1 + 2 * served, lines  # the header, a row and a reason line per model
    assert sum("bad key\\n fake-gen" in line for line in lines) == 2 * served, lines


def test_models_prints_a_non_ascii_reason_to_a_c_locale_terminal(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a locale that is not UTF-8 (LANG=C, Python's UTF-8 mode and locale coercion off) stdout
    is ASCII: a reason quoting a repository's non-ASCII text (a config.json key 'größe') made
    `models` stop mid-table with "'ascii' codec can't encode character" and exit 2, a usage error.
    The table is printed, what the terminal cannot show written as \\xNN / \\uNNNN, exit 0."""
    plain = fake_server.service._info

    def info(name: str) -> genserve_pb2.ModelInfo:
        answer = plain(name)
        answer.reason = "config.json: unknown key 'größe' — see the docs"
        return answer

    monkeypatch.setattr(fake_server.service, "_info", info)
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    done = subprocess.run(
        [sys.executable, "-m", "genserve_client", "--target", fake_server.target, "models"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    out, err = done.stdout.decode("ascii"), done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, (out, err)
    assert out.splitlines()[0].startswith("name"), out
    reasons = out.count("unknown key 'gr\\xf6\\xdfe' \\u2014 see the docs")
    assert reasons == len(fake_server.service.models), out  # one line per model


def test_a_path_the_locale_does_not_decode_is_printed_on_stdout_as_it_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder name whose bytes a UTF-8 locale does not decode (a Latin-1 'r\xe9sultats' from an
    old archive) is held as lone surrogates, and a stdout with strict errors (Python's under
    en_US.UTF-8, UTF-8 mode off) made its 'wrote' line name 'r\\udce9sultats', a folder that does
    not exist: its bytes are written as they came, as stderr's lines write them; what the encoding
    cannot hold is still written as a repr writes it."""
    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    out = os.fsdecode(b"/srv/r\xe9sultats")
    cli._out(f"wrote 2 images to {out}")
    stdout.flush()
    assert raw.getvalue() == b"wrote 2 images to /srv/r\xe9sultats\n"


def test_an_os_error_naming_a_path_the_locale_does_not_decode_prints_the_path_as_it_came(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """Under LANG=C (Python's UTF-8 mode and locale coercion off) a non-ASCII file name is held as
    lone surrogates, and an OSError's text quotes it by repr: `upscale` of a missing 'résumé.png'
    said "No such file or directory: 'r\\udcc3\\udca9sum\\udcc3\\udca9.png'", a name nobody typed.
    The line names the file by its bytes as they came, as the CLI's other lines do; exit 1."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env.pop("PYTHONIOENCODING", None)
    missing = os.fsencode(tmp_path) + "/résumé.png".encode()
    done = subprocess.run(
        [sys.executable, "-m", "genserve_client", "--target", fake_server.target, "upscale"]
        + [missing, os.fsencode(tmp_path / "out.png"), b"--model", b"fake-sr"],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert b"\\udc" not in done.stderr, done.stderr
    assert done.stderr.count(b"\n") == 1, done.stderr
    assert b"No such file or directory: '" + missing + b"'" in done.stderr, done.stderr


def test_a_servers_error_is_printed_on_one_line_without_terminal_escapes(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A refusal quotes what the model repository holds (a version's reason: a config.json key, ONNX
    Runtime's message naming the graph's nodes): the CLI printed it to stderr as it came, newlines
    and ESC sequences included."""
    evil = "no ready version (bad key\ngenserve-client: forged\x1b[2J\x1b]0;title\x07)"
    fake_server.service.fail["Sample"].append((grpc.StatusCode.FAILED_PRECONDITION, evil))
    out = str(tmp_path / "a.png")
    args = ("--target", fake_server.target, "sample", "--model", "fake-gen", "--out", out)
    code, _, err = cli_main(capsys, *args)
    assert code == 1
    assert not any(c in err for c in "\x1b\x07\r"), repr(err)
    assert err.count("\n") == 1 and "bad key\\ngenserve-client: forged" in err, repr(err)


def test_a_sample_split_over_replicas_older_and_newer_than_used_models_is_one_model(
    fake_server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """During a rolling upgrade a command's calls reach replicas older than Provenance.used_models
    (they name no mapping: not reported) and upgraded ones (they name it): the model is the same, so
    the command is not refused as mixing two models, and its PNGs name the mapping."""
    service = fake_server.service
    provenance = type(service)._provenance
    mapping = ("fake-mapping", "1", "ab" * 32)

    def old_then_new(model: str, version: str) -> types_pb2.Provenance:
        service.used_models = [mapping] if service.calls["Sample"] % 2 == 0 else []
        return provenance(service, model, version)

    monkeypatch.setattr(service, "_provenance", old_then_new)
    try:
        code, _, err = cli_main(
            capsys, "--target", fake_server.target, "sample", "--model", "fake-gen", "--n", "600",
            "--seed", "3", "--out", str(tmp_path),
        )  # fmt: skip
    finally:
        service.used_models = []
    assert code == 0, err
    assert service.calls["Sample"] == 3
    files = sorted(tmp_path.glob("*.png"))
    assert len(files) == 600
    assert {Image.open(f).text.get("used_models") for f in files} == {
        "fake-mapping version 1 sha256 " + "ab" * 32
    }


def test_bench_gives_each_call_its_own_request_id(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server echoes and logs x-request-id: one id for every call of a run (warm-up and every
    level alike) left its logs unable to tell the calls apart."""
    run = ("bench", "--model", "fake-gen", "--concurrency", "1,2", "--duration", "0.2", "--warmup", "0.1")
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run)
    assert code == 0, err
    ids = [md.get("x-request-id") for md in fake_server.service.metadata[1:]]  # [0]: GetModel
    assert fake_server.service.calls["Sample"] == len(ids) > 3
    assert None not in ids and len(set(ids)) == len(ids), ids[:5]


def test_bench_measures_the_version_its_version_flag_names(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--version (help: 'default: the highest ready') was accepted and never sent: every call went
    to the highest ready version, so the figures were of another version than the one asked for."""
    fake_server.service.version = "7"  # (a GetModel naming a version the fake lacks is NOT_FOUND)
    run = ("bench", "--model", "fake-gen", "--version", "7", "--concurrency", "1", "--duration", "0.2")
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run, "--warmup", "0.1", "--json")
    assert code == 0, err
    versions = fake_server.service.sample_versions
    assert versions and set(versions) == {"7"}, set(versions)


def test_an_open_loop_level_is_measured_over_its_whole_duration(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sparse open loop ended its window at its last arrival, not at --duration: 2/s fixed over
    1.4 s sends at 0, 0.5 and 1 s, and reported 3 img/s over a 1 s window instead of 3 over 1.4 s."""
    run = ("bench", "--model", "fake-gen", "--rate", "2", "--arrivals", "fixed", "--warmup", "0")
    code, out, err = cli_main(capsys, "--target", fake_server.target, *run, "--duration", "1.4", "--json")
    assert code == 0, err
    (level,) = json.loads(out)
    assert level["images"] == 3
    assert level["duration_s"] >= 1.4
    assert level["images_per_s"] == pytest.approx(3 / level["duration_s"], abs=0.01)


def test_an_open_loop_level_that_sent_nothing_says_so(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rate too low for --duration draws no arrival: the level failed as 'no successful request
    ... (errors: {})', which did not say that no request was sent, nor what to change. Poisson
    arrivals (fixed ones start with the level): the open loop's seed puts 0.5/s's first at 3.7 s."""
    run = ("bench", "--model", "fake-gen", "--rate", "0.5", "--arrivals", "poisson", "--warmup", "0")
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run, "--duration", "0.3")
    assert code == 1, err
    assert fake_server.service.calls["Sample"] == 0
    assert "no request was sent at open rate 0.5" in err and "--duration" in err, err


def test_the_warm_up_before_open_loops_keeps_to_max_outstanding(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-outstanding protects a fragile server from more calls in flight, yet with --rate alone
    the warm-up ran a closed loop at the largest --concurrency (64 by default) before it."""
    fake_server.service.sample_delay_s = 0.02
    run = ("bench", "--model", "fake-gen", "--rate", "20", "--duration", "0.3", "--warmup", "0.3")
    code, _, err = cli_main(capsys, "--target", fake_server.target, *run, "--max-outstanding", "2")
    assert code == 0, err
    assert fake_server.service.calls["Sample"] > 2
    assert fake_server.service.sample_peak <= 2


def test_a_call_the_server_never_answers_does_not_stretch_the_levels_throughput_window(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The level waits for its calls in flight, each up to --timeout, but its window ran to the
    last answer, a failed one too: one call the server never answered stretched a 0.5 s level's
    window to its --timeout (60 s by default) and img/s was divided by it, a figure of --timeout,
    not of the server. The window ends at the last success (--duration at least); the hung call
    is in errors."""
    fake_server.service.sample_hangs = 1
    run = ("bench", "--model", "fake-gen", "--concurrency", "2", "--duration", "0.5", "--warmup", "0")
    code, out, err = cli_main(capsys, "--target", fake_server.target, *run, "--timeout", "3", "--json")
    assert code == 0, err
    (level,) = json.loads(out)
    assert level["errors"] == {"DEADLINE_EXCEEDED": 1} and level["images"] > 0
    assert 0.5 <= level["duration_s"] < 3
    assert level["images_per_s"] == pytest.approx(level["images"] / level["duration_s"], rel=0.01)


@pytest.mark.parametrize("first_stdout", ["reader gone", "closed"])
def test_a_run_in_process_answers_for_its_own_stdout_not_an_earlier_runs(
    fake_server: FakeServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    first_stdout: str,
) -> None:
    """What became of stdout (its reader gone, closed from the start) was kept in a module global
    for the process: once one cli.main() run had met it, every later run in that process (a test, a
    program running the CLI more than once) answered 141 without a word, or 1 'write error: stdout
    is closed', for a command that printed its output and succeeded."""
    t = ("--target", fake_server.target)
    with monkeypatch.context() as patched:
        if first_stdout == "closed":
            patched.setattr(sys, "stdout", None)
            assert cli.main([*t, "models"]) == 1
        else:
            read_end, write_end = os.pipe()
            os.close(read_end)  # the reader is gone
            with open(write_end, "w") as stream:
                patched.setattr(sys, "stdout", stream)
                assert cli.main([*t, "models"]) == 141
    capsys.readouterr()
    code, out, err = cli_main(capsys, *t, "models")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[0].startswith("name"), out


@pytest.mark.parametrize(
    ("model", "labels", "refusal"),
    [
        ("fake-cond", "3,10", "fake-cond has no class 10: its classes are [0, 10)"),
        ("fake-gen", "0", "fake-gen is a generator without classes: it takes no labels"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [
        ("sample", "--out", "x"),
        ("bulk", "--n", "2", "--out", "x"),
        ("bench", "--duration", "0.2", "--warmup", "0", "--concurrency", "1"),
    ],
)
def test_labels_the_model_cannot_take_are_refused_before_any_call_in_one_words(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: tuple[str, ...],
    model: str,
    labels: str,
    refusal: str,
) -> None:
    """sample, bulk and bench check --labels against the model's classes with one check
    (classes.class_refusal; bench had its own copy, worded differently), before any call: the
    server refuses such a label on every call (only conditional models take labels), so a bench
    run would measure nothing but INVALID_ARGUMENT, a sample or bulk run fail after its folder."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(
        capsys, "--target", fake_server.target, command[0], "--model", model, "--labels", labels, *command[1:]
    )
    assert code == 2, err
    assert f"{command[0]}: --labels: {refusal}" in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    assert fake_server.service.calls["Sample"] == fake_server.service.calls["SampleStream"] == 0


def test_an_arithmetic_grids_png_records_the_class_a_name_picked_by_its_index(
    fake_server: FakeServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`arithmetic --label dress` wrote `label` = `dress` into its grid's PNG, as typed, where every
    other PNG (sample's, interpolate's, a bulk job's) records the class's index -> the index."""
    import client_fakes

    monkeypatch.setattr(client_fakes, "FAKE_CLASSES", FASHION_CLASSES)
    grid = tmp_path / "g.png"
    code, _, err = cli_main(
        capsys,
        "--target",
        fake_server.target,
        "arithmetic",
        "--model",
        "fake-cond",
        *("--a", "1", "--b", "2", "--c", "3"),
        "--label",
        "dress",
        "--grid",
        str(grid),
    )
    assert code == 0, err
    with Image.open(grid) as picture:
        assert picture.text["label"] == "3"  # type: ignore[attr-defined]
