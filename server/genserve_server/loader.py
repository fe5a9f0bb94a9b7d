"""Loading one model version: its card, the file it serves (sha256, fp16 or fp32), its sessions,
the graph check, the warm-up that times batch sizes, the tile radius, and its batcher's wiring.

repository.py keeps discovery, the registry and the lifecycle (states, listeners, reloads,
closing); it calls `load_files` on a worker thread and `make_batcher` on the event loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from genserve_contract.config import AUTO_TOLERANCE, Tolerance
from genserve_contract.kinds import image_shape_fits
from genserve_contract.repository import external_data_locations, sha256_file, weights_digest
from genserve_server import calibration, tiling, validate
from genserve_server.batch_keys import TileRows, input_shape
from genserve_server.batcher import Batcher
from genserve_server.config import Card, ConfigError, ServerConfig, cpu_count, load_card
from genserve_server.errors import InvalidArgument, out_of_memory
from genserve_server.load_gate import Steps
from genserve_server.metrics import BatchMetrics
from genserve_server.ort_session import (
    ModelChoice,
    ProfileShapes,
    choose_model_file,
    create_session,
)
from genserve_server.providers import CPU, GPU_PROVIDERS
from genserve_server.runner import Runner, select_providers
from genserve_server.session_runner import SessionRunner, check_fp16_parity

if TYPE_CHECKING:  # repository.py imports this module: its types only, no import cycle at run time
    import onnxruntime as ort

    from genserve_server.repository import ModelVersion

logger = logging.getLogger(__name__)


class Abortable(Protocol):
    """What runs a load's model calls (its Runner, the fp16 parity check's sessions): `abort` fails
    them at their next node, and every later one."""

    def abort(self) -> None: ...


def load_files(
    mv: ModelVersion,
    sc: ServerConfig,
    check_stopping: Callable[[], None],
    gate: Steps,
    opened: Callable[[Abortable], None] | None = None,
) -> None:
    """Load one version on a worker thread: card, file choice, sha256, sessions, graph check (a
    shared step of `gate`), warm-up (batch-size timing, an exclusive step: calibration.py, which also
    holds the tile radius and the arena shrink after it; the tile radius a shared step without warm-up).
    Fills `mv` in; raises on any failure, closing what it built. `check_stopping` raises
    LoadCancelled once the server is stopping. `opened` is told the runner as soon as it exists,
    and the fp16 parity check's sessions before they run (Repository: a shutdown aborts their model
    calls, which the steps' checks cannot interrupt)."""
    with gate.step(0.0, check_stopping=check_stopping):
        check_stopping()
        card, runner = _open(mv, sc, opened)
        try:
            if opened is not None:
                opened(runner)
            check_stopping()
            check_graph(mv, card, runner)
            probe_s, row_bytes = _probe(card, runner, mv.label)
            check_last_class(mv.label, card, runner)
            logger.debug("%s: probe %.3g ms a row at the warm-up shape", mv.label, 1e3 * probe_s)
            check_stopping()
            check_rows(mv, card, runner)
        except BaseException:
            runner.close()
            raise

    # A super-resolution model of one input size (card.json's image_size) takes each image whole,
    # one tile of that size: no seams to measure a radius for (its probe is 64x64 or more), no
    # default tiling to check.
    tiled = card.kind.tiled and card.image_size is None

    def after_timing() -> None:
        """The model calls after the batch-size timing: in its exclusive step (calibration.run_warmup's
        `then`), neither beside another version's timings and RSS readings nor queued behind them."""
        if runner.mode == "cuda_graph":
            check_first_outputs(mv.label, card, runner)
        if tiled:
            mv.tile_radius = measure_tile_radius(card, runner, mv.config.batching.max_batch_size)
        if sc.shrink_arena_after_warmup:
            # What warm-up's largest batches (and the tile radius's) grew the CPU arenas by goes
            # back (bench/README.md, "Footprint"); the first large batch regrows what it needs.
            runner.shrink_arena(warmup_inputs(card, 1))

    try:
        if sc.warmup:
            warm_up(mv, card, runner, sc, gate, check_stopping, probe_s, row_bytes, then=after_timing)
        elif tiled:
            # 10 probe rows of 64x64 (tiling.receptive_field_radius), from the cost of one tile-sized row.
            height, width = warmup_inputs(card, 1)["image"].shape[2:]
            radius_s = probe_s * 10 * 64 * 64 / max(1, height * width)
            with gate.step(radius_s, check_stopping=check_stopping):
                mv.tile_radius = measure_tile_radius(card, runner, mv.config.batching.max_batch_size)
        elif runner.mode == "cuda_graph":
            with gate.step(0.0, check_stopping=check_stopping):
                check_first_outputs(mv.label, card, runner)
        if tiled:
            check_default_tiling(card, mv.tile_radius)
    except BaseException:
        runner.close()
        raise
    mv.runner = runner
    mv.provider = runner.provider
    mv.runtime = runner.description


def _open(
    mv: ModelVersion, sc: ServerConfig, opened: Callable[[Abortable], None] | None = None
) -> tuple[Card, Runner]:
    """The card, the file to serve (sha256 checked, fp16 parity on the provider) and its runner
    (`opened`: told the parity check's sessions, as load_files says)."""
    # Named as served: card.json's own name and version are not checked against the directories (a
    # version directory copied for a canary keeps them) and stay in raw_json only (GetModel's card).
    card = dataclasses.replace(load_card(mv.path / "card.json"), name=mv.name, version=mv.version)
    mv.card = card
    if card.kind != mv.config.kind:
        raise ConfigError(
            f"{mv.path / 'card.json'}: kind {card.kind.value!r} differs from config.json's "
            f"{mv.config.kind.value!r}"
        )
    if card.kind.styled and not mv.config.mapping:
        raise ConfigError(
            f"{mv.path.parent / 'config.json'}: mapping is required for kind {card.kind} (the "
            "style_mapping model that maps z to w)",
            field="mapping",
        )
    top_k = mv.config.sampling.top_k
    if card.codebook_size is not None and top_k > card.codebook_size:
        raise ConfigError(
            f"{mv.path.parent / 'config.json'}: sampling.top_k must be <= the card's codebook_size "
            f"({card.codebook_size}), got {top_k}",
            field="sampling.top_k",
        )
    choice = choose_model_file(mv.path, mv.config.precision, json.loads(card.raw_json))
    requested = sc.execution_providers or mv.config.execution_providers
    mv.gpu_requested = any(p in GPU_PROVIDERS for p in requested)
    providers = select_providers(requested)
    mv.sha256 = _verified_sha256(mv, card, choice.path)
    if choice.precision == "fp16":
        checked = fp16_on_provider(mv, card, providers, choice, opened)
        if checked is not choice:  # model.onnx, which the parity check verified as its reference
            mv.sha256 = mv.reference_sha256 or _verified_sha256(mv, card, checked.path)
            choice = checked
    if choice.reason:
        logger.warning("%s: serving fp32: %s", mv.label, choice.reason)
    model_path = choice.path
    mv.precision = choice.precision
    mv.weights_sha256 = weights_digest(mv.external_sha256.get(model_path.name, {}))
    cores = cpu_count()
    pinned = mv.config.runtime.intra_op_threads or sc.intra_op_threads
    intra = pinned or max(1, cores // mv.config.instances)
    # Auto threads and several instances: a batch running alone may use every core (RuntimeConfig).
    solo_intra = cores if not pinned and mv.config.runtime.solo_session and intra < cores else 0
    sampler = card.kind.takes_latent
    images = card.kind.answers_sample  # its "image" output also comes back as uint8 pixels
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
        pixels_range=card.output_range if images else None,
        model_sha256=mv.sha256,
        external_sha256=mv.external_sha256.get(model_path.name),
    )
    # ONNX Runtime opened the files by path after their sha256 was read: one replaced meanwhile (a
    # Kubernetes volume's `..data` link swapped, a copy in place) is a graph never checked.
    opened_files = [
        model_path,
        *(model_path.parent / loc for loc in mv.external_sha256.get(model_path.name, {})),
    ]
    replaced = [path for path in opened_files if stat_or_none(path) != mv.verified_stats.get(str(path))]
    if replaced:
        runner.close()
        raise ConfigError(
            f"{replaced[0]}: changed on disk while this version loaded (a write or a swap in progress); "
            "not served: the next rescan loads it again"
        )
    return card, runner


# (device, inode, size, mtime_ns, ctime_ns): a file renamed over keeps neither of the first two, and
# one rewritten in place not its ctime, whatever its size and mtime (`cp -p` and `rsync -t` set the
# mtime back; nothing can set a ctime back). The load's check (`_open`) and reload.py's file check.
FileStat = tuple[int, int, int, int, int]


def file_stat(st: os.stat_result) -> FileStat:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_or_none(path: Path) -> FileStat | None:
    """The FileStat of the file `path` leads to, None where it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return file_stat(st)


# Side of the probe image of fully convolutional kinds: their cost scales with pixels, so a small
# probe predicts a tile's cost without paying for a tile.
PROBE_SIDE = 32


def _probe(card: Card, runner: Runner, label: str = "") -> tuple[float, float]:
    """One row's predicted call seconds and bytes of inputs + outputs (calibration.probe), at the
    warm-up's shape; (0, 0) in CUDA-graph mode, where a call before warm-up would capture a graph.
    The first call's image output must be the card's shape (check_image_output; in CUDA-graph mode
    checked after warm-up: check_first_outputs)."""
    if runner.mode == "cuda_graph":
        return 0.0, 0.0
    inputs = warmup_inputs(card, 1)
    scale = 1.0
    image = inputs.get("image")
    if image is not None and card.image_size is None:
        side = max(PROBE_SIDE, card.min_size)
        side = -(-side // card.size_multiple) * card.size_multiple
        height, width = image.shape[2:]
        if side * side < height * width:
            inputs = {**inputs, "image": np.zeros((1, image.shape[1], side, side), np.float32)}
            scale = height * width / (side * side)
    name = card.kind.image_output_name

    def check(outputs: Mapping[str, np.ndarray]) -> None:
        if name is not None and name in outputs:
            check_image_output(label or runner.label, card, np.shape(outputs[name]))

    return calibration.probe(runner, inputs, scale, check)


def check_first_outputs(label: str, card: Card, runner: Runner) -> None:
    """ConfigError unless a call's image output is the card's shape (check_image_output): in
    CUDA-graph mode, which _probe makes no call in, one row at the warm-up's shape once warm-up has
    captured its graphs (a captured graph replays; without warm-up this call captures the graph the
    first request would). A graph whose output dims are symbolic shows its shape only in a call:
    unchecked, an NHWC or 1-channel output under a 3-channel card loaded READY and served wrong
    pixels or failed at its first request."""
    name = card.kind.image_output_name
    if name is None:
        return
    outputs = runner.run_sync(warmup_inputs(card, 1))
    if name in outputs:
        check_image_output(label, card, np.shape(outputs[name]))


# Rows of the load-time check (check_rows): one computed alone and inside this many.
CHECK_ROWS = 2


def check_rows(mv: ModelVersion, card: Card, runner: Runner) -> None:
    """Whether a row comes out bit for bit the same whichever CPU session computes it and whatever
    shares its batch (README.md, "Seeds"). ONNX Runtime's CPU kernels may split a call's work by its
    intra-op threads, and then add up in another order: the bundled cyclegan-digits at 2+ threads
    gives a batch of one other float bits than the same row beside another, and which shapes differ
    depends on the thread counts (on 8 cores its solo session agrees at the warm-up's 32x32 but not
    at 16x28). Three calls of at most CHECK_ROWS seeded rows at each of check_feeds' shapes and
    directions, until both differences are found (Runner.compare_rows; one row alone where no batch
    may hold two: max_batch_size or max_batch_pixels; nor where the narrow session has one intra-op
    thread, which splits no call's work: then only a solo session is compared). Where the solo session
    differs from the narrow one, the version has no solo session (a lone batch runs on a narrow
    session); where a row alone differs from the row inside a batch, the version says so in a
    warning (ModelVersion.batch_dependence: GetModel's reason of the READY version). Not on a GPU,
    whose kernels are not promised batch-invariant, nor with CUDA graphs (a call of an uncaptured
    size would capture one)."""
    if not batch_grows_with_rows(runner):
        return
    batching = mv.config.batching
    rows = min(CHECK_ROWS, warmup_limit(card, batching.max_batch_size, batching.max_batch_pixels))
    if runner.intra_op_threads == 1:  # one thread splits no call's work: a row alone is the row batched
        rows = 1
        if runner.solo_session is None:
            return
    solo_diff = batch_diff = 0.0
    for inputs in check_feeds(card, rows):
        agreement = runner.compare_rows(inputs)
        solo_diff = max(solo_diff, agreement.solo_diff or 0.0)
        batch_diff = max(batch_diff, agreement.batch_diff or 0.0)
        if (solo_diff or runner.solo_session is None) and (batch_diff or rows == 1):
            break  # nothing more to find
    if solo_diff:
        logger.warning(
            "%s: its all-cores solo session (%d intra-op threads) computes a row in other float bits than "
            "the %d-thread session (max |difference| %.3g): no solo session, a lone batch runs on the "
            "narrow session (runtime.solo_session: false in its config.json silences this)",
            mv.label,
            runner.solo_intra_op_threads,
            runner.intra_op_threads,
            solo_diff,
        )
        runner.drop_solo_session()
    if batch_diff:
        mv.batch_dependence = (
            f"a row's output depends on what shares its batch: alone it differs by up to "
            f"{batch_diff:.3g} from the same row inside a batch (ONNX Runtime CPU kernels "
            f"with {runner.intra_op_threads} intra-op threads; fewer may avoid it)"
        )
        logger.warning("%s: %s", mv.label, mv.batch_dependence)


def check_feeds(card: Card, batch: int) -> list[dict[str, np.ndarray]]:
    """check_rows' inputs: `batch` seeded rows at the warm-up's shape and, for a size-free image kind,
    at CHECK_SHAPES (ONNX Runtime splits a convolution's work by its output's shape), each in both
    directions of a two-way translator (its two generators)."""
    shapes: list[tuple[int, int] | None] = [None]
    if card.image_size is None and card.kind.takes_image:
        side = warmup_inputs(card, 1)["image"].shape[-1]
        # No side above the warm-up's (a tile's most: sizes the model takes, within max_batch_pixels),
        # from a side of at most PROBE_SIDE: cheap beside the warm-up's call for a large tile.
        base = min(side, -(-max(PROBE_SIDE, card.min_size) // card.size_multiple) * card.size_multiple)
        for fh, fw in CHECK_SHAPES:
            shape = tuple(
                min(side, -(-max(card.min_size, round(base * f)) // card.size_multiple) * card.size_multiple)
                for f in (fh, fw)
            )
            if shape != (side, side) and shape not in shapes:
                shapes.append((shape[0], shape[1]))
    directions = (0, 1) if card.kind.two_way else (0,)
    return [
        check_inputs(card, batch, seed=i, shape=shape, direction=direction)
        for i, shape in enumerate(shapes)
        for direction in directions
    ]


# check_rows' other shapes of a size-free image kind, as fractions of a side (check_feeds): the
# bundled cyclegan-digits' rows differ between sessions at one of them or at the warm-up's shape on
# every host of 3 to 32 cores where they differ at any shape tried.
CHECK_SHAPES = ((0.5, 0.875), (0.875, 0.5), (0.75, 0.75))


def check_inputs(
    card: Card, batch: int, seed: int = 0, *, shape: tuple[int, int] | None = None, direction: int = 0
) -> dict[str, np.ndarray]:
    """`batch` rows of seeded random values at the warm-up's shape (warmup_inputs), or images of
    `shape` (height, width): latents and ws from N(0, 1), images uniform in the card's input range,
    labels and codes uniform over the classes and the codebook; a two-way translator's direction is
    `direction` (one per batch; 0: A -> B)."""
    rng = np.random.default_rng(seed)
    int_high = {
        "label": len(card.class_names),
        "codes": card.codebook_size or 0,
        "top_codes": card.top_codebook_size or 0,
    }
    feeds = {}
    for name, zeros in warmup_inputs(card, batch).items():
        if name == "image":
            low, high = card.input_range or (0.0, 1.0)
            size = zeros.shape if shape is None else (*zeros.shape[:2], *shape)
            feeds[name] = rng.uniform(low, high, size).astype(zeros.dtype)
        elif name == "direction":
            feeds[name] = np.full(zeros.shape, direction, zeros.dtype)
        elif zeros.dtype.kind == "f":
            feeds[name] = rng.standard_normal(zeros.shape).astype(zeros.dtype)
        elif int_high.get(name, 0) > 1:
            feeds[name] = rng.integers(0, int_high[name], zeros.shape, dtype=zeros.dtype)
        else:
            feeds[name] = zeros
    return feeds


def warmup_limit(card: Card, max_batch_size: int, max_batch_pixels: int) -> int:
    """The largest warm-up batch: max_batch_size, and for image kinds no more rows of the warm-up's
    shape than `max_batch_pixels` allows (serving never batches more: rows_within_pixels)."""
    image = warmup_inputs(card, 1).get("image") if card.kind.takes_image else None
    if image is None:
        return max_batch_size
    return min(max_batch_size, rows_within_pixels(TileRows(tuple(image.shape[1:])), max_batch_pixels))


def warm_up(
    mv: ModelVersion,
    card: Card,
    runner: Runner,
    sc: ServerConfig,
    gate: Steps,
    check_stopping: Callable[[], None],
    probe_s: float,
    row_bytes: float,
    then: Callable[[], None] | None = None,
) -> calibration.Calibration:
    """Warm and time the batch sizes within the time and memory budgets (calibration.py); sets the
    version's batch cap (efficient_batch_size) and, where memory bounds it, its batch pixels.
    `then`: model calls made in the timing's exclusive step right after it (run_warmup)."""
    batching = mv.config.batching
    tolerance = batching.efficient_batch_tolerance
    if tolerance == AUTO_TOLERANCE and not batch_grows_with_rows(runner):
        tolerance = None  # a GPU computes a batch's rows side by side: "auto" caps CPU models only
    largest = warmup_limit(card, batching.max_batch_size, batching.max_batch_pixels)
    sizes = warmup_sizes(tolerance, largest, probe_s)
    memory_budget = calibration.warmup_memory_budget(sc.warmup_memory_bytes, mv.config.instances)
    result = calibration.run_warmup(
        runner,
        functools.partial(warmup_inputs, card),
        sizes,
        time_budget_s=sc.calibration_budget_s,
        memory_budget_bytes=memory_budget,
        min_row_bytes=row_bytes,
        first_call_s=probe_s,
        gate=gate,
        check_stopping=check_stopping,
        then=then,
    )
    mv.calibration = result
    reason = _cap_reason(tolerance)
    batch_cost_s = IMAGE_BATCH_OVERHEAD_S if card.kind.takes_image else BATCH_OVERHEAD_S
    if tolerance == AUTO_TOLERANCE:
        mv.efficient_batch_size = compute_bound_cap(result.costs_s, batch_cost_s)
    elif tolerance is not None and result.costs_s:
        mv.efficient_batch_size = efficient_batch_size(result.costs_s, tolerance, batch_cost_s)
    if result.memory_rows is not None:
        image = warmup_inputs(card, 1).get("image") if card.kind.takes_image else None
        if image is not None:  # memory scales with pixels: smaller images may take more rows
            mv.max_batch_pixels = result.memory_rows * int(image.shape[2]) * int(image.shape[3])
        elif result.memory_rows < (mv.efficient_batch_size or largest):
            mv.efficient_batch_size = result.memory_rows
            reason = " (the warm-up memory budget)"
    skipped = [b for b in sizes if b not in result.warmed]
    logger.info(
        "%s: warmed batch sizes %s in %.2f s%s",
        mv.label,
        result.warmed,
        result.spent_s,
        f" ({result.stopped}: {skipped} left out)" if skipped else "",
    )
    if result.memory_rows is not None:
        logger.info(
            "%s: a batch holds at most %d rows of the warm-up's shape: ~%.0f MB a row, warm-up memory "
            "budget %.0f MB",
            mv.label,
            result.memory_rows,
            result.row_bytes / 1e6,
            memory_budget / 1e6,
        )
    if mv.efficient_batch_size is not None and mv.efficient_batch_size < batching.max_batch_size:
        logger.info(
            "%s: batches capped at %d: per-item compute %s%s",
            mv.label,
            mv.efficient_batch_size,
            ", ".join(f"b{b} {1e3 * c / b:.3g} ms" for b, c in sorted(result.costs_s.items())),
            reason,
        )
    return result


def check_last_class(label: str, card: Card, runner: Runner) -> None:
    """ConfigError where a row of the card's last class fails the graph: a card listing more
    class_names than the graph's embedding has rows loaded READY (or failed the load by chance, at
    check_rows' random labels, with ONNX Runtime's text), and every request of a class past the
    graph's failed with INTERNAL. Not in CUDA-graph mode, where a call before warm-up would capture
    a graph. Memory running out in that call is raised as it came (Repository's reason says so)."""
    if not card.class_names or "label" not in card.graph_inputs or runner.mode == "cuda_graph":
        return
    last = len(card.class_names) - 1
    inputs = warmup_inputs(card, 1)
    inputs["label"][:] = last
    try:
        runner.run_sync(inputs)
    except Exception as exc:  # ONNX Runtime raises its own types (an index out of an embedding's rows)
        if out_of_memory(exc):  # no fault of the card: the load's reason says memory ran out
            raise
        raise ConfigError(
            f"{label}: a row of label {last} (card.json's last class_names entry, "
            f"{card.class_names[last]!r}) fails the graph: {exc}; does the graph take fewer than the "
            f"card's {len(card.class_names)} classes? List in class_names only the classes the graph "
            "was trained on",
            field="class_names",
        ) from exc


def check_graph(mv: ModelVersion, card: Card, runner: Runner) -> None:
    check_graph_inputs(mv, card, runner.session)
    missing = [o for o in card.kind.output_names if o not in runner.outputs]
    if missing:
        raise ConfigError(f"{mv.label}: graph has no output {missing[0]!r} (outputs: {list(runner.outputs)})")
    check_card_tensors(mv, card, list(runner.outputs))
    check_batch_axes(mv, runner.session)
    name = card.kind.image_output_name
    if name is not None:
        declared = next(tuple(o.shape) for o in runner.session.get_outputs() if o.name == name)
        check_image_output(mv.label, card, declared)


def check_graph_inputs(mv: ModelVersion, card: Card, session: ort.InferenceSession, label: str = "") -> None:
    """ConfigError where the graph's inputs are not the ones its kind (and card) feed: run anyway,
    it would fail with ONNX Runtime's own text ('Required inputs ... are missing from input feed').
    `label`: what names the graph (the version's)."""
    want_in = card.graph_inputs
    have_in = tuple(i.name for i in session.get_inputs())
    if sorted(want_in) != sorted(have_in):
        raise ConfigError(
            f"{label or mv.label}: graph inputs {list(have_in)} differ from kind {card.kind}'s "
            f"{list(want_in)}"
        )
    fed = warmup_inputs(card, 1)
    for spec in session.get_inputs():
        check_input_type(label or mv.label, card, spec.name, spec.type, spec.shape, fed[spec.name])


# Where the dimensions the server feeds an input come from: the card's fields (check_input_type).
_INPUT_FIELDS = {
    "z": "latent_dim",
    "ws": "num_layers, w_dim",
    "image": "input_channels",
    "codes": "grid",
    "top_codes": "top_grid",
}


def check_input_type(
    label: str, card: Card, name: str, ort_type: str, shape: Sequence[int | str | None], fed: np.ndarray
) -> None:
    """ConfigError where a graph input's element type or shape (beyond its batch axis, which
    check_batch_axes judges) is not what the server feeds it (`fed`, one row of it): a user's own
    export taking a latent [N, Z, 1, 1], a label as int32 or one-hot, or a fully convolutional net
    exported at one image size would otherwise fail the load's first call with ONNX Runtime's text.
    A float16 input where float32 is fed is fed float16 (Runner); symbolic dimensions, and an input
    declared without a shape, pass."""
    dtype = {"tensor(float)": "float32", "tensor(double)": "float64"}.get(ort_type, ort_type[7:-1])
    if _fits_feed(card, name, dtype, shape, fed):
        return
    shown = ", ".join(["N", *(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape[1:])])
    wanted, fields = _fed_text(card, name, fed)
    fix = f", or fix card.json's {fields}" if fields else ""
    raise ConfigError(
        f"{label}: graph input {name!r} is {dtype} [{shown}], while kind {card.kind} feeds it "
        f"{wanted}: export the module taking that (reshape or cast inside its forward; dynamic axes "
        f"for the sizes that vary){fix}"
    )


def _fed_dims(card: Card, name: str, fed: np.ndarray) -> list[int | None]:
    """The dimensions after the batch axis the server feeds input `name` (`fed`: one row); None:
    any size (the image sides of a kind without an image_size)."""
    want: list[int | None] = list(fed.shape[1:])
    if name == "image" and card.image_size is None:
        want[1:] = [None, None]
    return want


def _fits_feed(card: Card, name: str, dtype: str, shape: Sequence[int | str | None], fed: np.ndarray) -> bool:
    """Whether an input declared `dtype` of `shape` (no shape: unknown, passes; a dimension that is
    not a positive integer varies, and passes) takes what the server feeds `name`; float16 takes
    float32 feeds (Runner casts them)."""
    want_dtype = str(fed.dtype)
    want = _fed_dims(card, name, fed)
    have = list(shape[1:])
    same_type = dtype == want_dtype or (want_dtype == "float32" and dtype == "float16")
    return same_type and (
        not shape
        or (
            len(have) == len(want)
            and all(not isinstance(h, int) or h <= 0 or h == w for h, w in zip(have, want, strict=True))
        )
    )


def _fed_text(card: Card, name: str, fed: np.ndarray) -> tuple[str, str | None]:
    """What the server feeds `name`, as text ('float32 [N, 16] (card.json's latent_dim)'), and the
    card fields its dimensions come from (None: the kind's alone)."""
    want = _fed_dims(card, name, fed)
    wanted = ", ".join(["N", *(str(d) if d is not None else "HW"[i - 1] for i, d in enumerate(want))])
    fields = _INPUT_FIELDS.get(name)
    if name == "image" and card.image_size is not None:
        fields = "input_channels, image_size"
    any_size = " (any H, W)" if None in want else ""
    source = f" (card.json's {fields})" if fields else ""
    return f"{fed.dtype} [{wanted}]{any_size}{source}", fields


def check_card_tensors(mv: ModelVersion, card: Card, graph_outputs: Sequence[str]) -> None:
    """ConfigError where card.json's `inputs` / `outputs`, which KServe's ModelMetadata, ModelConfig
    and ModelInfer serve by, do not restate the tensors: inputs other than the kind's (check_graph_inputs
    holds the graph to them) or of another type or shape than the server feeds; outputs lacking the
    kind's, or naming one the graph lacks. A hand-written card that did loaded READY and then
    refused every ModelInfer, failed it with INTERNAL, or answered it with rows it was not sent."""
    path = mv.path / "card.json"
    names = [t.name for t in card.inputs]
    if sorted(names) != sorted(card.graph_inputs):
        raise ConfigError(
            f"{path}: inputs {names} differ from kind {card.kind}'s {list(card.graph_inputs)} "
            "(the graph's inputs, which KServe's ModelInfer takes)",
            field="inputs",
        )
    fed = warmup_inputs(card, 1)
    for i, spec in enumerate(card.inputs):
        if not _fits_feed(card, spec.name, spec.dtype, spec.shape, fed[spec.name]):
            wanted, _ = _fed_text(card, spec.name, fed[spec.name])
            raise ConfigError(
                f"{path}: inputs[{i}] {spec.name!r} has shape {list(spec.shape)} and dtype {spec.dtype}, "
                f"while kind {card.kind} feeds it {wanted}: restate the graph's input (-1 for a "
                "dimension that varies)",
                field=f"inputs[{i}]",
            )
    outputs = [t.name for t in card.outputs]
    missing = [o for o in card.kind.output_names if o not in outputs]
    unknown = [o for o in outputs if o not in graph_outputs]
    if missing or unknown:
        raise ConfigError(
            f"{path}: outputs {outputs} must hold kind {card.kind}'s {list(card.kind.output_names)} "
            f"and only outputs of the graph ({list(graph_outputs)}): KServe's ModelInfer answers them",
            field="outputs",
        )


def check_batch_axes(mv: ModelVersion, session: ort.InferenceSession, label: str = "") -> None:
    """ConfigError where a graph input's batch axis (axis 0 of every input of every kind) is fixed
    while batches of more rows are served: a graph exported without a dynamic batch axis would fail
    its first larger batch with ONNX Runtime's own text ('Got invalid dimensions for input ...'). A
    fixed batch of 1 serves under max_batch_size 1. `label`: what names the graph (the version's)."""
    max_batch = mv.config.batching.max_batch_size
    for spec in session.get_inputs():
        fixed = spec.shape[0] if spec.shape else None
        if not isinstance(fixed, int) or fixed <= 0 or (fixed == 1 and max_batch == 1):
            continue
        alone = ", or set batching.max_batch_size to 1 in config.json" if fixed == 1 else ""
        raise ConfigError(
            f"{label or mv.label}: graph input {spec.name!r} has a fixed batch dimension {fixed} (shape "
            f"{list(spec.shape)}), while batches of 1..{max_batch} rows are served "
            f"(batching.max_batch_size): export it with a dynamic batch axis (torch.onnx.export's "
            f"dynamic_shapes or dynamic_axes; genserve-export does){alone}"
        )


def check_image_output(label: str, card: Card, shape: Sequence[int | str | None]) -> None:
    """ConfigError unless the image output's shape (declared in the graph, or of a call: unknown
    dims are not compared) is the card's NCHW: [N, channels, H, W], H x W its image_size where the
    kind has one. A graph giving NHWC (or another channel count or size) would otherwise load READY
    and scramble every raw image, fail every encoded one, and describe itself wrongly. A
    super-resolution card's image_size is its input size: its output is scale_factor x it."""
    name = card.kind.image_output_name
    out_size = card.image_size
    if out_size is not None and card.kind.tiled:
        out_size = (out_size[0] * card.scale_factor, out_size[1] * card.scale_factor)
    if image_shape_fits(shape, card.channels, out_size):
        return
    shown = ", ".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape[1:])
    size = "x".join(str(s) for s in card.image_size) if card.image_size else "any"
    if out_size is not None and out_size != card.image_size:
        size += (
            f" (the input size: the output is {out_size[0]}x{out_size[1]}, scale_factor "
            f"{card.scale_factor} x it)"
        )
    fields = "channels / image_size / scale_factor" if card.kind.tiled else "channels / image_size"
    raise ConfigError(
        f"{label}: graph output {name!r} has shape [N, {shown}], card.json says [N, C, H, W] with "
        f"channels {card.channels} and image_size {size}: export the image output in NCHW layout "
        f"(e.g. permute(0, 3, 1, 2) an NHWC output), or fix card.json's {fields}"
    )


def batch_grows_with_rows(runner: Runner) -> bool:
    """Whether a batch's compute grows with its rows: on a CPU session, which computes them one
    after another; not on a GPU, which computes them side by side, nor where CUDA graphs pad a batch
    to a captured size."""
    return runner.provider == CPU and runner.mode != "cuda_graph"


def make_batcher(mv: ModelVersion) -> Batcher:
    """The batcher of a loaded version, wired to its runner (not started)."""
    assert mv.runner is not None
    pads = mv.runner.mode == "cuda_graph"
    preferred = mv.config.batching.preferred_batch_sizes if pads else ()
    rows_limit = None
    if mv.card is not None and mv.card.kind.takes_image:
        pixels = mv.max_batch_pixels or mv.config.batching.max_batch_pixels
        rows_limit = functools.partial(rows_within_pixels, max_pixels=pixels)
    batcher = Batcher(
        mv.runner.run,
        run_bulk_batch=mv.runner.run_bulk,  # like run where bulk cannot be background work
        name=mv.label,
        model=mv.name,
        version=mv.version,
        max_batch_size=mv.config.batching.max_batch_size,
        max_queue_delay_s=mv.config.batching.max_queue_delay_s,
        # Only where the runner pads a batch up to a captured size (CUDA graphs): there a batch of 9
        # costs what 64 do, and closing at 8 pays. Elsewhere a batch costs what its rows cost, and
        # closing early only shrinks batches (bench.ab on CPU: 15-20 % fewer img/s at c=64).
        preferred_batch_sizes=preferred,
        max_queue_size=mv.config.batching.max_queue_size,
        concurrency=mv.config.instances,
        observer=BatchMetrics(mv.metrics),
        bulk_budget_s=mv.config.batching.bulk_budget_s,
        bulk_idle_budget_s=mv.config.batching.bulk_idle_budget_s,
        interactive_quiet_s=mv.config.batching.interactive_quiet_s,
        efficient_batch_size=mv.efficient_batch_size,
        rows_limit=rows_limit,
        # A batch's compute grows with its rows on the CPU only (Batcher._side_by_side_share).
        share_side_by_side=batch_grows_with_rows(mv.runner),
        runs_on_loop=mv.runner.would_run_inline,
        # The warm-up's cost per row: the bulk budgets hold from the first bulk batch on.
        row_cost_s=mv.calibration.row_cost_s() if mv.calibration is not None else 0.0,
    )
    # Background bulk batches yield their cores to a solo call; other bulk rows would not.
    if mv.runner.background_bulk:
        mv.runner.more_work_queued = batcher.interactive_work_beside
    else:
        mv.runner.more_work_queued = batcher.work_beside
    mv.runner.callers_overlap = batcher.callers_overlap
    return batcher


def _verified_sha256(mv: ModelVersion, card: Card, model_path: Path) -> str:
    """The file's sha256, checked against card.json's, and so are the external data files the graph
    loads its weights from (each `location` its card key; recorded in mv.external_sha256): ONNX
    Runtime reads them with the graph, so a digest of the graph alone vouched for no weights."""
    filename = model_path.name
    actual = _checked_digest(mv, card, model_path, filename, "")
    try:
        locations = external_data_locations(model_path)
    except ValueError:  # no ONNX protobuf: ONNX Runtime's parse error names what is wrong with it
        locations = []
    except OSError as exc:
        raise ConfigError(f"{model_path}: cannot be read: {exc.strerror or exc}") from exc
    of = f" (external data of {filename})"
    mv.external_sha256[filename] = {
        location: _checked_digest(mv, card, model_path.parent / location, location, of)
        for location in locations
    }
    return actual


def _checked_digest(mv: ModelVersion, card: Card, path: Path, key: str, of: str) -> str:
    """`path`'s sha256, checked against card.json's entry `key` (`of`: what the file is, for the text)."""
    if not path.exists():  # a FIFO or a directory there is not "not found" (below)
        raise ConfigError(f"{path}: file not found{of}")
    expected = card.sha256.get(key)
    if not expected:
        raise ConfigError(f"{mv.path / 'card.json'}: sha256 has no entry for {key}{of}")
    identity = stat_or_none(path)
    try:
        actual = sha256_file(path)
    except OSError as exc:  # a FIFO or a device (refused unread), a directory, no permission: named
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    if actual != expected:
        raise ConfigError(
            f"sha256 mismatch for {key}{of}: card.json says {expected[:16]}..., file is {actual[:16]}..."
        )
    if identity is not None:
        mv.verified_stats[str(path)] = identity
    return actual


def fp16_on_provider(
    mv: ModelVersion,
    card: Card,
    providers: Sequence[str],
    choice: ModelChoice,
    opened: Callable[[Abortable], None] | None = None,
) -> ModelChoice:
    """`choice` (the fp16 file) when fp16 and fp32 agree within `runtime.fp16_atol` on the provider
    the version will run on, else fp32 with the reason: the card's parity was measured at export, on
    a CPU, and fp16 kernels differ per provider and GPU. The check's sessions take the version's own
    runtime (its GPU, memory cap, TF32), run plainly: no CUDA graph is captured for a check. Both
    graphs' inputs and batch axes are checked first (check_graph_inputs, check_batch_axes): a graph
    whose inputs are not its kind's is refused naming them, as without a twin; the check runs at most
    max_batch_size rows: a fixed batch axis gets its refusal naming the fix, not ONNX Runtime's text
    about the check's batch, and a fixed batch of 1 under max_batch_size 1 is checked as it serves.
    `opened` is told both sessions' runners before they run: a shutdown aborts their calls (each
    runs max_batch_size rows, up to PARITY_ROWS, of a model that may take long), as a Runner's."""
    version_dir = mv.path
    if not os.path.lexists(version_dir / "model.onnx"):
        return choice  # nothing to compare with: the card's parity stands
    # The reference the twin is held to is the card's, as the served file is: a corrupt one is a
    # sha256 mismatch naming it (not ONNX Runtime's parse error), another valid graph no reference,
    # and a FIFO or a directory there is refused naming it (sha256_file), never opened by ONNX Runtime.
    mv.reference_sha256 = _verified_sha256(mv, card, version_dir / "model.onnx")
    runtime = mv.config.runtime
    atol = runtime.fp16_atol
    config = dataclasses.replace(runtime, cuda_graph=False, io_binding=False)
    fp32 = create_session(version_dir / "model.onnx", providers, config, cores=cpu_count())
    fp16 = create_session(choice.path, providers, config, cores=cpu_count(), fp16=True)
    for path, info in ((version_dir / "model.onnx", fp32), (choice.path, fp16)):
        check_graph_inputs(mv, card, info.session, f"{mv.label} {path.name}")
        check_batch_axes(mv, info.session, f"{mv.label} {path.name}")
    fp32_runner, fp16_runner = SessionRunner(fp32, config), SessionRunner(fp16, config)
    if opened is not None:
        opened(fp32_runner)
        opened(fp16_runner)
    diff = 0.0
    for feeds in parity_inputs(card, min(PARITY_ROWS, mv.config.batching.max_batch_size)):
        _, part = check_fp16_parity(fp32_runner, fp16_runner, feeds, atol)
        diff = max(diff, part)
    if diff <= atol:
        return choice
    return ModelChoice(
        version_dir / "model.onnx",
        "fp32",
        f"fp16 differs from fp32 by {diff:.3g} > fp16_atol {atol:g} on {fp16.provider}",
    )


# Rows of the fp16 parity check's inputs (fewer where max_batch_size is smaller).
PARITY_ROWS = 8


def parity_inputs(card: Card, batch: int) -> list[dict[str, np.ndarray]]:
    """Random inputs of the warm-up shapes (zeros would hide most differences), seeded: one set of
    feeds, or one per direction for a two-way translator (a batch runs one direction's generator).
    Integer inputs span what they serve: labels over the classes, codes (and top codes) over the
    codebook, so that a twin which overflows on some of them is seen."""
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    ranges = {
        "label": len(card.class_names),
        "codes": card.codebook_size or 1,
        "top_codes": card.top_codebook_size or 1,
    }
    for name, value in warmup_inputs(card, batch).items():
        if name == "direction":
            feeds[name] = value
        elif value.dtype == np.int64:
            feeds[name] = rng.integers(0, max(1, ranges.get(name, 1)), value.shape).astype(np.int64)
        elif card.input_range is not None and name == "image":
            low, high = card.input_range
            feeds[name] = rng.uniform(low, high, value.shape).astype(np.float32)
        else:
            feeds[name] = rng.standard_normal(value.shape).astype(np.float32)
    if not card.kind.two_way:
        return [feeds]
    return [{**feeds, "direction": np.full(batch, d, np.int64)} for d in (validate.A_TO_B, validate.B_TO_A)]


def warmup_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, and max_batch_size itself: the sizes warmed and timed."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


# What serving one batch costs besides the model call, on a saturated server (where a cap decides
# images/s): the hop to the pool thread and back, futures, fan-out, and the instance's idle gap
# until the event loop hands it the next batch. Measured on 2 CPU cores at 32 clients, batch log
# against the model calls: 1.3-2.1 ms a batch (bench/profile.md, nineteenth round). An idle server's
# ~0.1 ms is not the cost that counts: at light load batches are small whatever the cap.
BATCH_OVERHEAD_S = 2e-3
# Image kinds warm up on a small image (unet-denoise: 64x64, 1.5 ms a row) and serve larger ones,
# whose rows dwarf a batch's cost: there the 2 ms would push the cap up for nothing. unet-denoise
# capped at 16 by it against 4 (2 rounds in turns, 256x256 at 64 clients): p99/p50 1.25-1.33
# against 1.03-1.05 at the same images/s; at 64x64 the two caps served the same images/s.
IMAGE_BATCH_OVERHEAD_S = 100e-6


def _cap_reason(tolerance: Tolerance) -> str:
    if tolerance == AUTO_TOLERANCE:
        return ' (compute-bound: no batch computes an item faster; efficient_batch_tolerance "auto")'
    if tolerance is not None:
        return f" (larger batches gain < {100 * tolerance:.0f} %)"
    return ""


# efficient_batch_tolerance "auto" (the default) caps only a compute-bound CPU model: one whose
# one-row call takes at least COMPUTE_BOUND_CALL_S at load and which no timed larger batch computes
# an item AUTO_GAIN faster. Its closed loop of callers then keeps a fair tail at the same images/s
# (bench-cgan-resnet-32, ~31 ms a row: p99/p50 1.02-1.06 at 32 and 64 clients capped at 2, up to
# 2.06 uncapped). Below it a cap costs a saturated server images/s: bench-dcgan-256 (3.7 ms a row)
# lost 8-27 % at 64 clients with caps of 8 to 2 (bench/profile.md, nineteenth round). 20 ms keeps
# the cap at 1 or 2 rows, sizes the warm-up times. Not on a GPU (warm_up): its batches are not flat.
COMPUTE_BOUND_CALL_S = 20e-3
AUTO_GAIN = 0.05


def warmup_sizes(tolerance: Tolerance, largest: int, probe_s: float) -> list[int]:
    """The batch sizes the warm-up times: every power of two up to `largest` for a tolerance, 1 and
    the largest without one. "auto" adds 2 where the probe says the model may be compute-bound: at
    half the threshold, since the probe is only an estimate (for image kinds, a smaller image's call
    scaled by its pixels); the warm-up's own timing decides (compute_bound_cap)."""
    if tolerance == AUTO_TOLERANCE:
        maybe = 2.0 * probe_s >= COMPUTE_BOUND_CALL_S
        return sorted({1, min(2, largest), largest} if maybe else {1, largest})
    if tolerance is not None:
        return warmup_batch_sizes(largest)
    return sorted({1, largest})


def compute_bound_cap(costs_s: Mapping[int, float], batch_cost_s: float = BATCH_OVERHEAD_S) -> int | None:
    """ "auto"'s batch cap (None: no cap): for a compute-bound model, the smallest batch that spreads
    the batch's serving cost (`batch_cost_s`: BATCH_OVERHEAD_S, or IMAGE_BATCH_OVERHEAD_S for image
    kinds) to within AUTO_GAIN of a row's call: 2 for a 20- to 40-ms latent row, 1 from 40 ms.
    Larger batches would only make callers wait in each other's batches. Decided only with a larger
    size timed beside batch 1 (the budgets may leave them out)."""
    one = costs_s.get(1)
    larger = {size: cost for size, cost in costs_s.items() if size > 1}
    if one is None or one < COMPUTE_BOUND_CALL_S or not larger:
        return None
    if any(cost / size < (1.0 - AUTO_GAIN) * one for size, cost in larger.items()):
        return None  # a larger batch computes an item faster: batching pays
    return max(1, math.ceil(batch_cost_s / (AUTO_GAIN * one)))


def efficient_batch_size(
    costs_s: Mapping[int, float], tolerance: float, batch_cost_s: float = BATCH_OVERHEAD_S
) -> int:
    """The smallest batch size whose cost per item is within `tolerance` of the best size's.

    Cost = the measured model call + `batch_cost_s`. Larger batches only pay when they compute
    each item faster or spread the batch's serving cost: on a CPU, large convolutions often do not
    (per item, SR tiles cost the same at batch 1 and 16), and a closed loop of clients then waits
    in each other's batches for nothing. A compute-bound model (a ResNet cGAN, ~31 ms an item at
    every size) gets 2: batch 1 pays the serving cost on every item.
    """
    per_item = {size: (cost + batch_cost_s) / size for size, cost in costs_s.items() if size > 0 and cost > 0}
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
    if card.kind.styled:
        assert card.num_layers is not None and card.w_dim is not None
        return {"ws": np.zeros((batch, card.num_layers, card.w_dim), np.float32)}
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
    feeds = {"image": np.zeros((batch, channels, h, w), np.float32)}
    if card.kind.two_way:  # A -> B (batch_keys.ImageRows.direction)
        feeds["direction"] = np.zeros((batch,), np.int64)
    return feeds


def profile_shapes(card: Card, max_batch_size: int) -> ProfileShapes | None:
    """TensorRT min/opt/max shapes for fixed-size kinds (batch 1 .. max); None for size-free kinds."""
    one = warmup_inputs(card, 1)
    if card.image_size is None and "image" in one:
        return None  # fully convolutional: TensorRT builds per shape
    opt = max(1, max_batch_size // 2)

    def shapes(batch: int) -> dict[str, list[int]]:
        return {name: [batch, *value.shape[1:]] for name, value in one.items()}

    return ProfileShapes(shapes(1), shapes(opt), shapes(max_batch_size))


def check_default_tiling(card: Card, radius: int | None) -> None:
    """ConfigError unless the tiling of a request that sets none (validate.default_tiling) can be
    planned: otherwise every such request would be refused, blaming a field its client never sent."""
    tile, overlap = validate.default_tiling(card, radius)
    try:
        validate.tiling(tile, overlap, card.size_multiple, overlap_given=False, min_size=card.min_size)
    except InvalidArgument as exc:
        measured = f", receptive-field radius {radius} measured at load" if radius is not None else ""
        raise ConfigError(
            f"{card.name}/{card.version}: card.json's tiling (tile_size {card.tile_size}, tile_overlap "
            f"{card.tile_overlap}{measured}) gives requests that set none tiles of {tile} with overlap "
            f"{overlap}, which no request can use ({exc.message}); fix tile_size / tile_overlap"
        ) from None


def measure_tile_radius(card: Card, runner: Runner, max_rows: int | None = None) -> int | None:
    """How far (input pixels) a tile edge disturbs the output: tiles must discard that margin; in
    calls of at most `max_rows` rows (the version's max_batch_size).
    Raises ConfigError where the graph's output is not card.json's scale_factor x its input: every
    tile would be blended (and every single-tile image cropped) to the wrong size."""
    # At least 64 and the card's min_size, in whole multiples of the size multiple on each half (the
    # probe replaces one half at a time, as content beyond a tile edge is).
    step = 2 * card.size_multiple
    probe = -(-max(64, card.min_size) // step) * step
    scale = card.scale_factor

    def run(x: np.ndarray) -> np.ndarray:
        # At most max_rows a call, as served: a graph with a fixed batch of 1 serves under
        # max_batch_size 1 (check_batch_axes), and a call of all the probe's rows would fail it.
        step = max(1, max_rows or len(x))
        parts = [runner.run_sync({"image": x[i : i + step]})["output_image"] for i in range(0, len(x), step)]
        out: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if out.ndim != 4 or tuple(out.shape[2:]) != (x.shape[2] * scale, x.shape[3] * scale):
            raise ConfigError(
                f"{card.name}/{card.version}: the graph maps a {x.shape[2]}x{x.shape[3]} image to "
                f"{'x'.join(str(d) for d in out.shape[2:])} (output shape {list(out.shape)}), not to "
                f"{x.shape[2] * scale}x{x.shape[3] * scale} as card.json's scale_factor {scale} says"
            )
        return out

    try:
        radius = tiling.receptive_field_radius(
            run,
            card.input_channels or 3,
            probe,
            input_range=card.input_range or (0.0, 1.0),
        )
    except tiling.NotFiniteOutput as exc:
        logger.warning(
            "%s/%s: the receptive-field radius cannot be measured: %s; requests that set no "
            "tile_overlap use card.json's (%d) with blended seams, which may show",
            card.name,
            card.version,
            exc,
            card.tile_overlap or 0,
        )
        return None
    if radius is None:
        logger.warning(
            "%s/%s: the graph is not local at %dx%d (global pooling or image-wide normalisation?): "
            "tiled SuperResolve cannot match the untiled output; requests larger than one tile show seams",
            card.name,
            card.version,
            probe,
            probe,
        )
    else:
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
