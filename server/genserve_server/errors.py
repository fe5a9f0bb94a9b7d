"""One exception hierarchy for genserve: each class carries its gRPC status code.

The servicer boundary (service.py) is the only place that turns a GenserveError into a gRPC
status; everything below it raises these and never touches grpc.StatusCode directly.
"""

from __future__ import annotations

import grpc


class GenserveError(Exception):
    """Base error: `code` is the gRPC status the boundary sends, `field` the offending request field."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgument(GenserveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(GenserveError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(GenserveError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GenserveError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GenserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(GenserveError):
    code = grpc.StatusCode.CANCELLED


class Internal(GenserveError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(GenserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(GenserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


def invalid(field: str, problem: str) -> InvalidArgument:
    """Build an InvalidArgument whose message names the field: `labels[3]: must be in [0, 10), got 12`."""
    return InvalidArgument(f"{field}: {problem}", field=field)
