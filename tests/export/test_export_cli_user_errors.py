"""genserve-export as a user meets it: a mistaken flag is refused up front, naming the flag, without a
traceback and before any training."""

from __future__ import annotations

import errno
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from exec_support import exec_wrapped

from genserve_export import cli, recipes
from tests.export.test_export_checks import _FakeRecipe

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_recipe(monkeypatch: pytest.MonkeyPatch) -> _FakeRecipe:
    recipe = _FakeRecipe()
    monkeypatch.setitem(recipes.RECIPES, "tiny-gen", recipe)
    return recipe


def _run_as_console_script(
    script: str, argv: list[str], *, status: int, close_stderr: bool = False
) -> subprocess.CompletedProcess[str]:
    """genserve-export run as its console script runs it (`sys.exit(main())`, sys.argv its name and
    `argv`) once `script` (the test's imports and patches) has run, in a process started as a
    terminal starts it (SIGINT's default), with stderr closed (`2>&-`) where `close_stderr`. Checks
    that it ended with `status` and no traceback; the finished process, for the test's own checks."""
    entry = (
        "import sys\n"
        f"{script}"
        "import genserve_export.cli\n"
        f"sys.argv = ['genserve-export', *{argv!r}]\n"
        "sys.exit(genserve_export.cli.main())  # as the console script runs it\n"
    )
    close_fds = (2,) if close_stderr else ()
    proc = subprocess.run(
        exec_wrapped([sys.executable, "-c", entry], close_fds=close_fds, sigint="default"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("under", ["", "sub"])
def test_train_into_an_out_that_is_a_file_is_refused_before_training(
    tmp_path: Path, fake_recipe: _FakeRecipe, capsys: pytest.CaptureFixture[str], under: str
) -> None:
    """`train --out FILE` (or a path under a file) trained the recipe, then died with a
    NotADirectoryError traceback when exporting: hours lost for a typo. It is refused up front,
    naming --out and the file, exit 2."""
    file = tmp_path / "models"
    file.write_text("not a repository")
    out = file / under if under else file
    code = cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--out" in err and str(file) in err and "not a directory" in err, err
    assert fake_recipe.trained == 0


def test_build_defaults_into_an_out_that_is_a_file_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "models"
    file.write_text("not a repository")
    calls: list[str] = []
    monkeypatch.setattr(cli, "train_and_export", lambda name, out, **kwargs: calls.append(name))
    code = cli.main(["build-defaults", "--out", str(file), "--only", "dcgan-digits", "--no-verify"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--out" in err and str(file) in err, err
    assert calls == []


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:7"])
def test_train_with_a_device_this_machine_lacks_is_a_usage_error_naming_the_flag(
    tmp_path: Path,
    fake_recipe: _FakeRecipe,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    device: str,
) -> None:
    """`train --device bogus` (or cuda on a machine without one) loaded the data and died in the
    recipe with a torch RuntimeError traceback. argparse refuses it, naming --device, exit 2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device == "cuda:7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if device == "cuda:7" else 0)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "tiny-gen", "--out", str(tmp_path / "m"), "--device", device])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "--device" in err and device in err, err
    assert fake_recipe.trained == 0


def test_build_defaults_only_without_names_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--only "restrict to these recipes": given no names (`--only $EMPTY` in a script) it built
    every default recipe, hours of training. argparse refuses it, naming --only."""
    calls: list[str] = []
    monkeypatch.setattr(cli, "train_and_export", lambda name, out, **kwargs: calls.append(name))
    with pytest.raises(SystemExit) as exc:
        cli.main(["build-defaults", "--out", str(tmp_path / "m"), "--no-verify", "--only"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "--only" in err, err
    assert calls == []


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_build_defaults_only_naming_a_recipe_twice_builds_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: str
) -> None:
    """`--only dcgan-digits dcgan-digits --jobs 2` started two processes training the same recipe
    into the same --out at once (the second replacing the first in the parent's table, so the first
    was never stopped on Ctrl-C). A name given twice is built once."""
    trained: list[str] = []

    def fake_train(name: str, out_dir: Path, **kwargs: object) -> object:
        trained.append(name)
        return SimpleNamespace(steps=1, train_s=0.0, export_s=0.0, paths=[])

    class Done:
        returncode = 0

        def __init__(self, command: list[str], **kwargs: object) -> None:
            trained.append(command[command.index("train") + 1])

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(cli, "train_and_export", fake_train)
    monkeypatch.setattr(cli.subprocess, "Popen", Done)
    argv = ["build-defaults", "--out", str(tmp_path / "m"), "--no-verify", "--jobs", jobs]
    assert cli.main([*argv, "--only", "dcgan-digits", "dcgan-digits"]) == 0
    assert trained == ["dcgan-digits"]


def test_the_export_cli_leaves_no_onnx_runtime_telemetry_files_in_home(tmp_path: Path) -> None:
    """ONNX Runtime keeps a telemetry device id and event database under $HOME/.cache from its
    import on; the server turns that off unless the environment sets ORT_DISABLE_TELEMETRY, and
    genserve-export (which imports it for every command) wrote them into the user's HOME."""
    home = tmp_path / "home"
    home.mkdir()
    models = tmp_path / "models"
    models.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    proc = subprocess.run(
        [sys.executable, "-m", "genserve_export.cli", "verify", str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HOME": str(home)},
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []


def test_count_activations_names_a_version_whose_model_cannot_be_parsed_and_counts_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`count-activations` reports a version it cannot count and goes on with the next, but a
    model.onnx that is not an ONNX protobuf (a truncated copy) raised protobuf's DecodeError, which it
    did not catch: a traceback, and every version after it left without the field. It is named on
    one line, the others are counted, exit 1."""
    import json
    import shutil

    models = Path(__file__).resolve().parents[2] / "models"
    for name in ("sr-photos-x4", "unet-denoise"):
        shutil.copytree(models / name, tmp_path / name)
        card = json.loads((tmp_path / name / "1" / "card.json").read_text())
        del card["activation_bytes_per_output_value"]
        (tmp_path / name / "1" / "card.json").write_text(json.dumps(card))
    (tmp_path / "sr-photos-x4" / "1" / "model.onnx").write_bytes(b"garbage, not a protobuf")
    code = cli.main(["count-activations", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "sr-photos-x4/1" in err and "Traceback" not in err, err
    counted = json.loads((tmp_path / "unet-denoise" / "1" / "card.json").read_text())
    assert counted["activation_bytes_per_output_value"] == 170.667


def test_count_activations_skips_a_card_nested_too_deeply_to_parse_and_counts_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`count-activations` skips a card.json it cannot read as a card (verify names it), but one
    nested too deeply for json raised RecursionError, not the ValueError it caught: a traceback, and
    every version after it left without activation_bytes_per_output_value."""
    import json
    import shutil

    models = Path(__file__).resolve().parents[2] / "models"
    shutil.copytree(models / "unet-denoise", tmp_path / "unet-denoise")
    card = json.loads((tmp_path / "unet-denoise" / "1" / "card.json").read_text())
    del card["activation_bytes_per_output_value"]
    (tmp_path / "unet-denoise" / "1" / "card.json").write_text(json.dumps(card))
    deep = tmp_path / "a-deep-card" / "1"
    deep.mkdir(parents=True)
    (deep / "card.json").write_text("[" * 200_000)
    (deep / "model.onnx").write_bytes(b"")
    code = cli.main(["count-activations", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    counted = json.loads((tmp_path / "unet-denoise" / "1" / "card.json").read_text())
    assert counted["activation_bytes_per_output_value"] == 170.667


def test_train_whose_export_cannot_be_written_is_an_error_naming_the_file_not_a_traceback(
    tmp_path: Path,
    fake_recipe: _FakeRecipe,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A repository that cannot be written (a full disk, a read-only mount; chmod does not stop
    root, so the write is refused as the OS would refuse it) ended `train` with an OSError traceback.
    It is an error naming the file and the cause, exit 1."""
    from genserve_export import export as export_module

    copy = export_module.shutil.copyfile

    def full_disk(source: str, target: str, *args: object, **kwargs: object) -> object:
        if "/.tmp-" in str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return copy(source, target)

    monkeypatch.setattr(export_module.shutil, "copyfile", full_disk)
    out = tmp_path / "models"
    code = cli.main(["train", "tiny-gen", "--out", str(out), "--no-fp16"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "genserve-export train: error:" in err and "No space left on device" in err, err
    assert "model.onnx" in err and "Traceback" not in err, err


@pytest.mark.parametrize("command", ["verify", "train"])
def test_ctrl_c_during_a_command_is_one_line_and_exit_130(tmp_path: Path, command: str) -> None:
    """Ctrl-C (SIGINT) while `genserve-export verify` hashed the models or `train` trained: main()
    caught the SIGTERM it turns into BuildInterrupted, but not a plain KeyboardInterrupt, so a
    terminal's Ctrl-C printed a KeyboardInterrupt traceback and the process died of SIGINT (-2),
    where build-defaults says one line and exits 130."""
    where = (
        "genserve_export.verify.verify_repository"
        if command == "verify"
        else "genserve_export.cli.train_and_export"
    )
    module, name = where.rsplit(".", 1)
    argv = (
        ["verify", str(tmp_path)]
        if command == "verify"
        else ["train", "dcgan-digits", "--out", str(tmp_path / "m")]
    )
    script = (
        "import os, signal, sys, time, importlib\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        f"setattr(importlib.import_module({module!r}), {name!r}, interrupted)\n"
    )
    proc = _run_as_console_script(script, argv, status=130)
    assert proc.stderr.strip().splitlines()[-1] == f"genserve-export {command}: stopped (SIGINT)", proc.stderr


def test_a_sigterm_as_main_sets_its_handler_is_one_line_and_exit_143(tmp_path: Path) -> None:
    """A SIGTERM the moment main() had set _raise_interrupted as its handler, before its try: the
    BuildInterrupted escaped as a traceback, where a SIGTERM stops a command with one line and 143.
    Sent from signal.signal as it sets the handler; the command never runs."""
    script = (
        "import os, signal, sys\n"
        "import genserve_export.verify\n"
        "from genserve_export import cli\n"
        "set_handler = signal.signal\n"
        "def setting(signum, handler):\n"
        "    found = set_handler(signum, handler)\n"
        "    if handler is cli._raise_interrupted:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return found\n"
        "def never(*args, **kwargs):\n"
        "    print('the command ran', flush=True)\n"
        "signal.signal = setting\n"
        "genserve_export.verify.verify_repository = never\n"
    )
    proc = _run_as_console_script(script, ["verify", str(tmp_path)], status=128 + signal.SIGTERM)
    assert proc.stderr.strip().splitlines()[-1] == "genserve-export verify: stopped (SIGTERM)", proc.stderr
    assert "the command ran" not in proc.stdout


_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}.get(platform.machine())


@pytest.mark.skipif(
    _READ_SYSCALL is None or not Path("/proc/self/task").is_dir(), reason="reads /proc/self/task/TID/syscall"
)
def test_a_ctrl_c_soon_after_a_sigterm_stops_a_command_with_the_sigterms_line_and_status(
    tmp_path: Path,
) -> None:
    """A SIGTERM (a job runner's stop), then a Ctrl-C, both arriving while the main thread was in C
    code not looking (a torch op, an ONNX export): Python runs their handlers in the order of their
    numbers, SIGINT's first, and the SIGTERM's BuildInterrupted was raised next wherever the main
    thread then was: here in the cleanup's finally, cut short (a temporary export folder left), or
    main()'s except after its SIGINT line (a traceback). Both are one stop, the SIGTERM's, which
    came first: the cleanup runs whole, its one line, 143."""
    script = (
        "import os, signal, sys, threading, time\n"
        "import genserve_export.verify\n"
        "from genserve_export import cli\n"
        f"READ = {_READ_SYSCALL!r}  # the read syscall's number\n"
        "def waiting(*args, **kwargs):\n"
        "    stops = {signal.SIGINT, signal.SIGTERM}\n"
        "    read, write = os.pipe()\n"
        "    main = threading.get_native_id()\n"
        "    def send():  # this thread takes the signals, once the main thread waits in C (its read)\n"
        "        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)\n"
        "        with open(f'/proc/self/task/{main}/syscall') as f:\n"
        "            while f.read().split()[0] != str(READ):\n"
        "                time.sleep(0.001)\n"
        "                f.seek(0)\n"
        "        # to this thread itself, taken before pthread_kill returns (os.kill's may go to another)\n"
        "        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "        signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
        "        os.write(write, b'sent')\n"
        "    try:\n"
        "        signal.pthread_sigmask(signal.SIG_BLOCK, stops)\n"
        "        threading.Thread(target=send, daemon=True).start()\n"
        "        os.read(read, 4)\n"
        "        time.sleep(30)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
        "genserve_export.verify.verify_repository = waiting\n"
    )
    proc = _run_as_console_script(script, ["verify", str(tmp_path)], status=128 + signal.SIGTERM)
    stops = [line for line in proc.stderr.splitlines() if ": stopped (" in line]
    assert stops == ["genserve-export verify: stopped (SIGTERM)"], proc.stderr
    assert proc.stdout == "cleaned up\n"


@pytest.mark.parametrize("where", ["its line said", "SIGINT's handler put back"])
def test_a_second_sigterm_once_a_command_has_stopped_ends_it_at_once_with_the_first_stops_status(
    tmp_path: Path, where: str
) -> None:
    """A SIGTERM stops verify; a second one while main() says its line or puts the handlers back
    (SIGTERM's still _raise_interrupted) raised another BuildInterrupted there: a traceback after the
    line, exit 1. As genserve-client's second stop: the process ends at once, its line once, 143."""
    script = (
        "import os, signal, sys, time\n"
        "import genserve_export.verify\n"
        "from genserve_export import cli\n"
        f"WHERE = {where!r}\n"
        "def waiting(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "say = cli.err_line\n"
        "def saying(line):\n"
        "    say(line)\n"
        "    if WHERE == 'its line said':\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "set_handler = signal.signal\n"
        "def setting(signum, handler):\n"
        "    found = set_handler(signum, handler)\n"
        "    if WHERE != 'its line said' and signum == signal.SIGINT and found is cli._raise_interrupted:\n"
        "        signal.raise_signal(signal.SIGTERM)\n"
        "    return found\n"
        "genserve_export.verify.verify_repository = waiting\n"
        "cli.err_line = saying\n"
        "signal.signal = setting\n"
    )
    proc = _run_as_console_script(script, ["verify", str(tmp_path)], status=128 + signal.SIGTERM)
    stops = [line for line in proc.stderr.splitlines() if ": stopped (" in line]
    assert stops == ["genserve-export verify: stopped (SIGTERM)"], proc.stderr


@pytest.mark.parametrize("where", ["its line said", "as it returns"])
def test_a_second_sigterm_once_a_parallel_build_has_stopped_ends_it_at_once_with_its_line_once(
    tmp_path: Path, where: str
) -> None:
    """build-defaults --jobs N says its own stop line ('interrupted (SIGTERM)', its recipes' processes
    stopped) and returns 143 through main(), SIGTERM's handler still _raise_interrupted: a second
    SIGTERM there raised another BuildInterrupted, which main() took as a second stop and said a
    second line ('stopped (SIGTERM)'). As main()'s own stop: the process ends at once, one line, 143."""
    script = (
        "import signal, sys, threading, time\n"
        "from genserve_export import cli\n"
        f"WHERE = {where!r}\n"
        "def sigterm():  # to this thread itself, taken before pthread_kill returns\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "def building(*args, **kwargs):\n"
        "    sigterm()\n"
        "    time.sleep(30)\n"
        "say = cli.err_line\n"
        "def saying(line):\n"
        "    say(line)\n"
        "    if WHERE == 'its line said':\n"
        "        sigterm()\n"
        "status = cli._stdout_status\n"
        "def returning(command, code):\n"
        "    if WHERE == 'as it returns':\n"
        "        sigterm()\n"
        "    return status(command, code)\n"
        "cli._build_in_processes = building\n"
        "cli.err_line = saying\n"
        "cli._stdout_status = returning\n"
    )
    argv = ["build-defaults", "--out", str(tmp_path / "m"), "--jobs", "2"]
    argv += ["--no-verify", "--only", "dcgan-digits"]
    proc = _run_as_console_script(script, argv, status=128 + signal.SIGTERM)
    stops = [line for line in proc.stderr.splitlines() if "stopped (" in line or "interrupted (" in line]
    assert stops == ["build-defaults: interrupted (SIGTERM); the recipes still training were stopped"], (
        proc.stderr
    )


@pytest.mark.parametrize(
    "where", ["its wakeup fd unwatched", "SIGINT's handler put back", "SIGTERM's handler put back"]
)
def test_a_sigterm_as_main_puts_its_handlers_back_after_a_command_ends_with_143_quietly(
    tmp_path: Path, where: str
) -> None:
    """A command done (its status in hand), main()'s finally puts the process back: a SIGTERM there,
    SIGTERM's handler still _raise_interrupted, raised a BuildInterrupted out of main(): a
    traceback, the command's status lost. The process ends as a SIGTERM ends it: 143, the command's
    output all there, no traceback."""
    script = (
        "import signal, sys, threading\n"
        "from genserve_export import cli\n"
        f"WHERE = {where!r}\n"
        "def sigterm():  # to this thread itself, taken before pthread_kill returns\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)\n"
        "def counting(path):\n"
        "    cli._say('counted')\n"
        "    return 0\n"
        "unwatch = cli.unwatch_arrivals\n"
        "def unwatching():\n"
        "    if WHERE == 'its wakeup fd unwatched':\n"
        "        sigterm()\n"
        "    unwatch()\n"
        "set_handler = signal.signal\n"
        "def setting(signum, handler):\n"
        "    name = signal.Signals(signum).name\n"
        "    # main()'s own put-back, not stop_signals' brief swaps while it (un)watches the wakeup fd\n"
        "    ours = getattr(handler, '__module__', None) == 'genserve_contract.stop_signals'\n"
        "    put_back = signal.getsignal(signum) is cli._raise_interrupted is not handler and not ours\n"
        '    if put_back and WHERE == name + "\'s handler put back":\n'
        "        sigterm()\n"
        "    return set_handler(signum, handler)\n"
        "cli._count_activations = counting\n"
        "cli.unwatch_arrivals = unwatching\n"
        "signal.signal = setting\n"
    )
    proc = _run_as_console_script(script, ["count-activations", str(tmp_path)], status=128 + signal.SIGTERM)
    assert proc.stdout == "counted\n"


def test_a_sigterm_as_main_puts_its_handlers_back_after_an_in_process_command_reaches_the_programs_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """main(argv) called from a program: a SIGTERM once the command is done, as main() puts SIGTERM's
    handler back, raised a BuildInterrupted into the program. It goes to the program's handler, put
    back, as a SIGTERM that stopped the command does."""
    received: list[int] = []

    def program(signum: int, frame: object) -> None:
        received.append(signum)

    set_handler = signal.signal

    def setting(signum: int, handler: Any) -> Any:
        if signum == signal.SIGTERM and handler is program:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # taken before it returns
        return set_handler(signum, handler)

    monkeypatch.setattr(cli, "_count_activations", lambda path: 0)
    previous = signal.signal(signal.SIGTERM, program)
    try:
        monkeypatch.setattr(signal, "signal", setting)
        code = cli.main(["count-activations", str(tmp_path)])
        monkeypatch.undo()
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        monkeypatch.undo()
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert received == [signal.SIGTERM]
    assert handler is program


def test_a_sigterm_to_a_program_running_a_command_in_process_reaches_that_programs_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main(argv) called from Python (a test suite, a program running the CLI in its own process)
    turned a SIGTERM to that process into its own stop and returned 143: the program never saw it,
    so `timeout` stopping pytest during an export test failed that test and the suite ran on. The
    command still stops through its cleanup; then the signal goes to the handler it found."""
    received: list[int] = []

    def interrupted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)

    def program(signum: int, frame: object) -> None:
        received.append(signum)

    monkeypatch.setattr(cli, "train_and_export", interrupted)
    previous = signal.signal(signal.SIGTERM, program)
    try:
        code = cli.main(["train", "dcgan-digits", "--out", str(tmp_path / "m")])
        handler = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == "genserve-export train: stopped (SIGTERM)"
    assert received == [signal.SIGTERM]
    assert handler is program


def test_a_ctrl_c_as_main_sets_its_wakeup_fd_leaves_none_set_after_an_in_process_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C handled inside watch_arrivals once it had set its wakeup fd, before main() had
    what undoes it: main(argv) called from a program left the command's pipe as the process's
    wakeup fd (an event loop's or a later run's own refused) and its two descriptors open. The
    command stops as anywhere else, and the process is put back."""
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
            cli.main(["verify", str(tmp_path)])
    finally:
        left = set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, handlers[0])
    assert ours and left == -1, (ours, left)
    with pytest.raises(OSError):
        os.fstat(ours[0])


@pytest.mark.parametrize("command", ["train", "build-defaults"])
def test_a_ctrl_c_to_a_program_running_a_command_in_process_reaches_that_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """main(argv) called from Python (a test suite, a program running the CLI in its own process)
    caught the KeyboardInterrupt of a Ctrl-C to that process and returned 130: the program never saw
    it, so Ctrl-C on pytest during an export test failed that test and the suite ran on. The command
    still stops through its cleanup, with its line; then the KeyboardInterrupt goes on to the caller,
    as a SIGTERM goes on to its handler."""

    def interrupted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)

    if command == "train":
        monkeypatch.setattr(cli, "train_and_export", interrupted)
        argv = ["train", "dcgan-digits", "--out", str(tmp_path / "m")]
        line = "genserve-export train: stopped (SIGINT)"
    else:  # --jobs 2: the build's own stop, its recipes' processes stopped
        monkeypatch.setattr(cli, "_build_in_processes", interrupted)
        argv = ["build-defaults", "--out", str(tmp_path / "m"), "--jobs", "2", "--no-verify"]
        argv += ["--only", "dcgan-digits"]
        line = "build-defaults: interrupted (SIGINT); the recipes still training were stopped"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as a program has it
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main(argv)
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    assert after == handlers[1]


def test_ctrl_c_with_stderr_closed_exits_130() -> None:
    """`genserve-export verify models 2>&-` (a cron line discarding diagnostics): Python has no
    sys.stderr then, and the Ctrl-C line's write raised AttributeError, so the process exited 1
    where an interrupt is 130."""
    script = (
        "import os, signal, sys, time\n"
        "import genserve_export.verify\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "genserve_export.verify.verify_repository = interrupted\n"
    )
    _run_as_console_script(script, ["verify", "."], status=130, close_stderr=True)


@pytest.mark.parametrize(
    "argv, status",
    [(["count-activations", "no-such-folder"], 2), (["build-defaults", "--only", "no-such-recipe"], 2)],
)
def test_an_error_with_stderr_closed_keeps_its_exit_status(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], status: int
) -> None:
    """With stderr closed (`2>&-`: no sys.stderr) every error line's write raised AttributeError:
    a traceback to nowhere and exit 1, whatever the error's own status."""
    monkeypatch.setattr(sys, "stderr", None)
    assert cli.main(argv) == status


@pytest.mark.parametrize("stdout", ["reader gone", "closed"])
def test_verify_whose_stdout_cannot_take_the_report_says_so_without_a_traceback(
    tmp_path: Path, stdout: str
) -> None:
    """`genserve-export verify models | true`: the report's write to a pipe whose reader had gone
    printed "Exception ignored ... BrokenPipeError" at the final flush (exit 120), or, for a report
    past the 8 KiB buffer (the default repository's), a BrokenPipeError traceback (exit 1); with
    stdout closed (`>&-`) an AttributeError traceback. Now, as the client does: 141 without a word
    for a reader gone, and one line and exit 1 for a closed stdout."""
    shutil.copytree(REPO_ROOT / "models" / "dcgan-digits", tmp_path / "models" / "dcgan-digits")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    command = [
        sys.executable,
        "-c",
        "import sys; from genserve_export.cli import main; sys.exit(main())",
        "verify",
        str(tmp_path / "models"),
        "--no-quality",
    ]
    if stdout == "closed":
        proc = subprocess.Popen(exec_wrapped(command, close_fds=(1,)), stderr=subprocess.PIPE, env=env)
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    problems = [line for line in err.splitlines() if not line.startswith("INFO ")]  # the log's
    if stdout == "closed":
        assert proc.wait(timeout=120) == 1, err
        assert problems == [
            "genserve-export verify: write error: stdout is closed: its output was not printed"
        ]
    else:
        assert proc.wait(timeout=120) == 141, err
        assert problems == []


@pytest.mark.parametrize("unbuffered", ["", "1"])
@pytest.mark.parametrize("command", [["--help"], ["verify", "--help"]], ids=["--help", "verify --help"])
def test_help_to_a_reader_that_goes_away_exits_141_quietly(command: list[str], unbuffered: str) -> None:
    """`genserve-export --help | true`: argparse prints the help and exits inside parse_args, before
    main flushes stdout, so where stdout is buffered the interpreter's final flush printed "Exception
    ignored ... BrokenPipeError" and exited 120; unbuffered, argparse dropped the failed write and
    exited 0. As a command's report: nothing on stderr, exit 141."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = unbuffered
    entry = "import sys; from genserve_export.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", entry, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the help
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err


def test_version_prints_the_package_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`genserve-export --version`: the distribution and its version, exit 0, nothing trained."""
    import genserve_export

    assert cli.main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"genserve-export {genserve_export.__version__}\n", "")


def test_verify_of_one_model_directory_verifies_that_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`genserve-export verify models/sr-photos-x4` took the model's folder for a repository and
    reported each version folder as a model without config.json or versions, exit 1. A folder
    holding config.json is one model: its versions are verified, as in its repository."""
    shutil.copytree(REPO_ROOT / "models" / "sr-photos-x4", tmp_path / "models" / "sr-photos-x4")
    code = cli.main(["verify", str(tmp_path / "models" / "sr-photos-x4"), "--no-quality"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "config.json is missing" not in out and "no version directory" not in out, out
    assert "1 model version(s) checked" in out and "all OK" in out, out


def test_verify_of_the_current_model_directory_names_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`genserve-export verify .` inside a model's folder took '.' whose name is '' for the model:
    it reported '[FAIL] /1' with 'card.json: name/version stylegan-digits-mapping/1 differ from the
    directory', exit 1. The folder is named by its own name, as `verify models/<name>` is."""
    shutil.copytree(
        REPO_ROOT / "models" / "stylegan-digits-mapping", tmp_path / "models" / "stylegan-digits-mapping"
    )
    monkeypatch.chdir(tmp_path / "models" / "stylegan-digits-mapping")
    code = cli.main(["verify", ".", "--no-quality"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[OK] stylegan-digits-mapping/1" in out, out


@pytest.mark.parametrize(
    ("argv", "flag", "says"),
    [
        (["train", "tiny-gen", "--out", ""], "--out", "empty"),
        (["build-defaults", "--out", "", "--only", "tiny-gen"], "--out", "empty"),
        (["import-rrdn", "", "--out", "m"], "package", "empty"),
        (["import-rrdn", "pkg.tgz", "--out", ""], "--out", "empty"),
        (["verify", ""], "path", "empty"),
        (["verify", "m", "--grids", ""], "--grids", "empty"),
        (["count-activations", ""], "path", "empty"),
        (["train", "tiny-gen", "--out", "m", "--seed", "-1"], "--seed", "0..4294967295"),
        (["train", "tiny-gen", "--out", "m", "--seed", str(2**32)], "--seed", "0..4294967295"),
        (["build-defaults", "--out", "m", "--seed", "-1", "--only", "tiny-gen"], "--seed", "0..4294967295"),
    ],
)
def test_an_empty_path_or_a_seed_numpy_cannot_take_is_a_usage_error_naming_the_flag(
    tmp_path: Path,
    fake_recipe: _FakeRecipe,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    flag: str,
    says: str,
) -> None:
    """An empty path (`--out "$REPO"` with the variable unset) was the working folder: train and
    build-defaults trained into it, verify and count-activations checked it. `--seed -1` (or 2^32)
    trained until numpy's seeding raised `ValueError: Seed must be between 0 and 2**32 - 1`, a
    traceback. Each is a usage error naming the flag, exit 2, before any training."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert flag in err and says in err, err
    assert fake_recipe.trained == 0
    assert list(tmp_path.iterdir()) == []
