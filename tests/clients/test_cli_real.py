"""Every `genserve-client` command, run as a subprocess against the real tiny-model server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from client_fakes import run_cli
from exec_support import exec_wrapped
from PIL import Image
from server_support import (
    externalize_weights,
    running_server,
    slow_generator_graph,
    vae_decoder_graph,
    wait_until,
    write_model,
    write_vae_encoder,
)

from genserve.v1 import genserve_pb2, genserve_pb2_grpc


def cli(server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    proc = run_cli("--target", server.target, *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_models_table(tiny_server: Any) -> None:
    out = cli(tiny_server, "models").stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "conditional_generator" in lines["tiny-cond"] and "READY" in lines["tiny-cond"]
    assert "UNAVAILABLE" in lines["tiny-broken"]  # readiness and its reason are shown


def test_sample_writes_files_and_a_row_per_class(tiny_server: Any, tmp_path: Path) -> None:
    cli(
        tiny_server,
        "sample",
        "--model",
        "tiny-cond",
        "--n",
        "4",
        "--seed",
        "10",
        "--out",
        str(tmp_path / "d"),
        "--grid",
        str(tmp_path / "g.png"),
    )
    files = sorted((tmp_path / "d").iterdir())
    assert len(files) == 40 and all(f.suffix == ".png" for f in files)
    with Image.open(tmp_path / "g.png") as grid:
        text = grid.text  # type: ignore[attr-defined]
        assert text["model"] == "tiny-cond" and text["seeds"] == "10..13" and len(text["model_sha256"]) == 64
        one_class = cli(
            tiny_server,
            "sample",
            "--model",
            "tiny-cond",
            "--label",
            "3",
            "--n",
            "4",
            "--seed",
            "10",
            "--grid",
            str(tmp_path / "g3.png"),
        )
        with Image.open(tmp_path / "g3.png") as row:
            assert grid.width == row.width and grid.height > 9 * (row.height - 8)  # ten rows of one
    assert "wrote" in one_class.stdout


def test_interpolate_and_arithmetic_grids(tiny_server: Any, tmp_path: Path) -> None:
    cli(
        tiny_server,
        "interpolate",
        "--model",
        "tiny-gen",
        "--from-seed",
        "1",
        "--to-seed",
        "2",
        "--steps",
        "6",
        "--mode",
        "lerp",
        "--psi",
        "0.7",
        "--grid",
        str(tmp_path / "i.png"),
        "--out",
        str(tmp_path / "steps"),
    )
    cli(
        tiny_server,
        "arithmetic",
        "--model",
        "tiny-cond",
        "--label",
        "4",
        "--a",
        "1,2,3",
        "--b",
        "4,5",
        "--c",
        "6",
        "--psi",
        "0.7",
        "--grid",
        str(tmp_path / "a.png"),
    )
    with Image.open(tmp_path / "i.png") as strip, Image.open(tmp_path / "a.png") as arith:
        assert strip.width > 6 * 64 and strip.height < 2 * 64 + 40
        assert arith.width > 4 * 64 and arith.height > 4 * 64  # 3 sets + the result row
        # Each PNG records the --psi its images were drawn with (docs/client.md, Provenance in PNGs).
        assert strip.text["psi"] == arith.text["psi"] == "0.7"  # type: ignore[attr-defined]
    steps = sorted((tmp_path / "steps").iterdir())
    assert len(steps) == 6
    for f in steps:
        with Image.open(f) as picture:
            assert picture.text["psi"] == "0.7"  # type: ignore[attr-defined]


def test_interpolate_out_files_record_the_path_they_lie_on(tiny_server: Any, tmp_path: Path) -> None:
    """docs/client.md, Provenance in PNGs: every PNG carries the command's own settings (`psi`,
    `from_seed`, ...). interpolate's --out files carried only psi: an image between the ends has no
    seed of its own, so nothing in the file said which path (seeds, steps, mode) made it."""
    cli(tiny_server, "interpolate", "--model", "tiny-gen", "--from-seed", "1", "--to-seed", "2",
        "--steps", "4", "--mode", "lerp", "--out", str(tmp_path / "steps"))  # fmt: skip
    files = sorted((tmp_path / "steps").iterdir())
    assert len(files) == 4
    for f in files:
        with Image.open(f) as picture:
            text = dict(picture.text)  # type: ignore[attr-defined]
        path = (text.get("from_seed"), text.get("to_seed"), text.get("steps"), text.get("mode"))
        assert path == ("1", "2", "4", "lerp"), (f.name, text)


def test_edit_and_sweep_with_the_vae(tiny_server: Any, tmp_path: Path) -> None:
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(digit)
    proc = cli(
        tiny_server,
        "edit",
        str(digit),
        "--model",
        "tiny-vae-enc",
        "--dim",
        "2",
        "--delta",
        "1.5",
        "--out",
        str(tmp_path / "e.png"),
    )
    assert "resizing" in proc.stderr and "z[2]" in proc.stdout
    with Image.open(tmp_path / "e.png") as edited:
        assert edited.size == (8, 8)
    cli(
        tiny_server,
        "edit",
        str(digit),
        "--model",
        "tiny-vae-dec",
        "--sweep",
        "--all-dims",
        "--out",
        str(tmp_path / "s.png"),
    )
    with Image.open(tmp_path / "s.png") as sweep:
        assert sweep.width > 10 * 64 and sweep.height > 8 * 64  # input + 9 values, 8 latent dims


def test_upscale_and_translate(tiny_server: Any, tmp_path: Path) -> None:
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(src)
    proc = cli(tiny_server, "upscale", str(src), str(tmp_path / "up.png"), "--model", "tiny-sr")
    cli(tiny_server, "translate", str(src), str(tmp_path / "tr.webp"), "--model", "tiny-i2i")
    with Image.open(tmp_path / "up.png") as up, Image.open(tmp_path / "tr.webp") as tr:
        assert up.size == (40, 24) and tr.size == (20, 12) and tr.format == "WEBP"
    assert proc.stdout.strip() == f"wrote {tmp_path / 'up.png'} (40x24, 1 tile)"  # one tile, not "1 tiles"


def test_upscale_and_translate_take_any_picture_pillow_reads_as_edit_does(
    tiny_server: Any, tmp_path: Path
) -> None:
    """`edit` reads any picture Pillow opens; `upscale` and `translate` sent the file's bytes as they
    were, so a BMP or TIFF was refused by the server ('not a PNG, JPEG or WEBP image', exit 2). Such
    a file now goes as a lossless PNG of its pixels: the same output as the PNG of the picture."""
    pixels = np.random.default_rng(2).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    for suffix in (".png", ".bmp", ".tiff"):
        Image.fromarray(pixels).save(tmp_path / f"in{suffix}")
    for command, model in (("upscale", "tiny-sr"), ("translate", "tiny-i2i")):
        outputs = []
        for suffix in (".png", ".bmp", ".tiff"):
            out = tmp_path / f"{command}{suffix}.png"
            cli(tiny_server, command, str(tmp_path / f"in{suffix}"), str(out), "--model", model)
            with Image.open(out) as picture:
                outputs.append(np.asarray(picture))
        assert all(np.array_equal(outputs[0], other) for other in outputs[1:]), command
    # A file the server reads goes as it is, its bytes unchanged (a JPEG is not decoded here).
    from genserve_client.cli import picture_for_server

    for suffix in (".png", ".jpg", ".webp"):
        Image.fromarray(pixels).save(tmp_path / f"as-is{suffix}")
        assert picture_for_server("upscale", tmp_path / f"as-is{suffix}") == tmp_path / f"as-is{suffix}"


def test_upscale_and_translate_pngs_record_the_commands_settings(tiny_server: Any, tmp_path: Path) -> None:
    # docs/client.md: every PNG carries "the command's own settings" (a setting not given is not
    # written). `translate --direction b_to_a` and `upscale --tile-size/--tile-overlap` wrote none, so
    # an A->B and a B->A translation of one file carried the same provenance.
    src = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(src)
    cli(
        tiny_server,
        "translate",
        str(src),
        str(tmp_path / "tr.png"),
        "--model",
        "tiny-i2i",
        "--direction",
        "a_to_b",
    )
    cli(tiny_server, "translate", str(src), str(tmp_path / "plain.png"), "--model", "tiny-i2i")
    cli(tiny_server, "upscale", str(src), str(tmp_path / "up.png"), "--model", "tiny-sr",
        "--tile-size", "96", "--tile-overlap", "8")  # fmt: skip
    with Image.open(tmp_path / "tr.png") as tr, Image.open(tmp_path / "plain.png") as plain:
        assert tr.text["direction"] == "a_to_b"  # type: ignore[attr-defined]
        assert "direction" not in plain.text  # type: ignore[attr-defined]
    with Image.open(tmp_path / "up.png") as up:
        text = up.text  # type: ignore[attr-defined]
        assert text["tile_size"] == "96" and text["tile_overlap"] == "8", text


def test_invalid_argument_exits_2_with_the_servers_message(tiny_server: Any, tmp_path: Path) -> None:
    proc = run_cli(
        "--target", tiny_server.target, "sample", "--model", "tiny-gen", "--psi", "-1", "--out", str(tmp_path)
    )
    assert (
        proc.returncode == 2
        and "INVALID_ARGUMENT: truncation_psi" in proc.stderr
        and "request id" in proc.stderr
    )


def test_a_command_naming_a_model_or_version_the_server_does_not_serve_exits_2(
    tiny_server: Any, tmp_path: Path
) -> None:
    # docs/client.md: 2 is a rejected request or bad arguments; a model or version the server does
    # not serve is one (bulk already said so), not "a failed call" (1), which scripts retry.
    cases = (("--model", "no-such-model"), ("--model", "tiny-gen", "--version", "9"))
    for flags in cases:
        proc = run_cli("--target", tiny_server.target, "sample", *flags, "--n", "1", "--out", str(tmp_path))
        assert proc.returncode == 2, (flags, proc.returncode, proc.stderr)
        assert "NOT_FOUND" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_new_bulk_job_of_an_unknown_model_or_version_exits_2_naming_the_flag(
    tiny_server: Any, tmp_path: Path
) -> None:
    # Both are bad arguments (exit 2, docs/client.md and --help), refused before the job's folder
    # is made (as every value of a job is checked), naming the flag and what the server serves.
    cases = (
        (("--model", "no-such-model"), "--model 'no-such-model'", "tiny-gen"),
        (("--model", "tiny-gen", "--version", "9"), "--version '9'", "1 (READY)"),
    )
    for flags, named, served in cases:
        out = tmp_path / flags[-1]
        proc = run_cli("--target", tiny_server.target, "bulk", *flags, "--n", "3", "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        assert named in proc.stderr and served in proc.stderr and "Traceback" not in proc.stderr
        assert "resumable" not in proc.stderr and not out.exists()


def test_a_new_bulk_job_of_a_model_kind_bulk_cannot_serve_is_refused_before_its_folder_is_made(
    tiny_server: Any, tmp_path: Path
) -> None:
    # Bulk streams SampleStream, which only the kinds that answer Sample serve: a job of another kind
    # (an encoder, an image-to-image model, a code prior) could never run, yet the server's refusal
    # came only once the job had made images/, job.lock and manifest.jsonl in --out.
    for model, kind in (("tiny-vae-enc", "vae_encoder"), ("tiny-i2i", "image_to_image")):
        out = tmp_path / model
        args = ("bulk", "--model", model, "--n", "4", "--out", str(out))
        proc = run_cli("--target", tiny_server.target, *args)
        assert proc.returncode == 2, proc.stderr
        assert model in proc.stderr and kind in proc.stderr, proc.stderr
        assert "generator" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert "resumable" not in proc.stderr and not out.exists(), proc.stderr


def test_bench_json(tiny_server: Any) -> None:
    proc = cli(
        tiny_server,
        "bench",
        "--model",
        "tiny-cond",
        "--labels",
        "0,1,2",
        "--concurrency",
        "1,4",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--rate",
        "50",
        "--closed-too",
        "--json",
    )
    runs = json.loads(proc.stdout)
    assert [(r["mode"], r["concurrency"], r["rate"]) for r in runs] == [
        ("closed", 1, None),
        ("closed", 4, None),
        ("open", 256, 50.0),
    ]
    for r in runs:
        assert r["errors"] == {} and r["images"] == r["requests"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["images_per_s"] > 0
    assert 25 <= runs[2]["requests"] <= 100  # about 50 arrivals in one second


# `genserve-client ARGS` that sends itself `signum` (or each of `signum,signum`, one after the other)
# while building its `at`-th bench request: inside a task of the running loop, where a signal lands at
# any moment of a run. Then it prints the threads
# left that the interpreter's exit would wait for (grpc's poller is a daemon, gone a moment later).
SIGNAL_MID_BENCH = """
import os, sys, threading
from genserve_client import bench
from genserve_client.__main__ import main

signums, at, args = [int(s) for s in sys.argv[1].split(",")], int(sys.argv[2]), sys.argv[3:]
build = bench.PayloadFactory.__call__
built = 0


def building(self):
    global built
    built += 1
    if built == at:
        for signum in signums:
            os.kill(os.getpid(), signum)
    return build(self)


bench.PayloadFactory.__call__ = building
sys.argv = ["genserve-client", *args]
status = main()  # as the console script runs it
print(sorted(t.name for t in threading.enumerate() if not t.daemon))
sys.exit(status)
"""


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [
        (signal.SIGINT, 130, "genserve-client: interrupted"),
        (signal.SIGTERM, 143, "genserve-client: terminated (SIGTERM)"),
    ],
)
@pytest.mark.parametrize("mode", [["--concurrency", "4"], ["--rate", "400"]])
def test_bench_stopped_by_a_signal_mid_run_exits_with_one_line_and_no_traceback(
    tiny_server: Any, mode: list[str], signum: int, status: int, line: str
) -> None:
    """Ctrl-C mid-run is asyncio.run's: it cancels the main task, which closes its channels. SIGTERM
    raised Terminated (f338eca) wherever the loop was, inside a request's task too: a traceback of it
    on stderr (besides the line), or where grpc's callback swallowed it, a bench that went on. Both
    stop a run alike: one line, exit 128 + the signal, no thread left."""
    args = ["--target", tiny_server.target, "bench", "--model", "tiny-cond", "--labels", "0,1,2"]
    # As a terminal starts it: a run started from a script's background job (a CI runner's `cmd &`)
    # inherits SIGINT ignored, and a Ctrl-C that is ignored stops nothing.
    proc = subprocess.run(
        exec_wrapped(
            [
                sys.executable,
                "-c",
                SIGNAL_MID_BENCH,
                str(int(signum)),
                "50",
                *args,
                *mode,
                "--duration",
                "60",
                "--warmup",
                "0",
            ],
            sigint="default",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == status, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr.splitlines() == [line], proc.stderr
    assert proc.stdout.splitlines() == ["['MainThread']"], proc.stdout


@pytest.mark.parametrize(
    ("signums", "status", "line"),
    [
        ((signal.SIGINT, signal.SIGTERM), 130, "genserve-client: interrupted"),
        ((signal.SIGINT, signal.SIGINT), 130, "genserve-client: interrupted"),
        ((signal.SIGTERM, signal.SIGTERM), 143, "genserve-client: terminated (SIGTERM)"),
    ],
    ids=["INT,TERM", "INT,INT", "TERM,TERM"],
)
def test_a_second_signal_while_bench_stops_ends_it_with_the_first_signals_line_and_status(
    tiny_server: Any, signums: tuple[int, int], status: int, line: str
) -> None:
    """docs/client.md: a second Ctrl-C or SIGTERM while the CLI stops ends it at once with the first
    signal's line and status. bench ran under asyncio.run's own Ctrl-C, beside a SIGTERM handler of
    its loop: a SIGTERM after a Ctrl-C only cancelled the run again, and it ended 143 'terminated
    (SIGTERM)' where the Ctrl-C had stopped it; a second Ctrl-C was a KeyboardInterrupt raised
    inside the loop, wherever it was."""
    args = ["--target", tiny_server.target, "bench", "--model", "tiny-cond", "--labels", "0,1,2"]
    proc = subprocess.run(
        exec_wrapped(
            [
                sys.executable,
                "-c",
                SIGNAL_MID_BENCH,
                ",".join(str(int(s)) for s in signums),
                "50",
                *args,
                "--concurrency",
                "4",
                "--duration",
                "60",
                "--warmup",
                "0",
            ],
            sigint="default",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == status, f"exit {proc.returncode}:\n{proc.stderr}"
    assert proc.stderr.splitlines() == [line], proc.stderr


# --- bulk: SIGKILL at any moment, resume, compare with a clean run ------------------------------


def manifest_lines(out: Path) -> int:
    try:
        return (out / "manifest.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def bulk_args(server: Any, out: Path, concurrency: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "genserve_client",
        "--target",
        server.target,
        "bulk",
        "--model",
        "tiny-cond",
        "--labels",
        "all",
        "--n",
        "4000",
        "--seed",
        "500",
        "--chunk-size",
        "16",
        "--concurrency",
        concurrency,
        "--out",
        str(out),
    ]


def kill_when(server: Any, out: Path, at_lines: int, concurrency: str) -> None:
    proc = subprocess.Popen(
        bulk_args(server, out, concurrency), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while manifest_lines(out) < at_lines and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job ended before it could be killed"


def read_manifest(out: Path) -> dict[int, dict[str, Any]]:
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_index = {e["index"]: e for e in entries}
    assert len(by_index) == len(entries), "duplicate manifest lines"
    return by_index


def test_bulk_resumes_after_sigkill_byte_identical_to_a_clean_run(tiny_server: Any, tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    kill_when(tiny_server, killed, 300, "3")
    first = manifest_lines(killed)
    kill_when(tiny_server, killed, first + 1200, "2")  # resumed with other concurrency, killed again
    assert first < manifest_lines(killed) < 4000
    for out in (killed, clean):
        proc = subprocess.run(bulk_args(tiny_server, out, "3"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    resumed, reference = read_manifest(killed), read_manifest(clean)
    assert sorted(resumed) == list(range(4000))
    assert sorted(p.name for p in (killed / "images").iterdir()) == sorted(
        Path(e["file"]).name for e in resumed.values()
    )  # no orphan, no temp file, nothing missing
    for i, entry in resumed.items():
        assert entry == reference[i]
        assert (killed / entry["file"]).read_bytes() == (clean / entry["file"]).read_bytes()
    assert resumed[7]["seed"] == 507 and resumed[7]["label"] == 7
    # The job pinned the model file the real server reports (and every chunk came from it).
    job = json.loads((killed / "job.json").read_text())
    assert job["pinned_version"] == resumed[7]["version"] and len(job["model_sha256"]) == 64
    # The same directory with other parameters is refused.
    args = bulk_args(tiny_server, killed, "1")
    args[args.index("500")] = "501"
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "base_seed: 500 -> 501" in proc.stderr


def test_bulk_stopped_by_sigterm_exits_143_with_one_line_and_resumes(
    tiny_server: Any, tmp_path: Path
) -> None:
    """A Kubernetes Job's pod, `timeout`, systemd and `kill` stop a process with SIGTERM: the CLI
    died of it (-15) with no word, where Ctrl-C stops the job cleanly (one line, exit 130). SIGTERM
    stops it the same way: the streams stopped, what is on disk flushed and resumable, one line
    naming the signal and the resume command, exit 143 (128 + SIGTERM)."""
    out = tmp_path / "job"
    proc = subprocess.Popen(
        bulk_args(tiny_server, out, "2"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while manifest_lines(out) < 200 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the job ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 143, f"exit {proc.returncode}:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("genserve-client:")]
    assert lines[0] == "genserve-client: terminated (SIGTERM)", err
    assert "the job is resumable" in lines[1] and "--resume" in lines[1], err
    stopped_at = manifest_lines(out)
    assert 200 <= stopped_at < 4000
    resume = ["--target", tiny_server.target, "bulk", "--resume", str(out)]
    resumed = subprocess.run(
        [sys.executable, "-m", "genserve_client", *resume],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(read_manifest(out)) == list(range(4000))


def test_edit_refuses_a_value_that_is_no_finite_number_naming_its_flag(
    tiny_server: Any, tmp_path: Path
) -> None:
    # `edit --delta nan` was refused by the server's check of the latents made from it (exit 2,
    # "INVALID_ARGUMENT: latents: values must be finite"), naming no flag the user gave.
    digit = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(digit)
    edit = ("--target", tiny_server.target, "edit", str(digit), "--model", "tiny-vae-enc")
    cases = (
        (("--delta", "nan"), "--delta"),
        (("--delta", "inf"), "--delta"),
        (("--delta", "1e39"), "--delta"),
        (("--sweep", "--sweep-from", "nan"), "--sweep-from"),
        (("--sweep", "--sweep-to", "-inf"), "--sweep-to"),
    )
    for flags, named in cases:
        proc = run_cli(*edit, *flags, "--out", str(tmp_path / "e.png"))
        assert proc.returncode == 2, (flags, proc.stderr)
        assert named in proc.stderr and "latents" not in proc.stderr, (flags, proc.stderr)
        assert not (tmp_path / "e.png").exists()


def test_edit_refuses_a_value_past_the_latent_bound_naming_its_flag(tiny_server: Any, tmp_path: Path) -> None:
    # A finite `edit --delta 20000` (or a sweep to 1e5) made latents past the server's |z| <= 1e4
    # and was refused by its check of them (exit 2, "INVALID_ARGUMENT: latents: values must satisfy
    # |z| <= 10000, got 19998.3"), naming no flag the user gave and a number the user never wrote.
    digit = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(digit)
    edit = ("--target", tiny_server.target, "edit", str(digit), "--model", "tiny-vae-enc")
    cases = (
        (("--delta", "20000"), "--delta"),
        (("--delta=-3e38",), "--delta"),
        (("--sweep", "--sweep-from=-20000"), "--sweep-from"),
        (("--sweep", "--sweep-to", "1e5"), "--sweep-to"),
        (("--sweep", "--sweep-to", "10000.001"), "--sweep-to"),
    )
    for flags, named in cases:
        proc = run_cli(*edit, *flags, "--out", str(tmp_path / "e.png"))
        assert proc.returncode == 2, (flags, proc.stderr)
        assert f"edit: {named} " in proc.stderr and "10000" in proc.stderr, (flags, proc.stderr)
        if "10000.001" in flags:  # the value given, not one that looks within the bound (`:g`: 10000)
            assert "got 10000.001" in proc.stderr, proc.stderr
        assert "INVALID_ARGUMENT" not in proc.stderr, (flags, proc.stderr)  # refused before the decode
        assert not (tmp_path / "e.png").exists()


def test_psi_and_temperature_refuse_a_value_that_is_no_finite_number_naming_their_flag(
    tiny_server: Any, tmp_path: Path
) -> None:
    # `--psi nan` or `--temperature inf` went to the server, whose refusal named its own field
    # (truncation_psi, temperature), not the flag the user gave, as `edit --delta nan` did.
    grid = str(tmp_path / "g.png")
    cases = (
        (("sample", "--model", "tiny-gen", "--n", "1", "--psi", "nan", "--grid", grid), "--psi"),
        (("sample", "--model", "tiny-gen", "--n", "1", "--psi", "1e39", "--grid", grid), "--psi"),
        (
            ("sample", "--model", "tiny-gen", "--n", "1", "--temperature", "inf", "--grid", grid),
            "--temperature",
        ),
        (("interpolate", "--model", "tiny-gen", "--psi=-inf", "--grid", grid), "--psi"),
    )
    for args, named in cases:
        proc = run_cli("--target", tiny_server.target, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"argument {named}" in proc.stderr and "finite" in proc.stderr, (args, proc.stderr)
        assert not Path(grid).exists()


def test_a_bulk_job_of_a_model_the_server_does_not_serve_quotes_the_calls_request_id(
    tiny_server: Any, tmp_path: Path
) -> None:
    # Every other refusal the CLI prints ends with the call's request id (the one the server logged,
    # docs/metrics.md); bulk's --model refusal printed the server's message without it.
    out = tmp_path / "job"
    proc = run_cli("--target", tiny_server.target, "bulk", "--model", "no-such-model", "--n", "3",
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "--model 'no-such-model'" in line)
    assert re.search(r"\(request id [0-9a-f]{8,}\)$", line), line


def test_edit_pngs_name_the_encoder_the_image_went_through(tiny_server: Any, tmp_path: Path) -> None:
    # docs/client.md: PNGs name in used_models the other models their images went through. An edit
    # is its source encoded, moved and decoded: its PNG named the decoder alone, so a reloaded
    # encoder (which changes the image) left no trace in it.
    from genserve_client import GenserveClient

    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(digit)
    with GenserveClient(tiny_server.target) as client:
        encoder = client.encode("tiny-vae-enc", [np.asarray(Image.open(digit))]).provenance
    named = f"tiny-vae-enc version {encoder.version} sha256 {encoder.model_sha256}"
    edit = ("edit", str(digit), "--model", "tiny-vae-dec")
    cli(tiny_server, *edit, "--dim", "1", "--out", str(tmp_path / "e.png"))
    cli(tiny_server, *edit, "--sweep", "--out", str(tmp_path / "s.png"))
    for name in ("e.png", "s.png"):
        with Image.open(tmp_path / name) as picture:
            text = picture.text  # type: ignore[attr-defined]
        assert text["model"] == "tiny-vae-dec" and named in text.get("used_models", ""), (name, text)


def test_edit_pngs_name_the_weights_of_the_encoder_the_image_went_through(tmp_path: Path) -> None:
    # An encoder whose weights are in model.onnx.data, retrained, keeps its graph file and so its
    # sha256: an edit's PNG named the encoder by (model, version, sha256) alone, the same before and
    # after, though the image differs. It names the encoder's weights_sha256 as the server reports it.
    repo = tmp_path / "models"
    write_vae_encoder(repo, "ext-encoder")
    externalize_weights(repo / "ext-encoder" / "1")
    card = {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [0.0, 1.0]}
    write_model(repo, "ext-decoder", "vae_decoder", vae_decoder_graph(8, 8, 8), card)
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(digit)
    from genserve_client import GenserveClient

    with running_server(repo, tmp_path / "server") as server:
        with GenserveClient(server.target) as client:
            encoder = client.encode("ext-encoder", [np.asarray(Image.open(digit))]).provenance
        edit = ("edit", str(digit), "--model", "ext")
        cli(server, *edit, "--dim", "1", "--out", str(tmp_path / "e.png"))
        cli(server, *edit, "--sweep", "--out", str(tmp_path / "s.png"))
    assert encoder.weights_sha256
    named = f"ext-encoder version 1 sha256 {encoder.model_sha256} weights_sha256 {encoder.weights_sha256}"
    for name in ("e.png", "s.png"):
        with Image.open(tmp_path / name) as picture:
            text = picture.text  # type: ignore[attr-defined]
        assert named in text.get("used_models", ""), (name, text)


@pytest.fixture(scope="module")
def vae_versions_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """VAE halves whose READY versions differ: `vae` (encoder 1 and 2; decoder 1, its 2 failed to
    load: a sha256 mismatch) and `odd` (encoder 1 alone, decoder 2 alone)."""
    root = tmp_path_factory.mktemp("vae-versions")
    card = {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [0.0, 1.0]}
    two = {"version_policy": {"latest": 2}}
    for name, encoders, decoders in (("vae", ("1", "2"), ("1", "2")), ("odd", ("1",), ("2",))):
        for version in encoders:
            write_vae_encoder(root, f"{name}-encoder", config=two, version=version)
        for version in decoders:
            write_model(root, f"{name}-decoder", "vae_decoder", vae_decoder_graph(8, 8, 8), card,
                        config=two, version=version)  # fmt: skip
    (root / "vae-decoder" / "2" / "model.onnx").write_bytes(b"not an onnx graph")
    with running_server(root, tmp_path_factory.mktemp("vae-versions-server")) as server:
        yield server


def test_edit_without_a_version_encodes_and_decodes_with_one_version_of_the_vae(
    vae_versions_server: Any, tmp_path: Path
) -> None:
    """Without --version the encoder and the decoder each ran their own highest READY version: with
    the decoder's newest failed to load, the image was encoded by encoder 2 and decoded by decoder
    1, two latent spaces, exit 0. It takes the highest version READY in both halves."""
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(digit)
    edit = ("edit", str(digit), "--model", "vae")
    cli(vae_versions_server, *edit, "--out", str(tmp_path / "e.png"))
    cli(vae_versions_server, *edit, "--sweep", "--out", str(tmp_path / "s.png"))
    for name in ("e.png", "s.png"):
        with Image.open(tmp_path / name) as picture:
            text = picture.text  # type: ignore[attr-defined]
        assert (text["model"], text["version"]) == ("vae-decoder", "1"), (name, text)
        assert text["used_models"].startswith("vae-encoder version 1 "), (name, text)
    # No version READY in both halves: refused before any Encode, naming both.
    out = tmp_path / "odd.png"
    proc = run_cli("--target", vae_versions_server.target, "edit", str(digit), "--model", "odd",
                   "--out", str(out))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "odd-encoder" in proc.stderr and "odd-decoder" in proc.stderr and "Traceback" not in proc.stderr
    assert "no version READY in both" in proc.stderr, proc.stderr
    assert vae_versions_server.metric("genserve_requests_total", method="Encode", model="odd-encoder") == 0
    assert not out.exists()


@pytest.mark.parametrize(
    ("model", "version", "named", "lacking"),
    [
        # The encoder lacks it: its card's settings (size, channels) were skipped, then Encode refused.
        ("odd", "2", "odd-encoder has no version 2", "odd-decoder"),
        # The decoder lacks it, or has it but not READY: the image was encoded, then Decode refused.
        ("odd", "1", "odd-decoder has no version 1", "odd-encoder"),
        ("vae", "2", "vae-decoder has it UNAVAILABLE", "vae-encoder"),
    ],
)
def test_edit_refuses_a_version_not_ready_in_both_halves_before_it_encodes(
    vae_versions_server: Any, tmp_path: Path, model: str, version: str, named: str, lacking: str
) -> None:
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(digit)
    out = tmp_path / "e.png"
    encodes = vae_versions_server.metric("genserve_requests_total", method="Encode")
    proc = run_cli("--target", vae_versions_server.target, "edit", str(digit), "--model", model,
                   "--version", version, "--out", str(out))  # fmt: skip
    assert vae_versions_server.metric("genserve_requests_total", method="Encode") == encodes, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert f"--version {version}" in proc.stderr and named in proc.stderr, proc.stderr
    assert f"{lacking} has" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_edit_of_a_version_still_loading_is_retried_as_transient_not_a_usage_error(tmp_path: Path) -> None:
    """A hot reload brings the decoder's version 2 (the encoder's is READY), which takes long to
    warm up. `edit --version 2` meanwhile was refused at once as a usage error (exit 2, 'has it
    LOADING'), where `sample` retries a version still LOADING (UNAVAILABLE). It asks again as the
    client retries UNAVAILABLE, then fails as a transient error (exit 1) naming the LOADING
    version, before any Encode."""
    root = tmp_path / "models"
    two = {"version_policy": {"latest": 2}}
    card = {"latent_dim": 8, "channels": 1, "image_size": [8, 8], "output_range": [-1.0, 1.0]}
    for version in ("1", "2"):
        write_vae_encoder(root, "vae-encoder", config=two, version=version)
    write_model(root, "vae-decoder", "vae_decoder", vae_decoder_graph(8, 8, 8), card, config=two)
    digit = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(digit)
    # Warm-up times every power of two up to 256 (a tolerance: "auto" times 1, 2 and 256 alone)
    # through a slow graph: about a minute on an idle machine, longer loaded (it took 4 s with "auto"
    # and 4000 iterations, which a loaded machine's CLI start outlasted), each run a few seconds.
    with running_server(root, tmp_path / "work", config={"calibration_budget_s": 600.0}) as server:
        batching = {"max_batch_size": 256, "max_queue_delay_ms": 1.0, "max_queue_size": 256}
        slow = {**two, "batching": {**batching, "efficient_batch_tolerance": 0.1}}
        write_model(root, "vae-decoder", "vae_decoder", slow_generator_graph(8, 40000), card,
                    config=slow, version="2")  # fmt: skip
        names, LOADING = ("vae-encoder", "vae-decoder"), genserve_pb2.MODEL_STATE_LOADING

        def states() -> dict[str, dict[str, int]]:
            with grpc.insecure_channel(server.target) as channel:
                stub = genserve_pb2_grpc.GenerationServiceStub(channel)
                infos = [stub.GetModel(genserve_pb2.GetModelRequest(name=n), timeout=10) for n in names]
            return {i.name: {v.version: v.state for v in i.versions} for i in infos}

        server.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                states().get("vae-decoder", {}).get("2") == LOADING
                and states().get("vae-encoder", {}).get("2") == genserve_pb2.MODEL_STATE_READY
            ),
            60,
            "vae-decoder 2 LOADING, vae-encoder 2 READY",
        )
        out = tmp_path / "e.png"
        proc = run_cli("--target", server.target, "edit", str(digit), "--model", "vae", "--version", "2",
                       "--out", str(out))  # fmt: skip
        assert states()["vae-decoder"]["2"] == LOADING
        assert proc.returncode == 1, proc.stderr
        assert "UNAVAILABLE" in proc.stderr and "vae-decoder" in proc.stderr, proc.stderr
        assert "LOADING" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert server.metric("genserve_requests_total", method="Encode") == 0
        assert server.metric("genserve_requests_total", method="GetModel") > 3 + 2  # asked again
        assert not out.exists()
