"""Unit tests of the boundary both servicers share (error translation, request ids) and of the
pure validators, with a hand-written context."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import grpc
import numpy as np
import pytest

from genserve_server.boundary import Boundary, status_code
from genserve_server.core import Call
from genserve_server.errors import (
    MAX_MESSAGE_BYTES,
    Code,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    invalid,
)
from genserve_server.metrics import Metrics
from genserve_server.response_budget import ByteBudget, Reservation
from genserve_server.tiling import plan_tiles
from genserve_server.validate import input_range as check_input_range
from genserve_server.validate import psi as check_psi
from genserve_server.validate import tiling as check_tiling


class Aborted(Exception):
    pass


class FakeContext:
    """The parts of grpc.aio.ServicerContext the boundary uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details)
        self.trailing = trailing_metadata
        raise Aborted(details)


@pytest.fixture
def service() -> Boundary:
    return Boundary(Metrics(enabled=True))


def call_unary(service: Boundary, handler: Any, context: FakeContext) -> Any:
    return asyncio.run(service.unary("Sample", object(), context, handler))  # type: ignore[arg-type]


def test_unknown_exception_becomes_internal_with_request_id_and_no_details(
    service: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(request: object, call: Call) -> None:
        raise ZeroDivisionError("secret internals")

    context = FakeContext((("x-request-id", "req-42"),))
    with pytest.raises(Aborted):
        call_unary(service, handler, context)
    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal error (request id req-42)")
    assert ("x-request-id", "req-42") in context.trailing
    assert "secret internals" in caplog.text  # the stack trace goes to the log only
    assert service.metrics.requests.labels("", "", "Sample", "INTERNAL")._value.get() == 1


def test_a_call_that_runs_out_of_memory_is_answered_resource_exhausted_naming_it(
    service: Boundary,
) -> None:
    """Under a container's memory limit (RLIMIT_AS, RLIMIT_DATA) a large SuperResolve's blend failed
    np.zeros with numpy's MemoryError: the client got INTERNAL "internal error", which it does not
    retry though the server serves on and the memory comes back as other calls end, and the log an
    ERROR with a traceback as for a bug. It is RESOURCE_EXHAUSTED saying the server is out of memory."""

    async def handler(request: object, call: Call) -> None:
        raise MemoryError("Unable to allocate 192. MiB for an array with shape (3, 4096, 4096)")

    context = FakeContext((("x-request-id", "req-9"),))
    with pytest.raises(Aborted):
        call_unary(service, handler, context)
    assert context.aborted is not None
    code, message = context.aborted
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, context.aborted
    assert "out of memory" in message and "Unable to allocate 192. MiB" in message, message
    assert service.metrics.requests.labels("", "", "Sample", "RESOURCE_EXHAUSTED")._value.get() == 1


def test_every_call_that_runs_out_of_memory_names_its_request_id_on_a_warning_line(
    service: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler's MemoryError went only to the refusal line, throttled to one per 10 s at INFO, so
    the ids of the calls after the first were nowhere in the log, while a batch out of memory says
    each call's on a WARNING: each such call is one WARNING line naming its request id."""

    async def handler(request: object, call: Call) -> None:
        raise MemoryError("Unable to allocate 192. MiB for an array with shape (3, 4096, 4096)")

    caplog.set_level(logging.INFO, logger="genserve_server.boundary")
    for rid in ("oom-1", "oom-2"):
        with pytest.raises(Aborted):
            call_unary(service, handler, FakeContext((("x-request-id", rid),)))
    lines = [r for r in caplog.records if "RESOURCE_EXHAUSTED" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING] * 2, caplog.text
    assert "request_id=oom-1 " in lines[0].getMessage() and "request_id=oom-2 " in lines[1].getMessage()


def test_every_metadata_rpc_failed_internal_names_its_request_id(
    service: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    """An INTERNAL GenserveError in a KServe metadata RPC (`plain`) went to the throttled refusal
    line and its message named no request id, unlike every other INTERNAL refusal: each is one
    WARNING line with its id, and its message ends '(request id X)'."""

    async def handler() -> None:
        raise Internal("model m version 1: statistics failed")

    caplog.set_level(logging.INFO, logger="genserve_server.boundary")
    for rid in ("meta-1", "meta-2"):
        context = FakeContext((("x-request-id", rid),))
        with pytest.raises(Aborted):
            asyncio.run(service.plain(context, handler))  # type: ignore[arg-type]
        assert context.aborted == (
            grpc.StatusCode.INTERNAL,
            f"model m version 1: statistics failed (request id {rid})",
        )
    lines = [r for r in caplog.records if "code=INTERNAL" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING] * 2, caplog.text
    assert "request_id=meta-1 " in lines[0].getMessage() and "request_id=meta-2 " in lines[1].getMessage()


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (invalid("labels[3]", "must be in [0, 10), got 12"), grpc.StatusCode.INVALID_ARGUMENT),
        (ResourceExhausted("model m version 1: queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_genserve_errors_keep_their_code_and_message(
    service: Boundary, error: Exception, code: grpc.StatusCode
) -> None:
    async def handler(request: object, call: Call) -> None:
        raise error

    context = FakeContext()
    with pytest.raises(Aborted):
        call_unary(service, handler, context)
    assert context.aborted == (code, str(error))
    request_id = dict(context.trailing)["x-request-id"]
    assert len(request_id) == 32  # made by the server when the client sent none


def test_success_sets_the_request_id_and_counts_ok(service: Boundary) -> None:
    async def handler(request: object, call: Call) -> str:
        return "response"

    context = FakeContext((("x-request-id", "ok-1"),))
    assert call_unary(service, handler, context) == "response"
    assert context.trailing == (("x-request-id", "ok-1"),)
    assert service.metrics.in_flight.labels("Sample")._value.get() == 0


def test_invalid_argument_message_names_field_and_limit() -> None:
    err = invalid("labels[3]", "must be in [0, 10), got 12")
    assert str(err) == "labels[3]: must be in [0, 10), got 12"
    assert err.field == "labels[3]" and status_code(err.code) == grpc.StatusCode.INVALID_ARGUMENT


def test_every_error_code_is_a_grpc_status() -> None:
    assert {status_code(code).name for code in Code} == {code.name for code in Code}


@pytest.mark.parametrize(
    ("tile", "overlap", "multiple", "message"),
    [
        (8, 0, 16, "tile_size: must be at least 16 for this model (size multiple 16, tile_overlap 0), got 8"),
        (40, 8, 32, "tile_size: must be at least 64"),  # the overlap takes one whole unit of 32
        (48, 10, 32, "tile_size: must be at least 64 for this model (size multiple 32, tile_overlap 10)"),
        (20, 8, 1, "tile_size: must be in 32..1024 (>= 2 * tile_overlap + 8 and >= 4 * tile_overlap)"),
        (40, 11, 1, "tile_overlap: must be in 0..10 (tile_size / 4), got 11"),
    ],
)
def test_tile_settings_that_cannot_be_planned_name_the_field(
    tile: int, overlap: int, multiple: int, message: str
) -> None:
    with pytest.raises(InvalidArgument) as excinfo:
        check_tiling(tile, overlap, multiple)
    assert str(excinfo.value).startswith(message)


@pytest.mark.parametrize(
    ("tile", "message"),
    [
        (16, "tile_size: must be in 128..1024 (>= 2 * tile_overlap + 8 and >= 4 * tile_overlap, with the"),
        (72, "tile_size: must be in 128..1024 (>= 4 * tile_overlap, with the model's tile_overlap 32"),
        (127, "tile_size: must be in 128..1024"),
    ],
)
def test_a_tile_size_too_small_for_the_models_default_overlap_names_the_tile_size_and_the_real_bound(
    tile: int, message: str
) -> None:
    """The client set tile_size only: the bound it is told is the one that works (the overlap's
    two rules together), and the refusal never blames the tile_overlap it did not send."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_tiling(tile, 32, 1, overlap_given=False)
    assert str(excinfo.value).startswith(message)
    check_tiling(128, 32, 1, overlap_given=False)


@pytest.mark.parametrize(
    ("tile", "overlap", "multiple", "min_size"),
    [(16, 7, 1, 1), (20, 8, 1, 1), (20, 8, 32, 1), (40, 8, 32, 96), (8, 0, 16, 48), (30, 12, 1, 1)],
)
def test_a_tile_size_refusal_names_a_tile_size_that_is_accepted(
    tile: int, overlap: int, multiple: int, min_size: int
) -> None:
    """The client sent both: the smallest tile_size a refusal names passes every rule with the same
    tile_overlap, so one correction suffices (not 22 for an overlap of 7, then 28)."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_tiling(tile, overlap, multiple, min_size=min_size)
    message = str(excinfo.value)
    assert message.startswith("tile_size: "), message
    named = int(re.search(r"must be (?:in|at least) (\d+)", message).group(1))  # type: ignore[union-attr]
    check_tiling(named, overlap, multiple, min_size=min_size)
    with pytest.raises(InvalidArgument):
        check_tiling(named - 1, overlap, multiple, min_size=min_size)


@pytest.mark.parametrize(
    ("tile", "overlap", "multiple", "given"),
    [(100, 1, 768, True), (768, 1, 768, True), (1024, 300, 600, True), (768, 8, 768, False)],
)
def test_a_tile_overlap_no_tile_size_can_hold_is_refused_naming_the_overlaps_limit(
    tile: int, overlap: int, multiple: int, given: bool
) -> None:
    """A model's size multiple above 512 (a card may have one) needs tiles of two whole multiples
    past any overlap, more than tile_size's maximum: the refusal named the impossible range
    'must be in 1536..1024'. It says no tile_size takes that overlap and names the overlaps that
    work, of which the largest is accepted."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_tiling(tile, overlap, multiple, overlap_given=given)
    message = str(excinfo.value)
    for low, high in re.findall(r"(\d+)\.\.(\d+)", message):
        assert int(low) <= int(high), message
    assert f"no tile_size up to 1024 takes tile_overlap {overlap}" in message
    assert message.startswith("tile_overlap: " if given else "tile_size: "), message
    limit = int(re.search(r"in 0\.\.(\d+)", message).group(1))  # type: ignore[union-attr]
    check_tiling(1024, limit, multiple)


def test_a_model_no_tile_size_can_tile_is_refused_saying_so() -> None:
    """A size multiple or a min_size above tile_size's maximum: no tiling works, whatever the
    overlap (the loader refuses such a card through this message); no impossible range."""
    for multiple, min_size in ((2048, 1), (1, 2000)):
        with pytest.raises(InvalidArgument) as excinfo:
            check_tiling(64, 0, multiple, overlap_given=False, min_size=min_size)
        message = str(excinfo.value)
        assert message.startswith("tile_size: no tile_size up to 1024 can tile this model"), message


@pytest.mark.parametrize(("tile", "overlap", "multiple"), [(48, 8, 16), (16, 0, 16), (128, 32, 1), (8, 0, 1)])
def test_tile_settings_that_can_be_planned_pass_and_plan(tile: int, overlap: int, multiple: int) -> None:
    check_tiling(tile, overlap, multiple)
    assert plan_tiles(4 * tile, 3 * tile, tile, overlap, multiple)  # the planner agrees


@pytest.mark.parametrize(
    "values",
    [
        np.array([[[0.5, np.nan]]], np.float32),
        np.array([[[np.nan, 0.5]]], np.float32),
        np.full((1, 2, 2), np.nan, np.float32),
    ],
)
def test_input_range_refuses_a_nan_naming_the_field(values: np.ndarray) -> None:
    """A NaN is in no range: input_range refuses it itself, not only behind its callers' finiteness
    checks (NaN's min and max are NaN, which no comparison with the bounds finds)."""
    with pytest.raises(InvalidArgument) as excinfo:
        check_input_range(values, (0.0, 1.0), "images[0]")
    assert str(excinfo.value).startswith("images[0]: ")
    assert "NaN" in str(excinfo.value)
    check_input_range(np.array([[[0.0, 1.0]]], np.float32), (0.0, 1.0), "images[0]")


@pytest.mark.parametrize("sent", ["a b", "id method=Evil", 'x"y', "tab\there", "x" * 129, "", "caf\u00e9"])
def test_a_request_id_that_could_forge_log_fields_is_replaced(service: Boundary, sent: str) -> None:
    async def handler(request: object, call: Call) -> str:
        return "response"

    context = FakeContext((("x-request-id", sent),))
    assert call_unary(service, handler, context) == "response"
    request_id = dict(context.trailing)["x-request-id"]
    assert request_id != sent and len(request_id) == 32


@pytest.mark.parametrize(
    "sent", ["trace-1.2:abc/DEF+x_9", "x" * 128], ids=["every-allowed-character", "128-chars"]
)
def test_a_safe_request_id_is_kept(service: Boundary, sent: str) -> None:
    """docs/metrics.md: a safe token of at most 128 characters is the call's id (129 are replaced)."""

    async def handler(request: object, call: Call) -> str:
        return "response"

    context = FakeContext((("x-request-id", sent),))
    call_unary(service, handler, context)
    assert dict(context.trailing)["x-request-id"] == sent


@pytest.mark.parametrize("echoed", ["a" * 5_000, "\u00e9" * 5_000, "\U0001f600" * 3_000])
def test_a_long_message_keeps_its_field_and_its_limit(echoed: str) -> None:
    error = invalid("images[0].name", f"unknown name {echoed!r}; must be at most 64 characters")
    encoded = error.message.encode()
    assert len(encoded) <= MAX_MESSAGE_BYTES + 64
    assert error.message.startswith("images[0].name: unknown name")
    assert error.message.endswith("must be at most 64 characters")
    assert "characters left out" in error.message
    assert invalid("count", "must be in 1..64, got 0").message == "count: must be in 1..64, got 0"


class ExpiringContext(FakeContext):
    """A call whose deadline is `remaining_s` away when the handler starts."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__()
        self.remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self.remaining_s


@pytest.mark.parametrize("ending", ["invalid", "internal", "cancelled"])
def test_a_call_that_fails_or_is_cancelled_after_reserving_its_response_bytes_gives_them_back(
    service: Boundary, ending: str
) -> None:
    """A call holds its response's predicted bytes from before compute; one that then fails (a
    refusal, a bug) or is cancelled sends nothing: its bytes go back to the response budget, or each
    such call shrank the budget for good until every call waited and was refused."""
    budget = ByteBudget("response budget (response_budget_bytes)", 1000, max_wait_s=1.0)

    async def handler(request: object, call: Call) -> None:
        call.response = Reservation(budget)
        await call.response.reserve(600, None, "Sample")
        assert budget.held == 600
        if ending == "cancelled":
            raise asyncio.CancelledError
        raise invalid("count", "must be in 1..8, got 9") if ending == "invalid" else RuntimeError("bug")

    with pytest.raises((Aborted, asyncio.CancelledError)):
        call_unary(service, handler, FakeContext())
    assert budget.held == 0


def test_a_handler_that_fails_after_its_deadline_sends_no_status(service: Boundary) -> None:
    """gRPC has ended a call whose deadline passed (with DEADLINE_EXCEEDED): a status sent then fails
    in gRPC's core, which grpc logs as 'ExecuteBatchError raised in core' at ERROR with a traceback
    through genserve's frames. It happened under load when a handler finished (the batcher's 'deadline
    passed before the request was queued') before gRPC's cancellation of it ran: the handler must
    leave the call to gRPC, as one that gRPC cancelled in time does, and count DEADLINE_EXCEEDED."""
    from genserve_server.errors import DeadlineExceeded

    async def handler(request: object, call: Call) -> None:
        await asyncio.sleep(0.02)  # past the deadline, and not cancelled (a fake context)
        raise DeadlineExceeded("model m version 1: deadline passed before the request was queued")

    context = ExpiringContext(0.005)
    with pytest.raises(asyncio.CancelledError):
        call_unary(service, handler, context)
    assert context.aborted is None
    assert service.metrics.requests.labels("", "", "Sample", "DEADLINE_EXCEEDED")._value.get() == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (invalid("output", "the response would be 70000000 bytes, above max_send_message_bytes"), "invalid"),
        ("unavailable", "not_ready"),
    ],
)
def test_an_error_found_after_the_deadline_counts_as_the_deadline_only(
    service: Boundary, error: Any, reason: str
) -> None:
    """An INVALID_ARGUMENT found after compute (a response over the send limit) or an UNAVAILABLE (a
    version unloaded under a queued call) once the deadline has passed: the client gets
    DEADLINE_EXCEEDED from gRPC and the call counts DEADLINE_EXCEEDED, but it was also counted in
    genserve_requests_rejected_total{reason="invalid"|"not_ready"}, a refusal its client never saw
    (metrics.md: `invalid` every INVALID_ARGUMENT, `not_ready` every UNAVAILABLE)."""
    from genserve_server.errors import Unavailable

    exc = Unavailable("model m version 1 shut down") if error == "unavailable" else error

    async def handler(request: object, call: Call) -> None:
        await asyncio.sleep(0.02)  # past the deadline, and not cancelled (a fake context)
        raise exc

    context = ExpiringContext(0.005)
    with pytest.raises(asyncio.CancelledError):
        call_unary(service, handler, context)
    metrics = service.metrics
    assert metrics.requests.labels("", "", "Sample", "DEADLINE_EXCEEDED")._value.get() == 1
    assert metrics.requests_rejected.labels("", "", reason)._value.get() == 0


@pytest.mark.parametrize(
    ("error", "code", "reason", "other"),
    [
        (
            invalid("count", "must be in 1..8, got 9"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid",
            "not_ready",
        ),
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "not_ready", "invalid"),
    ],
)
def test_a_refusal_before_the_deadline_counts_under_its_own_reason(
    service: Boundary, error: Any, code: grpc.StatusCode, reason: str, other: str
) -> None:
    """docs/metrics.md: genserve_requests_rejected_total counts every INVALID_ARGUMENT as `invalid`
    and every UNAVAILABLE as `not_ready`, once, and not under the other reason."""
    from genserve_server.errors import Unavailable

    exc = Unavailable("model m version 1 shut down") if error == "unavailable" else error

    async def handler(request: object, call: Call) -> None:
        raise exc

    context = FakeContext()
    with pytest.raises(Aborted):
        call_unary(service, handler, context)
    assert context.aborted is not None and context.aborted[0] == code
    metrics = service.metrics
    assert metrics.requests_rejected.labels("", "", reason)._value.get() == 1
    assert metrics.requests_rejected.labels("", "", other)._value.get() == 0


def test_a_response_ready_after_its_deadline_is_not_sent(service: Boundary) -> None:
    async def handler(request: object, call: Call) -> str:
        await asyncio.sleep(0.02)
        return "too late"

    context = ExpiringContext(0.005)
    with pytest.raises(asyncio.CancelledError):
        call_unary(service, handler, context)
    assert context.trailing == ()
    assert service.metrics.requests.labels("", "", "Sample", "DEADLINE_EXCEEDED")._value.get() == 1
    assert service.metrics.requests.labels("", "", "Sample", "OK")._value.get() == 0


def test_an_error_before_the_deadline_is_still_sent(service: Boundary) -> None:
    async def handler(request: object, call: Call) -> None:
        raise ResourceExhausted("model m version 1: queue full")

    context = ExpiringContext(5.0)
    with pytest.raises(Aborted):
        call_unary(service, handler, context)
    assert context.aborted == (grpc.StatusCode.RESOURCE_EXHAUSTED, "model m version 1: queue full")


def test_an_admission_refusal_past_the_deadline_sends_no_status() -> None:
    """abort() serves the admission refusals (max_concurrent_rpcs) too: past the call's deadline it
    leaves the call to gRPC (grpc logged the failed send as ExecuteBatchError with a traceback)."""
    from genserve_server.boundary import abort

    context = ExpiringContext(-0.001)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(abort(context, ResourceExhausted("2 generation calls running (max_concurrent_rpcs)")))  # type: ignore[arg-type]
    assert context.aborted is None


def test_a_metadata_rpc_that_fails_unexpectedly_answers_internal_without_python_details(
    service: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    """KServe's ModelReady/ModelMetadata/ModelConfig/ModelStatistics go through `plain`: an
    unexpected exception there must be INTERNAL naming the request id, as in `unary`, never grpc's
    UNKNOWN "Unexpected <class 'ValueError'>: ..." carrying the exception's text to the client."""

    async def handler() -> None:
        raise ValueError("Value out of range: 5000000000 secret internals")

    context = FakeContext((("x-request-id", "req-7"),))
    with pytest.raises(Aborted):
        asyncio.run(service.plain(context, handler))  # type: ignore[arg-type]
    assert context.aborted == (grpc.StatusCode.INTERNAL, "internal error (request id req-7)")
    assert ("x-request-id", "req-7") in context.trailing
    assert "secret internals" in caplog.text  # the traceback goes to the log only


def test_a_method_no_service_has_is_counted_under_one_method_label_with_the_code_its_client_gets(
    service: Boundary,
) -> None:
    """docs/metrics.md: genserve_requests_total counts every refused call; one of a method no service
    has was counted nowhere. It counts under model="" and one method label whatever the path (the
    client's path would be a new series each), as UNIMPLEMENTED, or DEADLINE_EXCEEDED where its
    deadline had passed (gRPC answers it, no status is sent)."""
    with pytest.raises(Aborted):
        asyncio.run(service.unknown_method("/foo/bar", FakeContext()))  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(service.unknown_method("/genserve.v1.GenerationService/NoSuch", ExpiringContext(-0.001)))  # type: ignore[arg-type]
    requests = service.metrics.requests
    assert requests.labels("", "", "", "UNIMPLEMENTED")._value.get() == 1
    assert requests.labels("", "", "", "DEADLINE_EXCEEDED")._value.get() == 1
    methods = {sample.labels["method"] for family in requests.collect() for sample in family.samples}
    assert methods == {""}


def test_a_method_no_service_has_is_named_in_its_status_with_its_control_characters_escaped(
    service: Boundary,
) -> None:
    """The UNIMPLEMENTED status quoted the client's :path as it came, its newline, ESC, BEL and C1
    CSI in the message a client prints (grpcurl, a CLI's error line, a proxy's log): line breaks and
    terminal escapes of the caller's choosing. Every other message that quotes a client's string (a
    model, version or tensor name) has them escaped as a repr writes them (GenserveError.redacted);
    the method is named so too, a plain one as it is."""
    path = "/x\n2026-01-01 INFO forged\x1b[2J\x1b]0;title\x07\r\x9b2J/y"
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(service.unknown_method(path, context))  # type: ignore[arg-type]
    assert context.aborted is not None
    code, details = context.aborted
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert details == (
        "method /x\\n2026-01-01 INFO forged\\x1b[2J\\x1b]0;title\\x07\\r\\x9b2J/y not found: "
        "no service of this server has it"
    ), details
    plain = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(service.unknown_method("/foo.Bar/Baz", plain))  # type: ignore[arg-type]
    assert plain.aborted == (
        grpc.StatusCode.UNIMPLEMENTED,
        "method /foo.Bar/Baz not found: no service of this server has it",
    )


def test_a_long_plain_method_is_cut_in_its_refusal_line_as_other_client_strings_are(
    service: Boundary, caplog: pytest.LogCaptureFixture
) -> None:
    """A method no service has, its :path plain characters (up to gRPC's 16 KiB of headers), was
    written whole on the refusal line, where every other client string a log line quotes (a
    control-character path included) is cut to MAX_MESSAGE_BYTES."""
    path = "/a." + "b" * 15000 + "/C"
    with caplog.at_level(logging.INFO):
        with pytest.raises(Aborted):
            asyncio.run(service.unknown_method(path, FakeContext()))  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "code=UNIMPLEMENTED" in r.getMessage()]
    assert lines, caplog.text
    assert all(len(line) < 2 * MAX_MESSAGE_BYTES and "characters left out" in line for line in lines), [
        len(line) for line in lines
    ]


@pytest.mark.parametrize(("sent", "shown"), [(10.0001, "10.0001"), (-0.1, "-0.1"), (1e30, "1e+30")])
def test_a_psi_refusal_names_the_float32_the_client_sent_as_it_wrote_it(sent: float, shown: str) -> None:
    """genserve.v1's truncation_psi is a proto float: 10.0001 arrives as 10.000100135803223, which
    the refusal quoted, a number the client never wrote."""
    with pytest.raises(InvalidArgument) as refused:
        check_psi(float(np.float32(sent)))
    assert str(refused.value).endswith(f"got {shown}"), refused.value
