"""One exception hierarchy for genserve: each class carries its status code.

The codes are gRPC's status names, but this module (like the whole serving core) imports no grpc:
the boundary (boundary.py) is the only place that turns a GenserveError into a gRPC status, for
both servicers; everything below it raises these.
"""

from __future__ import annotations

import enum


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


class GenserveError(Exception):
    """Base error: `code` is the status the boundary sends, `field` the offending request field."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

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


class DeadlineExceeded(GenserveError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(GenserveError):
    code = Code.CANCELLED


class Internal(GenserveError):
    code = Code.INTERNAL


class Unauthenticated(GenserveError):
    code = Code.UNAUTHENTICATED


class PermissionDenied(GenserveError):
    code = Code.PERMISSION_DENIED


def invalid(field: str, problem: str) -> InvalidArgument:
    """Build an InvalidArgument whose message names the field: `labels[3]: must be in [0, 10), got 12`."""
    return InvalidArgument(f"{field}: {problem}", field=field)
