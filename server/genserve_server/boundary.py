"""The one boundary between gRPC and the serving core, for both servicers (genserve.v1, KServe v2).

Per RPC: the request id (the client's `x-request-id` when printable and short, else a fresh one),
the in-flight gauge, the finished counter and latency histogram, and the translation of errors:
a GenserveError becomes its status with its message; any other exception becomes INTERNAL
"internal error (request id X)", the traceback going only to the log. The admission interceptors
(limits.py, security.py) answer through `abort` too, so a status is made in one place.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar, cast

import grpc

from genserve_server.accept import at_call_end
from genserve_server.batch_parts import count_once
from genserve_server.batcher import cancelled_by_deadline
from genserve_server.core import Call
from genserve_server.errors import (
    Code,
    GenserveError,
    Internal,
    InvalidArgument,
    Unimplemented,
    clip_message,
    escape_controls,
    out_of_memory_refusal,
)
from genserve_server.idle_spin import IdleSpin, run_off_loop_tracked
from genserve_server.metrics import UNKNOWN_METHOD_LABEL, Metrics
from genserve_server.wire import OFF_LOOP_BYTES, serialize

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128
# What a client's request id may hold: it is written into log lines as `request_id=ID`, so spaces,
# `=` or quotes would let a client forge other `key=value` fields there.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+-]+")

# At the default level (INFO), one line per this many seconds for each kind of refused call: a
# client's flood of bad calls (an unknown model, an invalid field, bytes that are not a request, a
# call over a concurrency limit) must not write the log at will; the metrics count every one.
REFUSAL_LOG_INTERVAL_S = 10.0

# A method name that is written into a log line as it is; any other (the client's :path, which could
# forge a `key=value` field) is written as its repr.
_PLAIN_METHOD = re.compile(r"/[A-Za-z0-9._]+/[A-Za-z0-9_]+")
# The refusal lines' key of every method no servicer has: the names are the client's, the keys a bounded set.
UNKNOWN_METHOD = "unknown method"

# The id request_id() chose for a call, with its context, in the call's task: every line and status
# about one call (the admission layer's refusals, then the boundary's) carries the same id, also one
# the server made because the client sent none or an unsafe one.
_CALL_REQUEST_ID: ContextVar[tuple[object, str] | None] = ContextVar("genserve_request_id", default=None)

# Set in a call's task (grpc runs the handler, then sends its status, in one task) once the server has
# ended the call's stream itself because its client took no message (admission._write_all).
ENDED_UNREAD: ContextVar[bool] = ContextVar("genserve_ended_unread", default=False)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class ThrottledLog:
    """Logs the first event of each kind (`key`, from a bounded set: a method, a status code) at
    `level`, then at most one line per `interval_s` for that kind, saying how many more came; the
    others go to DEBUG, each with its own message (so `--log-level DEBUG` shows every one). Where
    events were held back and none comes after the interval (the flood stopped), a timer on the
    running event loop logs the last of them with the count then; at shutdown, before the loop
    ends with the timer, flush_held_back() does."""

    def __init__(
        self, log: logging.Logger, level: int = logging.INFO, interval_s: float = REFUSAL_LOG_INTERVAL_S
    ) -> None:
        self._logger = log
        self._level = level
        self.interval_s = interval_s
        self._kinds: dict[Hashable, tuple[float, int]] = {}  # key: (next line at, events held back since)
        # key: its last held event, as text: its arguments (an error whose traceback holds the request,
        # megabytes of a refused one) would live as long as the timer, not as long as the call.
        self._last_held: dict[Hashable, str] = {}

    def log(self, key: Hashable, message: str, *args: object) -> None:
        now = time.monotonic()
        next_at, held_back = self._kinds.get(key, (0.0, 0))
        if now < next_at:
            self._kinds[key] = (next_at, held_back + 1)
            self._last_held[key] = message % args if args else message
            _HOLDING.add(self)
            self._logger.debug(message, *args)
            if not held_back:  # the first held back since the last line: its count is logged at next_at
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a synchronous caller): the next event's line says it
                    return
                loop.call_later(next_at - now, self._flush, key, next_at)
            return
        self._line(key, now, message, args, held_back)

    def _line(
        self, key: Hashable, now: float, message: str, args: tuple[object, ...], held_back: int
    ) -> None:
        self._last_held.pop(key, None)
        if not self._last_held:
            _HOLDING.discard(self)
        if held_back:
            message, args = f"{message} (%d more since the last line)", (*args, held_back)
        self._logger.log(self._level, message, *args)
        self._kinds[key] = (now + self.interval_s, 0)

    def _flush(self, key: Hashable, next_at: float) -> None:
        """The interval that began before `next_at` ended with events held back and no line since:
        the last of them, with how many more came."""
        at, held_back = self._kinds.get(key, (0.0, 0))
        last = self._last_held.get(key)
        if at != next_at or not held_back or last is None:  # a line was written since
            return
        self._line(key, time.monotonic(), "%s", (last,), held_back - 1)

    def flush(self) -> None:
        """Each kind's events held back since its last line: the last of them, with the count, now."""
        for key, text in list(self._last_held.items()):
            _, held_back = self._kinds[key]
            self._line(key, time.monotonic(), "%s", (text,), held_back - 1)


# The ThrottledLogs with events held back that no line has counted yet (flush_held_back).
_HOLDING: weakref.WeakSet[ThrottledLog] = weakref.WeakSet()


def flush_held_back() -> None:
    """At shutdown (App.stop): every count still held back, logged now, as its timer would at its
    interval's end (the event loop ends first, its timers with it)."""
    for log in list(_HOLDING):
        log.flush()


def status_code(code: Code) -> grpc.StatusCode:
    """The gRPC status of an error code (the names are the same)."""
    return grpc.StatusCode[code.name]


async def abort(
    context: Context,
    error: GenserveError,
    trailing: tuple[tuple[str, str], ...] = (),
    redact: Callable[[str], str] = str,
) -> NoReturn:
    """Answer the call with the error's status and message (context.abort raises), its request id in
    the trailing metadata (docs/metrics.md: every RPC's). Past the call's deadline gRPC has ended it
    already: nothing is sent (see _past_deadline)."""
    if not any(key == REQUEST_ID_KEY for key, _ in trailing):
        trailing = (*trailing, (REQUEST_ID_KEY, request_id(context)))
    remaining_s = context.time_remaining()
    if remaining_s is not None and remaining_s <= 0:
        raise asyncio.CancelledError
    await context.abort(status_code(error.code), error.redacted(redact), trailing_metadata=trailing)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def shown_method(method: str) -> str:
    """A method name as a log line may write it, clipped as other client strings are: as it is when
    plain, else (the client's :path, which could hold a newline, `key=value` or terminal escapes) its
    repr."""
    return clip_message(method) if _PLAIN_METHOD.fullmatch(method) else repr(clip_message(method))


def request_id(context: Context) -> str:
    """The client's `x-request-id` when it is a safe token of at most 128 characters, else a new id;
    the same one for every ask about one call (its task remembers it)."""
    chosen = _CALL_REQUEST_ID.get()
    if chosen is not None and chosen[0] is context:
        return chosen[1]
    rid = client_request_id(context.invocation_metadata()) or uuid.uuid4().hex
    _CALL_REQUEST_ID.set((context, rid))
    return rid


def naming_request_id(error: GenserveError, rid: str) -> GenserveError:
    """`error` as its client gets it: an INTERNAL one (a failed model call, outputs that did not fit)
    ends "(request id X)", as an unexpected error's "internal error (request id X)" does, so that a
    client that shows no trailing metadata (grpcurl, tritonclient) has the id the operator greps the
    log for (docs/operations.md); any other as it is."""
    suffix = f"(request id {rid})"
    if error.code != Code.INTERNAL or error.message.endswith(suffix):
        return error
    return Internal(f"{error.message} {suffix}", field=error.field, verbatim=error.verbatim)


def echo_request_id(context: Context) -> None:
    """The call's request id in its trailing metadata (docs/metrics.md: every RPC's), for an RPC
    that answers without the Boundary's per-call path (KServe's metadata and probe RPCs)."""
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id(context)),))


def client_request_id(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The client's `x-request-id` when it is a safe token of at most 128 characters, else None."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _safe_request_id(value):
            return value
    return None


def _safe_request_id(value: str) -> bool:
    return len(value) <= MAX_REQUEST_ID_CHARS and REQUEST_ID_PATTERN.fullmatch(value) is not None


def adopt_request_id(context: Context, rid: str) -> None:
    """`rid`, an id the call's request message carries (KServe's ModelInferRequest.id, by which
    Triton's clients match responses), is the call's request id where the call sent no usable
    `x-request-id` and `rid` passes the same rules; call before the boundary begins the call."""
    if rid and _safe_request_id(rid) and client_request_id(context.invocation_metadata()) is None:
        _CALL_REQUEST_ID.set((context, rid))


class Boundary:
    """Wraps every handler of both servicers: `unary`, `stream`, and `plain` for metadata RPCs."""

    def __init__(
        self,
        metrics: Metrics,
        redact: Callable[[str], str] = str,
        idle_spin: IdleSpin | None = None,
        serialize_pool: Executor | None = None,
    ) -> None:
        """`redact`: what a message becomes for the client (Repository.redact hides the server's paths);
        `idle_spin`: poked at the end of every call (idle_spin.py); `serialize_pool`: where a large
        unary response is serialized, its bytes returned in its place (wire.py: only for handlers
        whose response serializer passes bytes through, wire.passing_bytes); None: every response
        is returned as the message, for grpc to serialize on the event loop."""
        self.metrics = metrics
        self.redact = redact
        self.idle_spin = idle_spin
        self.serialize_pool = serialize_pool
        self._unresolved = metrics.unresolved()
        self._refusals = ThrottledLog(logger)  # one line per method and status per interval
        # Calls begun and not ended, by method (also without metrics): what a shutdown drains.
        self.in_flight: collections.Counter[str] = collections.Counter()
        # When the shutdown's drain grace ends (App.stop): gRPC then cancels the calls left, whose
        # clients get UNAVAILABLE ("Cancelling all calls"); None: not shutting down.
        self.grace_ends_at: float | None = None

    def begin(self, method: str, context: Context) -> Call:
        remaining_s = context.time_remaining()
        now = time.monotonic()
        call = Call(method, request_id(context), now, self._unresolved)
        if remaining_s is not None:
            call.deadline = now + remaining_s
        self.metrics.in_flight_children[method].inc()
        self.in_flight[method] += 1
        if self.idle_spin is not None:
            self.idle_spin.begin()
        return call

    async def fail(
        self, call: Call, exc: BaseException, context: Context, out_of_memory: bool = False
    ) -> NoReturn:
        """Log and translate an exception into the call's status (context.abort raises).
        `out_of_memory`: the call's own MemoryError, logged as each batch out of memory is."""
        trailing = ((REQUEST_ID_KEY, call.request_id),)
        if isinstance(exc, GenserveError):
            past_deadline = _past_deadline(call)  # its client gets DEADLINE_EXCEEDED, not this refusal
            if isinstance(exc, InvalidArgument) and not past_deadline:
                call.metrics.rejected["invalid"].inc()
            elif exc.code == Code.UNAVAILABLE and not past_deadline:
                call.metrics.rejected["not_ready"].inc()
            elif exc.code == Code.RESOURCE_EXHAUSTED and call.refused is not None and count_once(call):
                # Decided with the clock reading that decides what its client gets (Call.refused).
                counts, reason = call.refused
                if past_deadline:
                    call.metrics.on_dropped("deadline")  # the model it called (Caller.metrics)
                else:
                    counts.on_rejected(reason)
            if exc.code == Code.INTERNAL or out_of_memory:
                # The server's fault (a failed model call, a NaN image) or its memory, not a client's
                # refusal: each one's line, so that the id its client quotes is in the log
                # (docs/metrics.md); at DEBUG where a failed batch's line names it already.
                logger.log(
                    logging.DEBUG if exc.logged else logging.WARNING,
                    "request_id=%s method=%s code=%s: %s",
                    call.request_id,
                    call.method,
                    exc.code.name,
                    exc,
                )
            else:
                self._refusals.log(
                    (call.method, exc.code),
                    "request_id=%s method=%s code=%s: %s",
                    call.request_id,
                    call.method,
                    exc.code.name,
                    exc,
                )
            if past_deadline:
                call.code = Code.DEADLINE_EXCEEDED.name  # what the client gets, from gRPC
                self._count_left(call)
                raise asyncio.CancelledError  # no status to send: see _past_deadline
            await abort(context, naming_request_id(exc, call.request_id), trailing, self.redact)
        logger.error(
            "request_id=%s method=%s failed with an unexpected error",
            call.request_id,
            call.method,
            exc_info=exc,
        )
        if _past_deadline(call):
            raise asyncio.CancelledError
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error (request id {call.request_id})",
            trailing_metadata=trailing,
        )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def end(self, call: Call) -> None:
        ended = time.monotonic()
        if self.idle_spin is not None:
            self.idle_spin.end()
        duration_s = ended - call.started
        self.metrics.in_flight_children[call.method].dec()
        self.in_flight[call.method] -= 1
        if call.batcher is not None:
            call.batcher.release()
        if call.stream_batcher is not None:
            call.stream_batcher.release(stream=True)
        if call.uses is not None:
            call.release_uses()
        call.metrics.request_done(call.method, call.code, duration_s)
        if call.code != "NOT_FOUND":  # a version that does not exist: Triton has nothing to charge
            call.metrics.infer_stats.request_done(call.code == "OK", call.started, ended, call.timing)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "request request_id=%s method=%s model=%s version=%s code=%s duration_ms=%.3f",
                call.request_id,
                call.method,
                call.metrics.model,
                call.metrics.version,
                call.code,
                duration_s * 1e3,
            )

    def _count_left(self, call: Call) -> None:
        """A call of a model that ended `CANCELLED` (its client went away) or `DEADLINE_EXCEEDED`
        before it was answered: one genserve_requests_dropped_total (`cancelled`, `deadline`) for
        its RPC, wherever it was (decoding its images, waiting for a budget, queued, computing, its
        answer not yet sent), unless the stage it left counted it already (count_once)."""
        reason = _LEFT_REASONS.get(call.code)
        if reason is not None and call.metrics is not self._unresolved and count_once(call):
            call.metrics.dropped[reason].inc()

    async def raised(self, call: Call, exc: BaseException, context: Context) -> NoReturn:
        """Record the status of a handler that raised and answer the call with it (always raises)."""
        if isinstance(exc, asyncio.CancelledError):
            call.code = _cancelled_code(call, self.grace_ends_at)
            self._count_left(call)
            raise exc
        if isinstance(exc, GeneratorExit):  # a stream closed before its end: not an OK stream
            call.code = _closed_code(call, context, self.grace_ends_at)
            if ENDED_UNREAD.get() and count_once(call):
                # Its client stopped reading: RESOURCE_EXHAUSTED is what that client gets, and this
                # drop tells the alerts it was the client's doing, not a server fault (docs/metrics.md).
                call.metrics.dropped["unread"].inc()
            self._count_left(call)
            raise exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: not the call's failure
            raise exc
        out_of_memory = isinstance(exc, MemoryError)
        if out_of_memory:  # a container's memory limit: not a bug, and it passes
            exc = out_of_memory_refusal("", f": {exc}" if str(exc) else "")
        call.code = exc.code.name if isinstance(exc, GenserveError) else "INTERNAL"
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        await self.fail(call, exc, context, out_of_memory)

    async def unary(
        self, method: str, request: Req, context: Context, handler: Callable[[Req, Call], Awaitable[Resp]]
    ) -> Resp:
        """The handler's response, or its serialized bytes where it was predicted large (wire.py)."""
        call = self.begin(method, context)
        call.unary = True
        try:
            response = await handler(request, call)
            if _past_deadline(call):
                raise asyncio.CancelledError  # counted DEADLINE_EXCEEDED by raised(): see _past_deadline
            reservation = call.response
            if (
                reservation is not None
                and self.serialize_pool is not None
                and reservation.held >= OFF_LOOP_BYTES  # its predicted size
                and not isinstance(response, bytes)  # a handler's own bytes (KServe's ModelInfer)
            ):
                # Cancelled meanwhile, the call's bytes stay held until the serialize has ended.
                response = cast(
                    Resp, await run_off_loop_tracked(self.serialize_pool, call.computing, serialize, response)
                )
                if _past_deadline(call):
                    raise asyncio.CancelledError
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
            if reservation is not None:
                # Held until gRPC has sent the response or ended the RPC (an unread response stays
                # in gRPC's buffers after this handler returns: response_budget.py).
                if isinstance(response, bytes):
                    reservation.settle(len(response))
                else:
                    size = getattr(response, "ByteSize", None)  # upb: a serialization, small here
                    if size is not None:
                        reservation.settle(size())

                if not at_call_end(reservation.release):  # grpc accepted the call: its done callback

                    def on_done(ctx: Context) -> None:
                        reservation.release()

                    # grpc-stubs declare the callback a (type-check-only) class, not a callable.
                    context.add_done_callback(cast(Any, on_done))
                    if context.done():  # ended already (cancelled as the handler returned): no callback
                        reservation.release()
                call.response = None
            return response
        except BaseException as exc:
            await self.raised(call, exc, context)
        finally:
            if call.response is not None:  # refused, failed or cancelled: nothing will be sent
                call.release_once_computed(call.response.release)
            self.end(call)

    async def stream(
        self, method: str, request: Req, context: Context, handler: Callable[[Req, Call], AsyncIterator[Resp]]
    ) -> AsyncIterator[Resp]:
        call = self.begin(method, context)
        try:
            async for item in handler(request, call):
                yield item
            context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        except BaseException as exc:
            await self.raised(call, exc, context)
        finally:
            self.end(call)

    async def plain(
        self, context: Context, handler: Callable[[], Awaitable[Resp]], method: str = "metadata"
    ) -> Resp:
        """Metadata RPCs (KServe's readiness, metadata, config, statistics): the same error
        translation (an unexpected exception is INTERNAL naming the request id, its traceback in the
        log only) and refusal lines (`method`: the RPC's name on them), no per-RPC metrics; the
        request id comes back in the trailing metadata, as every RPC's does (docs/metrics.md)."""
        try:
            response = await handler()
            echo_request_id(context)
            return response
        except GenserveError as exc:
            rid = request_id(context)
            if exc.code == Code.INTERNAL:  # the server's fault: each one's line, as in `fail`
                logger.warning("request_id=%s method=%s code=%s: %s", rid, method, exc.code.name, exc)
            else:
                self._refusals.log(
                    (method, exc.code), "request_id=%s method=%s code=%s: %s", rid, method, exc.code.name, exc
                )
            await abort(context, naming_request_id(exc, rid), ((REQUEST_ID_KEY, rid),), self.redact)
        except grpc.aio.AbortError:
            raise
        except Exception:
            rid = request_id(context)
            logger.exception("request_id=%s metadata RPC failed with an unexpected error", rid)
            await abort(context, Internal(f"internal error (request id {rid})"), ((REQUEST_ID_KEY, rid),))

    async def unknown_method(self, method: str, context: Context) -> NoReturn:
        """A method no servicer has: UNIMPLEMENTED naming it, as gRPC's own answer ('Method not
        found!') but with the call's request id in its trailing metadata and on a refusal line
        (docs/metrics.md: every RPC's), throttled like the others (one kind for all such methods);
        counted in genserve_requests_total under model="" and one method label for all of them."""
        rid = request_id(context)
        self._refusals.log(
            (UNKNOWN_METHOD, "UNIMPLEMENTED"),
            "request_id=%s method=%s code=UNIMPLEMENTED: no service of this server has the method",
            rid,
            shown_method(method),
        )
        # The path is the client's: its control characters escaped, as any message quoting a
        # client's string has them (GenserveError.redacted); not redacted (it looks like a path).
        error = Unimplemented(f"method {escape_controls(method)} not found: no service of this server has it")
        code = error.code.name
        try:
            await abort(context, error, ((REQUEST_ID_KEY, rid),))
        except asyncio.CancelledError:
            code = Code.DEADLINE_EXCEEDED.name  # past its deadline: what its client gets, from gRPC
            raise
        finally:
            self._unresolved.count(UNKNOWN_METHOD_LABEL, code)


class UnknownMethods(grpc.GenericRpcHandler):
    """Registered after every servicer, straight on the server (no admission: it reads nothing and
    computes nothing): any method not handled before it is Boundary.unknown_method."""

    def __init__(self, boundary: Boundary) -> None:
        self._boundary = boundary

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        boundary = self._boundary

        async def unimplemented(request_iterator: object, context: Context) -> None:
            await boundary.unknown_method(method, context)

        # Stream-stream whatever the client's kind: the server reads no message of any call.
        return grpc.stream_stream_rpc_method_handler(unimplemented)


def _past_deadline(call: Call) -> bool:
    """Whether the call's deadline has passed: gRPC has ended it with DEADLINE_EXCEEDED already (its
    deadline comes a little before the one the server computes from time_remaining() at arrival),
    so a response or status sent now fails in gRPC's core, which grpc logs as an ERROR with a
    traceback. A handler that finished just as gRPC cancels it at its deadline (the event loop
    busy) sends nothing instead, as a handler that gRPC cancelled in time does."""
    return call.deadline is not None and time.monotonic() >= call.deadline


def describe_calls(calls: collections.Counter[str]) -> str:
    """'3 calls in flight (SampleStream 2, Sample 1)', 'no call in flight'."""
    counts = +calls  # the methods with calls only
    total = sum(counts.values())
    if not total:
        return "no call in flight"
    methods = ", ".join(f"{method} {n}" for method, n in counts.most_common())
    return f"{total} call{'s' if total != 1 else ''} in flight ({methods})"


# The codes of a call that left before it was answered, and their drop reasons (Boundary._count_left).
_LEFT_REASONS = {Code.CANCELLED.name: "cancelled", Code.DEADLINE_EXCEEDED.name: "deadline"}


def _cancelled_code(call: Call, grace_ends_at: float | None) -> str:
    """The status a cancelled handler is counted under: gRPC cancels it at the client's deadline too,
    and at the end of the shutdown's drain grace (`grace_ends_at`: its client gets UNAVAILABLE)."""
    if cancelled_by_deadline(call.deadline):
        return "DEADLINE_EXCEEDED"
    if grace_ends_at is not None and time.monotonic() >= grace_ends_at:
        return "UNAVAILABLE"
    return "CANCELLED"


def _closed_code(call: Call, context: Context, grace_ends_at: float | None) -> str:
    """The status of a stream whose generator was closed before its last message: the status the
    server set when it ended the stream itself (admission's stream_write_timeout_s:
    RESOURCE_EXHAUSTED), else the client went away or its deadline passed while the handler waited
    to write (grpc cancels the writing task and closes the generator)."""
    code = context.code()
    if not context.cancelled() and isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name
    return _cancelled_code(call, grace_ends_at)
