"""A batch's rows: the requests waiting in a batcher, the parts of them a batch takes, and the
split / concatenate / fan-out functions between requests and model calls (rows of one request may
straddle batches; every request gets its rows back in order)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Tensors = Mapping[str, np.ndarray]


class Lane(enum.IntEnum):
    INTERACTIVE = 0
    BULK = 1


class Refusals(Protocol):
    """Where a refusal marked on its Caller is counted as the boundary answers it: the refusing
    model's metrics (metrics.ModelMetrics), or a batcher's observer (batch_events.BatchObserver:
    its own model's, e.g. a code prior's decoder for the prior's call)."""

    def on_rejected(self, reason: str) -> None: ...
    def on_dropped(self, reason: str) -> None: ...


class Caller(Protocol):
    """The RPC whose rows a request holds (core.Call). One RPC may queue several requests: images
    of several shapes (Translate), tiles of several shapes (SuperResolve), a stream's chunks computed
    ahead. `counted_out` is set when the first of them is counted as refused (queue_full) or dropped
    (deadline, cancelled): the others that leave with it are not counted again, since those counters
    count requests (docs/metrics.md). `refused`: a refusal the boundary counts as it answers (where
    and the reason), under the status its client gets (core.Call.refused). `metrics`: the model the
    RPC called, under which its drop is counted, whichever model's queue its rows left (a style
    generator's mapping: docs/metrics.md)."""

    counted_out: bool
    refused: tuple[Refusals, str] | None

    @property
    def metrics(self) -> Refusals: ...


class Held(Protocol):
    """What an RPC holds that its BULK request gives back while it waits for room in its lane (a
    unary call's response bytes: response_budget.Reservation), so that bulk calls waiting there hold
    nothing interactive calls need; taken back (which may wait in turn) once the request is first in
    line with room, before it is queued."""

    def give_back(self) -> None: ...

    async def take_back(self, deadline: float | None) -> None: ...


@dataclass(slots=True, eq=False)
class QueueReservation:
    """Rows of a batcher's queue held for one RPC's later request (Batcher.reserved: a code prior's
    decode, queued only once its grids are sampled); submit(reservation=...) queues into them.
    `queued`: its rows in the queue now; `ended`: the RPC let them go; `once`: for one request,
    whose rows leave the reservation as they leave the queue (taken into a batch, or dropped), so
    that rows computing no longer take the queue's room (a style generator's synthesis); else the
    rows stay held for the RPC's next request until it ends (a code prior stream's previews)."""

    rows: int
    queued: int = 0
    ended: bool = False
    once: bool = False


def count_once(caller: Caller | None) -> bool:
    """Whether a refusal or drop of a request of `caller` is counted: the first of its RPC's only
    (a request of its own, None: always)."""
    if caller is None:
        return True
    if caller.counted_out:
        return False
    caller.counted_out = True
    return True


@dataclass(slots=True)
class BatchResult:
    """A request's outputs (rows in request order) and how they were computed."""

    outputs: dict[str, np.ndarray]
    # Row count of every model call that computed some of this request's rows.
    executed_batch_sizes: list[int]
    # From enqueue to the dispatch of the request's last batch.
    queue_s: float
    dispatched_at: float = 0.0  # time.monotonic() of that dispatch


@dataclass(slots=True, eq=False)
class PendingRequest:
    key: Hashable
    inputs: Tensors
    n_rows: int
    lane: Lane
    deadline: float | None  # time.monotonic() seconds; None = no deadline
    enqueued_at: float
    future: asyncio.Future[BatchResult]
    next_row: int = 0  # rows [0, next_row) have been taken into batches
    rows_done: int = 0
    # Its outputs, written batch by batch when it straddles batches (fan_out); None until then.
    assembled: dict[str, np.ndarray] | None = None
    batch_sizes: list[int] = field(default_factory=list)
    last_dispatch_at: float = 0.0
    # How long it has waited: the batch (by the batcher's count) that last took rows of it, or,
    # before any has, the last batch formed before it came minus a half (it waited through that
    # one); ties in admission order (`seq`).
    turn: float = 0.0
    seq: int = 0
    caller: Caller | None = None  # its RPC, where that may queue other requests beside it
    reservation: QueueReservation | None = None  # the queue's rows it was queued into, if any
    # Batches that took rows of it and have not ended (Batcher._execute); `computed`: resolved once
    # none is left, where its caller left while some computed (Batcher.submit's `computing`).
    computing: int = 0
    computed: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Part:
    """Rows [start, start + rows) of one request inside a batch."""

    request: PendingRequest
    start: int
    rows: int


def fair_shares(remaining: list[int], limit: int) -> list[int]:
    """Rows each waiting request gives one batch of at most `limit` rows: max-min fair (water-filling).

    `remaining` are the rows still to take of requests in the order they go first (each >= 1).
    Every request gets min(its rows, level), the level being as high as the batch allows; rows left
    over go one each to the first requests that still have some. So a small request never waits
    behind the later slices of big ones (8 requests of 256 rows and one of 1 in a batch of 64: 1 row
    for the small one, 7-8 for each big one); with more requests than rows the first `limit` get one
    row each.
    """
    shares = list(remaining)
    left = limit
    by_size = sorted(range(len(remaining)), key=remaining.__getitem__)
    for k, i in enumerate(by_size):
        others = len(by_size) - k  # requests not yet given their share, this one included
        if remaining[i] * others <= left:
            left -= remaining[i]  # this one and every smaller one fit whole
            continue
        level = left // others  # the rest get the same, the earliest of them one row more
        rest = sorted(by_size[k:])
        extra = left - level * others
        for rank, j in enumerate(rest):
            shares[j] = level + (1 if rank < extra else 0)
        break
    return shares


def live(parts: list[Part]) -> list[Part]:
    """The parts whose request still waits for its rows."""
    return [p for p in parts if not p.request.future.done()]


def set_exception_if_not_done(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def split(parts: list[Part], left_rows: int) -> tuple[list[Part], list[Part]]:
    """`parts` as two lists of parts, the first holding `left_rows` rows (a request may straddle)."""
    left: list[Part] = []
    right: list[Part] = []
    for part in parts:
        take = min(part.rows, max(0, left_rows))
        if take:
            left.append(Part(part.request, part.start, take))
        if part.rows > take:
            right.append(Part(part.request, part.start + take, part.rows - take))
        left_rows -= take
    return left, right


def concat(parts: list[Part]) -> dict[str, np.ndarray]:
    first = parts[0]
    if len(parts) == 1 and first.start == 0 and first.rows == first.request.n_rows:
        return dict(first.request.inputs)  # whole request in one batch: no copy
    names = first.request.inputs.keys()
    return {
        name: np.concatenate([p.request.inputs[name][p.start : p.start + p.rows] for p in parts])
        for name in names
    }


# Above this many bytes of a batch's outputs to copy into straddling requests, the copy runs on a
# worker thread (numpy releases the GIL for it): a Sample(count=256) of a 256x256 model copies
# ~200 MB in all, ~70 ms of first-touch page faults and memcpy that stalled every other model's
# requests on the event loop (issue 22, fair shares across models).
OFF_LOOP_COPY_BYTES = 1 << 20


def _straddles(part: Part) -> bool:
    return part.rows != part.request.n_rows and not part.request.future.done()


def copy_bytes(parts: list[Part], outputs: Tensors) -> int:
    """Bytes that `place` would copy for this batch (its straddling requests' rows)."""
    rows = sum(p.rows for p in parts if _straddles(p))
    return rows * sum(v[:1].nbytes for v in outputs.values()) if rows else 0


def allocate(parts: list[Part], outputs: Tensors) -> None:
    """Each straddling request's output arrays, allocated at its first part (on the event loop, so
    that two batches of one request never both allocate)."""
    for part in parts:
        request = part.request
        if _straddles(part) and request.assembled is None:
            request.assembled = {
                k: np.empty((request.n_rows, *v.shape[1:]), v.dtype) for k, v in outputs.items()
            }


def place(parts: list[Part], outputs: Tensors) -> None:
    """Each straddling part's rows of `outputs` into its request's arrays (after `allocate`). Safe on
    a worker thread: batches of one request write disjoint rows."""
    offset = 0
    for part in parts:
        stop = offset + part.rows
        assembled = part.request.assembled
        if _straddles(part) and assembled is not None:
            for k, v in outputs.items():
                assembled[k][part.start : part.start + part.rows] = v[offset:stop]
        offset = stop


def resolve(parts: list[Part], outputs: Tensors) -> None:
    """Count each part's rows as done (after `place`); a request whose last rows these are resolves.
    A request whole in this batch gets views of `outputs`, no copy. On the event loop."""
    rows = sum(p.rows for p in parts)
    offset = 0
    for part in parts:
        request = part.request
        stop = offset + part.rows
        if not request.future.done():  # cancelled callers are skipped, not failed
            whole = part.rows == request.n_rows
            request.batch_sizes.append(rows)
            request.rows_done += part.rows
            if request.rows_done == request.n_rows:
                assembled = {k: v[offset:stop] for k, v in outputs.items()} if whole else request.assembled
                assert assembled is not None
                request.future.set_result(
                    BatchResult(
                        assembled,
                        request.batch_sizes,
                        request.last_dispatch_at - request.enqueued_at,
                        request.last_dispatch_at,
                    )
                )
        offset = stop


def fan_out(parts: list[Part], outputs: Tensors) -> None:
    """Each part's rows of `outputs` to its request; a request whose last rows these are resolves.

    A request that straddles batches gets its outputs written in place, batch by batch, into arrays
    allocated at its first part: no concatenation of every chunk when its last part lands (for
    Sample(count=256) of a 256x256 model that was ~250 MB copied at once on the event loop, and
    twice the memory while it ran). The batcher runs large copies on a worker thread instead
    (`allocate`, `place` there, `resolve`)."""
    allocate(parts, outputs)
    place(parts, outputs)
    resolve(parts, outputs)
