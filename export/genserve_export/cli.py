"""``genserve-export``: train, build-defaults, import-rrdn, verify, count-activations."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from genserve_contract.flags import nonempty_path
from genserve_contract.repository import (
    NAME_PATTERN,
    NAME_RULE,
    RESERVED_NAMES,
    VERSION_PATTERN,
    latest_version_dir,
)
from genserve_contract.stdio import HelpParser, Stdout, err_line
from genserve_contract.stop_signals import (
    STOP_SIGNALS,
    arrived_first,
    end_now,
    pass_on,
    stops_held,
    unwatch_arrivals,
    watch_arrivals,
)
from genserve_export.build import DEFAULT_SEED, train_and_export, version_dirs
from genserve_export.data.digits import MissingDataError
from genserve_export.data.fashion import MissingDataError as FashionDataError
from genserve_export.errors import ExportError
from genserve_export.export import refuse_published
from genserve_export.recipe import DEFAULT_VERSION
from genserve_export.recipes import RECIPES

logger = logging.getLogger("genserve_export")


# What became of stdout: its reader went away (`| true`: the rest of the report goes nowhere, exit
# 141) or it was closed from the start (`>&-`: no sys.stdout, exit 1 with one line); the command
# finishes its work either way (main).
_STDOUT = Stdout()
# The largest training seed: recipes seed numpy's global generator, which takes 0..2^32-1.
MAX_SEED = 2**32 - 1


def _say(text: str, flush: bool = False) -> None:
    """The CLI's report to the user on stdout (logging goes to stderr)."""
    _STDOUT.say(text, flush=flush)


def _stdout_status(command: str, status: int) -> int:
    """The exit status once the command is done, given what became of stdout."""
    closed = f"genserve-export {command}: write error: stdout is closed: its output was not printed"
    return _STDOUT.exit_status(status, closed)


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _version(text: str) -> str:
    """An argparse type: a version directory name (a positive integer such as 2)."""
    if not VERSION_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must be a positive integer such as 2, got {text!r}")
    return text


def _model_name(text: str) -> str:
    """An argparse type: a repository entry name a model may have (export_model refuses any other,
    but only once the import's work is done)."""
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"must match {NAME_RULE}, got {text!r}")
    if text in RESERVED_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is the server's own grpc.health key, not a model's")
    return text


def _positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, ...), checked before any
    training rather than failing with a traceback once the data is loaded."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown torch device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return text


def _out_error(command: str, out: Path) -> str | None:
    """Why `out` (--out) cannot be a repository directory, or None: a path that is, or lies under, an
    existing file would otherwise fail with a traceback only when exporting, after the training."""
    for path in (out, *out.parents):
        if path.exists():
            if path.is_dir():
                return None
            return f"genserve-export {command}: error: --out {out}: {path} is a file, not a directory"
    return None


def _seed(text: str) -> int:
    """An argparse type: a training seed, 0..2^32-1 (what numpy's seeding takes: -1 trained until it
    raised `Seed must be between 0 and 2**32 - 1`, a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {value}")
    return value


_POSITIVE = _at_least(1)
_NON_NEGATIVE = _at_least(0)

# A published version directory is immutable (docs/model-repository.md): each writing command
# refuses one unless told --replace, and says how to proceed.
_REPLACE_HELP = (
    "rebuild in place: replace a published %s whole (built beside it, then swapped in by a rename; a "
    "server already serving it keeps its loaded copy and reports the change, docs/operations.md)"
)
_NEW_VERSION = "write a new version (--version N), or pass --replace to rebuild it in place"


class _Parser(HelpParser):
    """--help's text goes to stdout as the report does (_say): a reader gone or a closed stdout is
    found (main)."""

    stdout = _STDOUT


def _package_version() -> str:
    """The installed genserve-export's version, else the package's own (a checkout on PYTHONPATH)."""
    try:
        return importlib.metadata.version("genserve-export")
    except importlib.metadata.PackageNotFoundError:
        import genserve_export

        return genserve_export.__version__


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genserve-export", description=__doc__)
    parser.add_argument(
        "--version",
        action="version",
        version=f"genserve-export {_package_version()}",
        help="print the version",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one default recipe and export it")
    train.add_argument("name", choices=sorted(RECIPES), help="recipe name")
    train.add_argument(
        "--steps", type=_POSITIVE, default=None, help="optimiser steps (default: the recipe's)"
    )
    train.add_argument("--seed", type=_seed, default=DEFAULT_SEED)
    train.add_argument("--out", type=nonempty_path, default=Path("models"), help="repository directory")
    train.add_argument(
        "--device", type=_device, default=None, help="torch device (default: cuda when present)"
    )
    train.add_argument(
        "--threads", type=_POSITIVE, default=1, help="torch CPU threads (default 1: shared machine)"
    )
    train.add_argument("--no-fp16", action="store_true", help="do not write model.fp16.onnx")
    train.add_argument(
        "--version",
        type=_version,
        default=None,
        help=f"version directory of every entry the recipe writes (default {DEFAULT_VERSION})",
    )
    train.add_argument("--replace", action="store_true", help=_REPLACE_HELP % "<out>/<entry>/<version>")

    build = sub.add_parser("build-defaults", help="train and export every default recipe")
    build.add_argument("--out", type=nonempty_path, default=Path("models"))
    build.add_argument(
        "--steps-scale", type=_positive_float, default=1.0, help="multiply every recipe's default steps"
    )
    build.add_argument("--seed", type=_seed, default=DEFAULT_SEED)
    build.add_argument("--only", nargs="+", default=None, help="restrict to these recipes")
    build.add_argument("--threads", type=_POSITIVE, default=1)
    build.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="recipes trained at once, each in its own process (e.g. the machine's cores: every recipe "
        "trains on --threads threads, so a 2-core machine builds twice as fast with --jobs 2)",
    )
    build.add_argument("--no-verify", action="store_true", help="skip verify after building")
    build.add_argument(
        "--replace",
        action="store_true",
        help=_REPLACE_HELP % f"<out>/<entry>/{DEFAULT_VERSION}"
        + "; without it, one is refused before any training",
    )

    imp = sub.add_parser(
        "import-rrdn",
        help="import a pretrained upscalerjs ESRGAN/RRDN super-resolution model (an npm package fetched "
        "by `make pretrained`) and export it",
    )
    imp.add_argument(
        "package", type=nonempty_path, help="the npm package: its .tgz or the unpacked directory"
    )
    imp.add_argument("--out", type=nonempty_path, default=Path("models"), help="repository directory")
    imp.add_argument("--name", type=_model_name, default="esrgan-x4", help="repository entry name")
    imp.add_argument("--version", type=_version, default="1", help="version directory")
    imp.add_argument("--replace", action="store_true", help=_REPLACE_HELP % "<out>/<name>/<version>")
    imp.add_argument(
        "--scale", type=_POSITIVE, default=4, help="which of the package's models/x<scale> to import"
    )
    imp.add_argument(
        "--pixel-max",
        choices=("auto", "1", "255"),
        default="auto",
        help="input range the TF.js model expects, [0, 1] or [0, 255] (auto: the one that reproduces the "
        "package's own sample output)",
    )
    imp.add_argument("--tile-size", type=_POSITIVE, default=128, help="card tile_size (input px)")
    imp.add_argument("--tile-overlap", type=_NON_NEGATIVE, default=16, help="card tile_overlap (input px)")
    imp.add_argument(
        "--max-batch-size",
        type=_POSITIVE,
        default=2,
        help="config.json batching.max_batch_size (small: the server warms batches of 1 and this at load)",
    )
    imp.add_argument(
        "--min-gain-db",
        type=float,
        default=0.5,
        help="card threshold on psnr_y_gain_db (BT.601 luma, border shaved)",
    )
    imp.add_argument(
        "--threads", type=_POSITIVE, default=1, help="torch CPU threads (default 1: shared machine)"
    )
    imp.add_argument("--no-fp16", action="store_true", help="do not write model.fp16.onnx")
    imp.add_argument(
        "--fp16-weights",
        action="store_true",
        help="round the weights to float16 and store them so in model.onnx (half the size; computed in "
        "float32; the reference check and the figures are the rounded network's)",
    )

    verify = sub.add_parser("verify", help="check every model of a repository, or one model")
    verify.add_argument(
        "path", type=nonempty_path, help="the repository, or one model's folder (holding config.json)"
    )
    verify.add_argument(
        "--grids", type=nonempty_path, default=None, help="write a PNG sample grid per model here"
    )
    verify.add_argument(
        "--no-thresholds",
        action="store_true",
        help="report quality but do not fail on the card's thresholds (undertrained models)",
    )
    verify.add_argument("--no-quality", action="store_true", help="skip recomputing quality")

    count = sub.add_parser(
        "count-activations",
        help="write activation_bytes_per_output_value (counted from model.onnx) into the card.json of "
        "every super_resolution, image_to_image and two_way_translator version of a repository",
    )
    count.add_argument("path", type=nonempty_path, help="the repository")
    return parser


def _command_line(argv: Sequence[str]) -> str:
    return shlex.join(["genserve-export", *argv])


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if error := _out_error("train", args.out):
        err_line(error)
        return 2
    if not args.replace:
        refuse_published(version_dirs(args.name, args.out, args.version), _NEW_VERSION)
    result = train_and_export(
        args.name,
        args.out,
        seed=args.seed,
        steps=args.steps,
        command=_command_line(argv),
        device=args.device,
        threads=args.threads,
        fp16=not args.no_fp16,
        version=args.version,
        overwrite=args.replace,
    )
    for path in result.paths:
        _say(f"wrote {path}")
    _say(f"{args.name}: train {result.train_s:.1f} s, export {result.export_s:.1f} s")
    return 0


def _import_rrdn(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    from genserve_export.import_sr import import_tfjs_sr

    if not args.package.exists():
        err_line(
            f"genserve-export import-rrdn: error: package {args.package} not found (its .tgz or unpacked "
            "directory; `make pretrained` fetches it)"
        )
        return 2
    if error := _out_error("import-rrdn", args.out):
        err_line(error)
        return 2
    if not args.replace:
        refuse_published([args.out / args.name / args.version], _NEW_VERSION)
    torch.set_num_threads(args.threads)
    batch = args.max_batch_size
    tile = args.tile_size
    config = {
        # One large model: one instance using every core, small batches of tiles bounded by pixels.
        # efficient_batch_tolerance is left to its default, "auto": on a CPU a tile's call is long and
        # computes no faster in a batch, so tiles go one or two at a time (docs/model-repository.md).
        "instances": 1,
        "batching": {
            "max_batch_size": batch,
            "preferred_batch_sizes": sorted({1, batch}),
            "max_queue_size": 256,
            "max_batch_pixels": batch * tile * tile,
        },
    }
    target = import_tfjs_sr(
        args.package,
        out_dir=args.out,
        name=args.name,
        scale=args.scale,
        version=args.version,
        pixel_max=args.pixel_max,
        fp16=not args.no_fp16,
        weights_fp16=args.fp16_weights,
        config=config,
        tile_size=tile,
        tile_overlap=args.tile_overlap,
        min_quality_gain_db=args.min_gain_db,
        command=_command_line(argv),
        overwrite=args.replace,
        progress=_say,
    )
    _say(f"wrote {target}")
    return 0


def _recipe_steps(name: str, scale: float) -> int | None:
    """The recipe's default steps times `scale` (None: the recipe's own default)."""
    default = getattr(RECIPES[name], "default_steps", None)
    if scale == 1.0:
        return None
    if default is None:
        logger.warning("%s has no default_steps; --steps-scale ignored for it", name)
        return None
    return max(1, round(int(default) * scale))


def _after(name: str) -> dict[str, str]:
    """The entries recipe `name` starts from, each with the environment variable that names its model."""
    return dict(getattr(RECIPES[name], "after", {}))


def _dependency_models(out: Path, name: str, built: set[str]) -> dict[str, str]:
    """{environment variable: model.onnx} for each entry recipe `name` starts from that this build
    has written into `out` (the others keep their defaults)."""
    models = {}
    for dependency, variable in _after(name).items():
        latest = latest_version_dir(out / dependency) if dependency in built else None
        if latest is not None:
            models[variable] = str(latest / "model.onnx")
    return models


def _dependencies_first(names: list[str]) -> list[str]:
    """`names` in their order, except that a recipe comes after those it starts from (its `after`)."""
    ordered: list[str] = []

    def place(name: str, seen: tuple[str, ...]) -> None:
        if name in ordered or name in seen:
            return
        for dependency in _after(name):
            if dependency in names:
                place(dependency, (*seen, name))
        ordered.append(name)

    for name in names:
        place(name, ())
    return ordered


def _build_in_processes(args: argparse.Namespace, names: list[str]) -> list[tuple[str, str, float]]:
    """Train `names` `args.jobs` at a time, each through `genserve-export train` in its own process
    (a recipe holds torch's global state: threads, seeds). Returns (name, its last output line, wall
    seconds) per recipe; raises if one fails. However it ends (SIGTERM raises BuildInterrupted, a
    KeyboardInterrupt, while it runs), no child is left training."""
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
    # SIGTERM (a job runner's stop, `kill`) ends the build as Ctrl-C does: without it the parent
    # died at once and its children trained on into --out, each for minutes.
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    # Started with SIGINT ignored (`build-defaults &` in a script: POSIX shells without job control
    # do that), the children inherit it and would never see the SIGINT that stops them.
    stop_signal = signal.SIGTERM if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else signal.SIGINT
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if main_thread else None
    try:
        return _run_processes(args, names, running)
    finally:
        # A second SIGTERM or Ctrl-C while the children stop must not end the parent before it
        # has reaped them (and SIGKILLed one that ignores its SIGINT).
        ignored = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS} if main_thread else {}
        try:
            _stop_children(running, stop_signal)
        finally:
            for sig, handler in ignored.items():
                signal.signal(sig, handler)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


_received: list[int] = []  # the signals that stopped main()'s command (SIGTERM: _raise_interrupted)


class _Stopped:
    """main()'s command once stopped: its except has the stop (a signal from then on ends the
    process at once, end_now)."""

    status: int | None = None  # the stop's exit status (130, 143)
    line = ""  # its line, till said
    # main()'s command over, its finally putting the process back: the signals that arrived meanwhile,
    # for main() to pass on once the handlers it found are back (None outside that window).
    after: list[int] | None = None


def _raise_interrupted(signum: int, frame: Any) -> None:
    """Python runs the handlers of signals that arrived while the main thread was in C (a torch op,
    an ONNX export) in the order of their numbers, SIGINT's first: a SIGTERM's handler then raised
    its BuildInterrupted in the Ctrl-C's cleanup. Where main() set a wakeup fd, the C handler wrote
    each signal there as it arrived: the first read decides the stop, and a signal whose arrival an
    earlier handler read is part of that stop, not another one. Once main() has the stop (saying its
    line, putting the handlers back), a signal ends the process at once (end_now); once a command
    that was not stopped is over, main() passes it on when its handlers are back (_Stopped.after)."""
    if _Stopped.status is not None:
        end_now(_Stopped.status, _Stopped.line)
    if _Stopped.after is not None:
        _Stopped.after.append(signum)
        return
    first = arrived_first(signum)
    if first is None:  # its arrival was read with an earlier signal's: part of that stop
        return
    _received.append(first)
    raise BuildInterrupted(first)


def _say_stop(line: str) -> None:
    """main()'s stop line, with SIGINT and SIGTERM held till it is said: a signal meanwhile ends the
    process once it is (end_now), not with it said twice. The mask found is put back."""
    with stops_held():
        err_line(line)
        _Stopped.line = ""


class BuildInterrupted(KeyboardInterrupt):
    """The build was stopped by a signal (`signum`)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signum)
        self.signum = signum


# How long a stopped build waits for its recipes' cleanup before it SIGKILLs them, all together.
CHILD_STOP_GRACE_S = 10.0


def _stop_children(
    running: dict[str, tuple[subprocess.Popen[bytes], float, Any]], stop_signal: int = signal.SIGINT
) -> None:
    """Stop the recipes still training (`stop_signal`, then SIGKILL once CHILD_STOP_GRACE_S have
    passed) and reap them. SIGINT, as Ctrl-C in a terminal sends it to the whole group: a child's
    KeyboardInterrupt runs its cleanup (temporary folders, a half-published version), as its SIGTERM
    does (main); SIGTERM for children started with SIGINT ignored, which never see a SIGINT."""
    for process, _, _ in running.values():
        if process.poll() is None:
            process.send_signal(stop_signal)
    deadline = time.monotonic() + CHILD_STOP_GRACE_S  # one grace for all, not one more per child
    for name, (process, _, report) in running.items():
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        report.close()
        _say(f"{name}: stopped", flush=True)
    running.clear()


def _run_processes(
    args: argparse.Namespace, names: list[str], running: dict[str, tuple[subprocess.Popen[bytes], float, Any]]
) -> list[tuple[str, str, float]]:
    pending = list(names)
    rows: list[tuple[str, str, float]] = []
    failed: list[str] = []
    built: set[str] = set()
    while pending or running:
        # A recipe that starts from another's model (its `after`: {entry: environment variable
        # naming that entry's model.onnx}) waits for it, then gets the one just built.
        ready = [n for n in pending if all(d in built or d not in names for d in _after(n))]
        while ready and len(running) < args.jobs:
            name = ready.pop(0)
            pending.remove(name)
            env = {**os.environ, **_dependency_models(args.out, name, built)}
            command = [sys.executable, "-m", "genserve_export.cli", "train", name, "--out", str(args.out)]
            command += ["--seed", str(args.seed), "--threads", str(args.threads)]
            steps = _recipe_steps(name, args.steps_scale)
            if steps is not None:
                command += ["--steps", str(steps)]
            if args.replace:
                command.append("--replace")
            _say(f"{name}: started ({shlex.join(command[3:])})", flush=True)
            # Its report to a file (never a pipe that could fill); progress and logs to our stderr.
            report = tempfile.TemporaryFile()
            running[name] = (subprocess.Popen(command, stdout=report, env=env), time.perf_counter(), report)
        time.sleep(0.5)
        for name, (process, t0, report) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            report.seek(0)
            lines = report.read().decode(errors="replace").strip().splitlines()
            report.close()
            if process.returncode != 0:
                failed.append(name)
                _say(f"{name}: FAILED (exit {process.returncode})", flush=True)
                continue
            built.add(name)
            rows.append((name, lines[-1] if lines else "", time.perf_counter() - t0))
            _say(f"{rows[-1][1]} (wall {rows[-1][2]:.1f} s)", flush=True)
    if failed:
        raise RuntimeError(f"recipes failed: {', '.join(failed)}")
    return rows


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """`variables` set in os.environ for the block, then restored."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_defaults(args: argparse.Namespace, argv: Sequence[str]) -> int:
    # A name given twice is built once (with --jobs, twice would train it twice at once into --out).
    names = list(dict.fromkeys(args.only)) if args.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        err_line(f"unknown recipe(s): {', '.join(unknown)}; known: {', '.join(RECIPES)}")
        return 2
    if args.jobs < 1:
        err_line(f"--jobs must be >= 1, got {args.jobs}")
        return 2
    if error := _out_error("build-defaults", args.out):
        err_line(error)
        return 2
    if not args.replace:  # up front: not after hours of training the recipes before one
        how = "pass --replace to rebuild in place, or build into another --out"
        refuse_published([d for n in names for d in version_dirs(n, args.out)], how)
    started = time.perf_counter()
    if args.jobs > 1:
        try:
            done = _build_in_processes(args, names)
        except RuntimeError as exc:
            err_line(str(exc))
            return 1
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (BuildInterrupted): children stopped
            signum = exc.signum if isinstance(exc, BuildInterrupted) else signal.SIGINT
            name = signal.Signals(signum).name
            # The build's stop, as main()'s own: a signal from now on ends the process at once with
            # this status and the line once (end_now), not a second stop and a second line in main().
            _Stopped.status = 128 + signum
            _Stopped.line = f"build-defaults: interrupted ({name}); the recipes still training were stopped"
            _say_stop(_Stopped.line)
            if signum == signal.SIGINT:
                _received.append(signum)  # its KeyboardInterrupt goes on to main()'s caller (main)
            return 128 + signum
        _say("\nbuild-defaults wall time per model")
        for name, last, wall in done:
            _say(f"  {name:<22} {wall:7.1f} s  ({last})")
    else:
        rows = []
        built: set[str] = set()
        # As with --jobs: a recipe that starts from another's model gets the one just built into --out.
        for name in _dependencies_first(names):
            t0 = time.perf_counter()
            with _environment(_dependency_models(args.out, name, built)):
                result = train_and_export(
                    name,
                    args.out,
                    seed=args.seed,
                    steps=_recipe_steps(name, args.steps_scale),
                    command=_command_line(argv),
                    threads=args.threads,
                    overwrite=args.replace,
                )
            built.add(name)
            rows.append((name, result.steps, result.train_s, result.export_s, time.perf_counter() - t0))
            _say(
                f"{name}: steps {result.steps}, train {result.train_s:.1f} s, export {result.export_s:.1f} s",
                flush=True,
            )
        _say("\nbuild-defaults wall time per model")
        for name, steps, train_s, export_s, wall in rows:
            _say(
                f"  {name:<22} steps {steps!s:>6}  train {train_s:7.1f} s  export {export_s:5.1f} s  "
                f"total {wall:7.1f} s"
            )
    total = time.perf_counter() - started
    _say(f"  {'TOTAL':<22} {total:.1f} s ({total / 60:.1f} min, {args.jobs} at a time)")
    if args.no_verify:
        return 0
    return _verify_and__say(args.out, grids=None, thresholds=True, quality=True)


def _count_activations(path: Path) -> int:
    """card.json's activation_bytes_per_output_value for the versions already exported (cards written
    before the field): counted from each version's model.onnx and written into its card by a rename.
    The model files and the card's sha256 (which covers them, not the card) are untouched."""
    import json

    from genserve_contract.kinds import Kind
    from genserve_contract.repository import ACTIVATION_BYTES_FIELD
    from genserve_export.activations import annotate_version

    if not path.is_dir():
        err_line(f"genserve-export count-activations: error: {path} is not a directory")
        return 2
    failed = 0
    for model in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in sorted(p for p in model.iterdir() if VERSION_PATTERN.match(p.name)):
            card_path = version / "card.json"
            if not card_path.is_file() or not (version / "model.onnx").is_file():
                continue
            try:
                kind = Kind(json.loads(card_path.read_text()).get("kind"))
            except (ValueError, AttributeError, RecursionError):  # RecursionError: nested too deep
                continue  # not a card this command reads; verify names it
            if not (kind.tiled or kind.translates):
                continue
            try:
                value, old = annotate_version(version)
            except (ExportError, OSError, ValueError) as exc:
                err_line(f"genserve-export count-activations: {model.name}/{version.name}: {exc}")
                failed += 1
                continue
            was = "" if old is None else f" (was {old})"
            _say(f"{model.name}/{version.name}: {ACTIVATION_BYTES_FIELD} {value}{was}")
    return 1 if failed else 0


def _verify_and__say(path: Path, *, grids: Path | None, thresholds: bool, quality: bool) -> int:
    from genserve_export.verify import verify_repository

    report = verify_repository(path, grids_dir=grids, check_thresholds=thresholds, recompute_quality=quality)
    _say(report.format())
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``genserve-export`` console script."""
    entry = argv is None  # the process's own entry, not a call from a program (a test suite) in it
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse ends in parse_args: --help's or --version's text is on stdout (_say)
        if exc.code != 0:  # a usage error, on stderr
            raise
        return _stdout_status("--version" if argv[:1] == ["--version"] else "--help", 0)
    # SIGTERM (a job runner's stop, `kill`, and build-defaults --jobs stopping a recipe it started
    # with SIGINT ignored) stops a command as Ctrl-C does, through its cleanup: without it the
    # process died at once, leaving its temporary export folder and a half-staged version
    # (<name>/.tmp-<version>-<rand>) behind.
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal needs it
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    # Ctrl-C too where it is Python's (not ignored, not a program's own): the signal that arrived
    # first stops the command (_raise_interrupted), not the one Python handles first.
    previous_int = signal.getsignal(signal.SIGINT) if main_thread else None
    take_int = previous_int is signal.default_int_handler
    _received.clear()
    status = 1
    try:
        # In the try: a SIGTERM from the moment its handler is set is the command's stop (its line
        # and 143), not a BuildInterrupted traceback.
        if main_thread:
            signal.signal(signal.SIGTERM, _raise_interrupted)
        if take_int:
            signal.signal(signal.SIGINT, _raise_interrupted)
            watch_arrivals()
        status = _stdout_status(args.command, _run_command(args, argv))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (BuildInterrupted): cleanups have run
        signum = exc.signum if isinstance(exc, BuildInterrupted) else signal.SIGINT
        _Stopped.status = 128 + signum  # a signal from now on ends the process at once (end_now)
        _Stopped.line = f"genserve-export {args.command}: stopped ({signal.Signals(signum).name})"
        _say_stop(_Stopped.line)
        if signum == signal.SIGINT:
            _received.append(signum)
        status = 128 + signum
    finally:
        # First, with no call before it (where Python runs a signal's handler): a signal handled
        # before this was the command's stop (the except), one handled from here on is recorded and
        # passed on once the handlers are back, not a BuildInterrupted traceback out of main().
        after = _Stopped.after = []
        unwatch_arrivals()
        if take_int:
            signal.signal(signal.SIGINT, previous_int)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        # _raise_interrupted called later (build-defaults) raises
        _Stopped.status, _Stopped.line, _Stopped.after = None, "", None
        if not entry:  # called from a program: the signal that stopped the command was sent to it
            pass_on(_received + after, sigterm=previous is not None)
    # A signal once the command was over (its output all written) still ends the process with its
    # status, quietly: 143 for a SIGTERM, 130 for a Ctrl-C.
    return 128 + after[0] if after else status


def _run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        if args.command == "train":
            return _train(args, argv)
        if args.command == "build-defaults":
            return _build_defaults(args, argv)
        if args.command == "import-rrdn":
            return _import_rrdn(args, argv)
        if args.command == "count-activations":
            return _count_activations(args.path)
    except (ExportError, MissingDataError, FashionDataError) as exc:
        # What the user can fix (a package without that model, data not fetched, a module the
        # kind refuses): its message, not a traceback.
        err_line(f"genserve-export {args.command}: error: {exc}")
        return 1
    except OSError as exc:
        # The repository or a file it reads cannot be written or read (a full disk, a read-only
        # mount, no permission): the file and the cause, not a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        err_line(f"genserve-export {args.command}: error: {where}{exc.strerror or exc}")
        return 1
    return _verify_and__say(
        args.path, grids=args.grids, thresholds=not args.no_thresholds, quality=not args.no_quality
    )


if __name__ == "__main__":
    sys.exit(main())
