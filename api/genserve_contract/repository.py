"""Repository-wide rules: names, versions, the card format, fp32/fp16 tolerances and file digests."""

from __future__ import annotations

import errno
import hashlib
import math
import mmap
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

# A model directory name (what clients send) and a version directory name.
NAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9-]*\Z")  # \Z: `$` also matches before a final newline
# The rule as messages name it (the regex's anchors say nothing to a reader).
NAME_RULE: Final = "[a-z0-9][a-z0-9-]*"
# Names NAME_PATTERN matches that are no model's: a model's grpc.health key is its name, and these are
# the server's own keys (`liveness`: Kubernetes' startup and liveness probes).
RESERVED_NAMES: Final = frozenset({"liveness"})
VERSION_PATTERN: Final = re.compile(r"^[1-9][0-9]*\Z")
CARD_FORMAT_VERSION: Final = 1
# Largest |ONNX - PyTorch| export accepts for model.onnx.
FP32_ATOL: Final = 1e-4
# Largest |fp16 - fp32| for model.fp16.onnx: export writes it only within this, and the server's
# load-time check serves fp32 beyond it (config.json runtime.fp16_atol may change the latter).
FP16_ATOL: Final = 1e-2
# card.json's optional field of the image kinds (super_resolution, image_to_image, two_way_translator):
# the bytes the graph's intermediate tensors hold at their peak in one call, per value of its output
# (C x H x W), as export counts them from the graph (genserve_export.activations.card_activation_bytes). The
# server sizes a call's working set on the CPU provider from it; absent (older cards): a constant.
ACTIVATION_BYTES_FIELD: Final = "activation_bytes_per_output_value"


def activation_bytes_problem(value: Any) -> str | None:
    """What is wrong with a card's ACTIVATION_BYTES_FIELD: None where it is absent (null) or a finite
    number > 0, else what it must be."""
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        return f"must be a finite number > 0 (bytes per output value) or null, got {value!r}"
    return None


def latest_version_dir(entry: Path) -> Path | None:
    """The highest-numbered version directory of a repository entry that holds a ``model.onnx``
    (None if there is none)."""
    if not entry.is_dir():
        return None
    versions = [p for p in entry.iterdir() if VERSION_PATTERN.match(p.name) and (p / "model.onnx").is_file()]
    return max(versions, key=lambda p: int(p.name)) if versions else None


_NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened to read its bytes, if it is a regular file (or a link to one). Anything else
    raises an OSError naming it, without blocking: a FIFO would wait for a writer forever, a device
    such as /dev/zero reads without end, a directory is IsADirectoryError as `open` has it. The
    check is made on the opened file (non-blocking open, then fstat), not on the name beforehand."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            what = _NOT_REGULAR.get(stat.S_IFMT(mode), "not a file")
            raise OSError(errno.EINVAL, f"not a regular file ({what})", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_text(path: Path, max_bytes: int | None = None) -> str:
    """A regular file's text, UTF-8 (open_regular: anything else is an OSError naming it). Past
    `max_bytes` an OSError (EFBIG) saying so, the file not read: a sparse file costs no disk, and
    its bytes and text in memory at once would be twice its size."""
    with open_regular(path) as handle:
        if max_bytes is None:
            return handle.read().decode("utf-8")
        data = handle.read(max_bytes + 1)
        if len(data) > max_bytes:
            size = max(os.fstat(handle.fileno()).st_size, len(data))
            limit = f"{max_bytes // (1 << 20)} MiB" if max_bytes % (1 << 20) == 0 else f"{max_bytes} bytes"
            raise OSError(errno.EFBIG, f"larger than {limit} ({size} bytes)", str(path))
        return data.decode("utf-8")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a regular file's bytes, read in 1 MiB blocks (open_regular: a FIFO or a device
    is an OSError, never a wait or a read without end)."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ONNX's protobuf field numbers (onnx.proto) on the paths from a ModelProto to a TensorProto's
# external_data entries: (message, field) -> the message the field holds.
_ONNX_FIELDS: Final[dict[tuple[str, int], str]] = {
    ("model", 7): "graph",  # ModelProto.graph
    ("model", 25): "function",  # ModelProto.functions
    ("graph", 1): "node",  # GraphProto.node
    ("graph", 5): "tensor",  # GraphProto.initializer
    ("graph", 15): "sparse",  # GraphProto.sparse_initializer
    ("function", 7): "node",  # FunctionProto.node
    ("node", 5): "attribute",  # NodeProto.attribute
    ("attribute", 5): "tensor",  # AttributeProto.t (a Constant's value)
    ("attribute", 6): "graph",  # AttributeProto.g (an If's or a Loop's body)
    ("attribute", 10): "tensor",  # AttributeProto.tensors
    ("attribute", 11): "graph",  # AttributeProto.graphs
    ("attribute", 22): "sparse",  # AttributeProto.sparse_tensor
    ("attribute", 23): "sparse",  # AttributeProto.sparse_tensors
    ("sparse", 1): "tensor",  # SparseTensorProto.values
    ("sparse", 2): "tensor",  # SparseTensorProto.indices
    ("tensor", 13): "entry",  # TensorProto.external_data: {key, value}
}


_LOCATION_KEY: Final = b"\n\x08location"  # StringStringEntryProto.key (field 1) = "location"


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _length_delimited(data: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message at data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise ValueError("a field runs past its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not ONNX's")
        if pos > end:
            raise ValueError("a field runs past its message")


def external_data_locations(path: Path) -> list[str]:
    """The `location` of every external data file the ONNX graph at `path` loads tensors from (its
    initializers', constants' and subgraphs' TensorProto.external_data; torch.onnx.export's default
    writes `<file>.data`), in the graph's order, each once: paths relative to the graph's directory,
    as ONNX Runtime resolves them. Read from the protobuf's wire format (the server does not depend on
    the onnx package); tensor bytes are skipped, not read. ValueError: not a well-formed ONNX file."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            # An external_data entry's key is the field `\n\x08location`: a graph without those
            # bytes anywhere (every bundled model) names no file, found at memchr speed; the walk
            # below costs ~1 ms a MB in Python, for every model at every start.
            if data.find(_LOCATION_KEY) < 0:
                return []
            locations: dict[str, None] = {}
            stack = [("model", 0, size)]
            while stack:
                message, start, end = stack.pop()
                if message == "entry":
                    fields = {n: bytes(data[s:e]) for n, s, e in _length_delimited(data, start, end)}
                    if fields.get(1) == b"location" and 2 in fields:
                        locations[fields[2].decode("utf-8", "surrogateescape")] = None
                    continue
                found = [
                    (_ONNX_FIELDS[(message, number)], s, e)
                    for number, s, e in _length_delimited(data, start, end)
                    if (message, number) in _ONNX_FIELDS
                ]
                stack.extend(reversed(found))
            return list(locations)


def weights_digest(external_sha256: Mapping[str, str]) -> str:
    """Provenance.weights_sha256 of a graph whose external data files are {location: sha256}: the
    sha256 of their `location<TAB>sha256` lines, sorted by location, each ending in a newline; ""
    for a graph that keeps its weights in itself (its own sha256 covers them)."""
    if not external_sha256:
        return ""
    lines = "".join(f"{location}\t{sha256}\n" for location, sha256 in sorted(external_sha256.items()))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()
