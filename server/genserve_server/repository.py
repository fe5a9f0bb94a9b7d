"""The model repository: discovery, the registry of models and versions, and their lifecycle
(docs/model-repository.md). Loading one version (card, sha256, sessions, warm-up, batcher wiring)
is loader.py's.

Each model directory gives a `Model` with one `ModelVersion` per version its policy serves. A
version owns its runner (ORT session + pool) and batcher. A corrupt or missing model marks only
that model (or version) UNAVAILABLE, with the reason GetModel shows; the others serve.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from genserve_contract.repository import NAME_PATTERN, NAME_RULE, RESERVED_NAMES
from genserve_contract.repository import VERSION_PATTERN as VERSION_PATTERN  # reload.py reads it here
from genserve_server import loader
from genserve_server.batcher import Batcher
from genserve_server.calibration import Calibration
from genserve_server.config import (
    Card,
    ConfigError,
    ModelConfig,
    ServerConfig,
    VersionPolicy,
    cpu_count,
    load_model_config,
)
from genserve_server.errors import GenserveError, NotFound, Unavailable, escape_controls, out_of_memory
from genserve_server.gpu_errors import sticky_cuda_error
from genserve_server.idle_spin import run_off_loop
from genserve_server.load_gate import HeldSteps, LoadGate
from genserve_server.metrics import Metrics, ModelMetrics
from genserve_server.runner import Runner
from genserve_server.step_sampler import StepScheduler

logger = logging.getLogger(__name__)


class ModelState(enum.IntEnum):
    """Same numbers as genserve.v1.ModelState."""

    LOADING = 1
    READY = 2
    UNAVAILABLE = 3
    DRAINING = 4


# Model.card(): whose card describes the model, best first.
_CARD_STATES = (ModelState.READY, ModelState.DRAINING, ModelState.LOADING, ModelState.UNAVAILABLE)

# An absolute path in a message (Repository.redact): a quoted one up to its quote, a bare one (at the
# start, after white space or an opening bracket) up to white space or punctuation that ends it. A
# slash inside a word or after `<models>` or `:` (1/2, KiB/s, a URL), or before a space or a
# digit (tile_size / 4), starts none.
_ABSOLUTE_PATH = re.compile(
    r"""(?<=")/[^"]*(?=")|(?<=')/[^']*(?=')|(?<![^\s(\[=])/[A-Za-z_.~-][^\s"',;)\]]*"""
)
OUTSIDE_PATH = "<path outside the repository>"
# Lone surrogates, which no answer can encode as UTF-8 (Repository.redact): Python holds a file
# name's bytes that are not UTF-8 (under a locale that is not UTF-8: every non-ASCII byte) as
# U+DC80..U+DCFF, each written as the \xNN of its byte; any other (a JSON "\ud800") as a repr does.
_SURROGATE_ESCAPES = {
    c: f"\\x{c - 0xDC00:02x}" if 0xDC80 <= c < 0xDD00 else repr(chr(c))[1:-1] for c in range(0xD800, 0xE000)
}


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: str
    path: Path
    config: ModelConfig
    metrics: ModelMetrics
    state: ModelState = ModelState.LOADING
    reason: str = ""
    card: Card | None = None
    sha256: str = ""
    # precision fp16: model.onnx's sha256 as the parity check verified it, its fp32 reference, which
    # a restart checks against card.json again (reload.py watches it beside the twin served; a
    # fallback to fp32 serves it with this sha256); "" where none was checked.
    reference_sha256: str = ""
    # The sha256 of each external data file a verified graph loads its weights from (card.json's, as
    # checked at load): {graph file name: {location: sha256}}; reload.py watches the served graph's
    # and its reference's beside them.
    external_sha256: dict[str, dict[str, str]] = field(default_factory=dict)
    # The served graph's external data files' digest (genserve_contract weights_digest), set once at
    # load: Provenance.weights_sha256 and GetModel's; "" where the graph holds its weights.
    weights_sha256: str = ""
    # loader.FileStat of each file above as stat'ed before its sha256 was read, by path: the load
    # refuses a file that was replaced or rewritten before ONNX Runtime opened it (loader._open).
    verified_stats: dict[str, loader.FileStat] = field(default_factory=dict)
    precision: str = "fp32"
    provider: str = ""
    # True when the config asked for TensorRT or CUDA (whether or not the session got one).
    gpu_requested: bool = False
    # What the sessions really run with (provider, precision, device, TF32, serving mode), from the
    # effective provider options: e.g. "CUDAExecutionProvider, fp32, device 0, tf32 off, cuda graphs".
    runtime: str = ""
    runner: Runner | None = None
    batcher: Batcher | None = None
    load_s: float = 0.0
    # super_resolution: receptive-field radius in input pixels, measured at load (None: not local
    # at the probe size, or not measured); SuperResolve sizes tile margins and overlap from it.
    tile_radius: int | None = None
    # The batch cap measured at warm-up (efficient_batch_size, or the warm-up memory budget's);
    # None: up to max_batch_size.
    efficient_batch_size: int | None = None
    # Image kinds: the pixels a batch may hold where the warm-up memory budget bounds it below
    # config.json's max_batch_pixels; None: max_batch_pixels.
    max_batch_pixels: int | None = None
    # What the warm-up did (sizes, costs, budgets), for logs and tests; None: no warm-up.
    calibration: Calibration | None = None
    # Unique per loaded version: what the image cache keys on. An image depends on the file and on
    # config.json (output_range, runtime options), and a reload builds a new ModelVersion.
    load_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Set while the model file on disk differs from the one this version loaded (reload.py checks it);
    # the version keeps serving the copy in memory. GetModel shows it as the READY version's reason.
    file_changed: str = ""
    # code_prior: its step scheduler (GenerationCore.stepper), made at the first call. Here, not in a
    # table of the core's, so that it (and the runner it holds) goes with the version.
    stepper: StepScheduler | None = None
    # Set at load where a row's output was found to depend on what shares its batch (loader.check_rows);
    # GetModel shows it as the READY version's reason too.
    batch_dependence: str = ""

    @property
    def label(self) -> str:
        return f"model {self.name} version {self.version}"


@dataclass(eq=False)
class Model:
    name: str
    path: Path
    config: ModelConfig | None
    # Why the files on disk are not what serves: a broken config.json (with no version loaded, the
    # whole model is UNAVAILABLE), no version directory, or a reload that kept the loaded versions.
    reason: str = ""
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The kind a request that names no version is served by (`kind_of`)."""
        return self.kind_of()

    def kind_of(self, version: str = "") -> str:
        """The kind of the version a request of `version` gets (`version`, else the highest READY
        one): its config's, which its card and graph were checked against at load. A config.json
        edit applies to versions loaded from then on, `kind` included, so a loaded version keeps its
        kind. With no such version: config.json's ("" while it is broken)."""
        mv = self.versions.get(version) if version else self.newest_ready()
        if mv is not None:
            return mv.config.kind.value
        return self.config.kind.value if self.config else ""

    def ready_versions(self) -> list[ModelVersion]:
        return [v for v in self.versions.values() if v.state == ModelState.READY]

    def newest_ready(self) -> ModelVersion | None:
        """The highest READY version: what a request that names no version gets."""
        ready = self.ready_versions()
        return max(ready, key=lambda v: int(v.version)) if ready else None

    def card(self, version: str = "") -> Card | None:
        """The card ListModels and GetModel describe the model by: `version`'s when one is named,
        else the highest READY version's (what a request without a version gets), so that a version
        that failed to load never describes a model another version serves. While none is READY: the
        highest DRAINING version's (what served until now), then LOADING (what is about to serve),
        then, with no other card, a failed version's (still what the model is)."""
        if version:
            named = self.versions.get(version)
            return named.card if named is not None else None
        for state in _CARD_STATES:
            with_card = [v for v in self.versions.values() if v.state == state and v.card is not None]
            if with_card:
                return max(with_card, key=lambda v: int(v.version)).card
        return None

    def resolve(self, version: str) -> ModelVersion:
        """The version to serve: `version`, or the highest READY one when empty."""
        if version:
            found = self.versions.get(version)
            if found is None:
                raise NotFound(
                    f"model {self.name} has no version {version!r}; "
                    f"versions: {', '.join(self.versions) or 'none'}",
                    field="version",
                    verbatim=repr(version),
                )
            if found.state != ModelState.READY:
                raise Unavailable(f"{found.label} is {found.state.name}: {found.reason or 'not ready'}")
            return found
        newest = self.newest_ready()
        if newest is None:
            reasons = self.reason or "; ".join(
                f"v{v.version}: {v.state.name} {v.reason}".rstrip() for v in self.versions.values()
            )
            raise Unavailable(f"model {self.name} has no ready version ({reasons or 'no versions'})")
        return newest


StateListener = Callable[[str, bool], None]


def _link_target(path: Path) -> str:
    """Where the symbolic link `path` points (as written in it)."""
    try:
        return str(path.readlink())
    except OSError as exc:
        return f"an unreadable target ({exc.strerror or exc})"


class LoadCancelled(GenserveError):
    """Start-up loading stopped by shutdown (not a broken model)."""


def policy_picks_none(model_path: Path, available: Sequence[str]) -> str:
    """The reason of a model whose config.json's version_policy picks none of its version directories."""
    return (
        f"{model_path / 'config.json'}: version_policy picks none of the version directories "
        f"on disk ({', '.join(sorted(available, key=int))})"
    )


def policy_misses(model_path: Path, policy: VersionPolicy, available: Sequence[str]) -> str:
    """The reason of a model whose `specific` version_policy lists versions with no directory on
    disk beside ones it picks ("" where it lists none such; where it picks none: policy_picks_none)."""
    missing = policy.missing(available)
    if not missing:
        return ""
    return (
        f"{model_path / 'config.json'}: version_policy's specific lists versions with no version "
        f"directory on disk ({', '.join(missing)}); serving the others it lists"
    )


def _model_name(name: str) -> bool:
    """Whether a repository directory's name is a model's (hidden ones and the server's own health
    keys are not)."""
    return not name.startswith(".") and NAME_PATTERN.match(name) is not None and name not in RESERVED_NAMES


class Repository:
    """All models under one directory; loads them and owns their runners and batchers."""

    def __init__(self, root: Path, server_config: ServerConfig, metrics: Metrics) -> None:
        self.root = root
        # Where the repository lies on this host, as messages may spell it (redact).
        self._root_prefixes = sorted(
            {f"{root.resolve()}{os.sep}", f"{root.absolute()}{os.sep}", f"{root}{os.sep}"},
            key=len,
            reverse=True,
        )
        self.server_config = server_config
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self._listeners: list[StateListener] = []
        # Set from the event loop, read by loading threads between their steps.
        self._stopping = threading.Event()
        # Runners of the loads in progress (not yet a version's; the fp16 parity check's sessions too):
        # `cancel_loading` aborts their model calls, so a long load-time call (the parity check, a
        # probe, warm-up) ends at once, not at its next step.
        # Weak: a runner is aborted only while it can still run (someone holds it).
        self._loading_runners: weakref.WeakSet[loader.Abortable] = weakref.WeakSet()
        self._loading_lock = threading.Lock()
        # What a sticky GPU failure does after marking its version (device_lost): SIGTERM to this
        # process, whose handler drains and exits (health NOT_SERVING first); the server's App
        # requests its stop itself instead (App._stop_for_restart), tests replace it too.
        self.on_fatal: Callable[[str], None] = _terminate_process
        self.fatal_reason = ""
        # Every load (start-up and reloads) passes this gate; its threads mostly wait in it, so the
        # pool is wide and the gate bounds the work.
        self.gate = LoadGate(server_config.load_concurrency or cpu_count())
        self._load_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="load")

    def add_listener(self, listener: StateListener) -> None:
        """Called with (model name, serving) whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    def __iter__(self) -> Iterator[Model]:
        return iter(self.models.values())

    def redact(self, text: str) -> str:
        """`text` for a client: the repository's location on this host becomes `<models>/`, so that a
        client learns which model file is at fault, never the server's file system; any absolute path
        left is outside the repository (ONNX Runtime's resolved path of external data that a model
        places outside its directory) and becomes OUTSIDE_PATH. Its control characters (a reason
        quotes repository files: a config.json key, a graph's node names) are escaped, so that no
        client printing it writes lines or terminal escapes of the repository writer's choosing.
        The log keeps the full text."""
        for prefix in self._root_prefixes:
            text = text.replace(prefix, "<models>/")
        text = escape_controls(_ABSOLUTE_PATH.sub(OUTSIDE_PATH, text))
        return text if text.isprintable() else text.translate(_SURROGATE_ESCAPES)

    def get(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            names = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {name!r} not found; models: {names}", field="model", verbatim=repr(name))
        return model

    # ------------------------------------------------------------------ discovery

    def scan(self) -> None:
        """Read every config.json and pick versions; nothing heavy (sessions load in `load_all`)."""
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "directory not found"
            raise ConfigError(f"{self.root}: model repository {what}")
        for model_dir in self.model_dirs():
            model = self.read_model(model_dir)
            if model.config is None:
                logger.error("model %s unavailable: %s", model.name, model.reason)
            else:
                available = self.available_versions(model)
                selected = model.config.version_policy.select(available)
                for version in selected:
                    self.add_version(model, version)
                if available and not selected:  # a typo in `specific`: as a rescan reports it
                    model.reason = policy_picks_none(model.path, available)
                if model.reason:  # no version directory, none that could be listed, or none picked
                    logger.error("model %s unavailable: %s", model.name, model.reason)
                elif selected:  # a typo in one of `specific`'s versions: the others serve
                    model.reason = policy_misses(model.path, model.config.version_policy, available)
                    if model.reason:
                        logger.warning("model %s: %s", model.name, model.reason)
            self.models[model.name] = model
            self.metrics.set_config_error(model.name, bool(model.reason))

    def model_dirs(self) -> list[Path]:
        """Model directories with valid names (others are logged and skipped)."""
        dirs = []
        try:
            listed = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as exc:  # no read (or search) permission: one line naming it, not a traceback
            raise ConfigError(f"{self.root}: model repository cannot be read: {exc.strerror or exc}") from exc
        for model_dir in listed:
            if model_dir.name in RESERVED_NAMES:
                logger.warning(
                    "skipping %s: %r is the server's own grpc.health key, not a model name (rename it)",
                    model_dir,
                    model_dir.name,
                )
                continue
            if not _model_name(model_dir.name):
                logger.warning("skipping %s: model names must match %s", model_dir, NAME_RULE)
                continue
            dirs.append(model_dir)
        return dirs

    def has_model_dir(self, name: str) -> bool:
        """Whether the next rescan reads a model `name` (model_dirs: a directory of a valid name); not
        where the repository cannot be searched (its permissions changed: a rescan reads nothing)."""
        try:
            return _model_name(name) and (self.root / name).is_dir()
        except OSError:  # EACCES: pathlib's is_dir swallows only "not found"-like errors
            return False

    def read_model(self, model_dir: Path) -> Model:
        """A Model with its config.json and no versions (a broken config gives config None + reason)."""
        name = model_dir.name
        try:
            config = load_model_config(
                model_dir / "config.json",
                default_max_queue_size=self.server_config.limits.default_max_queue_size,
            )
        except ConfigError as exc:  # the caller logs it: a rescan keeps a serving model serving
            return Model(name, model_dir, None, reason=str(exc))
        return Model(name, model_dir, config)

    @staticmethod
    def available_versions(model: Model) -> list[str]:
        """Version directories on disk (sets `model.reason` when there is none, or they cannot be
        listed: that model only, like a broken config.json)."""
        try:
            entries = list(model.path.iterdir())
        except OSError as exc:  # no read permission, or the directory went away since the scan
            model.reason = f"{model.path}: cannot list its version directories: {exc.strerror or exc}"
            return []
        dirs = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
        available = [name for name in dirs if VERSION_PATTERN.match(name)]
        # A release link whose target was deleted (blue/green): is_dir() says no, as for a file.
        links = sorted(
            (p.name, f"a symbolic link to {_link_target(p)}, which does not exist")
            for p in entries
            if not p.name.startswith(".") and p.is_symlink() and not p.exists()
        )
        for name, what in links:
            logger.warning("%s: ignoring %s: %s", model.path, name, what)
        dangling = [f"{name} is {what}" for name, what in links]
        ignored = sorted(name for name in dirs if not VERSION_PATTERN.match(name))
        if ignored:  # "01", "v2", "0": served by no policy; said, as a model name that is none is
            logger.warning(
                "%s: ignoring directories %s: version directories are positive integers without "
                "leading zeros (1, 2, 10)",
                model.path,
                ", ".join(ignored),
            )
        if available:
            model.reason = ""
        elif ignored:
            model.reason = (
                f"{model.path}: no version directories (ignored {', '.join(ignored)}: version "
                "directories are positive integers without leading zeros, e.g. 1)"
            )
        elif dangling:
            model.reason = f"{model.path}: no version directories ({'; '.join(dangling)})"
        else:
            model.reason = f"{model.path}: no version directories"
        return available

    def add_version(self, model: Model, version: str, config: ModelConfig | None = None) -> ModelVersion:
        """A LOADING ModelVersion registered on `model` (reload.py passes the config of a newer scan)."""
        config = config or model.config
        assert config is not None
        mm = self.metrics.for_model(model.name, version, config.batching.max_batch_size, config.kind)
        replaced = model.versions.get(version)
        if replaced is not None and replaced.state != ModelState.DRAINING:
            # A copy that failed to load, replaced here, is never forgotten otherwise: it would count
            # as live for ever and keep the version's series after its last unload. (A draining copy
            # is forgotten when its drain ends.)
            self.metrics.forget_version(replaced.metrics, [mm])
        mm.ready.set(0)
        mm.loading.set(1)
        mv = ModelVersion(model.name, version, model.path / version, config, mm)
        # Kept in numeric order (9 before 10), whatever order they load in: a reload's rollback
        # loads an older version after the newer ones, and every list of versions (KServe's
        # ModelMetadata and ModelStatistics, NOT_FOUND messages) reads this dict in its order.
        # A new dict, not one sorted in place: a thread reading the old one never sees it change.
        versions = {**model.versions, version: mv}
        model.versions = dict(sorted(versions.items(), key=lambda item: int(item[0])))
        return mv

    # ------------------------------------------------------------------ loading

    async def load_all(self) -> None:
        """Load every version at once through the load gate (load_gate.py): the non-timing steps
        of `load_concurrency` versions run side by side, smallest file first; the warm-ups that time
        batch sizes run alone, one version at a time, cheapest first, within the calibration budget
        (calibration.py). A READY version serves at once, and its model's health key turns SERVING
        with it (NOT_SERVING once all its versions have been tried and none is READY). One log line
        per finished version says how far loading is; `cancel_loading()` (SIGTERM during start-up)
        ends it at the next step.
        """
        versions = sorted(
            (mv for model in self.models.values() for mv in model.versions.values()),
            key=_file_size,
        )
        if not versions:
            return
        logger.info(
            "loading %d model versions (%d at a time, batch sizes timed one version at a time)",
            len(versions),
            self.gate.width,
        )
        started = time.monotonic()
        left = {name: len(model.versions) for name, model in self.models.items()}
        done = cancelled = ready = 0  # ready: counted as each version finishes, not by looking at all

        async def one(mv: ModelVersion) -> None:
            nonlocal done, cancelled, ready
            if self._stopping.is_set():
                mv.state, mv.reason = ModelState.UNAVAILABLE, "not loaded: the server is shutting down"
                mv.metrics.loading.set(0)
                stopped = True
            else:
                stopped = await self.load_version(mv)
            if stopped:  # not loaded: the progress counts the versions whose load ended by itself
                cancelled += 1
            else:
                done += 1
                ready += mv.state == ModelState.READY
                logger.info(
                    "loaded %d/%d model versions (%d ready) in %.1f s",
                    done,
                    len(versions),
                    ready,
                    time.monotonic() - started,
                )
            left[mv.name] -= 1
            if not left[mv.name] or mv.state == ModelState.READY:  # serving: say so before the rest
                self.notify(self.models[mv.name])

        await asyncio.gather(*(one(mv) for mv in versions))
        if cancelled:
            logger.info("loading stopped: %d of %d model versions not loaded", cancelled, len(versions))
        for model in self.models.values():
            if not model.versions:
                self.notify(model)

    def cancel_loading(self) -> None:
        """Stop loading now: a load in progress ends at its next step or model node (its runner's
        calls are aborted: a load-time call may take far longer than the drain grace, and the
        interpreter's exit joins the load's thread), the rest are skipped."""
        self._stopping.set()
        with self._loading_lock:
            for runner in self._loading_runners:
                runner.abort()

    def _check_stopping(self, mv: ModelVersion) -> None:
        if self._stopping.is_set():
            raise LoadCancelled(f"{mv.label}: loading cancelled: the server is shutting down")

    async def load_version(self, mv: ModelVersion) -> bool:
        """Load one version on a worker thread; READY with a running batcher, or UNAVAILABLE + reason.
        True when a stop cancelled the load (`cancel_loading`)."""
        try:
            try:
                # Seconds of session building and warm-up: no spin beside them.
                await run_off_loop(self._load_pool, self._load_version, mv)
            finally:
                mv.metrics.loading.set(0)  # READY, UNAVAILABLE or cancelled: no longer loading
        except LoadCancelled as exc:
            mv.state, mv.reason = ModelState.UNAVAILABLE, str(exc)
            logger.info("%s", exc)
            return True
        except GenserveError as exc:
            self._fail(mv, str(exc))
        except Exception as exc:  # ORT raises its own types for corrupt graphs
            from_ort = type(exc).__module__.startswith("onnxruntime")
            short = out_of_memory(exc)
            if from_ort or short:
                # A corrupt or unsupported graph, or no memory for it: _fail's line says it all (ORT's
                # reason, its file); a traceback through the loader, at every start and rescan, would
                # add only noise.
                logger.debug("%s failed to load", mv.label, exc_info=True)
            else:
                logger.exception("%s failed to load", mv.label)
            if short:  # ORT's raw text names its C++ source files and functions: its words only
                said = f"{'ORT' if from_ort else type(exc).__name__}: {short}"
                self._fail(mv, f"out of memory while loading/warming up ({said})")
            else:
                self._fail(mv, f"{type(exc).__name__}: {exc}")
            sticky = sticky_cuda_error(exc)
            if sticky:  # the CUDA context is unusable for every model, not only this one
                self.fatal_reason = f"{mv.label}: {sticky} at load"
                self.on_fatal(self.fatal_reason)
        else:
            assert mv.runner is not None
            mv.batcher = loader.make_batcher(mv)
            mv.batcher.start()
            loop = asyncio.get_running_loop()

            def device_lost(reason: str, mv: ModelVersion = mv) -> None:  # from any thread
                loop.call_soon_threadsafe(self.device_lost, mv, reason)

            mv.runner.on_device_lost = device_lost
            mv.state = ModelState.READY
            mv.metrics.ready.set(1)
            mv.metrics.load_duration.set(mv.load_s)
            rows = mv.batcher.max_batch_size if mv.batcher is not None else mv.config.batching.max_batch_size
            mv.metrics.set_runtime(mv.provider, mv.precision, mv.gpu_requested, rows)
            logger.info("%s ready in %.2f s (%s, sha256 %s)", mv.label, mv.load_s, mv.runtime, mv.sha256[:12])
            assert mv.card is not None
            too_large = self.server_config.limits.fixed_input_too_large(mv.card)
            if too_large:  # READY (a raised limit serves it), but no call it is sent can succeed
                logger.warning("%s takes no request: %s", mv.label, too_large)
        return False

    def device_lost(self, mv: ModelVersion, reason: str) -> None:
        """A model call failed with a sticky CUDA error (gpu_errors): every later call on this process's
        CUDA context fails too. The version goes UNAVAILABLE, its health key NOT_SERVING, and the
        process stops (`on_fatal`) so that the orchestrator restarts it. On the event loop."""
        if mv.state != ModelState.READY:
            return
        self._fail(mv, f"GPU failure, the server restarts: {reason}")
        model = self.models.get(mv.name)
        if model is not None:
            self.notify(model)
        self.fatal_reason = f"{mv.label}: {reason}"
        self.on_fatal(self.fatal_reason)

    def _fail(self, mv: ModelVersion, reason: str) -> None:
        mv.state = ModelState.UNAVAILABLE
        mv.reason = reason
        mv.metrics.ready.set(0)
        logger.error("%s unavailable: %s", mv.label, reason)

    def notify(self, model: Model) -> None:
        serving = bool(model.ready_versions())
        for listener in self._listeners:
            listener(model.name, serving)

    def _load_version(self, mv: ModelVersion) -> None:
        """Card, file, sha256, session, warm-up (loader.py). Runs on a worker thread. `mv.load_s`:
        the seconds its steps held the gate, not its waits behind the other versions' steps (at
        start-up with hundreds of models, the last one's wait is every other version's load)."""
        steps = HeldSteps(self.gate)
        # Weak references: the fp16 parity check's sessions are dropped when the check returns, and
        # must not stay alive (two more copies of the model) through the rest of the load.
        runners: list[weakref.ref[loader.Abortable]] = []

        def opened(runner: loader.Abortable) -> None:
            with self._loading_lock:
                runners.append(weakref.ref(runner))
                self._loading_runners.add(runner)
                if self._stopping.is_set():
                    runner.abort()

        try:
            loader.load_files(mv, self.server_config, lambda: self._check_stopping(mv), steps, opened)
        except Exception as exc:
            if isinstance(exc, LoadCancelled):  # stopped at a step: no call failed, nothing more to name
                raise
            if self._stopping.is_set() and runners:  # its model call aborted (cancel_loading), most likely
                # The failure itself is named too: one that had another cause, in the instant after
                # SIGTERM, would otherwise leave no trace in the log (LoadCancelled is logged at info).
                first = (str(exc).splitlines() or [""])[0][:200]
                raise LoadCancelled(
                    f"{mv.label}: loading cancelled: the server is shutting down "
                    f"(the load's call ended with {type(exc).__name__}: {first})"
                ) from exc
            raise
        else:
            mv.load_s = steps.held_s
        finally:
            with self._loading_lock:
                alive = (ref() for ref in runners)
                self._loading_runners.difference_update(runner for runner in alive if runner is not None)

    async def close(self, timeout_s: float) -> None:
        """Drain every batcher (accepted work finishes), then stop the runners, all within timeout_s.

        A runner's close waits for the model calls still computing: on worker threads, so that the
        event loop goes on answering (the health port's NOT_SERVING, log lines). Calls still running
        at the deadline are aborted (Runner.abort): the process exits about when the drain grace
        ends, not when the slowest call would have."""
        deadline = time.monotonic() + timeout_s
        versions = [mv for m in self.models.values() for mv in m.versions.values()]
        for mv in versions:
            if mv.state == ModelState.READY:
                mv.state = ModelState.DRAINING
        await asyncio.gather(*(mv.batcher.close(timeout_s) for mv in versions if mv.batcher is not None))
        runners = [mv.runner for mv in versions if mv.runner is not None]
        if runners:
            closing = asyncio.gather(*(asyncio.to_thread(runner.close) for runner in runners))
            _, running = await asyncio.wait({closing}, timeout=max(0.0, deadline - time.monotonic()))
            if running:
                logger.warning("model calls still running at the end of the drain grace: aborting them")
                for runner in runners:
                    runner.abort()
            await closing
        for mv in versions:
            mv.metrics.ready.set(0)
            mv.metrics.clear_runtime()
        self._load_pool.shutdown(wait=False, cancel_futures=True)


def _file_size(mv: ModelVersion) -> int:
    """Bytes of the version's model files: the order loads start in (smaller ones are ready sooner)."""
    try:
        return sum(p.stat().st_size for p in mv.path.glob("*.onnx"))
    except OSError:
        return 0


def _terminate_process(reason: str) -> None:
    logger.critical("stopping the server for a restart: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)
