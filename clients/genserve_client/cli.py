"""`genserve-client`: talk to a genserve server from the shell and write pictures.

Exit codes: 0 success; 1 a failed call or I/O error, a bulk job that stopped with images missing,
or a bench run in which no request succeeded; 2 a rejected request (INVALID_ARGUMENT, the server's
message is printed), a model or version the server does not serve (NOT_FOUND, any command), bad
arguments, a bulk job started with other parameters or whose pinned model version the server no
longer serves; 3 the bulk job folder is in use by another run; 130 interrupted (Ctrl-C), 143
stopped by SIGTERM. docs/client.md has the details.

Connection flags (--target, --tls, ...) go before or after the command; GENSERVE_TARGET sets the
default target.
"""

# ruff: noqa: E402
# (the entry below comes before the imports it holds the signals for)
from __future__ import annotations

if __name__ == "__main__":  # `python -m genserve_client.cli`: the console script's entry, first
    from genserve_client.__main__ import main as _entry

    raise SystemExit(_entry())

import argparse
import dataclasses
import errno
import importlib.metadata
import io
import json
import math
import os
import random
import re
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from genserve.v1 import genserve_pb2
from genserve_client.bench import MAX_RATE as MAX_BENCH_RATE
from genserve_client.bench import LoadGenerator, PayloadFactory, StreamsRefused, format_table
from genserve_client.binding import DEFAULT_TIMEOUT_S
from genserve_client.bulk import (
    DEFAULT_RETRY_WINDOW_S,
    DEFAULT_STREAM_IMAGES,
    JOB_FILE,
    LABEL_LIMIT,
    SEED_LIMIT,
    SHARD_ENV,
    UINT32_LIMIT,
    BulkBusy,
    BulkError,
    BulkIncomplete,
    BulkJob,
    BulkParams,
    BulkRetryExhausted,
    RetryWindow,
    Shard,
    VersionNotServed,
    file_above,
    kind_refusal,
    load_params,
    model_answer,
    read_job,
    state_label,
    version_order,
    write_file_whole,
)
from genserve_client.bulkverify import verify_job, write_merged_manifest
from genserve_client.channel import ChannelConfig, TlsOptions, read_token_file, tls_hint, token_problem
from genserve_client.classes import class_refusal, printable
from genserve_client.client import GenserveClient
from genserve_client.convert import FILE_SUFFIX, _pil_to_uint8, array_to_pil
from genserve_client.errors import GenserveClientError
from genserve_client.grid import GridRow, make_grid
from genserve_client.interrupt import first_stop, pass_on, reset, run_async, say_stop, stop_status
from genserve_client.pngmeta import PNG_SIGNATURE, png_text, pnginfo, with_png_text
from genserve_client.requests import DIRECTIONS
from genserve_client.results import CodesProgress, Provenance, SampleResult
from genserve_client.retry import RetryPolicy
from genserve_contract.flags import nonempty_path_text
from genserve_contract.stdio import READER_GONE_STATUS, HelpParser, Stdout, err_line

MAX_IMAGES_PER_CALL = 256  # the server's max_images_per_request default


def images_per_call(info: genserve_pb2.ModelInfo) -> int:
    """The most images one call of this model may ask for: what the server says
    (ModelInfo.max_images_per_request: its limit or the model's queue, whichever is smaller), else
    the server's default limit (a server from before that field)."""
    return info.max_images_per_request or MAX_IMAGES_PER_CALL


# A grid picture holds at most this many images (32 x 32 cells, ~2,200 px square for 64-px cells):
# `sample --n 100000 --grid` would otherwise write a 27,900 x 27,812 picture. `bulk` is for more.
MAX_GRID_IMAGES = 1024
# `sample` holds every image until it is written (`bulk` streams any number to disk), and `bench`
# runs a task per worker: past these a typo (--n 5000000000) is refused, not killed for memory.
MAX_SAMPLE_IMAGES = 100_000
# Four servers' max_concurrent_rpcs default (1024): past what a server admits, calls are refused
# RESOURCE_EXHAUSTED and measure that, not the model (more than a connection's max_concurrent_streams
# on one --channels connection stops the run first: bench.StreamsRefused).
MAX_BENCH_CONCURRENCY = 4096
# bench's --channels (a channel, ~7 KB, and a connection each) and bulk's --concurrency (a stream
# planned per worker, up to --n of them, each one of the server's concurrent RPCs): the same bound.
MAX_BENCH_CHANNELS = MAX_BENCH_CONCURRENCY
MAX_BULK_CONCURRENCY = MAX_BENCH_CONCURRENCY
CONDITIONAL = "conditional_generator"
# The server truncates only when asked (SampleRequest.truncation_psi absent: none); no model has a default.
PSI_HELP = "truncation psi (default: none; a style generator's is in w space, 0 = the mean w, 1 = none)"
CODE_PRIOR = "code_prior"
TARGET_ENV = "GENSERVE_TARGET"
DEFAULT_TARGET = "127.0.0.1:50051"
# A stream rides out a blip itself (a few seconds); the job's --retry-window (BulkJob) reopens it
# for longer outages, such as a server restart, and decides when to give up.
BULK_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.2, max_backoff_s=2.0)


# The server's text on one line, without terminal escapes (classes.printable).
_printable = printable


def _error_text(exc: BaseException) -> str:
    """`exc` as its line says it: an OSError naming files as str() does ("[Errno 2] No such file or
    directory: 'x.png'") but with each name as it is, not its repr, whose escapes (\\udcc3 for a
    byte LANG=C did not decode, \\xe9) name a file nobody typed; _err writes such bytes as they came."""
    if not isinstance(exc, OSError) or exc.filename is None or exc.strerror is None:
        return str(exc)
    names = " -> ".join(f"'{os.fsdecode(n)}'" for n in (exc.filename, exc.filename2) if n is not None)
    return f"[Errno {exc.errno}] {exc.strerror}: {names}"


# What became of stdout: its reader went away (`| head -1`, `| true`: the rest of the output goes
# nowhere, exit 141) or it was closed from the start (`>&-`: no sys.stdout, exit 1 with one line, as
# coreutils do); the command finishes its work either way (the images it writes), then main answers.
_STDOUT = Stdout()


def _out(text: str) -> None:
    _STDOUT.say(text)


def _err(text: str) -> None:
    """One line to stderr: a message often quotes the server's text (a refusal, a version's reason
    quoting the model repository's files), its control characters escaped (_printable). Nothing
    where the CLI started with stderr closed (`2>&-`)."""
    err_line(_printable(text))


class UsageError(Exception):
    """Bad arguments found after parsing (exit code 2)."""


def parse_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# A class as a flag gives it: an index (an integer), or one of the model's class names, which
# class_index resolves against GetModel's class_names.
Label = int | str

# The class names an unknown name's refusal lists, at most.
LISTED_CLASS_NAMES = 20


def label_item(text: str) -> Label:
    """One class of a label flag: an integer is an index in [0, 2^31), anything else a class name."""
    name = text.strip()
    try:
        index = int(name)
    except ValueError:
        if not name:
            raise argparse.ArgumentTypeError("expected a class index or name, got an empty one") from None
        return name
    if not 0 <= index < LABEL_LIMIT:
        raise argparse.ArgumentTypeError(f"labels are class indices in [0, 2^31), got {index}")
    return index


def label_items(text: str) -> list[Label]:
    """Comma-separated classes, each an index or a class name (empty parts skipped)."""
    return [label_item(part) for part in text.split(",") if part.strip()]


def parse_labels(text: str) -> str:
    """argparse type of --labels: `all` or comma-separated classes (indices or class names), checked
    before any call (the value stays a string for resolve_labels)."""
    if text != "all":
        label_items(text)
    return text


def int_in(lo: int, hi: int, limit: str) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi], refused naming the range `limit` otherwise (a value the
    request cannot carry would otherwise surface as protobuf's bare `Value out of range: N`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in {limit}, got {value}")
        return value

    return parse


SEED_RANGE = "[0, 2^63)"
parse_seed = int_in(0, SEED_LIMIT - 1, SEED_RANGE)
parse_uint32 = int_in(0, UINT32_LIMIT - 1, f"0..{UINT32_LIMIT - 1}")
parse_positive = int_in(1, UINT32_LIMIT - 1, f"1..{UINT32_LIMIT - 1}")
# --label: one class, an index or a class name (the whole text: a name may hold a comma).
parse_label = label_item


def parse_label_list(text: str) -> list[Label]:
    """argparse type of interpolate --label and bench --labels: classes, indices in [0, 2^31) or
    class names."""
    return label_items(text)


def parse_seeds(text: str) -> list[int]:
    """argparse type of a list of seeds (mix --rows/--cols, arithmetic --a/--b/--c): at least one,
    each in [0, 2^63)."""
    seeds = parse_ints(text)
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated seeds, got {text!r}")
    bad = [seed for seed in seeds if not 0 <= seed < SEED_LIMIT]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be in {SEED_RANGE}, got {bad[0]}")
    return seeds


def parse_timeout(text: str) -> float:
    """--timeout: a finite number of seconds > 0 (0 or less would expire every call at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


FLOAT32_MAX = float(np.finfo(np.float32).max)
# The server's bound on the latents it is given (genserve.proto DecodeRequest.latents: |z| <= 1e4).
MAX_ABS_LATENT = 1e4


def parse_float32(text: str) -> float:
    """A number the server takes as a float32 (a value set into or added to a latent, a psi, a
    temperature): finite and within float32's range, so that a bad one is refused naming its flag,
    not by the server's check of its own field (latents, truncation_psi, temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(
            f"must be a finite number within float32's range (|x| <= {FLOAT32_MAX:.4g}), got {text}"
        )
    return value


def check_picture_path(command: str, flag: str, path: str | None) -> None:
    """Refuse, before any call, a picture file whose suffix names no format PIL can write (a
    directory, `grid.txt`): PIL's own `unknown file extension` comes after all the work. One in
    a folder that is a file (check_folder) is refused too."""
    if path is None:
        return
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise UsageError(
            f"{command}: {flag} {path!r} must be an image file name ending in .png (or .jpg, .webp, ...)"
        )
    check_folder(command, flag, path, Path(path).parent)


def check_folder(command: str, flag: str, path: str, folder: Path) -> None:
    """Refuse, before any call, a `folder` (of `flag`'s `path`) that is a file or lies under one: the
    folder is made once the pictures are, and mkdir's bare `[Errno 17] File exists` came after all
    the work, its images thrown away."""
    above = (None if folder.is_dir() else folder) if folder.exists() else file_above(folder)
    if above is not None:
        raise UsageError(f"{command}: {flag} {path}: {above} is a file, not a folder")


def check_out_folder(command: str, path: str | None) -> None:
    """An --out folder that is a file or lies under one (check_folder)."""
    if path is not None:
        check_folder(command, "--out", path, Path(path))


def parse_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# --- model helpers ----------------------------------------------------------------------------


def card(info: genserve_pb2.ModelInfo, version: str = "") -> dict[str, Any]:
    """The card of the version a call with `version` uses: that version, or ("") the highest READY
    one, as the server picks it (bulk.served_model); {} when it has none."""
    if version:
        candidates = [v for v in info.versions if v.version == version]
    else:
        ready = [v for v in info.versions if v.state == genserve_pb2.MODEL_STATE_READY]
        candidates = ready or list(info.versions)
    if not candidates or not (chosen := max(candidates, key=version_order)).card_json:
        return {}
    loaded: dict[str, Any] = json.loads(chosen.card_json)
    return loaded


def class_label(info: genserve_pb2.ModelInfo, label: int) -> str:
    return info.class_names[label] if 0 <= label < len(info.class_names) else str(label)


def class_index(info: genserve_pb2.ModelInfo, label: Label, where: str) -> int:
    """A class's index: an index as it is (check_classes checks its range), a class name matched
    against the model's class_names (an exact match, else the one equal ignoring case); a name equal
    to several ignoring case is refused as ambiguous, an unknown one listing the model's classes.
    `where`: `command: --flag`, for the message."""
    if isinstance(label, int):
        return label
    names = list(info.class_names)
    if label in names:
        return names.index(label)
    folded = [i for i, name in enumerate(names) if name.casefold() == label.casefold()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        matches = " and ".join(f"{i}: {names[i]}" for i in folded)
        raise UsageError(
            f"{where}: {label!r} is ambiguous for {info.name}: ignoring case it matches {matches}; "
            "give the exact name or the index"
        )
    if not names:
        raise UsageError(f"{where}: {info.name} is a {info.kind} without classes: it takes no labels")
    listed = ", ".join(f"{i}: {name}" for i, name in enumerate(names[:LISTED_CLASS_NAMES]))
    more = f", ... ({len(names)} in all)" if len(names) > LISTED_CLASS_NAMES else ""
    raise UsageError(
        f"{where}: {info.name} has no class named {label!r}; give a class index or one of its "
        f"class names: {listed}{more}"
    )


def class_indices(info: genserve_pb2.ModelInfo, labels: Sequence[Label], where: str) -> list[int]:
    return [class_index(info, label, where) for label in labels]


def resolve_labels(info: genserve_pb2.ModelInfo, labels: str | None, command: str = "") -> list[int]:
    """`all` -> every class of a model with class names (a conditional generator or code prior);
    `0,Dress` -> [0, 3] (an index, or a class name of the model); None -> all classes for a
    conditional model (a conditional generator, or a code prior with class names: both refuse a
    request without labels), none otherwise."""
    if labels == "all":
        return list(range(len(info.class_names)))
    if labels is None:
        conditional = info.kind == CONDITIONAL or (info.kind == CODE_PRIOR and bool(info.class_names))
        return list(range(len(info.class_names))) if conditional else []
    where = f"{command}: --labels" if command else "--labels"
    try:
        items = label_items(labels)
    except argparse.ArgumentTypeError as exc:
        # Called after parsing: an argparse error here would escape main() as a traceback.
        raise UsageError(f"{where}: {exc} (or `all`)") from None
    return class_indices(info, items, where)


def save_image_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_whole(path, data)


def encoded(picture: Image.Image, path: Path, text: dict[str, str] | None = None) -> bytes:
    """`picture` encoded in the format `path`'s suffix names (check_picture_path); a PNG carries
    `text` (seeds, model, version, sha256) as tEXt chunks."""
    buffer = io.BytesIO()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if text and fmt == "PNG":
        picture.save(buffer, format=fmt, pnginfo=pnginfo(text))
    else:
        picture.save(buffer, format=fmt)
    return buffer.getvalue()


def save_picture(picture: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Save a picture whole or not at all (write_file_whole)."""
    save_image_bytes(path, encoded(picture, path, text))
    _out(f"wrote {path} ({picture.width}x{picture.height})")


def write_items(result: SampleResult, out_dir: Path, stem: str, **settings: object) -> None:
    """Each image as the server encoded it (no re-encoding; PNGs get text chunks with the seed,
    label, the command's own `settings` such as psi (None skipped), model, version and sha256);
    raw pixels are written as PNG here."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for position, item in enumerate(result.items):
        name = f"{stem}_{position:04d}" + (f"_seed{item.seed}" if item.seed is not None else "")
        name += f"_label{item.label}" if item.label is not None else ""
        text = png_text(result.provenance, seed=item.seed, label=item.label, **settings)
        suffix = FILE_SUFFIX.get(item.message.format)
        if suffix is None:
            path = out_dir / f"{name}.png"
            write_file_whole(path, encoded(array_to_pil(item.array), path, text))
        else:
            write_file_whole(out_dir / f"{name}{suffix}", with_png_text(item.raw, text))
    _out(f"wrote {len(result.items)} images to {out_dir}")


def mix_calls(pairs: Sequence[tuple[int, int]], per_call: int) -> list[list[tuple[int, int]]]:
    """(coarse, fine) seed pairs in calls of at most `per_call` mixes and `per_call` distinct seeds
    (the server maps a call's distinct seeds in one request to the mapping's queue)."""
    calls: list[list[tuple[int, int]]] = []
    seeds: set[int] = set()
    for pair in pairs:
        if not calls or len(calls[-1]) == per_call or len(seeds | set(pair)) > per_call:
            calls.append([])
            seeds = set()
        calls[-1].append(pair)
        seeds.update(pair)
    return calls


class OneModel:
    """The calls of one command go to one model: those after the first name the version it used
    (`opts`, unless the command named one), and each must come back from the first's model file (and
    the models its images also went through). A server restarted, reloaded or replaced between two
    calls (a rolling upgrade, replicas serving different versions) would otherwise mix two models in
    one command's images, and the PNGs, which carry one provenance, would name the wrong one for
    some of them."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = dict(opts)
        self.first: Provenance | None = None

    def seen(self, provenance: Provenance) -> None:
        if self.first is None:
            self.first = provenance
            if not self.opts.get("version") and provenance.version:
                self.opts["version"] = provenance.version
            return
        first = self.first
        # No used_models is not reported (a server older than that field; a rolling upgrade's old
        # replicas): the calls that name them must agree, and the images' provenance names them.
        if provenance.used_models and not first.used_models:
            first = self.first = dataclasses.replace(first, used_models=provenance.used_models)
        # Nor is no weights_sha256 (an older server): a graph whose weights are in external data
        # files keeps its bytes, and its sha256, when retrained; this digest tells the two apart.
        if provenance.weights_sha256 and not first.weights_sha256:
            first = self.first = dataclasses.replace(first, weights_sha256=provenance.weights_sha256)
        # The same for the models the images went through (a mapping, a decoder).
        if provenance.used_weights_sha256 and not first.used_weights_sha256:
            first = self.first = dataclasses.replace(
                first, used_weights_sha256=provenance.used_weights_sha256
            )
        # And the card.json digests (card_sha256: the card shapes the images, w_avg, output_range).
        if provenance.card_sha256 and not first.card_sha256:
            first = self.first = dataclasses.replace(first, card_sha256=provenance.card_sha256)
        if provenance.used_card_sha256 and not first.used_card_sha256:
            first = self.first = dataclasses.replace(first, used_card_sha256=provenance.used_card_sha256)
        if (
            provenance.version,
            provenance.model_sha256,
            provenance.weights_sha256 or first.weights_sha256,
            provenance.used_models or first.used_models,
            provenance.used_weights_sha256 or first.used_weights_sha256,
            provenance.card_sha256 or first.card_sha256,
            provenance.used_card_sha256 or first.used_card_sha256,
        ) != (
            first.version,
            first.model_sha256,
            first.weights_sha256,
            first.used_models,
            first.used_weights_sha256,
            first.card_sha256,
            first.used_card_sha256,
        ):
            raise GenserveClientError(
                grpc.StatusCode.ABORTED,
                f"the model changed between this command's calls: {describe_model(first)}, then "
                f"{describe_model(provenance)} (a server restarted or reloaded with another model): its "
                "images would mix two models; run the command again",
            )


def describe_model(p: Provenance) -> str:
    used_weights = dict(p.used_weights_sha256)
    used_cards = dict(p.used_card_sha256)
    used = "".join(
        f", through {m} version {v} sha256 {h}"
        + (f" weights sha256 {used_weights[m]}" if m in used_weights else "")
        + (f" card sha256 {used_cards[m]}" if m in used_cards else "")
        for m, v, h in p.used_models
    )
    weights = f" weights sha256 {p.weights_sha256}" if p.weights_sha256 else ""
    card = f" card sha256 {p.card_sha256}" if p.card_sha256 else ""
    return f"{p.model} version {p.version} sha256 {p.model_sha256 or '?'}{weights}{card}{used}"


def sample_in_batches(
    client: GenserveClient,
    model: str,
    seeds: list[int],
    labels: list[int],
    *,
    call: Callable[..., SampleResult] | None = None,
    per_call: int = MAX_IMAGES_PER_CALL,
    **opts: Any,
) -> SampleResult:
    """One image per (seed, label) pair, in calls of at most `per_call` images; `call` is the
    client method (default `client.sample`; `client.sample_codes` for a code prior). Every call
    goes to the first one's model (OneModel)."""
    call = call or client.sample
    items, one = [], OneModel(opts)
    for start in range(0, len(seeds), per_call):
        part = slice(start, start + per_call)
        res = call(model, seeds=seeds[part], labels=labels[part], **one.opts)
        one.seen(res.provenance)
        items.extend(res.items)
    if one.first is None:
        raise UsageError("nothing to sample: --n must be >= 1")
    return SampleResult(items, one.first)


def _codes_opts(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"format": args.format, "version": args.version, "top_k": args.top_k or 0}
    if args.temperature is not None:
        opts["temperature"] = args.temperature
    if args.top_temperature is not None:
        opts["top_temperature"] = args.top_temperature
    if args.top_top_k:
        opts["top_top_k"] = args.top_top_k
    return opts


def sample_codes_in_batches(
    client: GenserveClient,
    args: argparse.Namespace,
    info: genserve_pb2.ModelInfo,
    seeds: list[int],
    labels: list[int],
) -> SampleResult:
    """A code prior's grids, decoded, in calls within what one SampleCodes may ask of it
    (ModelInfo.max_images_per_request: the server's limit, its row budget, its top prior's, its
    decoder's queue; from a server without that field, its row budget ModelInfo.max_batch_size);
    with --progress, one streamed call whose previews fill a strip (the first sample's), saved to
    that file after every preview, so that an image viewer shows it filling in."""
    budget = info.max_images_per_request or max(
        1, min(MAX_IMAGES_PER_CALL, info.max_batch_size or MAX_IMAGES_PER_CALL)
    )
    if args.progress:
        if len(seeds) > budget:
            raise UsageError(
                f"sample --progress: at most {budget} images (one call of the prior: its row budget and "
                f"the server's limits), asked {len(seeds)}"
            )
        strip: list[Image.Image] = []
        result: SampleResult | None = None
        # The strip is the first sample's: its PNG records that sample as every PNG does (the
        # model's provenance once the answer has come).
        first = {
            "seed": seeds[0],
            "label": labels[0] if labels else None,
            "temperature": args.temperature,
            "top_k": args.top_k or None,
            "top_temperature": args.top_temperature,
            "top_top_k": args.top_top_k or None,
        }
        for item in client.sample_codes_progress(args.model, seeds=seeds, labels=labels, **_codes_opts(args)):
            if isinstance(item, CodesProgress):
                _err(f"{item.level} {item.filled}/{item.positions}")  # progress, as bulk's: stderr
                if item.previews:
                    strip.append(item.pil()[0])
            else:
                result = item
                strip.extend(item.pil()[:1])
            if strip:
                text = png_text(result.provenance if result is not None else None, **first)
                picture, path = make_grid([GridRow(strip)]), Path(args.progress)
                if result is None:  # a preview: the strip rewritten, its progress line said
                    save_image_bytes(path, encoded(picture, path, text))
                else:  # the answer: stdout says what the command made, the strip once
                    save_picture(picture, path, text)
        assert result is not None  # the stream's last chunk is the answer
        return result
    return sample_in_batches(
        client, args.model, seeds, labels, call=client.sample_codes, per_call=budget, **_codes_opts(args)
    )


# --- commands ---------------------------------------------------------------------------------


def cmd_models(client: GenserveClient, args: argparse.Namespace) -> int:
    rows = [["name", "kind", "versions", "state", "latent", "output", "classes"]]
    models = client.list_models()
    for m in models:
        row = [
            m.name,
            m.kind,
            ",".join(v.version for v in m.versions) or "-",
            ",".join(state_label(v.state) + (f" ({v.reason})" if v.reason else "") for v in m.versions)
            or "-",
            str(m.latent_dim or "-"),
            "x".join(map(str, m.output_shape)) or "-",
            str(len(m.class_names) or "-"),
        ]
        rows.append([_printable(cell) for cell in row])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        _out("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    # Why a model's files on disk are not what it serves (a reload that kept the loaded versions).
    for m in models:
        if m.reason:
            _out(_printable(f"{m.name}: {m.reason}"))
    return 0


def _sample_opts(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"format": args.format, "version": args.version}
    if args.psi is not None:
        opts["psi"] = args.psi
    return opts


def check_grid_size(
    command: str, images: int, what: str, remedy: str = "or write files with --out (or `bulk` for large jobs)"
) -> None:
    if images > MAX_GRID_IMAGES:
        raise UsageError(
            f"{command}: a --grid holds at most {MAX_GRID_IMAGES} images, {what} asks for {images}; "
            f"lower it, {remedy}"
        )


def check_classes(command: str, flag: str, info: genserve_pb2.ModelInfo, labels: list[int]) -> None:
    """Each label a class of the model (none for a model without classes), before any call
    (classes.class_refusal, which a bulk job checks too)."""
    refusal = class_refusal(info.name, info.kind, info.class_names, labels)
    if refusal:
        raise UsageError(f"{command}: {flag}: {refusal}")


def check_sample_size(n: int, classes: int = 1) -> None:
    """`sample`'s images, --n per class of its rows (refused before any call)."""
    images = n * max(1, classes)
    if images > MAX_SAMPLE_IMAGES:
        what = f"--n {n}" + (f" x {classes} classes" if classes > 1 else "")
        raise UsageError(
            f"sample: --n: at most {MAX_SAMPLE_IMAGES} images (it holds them all until written), "
            f"{what} asks for {images}; use `bulk` for more (it streams them to disk, resumably)"
        )


def check_cols(args: argparse.Namespace, labels: list[int]) -> None:
    """`sample --cols` only where it lays out a grid: one of a model without classes (a conditional
    model's has a row per class). Dropped without a word, it left `--label 3 --n 64 --cols 8` a
    strip of 64 images."""
    if args.cols is None:
        return
    if not args.grid:
        raise UsageError("sample: --cols lays out the --grid: give --grid, or leave --cols out")
    if labels:
        raise UsageError(
            f"sample: --cols lays out the grid of a model without classes; {args.model}'s grid has a "
            "row per class (--labels, --label): leave --cols out"
        )


def cmd_sample(client: GenserveClient, args: argparse.Namespace) -> int:
    if not args.out and not args.grid:
        raise UsageError("sample needs --out DIR and/or --grid FILE.png")
    if args.n < 1:
        raise UsageError(f"sample: --n must be >= 1, got {args.n}")
    if args.seed is not None and args.seed > SEED_LIMIT - args.n:
        raise UsageError(
            f"sample: --seed must be in [0, 2^63 - n] = [0, {SEED_LIMIT - args.n}] for --n {args.n} "
            f"(image j uses seed + j, and seeds are below 2^63), got {args.seed}"
        )
    if args.label is not None and args.labels is not None:
        raise UsageError(
            "sample: give --label (one class for all images) or --labels (a row per class), not both"
        )
    check_picture_path("sample", "--grid", args.grid)
    check_picture_path("sample", "--progress", args.progress)
    check_out_folder("sample", args.out)
    if args.grid:
        check_grid_size("sample", args.n, f"--n {args.n}")  # before any call
    check_sample_size(args.n)
    info = client.get_model(args.model, args.version)  # the version its calls go to
    labels = (
        [class_index(info, args.label, "sample: --label")]
        if args.label is not None
        else resolve_labels(info, args.labels, "sample")
    )
    check_classes("sample", "--label" if args.label is not None else "--labels", info, labels)
    check_cols(args, labels)
    if args.grid and len(labels) > 1:
        check_grid_size("sample", args.n * len(labels), f"--n {args.n} x {len(labels)} classes")
    check_sample_size(args.n, len(labels))
    # Given at all (0 included: the prior's default) they are refused for another kind, as --psi is.
    top_level = args.top_temperature is not None or args.top_top_k is not None
    if info.kind != "code_prior" and (
        args.progress or args.temperature is not None or args.top_k is not None or top_level
    ):
        raise UsageError(
            f"sample: --progress, --temperature, --top-k, --top-temperature and --top-top-k are for code "
            f"priors; {args.model} is {info.kind}"
        )
    if info.kind == "code_prior" and args.psi is not None:
        # SampleCodes has no truncation: the flag would change nothing, yet be written into the PNGs.
        raise UsageError(
            f"sample: --psi (truncation) is for generators; {args.model} is a code prior: "
            "use --temperature or --top-k"
        )
    base = args.seed if args.seed is not None else random.randrange(2**31)
    # The same seeds in every class row: a conditional model's rows then differ only by class.
    row_seeds = [base + j for j in range(args.n)]
    seeds = row_seeds * max(1, len(labels))
    flat_labels = [label for label in labels for _ in row_seeds]
    settings: dict[str, object] = {"psi": args.psi}
    if info.kind == "code_prior":
        result: SampleResult = sample_codes_in_batches(client, args, info, seeds, flat_labels)
        if not result.items:
            # A prior without a decoder (a VQ-VAE-2 top prior) answers with code grids only.
            raise UsageError(
                f"sample: {args.model} gives code grids, not images (a code prior without a decoder, "
                "such as a top prior): sample the prior that decodes, or get the grids from the "
                "library's sample_codes(..., return_codes=True)"
            )
        settings = {
            "temperature": args.temperature,
            "top_k": args.top_k or None,
            "top_temperature": args.top_temperature,
            "top_top_k": args.top_top_k or None,
        }
    else:
        result = sample_in_batches(
            client, args.model, seeds, flat_labels, per_call=images_per_call(info), **_sample_opts(args)
        )
    if args.seed is None:  # once the images are made: a command that failed used no seed
        _out(f"seed {base} (repeat with --seed {base})")
    if args.out:
        write_items(result, Path(args.out), args.model, **settings)
    if args.grid:
        pictures = result.pil()
        if labels:
            grid_rows = [
                GridRow(pictures[i * args.n : (i + 1) * args.n], class_label(info, lab))
                for i, lab in enumerate(labels)
            ]
        else:
            cols = args.cols or math.ceil(math.sqrt(len(pictures)))
            grid_rows = [GridRow(pictures[i : i + cols]) for i in range(0, len(pictures), cols)]
        text = png_text(
            result.provenance,
            seeds=f"{base}..{base + args.n - 1}",
            labels=",".join(map(str, labels)) if labels else None,
            **settings,
        )
        save_picture(make_grid(grid_rows), Path(args.grid), text)
    return 0


def cmd_interpolate(client: GenserveClient, args: argparse.Namespace) -> int:
    if not args.out and not args.grid:
        raise UsageError("interpolate needs --out DIR and/or --grid FILE.png")
    check_picture_path("interpolate", "--grid", args.grid)
    check_out_folder("interpolate", args.out)
    if args.grid:
        # One call draws the whole path: --out and `bulk` cannot draw more steps either.
        check_grid_size(
            "interpolate",
            args.steps,
            f"--steps {args.steps}",
            "to the model's max_images_per_request at most (256 by default): one call draws the path",
        )
    opts = _sample_opts(args)
    if args.label:
        if not all(isinstance(label, int) for label in args.label):  # a class name: the model's
            args.label = class_indices(
                client.get_model(args.model, args.version), args.label, "interpolate: --label"
            )
        opts["labels"] = args.label
    result = client.interpolate(args.model, args.from_seed, args.to_seed, args.steps, mode=args.mode, **opts)
    # Every file records the path it lies on: an image between the ends has no seed of its own.
    path = {"from_seed": args.from_seed, "to_seed": args.to_seed, "steps": args.steps, "mode": args.mode}
    if args.out:
        write_items(result, Path(args.out), f"{args.model}-interp", **path, psi=args.psi)
    if args.grid:
        ts = np.linspace(0.0, 1.0, len(result.items))
        row = GridRow(result.pil(), f"{args.mode or 'path'} {args.from_seed}->{args.to_seed}")
        text = png_text(
            result.provenance,
            **path,
            label=",".join(map(str, args.label)) if args.label else None,
            psi=args.psi,
        )
        save_picture(make_grid([row], captions=[f"t={t:.2f}" for t in ts]), Path(args.grid), text)
    return 0


STYLE_GENERATOR = "style_generator"
TWO_WAY_TRANSLATOR = "two_way_translator"


def default_crossover(info: genserve_pb2.ModelInfo, version: str = "") -> int:
    """The crossover the card of the version used advertises (`mix_crossover`: where its mixing
    figures were measured), or num_layers // 2 for a card without one (or with one out of range, or
    not an int: JSON true is Python's True, an int 1 that the library refuses as a crossover)."""
    advertised = card(info, version).get("mix_crossover")
    if isinstance(advertised, int) and not isinstance(advertised, bool) and 0 < advertised < info.num_layers:
        return advertised
    return max(1, info.num_layers // 2)


def cmd_mix(client: GenserveClient, args: argparse.Namespace) -> int:
    """The classic style-mixing grid: the top row shows each column seed's own image, the left column
    each row seed's; cell (r, c) takes its coarse layers [0, crossover) from row seed r and its fine
    layers from column seed c."""
    check_picture_path("mix", "--grid", args.grid)
    info = client.get_model(args.model, args.version)
    if info.kind != STYLE_GENERATOR:
        raise UsageError(
            f"mix needs a {STYLE_GENERATOR} model; {args.model} is a {info.kind or 'unknown kind'}"
        )
    rows, cols = args.rows, args.cols
    # The grid's images: a mix per (row, column), and each row's and column's own (the corner is blank).
    n_mixes, n_own = len(rows) * len(cols), len(rows) + len(cols)
    what = f"{n_mixes} mixes, and the rows' and columns' own {n_own} images"
    check_grid_size(
        "mix",
        n_mixes + n_own,
        f"--rows x --cols ({len(rows)}x{len(cols)}: {what})",
        "or draw it in several grids",
    )
    if args.crossover is not None and not (
        0 < args.crossover < info.num_layers if info.num_layers else args.crossover > 0
    ):
        # 0 would reach the server as "unset" and come back as "crossover: required".
        top = f"{info.num_layers - 1}" if info.num_layers else "num_layers - 1"
        raise UsageError(f"mix: --crossover must be in 1..{top} (the first fine layer), got {args.crossover}")
    crossover = args.crossover if args.crossover is not None else default_crossover(info, args.version)
    opts = _sample_opts(args)
    per_call = images_per_call(info)
    own = sample_in_batches(client, args.model, [*rows, *cols], [], per_call=per_call, **opts)
    pairs = [(r, c) for r in rows for c in cols]
    mixed: list[Any] = []
    one = OneModel(opts)
    one.seen(own.provenance)
    for chunk in mix_calls(pairs, per_call):
        part = client.mix_styles(args.model, chunk, crossover=crossover, **one.opts)
        one.seen(part.provenance)
        mixed.extend(part.pil())
    provenance = own.provenance
    own_pictures = own.pil()
    row_pictures, col_pictures = own_pictures[: len(rows)], own_pictures[len(rows) :]
    grid_rows = [GridRow([None, *col_pictures], "fine ->")]
    for i, seed in enumerate(rows):
        grid_rows.append(
            GridRow([row_pictures[i], *mixed[i * len(cols) : (i + 1) * len(cols)]], f"coarse {seed}")
        )
    text = png_text(
        provenance,
        rows=",".join(map(str, rows)),
        cols=",".join(map(str, cols)),
        crossover=crossover,
        psi=args.psi,
    )
    captions = ["", *(f"fine {seed}" for seed in cols)]
    save_picture(make_grid(grid_rows, captions=captions), Path(args.grid), text)
    return 0


def cmd_arithmetic(client: GenserveClient, args: argparse.Namespace) -> int:
    sets = {"A": args.a, "B": args.b, "C": args.c}
    check_picture_path("arithmetic", "--grid", args.grid)
    # The grid's images: each set's members and the four decoded means (A, B, C, A - B + C).
    sizes = [len(v) for v in sets.values()]
    check_grid_size(
        "arithmetic",
        sum(sizes) + 4,
        f"--a/--b/--c (sets of {sizes[0]}, {sizes[1]} and {sizes[2]} seeds, and the 4 means)",
        "with fewer seeds per set",
    )
    info = client.get_model(args.model, args.version)
    labels = [class_index(info, args.label, "arithmetic: --label")] if args.label is not None else []
    if info.kind == CONDITIONAL and not labels:
        raise UsageError(f"{args.model} is conditional: give --label")
    opts = _sample_opts(args)
    per_call = images_per_call(info)  # the sets may hold more seeds than one call of the model takes
    seeds = [s for v in sets.values() for s in v]
    members = sample_in_batches(
        client, args.model, seeds, labels * len(seeds), per_call=per_call, return_latents=True, **opts
    )
    latents = members.latents
    if latents is None:
        raise UsageError(f"{args.model} returned no latents; arithmetic needs a latent-space model")
    bounds = np.cumsum([0] + [len(v) for v in sets.values()])
    means = [latents[bounds[i] : bounds[i + 1]].mean(axis=0) for i in range(3)]
    combined = means[0] - means[1] + means[2]
    if info.kind != STYLE_GENERATOR:
        # A latent model's explicit z take no truncation (the members' z were truncated when drawn);
        # a style generator truncates every image in w space, after the mapping, the means' too.
        opts.pop("psi", None)
    points = np.stack([*means, combined])
    one = OneModel(opts)
    one.seen(members.provenance)  # the means are decoded by the model that drew the members
    decoded = []
    for start in range(0, len(points), per_call):
        part = client.sample(args.model, latents=points[start : start + per_call], labels=labels, **one.opts)
        one.seen(part.provenance)
        decoded += part.pil()
    member_pics = members.pil()
    width = max(len(v) for v in sets.values())
    grid_rows = []
    for i, (name, seeds) in enumerate(sets.items()):
        row: list[Image.Image | None] = list(member_pics[bounds[i] : bounds[i + 1]])
        row += [None] * (width - len(row)) + [decoded[i]]
        grid_rows.append(GridRow(row, f"{name}: {','.join(map(str, seeds))}"))
    grid_rows.append(GridRow([None] * width + [decoded[3]], "A - B + C"))
    captions = [f"seed {j + 1}" for j in range(width)] + ["mean"]
    text = png_text(
        members.provenance,
        seeds_a=",".join(map(str, args.a)),
        seeds_b=",".join(map(str, args.b)),
        seeds_c=",".join(map(str, args.c)),
        label=labels[0] if labels else None,  # the index, as every PNG records it (a name resolved)
        psi=args.psi,
    )
    save_picture(make_grid(grid_rows, captions=captions), Path(args.grid), text)
    return 0


VAE_SUFFIXES = (("-encoder", "-decoder"), ("-enc", "-dec"))


def vae_names(model: str, served: Sequence[str]) -> tuple[str, str]:
    """`vae-digits`, `vae-digits-encoder` or `vae-digits-decoder` -> (encoder, decoder)."""
    for enc, dec in VAE_SUFFIXES:
        if model.endswith(enc):
            return model, model.removesuffix(enc) + dec
        if model.endswith(dec):
            return model.removesuffix(dec) + enc, model
    for enc, dec in VAE_SUFFIXES:
        if model + enc in served and model + dec in served:
            return model + enc, model + dec
    raise UsageError(f"no VAE pair for {model!r}: expected {model}-encoder and {model}-decoder")


# An encoder card's `input_channels` -> the Pillow mode its input pictures are converted to. A
# genserve.v1 image has 1 or 3 channels: a 2- or 4-channel encoder gets RGB, which the server refuses
# naming its input_channels (such a model is served through KServe ModelInfer).
PICTURE_MODES = {1: "L", 3: "RGB"}


def load_for_encoder(path: Path, info: genserve_pb2.ModelInfo, version: str = "") -> npt.NDArray[np.uint8]:
    c = card(info, version)
    try:
        opened: Image.Image = Image.open(path)
    except Image.DecompressionBombError as exc:  # no OSError: it escaped main() as a traceback
        raise UsageError(f"edit: {path}: {exc}") from None
    # The server reads a card without `input_channels` as 3 (config.py): the same default here.
    mode = PICTURE_MODES.get(c.get("input_channels", 3), "RGB")
    # Closed here: Pillow keeps a multi-frame file (GIF) or one that failed to decode open.
    with opened:
        try:
            if opened.mode.startswith("I;16") or opened.mode in ("I", "F"):
                # 16-bit gray (a 16-bit PNG) or float gray (a float TIFF): Pillow's convert clips
                # or truncates them; converted as the library converts a PIL image (the server's
                # reading of a 16-bit PNG; 0..1 for float, other values refused).
                picture = Image.fromarray(_pil_to_uint8(opened)).convert(mode)
            else:
                picture = opened.convert(mode)
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt ('broken PNG file')
            raise UsageError(f"edit: {path}: cannot read the picture: {exc}") from None
    size = c.get("image_size")
    if size and (picture.height, picture.width) != tuple(size):
        # The server never resizes (EncodeRequest): fit the picture to the encoder here.
        _err(f"note: resizing {path} from {picture.width}x{picture.height} to {size[1]}x{size[0]}")
        picture = picture.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(picture)


def check_sweep_size(images: int, what: str) -> None:
    """The sweep grid (the input column plus the sweep's values, per row) is bounded like every
    other grid: `--sweep-steps 100000` would otherwise decode 100,000 images into one picture."""
    if images > MAX_GRID_IMAGES:
        raise UsageError(
            f"edit: a sweep grid holds at most {MAX_GRID_IMAGES} images, {what} asks for {images}; "
            "lower --sweep-steps"
        )


def ready_versions(info: genserve_pb2.ModelInfo) -> list[str]:
    """The READY versions of a model, lowest first."""
    ready = [v for v in info.versions if v.state == genserve_pb2.MODEL_STATE_READY]
    return [v.version for v in sorted(ready, key=version_order)]


def loading_versions(info: genserve_pb2.ModelInfo) -> list[str]:
    """The LOADING versions of a model, lowest first."""
    loading = [v for v in info.versions if v.state == genserve_pb2.MODEL_STATE_LOADING]
    return [v.version for v in sorted(loading, key=version_order)]


def loading_in_both(encoder: genserve_pb2.ModelInfo, decoder: genserve_pb2.ModelInfo) -> bool:
    """Whether a version READY or LOADING in both halves is LOADING in one: READY in both once loaded."""
    enc, dec = loading_versions(encoder), loading_versions(decoder)
    ready_enc, ready_dec = ready_versions(encoder), ready_versions(decoder)
    return any(v in dec or v in ready_dec for v in enc) or any(v in ready_enc for v in dec)


def edit_halves(
    client: GenserveClient, encoder: str, decoder: str, version: str
) -> tuple[genserve_pb2.ModelInfo, genserve_pb2.ModelInfo, str]:
    """Both halves' ModelInfo and the version `edit` runs them at (vae_version), asked again as the
    client retries UNAVAILABLE (its RetryPolicy) while that version is only LOADING."""
    attempt = 0
    while True:
        encoder_info, decoder_info = client.get_model(encoder), client.get_model(decoder)
        try:
            return encoder_info, decoder_info, vae_version(encoder_info, decoder_info, version)
        except GenserveClientError as exc:
            attempt += 1
            delay = client.retry.delay_s(exc.code, attempt, None, details=exc.details)
            if delay is None:
                raise
            time.sleep(delay)


def vae_version(encoder: genserve_pb2.ModelInfo, decoder: genserve_pb2.ModelInfo, version: str) -> str:
    """The version `edit` runs both halves of the VAE at: `version`, else the highest one READY in
    both. The halves of one VAE are exported as one version: each half's own highest READY would
    encode with one and decode with another (two latent spaces) where one half's newest failed to
    load or is still loading. A `version` not READY in a half is refused before any Encode, naming
    that half: the encoder's card (its size and channels) is that version's, and an image encoded
    for a decoder that cannot decode it is work for nothing. Where it is only LOADING (a server
    starting, a hot reload) in the halves lacking it, the refusal is a transient UNAVAILABLE, as
    the server answers a call to a version still loading."""
    if version:
        lacking, loading = [], True
        for info in (encoder, decoder):
            found = [v for v in info.versions if v.version == version]
            if found and found[0].state == genserve_pb2.MODEL_STATE_READY:
                continue
            loading = loading and bool(found) and found[0].state == genserve_pb2.MODEL_STATE_LOADING
            reason = f": {found[0].reason}" if found and found[0].reason else ""
            has = f"has it {state_label(found[0].state)}{reason}" if found else f"has no version {version}"
            lacking.append(f"{info.name} {has} (READY: {', '.join(ready_versions(info)) or 'none'})")
        if lacking:
            halves = "; ".join(lacking)
            message = f"edit: --version {version} is not READY in both halves of the VAE: {halves}"
            if loading:
                raise GenserveClientError(grpc.StatusCode.UNAVAILABLE, message)
            raise UsageError(message)
        return version
    enc, dec = ready_versions(encoder), ready_versions(decoder)
    common = [v for v in enc if v in dec]
    if not common and loading_in_both(encoder, decoder):
        raise GenserveClientError(
            grpc.StatusCode.UNAVAILABLE,
            f"edit: {encoder.name} and {decoder.name} have no version READY in both yet (LOADING: "
            f"{encoder.name} {', '.join(loading_versions(encoder)) or 'none'}; "
            f"{decoder.name} {', '.join(loading_versions(decoder)) or 'none'})",
        )
    if not common:
        raise UsageError(
            f"edit: {encoder.name} and {decoder.name} have no version READY in both (READY: "
            f"{encoder.name} {', '.join(enc) or 'none'}; {decoder.name} {', '.join(dec) or 'none'}): "
            "an image is encoded and decoded by one version of the VAE"
        )
    return common[-1]


def through(provenance: Provenance, first: Provenance) -> Provenance:
    """`provenance` of images that went through the model of `first` before (edit: the encoder):
    that model among its used_models, as the server names a style generator's mapping, with its
    weights_sha256 where it has one, and its card_sha256."""
    earlier = ((first.model, first.version, first.model_sha256), *first.used_models)
    weights = ((first.model, first.weights_sha256),) if first.weights_sha256 else ()
    card = ((first.model, first.card_sha256),) if first.card_sha256 else ()
    return dataclasses.replace(
        provenance,
        used_models=(*provenance.used_models, *earlier),
        used_weights_sha256=(*provenance.used_weights_sha256, *weights, *first.used_weights_sha256),
        used_card_sha256=(*provenance.used_card_sha256, *card, *first.used_card_sha256),
    )


# edit's defaults: --dim without --all-dims; --delta without --sweep; the sweep's range and values with it.
EDIT_DIM = 0
EDIT_DELTA = 2.0
EDIT_SWEEP_FROM = -3.0
EDIT_SWEEP_TO = 3.0
EDIT_SWEEP_STEPS = 9


def cmd_edit(client: GenserveClient, args: argparse.Namespace) -> int:
    check_picture_path("edit", "--out", args.out)
    if args.all_dims and not args.sweep:
        # a row per dimension of the sweep grid: without one it would edit z[--dim] alone
        raise UsageError("edit: --all-dims needs --sweep (a row of the sweep grid per latent dimension)")
    # Unset (None) unless given, so that one given where it does nothing is refused, not ignored.
    sweep_flags = (
        ("--sweep-from", args.sweep_from),
        ("--sweep-to", args.sweep_to),
        ("--sweep-steps", args.sweep_steps),
    )
    given = [flag for flag, value in sweep_flags if value is not None]
    if given and not args.sweep:
        raise UsageError(f"edit: {', '.join(given)} shape the --sweep grid: give --sweep, or leave them out")
    if args.sweep and args.delta is not None:
        raise UsageError(
            "edit: --delta is added to z[dim] without --sweep; --sweep sets z[dim] to each value of the "
            "sweep (--sweep-from, --sweep-to, --sweep-steps): leave --delta out"
        )
    if args.all_dims and args.dim is not None:
        raise UsageError(
            "edit: --dim picks the one dimension to move; --sweep --all-dims draws a row for every "
            "dimension: leave --dim out"
        )
    delta = EDIT_DELTA if args.delta is None else args.delta
    dim = EDIT_DIM if args.dim is None else args.dim
    sweep_from = EDIT_SWEEP_FROM if args.sweep_from is None else args.sweep_from
    sweep_to = EDIT_SWEEP_TO if args.sweep_to is None else args.sweep_to
    sweep_steps = EDIT_SWEEP_STEPS if args.sweep_steps is None else args.sweep_steps
    if args.sweep:
        check_sweep_size(sweep_steps + 1, f"--sweep-steps {sweep_steps}")
        for flag, value in (("--sweep-from", sweep_from), ("--sweep-to", sweep_to)):
            if abs(value) > MAX_ABS_LATENT:  # the value as given: `:g` wrote 10000.001 as 10000
                raise UsageError(
                    f"edit: {flag} must be in [-{MAX_ABS_LATENT:g}, {MAX_ABS_LATENT:g}] (the server's "
                    f"bound on latents, |z| <= {MAX_ABS_LATENT:g}), got {value!r}"
                )
    encoder, decoder = vae_names(args.model, [m.name for m in client.list_models()])
    encoder_info, _, version = edit_halves(client, encoder, decoder, args.version)
    picture = load_for_encoder(Path(args.image), encoder_info, version)
    encoded = client.encode(encoder, [picture], version=version)
    mu = encoded.mu[0]
    if not 0 <= dim < mu.shape[0] and not (args.sweep and args.all_dims):
        raise UsageError(f"--dim must be in [0, {mu.shape[0]}), got {dim}")
    if not args.sweep:
        z = mu.copy()
        z[dim] += delta
        if abs(float(z[dim])) > MAX_ABS_LATENT:  # before the decode the server would refuse
            raise UsageError(
                f"edit: --delta {delta!r} takes z[{dim}] from {mu[dim]:.3f} to "
                f"{z[dim]}, past the server's bound on latents, |z| <= {MAX_ABS_LATENT:g}"
            )
        decoded = client.decode(decoder, np.stack([mu, z]), version=version)
        text = png_text(
            through(decoded.provenance, encoded.provenance), source=args.image, dim=dim, delta=delta
        )
        save_picture(decoded.pil()[1], Path(args.out), text)
        _out(f"z[{dim}]: {mu[dim]:.3f} -> {z[dim]:.3f}")
        return 0
    # Latent traversal: each row moves one dimension over the prior's range, the others stay at
    # the image's posterior mean; column 0 repeats the input for reference.
    values = np.linspace(sweep_from, sweep_to, sweep_steps)
    dims = range(mu.shape[0]) if args.all_dims else [dim]
    if args.all_dims:
        cells = len(dims) * (len(values) + 1)
        check_sweep_size(cells, f"--all-dims ({len(dims)} dimensions) x --sweep-steps {len(values)}")
    latents = np.repeat(mu[None, :], len(dims) * len(values), axis=0)
    for r, d in enumerate(dims):
        latents[r * len(values) : (r + 1) * len(values), d] = values
    pics: list[Image.Image] = []
    per_call = images_per_call(client.get_model(decoder, version))  # its queue may hold fewer
    one = OneModel({"version": version})
    for start in range(0, len(latents), per_call):
        part = client.decode(decoder, latents[start : start + per_call], **one.opts)
        one.seen(part.provenance)
        pics += part.pil()
    provenance = through(one.first, encoded.provenance) if one.first is not None else None
    source = Image.fromarray(picture)
    rows = [
        GridRow([source, *pics[r * len(values) : (r + 1) * len(values)]], f"z[{d}]")
        for r, d in enumerate(dims)
    ]
    dims_text = "all" if args.all_dims else str(dim)
    sweep = f"{sweep_from:g}..{sweep_to:g}"
    text = png_text(provenance, source=args.image, dims=dims_text, sweep=sweep, steps=sweep_steps)
    save_picture(make_grid(rows, captions=["input", *(f"={v:.2f}" for v in values)]), Path(args.out), text)
    return 0


# The server encodes the output; the file's suffix picks the format (no re-encoding here).
IMAGE_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def server_reads(head: bytes) -> bool:
    """Whether a file starting with `head` is a PNG, JPEG or WEBP, the encoded images the server
    reads (its codecs.sniff_format)."""
    return head.startswith((PNG_SIGNATURE, b"\xff\xd8\xff")) or (
        head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    )


def picture_for_server(command: str, path: Path) -> Path | bytes:
    """The input of upscale/translate: a PNG, JPEG or WEBP file as it is (its bytes unchanged); any
    other picture Pillow reads (TIFF, BMP, a GIF's first frame), as `edit` reads it, converted as the
    library converts a PIL image and sent as a lossless PNG. A file Pillow cannot identify either
    goes as it is, for the server's refusal to say what it takes."""
    with path.open("rb") as file:
        if server_reads(file.read(16)):
            return path
    try:
        opened: Image.Image = Image.open(path)
    except UnidentifiedImageError:
        return path
    except Image.DecompressionBombError as exc:
        raise UsageError(f"{command}: {path}: {exc}") from None
    with opened:
        try:
            picture = Image.fromarray(_pil_to_uint8(opened))
        except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt
            raise UsageError(f"{command}: {path}: cannot read the picture: {exc}") from None
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return png.getvalue()


def _image_command(
    method: Callable[..., Any], args: argparse.Namespace, settings: dict[str, object], **opts: Any
) -> int:
    """One image through `method`; `settings` are the flags the user gave, written into a PNG's
    text chunks beside the source and provenance (None skipped)."""
    out = Path(args.output)
    check_output(args)
    fmt = IMAGE_SUFFIX_FORMATS[out.suffix.lower()]
    source = picture_for_server(args.command, Path(args.input))
    result = method(args.model, [source], format=fmt, version=args.version, **opts)
    text = png_text(result.provenance, source=args.input, **settings)
    save_image_bytes(out, with_png_text(result.raw[0], text))
    with Image.open(io.BytesIO(result.raw[0])) as picture:
        size = f"{picture.width}x{picture.height}"
    count = result.tiles[0] if result.tiles else 0
    tiles = f", {count} tile{'' if count == 1 else 's'}" if result.tiles else ""
    _out(f"wrote {out} ({size}{tiles})")
    return 0


def check_output(args: argparse.Namespace) -> None:
    """upscale's and translate's OUTPUT, before any call: a suffix naming a format the server
    encodes (anything else would get PNG bytes under a misleading name, big.tiff), in a folder
    that is no file (check_folder)."""
    out = Path(args.output)
    if out.suffix.lower() not in IMAGE_SUFFIX_FORMATS:
        raise UsageError(
            f"{args.command}: output {str(out)!r} must end in one of {' '.join(IMAGE_SUFFIX_FORMATS)}"
        )
    check_folder(args.command, "output", args.output, out.parent)


def cmd_upscale(client: GenserveClient, args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {"tile_size": args.tile_size}
    if args.tile_overlap is not None:
        opts["tile_overlap"] = args.tile_overlap
    settings = {"tile_size": args.tile_size or None, "tile_overlap": args.tile_overlap}
    return _image_command(client.super_resolve, args, settings, **opts)


def cmd_translate(client: GenserveClient, args: argparse.Namespace) -> int:
    # Unset means a_to_b (the request's default); the PNG records the direction only when given.
    direction = args.direction or "a_to_b"
    check_output(args)  # before the GetModel below, as before the translation
    if direction == "b_to_a":
        # Only a two_way_translator has B -> A. A server older than ImageRequest.direction (and than
        # that kind) ignores the field and translates A -> B: ask the kind instead of trusting it.
        kind = client.get_model(args.model, args.version).kind
        if kind != TWO_WAY_TRANSLATOR:
            raise UsageError(
                f"translate: --direction b_to_a needs a {TWO_WAY_TRANSLATOR} model; {args.model} is "
                f"{kind or 'of an unknown kind'}, which translates a_to_b only"
            )
    return _image_command(client.translate, args, {"direction": args.direction}, direction=direction)


# Settings that decide a bulk job's output: `--resume DIR` takes them from DIR/job.json.
BULK_JOB_FLAGS = ("model", "version", "seed", "labels", "format", "psi", "shard")


def check_bulk_seeds(n: int, base_seed: int, *, resumed: bool) -> None:
    """Refuse an --n or --seed the job's requests cannot carry, before any call: image i uses seed
    base_seed + i, seeds are in [0, 2^63), and a stream's count is a uint32."""
    if n >= UINT32_LIMIT:
        raise UsageError(f"bulk: --n must be below 2^32 = {UINT32_LIMIT}, got {n}")
    if 0 <= base_seed <= SEED_LIMIT - n:
        return
    if resumed:
        raise UsageError(
            f"bulk: --n {n} takes the job's seeds past 2^63 - 1 (its base seed is {base_seed}): "
            f"--n can be at most {SEED_LIMIT - base_seed}"
        )
    raise UsageError(
        f"bulk: --seed must be in [0, 2^63 - n] = [0, {SEED_LIMIT - n}] for --n {n} (image i uses "
        f"seed + i, and seeds are below 2^63), got {base_seed}"
    )


def bulk_model_info(
    client: GenserveClient, args: argparse.Namespace, window: RetryWindow
) -> genserve_pb2.ModelInfo:
    """GetModel's answer for the job's --model and --version (that version's kind and class names,
    not those of the version served by default); a model or version it does not serve is refused."""
    try:
        # A version the job would pin still LOADING is waited for: labels and version of one answer.
        return window.call(lambda: model_answer(client, args.model, args.version or ""))
    except VersionNotServed as exc:
        served = f"(served: {exc.served})"
        raise UsageError(
            f"bulk: --version {args.version!r}: model {args.model!r} has no such version {served}"
        ) from None
    except GenserveClientError as exc:
        if exc.code != grpc.StatusCode.NOT_FOUND:
            raise
        # A model the server does not serve is a bad argument, as a version it does not serve.
        rid = f" (request id {exc.request_id})" if exc.request_id else ""  # as refusals print
        raise UsageError(f"bulk: --model {args.model!r}: {exc.details}{rid}") from None


def bulk_params(
    client: GenserveClient, args: argparse.Namespace
) -> tuple[BulkParams, Path, Shard | None, genserve_pb2.ModelInfo | None]:
    """The job's parameters, folder and shard: from the flags, or from the manifest with --resume;
    and the GetModel answer the labels were resolved from (None with --resume), which the job pins
    its version from."""
    if not (math.isfinite(args.retry_window) and args.retry_window >= 0):
        raise UsageError(f"bulk: --retry-window must be finite and >= 0 seconds, got {args.retry_window:g}")
    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise UsageError(f"bulk: --resume {args.resume} and --out {args.out} name two folders")
        given = [flag for flag in BULK_JOB_FLAGS if getattr(args, flag) is not None]
        if given:
            flags = ", ".join(f"--{flag}" for flag in given)
            raise UsageError(
                f"bulk: --resume takes the job's settings from {out / JOB_FILE}: drop {flags} "
                "(only --n, to grow the job, and how it runs may be given)"
            )
        params, shard = load_params(out)
        if args.n is not None:
            check_bulk_seeds(args.n, params.base_seed, resumed=True)
            params = dataclasses.replace(params, n=args.n)
        return params, out, shard, None
    missing = [f"--{flag}" for flag in ("model", "n", "out") if getattr(args, flag) is None]
    if missing:
        raise UsageError(f"bulk needs {', '.join(missing)} (or --resume DIR for an existing job)")
    if args.n < 1:
        raise UsageError(f"bulk: --n must be >= 1, got {args.n}")
    check_bulk_seeds(args.n, args.seed if args.seed is not None else 0, resumed=False)
    shard = Shard.parse(args.shard) if args.shard else None  # before any call
    # A server that is restarting when the job starts is waited for like one that restarts later.
    window = RetryWindow(args.retry_window, client.retry.retryable_codes, threading.Event())
    info = bulk_model_info(client, args, window)
    refusal = kind_refusal(args.model, info.kind, cli=True)
    if refusal:
        # Its streams would be refused for the kind, once the job's folder was made: say so before.
        raise UsageError(refusal)
    labels = resolve_labels(info, args.labels, "bulk") if info.kind == CONDITIONAL or args.labels else []
    params = BulkParams(
        model=args.model,
        n=args.n,
        base_seed=args.seed if args.seed is not None else 0,
        labels=tuple(labels),
        format=args.format or "png",
        psi=args.psi,
        version=args.version or "",
    )
    out = Path(args.out)
    return params, shard.folder(out) if shard else out, shard, info


# The variable the resume hint puts where a literal --token went (its value is never printed).
TOKEN_VARIABLE = "GENSERVE_TOKEN"


def resume_command(args: argparse.Namespace, out: Path, n: int | None = None) -> str:
    """The exact command that resumes the job in `out` (a token is never printed); `n`: the job's
    size where job.json does not hold it yet (a grown job whose new range the server has not
    accepted a chunk of: bulk.BulkJob writes job.json then)."""
    words = ["genserve-client", "--target", args.target]
    if args.timeout != DEFAULT_TIMEOUT_S:
        words += ["--timeout", f"{args.timeout:g}"]
    if args.token_file:
        words += ["--token-file", args.token_file]
    elif args.token:
        words += ["--token", "$GENSERVE_TOKEN"]
    for flag in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
        if getattr(args, flag):
            words += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    if args.tls and not args.tls_ca:
        words.append("--tls")
    words += ["bulk", "--resume", str(out)]
    if n is not None:
        words += ["--n", str(n)]
    if args.concurrency != 1:
        words += ["--concurrency", str(args.concurrency)]
    if args.chunk_size:
        words += ["--chunk-size", str(args.chunk_size)]
    if args.stream_images is not None:
        words += ["--stream-images", str(args.stream_images)]
    if args.retry_window != DEFAULT_RETRY_WINDOW_S:
        words += ["--retry-window", f"{args.retry_window:g}"]
    command = shlex.join(words)
    return command.replace("'$GENSERVE_TOKEN'", '"$GENSERVE_TOKEN"')


def _job_on_disk(out: Path) -> dict[str, Any] | None:
    """out's job.json for the resume hint after a failure; None when there is none or it cannot be
    read (the failure itself is what the user is told)."""
    try:
        return read_job(out)
    except (BulkError, OSError):
        return None


def _not_writable(exc: BaseException, out: Path) -> bool:
    """`exc` is a write refused in the job folder: its permissions, or a read-only filesystem."""
    return (
        isinstance(exc, OSError)
        and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        and (exc.filename is None or Path(exc.filename).is_relative_to(out))
    )


def cmd_bulk(client: GenserveClient, args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError(f"bulk: --concurrency must be >= 1, got {args.concurrency}")
    if args.concurrency > MAX_BULK_CONCURRENCY:
        raise UsageError(
            f"bulk: --concurrency must be at most {MAX_BULK_CONCURRENCY} (4 servers' default "
            f"max_concurrent_rpcs), got {args.concurrency}"
        )
    if args.stream_images is not None and args.stream_images < 1:
        raise UsageError(f"bulk: --stream-images must be >= 1, got {args.stream_images}")
    if not 0 <= args.chunk_size < UINT32_LIMIT:
        # Checked before the job starts, as every flag is: a value the server refuses ends the job.
        raise UsageError(
            f"bulk: --chunk-size must be 0 (the server's default) or 1..{UINT32_LIMIT - 1} images "
            f"(the server takes at most its max_images_per_request), got {args.chunk_size}"
        )
    params, out, shard, info = bulk_params(client, args)
    job = BulkJob(
        client,
        params,
        out,
        concurrency=args.concurrency,
        chunk_size=args.chunk_size,
        verify=args.verify,
        retry_window_s=args.retry_window,
        shard=shard,
        stream_images=args.stream_images,
        cli=True,
    )
    try:
        job.run(info=info)
    except BulkBusy as exc:
        _err(f"genserve-client: {exc}")
        return 3
    except (GenserveClientError, BulkRetryExhausted, BulkIncomplete, OSError, KeyboardInterrupt) as exc:
        # Final, but what is on disk is consistent: say how to go on.
        if isinstance(exc, KeyboardInterrupt):
            say_stop(exc, _err)  # a second Ctrl-C from now on ends the process at once
        else:
            _err(f"genserve-client: {_error_text(exc)}")
        rejected = isinstance(exc, GenserveClientError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT
        on_disk = _job_on_disk(out)
        if on_disk is not None and _not_writable(exc, out):
            # The same command would fail the same way: say what is wrong, and what works as is.
            _err(
                f"genserve-client: {out} is not writable: a bulk run writes its lock, manifest and "
                f"images there; make it writable to resume the job, or check its images read-only "
                f"with: genserve-client verify {shlex.quote(str(out))}"
            )
        elif on_disk is not None and not rejected:
            grown = params.n if on_disk["params"].get("n") != params.n else None
            _err(f"genserve-client: the job is resumable: {resume_command(args, out, grown)}")
            if args.token and not args.token_file:  # the hint names a variable the CLI does not read
                _err(f"genserve-client: set {TOKEN_VARIABLE} to the token given with --token first")
        elif on_disk is None and job.job_file_written:
            # It wrote job.json (and images) there, and it is gone: the folder was moved or removed.
            _err(
                f"genserve-client: {out / JOB_FILE} is gone: the job's folder was moved or removed while "
                "it ran; resume it where it is now with `bulk --resume DIR`, or start it again in a new --out"
            )
        elif on_disk is None and not rejected and not _not_writable(exc, out):
            # No job.json yet (written at the first chunk the server accepts): nothing to --resume, and
            # what it left (the lock, an empty manifest) does not stop the same command.
            _err("genserve-client: no image of the job was written: run the same command again to start it")
        if isinstance(exc, KeyboardInterrupt):
            return stop_status(exc)
        return 2 if rejected else 1
    what = f"shard {shard.index}/{shard.count}, images [{job.lo}, {job.hi}) of {params.n}" if shard else ""
    _out(f"{out}: {what or f'{params.n} images'}, manifest {out / 'manifest.jsonl'}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the folders hold exactly the job, 1 with the problems listed otherwise (2, from
    main: a DIR that is no job folder, a bad argument)."""
    roots = [Path(d) for d in args.dirs]
    report, merged = verify_job(roots, hashes=args.hashes)
    where = " + ".join(map(str, roots))
    for problem in report.problems:
        _err(f"genserve-client: verify: {problem}")
    if not report.ok:
        _err(
            f"genserve-client: verify: {where} is NOT the complete job ({report.images} of {report.n} images)"
        )
        return 1
    if args.manifest_out:
        write_merged_manifest(Path(args.manifest_out), merged)
    checked = "files and sha256 checked" if args.hashes else "files checked"
    _out(f"{where}: complete, {report.n} images in {len(report.folders)} folder(s), {checked}")
    return 0


async def _bench(config: ChannelConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    payloads = PayloadFactory(args.model, version=args.version, labels=args.labels or (), fmt=args.format)
    gen = LoadGenerator(config, payloads, channels=args.channels, timeout_s=args.timeout)
    try:
        closed = not args.rate or args.closed_too
        if args.warmup > 0:
            # Open loops alone: no more calls in flight than --max-outstanding, which may be set
            # low to protect the server (the largest --concurrency is 64 by default).
            warmup_workers = (
                max(args.concurrency) if closed else min(max(args.concurrency), args.max_outstanding)
            )
            await gen.closed_loop(warmup_workers, args.warmup)
        results = []
        if closed:
            for c in args.concurrency:
                results.append(await gen.closed_loop(c, args.duration))
        for rate in args.rate or ():
            results.append(
                await gen.open_loop(
                    rate,
                    args.duration,
                    max_outstanding=args.max_outstanding,
                    poisson=args.arrivals == "poisson",
                )
            )
    finally:
        await gen.close()
    if not args.json:
        _out(format_table(results))
    return [r.to_json() for r in results]


def check_bench_args(args: argparse.Namespace) -> None:
    """Refuse settings the load generator cannot run: a rate of 0 divides by zero, a negative or
    NaN rate never ends, a run without workers or time measures nothing."""
    for rate in args.rate or ():
        if not (math.isfinite(rate) and rate > 0):
            raise UsageError(f"bench: --rate values must be finite and > 0, got {rate:g}")
        if rate > MAX_BENCH_RATE:
            raise UsageError(
                f"bench: --rate values must be at most {MAX_BENCH_RATE} per second (more than one "
                f"client loop can send), got {rate:g}"
            )
    if not args.concurrency or min(args.concurrency) < 1:
        raise UsageError(f"bench: --concurrency values must be >= 1, got {args.concurrency}")
    if max(args.concurrency) > MAX_BENCH_CONCURRENCY:
        raise UsageError(
            f"bench: --concurrency values must be at most {MAX_BENCH_CONCURRENCY} (4 servers' default "
            f"max_concurrent_rpcs), got {max(args.concurrency)}"
        )
    if not (math.isfinite(args.duration) and args.duration > 0):
        raise UsageError(f"bench: --duration must be finite and > 0, got {args.duration:g}")
    if not (math.isfinite(args.warmup) and args.warmup >= 0):
        raise UsageError(f"bench: --warmup must be finite and >= 0, got {args.warmup:g}")
    if args.max_outstanding < 1:
        raise UsageError(f"bench: --max-outstanding must be >= 1, got {args.max_outstanding}")
    if args.channels < 1:
        raise UsageError(f"bench: --channels must be >= 1, got {args.channels}")
    if args.channels > MAX_BENCH_CHANNELS:
        raise UsageError(
            f"bench: --channels must be at most {MAX_BENCH_CHANNELS} (a connection each), got {args.channels}"
        )


def cmd_bench(config: ChannelConfig, args: argparse.Namespace) -> int:
    check_bench_args(args)
    with GenserveClient(config, timeout_s=args.timeout) as client:
        info = client.get_model(args.model, args.version)
    if not args.labels:
        args.labels = resolve_labels(info, None)  # all classes if conditional
    else:
        args.labels = class_indices(info, args.labels, "bench: --labels")
        # Every call would be refused INVALID_ARGUMENT: the run would measure nothing.
        check_classes("bench", "--labels", info, args.labels)
    try:
        results = run_async(_bench(config, args))  # SIGTERM cancels it as Ctrl-C does
    except StreamsRefused as exc:  # --concurrency over too few --channels for this server
        raise UsageError(f"bench: {exc}") from None
    if args.json:
        _out(json.dumps(results, indent=2))
    # A run where nothing succeeded measured nothing: fail so scripts and CI notice.
    failed = [r for r in results if r["images"] == 0]
    for r in failed:
        conc = f"rate {r['rate']:g}" if r["rate"] is not None else f"concurrency {r['concurrency']}"
        if r["requests"] == 0 and not r["errors"]:
            # An open loop too sparse for its window drew no arrival: nothing failed, nothing ran.
            _err(
                f"genserve-client: bench: no request was sent at {r['mode']} {conc}: no arrival "
                f"within --duration {args.duration:g} s (rate x duration = "
                f"{r['rate'] * args.duration:g}); raise --rate or --duration"
            )
            continue
        reasons = "".join(f"; {code}: {msg}" for code, msg in r["error_messages"].items() if msg)
        _err(
            f"genserve-client: bench: no successful request at {r['mode']} {conc} "
            f"(errors: {r['errors']}{reasons})"
        )
    return 1 if failed else 0


# --- parser -----------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, "", argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(HelpParser):
    """--help's text goes to stdout as every other line does (_out): a reader gone or a closed
    stdout is found (main)."""

    stdout = _STDOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A value that starts with '-' and a digit (or '-.' and a digit) is a negative number, as
        # Python 3.13's argparse reads it: before 3.13 only -3 and -0.5 were, and `--delta -1e-3`
        # was refused 'expected one argument'. No flag of this CLI looks like a number.
        self._negative_number_matcher = re.compile(r"^-\.?\d")


def _package_version() -> str:
    """The installed genserve-client's version, else the package's own (a checkout on PYTHONPATH)."""
    try:
        return importlib.metadata.version("genserve-client")
    except importlib.metadata.PackageNotFoundError:
        import genserve_client

        return genserve_client.__version__


class _TokenSource(argparse.Action):
    """--token and --token-file are one setting, the bearer token: the one given last wins (after
    the command too, where the subcommand's namespace is copied over the main one's), the other is
    cleared."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        namespace.token = values if self.dest == "token" else None
        namespace.token_file = values if self.dest == "token_file" else None


def _add_connection(p: argparse.ArgumentParser, *, after_command: bool) -> None:
    """Connection flags. After the command their defaults are SUPPRESS, so a flag given before the
    command is not overwritten by the subcommand's default."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    g = p.add_argument_group("connection (before or after the command)")
    g.add_argument(
        "--target",
        default=default(os.environ.get(TARGET_ENV) or DEFAULT_TARGET),
        help="server host:port; replicas as a list host:port,host:port,... or a DNS name with one address "
        "per replica (dns:///genserve-headless:50051): calls are spread over all of them (round_robin) "
        f"(default: ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--timeout",
        type=parse_timeout,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"deadline of each unary call in seconds (default: {DEFAULT_TIMEOUT_S:g}); bulk's streams have "
        "none: one that sends nothing for max(120 s, 5x the job's slowest chunk) is cancelled and resumed",
    )
    g.add_argument(
        "--token",
        action=_TokenSource,
        default=default(None),
        help="bearer token (sent as `authorization: Bearer <token>`; it or --token-file, the last given)",
    )
    g.add_argument(
        "--token-file",
        action=_TokenSource,
        type=nonempty_path_text,
        default=default(None),
        help="file holding the bearer token (one; blank and `#` comment lines skipped)",
    )
    g.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="use TLS with the system's root certificates",
    )
    g.add_argument(
        "--tls-ca",
        type=nonempty_path_text,
        default=default(None),
        help="PEM root certificates (implies --tls)",
    )
    g.add_argument(
        "--tls-cert", type=nonempty_path_text, default=default(None), help="PEM client certificate for mTLS"
    )
    g.add_argument(
        "--tls-key", type=nonempty_path_text, default=default(None), help="PEM client key for mTLS"
    )
    g.add_argument("--tls-server-name", default=default(None), help="expected server name in its certificate")


def _add_model(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model name as in `models`")
    p.add_argument("--version", default="", help="model version (default: the highest ready)")


def _add_format(p: argparse.ArgumentParser, choices: Sequence[str] = ("png", "jpeg", "webp", "raw")) -> None:
    p.add_argument("--format", default="png", choices=choices, help="image format on the wire")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="genserve-client",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok; 1 a failed call, I/O error, an unfinished bulk job or an incomplete "
        "verify; 2 a rejected request, an unknown model or version, or bad arguments; 3 the bulk job "
        "folder is in use; 130 interrupted; 143 stopped by SIGTERM (docs/client.md)",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"genserve-client {_package_version()}",
        help="print the version (a command's own --version is the model version)",
    )
    _add_connection(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, *, connects: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if connects:  # verify reads folders only: no connection flag of its own
            _add_connection(p, after_command=True)
        return p

    command("models", "table of models, kinds, versions and readiness")

    p = command("sample", "draw images; --grid shows one labelled row per class")
    _add_model(p)
    p.add_argument(
        "--label",
        type=parse_label,
        help="one class for all images: its index, or its class name",
    )
    p.add_argument(
        "--labels",
        type=parse_labels,
        help="classes, indices or class names, e.g. 0,1,2 or Dress,Coat, or `all` (default for "
        "conditional models: all)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=8,
        help=f"images (per class for conditional models; at most {MAX_SAMPLE_IMAGES} in all)",
    )
    p.add_argument(
        "--seed", type=parse_seed, help="first seed (image j uses seed + j); default random, and printed"
    )
    # A code prior has no truncation (SampleCodes takes none): the CLI refuses --psi there.
    p.add_argument("--psi", type=parse_float32, help=PSI_HELP.removesuffix(")") + "; not for code priors)")
    p.add_argument(
        "--temperature",
        type=parse_float32,
        help="code priors: softmax temperature (default: the model's, config.json sampling)",
    )
    p.add_argument(
        "--top-k",
        type=parse_uint32,
        help="code priors: sample among the k likeliest codes (0: the model's default, normally all)",
    )
    p.add_argument(
        "--top-temperature",
        type=parse_float32,
        help="two-level code priors: the top level's own temperature (default: --temperature, else "
        "the top prior's config.json sampling); a PNG's top_temperature replays it",
    )
    p.add_argument(
        "--top-top-k",
        type=parse_uint32,
        help="two-level code priors: the top level's own top-k (0: --top-k, else the top prior's default)",
    )
    p.add_argument(
        "--progress",
        type=nonempty_path_text,
        metavar="FILE.png",
        help="code priors: stream previews into this strip as the prior fills the grids (one call)",
    )
    p.add_argument(
        "--cols",
        type=parse_positive,
        help="--grid columns of a model without classes (default: square; a conditional model's grid "
        "has a row per class, and refuses it)",
    )
    _add_format(p)
    p.add_argument("--out", type=nonempty_path_text, help="directory for the images")
    p.add_argument(
        "--grid",
        type=nonempty_path_text,
        help=f"PNG file for an image grid (at most {MAX_GRID_IMAGES} images)",
    )

    p = command("interpolate", "a latent path between two seeds, as a strip")
    _add_model(p)
    p.add_argument("--from-seed", type=parse_seed, required=True)
    p.add_argument("--to-seed", type=parse_seed, required=True)
    p.add_argument("--steps", type=parse_uint32, default=10, help="images on the path")
    p.add_argument(
        "--mode",
        choices=("slerp", "lerp"),
        help="path through latent space (default: slerp in z; a style generator's: a line in w space)",
    )
    p.add_argument(
        "--label",
        type=parse_label_list,
        help="class of the path, or two classes (start,end), by index or name",
    )
    p.add_argument("--psi", type=parse_float32, help=PSI_HELP)
    _add_format(p)
    p.add_argument("--out", type=nonempty_path_text, help="directory for the images")
    p.add_argument("--grid", type=nonempty_path_text, help="PNG file for the strip")

    p = command(
        "mix",
        "style-mixing grid of a style generator: coarse layers from each row's seed, fine from each column's",
    )
    _add_model(p)
    p.add_argument("--rows", type=parse_seeds, required=True, help="seeds of the coarse styles, one row each")
    p.add_argument(
        "--cols", type=parse_seeds, required=True, help="seeds of the fine styles, one column each"
    )
    p.add_argument(
        "--crossover",
        type=parse_uint32,
        help="first fine layer, 0 < crossover < num_layers (default: the card's mix_crossover, else "
        "num_layers // 2)",
    )
    p.add_argument(
        "--psi",
        type=parse_float32,
        help="truncation in w space, 0..10: 0 = the mean w, 1 = none, above 1 away from it (default: none)",
    )
    _add_format(p)
    p.add_argument("--grid", type=nonempty_path_text, required=True, help="PNG file for the grid")

    p = command("arithmetic", "mean(A) - mean(B) + mean(C) in latent space")
    _add_model(p)
    for name in ("a", "b", "c"):
        p.add_argument(f"--{name}", type=parse_seeds, required=True, help=f"seeds of set {name.upper()}")
    p.add_argument("--label", type=parse_label, help="class for conditional models (index or name)")
    p.add_argument("--psi", type=parse_float32, help=PSI_HELP)
    _add_format(p)
    p.add_argument(
        "--grid", type=nonempty_path_text, required=True, help=f"PNG file (at most {MAX_GRID_IMAGES} images)"
    )

    p = command("edit", "VAE: encode an image, move one latent dimension, decode")
    p.add_argument("image", type=nonempty_path_text)
    p.add_argument("--model", required=True, help="VAE base name (X for X-encoder/X-decoder) or either part")
    p.add_argument(
        "--version",
        default="",
        help="version of both the encoder and the decoder, the halves of one VAE being exported as one "
        "version (default: the highest version ready in both)",
    )
    p.add_argument(
        "--dim", type=int, help=f"latent dimension to move; not with --all-dims (default: {EDIT_DIM})"
    )
    p.add_argument(
        "--delta", type=parse_float32, help=f"added to z[dim]; not with --sweep (default: {EDIT_DELTA})"
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="grid of z[dim] set to each value of the sweep, captioned =VALUE (--delta is what adds)",
    )
    p.add_argument("--all-dims", action="store_true", help="with --sweep: one row per latent dimension")
    # --delta and the sweep's flags default to unset (cmd_edit fills in these): one given where it does
    # nothing is refused.
    p.add_argument(
        "--sweep-from",
        type=parse_float32,
        help=f"with --sweep: first value of the sweep (default: {EDIT_SWEEP_FROM})",
    )
    p.add_argument(
        "--sweep-to",
        type=parse_float32,
        help=f"with --sweep: last value of the sweep (default: {EDIT_SWEEP_TO})",
    )
    p.add_argument(
        "--sweep-steps",
        type=parse_positive,
        help=f"with --sweep: values in the sweep (default: {EDIT_SWEEP_STEPS})",
    )
    p.add_argument(
        "--out", type=nonempty_path_text, required=True, help="PNG file (the edited image, or the sweep grid)"
    )

    for name, help_text in (("upscale", "super-resolution"), ("translate", "image-to-image translation")):
        p = command(name, help_text)
        p.add_argument("input", type=nonempty_path_text)
        p.add_argument(
            "output", type=nonempty_path_text, help="PNG/JPEG/WEBP by suffix: .png, .jpg, .jpeg or .webp"
        )
        _add_model(p)
        if name == "upscale":
            p.add_argument(
                "--tile-size",
                type=parse_uint32,
                default=0,
                help="input tile size (0: the server picks the card's tile_size, 128 without one, "
                "enlarged to at least 4 x the tile overlap, at most 1024; a model of one input size, "
                "its card's image_size, takes each image whole as one tile of that size, and refuses "
                "a smaller tile size)",
            )
            p.add_argument(
                "--tile-overlap",
                type=parse_uint32,
                help="tile overlap in input pixels (default: the server's; unused by a model of one "
                "input size)",
            )
        else:
            p.add_argument(
                "--direction",
                choices=tuple(DIRECTIONS),
                help="a two_way_translator's direction between its card's domains [A, B] (default "
                "a_to_b; a one-way image_to_image model has a_to_b only)",
            )

    p = command("bulk", "resumable production batch over SampleStream")
    p.add_argument(
        "--resume",
        type=nonempty_path_text,
        metavar="DIR",
        help="resume (or, with a larger --n, grow) the job in DIR with the settings in its job.json",
    )
    p.add_argument("--model", help="model name as in `models` (required without --resume)")
    p.add_argument("--version", help="model version (default: the highest ready, pinned in job.json)")
    p.add_argument("--n", type=int, help="images in the job (required without --resume; larger grows a job)")
    p.add_argument(
        "--out",
        type=nonempty_path_text,
        help="job directory (job.json, manifest.jsonl, images/): new, empty or one of its own jobs",
    )
    p.add_argument(
        "--labels",
        type=parse_labels,
        help="`all` or classes (indices or names) 0,1,...: image i gets labels[i %% len] (default: all "
        "classes of a conditional model)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help=(
            "parallel streams (with replicas: at least one per replica, so that each gets work; "
            f"at most {MAX_BULK_CONCURRENCY})"
        ),
    )
    p.add_argument(
        "--stream-images",
        type=int,
        metavar="N",
        help=f"images per stream (default {DEFAULT_STREAM_IMAGES}, or the server's max_stream_images "
        "where smaller; more than it is refused); each new stream goes to the next replica of --target",
    )
    p.add_argument("--seed", type=int, help="base seed: image i uses seed + i (default: 0)")
    p.add_argument("--chunk-size", type=int, default=0, help="images per streamed chunk (0: server default)")
    p.add_argument("--psi", type=parse_float32, help=PSI_HELP)
    p.add_argument("--verify", action="store_true", help="re-hash every listed file on start")
    p.add_argument(
        "--retry-window",
        type=float,
        default=DEFAULT_RETRY_WINDOW_S,
        metavar="SECONDS",
        help="keep retrying transient errors (a server restart) this long without progress",
    )
    p.add_argument("--format", choices=("png", "jpeg", "webp"), help="image file format (default: png)")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help=f"run shard I of N (a contiguous seed range) in OUT/shard-0000I-of-0000N/ (5 digits each); "
        f"`N` alone takes I from ${SHARD_ENV} (Kubernetes Indexed Job); check the union with `verify OUT`",
    )

    p = command(
        "verify", "check a bulk job's folder(s) hold exactly the job, each image once", connects=False
    )
    p.add_argument(
        "dirs",
        nargs="+",
        type=nonempty_path_text,
        metavar="DIR",
        help="job folder, the --out of a sharded job, or shard folders (several: their union is checked)",
    )
    p.add_argument("--hashes", action="store_true", help="also re-hash every file against its manifest line")
    p.add_argument(
        "--manifest-out",
        type=nonempty_path_text,
        metavar="FILE",
        help="when complete, write the merged manifest here (files relative to the DIR, or to the DIRs'"
        " common folder)",
    )

    p = command("bench", "load generator: closed loop per concurrency, open loop per rate")
    _add_model(p)
    p.add_argument(
        "--concurrency",
        type=parse_ints,
        default=[1, 8, 32, 64],
        help=f"closed-loop workers (at most {MAX_BENCH_CONCURRENCY})",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before the first run")
    p.add_argument(
        "--rate", type=parse_floats, help=f"open loop at these rates (requests/s, at most {MAX_BENCH_RATE})"
    )
    p.add_argument("--closed-too", action="store_true", help="with --rate: also run the closed loops")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson", help="open-loop arrivals")
    p.add_argument("--max-outstanding", type=int, default=256, help="open loop: bound on calls in flight")
    p.add_argument(
        "--labels",
        type=parse_label_list,
        help="classes to cycle through, indices or names (conditional models)",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=1,
        help=f"gRPC channels (HTTP/2 connections, at most {MAX_BENCH_CHANNELS})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list instead of the table (one object per level, its fields in "
        "docs/client.md: errors counts failed calls by code and open-loop arrivals not sent "
        "(CLIENT_BACKLOG), error_messages the server's first message for each)",
    )
    _add_format(p, ("raw", "png", "jpeg", "webp"))
    return parser


def channel_config(args: argparse.Namespace) -> ChannelConfig:
    token = args.token
    if args.token_file:  # the one of --token and --token-file given last (_TokenSource)
        token = read_token_file(args.token_file)
    elif token and (problem := token_problem(token)) is not None:
        raise UsageError(f"--token: {problem}")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
        tls = TlsOptions.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    return ChannelConfig(args.target, tls=tls, token=token)


COMMANDS: dict[str, Callable[[GenserveClient, argparse.Namespace], int]] = {
    "models": cmd_models,
    "sample": cmd_sample,
    "interpolate": cmd_interpolate,
    "mix": cmd_mix,
    "arithmetic": cmd_arithmetic,
    "edit": cmd_edit,
    "upscale": cmd_upscale,
    "translate": cmd_translate,
    "bulk": cmd_bulk,
}


def _say_tls_hint(args: argparse.Namespace, exc: GenserveClientError) -> None:
    """A plaintext call that failed 'Socket closed' (after its retries) to a server that speaks TLS
    reads as a restart: say so, after one cheap handshake with the target (docs/client.md)."""
    tls_flags = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")
    plaintext = not any(getattr(args, flag, None) for flag in tls_flags)  # as channel_config reads them
    if plaintext and exc.code == grpc.StatusCode.UNAVAILABLE and "socket closed" in exc.details.lower():
        hint = tls_hint(getattr(args, "target", None) or "")
        if hint is not None:
            _err(f"genserve-client: {hint}")


def main(argv: Sequence[str] | None = None) -> int:
    # Each run answers for its own stdout: a process may run main() more than once (a test, a
    # program embedding the CLI), and one run's reader gone or closed stdout is not the next's.
    _STDOUT.reader_gone = _STDOUT.closed = False
    reset()  # nor is one run's stop the next's
    try:
        status = _main(argv)
    except SystemExit as exc:  # argparse ends in parse_args: --help's text is on stdout, as below
        if exc.code != 0:  # a usage error, on stderr
            raise
        status = 0
    closed = "genserve-client: write error: stdout is closed: its output was not printed"
    status = _STDOUT.exit_status(status, closed)
    if argv is not None:
        # Called with arguments from a program (a test suite, a program running a command in its
        # own process): the Ctrl-C was the program's. The command stopped through its cleanup with
        # its line; its KeyboardInterrupt goes on to the program, not lost in a returned 130 (a
        # SIGTERM is __main__.main(argv)'s to pass on: it took SIGTERM over).
        pass_on(first_stop(), sigterm=False)
    return status


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "verify":  # no server: connection flags before it are not even checked
            return cmd_verify(args)
        config = channel_config(args)
        if args.command == "bench":
            return cmd_bench(config, args)
        retry = BULK_RETRY if args.command == "bulk" else RetryPolicy()
        with GenserveClient(config, timeout_s=args.timeout, retry=retry) as client:
            return COMMANDS[args.command](client, args)
    except GenserveClientError as exc:
        _err(f"genserve-client: {exc}")
        _say_tls_hint(args, exc)
        # A model or version the server does not serve (NOT_FOUND) is a bad argument, as in bulk.
        return 2 if exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND) else 1
    except BulkRetryExhausted as exc:  # transient errors outlasted --retry-window
        _err(f"genserve-client: {exc}")
        if isinstance(exc.__cause__, GenserveClientError):  # the last error, as for other commands
            _say_tls_hint(args, exc.__cause__)
        return 1
    except BrokenPipeError:  # a write to stdout outside _out
        _STDOUT.lose()
        return READER_GONE_STATUS
    except (UsageError, BulkError, ValueError) as exc:
        _err(f"genserve-client: {exc}")
        return 2
    except OSError as exc:
        _err(f"genserve-client: {_error_text(exc)}")
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated) from genserve_client/__main__.py
        say_stop(exc, _err)
        return stop_status(exc)
