"""What every part of the benchmark shares: the models it finds, their inputs, the machine, output."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

import numpy as np
from numpy.typing import NDArray

from genserve_contract.kinds import Kind
from genserve_server.config import Card, ModelConfig, cpu_count, load_card, load_model_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = REPO_ROOT / "models"
SCRATCH = REPO_ROOT / "build" / "bench"

# Fixed input sizes of the image-input kinds, so raw ORT and both servers see the same tensors:
# super-resolution 64x64 -> 256x256 at x4 (128x128 at x2), translation at 256x256 (pix2pix).
IMAGE_INPUT_HW: Mapping[Kind, tuple[int, int]] = {
    Kind.SUPER_RESOLUTION: (64, 64),
    Kind.IMAGE_TO_IMAGE: (256, 256),
}
# The gRPC method each kind is driven through.
METHOD_BY_KIND: Mapping[Kind, str] = {
    Kind.GENERATOR: "Sample",
    Kind.CONDITIONAL_GENERATOR: "Sample",
    Kind.VAE_DECODER: "Sample",
    Kind.SUPER_RESOLUTION: "SuperResolve",
    Kind.IMAGE_TO_IMAGE: "Translate",
    Kind.VAE_ENCODER: "Encode",
}


def write_line(text: str = "") -> None:
    """The benchmark's one way to print (it is a report, not a library)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def temporary_worktree(repo: Path, rev: str, path: Path) -> Iterator[Path]:
    """`rev` checked out at `path`, a git worktree of `repo` (bench.ab's and bench.fairness's side A),
    removed on the way out however the block ends, Ctrl-C during `git worktree add` included. git is
    let finish then (or clean up after itself, where Ctrl-C reached it too): subprocess.run killed it
    mid-checkout, its half-made worktree left registered and locked, its checkout's child still
    writing into `path`."""
    git = ["git", "-C", str(repo)]
    try:
        adding = subprocess.Popen(
            [*git, "worktree", "add", "--detach", str(path), rev],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = adding.communicate()
        except KeyboardInterrupt:
            adding.wait()
            raise
        if adding.returncode != 0:
            raise subprocess.CalledProcessError(adding.returncode, adding.args, stderr=err)
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False, capture_output=True)


P = ParamSpec("P")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a CI job's cancel), raised where Ctrl-C raises KeyboardInterrupt,
    so a bench command stops its servers, clients and worktrees on it as on a Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    # Once: a second SIGTERM while the command stops its servers would cut their stop short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def ctrl_c_exits_130(name: str) -> Callable[[Callable[P, int | None]], Callable[P, int]]:
    """A bench command's main (`name`: how it is run, `python -m bench.soak`'s bench.soak): Ctrl-C
    stops it as it stops every command of the project, `NAME: interrupted` on stderr and exit 130, no
    traceback; SIGTERM the same way, `NAME: terminated (SIGTERM)` and exit 143 (as genserve-client's
    commands: Python's default ended the process at once, its servers left running as orphans);
    otherwise its exit status (0 where it returns None)."""

    def command(main: Callable[P, int | None]) -> Callable[P, int]:
        @functools.wraps(main)
        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            # Only the main thread may set a handler (a command called from another thread keeps
            # the process's SIGTERM as it is).
            in_main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
            try:
                code = main(*args, **kwargs)
            except Terminated:
                sys.stderr.write(f"{name}: terminated (SIGTERM)\n")
                return 143
            except KeyboardInterrupt:
                sys.stderr.write(f"{name}: interrupted\n")
                return 130
            finally:
                if in_main:
                    signal.signal(signal.SIGTERM, previous)
            return 0 if code is None else code

        return run

    return command


@dataclass(frozen=True, slots=True)
class BenchModel:
    """One served model version as the benchmark sees it."""

    name: str
    kind: Kind
    version_dir: Path
    card: Card
    config: ModelConfig

    @property
    def model_path(self) -> Path:
        return self.version_dir / "model.onnx"

    @property
    def max_batch_size(self) -> int:
        return int(self.config.batching.max_batch_size)

    @property
    def method(self) -> str:
        method: str = METHOD_BY_KIND[self.kind]
        return method

    def client_options(self) -> dict[str, Any]:
        """What the load generator needs besides the name: labels, the RPC, an input image's size."""
        labels = list(range(len(self.card.class_names))) if self.kind.conditional else []
        image_size = self.image_input_hw() if self.kind.fully_convolutional else None
        return {"labels": labels, "method": self.method, "image_size": image_size}

    def image_input_hw(self) -> tuple[int, int]:
        """Input H, W for image-input kinds: the fixed bench size, rounded up to the size multiple."""
        if self.card.image_size is not None and not self.kind.fully_convolutional:  # the encoder
            return (int(self.card.image_size[0]), int(self.card.image_size[1]))
        h, w = IMAGE_INPUT_HW.get(self.kind, (64, 64))
        m = max(1, self.card.size_multiple)
        return (-(-h // m) * m, -(-w // m) * m)


def find_models(root: Path, names: list[str] | None = None) -> list[BenchModel]:
    """Every model directory of `root` (or only `names`) with its highest version."""
    found: list[BenchModel] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if names is not None and model_dir.name not in names:
            continue
        config_path = model_dir / "config.json"
        versions = [v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()]
        if not config_path.is_file() or not versions:
            continue
        version_dir = max(versions, key=lambda v: int(v.name))
        if not (version_dir / "model.onnx").is_file():
            continue
        card = load_card(version_dir / "card.json")
        config = load_model_config(config_path)
        found.append(BenchModel(model_dir.name, card.kind, version_dir, card, config))
    return found


def make_feeds(model: BenchModel, batch: int, seed: int = 0) -> dict[str, NDArray[Any]]:
    """Inputs of `batch` rows for the graph, as the server would build them."""
    rng = np.random.default_rng(seed)
    card = model.card
    feeds: dict[str, NDArray[Any]] = {}
    for spec in card.inputs:
        if spec.name == "z":
            feeds["z"] = rng.standard_normal((batch, card.latent_dim or spec.shape[1])).astype(np.float32)
        elif spec.name == "label":
            feeds["label"] = (np.arange(batch) % max(1, len(card.class_names))).astype(np.int64)
        elif spec.dtype == "int64":  # a translator's direction, a prior's code grids: zeros
            feeds[spec.name] = np.zeros((batch, *spec.shape[1:]), np.int64)
        elif len(spec.shape) != 4:  # a style generator's ws [N, num_ws, w_dim]
            feeds[spec.name] = rng.standard_normal((batch, *spec.shape[1:])).astype(np.float32)
        else:
            channels = card.input_channels or (spec.shape[1] if spec.shape[1] > 0 else 3)
            h, w = model.image_input_hw()
            lo, hi = card.input_range or (0.0, 1.0)
            feeds[spec.name] = rng.uniform(lo, hi, (batch, channels, h, w)).astype(np.float32)
    return feeds


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model_name = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:
        ort_version = "absent"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    gpu = "none"
    try:  # what the servers' CUDA provider would run on (the GPU bench run, scripts/gpu_bench.sh)
        query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]
        names = subprocess.run(query, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
        gpu = names.splitlines()[0] if names else "none"
    except OSError:
        pass
    return {
        "cpu_model": model_name,
        "cores": cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "onnxruntime": ort_version,
        "platform": platform.platform(),
        "gpu": gpu,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def write_text_whole(path: Path, text: str) -> None:
    """`path` holds `text`, written under a temporary name of this call beside it
    (`.NAME.PID.RANDOM.tmp`, created exclusively) and renamed into place: a reader never sees part
    of it, and two writers at once (two runs with one --out) each rename a whole file of their own
    (a fixed `<out>.tmp` let the second truncate and take the file the first was about to rename)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            handle = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path}")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_whole(path, json.dumps(value, indent=2) + "\n")
