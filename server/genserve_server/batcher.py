"""Dynamic batching for one model version (modelled on Ray Serve's batching.py).

The batcher knows rows and futures, not ONNX or protobuf. A request is a typed record holding
`n_rows` rows of input tensors (images to generate, or SR tiles), its lane, deadline and future.
Rows of many requests are concatenated into batches of at most `max_batch_size`; a request may be
split across batches and is reassembled in row order before its future resolves.

Scheduling:
- one sub-queue per (lane, compatibility key): only rows with the same key share a batch (e.g.
  the input shape for image kinds; seeds, labels and psi mix freely); the next served is the one whose
  longest-waiting request (since admission, or since its rows were last taken) waited longest;
- the INTERACTIVE lane always forms batches before the BULK lane;
- fair shares within a sub-queue (_take): a batch's rows are shared max-min among the waiting
  requests, the fewest rows left first, one place kept for the longest-waiting one; a big request
  gives each batch a slice, a one-row request goes in the next batch, one-row requests in order;
- block on an Event for the first row, then wait out the window (started at the oldest row's
  arrival) on the same Event -- never poll. A batch that holds exactly a preferred size
  (`preferred_batch_sizes`) goes before its window ends when no request is on its way and the recent
  arrival rate would not bring the next preferred size within the window (closes_at_preferred).
  A batch of tracked callers goes without its window when fewer than one request a window arrived
  lately and those arrivals mostly found no other caller in the server (arrivals.Arrivals.sparse): a
  light open loop does not hold a lone request for a second one that is unlikely to come in time.
  Adaptive: when the runner is idle and no other request is queued or on its way (`callers`, kept
  by the service) the batch goes at once, so batching costs nothing at concurrency 1; an idle
  runner waits the window only while arrivals overlapped recently (a moving fraction of arrivals,
  and the last overlap within OVERLAP_MEMORY_S). A queued request's deadline ends the window early
  enough for the batch to compute before it (_window_end);
- the queue is bounded in rows: a request that does not fit is refused at once (ResourceExhausted);
  rows reserved for an RPC's later request (`reserved`: a code prior's decode, queued once its grids
  are sampled) count as queued from the reservation on, and that request is never refused;
- rows of a request whose deadline passed are dropped before compute; a cancelled caller's rows
  leave the queue at once.

Every future is resolved exactly once on every path: a failing batch fails only its own requests,
and of those only the rows that fail again when the batch is retried in halves (see _isolate).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator
from typing import Any

import numpy as np

from genserve_contract.config import BatchingConfig
from genserve_server.arrivals import OVERLAP_MEMORY_S, Arrivals, closes_at_preferred
from genserve_server.batch_events import (
    CLOSED_ALL_QUEUED,
    CLOSED_AT_ONCE,
    CLOSED_DEADLINE,
    CLOSED_FULL,
    CLOSED_PREFERRED,
    CLOSED_SHARED,
    CLOSED_SPARSE,
    CLOSED_WINDOW,
    CLOSED_YIELDED,
    BatchObserver,
    NullObserver,
)
from genserve_server.batch_parts import (
    OFF_LOOP_COPY_BYTES,
    Caller,
    Held,
    Part,
    PendingRequest,
    QueueReservation,
    Tensors,
    allocate,
    concat,
    copy_bytes,
    count_once,
    fair_shares,
    fan_out,
    live,
    place,
    resolve,
    set_exception_if_not_done,
    split,
)
from genserve_server.batch_parts import (
    BatchResult as BatchResult,
)
from genserve_server.batch_parts import (
    Lane as Lane,
)
from genserve_server.errors import (
    DeadlineExceeded,
    GenserveError,
    Internal,
    InvalidArgument,
    ModelCallAborted,
    ResourceExhausted,
    Unavailable,
    out_of_memory,
    out_of_memory_refusal,
)
from genserve_server.idle_spin import run_off_loop

logger = logging.getLogger(__name__)

# run_batch(key, inputs) -> outputs; every output's axis 0 must equal the inputs' row count.
RunBatch = Callable[[Hashable, Tensors], Awaitable[Tensors]]


_DEFAULTS = BatchingConfig()  # config.json's defaults: declared once, in the contract
# A handler cancelled at the call's deadline may be cancelled a little before the deadline the
# server computes from time_remaining() at arrival (the client's own cancel at its deadline, its
# request having reached the server later than it was sent): a cancellation this close to the
# deadline counts as the deadline. One more than this early reads as the client going away.
DEADLINE_SLACK_S = 0.01
# A failed batch's stack goes to the log at most this often per model version (each failure still
# logs its line): a model that fails every batch would otherwise log the same stack per call.
FAILURE_TRACEBACK_INTERVAL_S = 60.0
# The cancel message of a part withdrawn because another part of the same request failed
# (core.gather_or_cancel): its rows leave, and the request is counted as that failure only, not as
# a caller that went away as well.
WITHDRAWN = "withdrawn: another part of the request failed"


def _by_admission(chosen: tuple[PendingRequest, int]) -> int:
    return chosen[0].seq


def _expired(request: PendingRequest, now: float) -> bool:
    return request.deadline is not None and now >= request.deadline


def _waiting_since(queue: deque[PendingRequest]) -> float:
    """Since when the longest-waiting request of a sub-queue has waited: a started request since its
    rows were last taken (as _take's turns count it), an untouched one since its admission. The
    queue holds the started requests first, then the untouched ones in admission order.

    Not the head's admission: a started big request keeps that while its sub-queue's batches share
    its rows with requests admitted later, and a request of another key admitted after it waited
    until it was done (every later request of the busy key overtaking it)."""
    since = math.inf
    for request in queue:
        if request.next_row == 0:
            return min(since, request.enqueued_at)
        since = min(since, request.last_dispatch_at)
    return since


def _check_fits(reservation: QueueReservation, n_rows: int, lane: Lane) -> None:
    """A request submitted into a reservation: interactive, at most its rows queued at a time."""
    if lane != Lane.INTERACTIVE or reservation.ended or reservation.queued + n_rows > reservation.rows:
        raise ValueError(
            f"{n_rows} {lane.name} rows do not fit the reservation ({reservation.queued} of "
            f"{reservation.rows} queued, ended={reservation.ended})"
        )


def _gone(request: PendingRequest, now: float) -> bool:
    """Whether a queued request will not be computed: answered (failed, cancelled) or past its deadline."""
    return request.future.done() or _expired(request, now)


def withdrawn(future: asyncio.Future[Any]) -> bool:
    """Whether `future` was cancelled with the WITHDRAWN message (a Task cancelled with a message
    passes it to the future it awaits): a batcher's request's, or a step scheduler's row's."""
    if not future.cancelled():
        return False
    try:
        future.result()
    except asyncio.CancelledError as exc:
        return exc.args == (WITHDRAWN,)
    return False  # pragma: no cover - a cancelled future always raises


def _filled(parts: list[Part], full: int, share: int | None) -> str:
    """Why a batch that waited out no window goes now, from the rows it took: its row limit, its
    side-by-side share, or at once (nothing more expected, or closing)."""
    taken = sum(p.rows for p in parts)
    if taken >= full:
        return CLOSED_FULL
    return CLOSED_SHARED if share is not None and taken >= share else CLOSED_AT_ONCE


def request_ids(parts: list[Part]) -> str:
    """The request ids of the RPCs whose rows `parts` hold, for a log line about them (each id once,
    in batch order; `-` for a request of no RPC): a failed model call fails every one of them, and
    an operator greps the log for the id a client quotes (docs/metrics.md)."""
    return caller_ids(part.request.caller for part in parts)


def caller_ids(callers: Iterable[Caller | None]) -> str:
    """request_ids of the RPCs `callers` (a code prior's step rows': step_sampler)."""
    ids: dict[str, None] = {}
    for caller in callers:
        ids[getattr(caller, "request_id", None) or "-"] = None
    return ",".join(ids)


class FailureLog:
    """The line of a failed model call of one model version (docs/operations.md, "Faults"): a
    batcher's failed batch, a code prior's failed step. `name`: "model M version N"."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._next_traceback_at = 0.0  # time.monotonic(): a failed call's next stack to log

    def write(self, call: str, ids: str, outcome: str, error: Exception) -> None:
        """One line naming the model and version, the call (`call`: "batch of 4 rows from 2
        requests"), the request ids of the RPCs it held, what came of it (`outcome`, "" or "; ...")
        and the error; its stack at most once per FAILURE_TRACEBACK_INTERVAL_S."""
        short = out_of_memory(error)
        if short:  # an operator's matter (the requests' sizes, the container's memory), not a bug
            logger.warning(
                "%s: %s ran out of memory (request_ids=%s)%s: %s; send smaller requests, lower "
                "max_sr_input_pixels or max_batch_size, or give the server more memory "
                '(docs/operations.md, "Memory budgets")',
                self.name,
                call,
                ids,
                outcome,
                short,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            return
        # The stack once per FAILURE_TRACEBACK_INTERVAL_S: a model whose every batch fails wrote
        # ~25 lines a failed call (each half retried logs too); every failed call keeps its line.
        now = time.monotonic()
        stack = not isinstance(error, GenserveError) and now >= self._next_traceback_at
        if stack:
            self._next_traceback_at = now + FAILURE_TRACEBACK_INTERVAL_S
        logger.error(
            "%s: %s failed (request_ids=%s)%s: %r%s",
            self.name,
            call,
            ids,
            outcome,
            error,
            ""
            if stack or isinstance(error, GenserveError)
            else " (its stack: logged with an earlier failure, once a minute)",
            exc_info=error if stack else None,
        )


def model_call_failure(name: str, error: Exception) -> GenserveError:
    """What the requests of a failed model call of `name` get, marked logged (FailureLog's line names
    their ids): RESOURCE_EXHAUSTED where memory ran out, else INTERNAL "model call failed" (the
    runtime's message in the log only), or the GenserveError's message."""
    failure: GenserveError
    if out_of_memory(error):  # a container's memory limit, a GPU arena's cap: not a model fault
        failure = out_of_memory_refusal(name, " (see the server log)")
    else:
        failure = Internal(str(error) if isinstance(error, GenserveError) else f"{name}: model call failed")
    failure.logged = True
    return failure


def cancelled_by_deadline(deadline: float | None, now: float | None = None) -> bool:
    """Whether a cancellation at `now` (default: `time.monotonic()`, the clock of gRPC deadlines) is
    gRPC ending the call at its deadline (seconds on the same clock; None = no deadline), not the
    client going away."""
    if deadline is None:
        return False
    return (time.monotonic() if now is None else now) >= deadline - DEADLINE_SLACK_S


def drop_reason(deadline: float | None, now: float) -> str:
    """genserve_requests_dropped_total's reason for a request whose caller's handler was cancelled
    at `now`: "deadline" where that was gRPC ending the call at its deadline, else "cancelled"."""
    return "deadline" if cancelled_by_deadline(deadline, now) else "cancelled"


class Batcher:
    """One per model version. `submit()` from request handlers; `start()`/`close()` by the lifecycle."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        name: str,
        model: str | None = None,
        version: str = "",
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        concurrency: int = 1,
        observer: BatchObserver | None = None,
        bulk_budget_s: float | None = _DEFAULTS.bulk_budget_s,
        bulk_idle_budget_s: float | None = _DEFAULTS.bulk_idle_budget_s,
        interactive_quiet_s: float = _DEFAULTS.interactive_quiet_s,
        efficient_batch_size: int | None = None,
        rows_limit: Callable[[Hashable], int] | None = None,
        run_bulk_batch: RunBatch | None = None,
        preferred_batch_sizes: tuple[int, ...] = (),
        share_side_by_side: bool = False,
        runs_on_loop: Callable[[Hashable, Tensors], bool] | None = None,
        row_cost_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.name = name  # "model version N", for messages
        # The debug batch line's model= and version= fields (docs/metrics.md: key=value pairs, as the
        # request line's, so that a grep for model=M finds both).
        self._log_model = name if model is None else model
        self._log_version = version
        # Every time the batcher reads: arrivals and the signals kept from them (the overlap memory,
        # the callers' peak, the rates), windows, deadlines (gRPC's are on time.monotonic) and compute
        # times. A test moves its own clock past a memory instead of sleeping past it, which a loaded
        # machine's stall stretches. The waits themselves (a window's timer) stay on the event loop.
        self._clock = clock
        # Rows a batch takes at most: max_batch_size, or less where the warm-up measured that larger
        # batches compute no item faster (loader.efficient_batch_size).
        self.max_batch_size = min(max_batch_size, efficient_batch_size or max_batch_size)
        # Rows a batch of one compatibility key may take at most (e.g. fewer rows of larger images:
        # loader.rows_within_pixels); None = max_batch_size for every key.
        self._rows_limit = rows_limit
        # Whether a batch that starts beside running ones is capped to its even share of the rows
        # (_side_by_side_share): where a batch's compute grows with its rows (the CPU).
        self.share_side_by_side = share_side_by_side
        # Whether the runner would run a batch shaped like the given inputs on the event loop
        # (Runner.would_run_inline): a batch is split over free instances only where its parts run
        # side by side on the pool (_split_over_free). None: not known, no split.
        self._runs_on_loop = runs_on_loop
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        # Sizes a batch may close at before its window ends (closes_at_preferred); () = none: the
        # window and the callers alone decide, as without the setting.
        self.preferred_batch_sizes = tuple(sorted(set(preferred_batch_sizes)))
        # The signals of rows on their way (callers, overlaps, rate): whether the window pays off.
        self._arrivals = Arrivals(max_queue_delay_s, track_rate=bool(self.preferred_batch_sizes))
        self._run_batch = run_batch
        # BULK batches go here when set (Runner.run_bulk: threads the OS schedules after everyone
        # else's, so a running bulk batch yields the cores to interactive work); else to run_batch.
        self._run_bulk_batch = run_bulk_batch or run_batch
        self._observer: BatchObserver = observer or NullObserver()
        # (lane) -> key -> FIFO of requests with rows still to take. Dicts keep insertion order.
        self._lanes: tuple[dict[Hashable, deque[PendingRequest]], ...] = ({}, {})
        self._rows_by_key: dict[tuple[Lane, Hashable], int] = {}
        self._queued_rows = 0
        self._queued_requests = 0
        # Rows held by reservations (`reserved`), and of those the rows queued now: the queue's rows
        # taken are the queued ones and the reserved ones not queued yet (_rows_taken).
        self._reserved_rows = 0
        self._reserved_queued = 0
        # Bulk rows may fill at most half the queue, and a bulk submit that finds no room waits for
        # it (backpressure on a stream) instead of failing: interactive requests, which fail fast
        # when the queue is full, always find the other half.
        self._bulk_rows = 0
        # Bulk submits waiting for room, in arrival order: room goes first come, first served, so a
        # large chunk is not overtaken forever by smaller ones that happen to fit.
        self._bulk_line: deque[object] = deque()
        self._room = asyncio.Event()
        self._available = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._bulk_in_flight = 0
        self._batches_in_flight = 0
        self._interactive_rows_in_flight = 0  # rows of the INTERACTIVE batches running now
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        # RPCs of this model version now in the server, kept through hold/release (0 = not tracked).
        # More callers than queued requests means more rows are about to arrive: worth the window.
        self.callers = 0
        # SampleStreams now reading from this version (hold(stream=True); a reload drains them).
        self.streams = 0
        # RPCs of another model that use this version beside their own (hold(dependent=True): a code
        # prior's decoder or top prior, a style generator's mapping). Untracked like streams: such an
        # RPC may submit rows only seconds later (after its prior's steps), so the batching signals
        # leave it out; a reload's drain waits for it all the same.
        self.dependents = 0
        # Set while no RPC holds this version: what a reload's drain awaits (wait_released).
        self._released = asyncio.Event()
        self._released.set()
        # Priority: while interactive requests arrive (one seen within interactive_quiet_s), a BULK
        # batch is cut to what computes in about bulk_budget_s (from the measured cost of a row), so
        # an interactive request waits at most that long for the runner. On a CPU a running batch
        # cannot be preempted: its size is the only lever. With no interactive traffic a bulk batch
        # still stays within bulk_idle_budget_s, which bounds the wait of the first interactive
        # request to arrive (None: full batches).
        self.bulk_budget_s = bulk_budget_s
        self.bulk_idle_budget_s = bulk_idle_budget_s
        self.interactive_quiet_s = interactive_quiet_s
        self._last_interactive_at = -math.inf
        # Last time an interactive request arrived while more tracked callers than runner instances
        # were in the server (SampleStreams are not tracked callers): see callers_overlap.
        self._callers_overlapped_at = -math.inf
        # Moving average of compute seconds per row (0 = not measured yet); `row_cost_s`: where it
        # starts (the warm-up's, Calibration.row_cost_s), so that a fresh version's first bulk batch
        # keeps to the budgets too. One that is not a cost (0, NaN, negative) is not measured.
        self._row_cost_s = row_cost_s if math.isfinite(row_cost_s) and row_cost_s > 0 else 0.0
        self._failures = FailureLog(name)
        # The sub-queue whose rows a split left for the next batches (_split_over_free): they go at
        # once, without a window of their own (None: no split pending).
        self._split_rest: tuple[Lane, Hashable] | None = None
        # Batches formed and requests admitted so far: the round-robin turns (PendingRequest.turn).
        self._batches_formed = 0
        self._admitted = 0

    # ------------------------------------------------------------------ public

    # ------------------------------------------------------------------ holds (a reload's drain)

    def hold(self, *, stream: bool = False, dependent: bool = False) -> None:
        """An RPC resolved this version: it may still submit rows (a SampleStream, chunk after chunk;
        `dependent`: an RPC of another model that uses this one, e.g. a code prior's decoder)."""
        if stream:
            self.streams += 1
        elif dependent:
            self.dependents += 1
        else:
            self.callers += 1
        self._released.clear()

    def release(self, *, stream: bool = False, dependent: bool = False) -> None:
        """The RPC that held this version has ended (the same flags as its `hold`)."""
        if stream:
            self.streams -= 1
        elif dependent:
            self.dependents -= 1
        else:
            self.callers -= 1
        if self.callers + self.streams + self.dependents <= 0:
            self._released.set()

    async def wait_released(self, timeout_s: float) -> bool:
        """Until no RPC holds this version, or `timeout_s`; whether it was released."""
        if self._released.is_set():
            return True
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns True and drops a cancel
            # that crosses the release (the drain's, as its version is revived or the server stops).
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._released.wait()
        except TimeoutError:
            return False
        return True

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def concurrency(self) -> int:
        """Batches run at once (the model's instances): a working-set estimate counts as many of one
        call's batches computed together (core.image_working_set)."""
        return self._concurrency

    @property
    def queued_interactive_rows(self) -> int:
        return self._queued_rows - self._bulk_rows

    def _rows_taken(self) -> int:
        """Rows of max_queue_size taken: those queued and those reserved (`reserved`) not queued yet."""
        return self._queued_rows - self._reserved_queued + self._reserved_rows

    def _too_large(self, n_rows: int) -> InvalidArgument | None:
        if n_rows <= self.max_queue_size:
            return None
        return InvalidArgument(
            f"{self.name}: the request needs {n_rows} items, more than the whole queue holds "
            f"(max_queue_size={self.max_queue_size}); split it into smaller requests"
        )

    def _queue_full(self, n_rows: int, caller: Caller | None) -> ResourceExhausted:
        """An interactive request (or a reservation) the queue has no room for: counted once per RPC,
        `queue_full` under this batcher's model. An RPC's is counted by the boundary as it answers,
        under the status its client gets (a stream's chunk computed ahead, or its decode, is refused
        a loop turn or more before that: the client may have cancelled or the deadline passed
        meanwhile: Caller.refused); a request of its own, here."""
        if caller is None:
            self._observer.on_rejected("queue_full")
        else:
            caller.refused = (self._observer, "queue_full")
        held = self._reserved_rows - self._reserved_queued
        held_note = f", {held} more reserved for requests on their way" if held else ""
        return ResourceExhausted(
            f"{self.name}: queue full ({self._queued_rows} of max_queue_size={self.max_queue_size} items "
            f"waiting{held_note}, request needs {n_rows}); retry with backoff"
        )

    @contextlib.contextmanager
    def reserved(
        self, n_rows: int, caller: Caller | None = None, deadline: float | None = None, *, once: bool = False
    ) -> Iterator[QueueReservation]:
        """Hold `n_rows` of the queue for a request `caller` submits later (a code prior's decode,
        queued only once its grids are sampled, seconds on), until the block ends: refused now as an
        interactive submit of them would be (queue full: ResourceExhausted, counted once per RPC;
        `deadline` passed, full or not: DeadlineExceeded, a deadline drop), and counted as queued
        meanwhile, so that the request submitted with `reservation=` (one at a time, at most
        `n_rows`) is never refused 'queue full' after the work it waited for. `once`: for one
        request, whose rows leave the reservation as they leave the queue (QueueReservation.once)."""
        if self._closing:
            raise self._draining()
        if (too_large := self._too_large(n_rows)) is not None:
            raise too_large
        if deadline is not None and self._clock() >= deadline:
            raise self._deadline_passed(caller)  # as submit: never a queue_full refusal
        if self._rows_taken() + n_rows > self.max_queue_size:
            raise self._queue_full(n_rows, caller)
        reservation = QueueReservation(n_rows, once=once)
        self._reserved_rows += n_rows
        try:
            yield reservation
        finally:
            # Rows of it still queued (a request failed by an earlier batch of its rows, not yet
            # dropped by _take) count as any other queued rows from now on.
            reservation.ended = True
            self._reserved_rows -= reservation.rows
            self._reserved_queued -= reservation.queued
            if self._bulk_line:
                self._room.set()

    def interactive_work_beside(self) -> bool:
        """Whether interactive rows wait or another interactive batch has been formed beside the one
        asking (the runner's solo-session rule: then a batch keeps to one thread)."""
        return self.queued_interactive_rows > 0 or self._batches_in_flight - self._bulk_in_flight > 1

    def work_beside(self) -> bool:
        """interactive_work_beside, bulk rows and batches counted too."""
        return self._queued_rows > 0 or self._batches_in_flight > 1

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._dispatch_loop(), name=self.name)

    async def submit(
        self,
        key: Hashable,
        inputs: Tensors,
        n_rows: int,
        *,
        lane: Lane = Lane.INTERACTIVE,
        deadline: float | None = None,
        caller: Caller | None = None,
        held: Held | None = None,
        reservation: QueueReservation | None = None,
        computing: list[asyncio.Future[None]] | None = None,
    ) -> BatchResult:
        """Queue `n_rows` rows (axis 0 of every input) and wait for their outputs. `caller`: the RPC
        the rows belong to (core.Call), counted once as refused or dropped, whatever number of the
        requests it queued leave (None: a request of its own). `held`: what that RPC holds that a
        BULK request gives back while it waits for room (its response's bytes: batch_parts.Held).
        `reservation`: rows of the queue that RPC holds (`reserved`), which an INTERACTIVE request
        queues into instead of being refused 'queue full'. `computing`: where a request cancelled
        while batches holding its rows still compute adds a future resolved once they have ended
        (their inputs, intermediates and outputs alive until then: core.holding_working_set)."""
        # Refusals that raise InvalidArgument or Unavailable are counted once, by the service's error
        # path; queue_full (ResourceExhausted) here for a request of its own, else marked on its
        # `caller` for the boundary (_queue_full).
        if self._closing:
            raise self._draining()
        if n_rows < 1:
            raise ValueError(f"n_rows must be >= 1, got {n_rows}")
        if (too_large := self._too_large(n_rows)) is not None:
            raise too_large
        in_time = True
        if reservation is not None:
            _check_fits(reservation, n_rows, lane)
        elif lane == Lane.BULK:
            in_time = await self._bulk_room(n_rows, deadline, caller, held)
        elif deadline is not None and self._clock() >= deadline:
            in_time = False  # a deadline drop below, full queue or not: its client gets DEADLINE_EXCEEDED
        elif self._rows_taken() + n_rows > self.max_queue_size:
            raise self._queue_full(n_rows, caller)
        now = self._clock()
        if deadline is not None and (now >= deadline or not in_time):
            raise self._deadline_passed(caller)
        if lane == Lane.INTERACTIVE:
            self._last_interactive_at = now
            # More callers than instances, other interactive rows among them (a unary BULK caller
            # beside a lone interactive one does not make it concurrent traffic).
            crowded = self.callers > max(1, self._concurrency)
            if crowded and (self.queued_interactive_rows or self._interactive_rows_in_flight):
                self._callers_overlapped_at = now
        self._arrivals.arrived(now, n_rows, self.callers, self._queued_requests)
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._admitted += 1
        request = PendingRequest(
            key,
            inputs,
            n_rows,
            lane,
            deadline,
            now,
            future,
            turn=self._batches_formed - 0.5,
            seq=self._admitted,
            caller=caller,
            reservation=reservation,
        )
        self._add_rows(request)
        try:
            return await future
        except asyncio.CancelledError as exc:
            # The caller was cancelled (asyncio cancels `future` too): its rows leave the queue at
            # once, so that a client that gave up never holds room a live request is refused for.
            # Here rather than a done-callback on every future: no extra loop turn per request.
            self._forget_cancelled(request, counted=exc.args != (WITHDRAWN,))
            if computing is not None and request.computing:
                request.computed = asyncio.get_running_loop().create_future()
                computing.append(request.computed)
            raise

    def _add_rows(self, request: PendingRequest) -> None:
        """Queue an admitted request (its rows leave through _remove_rows)."""
        lane, key, n_rows = request.lane, request.key, request.n_rows
        queue = self._lanes[lane].get(key)
        if queue is None:
            queue = self._lanes[lane][key] = deque()
        queue.append(request)
        lk = (lane, key)
        self._rows_by_key[lk] = self._rows_by_key.get(lk, 0) + n_rows
        self._queued_rows += n_rows
        self._queued_requests += 1
        if lane == Lane.BULK:
            self._bulk_rows += n_rows
        if request.reservation is not None:
            request.reservation.queued += n_rows
            self._reserved_queued += n_rows
        self._observer.on_queue_depth(self._queued_rows)
        self._available.set()

    async def _bulk_room(
        self, n_rows: int, deadline: float | None, caller: Caller | None, held: Held | None
    ) -> bool:
        """_wait_for_bulk_room, counting a request that leaves while it waits as a drop."""
        try:
            return await self._wait_for_bulk_room(n_rows, deadline, held)
        except asyncio.CancelledError as exc:
            # The caller went away, or gRPC ended the call at its deadline (a little before the
            # batcher's own timer would), while its rows waited for room: a drop, counted once
            # as _forget_cancelled counts a queued request's (a part WITHDRAWN is not).
            if exc.args != (WITHDRAWN,):
                self._dropped(caller, drop_reason(deadline, self._clock()))
            raise
        except DeadlineExceeded:  # its response bytes, taken back, waited until its deadline
            self._dropped(caller, "deadline")
            raise
        except ResourceExhausted:
            # Its response bytes, taken back first in line, waited for the budget until it ran
            # out: at the deadline the client gets DEADLINE_EXCEEDED (a drop), before it this
            # refusal (`budget`), as core.wait_for_budget counts them: an RPC's by the boundary as
            # it answers, with the clock reading that decides what its client gets (Caller.refused).
            if deadline is not None and self._clock() >= deadline:
                self._dropped(caller, "deadline")
            elif caller is None:
                self._observer.on_rejected("budget")
            else:
                caller.refused = (self._observer, "budget")
            raise

    def _forget_cancelled(self, request: PendingRequest, *, counted: bool = True) -> None:
        """Take a cancelled request's untaken rows out of the queue (rows already in a batch compute
        and are discarded by _fan_out); `counted`: a drop of its own (not a part WITHDRAWN)."""
        queue = self._lanes[request.lane].get(request.key)
        if queue is None or request not in queue:
            return  # all its rows were taken, or _take dropped it first
        queue.remove(request)
        if not queue:
            del self._lanes[request.lane][request.key]
        self._remove_rows(request, request.n_rows - request.next_row, request_gone=True)
        if counted:
            # gRPC cancels a handler whose deadline passed: count that as the deadline, as _take does.
            self._dropped(request.caller, drop_reason(request.deadline, self._clock()))
        self._observer.on_queue_depth(self._queued_rows)

    def _dropped(self, caller: Caller | None, reason: str) -> None:
        """Count a request that leaves before compute, once for its RPC `caller` (Caller), under the
        model that RPC called (a style generator's, for its rows in its mapping's queue)."""
        if count_once(caller):
            (self._observer if caller is None else caller.metrics).on_dropped(reason)

    def _deadline_passed(self, caller: Caller | None) -> DeadlineExceeded:
        """A request whose deadline passed before it was queued (or its rows reserved), full queue or
        not: a deadline drop, counted once per RPC; its client gets DEADLINE_EXCEEDED."""
        self._dropped(caller, "deadline")
        return DeadlineExceeded(f"{self.name}: deadline passed before the request was queued; not computed")

    def _draining(self) -> Unavailable:
        """What a request submitted to (or waiting for room in) a closing batcher gets."""
        return Unavailable(
            f"{self.name} is draining (the server is stopping, or a reload unloaded it); retry"
        )

    def _bulk_fits(self, n_rows: int) -> bool:
        if self._rows_taken() + n_rows > self.max_queue_size:
            return False
        # One bulk request always fits an empty bulk share, even one larger than half the queue.
        return self._bulk_rows == 0 or self._bulk_rows + n_rows <= self.max_queue_size // 2

    async def _wait_for_bulk_room(self, n_rows: int, deadline: float | None, held: Held | None) -> bool:
        """Until the request is first in line and its rows fit the bulk share: True, or False once its
        deadline passed (submit() reports it). `held` is given back while it waits, and taken back
        first in line with room (the bulk submits behind it wait meanwhile)."""
        if not self._bulk_line and self._bulk_fits(n_rows):
            return True
        ticket = object()
        self._bulk_line.append(ticket)
        given_back = False
        try:
            while True:
                # Before the room: a close while it waited (take_back may wait up to
                # budget_max_wait_s) may have stopped the dispatcher, which would never take it.
                if self._closing:
                    raise self._draining()
                if self._bulk_line[0] is ticket and self._bulk_fits(n_rows):
                    if not given_back:
                        return True
                    assert held is not None
                    given_back = False
                    await held.take_back(deadline)
                    continue  # interactive rows may have taken the room while it waited for its own
                timeout_s = None if deadline is None else deadline - self._clock()
                if timeout_s is not None and timeout_s <= 0:
                    return False
                if held is not None and not given_back:
                    held.give_back()
                    given_back = True
                self._room.clear()
                try:
                    async with asyncio.timeout(timeout_s):
                        await self._room.wait()
                except TimeoutError:
                    return False
        finally:
            self._bulk_line.remove(ticket)
            if self._bulk_line:
                self._room.set()  # the next in line looks again: it may fit now

    async def close(self, timeout_s: float) -> None:
        """Refuse new work, finish what was accepted (up to timeout_s), then fail the rest."""
        # One deadline for both waits: the dispatcher itself waits for the batches in flight, so
        # waiting the whole timeout again for them made a close take up to twice timeout_s.
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._closing = True
        self._available.set()  # wake an idle dispatcher so it can exit
        self._room.set()  # and bulk submits waiting for room, so that they fail
        # asyncio.wait, not wait_for(shield(...)): a second close (the shutdown's Repository.close of a
        # version whose reload drain timed out, or one beside it) finds the dispatcher cancelled, and
        # awaiting it again raised CancelledError out of App.stop.
        loop_task = self._loop_task
        if loop_task is not None and not loop_task.done():
            _, running = await asyncio.wait({loop_task}, timeout=max(0.0, timeout_s))
            if running:
                logger.warning("%s: drain timed out after %.1f s; failing what is left", self.name, timeout_s)
                loop_task.cancel()
                await asyncio.wait({loop_task})
        if loop_task is not None and loop_task.done() and not loop_task.cancelled():
            if (crashed := loop_task.exception()) is not None:  # a bug: said, not raised into the shutdown
                logger.error("%s: the dispatcher had failed", self.name, exc_info=crashed)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        self._fail_queued(lambda: Unavailable(f"{self.name} shut down"))

    # ------------------------------------------------------------------ dispatch

    async def _dispatch_loop(self) -> None:
        while True:
            while self._queued_rows == 0:
                if self._closing and not self._tasks:
                    return
                if self._closing:
                    await asyncio.wait(set(self._tasks))
                    continue
                self._available.clear()
                await self._available.wait()
            # Rows keep arriving while all runner instances are busy: that is where batches grow.
            await self._slots.acquire()
            if self._bulk_must_wait():
                self._slots.release()
                await self._wait_for_interactive_or_a_batch()
                continue
            try:
                parts = await self._form_batch()
            except Exception as exc:
                # A bug in batch forming must not kill the dispatcher: the model would stay READY
                # and answer nothing until each caller's deadline. The queued requests fail (their
                # bookkeeping may be off), the error is logged, and the dispatcher goes on.
                self._slots.release()
                logger.exception("%s: forming a batch failed; failing the queued requests", self.name)
                failed = f"{self.name}: batching failed ({type(exc).__name__}); retry"
                self._fail_queued(functools.partial(Internal, failed))
                continue
            except BaseException:
                self._slots.release()
                raise
            if not parts:
                self._slots.release()
                continue
            self._batches_in_flight += 1
            rows = sum(p.rows for p in parts)
            if parts[0].request.lane == Lane.BULK:
                self._bulk_in_flight += 1
            else:
                self._interactive_rows_in_flight += rows
            for part in parts:
                part.request.computing += 1  # counted down as the batch ends (_computing)
            task = asyncio.get_running_loop().create_task(self._computing(parts, rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # Not kept while waiting for the next batch: the parts hold their requests' inputs and
            # outputs (a tiled SuperResolve's tiles), which would outlive the call and its budget.
            del parts, part, task

    def _fail_queued(self, error: Callable[[], GenserveError]) -> None:
        """Fail every queued request with an `error()` of its own and empty the queue (at close, and
        the dispatcher's safety net)."""
        for lane in self._lanes:
            for queue in lane.values():
                for request in queue:
                    set_exception_if_not_done(request.future, error())
                    if request.reservation is not None:
                        self._leave_reservation(request.reservation, request.reservation.queued)
            lane.clear()
        self._rows_by_key.clear()
        self._queued_rows = self._queued_requests = self._bulk_rows = self._reserved_queued = 0
        self._split_rest = None
        self._observer.on_queue_depth(0)
        if self._bulk_line:
            self._room.set()

    def _bulk_must_wait(self) -> bool:
        """With several instances and interactive requests about, one instance is kept free of bulk
        work: an interactive batch then never waits for a bulk batch to finish."""
        if self._concurrency < 2 or self._lanes[Lane.INTERACTIVE] or not self._lanes[Lane.BULK]:
            return False
        if self._clock() - self._last_interactive_at >= self.interactive_quiet_s:
            return False
        return self._bulk_in_flight >= self._concurrency - 1

    async def _wait_for_interactive_or_a_batch(self) -> None:
        """Until a request arrives, a batch ends, or interactive traffic has been quiet long enough."""
        quiet_in_s = self.interactive_quiet_s - (self._clock() - self._last_interactive_at)
        self._available.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(quiet_in_s, 0.0) + 1e-3):
                await self._available.wait()

    def _pick(self) -> tuple[Lane, Hashable] | None:
        """The sub-queue to serve next: INTERACTIVE first, then the key whose longest-waiting request
        has waited longest (_waiting_since)."""
        for lane in Lane:
            queues = self._lanes[lane]
            if len(queues) == 1:  # one key (most models): nothing to rank
                return lane, next(iter(queues))
            if queues:
                key = min(queues, key=lambda k: _waiting_since(queues[k]))
                return lane, key
        return None

    def batch_rows(self, key: Hashable, lane: Lane = Lane.INTERACTIVE) -> int:
        """Rows a batch of `key` in `lane` may take now (max_batch_size, the per-key rows limit and,
        for bulk, the time budgets)."""
        return self._batch_limit(lane, key)

    def most_rows(self, key: Hashable) -> int:
        """The most rows a batch of `key` ever takes (max_batch_size and the per-key rows limit), the
        batches a working-set estimate counts (core.translate)."""
        return self._batch_limit(Lane.INTERACTIVE, key, shared=False)

    def _batch_limit(self, lane: Lane, key: Hashable, *, shared: bool = True) -> int:
        """Rows a batch of `lane` and `key` may take now (see bulk_budget_s and bulk_idle_budget_s;
        `shared`: and _side_by_side_share)."""
        largest = self.max_batch_size
        if self._rows_limit is not None:
            largest = max(1, min(largest, self._rows_limit(key)))
        share = self._side_by_side_share(lane, key) if shared else None
        if share is not None:
            largest = min(largest, share)
        if lane != Lane.BULK or self._row_cost_s <= 0.0:
            return largest
        interactive = self._clock() - self._last_interactive_at < self.interactive_quiet_s
        budget_s = self.bulk_budget_s if interactive else self.bulk_idle_budget_s
        if budget_s is None:
            return largest
        return max(1, min(largest, int(budget_s / self._row_cost_s)))

    def callers_overlap(self) -> bool:
        """Whether interactive requests have lately (OVERLAP_MEMORY_S) found more callers in the
        server than the runner has instances: a batch that starts now will soon have another beside
        it. Never for callers no more than the instances (c=2 on two instances: a closed-loop pair
        shares one batch, which the solo session computes fastest), nor for a lone caller beside a
        bulk SampleStream or a unary bulk caller."""
        return self._clock() - self._callers_overlapped_at <= OVERLAP_MEMORY_S

    def _side_by_side_share(self, lane: Lane, key: Hashable) -> int | None:
        """The most rows an interactive batch that starts beside running ones may take: its even
        share of those rows and the queued ones, over the runner's instances (None: no cap).

        Without it, a closed loop settles into batches of very different sizes side by side (one of
        40 rows and one of 5 at c=64): the small one's callers come back and go again several times
        while the large one runs, overtaking it, so the large one's callers see several times their
        latency (bench-dcgan-64 at c=64: p99/p50 1.7-2.1; shared, 1.3). Rows left by the cap go in the
        next batch, which the first instance to finish takes. Only with share_side_by_side (the
        loader: CPU sessions without padding): on a GPU a batch's time hardly grows with its rows,
        and where the runner pads to captured sizes, two halves cost two full batches."""
        if (
            not self.share_side_by_side
            or lane != Lane.INTERACTIVE
            or self._concurrency < 2
            or not self._interactive_rows_in_flight
        ):
            return None
        queued = self._rows_by_key.get((lane, key), 0)
        instances = max(1, self._concurrency - self._bulk_in_flight)  # those bulk batches hold are not shared
        return max(1, -(-(queued + self._interactive_rows_in_flight) // instances))

    def _split_over_free(self, lane: Lane, key: Hashable) -> int | None:
        """The rows an interactive batch takes when it starts with no interactive batch running and
        its rows would fill more than one free instance: its even share over them (None: no split).
        The rest goes in the next batch at once, on another instance.

        Without it a closed loop whose callers come back together puts them all in one batch on one
        instance, cohort after cohort, with the other instance idle. With the split, bench-dcgan-256
        serves 5-39 % more images/s at 2-8 clients, and sr-photos-x4 capped at 4 rows 47-67 % more at
        4 clients (bench/profile.md, twentieth round). Only where _side_by_side_share applies (a batch's
        compute grows with its rows), and only where the runner would run each part on a pool
        thread: parts it runs on the event loop run one after the other, slower than the whole."""
        if (
            not self.share_side_by_side
            or self._runs_on_loop is None
            or lane != Lane.INTERACTIVE
            or self._interactive_rows_in_flight
        ):
            return None
        free = self._concurrency - self._batches_in_flight
        if free < 2:
            return None
        # Live rows only: requests that expired or were cancelled while queued leave at _take.
        now = self._clock()
        live = sum(r.n_rows - r.next_row for r in self._lanes[lane][key] if not _gone(r, now))
        if live < 2:
            return None  # one row (a lone caller): nothing to run beside it
        share = -(-live // free)
        if share >= self._batch_limit(lane, key):
            return None  # enough rows queued for full batches on every free instance
        # The runner reads only shapes: uninitialised arrays of the part's (cheaper than a view).
        head = self._lanes[lane][key][0].inputs
        like = {name: np.empty((share, *v.shape[1:]), v.dtype) for name, v in head.items()}
        try:
            on_loop = self._runs_on_loop(key, like)
        except Exception:  # a heuristic: whatever went wrong, the whole batch goes as it would have
            logger.exception("%s: no split: where a part of %d rows would run is not known", self.name, share)
            return None
        return None if on_loop else share

    def _more_expected(self) -> bool:
        """Whether more rows are likely to arrive within the window (arrivals.Arrivals)."""
        return self._arrivals.more_expected(self._clock(), self.callers, self._queued_requests)

    def _sparse(self) -> bool:
        """Whether arrivals are too sparse for the window to bring more (arrivals.Arrivals.sparse)."""
        return self._arrivals.sparse(self._clock(), self.callers, self._queued_requests)

    def _expected_rows(self, within_s: float) -> float:
        return self._arrivals.expected_rows(self._clock(), within_s, self.callers, self._queued_requests)

    async def _form_batch(self) -> list[Part]:
        picked = self._pick()
        if picked is None:
            return []
        lane, key = picked
        rows = self._rows_by_key.get((lane, key), 0)
        more_expected = self._more_expected()
        # Untracked submitters (SampleStream chunks, a code decoder's batches): a busy runner is the
        # only sign that waiting pays. Unary calls of every servicer (KServe's too) are tracked.
        worth_waiting = more_expected or (not self.callers and self._batches_in_flight > 0)
        limit = self._batch_limit(lane, key)
        # Why the batch goes now (BATCH_CLOSE_REASONS): what an operator reads off small batches.
        reason: str | None = None  # set where the window is cut short; else derived below
        waited_for = (lane, key)  # the sub-queue the window was for (a re-pick may change lane, key)
        rest_of_split, self._split_rest = self._split_rest == (lane, key), None
        if rest_of_split:
            reason = CLOSED_SHARED  # its rows waited with the batch split from them: no window again
        elif rows < limit and self.max_queue_delay_s > 0 and worth_waiting:
            # The window starts at the oldest row's arrival, so it bounds every row's extra wait.
            window_end = self._lanes[lane][key][0].enqueued_at + self.max_queue_delay_s
            # The limit is read again each turn: a side-by-side share ends with the batch beside it.
            # A sub-queue whose rows all left (callers cancelled) ends its window: re-picked below.
            while (
                0
                < (queued := self._rows_by_key.get((lane, key), 0))
                < (limit := self._batch_limit(lane, key))
                and not self._closing
            ):
                if self.callers and not self._more_expected():
                    reason = CLOSED_ALL_QUEUED
                    break  # every caller in the server is queued: nobody else is about to send
                if lane == Lane.BULK and self._lanes[Lane.INTERACTIVE]:
                    reason = CLOSED_YIELDED
                    break  # an interactive request does not wait out a bulk batch's window
                if self.callers and self._sparse():
                    reason = CLOSED_SPARSE
                    break  # a light open loop: a second request is unlikely within the window
                now = self._clock()
                # A queued deadline the window would outlast ends it in time to compute the batch.
                end, cut_by_deadline = self._window_end(lane, key, window_end, queued, now)
                remaining_s = end - now
                if remaining_s <= 0:
                    reason = CLOSED_DEADLINE if cut_by_deadline else CLOSED_WINDOW
                    break
                if self.preferred_batch_sizes and closes_at_preferred(
                    queued, self.preferred_batch_sizes, limit, self._expected_rows(remaining_s)
                ):
                    reason = CLOSED_PREFERRED
                    break  # a preferred size now beats waiting for a next one that will not come
                self._available.clear()
                try:
                    async with asyncio.timeout(remaining_s):
                        await self._available.wait()
                except TimeoutError:
                    reason = CLOSED_DEADLINE if cut_by_deadline else CLOSED_WINDOW
                    break
            # An interactive request may have arrived while a bulk batch was filling: it goes first.
            picked = self._pick()
            if picked is None:
                return []
            lane, key = picked
            if (lane, key) != waited_for:
                # The window's own rows left (cancelled) or an interactive request came: the batch
                # formed now is another sub-queue's, which waited no window of its own.
                reason = CLOSED_YIELDED if lane == Lane.INTERACTIVE and waited_for[0] == Lane.BULK else None
                if lane == Lane.BULK and self._bulk_must_wait():
                    return []  # the instance kept free for interactive work stays free (_dispatch_loop)
        # Why a batch that did not wait out a window goes now, read off the rows it takes: rows of
        # requests that expired while queued leave at _take and do not make a batch full.
        full = self._batch_limit(lane, key, shared=False)
        share = self._side_by_side_share(lane, key)
        parts, split = self._take_split(lane, key, rest_of_split)
        if parts:
            self._observer.on_batch_closed(CLOSED_SHARED if split else reason or _filled(parts, full, share))
        return parts

    def _window_end(
        self, lane: Lane, key: Hashable, window_end: float, queued: int, now: float
    ) -> tuple[float, bool]:
        """When the window for (lane, key) ends: at `window_end`, or earlier where a queued request's
        deadline comes first, by the batch's measured compute time (`_row_cost_s` per row) and the
        slack gRPC's own deadline keeps (DEADLINE_SLACK_S); and whether that deadline is what ends
        it. A request of another key of the lane waits for this window too (its batch follows this
        one): its deadline ends the window where this batch and its own would not compute in time.
        Expired requests leave at _take and set no end."""
        end, cut_by_deadline = window_end, False
        for other, queue in self._lanes[lane].items():
            soonest = min(
                (r.deadline for r in queue if r.deadline is not None and r.deadline > now), default=None
            )
            if soonest is None:
                continue
            # Another key's soonest request runs in its key's next batch, after this one: at most a
            # batch of each (its key may queue far more rows than that).
            largest = self.max_batch_size
            rows = (
                queued
                if other == key
                else min(queued, largest) + min(self._rows_by_key.get((lane, other), 0), largest)
            )
            cut = soonest - self._row_cost_s * rows - DEADLINE_SLACK_S
            if cut < end:
                end, cut_by_deadline = cut, True
        return end, cut_by_deadline

    def _take_split(self, lane: Lane, key: Hashable, rest_of_split: bool) -> tuple[list[Part], bool]:
        """_take, with the split over free instances where _split_over_free makes one: (the parts,
        whether split). Rows a split (or the rest of one) leaves go in the next batch at once."""
        split = self._split_over_free(lane, key)
        parts = self._take(lane, key, split)
        if (split is not None or rest_of_split) and (lane, key) in self._rows_by_key:
            self._split_rest = (lane, key)
        return parts, split is not None

    def _remove_rows(self, request: PendingRequest, rows: int, *, request_gone: bool) -> None:
        """`rows` of `request` leave the queue (taken into a batch, or dropped)."""
        lane = request.lane
        lk = (lane, request.key)
        self._rows_by_key[lk] -= rows
        if self._rows_by_key[lk] == 0:
            del self._rows_by_key[lk]
        self._queued_rows -= rows
        if request_gone:
            self._queued_requests -= 1
        if lane == Lane.BULK:
            self._bulk_rows -= rows
        if request.reservation is not None:
            self._leave_reservation(request.reservation, rows)
        if self._bulk_line:
            self._room.set()

    def _leave_reservation(self, reservation: QueueReservation, rows: int) -> None:
        """`rows` queued into `reservation` leave the queue (taken into a batch, dropped, failed): no
        longer queued in it; and, for a `once` reservation, no longer held (they never come back, so
        the queue's room is free again). An ended reservation's rows count as any other queued rows."""
        if reservation.ended:
            return
        reservation.queued -= rows
        self._reserved_queued -= rows
        if reservation.once:
            reservation.rows -= rows
            self._reserved_rows -= rows

    def _take(self, lane: Lane, key: Hashable, split: int | None = None) -> list[Part]:
        """Take up to the lane's batch limit of live rows of one sub-queue, dropping dead requests first.

        Fair shares: when more requests wait than a batch has rows, those with the fewest rows left
        go first (ties: the one that waited longest, then admission order), and one place is kept for
        the request that has waited longest, so none starves; the batch's rows are shared max-min
        fairly among those chosen (batch_parts.fair_shares). A big request thus gives each batch a
        slice, a small one admitted behind any number of big ones goes in the next batch, and
        requests of one row go in admission order. `split`: fewer rows (_split_over_free)."""
        limit = self._batch_limit(lane, key)
        if split is not None:
            limit = min(limit, split)
        queue = self._lanes[lane][key]
        now = self._clock()
        # The queue holds the started requests first, then the untouched ones in admission order:
        # past `limit` untouched one-row requests, no later one can be chosen.
        waiting: list[PendingRequest] = []
        untouched_singles = 0
        while queue and untouched_singles < limit:
            request = queue.popleft()
            expired = _expired(request, now)
            if request.future.done() or expired:
                self._remove_rows(request, request.n_rows - request.next_row, request_gone=True)
                if request.future.cancelled():
                    # A part WITHDRAWN (its future cancelled, its own handler not yet run) counts as
                    # its request's failure only, as in _forget_cancelled.
                    if not withdrawn(request.future):
                        self._dropped(request.caller, "deadline" if expired else "cancelled")
                elif not request.future.done():
                    self._dropped(request.caller, "deadline")
                    request.future.set_exception(
                        DeadlineExceeded(f"{self.name}: deadline passed while queued; not computed")
                    )
                # else: already failed by an earlier batch of its rows; nothing to count.
                continue
            waiting.append(request)
            untouched_singles += request.next_row == 0 and request.n_rows == 1
        self._batches_formed += 1
        if untouched_singles == len(waiting):  # one-row requests only (c=1, closed loops): in order
            for request in waiting:
                request.next_row = 1
                request.last_dispatch_at = now
                self._remove_rows(request, 1, request_gone=True)
            if not queue:
                del self._lanes[lane][key]
            self._observer.on_queue_depth(self._queued_rows)
            return [Part(request, 0, 1) for request in waiting]
        by_rows_left = sorted(waiting, key=lambda r: (r.n_rows - r.next_row, r.turn, r.seq))
        chosen = by_rows_left
        if len(waiting) > limit:
            chosen = by_rows_left[: limit - 1]
            chosen.append(min(by_rows_left[limit - 1 :], key=lambda r: (r.turn, r.seq)))
        shares = fair_shares([r.n_rows - r.next_row for r in chosen], limit)
        parts: list[Part] = []
        for request, take in sorted(zip(chosen, shares, strict=True), key=_by_admission):
            parts.append(Part(request, request.next_row, take))
            request.next_row += take
            request.last_dispatch_at = now
            request.turn = self._batches_formed
            self._remove_rows(request, take, request_gone=request.next_row == request.n_rows)
        # Back to the head: the started ones, then the untouched ones in admission order.
        started = [r for r in waiting if 0 < r.next_row < r.n_rows]
        queue.extendleft(reversed(started + [r for r in waiting if r.next_row == 0]))
        if not queue:
            del self._lanes[lane][key]
        self._observer.on_queue_depth(self._queued_rows)
        return parts

    async def _computing(self, parts: list[Part], rows: int) -> None:
        """_execute, then the batch's requests count it ended (PendingRequest.computing)."""
        try:
            await self._execute(parts, rows)
        finally:
            _computed(parts)

    async def _execute(self, parts: list[Part], rows: int) -> None:
        """Runs a batch the dispatcher counted in flight (`rows`: its rows), then uncounts it."""
        started = self._clock()
        for p in parts:
            self._observer.on_queue_wait(started - p.request.enqueued_at, p.request.lane)
        outputs: Tensors | None = None
        try:
            outputs, error = await self._call(parts)
            if error is not None:
                failed: list[Part] = []
                retried = False
                try:
                    retried = await self._isolate(parts, error, failed)
                finally:  # also where the retry is cancelled: the failure keeps its line
                    self._log_failure(parts, error, retried, failed)
        finally:
            self._batches_in_flight -= 1
            if parts[0].request.lane == Lane.BULK:
                self._bulk_in_flight -= 1
                self._available.set()  # a dispatcher holding bulk back may go on
            else:
                self._interactive_rows_in_flight -= rows
            self._slots.release()
        # After the slot is free: the dispatcher, woken first, picks what waited (a bulk batch)
        # before a closed-loop caller woken by its result can queue ahead of it again.
        if outputs is None:
            return
        try:
            if copy_bytes(parts, outputs) < OFF_LOOP_COPY_BYTES:
                fan_out(parts, outputs)
                return
            allocate(parts, outputs)
            await run_off_loop(None, place, parts, outputs)
            resolve(parts, outputs)
        except Exception as exc:
            self._unfit(parts, exc)

    def _fan_out(self, parts: list[Part], outputs: Tensors) -> None:
        """fan_out on the event loop (a retried half's outputs), failing the parts where it fails."""
        try:
            fan_out(parts, outputs)
        except Exception as exc:
            self._unfit(parts, exc)

    def _unfit(self, parts: list[Part], exc: Exception) -> None:
        """Outputs that do not fit the arrays a request's earlier batch shaped (a model whose output
        shape changed between batches of one key): fail its requests, never leave them waiting for a
        result that cannot come."""
        logger.error(
            "%s: a batch's outputs could not be handed to its requests (request_ids=%s): %r",
            self.name,
            request_ids(parts),
            exc,
        )
        failure: GenserveError = Internal(
            f"{self.name}: the model's outputs did not fit the request (see the server log)"
        )
        if isinstance(exc, MemoryError):  # no room for the request's arrays (a container's limit)
            failure = out_of_memory_refusal(self.name, f": {exc}")
        failure.logged = True  # the line above names every request id of the batch
        for part in parts:
            set_exception_if_not_done(part.request.future, failure)

    async def _call(self, parts: list[Part]) -> tuple[Tensors | None, Exception | None]:
        """One model call over `parts`: (outputs, None), or (None, the failure)."""
        rows = sum(p.rows for p in parts)
        started = self._clock()
        error: Exception | None = None
        try:
            first = parts[0].request
            run = self._run_bulk_batch if first.lane == Lane.BULK else self._run_batch
            outputs = await run(first.key, concat(parts))
            for name, value in outputs.items():
                if value.shape[:1] != (rows,):
                    raise Internal(
                        f"{self.name}: output {name!r} has {value.shape[0] if value.ndim else 0} rows for a "
                        f"batch of {rows}"
                    )
        except ModelCallAborted as exc:  # the shutdown's WARNING says it: not a model failure
            error = exc
            logger.info(
                "%s: batch of %d rows from %d requests aborted by the shutdown (request_ids=%s)",
                self.name,
                rows,
                len(parts),
                request_ids(parts),
            )
        except Exception as exc:
            error = exc
            # Each attempt's error at DEBUG: the batch's line (_log_failure) says what its retry ended in.
            logger.debug(
                "%s: batch of %d rows from %d requests failed (request_ids=%s): %r",
                self.name,
                rows,
                len(parts),
                request_ids(parts),
                exc,
            )
        compute_s = self._clock() - started
        if error is None:
            per_row = compute_s / rows
            old = self._row_cost_s
            self._row_cost_s = per_row if old == 0.0 else 0.8 * old + 0.2 * per_row
        self._observer.on_batch(rows, len(parts), compute_s, error is None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "batch model=%s version=%s rows=%d requests=%d request_ids=%s queue_ms=%.3f "
                "compute_ms=%.3f ok=%s",
                self._log_model,
                self._log_version or "-",
                rows,
                len(parts),
                request_ids(parts),
                max(started - p.request.enqueued_at for p in parts) * 1e3,  # its longest wait
                compute_s * 1e3,
                error is None,
            )
        return (outputs, None) if error is None else (None, error)

    def _log_failure(self, parts: list[Part], error: Exception, retried: bool, failed: list[Part]) -> None:
        """The one line of a failed batch (docs/operations.md, "Faults"), written once its retry in
        halves has ended: the model and version, every request id of the batch, what the retry
        ended in (which of them failed) and the error; the retry's own calls log at DEBUG only, and
        the boundary's line for a call failed here too (GenserveError.logged). A model failing every
        batch wrote ~2 lines per request, each id on 3 or more of them."""
        if isinstance(error, ModelCallAborted):  # _call's INFO line says it: not a model failure
            return
        rows = sum(p.rows for p in parts)
        outcome = ""
        if retried:
            if not failed:
                outcome = "; retrying the batch in halves: every request computed"
            elif request_ids(failed) == request_ids(parts):
                outcome = "; retrying the batch in halves: they failed too"
            else:
                failed_ids = request_ids(failed)
                outcome = f"; retrying the batch in halves: request_ids={failed_ids} failed, others computed"
        self._failures.write(
            f"batch of {rows} rows from {len(parts)} requests", request_ids(parts), outcome, error
        )

    async def _isolate(self, parts: list[Part], error: Exception, failed: list[Part]) -> bool:
        """After a failed call, run its rows again in halves, so that rows which compute (a batch too
        large for the device's memory, neighbours of a row the model cannot take) are not lost with
        the rest. When both halves fail too, the model is taken to be failing, not some rows:
        everything left fails, which bounds the retries of a broken session at 2 calls per halving,
        log2(rows) halvings. The price of that bound: two bad rows that land in different halves,
        or a batch more than twice too large, fail the whole batch. The parts failed are added to
        `failed`; whether it retried is returned."""
        parts = live(parts)  # cancelled, or failed already
        rows = sum(p.rows for p in parts)
        if rows <= 1 or self._closing:
            self._fail(parts, error)
            failed.extend(parts)
            return False
        halves = split(parts, rows // 2)
        logger.debug(
            "%s: retrying the %d rows of a failed batch in halves (request_ids=%s)",
            self.name,
            rows,
            request_ids(parts),
        )
        errors: list[Exception | None] = []
        for half in halves:
            half[:] = live(half)  # a caller may have gone during the other half's call
            if not half:
                errors.append(None)
                continue
            outputs, half_error = await self._call(half)
            if outputs is not None:
                self._fan_out(half, outputs)
            errors.append(half_error)
        if errors[0] is not None and errors[1] is not None:
            self._fail(parts, error)
            failed.extend(parts)
            return True
        for half, half_error in zip(halves, errors, strict=True):
            if half_error is not None:
                await self._isolate(half, half_error, failed)
        return True

    def _fail(self, parts: list[Part], error: Exception) -> None:
        failure: GenserveError
        if self._closing and not isinstance(error, GenserveError):
            # The runner may be shut down under a retry (a drain that timed out): not a model fault.
            failure = Unavailable(
                f"{self.name} shut down while the batch was retried; retry on another replica"
            )
        else:
            failure = model_call_failure(self.name, error)
        failure.logged = True  # _log_failure's line names every request id of the batch
        for part in parts:
            set_exception_if_not_done(part.request.future, failure)


def _computed(parts: list[Part]) -> None:
    """A batch ended: its requests' rows are no longer computed there (PendingRequest.computing); a
    request whose caller left and that no other running batch holds resolves `computed`."""
    for part in parts:
        request = part.request
        request.computing -= 1
        if not request.computing and request.computed is not None and not request.computed.done():
            request.computed.set_result(None)
