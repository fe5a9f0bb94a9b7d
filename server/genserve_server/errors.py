"""One exception hierarchy for genserve: each class carries its status code.

The codes are gRPC's status names, but this module (like the whole serving core) imports no grpc:
the boundary (boundary.py) is the only place that turns a GenserveError into a gRPC status, for
both servicers; everything below it raises these.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable


class Code(enum.Enum):
    """The status a GenserveError is answered with; names are gRPC's (boundary.status_code)."""

    CANCELLED = "CANCELLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNIMPLEMENTED = "UNIMPLEMENTED"


# A status message travels as a percent-encoded header (grpc-message): past 8 KiB of metadata a
# client refuses the whole answer (RESOURCE_EXHAUSTED) and never reads the error. A message that
# echoes a long client string (a model or tensor name) keeps its head (the field) and its tail (the
# limit or the advice) within this many UTF-8 bytes, 3 KiB at most once percent-encoded.
MAX_MESSAGE_BYTES = 1024


def clip_message(message: str) -> str:
    """`message`, its middle left out where it is longer than MAX_MESSAGE_BYTES in UTF-8."""
    if len(message) * 4 <= MAX_MESSAGE_BYTES:  # short enough whatever its characters
        return message
    raw = message.encode()
    if len(raw) <= MAX_MESSAGE_BYTES:
        return message
    head = raw[: MAX_MESSAGE_BYTES * 5 // 8].decode(errors="ignore")  # a cut character is dropped
    tail = raw[-(MAX_MESSAGE_BYTES // 4) :].decode(errors="ignore")
    left_out = len(message) - len(head) - len(tail)
    return f"{head}...[{left_out} characters left out]...{tail}"


# C0 controls, DEL and C1 controls (0x9b is a terminal's CSI too), each as Python writes it in a repr.
CONTROL_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def escape_controls(text: str) -> str:
    """`text` on one line without terminal escapes: its control characters as a repr writes them
    (a newline as \\n, ESC as \\x1b); printable text, unicode included, as it is. isprintable
    (~0.5 us) first: translate costs a lookup a character, and nearly no text has anything to escape
    (at --log-level DEBUG the log formats a line a request and a batch)."""
    if text.isprintable():
        return text
    return text.translate(CONTROL_ESCAPES)


# ONNX Runtime's words for a tensor it could not allocate: its arena's (CPU or CUDA), the plain
# allocator's std::bad_alloc (MSVC: "bad allocation"), CUDA's cudaErrorMemoryAllocation (2).
_ORT_OUT_OF_MEMORY = re.compile(
    r"Failed to allocate memory|std::bad_alloc|bad allocation|cudaErrorMemoryAllocation"
    r"|CUDA (?:failure|error) 2\b"
)


def out_of_memory(error: BaseException) -> str:
    """Where `error` is the process's memory running out (numpy's MemoryError, or ONNX Runtime's own
    error, Fail or RuntimeException, for a tensor it could not allocate): what ran out, short (ONNX
    Runtime's words from "Failed to allocate memory" on, without the C++ source path and function
    before them or CUDA's "; GPU=0 ; hostname=..." after); "" for any other error."""
    if isinstance(error, MemoryError):
        return str(error) or "MemoryError"
    if isinstance(error, GenserveError):
        return ""
    text = str(error)
    found = _ORT_OUT_OF_MEMORY.search(text)
    if found is None:
        return ""
    return text[found.start() :].splitlines()[0].split(" ; ")[0].strip()[:200]


# ONNX Runtime's words for a graph newer than it: an IR version (model.cc), an opset (ValidateOpsetForDomain).
_ORT_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+)(?:, max supported IR version: (\d+))?")
_ORT_OPSET_TOO_NEW = re.compile(r"Opset (\d+) is under development")
_ORT_OPSET_MAX = re.compile(r"support for domain (\S+) is till opset (\d+)")


def too_new_for_runtime(error: BaseException, version: str = "") -> str:
    """Where `error` is ONNX Runtime refusing a graph of an IR version or opset newer than it supports:
    that, short ("IR version 99, newer than ONNX Runtime 1.20.1 supports (at most 10)": `version` is
    ONNX Runtime's), without its C++ source path and function; "" for any other error."""
    if isinstance(error, GenserveError):
        return ""
    text = str(error)
    found = _ORT_IR_TOO_NEW.search(text)
    what, most = (f"IR version {found[1]}", found[2]) if found else ("", None)
    if not found and (found := _ORT_OPSET_TOO_NEW.search(text)) is not None:
        domain = _ORT_OPSET_MAX.search(text)
        what = f"opset {found[1]}" + (f" (domain {domain[1].rstrip('.')})" if domain else "")
        most = domain[2] if domain else None
    if not what:
        return ""
    runtime = f"ONNX Runtime {version}" if version else "this ONNX Runtime"
    return f"{what}, newer than {runtime} supports" + (f" (at most {most})" if most else "")


class GenserveError(Exception):
    """Base error: `code` is the status the boundary sends, `field` the offending request field,
    `verbatim` a part of the message that is the client's own text (a name it sent, as the message
    quotes it): the boundary's redact (Repository.redact, which hides the server's paths) leaves it
    as it is, so that a model named by a path (`/srv/models/gen`) is quoted back, not hidden."""

    code: Code = Code.INTERNAL
    # True where a line naming the request ids of the calls it fails is in the log already (a failed
    # batch's, batcher._log_failure): the boundary's line for each such call goes to DEBUG.
    logged: bool = False

    def __init__(self, message: str, *, field: str | None = None, verbatim: str = "") -> None:
        message = clip_message(message)
        super().__init__(message)
        self.message = message
        self.field = field
        self.verbatim = verbatim

    def redacted(self, redact: Callable[[str], str]) -> str:
        """The message for the client: `redact` applied to all of it but `verbatim`, whose control
        characters are escaped as redact escapes the rest's (a repr has none left to escape)."""
        if not self.verbatim or self.verbatim not in self.message:
            return redact(self.message)
        shown = escape_controls(self.verbatim)
        return shown.join(redact(part) for part in self.message.split(self.verbatim))

    def __str__(self) -> str:
        return self.message


class InvalidArgument(GenserveError):
    code = Code.INVALID_ARGUMENT


class NotFound(GenserveError):
    code = Code.NOT_FOUND


class ResourceExhausted(GenserveError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(GenserveError):
    code = Code.UNAVAILABLE


class ModelCallAborted(Unavailable):
    """A model call the shutdown aborted at the drain grace's end (ModelRunner.abort): said by the
    shutdown's WARNING, not a model failure (the batcher logs it at INFO)."""


class DeadlineExceeded(GenserveError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(GenserveError):
    code = Code.CANCELLED


class Internal(GenserveError):
    code = Code.INTERNAL


class Unauthenticated(GenserveError):
    code = Code.UNAUTHENTICATED


class Unimplemented(GenserveError):
    code = Code.UNIMPLEMENTED


class PermissionDenied(GenserveError):
    code = Code.PERMISSION_DENIED


def invalid(field: str, problem: str, *, verbatim: str = "") -> InvalidArgument:
    """Build an InvalidArgument whose message names the field: `labels[3]: must be in [0, 10), got 12`;
    `verbatim`: the client's text it quotes (GenserveError)."""
    return InvalidArgument(f"{field}: {problem}", field=field, verbatim=verbatim)


def out_of_memory_refusal(where: str, detail: str) -> ResourceExhausted:
    """What a call that ran out of memory gets: RESOURCE_EXHAUSTED, which clients retry (a container's
    limit, a GPU arena's cap: an operator's matter, not a bug). `where`: the batcher's name or ""."""
    prefix = f"{where}: " if where else ""
    return ResourceExhausted(f"{prefix}the server is out of memory for this call{detail}")
