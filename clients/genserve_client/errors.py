"""The one exception type the client raises for a failed RPC."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

REQUEST_ID_KEY = "x-request-id"


class GenserveClientError(Exception):
    """A failed genserve call: the gRPC status code, the server's message and the request id.

    Every RPC failure of GenserveClient / AsyncGenserveClient surfaces as this one type, after
    retries (if any) are spent, so callers branch on `.code` instead of on transport exceptions.
    """

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None) -> None:
        self.code = code
        self.details = details
        self.request_id = request_id
        super().__init__(str(self))

    def __str__(self) -> str:
        rid = f" (request id {self.request_id})" if self.request_id else ""
        if rid and self.details.endswith(rid[1:]):  # the server's own INTERNAL message quotes it
            rid = ""
        return f"{self.code.name}: {self.details}{rid}"

    def __reduce__(self) -> tuple[type[GenserveClientError], tuple[grpc.StatusCode, str, str | None]]:
        # Exceptions with keyword-rich __init__ do not pickle by default; keep them picklable
        # so they can cross process pools.
        return (type(self), (self.code, self.details, self.request_id))


def closed_client_error(request_id: str | None) -> GenserveClientError:
    """What a call raises when its client was closed under it: during an attempt (the sync client's
    gRPC answers CANCELLED; grpc.aio raises CancelledError) or while it waited to retry (the next
    attempt met a closed channel: ValueError, grpc.aio.UsageError)."""
    return GenserveClientError(
        grpc.StatusCode.CANCELLED, "Channel closed! (the client was closed during the call)", request_id
    )


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `x-request-id` value in (trailing) metadata, if any."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def from_rpc_error(error: grpc.RpcError, sent_request_id: str | None) -> GenserveClientError:
    """Convert a sync or aio RpcError; the server's echoed request id wins over the one we sent."""
    if isinstance(error, grpc.aio.AioRpcError):
        code, details = error.code(), error.details() or ""
        trailing: Iterable[tuple[str, str | bytes]] | None = error.trailing_metadata()
    elif isinstance(error, grpc.Call):
        code, details = error.code(), error.details() or ""
        trailing = error.trailing_metadata()
    else:  # a bare RpcError carries no status: treat it as an internal client-side failure
        code, details, trailing = grpc.StatusCode.UNKNOWN, str(error), None
    return GenserveClientError(code, details, request_id_from(trailing) or sent_request_id)
