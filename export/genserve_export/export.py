"""``export_model``: one PyTorch module → one validated, atomically written repository entry."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from genserve_contract.kinds import KIND_NAMES, Kind
from genserve_contract.repository import (
    ACTIVATION_BYTES_FIELD,
    CARD_FORMAT_VERSION,
    FP16_ATOL,
    FP32_ATOL,
    NAME_PATTERN,
    NAME_RULE,
    RESERVED_NAMES,
    VERSION_PATTERN,
    sha256_file,
)
from genserve_export.activations import ActivationCountError, card_activation_bytes
from genserve_export.card import (
    CARD_FIELDS,
    STYLE_CARD_FIELDS,
    TRAINING_FIELDS,
    USER_CARD_FIELDS,
    merge_config,
    validate_card,
    validate_config,
)
from genserve_export.errors import (
    CardFieldError,
    ConfigFieldError,
    ExportError,
    ExportFailedError,
    ExportParityError,
    FrozenBatchAxisError,
    InvalidArgumentError,
    KindMismatchError,
    NonFiniteOutputError,
    RepositoryExistsError,
)
from genserve_export.onnx_utils import (
    NamedOutputs,
    adapt,
    dynamic_shapes_for,
    graph_signature,
    opset_of,
    optimize_offline,
    run_session,
    session,
    store_weights_fp16,
    torch_export,
)
from genserve_export.provenance import source_commit

logger = logging.getLogger(__name__)

PARITY_BATCH_SIZES = (1, 7)
_RANGE_SLACK = 1e-3  # outputs may exceed output_range by float rounding only
# <name>/.tmp-<version>-<token>: where _write_atomically stages a version (locked while it does).
_STAGING_NAME = re.compile(r"^\.tmp-[1-9][0-9]*-([0-9a-f]{8})$")
# <name>/.config.json.tmp-<token>: the model's config.json as _stage_config stages it (same token).
_CONFIG_STAGING_NAME = re.compile(r"^\.config\.json\.tmp-([0-9a-f]{8})$")
# A staging folder no export holds is removed once unchanged this long: an export of a
# genserve-export that did not lock it yet may still be filling it.
STALE_STAGING_S = 3600.0


def export_model(
    module: nn.Module,
    *,
    kind: str,
    name: str,
    version: str = "1",
    out_dir: str | os.PathLike[str],
    example_inputs: Mapping[str, np.ndarray | torch.Tensor],
    card: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    quality: Mapping[str, Any] | None = None,
    holdout: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    fp16: bool = True,
    overwrite: bool = False,
    extra_files: Mapping[str, str | os.PathLike[str] | bytes] | None = None,
    weights_fp16: bool = False,
) -> Path:
    """Export ``module`` as ``out_dir/name/version`` and return that directory.

    ``example_inputs`` are keyed by the kind's input names (``z``, ``label``, ``image``), which are
    also the ONNX input names; the module is called with them positionally in the kind's order and
    may return a tensor, a tuple in the kind's output order, or a dict keyed by output name.
    ``card`` carries what the graph cannot tell (``description``, ``output_range``, and by kind
    ``input_range``, ``class_names``; optionally ``scale_factor``, ``size_multiple``, ``min_size``,
    ``tile_size``, ``tile_overlap``, ``recipe`` and any extra field). Everything is checked before
    anything is written; a failure raises an :class:`ExportError` subclass naming the problem.
    ``extra_files`` (file name in the version directory -> source path, or the file's content as
    ``bytes``) travel with the graph, written in the same atomic step: e.g. an imported model's
    licence and reference images, or a recipe's auxiliary graph (content: no temporary file of the
    recipe has to outlive it). The card records each one's sha256, which ``verify`` holds it to: an
    auxiliary graph's in ``aux_graphs``, any other file's in ``source.files_sha256``; one listed in
    neither, or under another digest, is refused before the export's work.
    A published version directory (one that exists and is not empty) is immutable: it is refused
    unless ``overwrite=True``, and then replaced whole by a rename, never file by file.
    ``weights_fp16`` stores model.onnx's large weights as float16 (computed in float32 after a Cast):
    half the file size; the module's weights must already be float16 values
    (``onnx_utils.round_weights_fp16``) for the fp32 parity check to pass.
    """
    out_root = Path(out_dir)
    spec = _check_arguments(kind, name, version, card)
    _check_extra_files(card, extra_files or {})
    target = out_root / name / version
    if not overwrite:
        refuse_published([target])
    example = _example_tensors(spec, kind, example_inputs)
    _check_float32_weights(module)
    input_names = list(example)
    card_in = dict(card)
    size_multiple = int(card_in.get("size_multiple", 1))
    # Exported in eval mode (BatchNorm running statistics, no dropout); the caller gets the module
    # back in the modes it gave (it may go on training after exporting a checkpoint).
    modes = [(m, m.training) for m in module.modules()]
    module = module.eval()
    try:
        adapter = adapt(module, input_names, [t.name for t in spec.outputs])

        reference = _torch_outputs(adapter, example)
        derived = _derive_card_fields(spec, kind, example, reference, card_in)
        cases = _parity_cases(spec, example, derived)
        expected = [_case_outputs(adapter, feeds) for feeds in cases]
        _check_output_range(spec, card_in, cases, expected)

        with tempfile.TemporaryDirectory(prefix="genserve-export-") as tmp:
            workdir = Path(tmp)
            dynamic = dynamic_shapes_for(input_names, spec.fully_convolutional, size_multiple)
            fp32_path = workdir / "model.onnx"
            opset = _export_and_optimize(adapter, example, dynamic, spec, fp32_path)
            stored_fp16 = 0
            if weights_fp16:
                halved, stored_fp16 = store_weights_fp16(onnx.load(str(fp32_path)))
                onnx.save(halved, str(fp32_path))
            sess = session(fp32_path)
            inputs_sig, outputs_sig = graph_signature(sess)
            _check_dynamic_axes(spec, inputs_sig, outputs_sig)
            fp32_diff = _parity(sess, cases, expected, atol=FP32_ATOL, label="fp32")
            derived = _with_activation_bytes(spec, derived, fp32_path, name)

            fp16_diff: float | None = None
            fp16_note: str | None = None
            if not fp16:
                fp16_note = "fp16 variant not requested"
            else:
                fp16_diff, fp16_note = _export_fp16(module, example, dynamic, spec, cases, expected, workdir)

            files = ["model.onnx"] + (["model.fp16.onnx"] if (workdir / "model.fp16.onnx").exists() else [])
            parity: dict[str, Any] = {
                "fp32_max_abs_diff": fp32_diff,
                "fp32_atol": FP32_ATOL,
                "fp16_max_abs_diff": fp16_diff,
                "fp16_atol": FP16_ATOL,
                "fp16_written": "model.fp16.onnx" in files,
                "cases": [_case_label(c) for c in cases],
            }
            if weights_fp16:
                parity["weights_stored_fp16"] = stored_fp16
            if fp16_note:
                parity["fp16_note"] = fp16_note
            full_card = _assemble_card(
                card_in,
                derived,
                kind=kind,
                name=name,
                version=version,
                inputs=inputs_sig,
                outputs=outputs_sig,
                quality=quality,
                holdout=holdout,
                training=training,
                parity=parity,
                opset=opset,
                sha256={f: sha256_file(workdir / f) for f in files},
            )
            problems = validate_card(full_card, where=f"{name}/{version}/card.json")
            if problems:
                raise CardFieldError("; ".join(problems))
            full_config = merge_config(kind, config)
            problems = validate_config(full_config, where=f"{name}/config.json")
            if problems:
                raise ConfigFieldError("; ".join(problems))
            for file_name, source in (extra_files or {}).items():
                if (
                    file_name in files
                    or file_name == "card.json"
                    or "/" in file_name
                    or file_name.startswith(".")
                ):
                    raise InvalidArgumentError(
                        f"extra file name {file_name!r} is reserved or not a plain name"
                    )
                if isinstance(source, bytes):
                    (workdir / file_name).write_bytes(source)
                else:
                    shutil.copyfile(source, workdir / file_name)
                files.append(file_name)
            return _write_atomically(
                out_root, name, version, workdir, files, full_card, full_config, overwrite
            )
    finally:
        for submodule, was_training in modes:
            submodule.training = was_training


# --- argument checks -------------------------------------------------------------------------

_HOW = "export it as a new version, or pass overwrite=True to replace it"


def is_published(version_dir: Path) -> bool:
    """Whether ``version_dir`` holds a published version: it exists and is not an empty directory."""
    if version_dir.is_symlink() or (version_dir.exists() and not version_dir.is_dir()):
        return True
    return version_dir.is_dir() and any(version_dir.iterdir())


def refuse_published(version_dirs: Iterable[Path], how: str = _HOW) -> None:
    """Raise :class:`RepositoryExistsError` naming every published one of ``version_dirs`` and
    ``how`` to proceed: a published version is immutable (docs/model-repository.md)."""
    taken = [str(d) for d in version_dirs if is_published(d)]
    if taken:
        raise RepositoryExistsError(
            f"{', '.join(taken)} already {'holds' if len(taken) == 1 else 'hold'} a published version, "
            "which is immutable (a server may be serving its files; clients' provenance names it): "
            f"{how}"
        )


def check_entry_name(name: str, version: str) -> None:
    """Refuse a model name or version no repository entry may have: an importer calls it before
    its work, which export_model would otherwise refuse only at its end."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidArgumentError(f"name {name!r} must match {NAME_RULE}")
    if name in RESERVED_NAMES:  # the card's check refuses it too, but only after the export's work
        raise InvalidArgumentError(f"name {name!r} is the server's own grpc.health key, not a model's")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise InvalidArgumentError(f"version {version!r} must be a positive integer string such as '1'")


def _check_arguments(kind: str, name: str, version: str, card: Mapping[str, Any]) -> Kind:
    if kind not in KIND_NAMES:
        raise InvalidArgumentError(f"unknown kind {kind!r}; known kinds: {', '.join(sorted(KIND_NAMES))}")
    check_entry_name(name, version)
    missing = [f for f in USER_CARD_FIELDS[Kind(kind)] if card.get(f) is None]
    if missing:
        raise CardFieldError(f"card for {name} (kind {kind}) is missing field(s): {', '.join(missing)}")
    return Kind(kind)


def _check_extra_files(
    card: Mapping[str, Any], extra_files: Mapping[str, str | os.PathLike[str] | bytes]
) -> None:
    """Every extra file's digest recorded in ``card`` as verify reads it (its aux_graphs, its
    source.files_sha256), and the file's own: else it would be published with no digest anywhere,
    or fail verify once published."""
    aux = card.get("aux_graphs")
    source = card.get("source")
    recorded = source.get("files_sha256") if isinstance(source, Mapping) else None
    for file_name, path in extra_files.items():
        record = aux.get(file_name) if isinstance(aux, Mapping) else None
        if isinstance(record, Mapping):
            listed, where = record.get("sha256"), "aux_graphs"
        elif isinstance(recorded, Mapping) and file_name in recorded:
            listed, where = recorded[file_name], "source.files_sha256"
        else:
            raise InvalidArgumentError(
                f"extra file {file_name!r} is listed in neither the card's aux_graphs nor its "
                "source.files_sha256: its sha256 would be recorded nowhere (verify checks those)"
            )
        actual = hashlib.sha256(path).hexdigest() if isinstance(path, bytes) else sha256_file(Path(path))
        if listed != actual:
            raise InvalidArgumentError(
                f"extra file {file_name!r}: sha256 {actual[:12]}… differs from the card's {where} "
                f"({listed!r})"
            )


def _example_tensors(
    spec: Kind, kind: str, example_inputs: Mapping[str, np.ndarray | torch.Tensor]
) -> dict[str, torch.Tensor]:
    # the kind's inputs, then the optional ones (code kinds: label, top_codes) the example gives
    decls = list(spec.inputs) + [t for t in spec.optional_inputs if t.name in example_inputs]
    expected = [t.name for t in decls]
    if sorted(example_inputs) != sorted(expected):
        optional = [t.name for t in spec.optional_inputs]
        raise KindMismatchError(
            f"example_inputs are named {sorted(example_inputs)}, kind {kind} takes exactly "
            f"{[t.name for t in spec.inputs]}" + (f" and optionally {optional}" if optional else "")
        )
    tensors: dict[str, torch.Tensor] = {}
    for decl in decls:
        value = example_inputs[decl.name]
        tensor = (
            value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        )
        want = torch.float32 if decl.dtype == "float32" else torch.int64
        if tensor.dtype != want:
            raise KindMismatchError(
                f"example input {decl.name!r} is {tensor.dtype}, kind {kind} needs {decl.dtype}"
            )
        if tensor.dim() != decl.rank:
            raise KindMismatchError(
                f"example input {decl.name!r} has rank {tensor.dim()} (shape {list(tensor.shape)}), "
                f"kind {kind} needs rank {decl.rank}"
            )
        tensors[decl.name] = tensor
    batches = {t.shape[0] for t in tensors.values()}
    if len(batches) != 1 or 0 in batches:
        raise KindMismatchError(
            f"example inputs disagree on (or have an empty) batch axis: {sorted(batches)}"
        )
    # torch.export specialises an axis whose example size is 1: export at batch >= 2.
    if batches == {1}:
        tensors = {k: torch.cat([v, v]) for k, v in tensors.items()}
    return tensors


def _check_float32_weights(module: nn.Module) -> None:
    """The module computes in float32, as the graph's inputs and outputs are: a float64 (.double())
    or float16 (.half()) weight is named with the fix, not left to fail in its first layer."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            raise KindMismatchError(
                f"the module's {name!r} is {tensor.dtype}: export a float32 module (module.float()); "
                "model.fp16.onnx is written from it (fp16=True)"
            )


# --- torch reference and card derivation -----------------------------------------------------


def _torch_outputs(adapter: NamedOutputs, feeds: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = adapter.output_names
    try:
        with torch.no_grad():
            result: tuple[torch.Tensor, ...] = adapter(*feeds.values())
    except (KeyError, TypeError) as exc:
        raise KindMismatchError(f"module outputs do not fit the kind's outputs {list(names)}: {exc}") from exc
    if len(result) != len(names):
        raise KindMismatchError(
            f"module returned {len(result)} output(s), the kind needs {len(names)}: {list(names)}"
        )
    outputs: dict[str, np.ndarray] = {}
    for name, value in zip(names, result, strict=True):
        if not isinstance(value, torch.Tensor):
            raise KindMismatchError(f"output {name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype != torch.float32:
            raise KindMismatchError(f"output {name!r} is {value.dtype}, every output must be float32")
        array = value.detach().cpu().numpy()
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise NonFiniteOutputError(f"output {name!r} has {bad} NaN/inf value(s) of {array.size}")
        outputs[name] = array
    return outputs


def _derive_card_fields(
    spec: Kind,
    kind: str,
    example: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
) -> dict[str, Any]:
    """Fields the graph determines, checked against any value the caller put in the card."""
    batch = next(iter(example.values())).shape[0]
    problems: list[str] = []
    for decl in spec.outputs:
        shape = reference[decl.name].shape
        if len(shape) != decl.rank:
            problems.append(
                f"output {decl.name!r} has shape {list(shape)}, kind {kind} needs rank {decl.rank}"
            )
        elif shape[0] != batch:
            problems.append(f"output {decl.name!r} has batch {shape[0]} for an input batch of {batch}")
    if problems:
        raise KindMismatchError("; ".join(problems))

    derived: dict[str, Any] = {
        "latent_dim": None,
        "class_names": None,
        "input_channels": None,
        "image_size": None,
        "input_range": None,
        "scale_factor": None,
        "size_multiple": None,
        "tile_size": None,
        "tile_overlap": None,
        "min_size": None,
        "grid": None,
        "codebook_size": None,
        "top_grid": None,
        "top_codebook_size": None,
    }
    if spec.takes_codes:
        problems += _derive_code_fields(spec, example, reference, card, derived)
    if spec.takes_latent:
        derived["latent_dim"] = int(example["z"].shape[1])
    if "label" in example:
        problems += _derive_class_names(example["label"], card, derived)
    problems += _derive_style_fields(spec, example, reference, card, derived)
    if spec.gives_latent:
        mu, logvar = reference["mu"].shape, reference["logvar"].shape
        if mu != logvar:
            problems.append(f"mu {list(mu)} and logvar {list(logvar)} must have the same shape")
        derived["latent_dim"] = int(mu[1])
    if spec.takes_image:
        image_in = example["image"]
        derived["input_channels"] = int(image_in.shape[1])
        derived["input_range"] = [float(v) for v in card["input_range"]]
    problems += _derive_image_fields(kind, spec, example, reference, card, derived)
    for key, value in derived.items():
        given = card.get(key)
        if given is not None and value is not None and _normalise(given) != _normalise(value):
            problems.append(f"card field {key!r} says {given!r} but the module gives {value!r}")
    if problems:
        error = CardFieldError if all("card" in p for p in problems) else KindMismatchError
        raise error("; ".join(problems))
    return derived


def _derive_class_names(labels: torch.Tensor, card: Mapping[str, Any], derived: dict[str, Any]) -> list[str]:
    if not card.get("class_names"):
        return ["card field class_names is required with a 'label' input"]
    names = list(card["class_names"])
    derived["class_names"] = names
    if labels.min() < 0 or labels.max() >= len(names):
        return [f"example labels must lie in [0, {len(names)}) for {len(names)} class_names"]
    return []


def _derive_code_fields(
    spec: Kind,
    example: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
    derived: dict[str, Any],
) -> list[str]:
    """grid, codebook_size, top_grid, top_codebook_size of a code kind; return problems found."""
    problems: list[str] = []
    codes = example["codes"]
    derived["grid"] = [int(codes.shape[1]), int(codes.shape[2])]
    if spec.autoregressive:
        logits = reference["logits"]
        derived["codebook_size"] = int(logits.shape[1])
        if list(logits.shape[2:]) != derived["grid"]:
            problems.append(f"logits {list(logits.shape)} do not cover the code grid {derived['grid']}")
    elif card.get("codebook_size") is None:
        problems.append(f"card for kind {spec} is missing field codebook_size")
    else:
        derived["codebook_size"] = int(card["codebook_size"])
    if card.get("class_names") and "label" not in example:
        problems.append("card field class_names is set but the example gives no 'label' input")
    if "top_codes" in example:
        top = example["top_codes"]
        derived["top_grid"] = [int(top.shape[1]), int(top.shape[2])]
        if card.get("top_codebook_size") is None:
            problems.append("card field top_codebook_size is required with a 'top_codes' input")
        else:
            derived["top_codebook_size"] = int(card["top_codebook_size"])
            if int(top.max()) >= derived["top_codebook_size"] or int(top.min()) < 0:
                problems.append(f"example top_codes must lie in [0, {derived['top_codebook_size']})")
    elif card.get("top_grid") is not None or card.get("top_codebook_size") is not None:
        problems.append("card fields top_grid / top_codebook_size need a 'top_codes' input")
    k = derived["codebook_size"]
    if k is not None and (int(codes.max()) >= k or int(codes.min()) < 0):
        problems.append(f"example codes must lie in [0, {k})")
    return problems


def _derive_style_fields(
    spec: Kind,
    example: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
    derived: dict[str, Any],
) -> list[str]:
    """The style kinds' fields (w_dim; num_layers and w_avg of a style_generator); problems found."""
    problems: list[str] = []
    if spec.maps_latent:
        derived["w_dim"] = int(reference["w"].shape[1])
    if spec.styled:
        layers, w_dim = (int(d) for d in example["ws"].shape[1:])
        w_avg = [float(v) for v in card["w_avg"]]
        derived.update(latent_dim=int(card["latent_dim"]), w_dim=w_dim, num_layers=layers, w_avg=w_avg)
        if len(w_avg) != w_dim or not np.isfinite(w_avg).all():
            problems.append(f"card field 'w_avg' must be {w_dim} finite numbers (w_dim), got {len(w_avg)}")
        if layers < 2:
            problems.append(f"example input 'ws' has {layers} layer(s); a style generator needs >= 2")
    return problems


def _derive_image_fields(
    kind: str,
    spec: Kind,
    example: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
    card: Mapping[str, Any],
    derived: dict[str, Any],
) -> list[str]:
    """Fill channels, image_size and the fully convolutional fields; return problems found."""
    problems: list[str] = []
    out_name = spec.image_output_name
    if spec.maps_latent:  # z -> w: no image
        derived["channels"] = None
        return problems
    if out_name is not None:
        out = reference[out_name].shape
        derived["channels"] = int(out[1])
        lo, hi = (float(v) for v in card["output_range"])
        values = reference[out_name]
        slack = _RANGE_SLACK * (hi - lo)
        if values.min() < lo - slack or values.max() > hi + slack:
            problems.append(
                f"output {out_name!r} spans [{values.min():.4g}, {values.max():.4g}], outside the card's "
                f"output_range [{lo}, {hi}]"
            )
    elif "image" in example:
        derived["channels"] = int(example["image"].shape[1])
    else:  # a code prior: no image in or out
        derived["channels"] = None
        return problems
    if derived["channels"] not in (1, 3):
        problems.append(f"image channels must be 1 (gray) or 3 (RGB), got {derived['channels']}")
    if not spec.fully_convolutional:
        source = reference[out_name] if out_name is not None else example["image"].numpy()
        derived["image_size"] = [int(source.shape[2]), int(source.shape[3])]
    else:
        h_in, w_in = int(example["image"].shape[2]), int(example["image"].shape[3])
        h_out, w_out = int(reference["output_image"].shape[2]), int(reference["output_image"].shape[3])
        multiple = int(card.get("size_multiple", 1))
        derived["size_multiple"] = multiple
        derived["min_size"] = int(card.get("min_size", max(multiple, 8)))
        if h_in % multiple or w_in % multiple:
            problems.append(f"example image {h_in}x{w_in} is not a multiple of size_multiple {multiple}")
        if spec.tiled:
            scale = h_out // h_in
            if h_out != scale * h_in or w_out != scale * w_in or scale < 1:
                problems.append(
                    f"super_resolution output {h_out}x{w_out} is not an integer multiple of {h_in}x{w_in}"
                )
            derived["scale_factor"] = scale
            derived["tile_size"] = int(card.get("tile_size", 128))
            derived["tile_overlap"] = int(card.get("tile_overlap", 8))
        elif (h_out, w_out) != (h_in, w_in):
            problems.append(f"image_to_image output {h_out}x{w_out} differs from its input {h_in}x{w_in}")
    return problems


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# --- parity ----------------------------------------------------------------------------------


def _parity_cases(
    spec: Kind, example: Mapping[str, torch.Tensor], derived: Mapping[str, Any]
) -> list[dict[str, np.ndarray]]:
    """Seeded inputs at batch 1 and 7, and for fully convolutional kinds at two (non-square) sizes."""
    rng = np.random.default_rng(12345)
    sizes: list[tuple[int, int] | None] = [None]
    if spec.fully_convolutional:
        h, w = int(example["image"].shape[2]), int(example["image"].shape[3])
        step = int(derived["size_multiple"]) * max(1, math.ceil(8 / int(derived["size_multiple"])))
        sizes = [(h, w), (h + step, w + 2 * step)]
    cases = []
    for size in sizes:
        for batch in PARITY_BATCH_SIZES:
            feeds: dict[str, np.ndarray] = {}
            for decl in [*spec.inputs, *(t for t in spec.optional_inputs if t.name in example)]:
                if decl.name in ("codes", "top_codes"):
                    k = derived["codebook_size" if decl.name == "codes" else "top_codebook_size"]
                    grid = derived["grid" if decl.name == "codes" else "top_grid"]
                    feeds[decl.name] = rng.integers(0, k, (batch, *grid)).astype(np.int64)
                elif decl.name == "z":
                    feeds["z"] = rng.standard_normal((batch, derived["latent_dim"])).astype(np.float32)
                elif decl.name == "label":
                    feeds["label"] = rng.integers(0, len(derived["class_names"]), batch).astype(np.int64)
                elif decl.name == "direction":
                    feeds["direction"] = np.zeros(batch, np.int64)  # one direction per call; both below
                elif decl.name == "ws":
                    shape = (batch, derived["num_layers"], derived["w_dim"])
                    feeds["ws"] = rng.standard_normal(shape).astype(np.float32)
                else:
                    lo, hi = derived["input_range"]
                    c = derived["input_channels"]
                    hw = size if size is not None else tuple(example["image"].shape[2:])
                    feeds["image"] = rng.uniform(lo, hi, (batch, c, *hw)).astype(np.float32)
            cases.append(feeds)
            if "direction" in feeds:  # a two-way translator: every case in both directions
                cases.append({**feeds, "direction": np.ones(batch, np.int64)})
    return cases


def _case_label(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())


def _case_outputs(adapter: NamedOutputs, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The module's outputs for one parity case (computed once, for the range check and both graphs)."""
    try:
        return _torch_outputs(adapter, {k: torch.from_numpy(v) for k, v in feeds.items()})
    except ExportError:
        raise
    except Exception as exc:  # e.g. a reshape that writes the example's batch in as a constant
        raise FrozenBatchAxisError(
            f"the module fails for inputs {_case_label(feeds)} (a batch or image axis is fixed?): {exc}"
        ) from exc


def _check_output_range(
    spec: Kind,
    card: Mapping[str, Any],
    cases: list[dict[str, np.ndarray]],
    expected: list[dict[str, np.ndarray]],
) -> None:
    """The card's output_range must hold for the parity cases too (seeded latents, every label,
    images over input_range; what verify runs is alike), not only for the example inputs."""
    name = spec.image_output_name
    if name is None or card.get("output_range") is None:
        return
    lo, hi = (float(v) for v in card["output_range"])
    slack = _RANGE_SLACK * (hi - lo)
    outside = []
    for feeds, want in zip(cases, expected, strict=True):
        low, high = float(want[name].min()), float(want[name].max())
        if low < lo - slack or high > hi + slack:
            case = _case_label(feeds)
            if "direction" in feeds:
                case += f" direction {int(feeds['direction'][0])}"
            outside.append(f"[{low:.4g}, {high:.4g}] at {case}")
    if outside:
        raise CardFieldError(
            f"output {name!r} leaves the card's output_range [{lo}, {hi}] on seeded inputs the example "
            f"does not cover: {'; '.join(outside)}"
        )
    # The server maps lo -> 0 and hi -> 255. An output that spreads over a quarter of the range or
    # more but never reaches one half of it is most likely a range the card misstates: a sigmoid
    # generator under [-1, 1] would serve grey levels 128..255 only, washed out, and every other check
    # passes. A warning, not a refusal: an undertrained (or a truly dark or bright) model may do so.
    low = min(float(want[name].min()) for want in expected)
    high = max(float(want[name].max()) for want in expected)
    middle = (lo + hi) / 2
    if (low > middle or high < middle) and high - low >= (hi - lo) / 4:
        half, levels = ("upper", "128..255") if low > middle else ("lower", "0..127")
        logger.warning(
            "output %r spans [%.4g, %.4g] on seeded inputs, only the %s half of the card's "
            "output_range [%s, %s]: the server maps %s to 0 and %s to 255, so its images would use "
            "grey levels %s only; if that is not intended, set output_range to the range the module "
            "produces (e.g. [0, 1] for a sigmoid output, [-1, 1] for tanh)",
            name,
            low,
            high,
            half,
            lo,
            hi,
            lo,
            hi,
            levels,
        )


def _parity(
    sess: ort.InferenceSession,
    cases: list[dict[str, np.ndarray]],
    expected: list[dict[str, np.ndarray]],
    *,
    atol: float,
    label: str,
) -> float:
    """Max abs diff ONNX vs torch (``expected``, one per case) over all cases; raises listing every
    failing (output, case)."""
    worst = 0.0
    failures: list[str] = []
    for feeds, want in zip(cases, expected, strict=True):
        try:
            got = run_session(sess, feeds)
        except Exception as exc:  # ORT raises its own Fail/InvalidArgument types; report which case
            raise FrozenBatchAxisError(
                f"{label} graph fails for inputs {_case_label(feeds)} "
                f"(a batch or image axis is fixed?): {exc}"
            ) from exc
        for name, reference in want.items():
            actual = got[name]
            if actual.shape != reference.shape:
                failures.append(
                    f"{name} at {_case_label(feeds)}: shape {list(actual.shape)} "
                    f"vs torch {list(reference.shape)}"
                )
                continue
            if not np.isfinite(actual).all():
                raise NonFiniteOutputError(
                    f"{label} graph output {name!r} is not finite at {_case_label(feeds)}"
                )
            diff = float(np.abs(actual.astype(np.float64) - reference).max())
            worst = max(worst, diff)
            if diff > atol:
                failures.append(f"{name} at {_case_label(feeds)}: max abs diff {diff:.3g} > atol {atol}")
    if failures:
        raise ExportParityError(f"{label} ONNX graph differs from PyTorch: " + "; ".join(failures))
    return worst


# --- export steps ----------------------------------------------------------------------------


def _export_and_optimize(
    adapter: NamedOutputs,
    example: Mapping[str, torch.Tensor],
    dynamic: Mapping[str, Any],
    spec: Kind,
    out_path: Path,
) -> int:
    try:
        raw = torch_export(adapter, example, dynamic, [t.name for t in spec.outputs])
    except Exception as exc:  # torch.export raises many unrelated types; classify by message
        text = str(exc)
        if "batch" in text and any(
            k in text for k in ("Constraints violated", "specializ", "Not all values")
        ):
            raise FrozenBatchAxisError(
                f"the module fixes the batch axis (torch.export could not keep it dynamic): {text[:800]}"
            ) from exc
        raise ExportFailedError(f"torch.onnx.export failed: {type(exc).__name__}: {text[:800]}") from exc
    try:
        optimized = optimize_offline(raw, out_path)
    except Exception as exc:  # onnxruntime / onnx.checker failures
        raise ExportFailedError(f"graph optimisation failed: {exc}") from exc
    opset = opset_of(optimized)
    if opset < 17:
        raise ExportFailedError(f"exported opset {opset} < 17")
    return opset


def _check_dynamic_axes(spec: Kind, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
    problems = []
    for entry in inputs + outputs:
        if entry["shape"][0] != -1:
            problems.append(f"{entry['name']} has a fixed batch axis ({entry['shape'][0]})")
    if problems:
        raise FrozenBatchAxisError("exported graph: " + "; ".join(problems))
    if spec.fully_convolutional:
        fixed = [
            e["name"]
            for e in inputs + outputs
            if e["name"] in ("image", "output_image") and -1 not in e["shape"][2:]
        ]
        if fixed:
            raise KindMismatchError(f"fully convolutional kind but H/W are fixed in the graph for {fixed}")


def _export_fp16(
    module: nn.Module,
    example: Mapping[str, torch.Tensor],
    dynamic: Mapping[str, Any],
    spec: Kind,
    cases: list[dict[str, np.ndarray]],
    expected: list[dict[str, np.ndarray]],
    workdir: Path,
) -> tuple[float | None, str | None]:
    """Write model.fp16.onnx (fp16 weights and compute, fp32 inputs/outputs) if it is close enough."""
    half = adapt(copy.deepcopy(module).half(), list(example), [t.name for t in spec.outputs], half=True)
    path = workdir / "model.fp16.onnx"
    try:
        _export_and_optimize(half, example, dynamic, spec, path)
        diff = _parity(session(path), cases, expected, atol=math.inf, label="fp16")
    except ExportError as exc:
        path.unlink(missing_ok=True)
        logger.warning("fp16 variant not written: %s", exc)
        return None, f"fp16 export failed: {str(exc)[:300]}"
    if diff > FP16_ATOL:
        path.unlink()
        return diff, f"fp16 max abs diff {diff:.3g} > {FP16_ATOL}: not written"
    return diff, None


# --- card and files --------------------------------------------------------------------------


def _with_activation_bytes(spec: Kind, derived: dict[str, Any], model: Path, name: str) -> dict[str, Any]:
    """`derived` with ACTIVATION_BYTES_FIELD for the kinds that take an image and give one
    (super_resolution and the Translate kinds): the server sizes their calls' working sets from it.
    A graph it cannot be counted for keeps the card without it (the server's constant), warned."""
    if not (spec.tiled or spec.translates):
        return derived
    try:
        value = card_activation_bytes(derived, model)
    except ActivationCountError as exc:
        logger.warning("%s: card.json gets no %s: %s", name, ACTIVATION_BYTES_FIELD, exc)
        return derived
    return {**derived, ACTIVATION_BYTES_FIELD: value}


def _assemble_card(
    card_in: Mapping[str, Any],
    derived: Mapping[str, Any],
    *,
    kind: str,
    name: str,
    version: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    quality: Mapping[str, Any] | None,
    holdout: Mapping[str, Any] | None,
    training: Mapping[str, Any] | None,
    parity: Mapping[str, Any],
    opset: int,
    sha256: Mapping[str, str],
) -> dict[str, Any]:
    train: dict[str, Any] = {key: None for key in TRAINING_FIELDS}
    train["source_commit"] = source_commit()
    train.update(training or {})
    quality_out = dict(quality or {})
    quality_out.setdefault("thresholds", {})
    values: dict[str, Any] = {
        "format_version": CARD_FORMAT_VERSION,
        "name": name,
        "version": version,
        "kind": Kind(kind).value,
        "description": card_in["description"],
        "recipe": card_in.get("recipe"),
        "inputs": inputs,
        "outputs": outputs,
        **derived,
        # the range of the image output: null for a kind without one (a vae_encoder's mu and logvar)
        "output_range": (
            None
            if card_in.get("output_range") is None or Kind(kind).image_output_name is None
            else [float(v) for v in card_in["output_range"]]
        ),
        "training": train,
        "quality": quality_out,
        "holdout": dict(holdout or {}),
        "parity": dict(parity),
        "opset": opset,
        "sha256": dict(sha256),
        "onnxruntime_version": ort.__version__,
        "torch_version": torch.__version__,
    }
    full = {key: values.get(key) for key in CARD_FIELDS}
    for key in (*STYLE_CARD_FIELDS, ACTIVATION_BYTES_FIELD):  # the kinds' own, after the standard ones
        if key in derived:
            full[key] = derived[key]
    for key, value in card_in.items():  # extra, caller-defined fields are kept after the standard ones
        if key not in full:
            full[key] = value
    return full


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk: a file's bytes, or a directory's entries (the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush(source: Path) -> None:
    """fsync ``source`` (a file, or a directory of files and the directory): before its rename, so
    that a power loss or a VM crash cannot leave the published name on an empty or truncated file."""
    if source.is_dir():
        for file in source.iterdir():
            _fsync(file)
    _fsync(source)


def _publish(source: Path, target: Path, *, flushed: bool = False) -> None:
    """Rename ``source`` (a file, or a directory of files) to ``target`` durably: its bytes are on
    disk before the rename (_flush, unless `flushed` says it already was), and the rename is after it
    (the parent directory fsynced; without it the rename itself may be lost)."""
    if not flushed:
        _flush(source)
    os.replace(source, target)
    _fsync(target.parent)


def _discard(retired: Path) -> None:
    """Remove the old version --replace renamed aside: a link (a version linked in from elsewhere)
    is unlinked, what it points to is not the export's; what cannot be removed is named."""
    if retired.is_symlink():
        try:
            retired.unlink()
        except OSError:
            pass  # named below
    else:
        shutil.rmtree(retired, ignore_errors=True)
    if os.path.lexists(retired):
        logger.warning("could not remove %s, the replaced version's old copy: remove it", retired)


def _lock_staging(path: Path) -> int | None:
    """An fd holding an exclusive flock on the directory `path` (released when it is closed or its
    process dies), or None where another process holds it or `path` is not a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _remove_stale_staging(entry: Path) -> None:
    """Remove the staging folders and config.json temp files of exports that died in them (SIGKILL,
    a lost machine: no cleanup ran), which the server ignores and would otherwise pile up: only
    names of _write_atomically's making that no live export locks (a config temp file: no staging
    folder of its token) and that are unchanged for STALE_STAGING_S."""
    live: set[str] = set()
    configs: list[Path] = []
    for path in entry.iterdir():
        if _CONFIG_STAGING_NAME.match(path.name):
            configs.append(path)
            continue
        match = _STAGING_NAME.match(path.name)
        if match is None:
            continue
        fd = _lock_staging(path)
        if fd is None:
            live.add(match.group(1))
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime < STALE_STAGING_S:
                live.add(match.group(1))
                continue
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                logger.warning("could not remove %s, an unfinished export's staging folder", path)
            else:
                logger.info("removed %s, the staging folder of an export that did not finish", path)
        finally:
            os.close(fd)
    for path in configs:
        match = _CONFIG_STAGING_NAME.match(path.name)
        if match is None or match.group(1) in live:
            continue
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_STAGING_S:
                continue
            path.unlink()
        except OSError:
            continue
        logger.info("removed %s, the config.json of an export that did not finish", path)


def _remove_if_empty(entry: Path, made: bool) -> None:
    """Remove the model folder `entry` an export `made` and could not publish into: left empty (no
    config.json, no version), a server would report the model unavailable. One another export has
    written into meanwhile stays."""
    if made:
        with contextlib.suppress(OSError):
            entry.rmdir()


def _stage_config(
    config_path: Path, token: str, config: Mapping[str, Any], overwrite: bool
) -> tuple[Path | None, bool]:
    """The model's config.json to publish, written (and flushed) under a temporary name before
    anything is renamed in, so that a failure writing it (a full disk) publishes nothing, where a
    version without its model's config.json would be; and whether it is new (no config.json yet).
    None: the model's config.json stays as it is (a new version beside the others)."""
    if config_path.exists() and not overwrite:
        return None, False
    config_tmp = config_path.with_name(f".config.json.tmp-{token}")
    try:
        _write_json(config_tmp, config)
        _flush(config_tmp)
    except BaseException:
        _unlink_quietly(config_tmp)
        raise
    return config_tmp, not config_path.exists()


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_atomically(
    out_root: Path,
    name: str,
    version: str,
    workdir: Path,
    files: list[str],
    card: Mapping[str, Any],
    config: Mapping[str, Any],
    overwrite: bool,
) -> Path:
    entry = out_root / name
    made = not os.path.lexists(entry)  # a new model: its folder goes again if nothing is published
    entry.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(entry)
    token = secrets.token_hex(4)
    staging = entry / f".tmp-{version}-{token}"
    try:
        staging.mkdir()
    except BaseException:
        _remove_if_empty(entry, made)
        raise
    lock = _lock_staging(staging)  # held until this export leaves it: no other one removes it
    config_path = entry / "config.json"
    config_tmp: Path | None = None
    config_new = False
    try:
        for file in files:
            shutil.copyfile(workdir / file, staging / file)
        _write_json(staging / "card.json", card)
        target = entry / version
        retired: Path | None = None
        if (target.exists() or target.is_symlink()) and not overwrite:
            refuse_published([target])
        config_tmp, config_new = _stage_config(config_path, token, config, overwrite)
        _flush(staging)  # before the old version leaves: the instant with none stays an instant
        try:
            if config_new and config_tmp is not None:
                # A new model's config.json arrives first, its version an instant after (a server
                # reads a version with its model's config.json); it goes again if the version fails.
                _publish(config_tmp, config_path, flushed=True)
                config_tmp = None
            if target.exists() or target.is_symlink():
                # The whole version is swapped by two renames: a reader sees the old directory, then
                # (after an instant with none) the new one, never a mix or a half-written file.
                retired = entry / f".old-{version}-{token}"
                os.rename(target, retired)
            _publish(staging, target, flushed=True)
        except BaseException:  # a failed rename, or a SIGTERM/Ctrl-C between the two (cli.main)
            if retired is not None and os.path.lexists(retired) and not os.path.lexists(target):
                os.rename(retired, target)  # the new one did not arrive: the old one stays served
            elif retired is not None:  # the new one is in place (its last fsync was interrupted)
                _discard(retired)
            retired = None
            if config_new and os.path.lexists(staging):  # the version did not arrive
                _unlink_quietly(config_path)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _unlink_quietly(config_tmp)
        _remove_if_empty(entry, made)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    if retired is not None:
        _discard(retired)
    if config_tmp is not None:  # --replace of a model's config.json: written before, renamed now
        _publish(config_tmp, config_path, flushed=True)
    elif not config_new:
        _warn_if_config_kept(config_path, config)
    logger.info("wrote %s (files: %s)", target, ", ".join(files))
    return target


def _warn_if_config_kept(config_path: Path, config: Mapping[str, Any]) -> None:
    # config.json is the model's, shared by its versions, and an operator may have edited it
    # (version_policy, batching): a new version beside the others leaves it as it is.
    if _read_json_or_none(config_path) != json.loads(json.dumps(config)):
        logger.warning(
            "kept %s as it is (the model's versions share it; --replace writes the recipe's)",
            config_path,
        )


def _read_json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
