"""Server-wide byte budgets that bound memory by construction (docs/operations.md, "Memory budgets").

- Responses: bytes of unary responses computed but not yet sent. A unary response that its client
  never reads stays in gRPC's buffers after the handler returned (HTTP/2 flow control holds it), and
  the in-flight gauge no longer counts it: 24 unread Sample(count=256) took 4 GB that way. Each
  generation call reserves its predicted response size *before* compute; the reservation is set to
  the real size when the handler returns and released when gRPC ends the RPC (sent, cancelled or
  timed out: accept.at_call_end, or the context's done callback where grpc accepted the call); a
  call that leaves while its batches compute or its response's bytes are built off the event
  loop (its images' encodes on the codec pool, the boundary's serialize, ModelInfer's response)
  releases it once those have ended (Call.computing, Call.release_once_computed).
- SuperResolve working set: inputs and tiles in flight x tile memory, then blend canvases and the
  encode's copies (tiling.working_set_bytes), so that a few large requests run one after another
  instead of all at once.
- Translate working set: the same estimate, each image one tile at scale 1, against its own budget.
- KServe ModelInfer on those models' kinds: what SuperResolve or Translate would hold for the same
  images, each image one tile the model takes whole, against the same budget.

A BULK request that waits for room in its lane (batcher.py) gives its response's bytes back
meanwhile and holds them again, first in line, before it is queued (Reservation.give_back and
take_back): a backlog of bulk calls on one model does not hold the budget that interactive calls on
every model need.

A request waits (first come, first served) while its budget is spent, at most until its deadline
or `budget_max_wait_s`: at `budget_max_wait_s` it is answered RESOURCE_EXHAUSTED naming the budget
(counted by the boundary, for core.wait_for_budget's calls and the batcher's alike:
genserve_requests_rejected_total{reason="budget"} if answered before the deadline), at its deadline
DEADLINE_EXCEEDED (DeadlineExceeded, a `deadline` drop). A single request larger than the whole
budget is clamped to it: it runs alone rather than never.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from genserve_server.errors import DeadlineExceeded, ResourceExhausted


class ByteBudget:
    """Bytes held against a limit; `acquire` waits in FIFO order. Event-loop thread only."""

    def __init__(self, name: str, limit_bytes: int, max_wait_s: float, gauge: Any = None) -> None:
        if limit_bytes < 1:
            raise ValueError(f"{name} must be >= 1, got {limit_bytes}")
        self.name = name
        self.limit = limit_bytes
        self.max_wait_s = max_wait_s
        self.held = 0
        self._gauge = gauge
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def clamp(self, n_bytes: int) -> int:
        return min(max(n_bytes, 0), self.limit)

    async def acquire(self, n_bytes: int, deadline: float | None, what: str) -> int:
        """Hold `n_bytes` (clamped to the limit); returns the bytes held. `deadline`: time.monotonic()."""
        n = self.clamp(n_bytes)
        if not self._waiters and self.held + n <= self.limit:
            self._add(n)
            return n
        timeout_s = self.max_wait_s
        by_deadline = deadline is not None and deadline - time.monotonic() < timeout_s
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - time.monotonic())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the grant and drops a
            # cancel that crosses it (the handler of a client gone went on, holding the bytes).
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled():  # granted just as the wait ran out: keep it
                return n
            self._drop(entry)
            refusal = (
                f"{what} needs {n} bytes of the {self.name} ({self.limit} bytes), of which {self.held} "
                f"are held by other requests; waited {max(timeout_s, 0.0):.1f} s"
            )
            if by_deadline:
                # The deadline ended the wait: a deadline drop, DEADLINE_EXCEEDED. The clock read
                # after the timer could not tell it: uvloop's timers are whole milliseconds and may
                # fire a moment before the deadline, and that call was answered RESOURCE_EXHAUSTED.
                raise DeadlineExceeded(f"{refusal}, until its deadline") from None
            raise ResourceExhausted(f"{refusal}; retry with backoff") from None
        except BaseException:  # cancelled while waiting: give back what may have been granted
            if future.done() and not future.cancelled():
                self.release(n)
            else:
                self._drop(entry)
            raise
        return n

    def force(self, n_bytes: int) -> None:
        """Hold more without waiting (a response found larger than predicted: it exists already)."""
        self._add(max(n_bytes, 0))

    def release(self, n_bytes: int) -> None:
        if n_bytes <= 0:
            return
        self.held = max(self.held - n_bytes, 0)
        self._set_gauge()
        self._grant()

    def _add(self, n: int) -> None:
        self.held += n
        self._set_gauge()

    def _drop(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        entry[1].cancel()
        self._grant()  # a large waiter leaving may let smaller ones behind it in

    def _grant(self) -> None:
        while self._waiters:
            n, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.held + n > self.limit:
                return
            self._waiters.popleft()
            self._add(n)
            future.set_result(None)

    def _set_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.held)


@dataclass(slots=True)
class Reservation:
    """One RPC's bytes held against a budget (Call.response): reserved before compute, set to the
    real size when the response exists, released once (the RPC's end)."""

    budget: ByteBudget
    held: int = 0
    released: bool = field(default=False)
    what: str = ""  # the RPC, for the budget's refusal (the last reserve's)
    aside: int = 0  # bytes given back while a BULK request waits for room (give_back)

    async def reserve(self, n_bytes: int, deadline: float | None, what: str) -> None:
        if self.released:
            return
        self.what = what
        granted = await self.budget.acquire(n_bytes, deadline, what)
        if self.released:  # the call ended while it waited (release ran): nothing may stay held
            self.budget.release(granted)
            return
        self.held += granted

    def give_back(self) -> None:
        """The call's BULK request waits for room in its lane (batch_parts.Held): its bytes go back to
        the budget meanwhile; take_back holds them again."""
        if self.released or not self.held:
            return
        self.aside += self.held
        self.budget.release(self.held)
        self.held = 0

    async def take_back(self, deadline: float | None) -> None:
        """The request is first in line with room: hold again what give_back returned (waits while the
        budget is spent, then RESOURCE_EXHAUSTED naming it, as at first)."""
        n, self.aside = self.aside, 0
        if n:
            await self.reserve(n, deadline, self.what)

    def settle(self, actual_bytes: int) -> None:
        """The response is built: hold its real size (its prediction was an upper bound, mostly)."""
        if self.released:
            return
        actual = self.budget.clamp(actual_bytes)
        if actual < self.held:
            self.budget.release(self.held - actual)
        else:
            self.budget.force(actual - self.held)
        self.held = actual

    def release(self) -> None:
        """Idempotent: the boundary and gRPC's done callback may both call it."""
        if not self.released:
            self.released = True
            self.budget.release(self.held)
            self.held = 0
