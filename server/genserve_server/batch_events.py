"""What a batcher reports, and why a batch closed: the observer protocol metrics.BatchMetrics adapts
to Prometheus (batcher.Batcher calls it; NullObserver when nobody listens)."""

from __future__ import annotations

from typing import Protocol

from genserve_server.batch_parts import Lane

# Why a batch closed (genserve_batches_closed_total{reason}): it reached its row limit; it reached
# its share of the rows beside a running batch (batcher.Batcher._side_by_side_share); it went at
# once (nothing suggested more rows were coming: an idle runner at concurrency 1, or no sign of
# callers); every caller in the server was queued; its window ended; arrivals were too sparse for
# its window to bring more (arrivals.Arrivals.sparse: a light open loop); it held a preferred size
# that waiting would not grow; a bulk batch gave way to an interactive request; a queued request's
# deadline came before its window's end (batcher.Batcher._window_end).
CLOSED_FULL = "full"
CLOSED_SHARED = "shared"
CLOSED_AT_ONCE = "at_once"
CLOSED_ALL_QUEUED = "all_queued"
CLOSED_WINDOW = "window"
CLOSED_SPARSE = "sparse"
CLOSED_PREFERRED = "preferred"
CLOSED_YIELDED = "yielded"
CLOSED_DEADLINE = "deadline"
BATCH_CLOSE_REASONS = (
    CLOSED_FULL,
    CLOSED_SHARED,
    CLOSED_AT_ONCE,
    CLOSED_ALL_QUEUED,
    CLOSED_WINDOW,
    CLOSED_SPARSE,
    CLOSED_PREFERRED,
    CLOSED_YIELDED,
    CLOSED_DEADLINE,
)


class BatchObserver(Protocol):
    """What the batcher reports (metrics.ModelMetrics adapts this to Prometheus)."""

    def on_queue_depth(self, rows: int) -> None: ...
    def on_rejected(self, reason: str) -> None: ...
    def on_dropped(self, reason: str) -> None: ...
    def on_queue_wait(self, wait_s: float, lane: Lane) -> None: ...
    def on_batch(self, rows: int, n_requests: int, compute_s: float, ok: bool) -> None: ...
    def on_batch_closed(self, reason: str) -> None: ...


class NullObserver:
    def on_queue_depth(self, rows: int) -> None:
        return None

    def on_rejected(self, reason: str) -> None:
        return None

    def on_dropped(self, reason: str) -> None:
        return None

    def on_queue_wait(self, wait_s: float, lane: Lane) -> None:
        return None

    def on_batch(self, rows: int, n_requests: int, compute_s: float, ok: bool) -> None:
        return None

    def on_batch_closed(self, reason: str) -> None:
        return None
