"""Claims of the docs and --help texts checked against the client's behaviour."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from client_fakes import FakeServer
from exec_support import exec_wrapped

from genserve_client import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", ["sample", "interpolate", "arithmetic", "bulk", "mix"])
def test_psi_help_names_the_real_default(command: str) -> None:
    """`--psi` without a value sends no truncation_psi, and the server then truncates nothing: no
    model, card or config.json has a psi of its own. The help said "(default: the model's)", which
    sends a user looking for a per-model truncation that does not exist."""
    parser = _subcommand(command)
    psi = next(a for a in parser._actions if "--psi" in a.option_strings)
    assert psi.default is None
    assert "the model's" not in (psi.help or "")
    assert "default: none" in (psi.help or "")


def test_edit_version_help_says_it_is_both_the_encoders_and_the_decoders() -> None:
    """`edit` runs two models, the encoder and the decoder, and sends its one --version to both
    (a VAE's halves are exported as one version); the help said "model version (default: the
    highest ready)", naming neither, so a user with halves of different versions could not tell
    which one the flag picks, nor which version runs without it: the highest ready in both."""
    parser = _subcommand("edit")
    version = next(a for a in parser._actions if "--version" in a.option_strings)
    text = " ".join((version.help or "").split())
    assert "encoder" in text and "decoder" in text and "ready in both" in text, text


def test_upscale_tile_size_help_says_the_server_enlarges_the_cards_tile_to_four_overlaps() -> None:
    """`--tile-size 0` sends no tile_size: the server takes the card's tile_size (128 without one)
    and enlarges it to at least 4 x the overlap (validate.tile_for), so a card tile of 128 with a
    measured overlap of 40 runs tiles of 160. The help said "(0: the card's)"."""
    parser = _subcommand("upscale")
    tile = next(a for a in parser._actions if "--tile-size" in a.option_strings)
    text = " ".join((tile.help or "").split())
    assert "128" in text and "4 x" in text and "overlap" in text, text


def test_tile_size_0_says_a_fixed_size_super_resolution_model_takes_each_image_as_one_tile() -> None:
    """A super-resolution model of one input size (card.json's image_size) takes each image whole,
    one tile of that size (validate.fixed_tile): tile_size 0 is not the card's tile_size there, a
    smaller tile_size is refused, and tile_overlap is unused. genserve.proto's tile_size comment and
    `upscale --tile-size`'s help said only 'the card's tile_size'."""
    parser = _subcommand("upscale")
    tile = next(a for a in parser._actions if "--tile-size" in a.option_strings)
    text = " ".join((tile.help or "").split())
    assert "image_size" in text and "one tile" in text, text
    proto = (REPO_ROOT / "protos" / "genserve" / "v1" / "genserve.proto").read_text()
    comment = proto.split("  uint32 tile_size = 5;", 1)[0].rsplit(";\n", 1)[1]
    comment = " ".join(line.strip().lstrip("/").strip() for line in comment.splitlines())
    assert "image_size" in comment and "one tile" in comment, comment
    overlap = proto.split("  optional uint32 tile_overlap = 6;", 1)[0].rsplit("uint32 tile_size = 5;", 1)[1]
    assert "image_size" in overlap and "unused" in overlap.lower(), overlap


def _progress_examples(text: str) -> list[list[str]]:
    commands = []
    for match in re.finditer(r"`(genserve-client sample [^`]*--progress[^`]*)`", text.replace("\n", " ")):
        commands.append(shlex.split(match.group(1))[1:])
    return commands


def test_client_md_progress_example_fits_the_priors_row_budget() -> None:
    """docs/client.md's `sample ... --progress` example on the default repository must run: the
    CLI refuses (exit 2) a --progress call larger than the prior's row budget (one streamed call),
    and `--labels all --n 8` asked for 80 samples of a prior whose budget is 64."""
    examples = _progress_examples((REPO_ROOT / "docs" / "client.md").read_text())
    assert examples, "docs/client.md has no `genserve-client sample ... --progress` example"
    for argv in examples:
        args = cli.build_parser().parse_args(argv)
        config = json.loads((REPO_ROOT / "models" / args.model / "config.json").read_text())
        budget = config["batching"]["max_batch_size"]
        card = json.loads((REPO_ROOT / "models" / args.model / "1" / "card.json").read_text())
        classes = len(card["class_names"]) if args.labels == "all" else len(args.labels.split(","))
        assert args.n * classes <= budget, (argv, args.n * classes, budget)


def test_a_reader_that_goes_away_ends_the_command_quietly(fake_server: FakeServer) -> None:
    """`genserve-client models | head -1`: the pipe closed under the command printed
    "genserve-client: [Errno 32] Broken pipe" (exit 1), where filters stop quietly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "genserve_client", "--target", fake_server.target, "models"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_goes_away_leaves_the_images_written_and_no_error(
    fake_server: FakeServer, tmp_path: Path, unbuffered: str
) -> None:
    """`genserve-client sample --out D | true`: the reader is gone before the seed line. Where stdout
    is buffered (Python's default for a pipe) the images were written, then the interpreter's final
    flush printed "Exception ignored ... BrokenPipeError" and exited 120; with PYTHONUNBUFFERED=1 (a
    container's usual setting) the seed line's write failed first and the command stopped with 141
    before writing the images the server had made. The images are written, then exit 141 quietly."""
    out = tmp_path / "images"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    command = ["--target", fake_server.target, "sample", "--model", "fake-gen", "--n", "2", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "genserve_client", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert len(list(out.glob("*.png"))) == 2


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts /proc/self/fd")
def test_a_stdout_whose_reader_went_away_leaves_no_descriptor_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """genserve_contract.stdio's Stdout.lose pointed stdout at a devnull it opened and never closed:
    one descriptor left open for every stdout whose reader went away."""
    from genserve_contract.stdio import Stdout

    for _ in range(3):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone
        with open(write_end, "w") as stream:
            monkeypatch.setattr(sys, "stdout", stream)
            before = len(os.listdir("/proc/self/fd"))
            stdout = Stdout()
            stdout.say("a line", flush=True)
            assert stdout.reader_gone
            assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize("command", [["--help"], ["sample", "--help"]], ids=["--help", "sample --help"])
def test_help_to_a_reader_that_goes_away_exits_141_quietly(command: list[str], unbuffered: str) -> None:
    """`genserve-client --help | true`: argparse prints the help and exits inside parse_args, before
    main flushes stdout, so where stdout is buffered the interpreter's final flush printed "Exception
    ignored ... BrokenPipeError" and exited 120; unbuffered, argparse dropped the failed write and
    exited 0. As every other command: nothing on stderr, exit 141."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    proc = subprocess.Popen(
        [sys.executable, "-m", "genserve_client", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the help
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == "", err


def test_a_closed_stdout_writes_the_images_and_says_what_it_could_not_print(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    """`genserve-client sample --out D >&-`: with stdout closed Python has no sys.stdout, and the
    seed line's write raised AttributeError, a traceback, exit 1, the images the server had made
    not written. As coreutils do (`ls >&-`), the work is done and one line says stdout is closed."""
    out = tmp_path / "images"
    command = ["--target", fake_server.target, "sample", "--model", "fake-gen", "--n", "2", "--out", str(out)]
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-m", "genserve_client", *command], close_fds=(1,)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "stdout is closed" in err, err
    assert len(err.splitlines()) == 1, err
    assert len(list(out.glob("*.png"))) == 2


def test_a_bulk_job_with_stderr_closed_writes_its_images(fake_server: FakeServer, tmp_path: Path) -> None:
    """`genserve-client bulk ... 2>&-` (a cron line discarding diagnostics): Python has no
    sys.stderr then, and the job's progress bar raised AttributeError before the first stream, so
    the job wrote nothing and exited 1 without a word. The job runs; only what stderr would have
    shown is lost."""
    out = tmp_path / "job"
    command = ["--target", fake_server.target, "bulk", "--model", "fake-gen", "--n", "4", "--out", str(out)]
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-m", "genserve_client", *command], close_fds=(2,)),
        stdout=subprocess.PIPE,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout
    assert len(list((out / "images").glob("*.png"))) == 4


def _entry_points() -> list[list[str]]:
    """`python -m genserve_client` and what the console script `genserve-client` runs (its
    pyproject.toml entry, called as pip's wrapper calls it)."""
    project = tomllib.loads((REPO_ROOT / "clients" / "pyproject.toml").read_text())["project"]
    module, function = project["scripts"]["genserve-client"].split(":")
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [[sys.executable, "-m", "genserve_client"], [sys.executable, "-c", script]]


def _grpc_imported(pid: int) -> bool:
    """The process has loaded grpc's extension: the client's imports are under way (Linux /proc)."""
    try:
        return "cygrpc" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _reset_connections(listener: socket.socket) -> int:
    """Accepts the connections waiting on `listener` and resets each (a server that is not there);
    how many there were."""
    count = 0
    while select.select([listener], [], [], 0)[0]:
        connection, _ = listener.accept()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
        count += 1
    return count


def _pending(pid: int, signum: int) -> bool:
    """`signum` was sent to the process and none of its threads has taken it yet (Linux /proc)."""
    bit = 1 << (signum - 1)
    for status in [Path(f"/proc/{pid}/status"), *Path(f"/proc/{pid}/task").glob("*/status")]:
        try:
            rows = status.read_text().splitlines()
        except OSError:  # the thread or the process has ended
            continue
        if any(row.startswith(("ShdPnd:", "SigPnd:")) and int(row.split()[1], 16) & bit for row in rows):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("entry", _entry_points(), ids=["python -m genserve_client", "console script"])
def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback(entry: list[str]) -> None:
    """docs/client.md: exit 130 on an interrupt. main() caught KeyboardInterrupt only once the
    package's imports (grpc, numpy, PIL: half a second or more) were done; a Ctrl-C during them
    printed a KeyboardInterrupt traceback and the process died of SIGINT (-2)."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            # A terminal's Ctrl-C reaches a CLI whose SIGINT is default. Where the tests run as a
            # background job of a script (`pytest ... &`, nohup: SIGINT ignored, inherited), the CLI
            # rightly keeps it ignored (the test below) and this one timed out to exit 1.
            exec_wrapped([*entry, "--target", target, "--timeout", "60", "models"], sigint="default"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while not _grpc_imported(proc.pid):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.002)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = err.decode()
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{text}"
    assert text == "genserve-client: interrupted\n" and not out, text


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_ctrl_c_while_the_cli_imports_with_stderr_closed_exits_130() -> None:
    """`genserve-client ... 2>&-` (a cron line discarding diagnostics): the start-up handler's line
    to fd 2 raised OSError (EBADF) out of the handler, before its os._exit, and the CLI exited 1
    where docs/client.md promises 130 on an interrupt."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        command = [sys.executable, "-m", "genserve_client", "--target", target, "--timeout", "60", "models"]
        proc = subprocess.Popen(
            exec_wrapped(command, close_fds=(2,), sigint="default"), stdout=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 60
            while not _grpc_imported(proc.pid):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.002)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 130 and not out, (proc.returncode, out)


def test_ctrl_c_while_the_cli_parses_its_arguments_with_stderr_closed_exits_130() -> None:
    """A Ctrl-C that cli.main() does not catch (during its argument parsing) is answered by the
    entry point, whose line to a stderr closed (`2>&-`: Python has no sys.stderr) raised
    AttributeError: exit 1, not 130."""
    script = (
        "import sys\n"
        "from genserve_client import cli\n"
        "def interrupted(argv):\n"
        "    raise KeyboardInterrupt\n"
        "cli.main = interrupted\n"
        "from genserve_client.__main__ import main\n"
        "sys.argv = ['genserve-client', 'models']\n"
        "sys.exit(main())  # as the console script runs it\n"
    )
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", script], close_fds=(2,)), stdout=subprocess.PIPE, timeout=60
    )
    assert proc.returncode == 130 and not proc.stdout, (proc.returncode, proc.stdout)


def test_the_entry_loads_no_more_of_the_contract_than_its_stop_signals_before_its_handlers() -> None:
    """genserve_client/__main__.py takes Ctrl-C and SIGTERM once its own imports are done; till
    then a Ctrl-C is Python's (a KeyboardInterrupt traceback, exit -2). Of the genserve_contract
    package it needs stop_signals (standard library only): the package's other modules (config,
    kinds, repository, runtime: dataclasses, re, hashlib, pathlib) loaded with it made that window
    several times longer."""
    code = "import sys, genserve_client.__main__; print(*sorted(m for m in sys.modules if 'contract' in m))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["genserve_contract", "genserve_contract.stop_signals"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("module", ["genserve_client", "genserve_client.cli"])
def test_sigterm_while_the_cli_imports_exits_143_without_a_traceback(module: str) -> None:
    """SIGTERM stops the CLI as Ctrl-C does (docs/client.md: 143), from its first statement on: it
    died of the signal (-15) without a word. `python -m genserve_client.cli` (the module's own
    `__main__` guard) skipped the entry's signal holding."""
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--target", target, "--timeout", "60", "models"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while not _grpc_imported(proc.pid):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.002)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = err.decode()
    assert proc.returncode == 143, f"exit {proc.returncode}:\n{text}"
    assert text == "genserve-client: terminated (SIGTERM)\n" and not out, text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
@pytest.mark.parametrize(("signals", "status", "line"), [
    ((signal.SIGINT, signal.SIGINT), 130, "genserve-client: interrupted"),
    ((signal.SIGTERM, signal.SIGINT), 143, "genserve-client: terminated (SIGTERM)"),
])  # fmt: skip
def test_a_second_signal_while_the_cli_stops_ends_it_at_once_with_one_line(
    tmp_path: Path, signals: tuple[int, int], status: int, line: str
) -> None:
    """Ctrl-C twice while a call waits for a server that is not there: the second interrupted the
    client's close part-way (grpc's channel close), and the CLI hung for good at its exit, died of
    SIGINT (-2), or printed a traceback ('release unlocked lock'). Every time: the first signal's
    line once and its status, whenever the second comes.

    Each moment is counted from the first signal's delivery. Two signals pending together (a loaded
    machine that did not run the CLI between them) reach it in the signals' order, SIGINT's first,
    whatever order they were sent in: the CLI cannot tell that SIGTERM came first, and a test that
    slept 1 s for the call to wait and 10 ms between the two saw 130 for SIGTERM then SIGINT, and
    stopped the CLI in its imports more often than not."""
    commands = [
        ["models"],
        ["bulk", "--model", "fake-gen", "--n", "4", "--out", str(tmp_path / "job")],
    ]
    outcomes = []
    for attempt in range(10):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        proc = subprocess.Popen(
            exec_wrapped(
                [sys.executable, "-m", "genserve_client", "--target", target, *commands[attempt % 2]],
                sigint="default",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # Its first connection (reset) is the call's: the imports are done, the handlers set. The
            # second is its channel's again while the call waits to retry, where a signal is taken
            # at once (in a call, grpc looks at signals every 200 ms).
            deadline = time.monotonic() + 60
            connections = 0
            while connections < 2:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                connections += _reset_connections(listener)
                time.sleep(0.002)
            listener.close()  # nothing listens there any more
            proc.send_signal(signals[0])
            while _pending(proc.pid, signals[0]):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            # The second at several moments of the stop, once the first is the CLI's.
            time.sleep(0.01 + 0.05 * (attempt // 2))
            if proc.poll() is None:
                proc.send_signal(signals[1])
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                outcomes.append((attempt, "hung"))
                continue
        finally:
            listener.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        outcomes.append((attempt, proc.returncode, err.decode().splitlines(), out))
    assert outcomes == [(attempt, status, [line], b"") for attempt in range(10)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps")
def test_a_sigint_its_parent_ignores_stays_ignored_while_the_cli_imports() -> None:
    """A background job of a script (or nohup) starts with SIGINT ignored: the entry point's
    start-up handler must not turn it back on."""
    command = shlex.join([sys.executable, "-m", "genserve_client", "--help"])
    proc = subprocess.Popen(
        ["sh", "-c", f"trap '' INT; exec {command}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while not _grpc_imported(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0 and out.startswith(b"usage: genserve-client"), err.decode()


def test_client_md_library_errors_are_the_ones_raised() -> None:
    """docs/client.md, "The Python library", quotes the errors raised before any call for an option
    a method does not take, a value its field cannot hold and one image where a list belongs."""
    from genserve_client import GenserveClient

    text = " ".join((REPO_ROOT / "docs" / "client.md").read_text().split())
    client = GenserveClient("127.0.0.1:1")  # nothing is sent: each call is refused before
    try:
        cases: list[tuple[type[Exception], str, Any]] = [
            (TypeError, "sample() got unexpected keyword argument 'seed'; its options are base_seed,",
             lambda: client.sample("m", 4, seed=42)),
            (ValueError, "count: must be in [0, 4294967295] (uint32), got -1",
             lambda: client.sample("m", -1)),
            (ValueError, "seeds[1]: ", lambda: client.sample("m", seeds=[1, 2**63])),
            (ValueError, "mixes[0].crossover", lambda: client.mix_styles("m", [(1, 2, -1)])),
            (ValueError, "output.quality", lambda: client.sample("m", 1, quality=-1)),
            (TypeError, "images: must be a list of images, got one str; pass [image] for one",
             lambda: client.encode("m", "digit.png")),
        ]  # fmt: skip
        for error, quoted, call in cases:
            assert quoted in text, quoted
            with pytest.raises(error) as info:
                call()
            assert str(info.value).startswith(quoted), (quoted, str(info.value))
    finally:
        client.close()


def test_client_md_names_every_output_option_the_server_refuses_where_it_does_nothing() -> None:
    """types.proto's OutputOptions: `quality` with PNG/raw/tensor, `png_compression` with another
    format than PNG and `return_latents` on a method without latents are INVALID_ARGUMENT, not
    ignored. docs/client.md, "The Python library", named only `quality`, so a library user passing
    `png_compression=9` with `format="jpeg"` met a refusal the docs did not list."""
    proto = (REPO_ROOT / "protos" / "genserve" / "v1" / "types.proto").read_text()
    body = proto.split("message OutputOptions {", 1)[1].split("\n}", 1)[0]
    refused = []
    comment: list[str] = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("//"):
            comment.append(line)
        elif line:
            if "INVALID_ARGUMENT" in " ".join(comment):
                refused.append(line.rstrip(";").split("=")[0].split()[-1])
            comment = []
    assert {"quality", "png_compression", "return_latents"} <= set(refused), refused
    library = (REPO_ROOT / "docs" / "client.md").read_text().split("## The Python library", 1)[1]
    for name in refused:
        assert f"`{name}`" in library, f"docs/client.md's library section does not name {name}"


def test_client_md_documents_every_field_of_a_bench_level_with_its_meaning() -> None:
    """`bench` prints a table and `--json` one object per level, and no doc said what its fields
    are: `concurrency` of an open-loop level is `--max-outstanding` (256 by default), not a
    concurrency the run used; `duration_s` is the measured window (longer than `--duration` by the
    tail of the calls that succeeded); and `errors` holds
    CLIENT_BACKLOG, arrivals the load generator never sent, which the `--json` help called failed
    calls. docs/client.md names every field of genserve_client.bench.BenchResult, with its unit."""
    import dataclasses

    from genserve_client.bench import CLIENT_BACKLOG, BenchResult

    text = (REPO_ROOT / "docs" / "client.md").read_text()
    assert "## Load generator (`bench`)" in text
    section = " ".join(text.split("## Load generator (`bench`)", 1)[1].split("\n## ", 1)[0].split())
    for f in dataclasses.fields(BenchResult):
        assert f"`{f.name}`" in section, f"docs/client.md's bench section does not name {f.name}"
    for claim in (f"`{CLIENT_BACKLOG}`", "`--max-outstanding`", "scheduled arrival", "milliseconds"):
        assert claim in section, claim
    json_help = next(a for a in _subcommand("bench")._actions if "--json" in a.option_strings)
    assert CLIENT_BACKLOG in " ".join((json_help.help or "").split())


def test_the_entry_run_from_python_puts_the_processs_signal_handlers_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """genserve_client.__main__.main(argv) run in a program's own process (a test, a tool embedding
    the CLI) left its SIGINT handler there, whose signal once the command was done os._exit-ed the
    whole program with the CLI's status: pytest itself ended 130 at a later test's Ctrl-C. Called
    with arguments it puts back the handlers it found; a later Ctrl-C is the program's again."""
    from genserve_client import __main__ as entry

    def interrupted(argv: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(sys, "stderr", None)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as a program has it
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # the program's Ctrl-C goes on to it
            entry.main(["models"])
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        with pytest.raises(KeyboardInterrupt):  # Python's own handler: not an os._exit of the CLI's
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, found)


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_saying_the_stop_line_leaves_the_signal_mask_as_it_found_it() -> None:
    """The stop's line is said with SIGINT and SIGTERM blocked (a signal meanwhile ends the process
    once it is said); it then unblocked both, whatever the mask had been: a program running the CLI
    with SIGTERM blocked (held for a moment it chose) had it delivered at once after a stopped
    command. The mask found is put back."""
    from genserve_client import interrupt

    said: list[str] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        interrupt.say_stop(interrupt.Terminated(), said.append)
        after = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        interrupt.reset()
    assert said == ["genserve-client: terminated (SIGTERM)"]
    assert signal.SIGTERM in after and signal.SIGINT not in after, after


# A program that runs a command through the CLI's entry in its own process (a test suite, a tool
# embedding the CLI), its SIGTERM at the default action: the command sends the process SIGTERM while
# it waits; the program prints what main() returned, if it returns.
SIGTERM_IN_PROCESS = """
import os, signal, sys, time
from genserve_client import cli
from genserve_client.__main__ import main

def waiting(client, args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
    return 0

cli.COMMANDS["models"] = waiting
status = main(["--target", "127.0.0.1:1", "models"])
print(f"main returned {status}", flush=True)
sys.exit(status)
"""


def test_a_sigterm_to_a_program_running_the_entry_in_process_reaches_that_programs_handler() -> None:
    """genserve_client.__main__.main(argv) called from a program turned a SIGTERM to that process
    into its command's stop and returned 143: the program never saw it (`timeout` stopping pytest
    during an in-process CLI test failed that test and the suite ran on). The command still stops
    through its cleanup, one line; then the signal goes to the handler main() found, here the
    default action: the program ends of it."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_PROCESS], capture_output=True, text=True, timeout=60
    )
    assert "main returned" not in proc.stdout, (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == ["genserve-client: terminated (SIGTERM)"], proc.stderr


# `genserve-client models` whose command waits as a blocking call waits (a grpc call's wait looks at
# the signals that arrived every 0.1 s): a SIGTERM, then a Ctrl-C, arrive while the main thread is
# not looking (it blocks both; another thread of the process takes them), and it looks once both are in.
SIGTERM_THEN_SIGINT = """
import os, signal, sys, threading, time
from genserve_client import cli
from genserve_client.__main__ import main

def waiting(client, args):
    go = threading.Event()
    def send():
        go.wait()  # till the main thread waits in C, not looking at the signals
        # To this thread itself, which takes each before pthread_kill returns: os.kill's process-wide
        # signal may go to another thread that has it unblocked (grpc's), which can run its C
        # handler after this thread has taken the SIGINT, and the arrivals then read SIGINT first.
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    sender = threading.Thread(target=send)
    sender.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    go.set()
    sender.join()
    time.sleep(30)
    return 0

cli.COMMANDS["models"] = waiting
sys.argv = ["genserve-client", "--target", "127.0.0.1:1", "models"]
sys.exit(main())  # as the console script runs it
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_a_ctrl_c_soon_after_a_sigterm_ends_the_cli_with_the_sigterms_line_and_status() -> None:
    """docs/client.md: a second Ctrl-C or SIGTERM while the CLI stops ends it with the first
    signal's line and status. Python runs the handlers of the signals that arrived since it last
    looked in the order of their numbers, SIGINT (2) before SIGTERM (15): a SIGTERM (a pod's stop)
    followed within a grpc wait's 0.1 s by a Ctrl-C ended the CLI 130 'interrupted', as though the
    Ctrl-C had come first. The SIGTERM, which came first, decides: 143, its line once."""
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", SIGTERM_THEN_SIGINT], sigint="default"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == ["genserve-client: terminated (SIGTERM)"], proc.stderr


# The console script, where a SIGTERM arrives the moment __main__.main has set raise_terminated as
# its handler (the CLI's imports done), before the command starts: sent from signal.signal itself.
SIGTERM_AS_THE_HANDLER_IS_SET = """
import os, signal, sys
from genserve_client import cli, interrupt
from genserve_client.__main__ import main

set_handler = signal.signal

def setting(signum, handler):
    found = set_handler(signum, handler)
    if handler is interrupt.raise_terminated:
        os.kill(os.getpid(), signal.SIGTERM)
    return found

def never(client, args):
    print("the command ran", flush=True)
    return 0

signal.signal = setting
cli.COMMANDS["models"] = never
sys.argv = ["genserve-client", "--target", "127.0.0.1:1", "models"]
sys.exit(main())  # as the console script runs it
"""


def test_a_sigterm_as_the_cli_sets_its_stop_handlers_exits_143_with_one_line() -> None:
    """A SIGTERM between __main__.main setting raise_terminated (the CLI's imports done) and the
    command's try: its Terminated escaped main() as a traceback, exit 1. It stops the CLI as
    anywhere else: the command never runs, 143, its one line."""
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", SIGTERM_AS_THE_HANDLER_IS_SET], sigint="default"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == ["genserve-client: terminated (SIGTERM)"], proc.stderr
    assert "the command ran" not in proc.stdout


# The console script, where a SIGTERM is handled as the command returns, before __main__.main has
# recorded it done (finished): sent from finished itself, before it runs.
SIGTERM_AS_THE_COMMAND_RETURNS = """
import signal, sys
import genserve_client.__main__ as entry
from genserve_client import cli

finished = entry.finished

def finishing(status):
    entry.finished = finished  # once
    signal.raise_signal(signal.SIGTERM)
    finished(status)

def done(client, args):
    print("the command ran", flush=True)
    return 0

entry.finished = finishing
cli.COMMANDS["models"] = done
sys.argv = ["genserve-client", "--target", "127.0.0.1:1", "models"]
sys.exit(entry.main())  # as the console script runs it
"""


def test_a_sigterm_as_the_command_returns_exits_143_with_one_line() -> None:
    """A SIGTERM handled between the command's return and __main__.main recording it done: its
    Terminated was raised outside the try that says a stop, a traceback and exit 1. Not yet done,
    the command is stopped by it as anywhere else: its one line, 143."""
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", SIGTERM_AS_THE_COMMAND_RETURNS], sigint="default"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stderr.splitlines() == ["genserve-client: terminated (SIGTERM)"], proc.stderr
    assert "the command ran" in proc.stdout


@pytest.mark.parametrize("command", ["models", "bulk", "bench"])
@pytest.mark.parametrize("entry", ["genserve_client.__main__", "genserve_client.cli"])
def test_a_ctrl_c_to_a_program_running_the_cli_in_process_reaches_that_program(
    fake_server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    entry: str,
    command: str,
) -> None:
    """main(argv) called from Python (a test suite, a program running the CLI in its own process)
    caught the KeyboardInterrupt of a Ctrl-C to that process and returned 130: the program never
    saw it, so Ctrl-C on pytest during an in-process CLI test failed that test and the suite ran on.
    The command still stops through its cleanup, with its one line (bulk's hint after it); then the
    KeyboardInterrupt goes on to the caller, as genserve-export's does and a SIGTERM goes on to its
    handler. The console script's main() exits 130 (the tests that start it in a child)."""
    import importlib

    main = importlib.import_module(entry).main

    def interrupted(*args: object, **kwargs: object) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        return 0

    async def interrupted_run(*args: object, **kwargs: object) -> list[dict[str, Any]]:
        import asyncio

        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)
        return []

    argv = ["--target", fake_server.target, command]
    if command == "models":
        monkeypatch.setitem(cli.COMMANDS, "models", interrupted)
    elif command == "bench":  # its run under asyncio.run (run_async)
        monkeypatch.setattr(cli, "_bench", interrupted_run)
        argv += ["--model", "fake-gen", "--duration", "1", "--warmup", "0"]
    else:  # the job's own stop: the command catches it to say how to go on
        monkeypatch.setattr(cli.BulkJob, "run", interrupted)
        argv += ["--model", "fake-gen", "--n", "4", "--out", str(tmp_path / "job")]
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as a program has it
    try:
        with pytest.raises(KeyboardInterrupt):
            main(argv)
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
    err = capsys.readouterr().err.splitlines()
    assert err.count("genserve-client: interrupted") == 1, err
    assert after == (signal.default_int_handler, handlers[1])


def test_a_ctrl_c_as_the_entry_sets_its_wakeup_fd_leaves_none_set_after_an_in_process_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Ctrl-C handled inside watch_arrivals once it had set its wakeup fd, before __main__.main
    had what undoes it: main(argv) called from a program left the CLI's pipe as the process's wakeup
    fd (every signal written there for good, an event loop's or a later run's own refused) and its
    two descriptors open. The command stops as anywhere else, and the process is put back."""
    from genserve_client import __main__ as entry

    set_wakeup_fd = signal.set_wakeup_fd
    ours: list[int] = []

    def setting(fd: int, **kwargs: Any) -> int:
        found = set_wakeup_fd(fd, **kwargs)
        if fd != -1 and not ours:
            ours.append(fd)
            signal.raise_signal(signal.SIGINT)
        return found

    monkeypatch.setattr(signal, "set_wakeup_fd", setting)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as a program has it
    try:
        with pytest.raises(KeyboardInterrupt):
            entry.main(["--target", "127.0.0.1:1", "models"])
    finally:
        left = set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, handlers[0])
    assert ours and left == -1, (ours, left)
    with pytest.raises(OSError):
        os.fstat(ours[0])
    assert capsys.readouterr().err.splitlines() == ["genserve-client: interrupted"]


def test_the_entry_run_from_python_puts_the_handlers_back_after_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A usage error (an unknown flag, a missing argument) leaves the CLI by argparse's SystemExit,
    past __main__.main's putting back of the handlers it found: the program that ran it kept the
    CLI's SIGINT/SIGTERM handlers, a SIGTERM there raising Terminated instead of ending it and a
    second Ctrl-C os._exit-ing it 130."""
    from genserve_client import __main__ as entry

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        entry.main(["models", "--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_client_md_says_where_a_merged_manifests_files_are_relative_to(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/client.md's shard example, `verify /data/job --hashes --manifest-out /data/job/all.jsonl`:
    with one DIR the merged manifest's files are relative to that DIR (`shard-.../images/...`), with
    several to their common folder (`a/job/shard-...` for a/job and b/job). The doc said "the DIRs'
    common parent", which for the one DIR of its own example reads as /data (`job/shard-...`)."""
    from client_fakes import cli_main

    job = tmp_path / "data" / "job"
    for shard in ("0/2", "1/2"):
        argv = ("bulk", "--model", "fake-cond", "--labels", "1,2", "--n", "4", "--out", str(job))
        code, _, err = cli_main(capsys, "--target", fake_server.target, *argv, "--shard", shard)
        assert code == 0, err
    merged = job / "all.jsonl"
    code, _, err = cli_main(capsys, "verify", str(job), "--hashes", "--manifest-out", str(merged))
    assert code == 0, err
    files = [json.loads(line)["file"] for line in merged.read_text().splitlines()]
    assert files[0] == "shard-00000-of-00002/images/000000.png", files
    assert all((job / f).is_file() for f in files)
    text = " ".join((REPO_ROOT / "docs" / "client.md").read_text().split())
    assert "`--manifest-out` writes the merged manifest (files relative to the DIR where one is given" in text
    assert "common parent" not in cli.build_parser().format_help() + _subcommand("verify").format_help()
