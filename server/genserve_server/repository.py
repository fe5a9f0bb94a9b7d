"""The model repository loader (docs/model-repository.md).

Each model directory gives a `Model` with one `ModelVersion` per version its policy serves. A
version owns its runner (ORT session + pool) and batcher. A corrupt or missing model marks only
that model (or version) UNAVAILABLE, with the reason GetModel shows; the others serve.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genserve_contract.repository import NAME_PATTERN, sha256_file
from genserve_contract.repository import VERSION_PATTERN as VERSION_PATTERN  # reload.py reads it here
from genserve_server import tiling
from genserve_server.batch_keys import input_shape
from genserve_server.batcher import Batcher
from genserve_server.config import (
    Card,
    ConfigError,
    ModelConfig,
    ServerConfig,
    cpu_count,
    load_card,
    load_model_config,
)
from genserve_server.errors import GenserveError, NotFound, Unavailable
from genserve_server.gpu_errors import sticky_cuda_error
from genserve_server.metrics import BatchMetrics, Metrics, ModelMetrics
from genserve_server.ort_session import (
    ModelChoice,
    ProfileShapes,
    RuntimeConfig,
    choose_model_file,
    create_session,
)
from genserve_server.runner import Runner, select_providers
from genserve_server.session_runner import (
    SessionRunner,
    check_fp16_parity,
)

logger = logging.getLogger(__name__)


class ModelState(enum.IntEnum):
    """Same numbers as genserve.v1.ModelState."""

    LOADING = 1
    READY = 2
    UNAVAILABLE = 3
    DRAINING = 4


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
    precision: str = "fp32"
    provider: str = ""
    # What the sessions really run with (provider, precision, device, TF32, serving mode), from the
    # effective provider options: e.g. "CUDAExecutionProvider, fp32, device 0, tf32 off, cuda graphs".
    runtime: str = ""
    runner: Runner | None = None
    batcher: Batcher | None = None
    load_s: float = 0.0
    # super_resolution: receptive-field radius in input pixels, measured at load (None: not local
    # at the probe size, or not measured); SuperResolve sizes tile margins and overlap from it.
    tile_radius: int | None = None
    # The batch cap measured at warm-up (efficient_batch_size); None: up to max_batch_size.
    efficient_batch_size: int | None = None
    # Unique per loaded version: what the image cache keys on. An image depends on the file and on
    # config.json (output_range, runtime options), and a reload builds a new ModelVersion.
    load_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def label(self) -> str:
        return f"model {self.name} version {self.version}"


@dataclass(eq=False)
class Model:
    name: str
    path: Path
    config: ModelConfig | None
    # Set when config.json itself is broken: the whole model is UNAVAILABLE.
    reason: str = ""
    versions: dict[str, ModelVersion] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config.kind.value if self.config else ""

    def ready_versions(self) -> list[ModelVersion]:
        return [v for v in self.versions.values() if v.state == ModelState.READY]

    def card(self) -> Card | None:
        """The card of the highest version that has one (for ListModels)."""
        for version in sorted(self.versions, key=int, reverse=True):
            if self.versions[version].card is not None:
                return self.versions[version].card
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
                )
            if found.state != ModelState.READY:
                raise Unavailable(f"{found.label} is {found.state.name}: {found.reason or 'not ready'}")
            return found
        ready = self.ready_versions()
        if not ready:
            reasons = self.reason or "; ".join(
                f"v{v.version}: {v.state.name} {v.reason}" for v in self.versions.values()
            )
            raise Unavailable(f"model {self.name} has no ready version ({reasons or 'no versions'})")
        return max(ready, key=lambda v: int(v.version))


StateListener = Callable[[str, bool], None]


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
        # What a sticky GPU failure does after marking its version (device_lost): SIGTERM to this
        # process, whose handler drains and exits (health NOT_SERVING first); tests replace it.
        self.on_fatal: Callable[[str], None] = _terminate_process
        self.fatal_reason = ""

    def add_listener(self, listener: StateListener) -> None:
        """Called with (model name, serving) whenever a model's readiness may have changed."""
        self._listeners.append(listener)

    def __iter__(self) -> Iterator[Model]:
        return iter(self.models.values())

    def redact(self, text: str) -> str:
        """`text` for a client: the repository's location on this host becomes `<models>/`, so that a
        client learns which model file is at fault, never the server's file system."""
        for prefix in self._root_prefixes:
            text = text.replace(prefix, "<models>/")
        return text

    def get(self, name: str) -> Model:
        model = self.models.get(name)
        if model is None:
            names = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"model {name!r} not found; models: {names}", field="model")
        return model

    # ------------------------------------------------------------------ discovery

    def scan(self) -> None:
        """Read every config.json and pick versions; nothing heavy (sessions load in `load_all`)."""
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: model repository directory not found")
        for model_dir in self.model_dirs():
            model = self.read_model(model_dir)
            if model.config is not None:
                for version in model.config.version_policy.select(self.available_versions(model)):
                    self.add_version(model, version)
            self.models[model.name] = model

    def model_dirs(self) -> list[Path]:
        """Model directories with valid names (others are logged and skipped)."""
        dirs = []
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not NAME_PATTERN.match(model_dir.name):
                logger.warning("skipping %s: model names must match %s", model_dir, NAME_PATTERN.pattern)
                continue
            dirs.append(model_dir)
        return dirs

    def read_model(self, model_dir: Path) -> Model:
        """A Model with its config.json and no versions (a broken config gives config None + reason)."""
        name = model_dir.name
        try:
            config = load_model_config(
                model_dir / "config.json",
                default_max_queue_size=self.server_config.limits.default_max_queue_size,
            )
        except ConfigError as exc:
            logger.error("model %s unavailable: %s", name, exc)
            return Model(name, model_dir, None, reason=str(exc))
        return Model(name, model_dir, config)

    @staticmethod
    def available_versions(model: Model) -> list[str]:
        """Version directories on disk (sets `model.reason` when there is none)."""
        available = [p.name for p in model.path.iterdir() if p.is_dir() and VERSION_PATTERN.match(p.name)]
        model.reason = "" if available else f"{model.path}: no version directories"
        return available

    def add_version(self, model: Model, version: str, config: ModelConfig | None = None) -> ModelVersion:
        """A LOADING ModelVersion registered on `model` (reload.py passes the config of a newer scan)."""
        config = config or model.config
        assert config is not None
        mm = self.metrics.for_model(model.name, version, config.batching.max_batch_size)
        mm.ready.set(0)
        mv = ModelVersion(model.name, version, model.path / version, config, mm)
        model.versions[version] = mv
        return mv

    # ------------------------------------------------------------------ loading

    async def load_all(self) -> None:
        """Load versions one at a time (each load is CPU-bound; 2 cores must also serve health)."""
        for model in self.models.values():
            for mv in model.versions.values():
                await self.load_version(mv)
            self.notify(model)

    async def load_version(self, mv: ModelVersion) -> None:
        """Load one version on a worker thread; READY with a running batcher, or UNAVAILABLE + reason."""
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._load_version, mv)
        except GenserveError as exc:
            self._fail(mv, str(exc))
        except Exception as exc:  # ORT raises its own types for corrupt graphs
            logger.exception("%s failed to load", mv.label)
            self._fail(mv, f"{type(exc).__name__}: {exc}")
            sticky = sticky_cuda_error(exc)
            if sticky:  # the CUDA context is unusable for every model, not only this one
                self.fatal_reason = f"{mv.label}: {sticky} at load"
                self.on_fatal(self.fatal_reason)
        else:
            mv.load_s = time.monotonic() - started
            assert mv.runner is not None
            mv.batcher = Batcher(
                mv.runner.run,
                run_bulk_batch=mv.runner.run_bulk,  # like run where bulk cannot be background work
                name=mv.label,
                max_batch_size=mv.config.batching.max_batch_size,
                max_queue_delay_s=mv.config.batching.max_queue_delay_s,
                preferred_batch_sizes=mv.config.batching.preferred_batch_sizes,
                max_queue_size=mv.config.batching.max_queue_size,
                concurrency=mv.config.instances,
                observer=BatchMetrics(mv.metrics),
                bulk_budget_s=mv.config.batching.bulk_budget_s,
                bulk_idle_budget_s=mv.config.batching.bulk_idle_budget_s,
                interactive_quiet_s=mv.config.batching.interactive_quiet_s,
                efficient_batch_size=mv.efficient_batch_size,
                rows_limit=(
                    functools.partial(rows_within_pixels, max_pixels=mv.config.batching.max_batch_pixels)
                    if mv.card is not None and mv.card.kind.takes_image
                    else None
                ),
            )
            batcher = mv.batcher
            # Background bulk batches yield their cores to a solo call; other bulk rows would not.
            if mv.runner.background_bulk:
                mv.runner.more_work_queued = lambda: batcher.queued_interactive_rows > 0
            else:
                mv.runner.more_work_queued = lambda: batcher.queued_rows > 0
            mv.batcher.start()
            loop = asyncio.get_running_loop()

            def device_lost(reason: str, mv: ModelVersion = mv) -> None:  # from any thread
                loop.call_soon_threadsafe(self.device_lost, mv, reason)

            mv.runner.on_device_lost = device_lost
            mv.state = ModelState.READY
            mv.metrics.ready.set(1)
            mv.metrics.load_duration.set(mv.load_s)
            logger.info("%s ready in %.2f s (%s, sha256 %s)", mv.label, mv.load_s, mv.runtime, mv.sha256[:12])

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
        """Card, file, sha256, session, warm-up. Runs on a worker thread."""
        card = load_card(mv.path / "card.json")
        mv.card = card
        if card.kind != mv.config.kind:
            raise ConfigError(
                f"{mv.path / 'card.json'}: kind {card.kind.value!r} differs from config.json's "
                f"{mv.config.kind.value!r}"
            )
        choice = choose_model_file(mv.path, mv.config.precision, json.loads(card.raw_json))
        providers = select_providers(self.server_config.execution_providers or mv.config.execution_providers)
        mv.sha256 = _verified_sha256(mv, card, choice.path)
        if choice.precision == "fp16":
            checked = fp16_on_provider(mv.path, card, providers, mv.config.runtime.fp16_atol, choice)
            if checked is not choice:
                mv.sha256 = _verified_sha256(mv, card, checked.path)
                choice = checked
        if choice.reason:
            logger.warning("%s: serving fp32: %s", mv.label, choice.reason)
        model_path = choice.path
        mv.precision = choice.precision
        cores = cpu_count()
        sc = self.server_config
        pinned = mv.config.runtime.intra_op_threads or sc.intra_op_threads
        intra = pinned or max(1, cores // mv.config.instances)
        # Auto threads and several instances: a batch running alone may use every core (RuntimeConfig).
        solo_intra = cores if not pinned and mv.config.runtime.solo_session and intra < cores else 0
        sampler = card.kind.takes_latent
        runtime = mv.config.runtime
        if runtime.trt_engine_cache_dir is None and sc.trt_engine_cache_dir:
            runtime = dataclasses.replace(runtime, trt_engine_cache_dir=sc.trt_engine_cache_dir)
        runner = Runner(
            model_path,
            label=f"{mv.name}-{mv.version}",
            providers=providers,
            instances=mv.config.instances,
            intra_op_threads=intra,
            solo_intra_op_threads=solo_intra,
            runtime=runtime,
            fp16=choice.precision == "fp16",
            profile=profile_shapes(card, mv.config.batching.max_batch_size),
            inline_max_s=sc.inline_compute_max_s,
            latent_dim=card.latent_dim if sampler else None,
            pixels_range=card.output_range if sampler else None,
        )
        try:
            self._check_graph(mv, card, runner)
            if sc.warmup:
                costs: dict[int, float] = {}
                largest = mv.config.batching.max_batch_size
                tolerance = mv.config.batching.efficient_batch_tolerance
                sizes = warmup_batch_sizes(largest) if tolerance is not None else sorted({1, largest})
                # The largest first: the arena then holds every smaller batch. Each size's cost is
                # its fastest of three runs, so that a busy moment does not shrink the cap.
                for batch in sorted(sizes, key=lambda b: (b != largest, b)):
                    inputs = warmup_inputs(card, batch)
                    runner.warm(inputs)
                    cost_s = runner.measured_cost_s(inputs)
                    if cost_s is not None:
                        costs[batch] = cost_s
                if tolerance is not None and costs:
                    mv.efficient_batch_size = efficient_batch_size(costs, tolerance)
                    if mv.efficient_batch_size < mv.config.batching.max_batch_size:
                        logger.info(
                            "%s: batches capped at %d: per-item compute %s (larger batches gain < %.0f %%)",
                            mv.label,
                            mv.efficient_batch_size,
                            ", ".join(f"b{b} {1e3 * c / b:.3g} ms" for b, c in sorted(costs.items())),
                            100 * tolerance,
                        )
            if card.kind.tiled:
                mv.tile_radius = measure_tile_radius(card, runner)
        except BaseException:
            runner.close()
            raise
        mv.runner = runner
        mv.provider = runner.provider
        mv.runtime = runner.description

    @staticmethod
    def _check_graph(mv: ModelVersion, card: Card, runner: Runner) -> None:
        want_in = card.graph_inputs
        have_in = tuple(i.name for i in runner.inputs)
        if sorted(want_in) != sorted(have_in):
            raise ConfigError(
                f"{mv.label}: graph inputs {list(have_in)} differ from kind {card.kind}'s {list(want_in)}"
            )
        missing = [o for o in card.kind.output_names if o not in runner.outputs]
        if missing:
            raise ConfigError(
                f"{mv.label}: graph has no output {missing[0]!r} (outputs: {list(runner.outputs)})"
            )

    async def close(self, timeout_s: float) -> None:
        """Drain every batcher (accepted work finishes), then stop the runners."""
        versions = [mv for m in self.models.values() for mv in m.versions.values()]
        for mv in versions:
            if mv.state == ModelState.READY:
                mv.state = ModelState.DRAINING
        await asyncio.gather(*(mv.batcher.close(timeout_s) for mv in versions if mv.batcher is not None))
        for mv in versions:
            if mv.runner is not None:
                mv.runner.close()
            mv.metrics.ready.set(0)


def _verified_sha256(mv: ModelVersion, card: Card, model_path: Path) -> str:
    """The file's sha256, checked against card.json's."""
    filename = model_path.name
    if not model_path.is_file():
        raise ConfigError(f"{model_path}: file not found")
    expected = card.sha256.get(filename)
    if not expected:
        raise ConfigError(f"{mv.path / 'card.json'}: sha256 has no entry for {filename}")
    actual = sha256_file(model_path)
    if actual != expected:
        raise ConfigError(
            f"sha256 mismatch for {filename}: card.json says {expected[:16]}..., file is {actual[:16]}..."
        )
    return actual


def fp16_on_provider(
    version_dir: Path, card: Card, providers: Sequence[str], atol: float, choice: ModelChoice
) -> ModelChoice:
    """`choice` (the fp16 file) when fp16 and fp32 agree within `atol` on the provider the version
    will run on, else fp32 with the reason: the card's parity was measured at export, on a CPU, and
    fp16 kernels differ per provider and GPU."""
    if not (version_dir / "model.onnx").is_file():
        return choice  # nothing to compare with: the card's parity stands
    feeds = parity_inputs(card, 8)
    fp32 = create_session(version_dir / "model.onnx", providers, RuntimeConfig(), cores=cpu_count())
    fp16 = create_session(choice.path, providers, RuntimeConfig(), cores=cpu_count(), fp16=True)
    ok, diff = check_fp16_parity(
        SessionRunner(fp32, RuntimeConfig()), SessionRunner(fp16, RuntimeConfig()), feeds, atol
    )
    if ok:
        return choice
    return ModelChoice(
        version_dir / "model.onnx",
        "fp32",
        f"fp16 differs from fp32 by {diff:.3g} > fp16_atol {atol:g} on {fp16.provider}",
    )


def parity_inputs(card: Card, batch: int) -> dict[str, np.ndarray]:
    """Random inputs of the warm-up shapes (zeros would hide most differences), seeded."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for name, value in warmup_inputs(card, batch).items():
        if value.dtype == np.int64:
            feeds[name] = rng.integers(0, max(1, len(card.class_names)), value.shape).astype(np.int64)
        elif card.input_range is not None and name == "image":
            low, high = card.input_range
            feeds[name] = rng.uniform(low, high, value.shape).astype(np.float32)
        else:
            feeds[name] = rng.standard_normal(value.shape).astype(np.float32)
    return feeds


def _terminate_process(reason: str) -> None:
    logger.critical("stopping the server for a restart: %s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, and max_batch_size itself: the sizes warmed and timed."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


# What serving one batch costs besides the model call (batcher bookkeeping, a thread hop, futures):
# it favours larger batches where the model call itself is tiny.
BATCH_OVERHEAD_S = 100e-6


def efficient_batch_size(costs_s: Mapping[int, float], tolerance: float) -> int:
    """The smallest batch size whose cost per item is within `tolerance` of the best size's.

    Cost = the measured model call + BATCH_OVERHEAD_S. Larger batches only pay when they compute
    each item faster: on a CPU, large convolutions often do not (per item, SR tiles cost the same at
    batch 1 and 16), and a closed loop of clients then waits in each other's batches for nothing.
    """
    per_item = {
        size: (cost + BATCH_OVERHEAD_S) / size for size, cost in costs_s.items() if size > 0 and cost > 0
    }
    if not per_item:
        return max(costs_s, default=1)
    best = min(per_item.values())
    return min(size for size, cost in per_item.items() if cost <= best * (1.0 + tolerance))


def warmup_inputs(card: Card, batch: int) -> dict[str, np.ndarray]:
    """Dummy inputs of the right shape for `batch` rows (warm-up and tests)."""
    if card.kind.takes_codes:
        assert card.grid is not None
        codes = {"codes": np.zeros((batch, *card.grid), np.int64)}
        if card.top_grid is not None:
            codes["top_codes"] = np.zeros((batch, *card.top_grid), np.int64)
        if card.class_names:
            codes["label"] = np.zeros((batch,), np.int64)
        return codes
    if card.kind.takes_latent:
        assert card.latent_dim is not None
        feeds = {"z": np.zeros((batch, card.latent_dim), np.float32)}
        if card.kind.conditional:
            feeds["label"] = np.zeros((batch,), np.int64)
        return feeds
    channels = card.input_channels or 3
    if card.image_size is not None:
        h, w = card.image_size
    else:
        side = card.tile_size or max(card.min_size, 32)
        side = -(-side // card.size_multiple) * card.size_multiple
        h = w = side
    return {"image": np.zeros((batch, channels, h, w), np.float32)}


def profile_shapes(card: Card, max_batch_size: int) -> ProfileShapes | None:
    """TensorRT min/opt/max shapes for fixed-size kinds (batch 1 .. max); None for size-free kinds."""
    one = warmup_inputs(card, 1)
    if card.image_size is None and "image" in one:
        return None  # fully convolutional: TensorRT builds per shape
    opt = max(1, max_batch_size // 2)

    def shapes(batch: int) -> dict[str, list[int]]:
        return {name: [batch, *value.shape[1:]] for name, value in one.items()}

    return ProfileShapes(shapes(1), shapes(opt), shapes(max_batch_size))


def measure_tile_radius(card: Card, runner: Runner) -> int | None:
    """How far (input pixels) a tile edge disturbs the output: tiles must discard that margin."""
    multiple = card.size_multiple
    probe = max(64, -(-64 // multiple) * multiple)
    radius = tiling.receptive_field_radius(
        lambda x: runner.run_sync({"image": x})["output_image"],
        card.input_channels or 3,
        probe,
        input_range=card.input_range or (0.0, 1.0),
    )
    logger.info("%s/%s: tile receptive-field radius %s px", card.name, card.version, radius)
    return radius


def rows_within_pixels(key: object, max_pixels: int) -> int:
    """Rows of a batch of image rows (batch_keys.TileRows / ImageRows with a shape) that keep it within
    `max_pixels` input pixels, at least 1; keys without a shape (fixed-size models) are not limited."""
    shape = input_shape(key)
    if shape is not None and len(shape) == 3:
        _, height, width = shape
        return max(1, max_pixels // max(1, int(height) * int(width)))
    return 1 << 30
