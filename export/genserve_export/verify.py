"""``verify_repository``: check every entry of a model repository against its card.

Per version: the card is complete and consistent; sha256 of each file matches (and each external
data file a graph loads its weights from is listed, as the server requires); the graphs load
in ONNX Runtime; their inputs/outputs are the card's; batch 1 and 7 run (two image sizes for fully
convolutional kinds, both directions of a two_way_translator); outputs are finite, shaped as the
card says and inside ``output_range``; fp16 stays within ``fp16_atol`` of fp32; the card's
``activation_bytes_per_output_value`` is the graph's count (activations.py); quality is
recomputed from ``model.onnx`` by the recipe and checked against the card's thresholds. Every
problem is collected, not only the first.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from genserve_contract.config import ModelConfig, parse_model_config
from genserve_contract.kinds import Kind, image_shape_fits
from genserve_contract.repository import (
    ACTIVATION_BYTES_FIELD,
    VERSION_PATTERN,
    external_data_locations,
    latest_version_dir,
    read_regular_text,
    sha256_file,
)
from genserve_export.activations import ActivationCountError, card_activation_bytes
from genserve_export.card import check_thresholds, validate_card, validate_config
from genserve_export.grids import write_grid
from genserve_export.onnx_utils import graph_signature, run_session, session
from genserve_export.recipe import OnnxRun

_RANGE_SLACK = 1e-3
_SIZE_CASES = ((1,), (7,))
# How far a card's activation_bytes_per_output_value may be from the graph's count, relative.
ACTIVATION_RTOL = 0.01


@dataclass(slots=True)
class ModelReport:
    """The outcome for one ``<name>/<version>``."""

    name: str
    version: str
    path: Path
    kind: str | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    quality_card: dict[str, Any] = field(default_factory=dict)
    quality_recomputed: dict[str, float] = field(default_factory=dict)
    grid: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"[{'OK' if self.ok else 'FAIL'}] {self.name}/{self.version} ({self.kind})"]
        if self.parity:
            fp16 = self.parity.get("fp16_max_abs_diff")
            lines.append(
                f"    parity: fp32 max abs diff {self.parity.get('fp32_max_abs_diff'):.3g} "
                f"(atol {self.parity.get('fp32_atol')}), fp16 "
                + (f"{fp16:.3g} (atol {self.parity.get('fp16_atol')})" if fp16 is not None else "none")
                + (" written" if self.parity.get("fp16_written") else " not written")
                + (f" ({self.parity['fp16_note']})" if self.parity.get("fp16_note") else "")
            )
        thresholds = self.quality_card.get("thresholds", {})
        metrics = sorted(
            k
            for k in {*self.quality_recomputed, *self.quality_card}
            if k in self.quality_recomputed or isinstance(self.quality_card.get(k), float)
        )
        for metric in metrics:
            now = self.quality_recomputed.get(metric)
            then = self.quality_card.get(metric)
            text = f"{now:.4g}" if now is not None else "-"
            bound = thresholds.get(metric)
            lines.append(
                f"    quality {metric}: {text}"
                + (f" (card {then:.4g})" if isinstance(then, int | float) else "")
                + (f" threshold {dict(bound)}" if bound else "")
            )
        lines += [f"    note: {n}" for n in self.notes]
        lines += [f"    ERROR: {e}" for e in self.errors]
        if self.grid is not None:
            lines.append(f"    grid: {self.grid}")
        return "\n".join(lines)


@dataclass(slots=True)
class VerifyReport:
    """The outcome for a whole repository."""

    root: Path
    models: list[ModelReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # repository-level (layout, config.json)

    @property
    def ok(self) -> bool:
        return not self.errors and all(m.ok for m in self.models)

    def format(self) -> str:
        lines = [m.format() for m in self.models]
        lines += [f"ERROR: {e}" for e in self.errors]
        failed = sum(not m.ok for m in self.models)
        lines.append(
            f"{len(self.models)} model version(s) checked in {self.root}: "
            + ("all OK" if self.ok else f"{failed} failed, {len(self.errors)} repository error(s)")
        )
        return "\n".join(lines)


def verify_repository(
    path: str | Path,
    grids_dir: str | Path | None = None,
    *,
    check_thresholds: bool = True,
    recompute_quality: bool = True,
) -> VerifyReport:
    """Check every ``<name>/<version>`` under ``path``; see the module docstring. A ``path`` holding
    config.json is one model's folder: its versions are checked, in its parent repository (where
    the models it names, a decoder or a mapping, are found).

    ``check_thresholds=False`` still recomputes and reports quality but does not fail on the
    card's thresholds (for deliberately undertrained models, e.g. in tests).
    """
    root = Path(path)
    report = VerifyReport(root)
    if not root.is_dir():
        report.errors.append(f"{root} is not a directory")
        return report
    if (root / "config.json").is_file():  # one model's folder, not a repository
        # Absolute, so that `.` (verify run inside it) is named by its own name, not ''; symlinks
        # kept, so that its parent is the repository it is in.
        entry = Path(os.path.abspath(root))
        entries = [entry]
        sessions = _SessionCache(entry.parent)
    else:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not entries:
            report.errors.append(f"{root} holds no model directories")
        sessions = _SessionCache(root)
    for entry in entries:
        config = _check_config(entry, report)
        try:
            listed = list(entry.iterdir())
        except OSError as exc:
            report.errors.append(f"{entry.name}: cannot list its version directories: {exc.strerror or exc}")
            continue
        versions = sorted(
            (p for p in listed if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
        )
        bad = [p.name for p in versions if not VERSION_PATTERN.match(p.name)]
        if bad:
            report.errors.append(
                f"{entry.name}: version directories must be positive integers without leading zeros "
                f"(1, 2, 10), found {bad}"
            )
        versions = [p for p in versions if VERSION_PATTERN.match(p.name)]
        if not versions:
            report.errors.append(f"{entry.name}: no version directory")
        elif config is not None:
            report.errors += _policy_problems(entry.name, config, [p.name for p in versions])
        for version_dir in versions:
            model = _verify_version(version_dir, config, sessions, check_thresholds, recompute_quality)
            if grids_dir is not None and model.ok and model.kind is not None:
                _grid(model, version_dir, Path(grids_dir), sessions)
            report.models.append(model)
    return report


def _policy_problems(name: str, config: Mapping[str, Any], on_disk: Sequence[str]) -> list[str]:
    """config.json's `specific` version_policy against the version directories: the server serves
    nothing of a model whose policy picks none of them, and reports a config error (GetModel's
    reason) where it lists versions with no directory (repository.policy_misses)."""
    policy = parse_model_config(config).version_policy
    missing = policy.missing(on_disk)
    if not missing:
        return []
    picked = policy.select(on_disk)
    outcome = (
        "the server serves those it lists and reports the others as a config error"
        if picked
        else "the server serves none of this model"
    )
    return [
        f"{name}/config.json: version_policy's specific lists versions with no version directory "
        f"{missing} (on disk: {sorted(on_disk, key=int)}): {outcome}"
    ]


class _SessionCache:
    """fp32 sessions by path, so siblings (VAE encoder/decoder) are loaded once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._sessions: dict[Path, ort.InferenceSession] = {}
        self._runs: dict[Path, OnnxRun] = {}

    def get(self, path: Path) -> ort.InferenceSession:
        if path not in self._sessions:
            self._sessions[path] = session(path)
        return self._sessions[path]

    def run(self, path: Path) -> OnnxRun:
        """The graph at ``path`` as one OnnxRun object for the whole verify, an entry's own and a
        sibling's alike, so that a recipe computes what several entries read once (_common.once)."""
        if path not in self._runs:
            sess = self.get(path)
            self._runs[path] = lambda feeds: run_session(sess, feeds)
        return self._runs[path]

    def latest_config(self, entry_name: str) -> ModelConfig | None:
        """``entry_name``'s config.json by the contract's rules, or None if missing or invalid."""
        try:
            return parse_model_config(json.loads(read_regular_text(self.root / entry_name / "config.json")))
        except (OSError, ValueError):
            return None

    def latest_run(self, entry_name: str) -> OnnxRun | None:
        """The latest version of ``entry_name`` (``model.onnx``), or with ``entry/file`` an auxiliary
        graph that version's card lists in ``aux_graphs`` (its digest checked here, and its external
        data files' against the card's sha256)."""
        entry_name, _, aux = entry_name.partition("/")
        latest = latest_version_dir(self.root / entry_name)
        if latest is None:
            return None
        if aux:
            try:
                card = json.loads(read_regular_text(latest / "card.json"))
            except (OSError, json.JSONDecodeError):
                return None
            # A card of the wrong shape is refused as unreadable JSON is (its own verify names it).
            listed = card.get("aux_graphs") if isinstance(card, dict) else None
            entry = listed.get(aux) if isinstance(listed, dict) else None
            path = latest / aux
            if not isinstance(entry, dict) or not path.is_file() or sha256_file(path) != entry.get("sha256"):
                return None
            if not _external_data_intact(latest, aux):
                return None
            return self.run(path)
        return self.run(latest / "model.onnx")


def _external_data_intact(version_dir: Path, graph: str) -> bool:
    """Whether every external data file ``graph`` loads its weights from matches card.json's sha256
    under its location (what _check_files holds the version to)."""
    try:
        digests = json.loads(read_regular_text(version_dir / "card.json")).get("sha256") or {}
        locations = external_data_locations(version_dir / graph)
        return all(
            (version_dir / loc).is_file() and sha256_file(version_dir / loc) == digests.get(loc)
            for loc in locations
        )
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: Path, where: str) -> tuple[Any, str]:
    """(the parsed JSON of ``path``, "") or (None, why it cannot be read), the reason naming ``where``:
    a directory, a FIFO or a device (refused unread), no read permission, not UTF-8 and invalid JSON
    are the file's problem, not verify's."""
    try:
        return json.loads(read_regular_text(path)), ""
    except UnicodeDecodeError as exc:
        return None, f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"{where} is not valid JSON: {exc}"
    except RecursionError:
        return None, f"{where} is not valid JSON: nested too deeply"
    except OSError as exc:
        return None, f"{where} cannot be read: {exc.strerror or exc}"


def _digest(path: Path, file: str, errors: list[str]) -> str | None:
    """``path``'s sha256, or None with an error naming ``file`` and why it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as exc:
        errors.append(f"{file} cannot be read: {exc.strerror or exc}")
        return None


def _check_config(entry: Path, report: VerifyReport) -> dict[str, Any] | None:
    path = entry / "config.json"
    if not path.exists():
        report.errors.append(f"{entry.name}: config.json is missing")
        return None
    config, problem = _read_json(path, f"{entry.name}/config.json")
    if problem:
        report.errors.append(problem)
        return None
    problems = validate_config(config, where=f"{entry.name}/config.json")
    if not problems and Kind(config["kind"]).styled and not config.get("mapping"):
        # The contract's parser leaves this to the server's load (loader._open), which refuses
        # every version of the model without it.
        problems = [
            f"{entry.name}/config.json: field 'mapping' is required for kind {config['kind']} (the "
            "style_mapping model that maps z to w): the server refuses every version without it"
        ]
    report.errors.extend(problems)
    return None if problems else config


def _verify_version(
    version_dir: Path,
    config: Mapping[str, Any] | None,
    sessions: _SessionCache,
    thresholds: bool,
    recompute: bool,
) -> ModelReport:
    name, version = version_dir.parent.name, version_dir.name
    model = ModelReport(name, version, version_dir)
    where = f"{name}/{version}/card.json"
    card, problem = _read_json(version_dir / "card.json", where)
    if problem:
        model.errors.append(problem)
        return model
    if not isinstance(card, dict):  # valid JSON, but null, a number, a string or a list
        model.errors.append(f"{where}: must be a JSON object, got {type(card).__name__}")
        return model
    model.errors += validate_card(card, where=where)
    if model.errors:
        return model
    model.kind = card["kind"]
    if Kind(card["kind"]).image_output_name is None and card["output_range"] is not None:
        model.notes.append(
            f"output_range {card['output_range']} ignored: kind {card['kind']} has no image output "
            "(the server ignores it; genserve-export writes null)"
        )
    model.parity = dict(card["parity"])
    model.quality_card = dict(card["quality"])
    if card["name"] != name or card["version"] != version:
        model.errors.append(
            f"{where}: name/version {card['name']}/{card['version']} differ from the directory"
        )
    if config is not None and config.get("kind") != card["kind"]:
        model.errors.append(
            f"{name}/config.json kind {config.get('kind')!r} differs from the card's {card['kind']!r}"
        )
    if config is not None:
        model.errors += _config_card_problems(name, version, config, card)
    external = _check_files(version_dir, card, model)
    if model.errors:
        return model  # never run a graph whose bytes are not the ones the card describes

    graphs: dict[str, ort.InferenceSession] = {}
    for file in (f for f in card["sha256"] if f not in external):  # weights files are no graphs
        try:
            graphs[file] = (
                sessions.get(version_dir / file) if file == "model.onnx" else session(version_dir / file)
            )
        except Exception as exc:  # ORT raises its own exception types for invalid graphs
            model.errors.append(f"{file} does not load in ONNX Runtime: {exc}")
    if model.errors:
        return model
    model.errors += [p for file, sess in graphs.items() for p in _signature_problems(file, sess, card)]
    model.errors += [] if model.errors else _last_class_problems(card, graphs)
    if model.errors:
        return model
    _check_runs(card, graphs, model)
    model.errors += _activation_problems(card, version_dir / "model.onnx")
    if recompute and not model.errors:
        _check_quality(card, sessions.run(version_dir / "model.onnx"), sessions, model, thresholds)
    return model


def _config_card_problems(
    name: str, version: str, config: Mapping[str, Any], card: Mapping[str, Any]
) -> list[str]:
    """What the server's load refuses of a model's config.json against one version's card
    (loader._open): a ``sampling.top_k`` above the card's ``codebook_size``."""
    sampling = config.get("sampling")
    top_k = sampling.get("top_k", 0) if isinstance(sampling, Mapping) else 0
    codebook = card.get("codebook_size")
    if isinstance(codebook, int) and isinstance(top_k, int) and top_k > codebook:
        return [
            f"{name}/config.json: sampling.top_k must be <= the codebook_size ({codebook}) of "
            f"{name}/{version}/card.json, got {top_k}: the server refuses the version"
        ]
    return []


def _activation_problems(card: Mapping[str, Any], model_path: Path) -> list[str]:
    """The card's ACTIVATION_BYTES_FIELD against the graph's count now (activations.py): the server
    sizes a CPU call's working set from it, so a stale or hand-edited value under-sizes (or over-
    sizes) the budget. Within ACTIVATION_RTOL of the count (the card's is rounded to 3 decimals);
    absent (a card before the field): nothing to check."""
    value = card.get(ACTIVATION_BYTES_FIELD)
    if value is None:
        return []
    field = f"card field {ACTIVATION_BYTES_FIELD!r} is {value}, but model.onnx's intermediates"
    try:
        counted = card_activation_bytes(dict(card), model_path)
    except ActivationCountError as exc:
        return [f"{field} cannot be counted: {exc}"]
    if math.isclose(value, counted, rel_tol=ACTIVATION_RTOL, abs_tol=1e-3):
        return []
    return [f"{field} count {counted} bytes per output value (genserve-export count-activations writes it)"]


def _signature_problems(file: str, sess: ort.InferenceSession, card: Mapping[str, Any]) -> list[str]:
    """Differences between a graph's inputs/outputs and the card's (names, dtypes, shapes)."""
    problems: list[str] = []
    inputs, outputs = graph_signature(sess)
    for label, graph_side, card_side in (
        ("inputs", inputs, card["inputs"]),
        ("outputs", outputs, card["outputs"]),
    ):
        by_name = {t["name"]: t for t in card_side}
        if {t["name"] for t in graph_side} != set(by_name):
            problems.append(
                f"{file} {label} {[t['name'] for t in graph_side]} differ from the card's {list(by_name)}"
            )
            continue
        for tensor in graph_side:
            declared = by_name[tensor["name"]]
            if tensor != declared:
                problems.append(
                    f"{file} {label[:-1]} {tensor['name']!r} is {tensor['dtype']} "
                    f"{tensor['shape']}, the card says {declared['dtype']} {declared['shape']}"
                )
    return problems


def _check_files(version_dir: Path, card: Mapping[str, Any], model: ModelReport) -> set[str]:
    """Every file's digest against the card's; returns the external data files the graphs load."""
    listed = dict(card["sha256"])
    for file, digest in listed.items():
        path = version_dir / file
        if not path.exists():
            model.errors.append(f"{file} is listed in the card but missing")
        elif (actual := _digest(path, file, model.errors)) is not None and actual != digest:
            model.errors.append(f"{file}: sha256 {actual[:12]}… differs from the card's {digest[:12]}…")
    aux = card.get("aux_graphs") or {}
    if not isinstance(aux, Mapping):
        model.errors.append("card field 'aux_graphs' must be an object of file -> {sha256, ...}")
        aux = {}
    for file, record in aux.items():
        path = version_dir / file
        digest = record.get("sha256") if isinstance(record, Mapping) else None
        if not path.is_file():
            model.errors.append(f"auxiliary graph {file} is listed in the card but missing")
        elif (actual := _digest(path, f"auxiliary graph {file}", model.errors)) is not None and (
            actual != digest
        ):
            model.errors.append(f"auxiliary graph {file}: sha256 differs from the card's aux_graphs")
    source = card.get("source")
    recorded = source.get("files_sha256") if isinstance(source, Mapping) else None
    # An imported model's licence and reference pair (their digests in its card's source record):
    # the reference drives a gated quality figure.
    for file, digest in recorded.items() if isinstance(recorded, Mapping) else ():
        path = version_dir / file
        if not path.is_file():
            model.errors.append(f"{file} is listed in the card's source.files_sha256 but missing")
        elif (actual := _digest(path, file, model.errors)) is not None and actual != digest:
            model.errors.append(f"{file}: sha256 differs from the card's source.files_sha256")
    unlisted = sorted(
        p.name for p in version_dir.glob("*.onnx") if p.name not in listed and p.name not in aux
    )
    if unlisted:
        model.errors.append(f"files not listed in the card's sha256: {unlisted}")
    if "model.fp16.onnx" in listed and card["parity"].get("fp16_max_abs_diff") is None:
        model.errors.append("model.fp16.onnx is present but parity.fp16_max_abs_diff is null")
    graphs = [g for g in ("model.onnx", "model.fp16.onnx") if g in listed]
    return _check_external_data(version_dir, listed, [*graphs, *(f for f in aux if f not in listed)], model)


def _check_external_data(
    version_dir: Path, listed: Mapping[str, str], graphs: Sequence[str], model: ModelReport
) -> set[str]:
    """The external data files (model.onnx.data) the served graphs (and the auxiliary ones) load
    their weights from, each held to the card's sha256 under its `location` as the server holds it
    (loader._verified_sha256): one the card does not list, or that is missing, is an error naming
    it and its graph."""
    external: set[str] = set()
    for graph in graphs:
        try:
            locations = external_data_locations(version_dir / graph)
        except (OSError, ValueError):  # unreadable (reported above) or no ONNX (ONNX Runtime's load)
            continue
        for location in locations:
            external.add(location)
            of = f"{location} (external data of {graph})"
            if location in listed:  # its digest is checked above (missing or differing: named there)
                continue
            if not (version_dir / location).exists():
                model.errors.append(f"{of} is missing")
            else:
                model.errors.append(
                    f"{of} is not listed in the card's sha256: the server refuses a graph whose "
                    "weights no digest covers"
                )
    return external


def _image_sizes(card: Mapping[str, Any]) -> list[tuple[int, int] | None]:
    if not Kind(card["kind"]).fully_convolutional:
        return [None]
    if card.get("image_size") is not None:  # a graph of one input size: run at it
        return [None]
    multiple = int(card["size_multiple"])
    base = max(int(card["min_size"]), 16)
    base += (-base) % multiple
    step = multiple * max(1, math.ceil(8 / multiple))
    return [(base, base + 2 * step), (base + step, base)]


def _feeds(
    card: Mapping[str, Any], batch: int, size: tuple[int, int] | None, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for tensor in card["inputs"]:
        if tensor["name"] == "z":
            feeds["z"] = rng.standard_normal((batch, card["latent_dim"])).astype(np.float32)
        elif tensor["name"] == "label":
            feeds["label"] = rng.integers(0, len(card["class_names"]), batch).astype(np.int64)
        elif tensor["name"] in ("codes", "top_codes"):
            top = tensor["name"] == "top_codes"
            k = card["top_codebook_size" if top else "codebook_size"]
            grid = card["top_grid" if top else "grid"]
            feeds[tensor["name"]] = rng.integers(0, k, (batch, *grid)).astype(np.int64)
        elif tensor["name"] == "direction":  # one per call (kinds.DIRECTION): A -> B
            feeds["direction"] = np.zeros(batch, np.int64)
        elif tensor["name"] == "ws":
            feeds["ws"] = rng.standard_normal((batch, card["num_layers"], card["w_dim"])).astype(np.float32)
        elif tensor["name"] == "image":
            hw = size if size is not None else tuple(card["image_size"])
            lo, hi = card["input_range"]
            feeds["image"] = rng.uniform(lo, hi, (batch, card["input_channels"], *hw)).astype(np.float32)
    return feeds


def _expected_shape(
    card: Mapping[str, Any], output: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
) -> list[int]:
    batch = len(next(iter(feeds.values())))
    shape = [batch] + [d for d in output["shape"][1:]]
    kind = Kind(card["kind"])
    if kind.fully_convolutional and output["name"] == kind.image_output_name:
        scale = int(card["scale_factor"] or 1)
        shape[2], shape[3] = feeds["image"].shape[2] * scale, feeds["image"].shape[3] * scale
    return shape


def _image_field_errors(card: Mapping[str, Any], file: str, case: str, shape: tuple[int, ...]) -> list[str]:
    """The image output's real shape against the card's `channels` and `image_size`, which the
    server serves by (NCHW: [N, channels, H, W]): an NHWC graph, or a card's wrong channel count or
    size, would load and then scramble or mislabel every image."""
    kind = Kind(card["kind"])
    name = kind.image_output_name
    channels, size = card.get("channels"), card.get("image_size")
    out_size = size
    if size is not None and kind.tiled:  # a super-resolution card's image_size is its input size
        scale = int(card.get("scale_factor") or 1)
        out_size = [size[0] * scale, size[1] * scale]
    if image_shape_fits(shape, channels, out_size):
        return []
    want = [shape[0], channels, *(out_size or shape[2:4])]
    fields = f"'image_size' ({size!r})"
    if out_size is not None and out_size != size:
        fields = (
            f"'image_size' ({size!r}, the input size: the output is {out_size[0]}x{out_size[1]}, "
            f"scale_factor {card['scale_factor']} x it)"
        )
    return [
        f"{file} {name} at {case}: shape {list(shape)}, but card fields 'channels' ({channels!r}) and "
        f"{fields} say [N, C, H, W] = {want}: the server serves NCHW images by them "
        "(an NHWC output must be permuted to NCHW before export)"
    ]


def _run_cases(card: Mapping[str, Any], rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """The inputs verify runs: batch 1 and 7 at each image size, and a two_way_translator's in both
    directions (as export's parity cases), so that its B->A generator is checked too."""
    cases = []
    for size in _image_sizes(card):
        for (batch,) in _SIZE_CASES:
            feeds = _feeds(card, batch, size, rng)
            cases.append(feeds)
            if "direction" in feeds:
                cases.append({**feeds, "direction": np.ones(batch, np.int64)})
    return cases


def _last_class_problems(card: Mapping[str, Any], graphs: Mapping[str, ort.InferenceSession]) -> list[str]:
    """A row of the card's last class through each graph, as the server's load runs it
    (loader.check_last_class): a card listing more class_names than the graph's embedding has rows
    is refused there, while the random labels of _check_runs may never draw the last class."""
    names = card.get("class_names")
    if not names or "label" not in {t["name"] for t in card["inputs"]}:
        return []
    last = len(names) - 1
    feeds = _feeds(card, 1, _image_sizes(card)[0], np.random.default_rng(7))
    feeds["label"] = np.full(1, last, np.int64)
    problems = []
    for file, sess in graphs.items():
        try:
            run_session(sess, feeds)
        except Exception as exc:  # ORT's own exception types (an index out of an embedding's rows)
            problems.append(
                f"{file} fails a row of label {last}, the last entry of card field 'class_names' "
                f"({names[last]!r}): {exc}; does the graph take fewer than the card's {len(names)} "
                "classes? The server refuses the version: list only the classes the graph was trained on"
            )
    return problems


def _check_runs(
    card: Mapping[str, Any], graphs: Mapping[str, ort.InferenceSession], model: ModelReport
) -> None:
    rng = np.random.default_rng(7)
    image_name = Kind(card["kind"]).image_output_name
    lo, hi = card["output_range"] or (-math.inf, math.inf)  # a code prior or style_mapping gives no image
    slack = _RANGE_SLACK * (hi - lo) if image_name is not None else 0.0
    fp16_worst = 0.0
    uncompared: list[str] = []  # outputs of two shapes: no difference to take
    for feeds in _run_cases(card, rng):
        case = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        if "direction" in feeds:
            case += f" direction {int(feeds['direction'][0])}"
        results: dict[str, dict[str, np.ndarray]] = {}
        for file, sess in graphs.items():
            try:
                results[file] = run_session(sess, feeds)
            except Exception as exc:  # ORT's own exception types
                model.errors.append(f"{file} fails at {case}: {exc}")
                continue
            for output in card["outputs"]:
                value = results[file][output["name"]]
                want = _expected_shape(card, output, feeds)
                if list(value.shape) != want:
                    model.errors.append(
                        f"{file} {output['name']} at {case}: shape {list(value.shape)}, expected {want}"
                    )
                if output["name"] == image_name:
                    model.errors += _image_field_errors(card, file, case, value.shape)
                if not np.isfinite(value).all():
                    model.errors.append(f"{file} {output['name']} at {case}: non-finite values")
                elif output["name"] == image_name and (value.min() < lo - slack or value.max() > hi + slack):
                    model.errors.append(
                        f"{file} {output['name']} at {case}: values span "
                        f"[{value.min():.4g}, {value.max():.4g}] outside output_range [{lo}, {hi}]"
                    )
        if "model.onnx" in results and "model.fp16.onnx" in results:
            for output in card["outputs"]:
                a, b = results["model.onnx"][output["name"]], results["model.fp16.onnx"][output["name"]]
                if a.shape == b.shape:
                    fp16_worst = max(fp16_worst, float(np.abs(a.astype(np.float64) - b).max()))
                else:
                    uncompared.append(f"{output['name']} at {case}")
    if "model.fp16.onnx" in graphs:
        model.notes.append(
            f"fp16 vs fp32 ONNX max abs diff now {fp16_worst:.3g}"
            + (f" (not compared, shapes differ: {', '.join(uncompared)})" if uncompared else "")
        )
        if fp16_worst > card["parity"]["fp16_atol"]:
            model.errors.append(
                f"model.fp16.onnx differs from model.onnx by {fp16_worst:.3g} > "
                f"fp16_atol {card['parity']['fp16_atol']}"
            )


def _check_quality(
    card: Mapping[str, Any],
    run: OnnxRun,
    sessions: _SessionCache,
    model: ModelReport,
    thresholds: bool,
) -> None:
    from genserve_export.recipes import RECIPES, recipe_for_entry

    found = (
        (card["recipe"], RECIPES[card["recipe"]])
        if card.get("recipe") in RECIPES
        else recipe_for_entry(card["name"])
    )
    threshold_spec = card["quality"].get("thresholds", {})

    source = card.get("source")
    if found is None and isinstance(source, Mapping) and source.get("importer") == "tfjs-layers-sr":
        from genserve_export.import_sr import evaluate_imported

        try:
            figures = evaluate_imported(card, model.path, run)
        except Exception as exc:  # report, do not crash verify
            model.errors.append(f"quality evaluation of imported model failed: {type(exc).__name__}: {exc}")
            return
        _apply_thresholds(model, figures, threshold_spec, thresholds)
        return
    if found is None:
        model.notes.append("no recipe for this model: quality not recomputed, card figures shown")
        return
    recipe = found[1]

    try:
        with_siblings: Callable[..., dict[str, float]] | None = getattr(
            recipe, "evaluate_with_siblings", None
        )
        if with_siblings is not None:
            configs = {}
            if "sibling_config" in inspect.signature(with_siblings).parameters:
                configs["sibling_config"] = sessions.latest_config
            figures = with_siblings(card["name"], card, run, sessions.latest_run, **configs)
        else:
            figures = recipe.evaluate(card["name"], card, run)
    except Exception as exc:  # a recipe's evaluation is third-party code; report, do not crash verify
        model.errors.append(f"quality evaluation by recipe {found[0]!r} failed: {type(exc).__name__}: {exc}")
        return
    _apply_thresholds(model, figures, threshold_spec, thresholds)


def _apply_thresholds(
    model: ModelReport, figures: Mapping[str, float], threshold_spec: Mapping[str, Any], thresholds: bool
) -> None:
    model.quality_recomputed = {k: float(v) for k, v in figures.items()}
    failures = check_thresholds(model.quality_recomputed, threshold_spec)
    if thresholds:
        model.errors += failures
    elif failures:
        model.notes += [f"(thresholds off) {f}" for f in failures]


def _grid(model: ModelReport, version_dir: Path, grids_dir: Path, sessions: _SessionCache) -> None:
    from genserve_export.recipes import RECIPES, recipe_for_entry

    card = json.loads(read_regular_text(version_dir / "card.json"))
    found = (
        (card["recipe"], RECIPES[card["recipe"]])
        if card.get("recipe") in RECIPES
        else recipe_for_entry(card["name"])
    )
    sess = sessions.get(version_dir / "model.onnx")
    try:
        model.grid = write_grid(
            card,
            lambda feeds: run_session(sess, feeds),
            grids_dir / f"{model.name}-v{model.version}.png",
            found[1] if found else None,
        )
    except Exception as exc:  # a picture must not hide the checks' outcome; report it
        model.errors.append(f"grid failed: {type(exc).__name__}: {exc}")
