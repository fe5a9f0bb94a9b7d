"""What a batcher knows of the requests on their way: is waiting out the batch window worth it?

A batch window pays only if more rows arrive within it. `Arrivals` keeps the signals the batcher
judges by (batcher.Batcher._form_batch): the callers of a model version now in the server (tracked
RPCs that have not reached the queue yet are certain arrivals), the fraction of recent arrivals that
overlapped another caller (open-loop traffic, or an event loop that has not parsed the next RPC yet),
the peak of callers lately (closed-loop clients all queued: nobody else can send), the arrival
rate that judges whether a preferred batch size is within reach (closes_at_preferred), and the
request rate that says when nothing more is likely within a window (sparse).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Wait out the window on an idle runner once this fraction of recent arrivals overlapped others...
OVERLAP_FRAC_TO_WAIT = 0.02
# ...and the last overlap is this recent. The fraction decays per arrival, so after a burst it would
# keep a slow caller (c=1, a large model: ~30 arrivals/s) paying the whole window for seconds.
OVERLAP_MEMORY_S = 0.1
# Once as many requests are queued as the most callers seen in the server within this time, no
# more are coming (closed-loop clients all wait on us): the batch goes without the rest of the window.
CALLERS_PEAK_MEMORY_S = 1.0
# The arrival rate that judges whether the next preferred batch size is within reach is measured
# over this many batch windows (at least RATE_HORIZON_MIN_S).
RATE_HORIZON_WINDOWS = 4
RATE_HORIZON_MIN_S = 0.01
# The request rate that judges whether anything can arrive within a window (sparse) is
# measured over this many windows (at least SPARSE_HORIZON_MIN_S): long enough to hold several
# arrivals at the rates where it matters (~100-1,000 requests/s against a 4-ms window).
SPARSE_HORIZON_WINDOWS = 12
SPARSE_HORIZON_MIN_S = 0.05
# ...and only while fewer than this fraction of the last SPARSE_OVERLAP_ARRIVALS tracked arrivals
# found another caller in the server: closed-loop callers of a slow model also arrive less than once
# a window, but half of them or more find the others there (at c=2 the second of a pair finds the
# first), and the rest of the cohort is about to come back with its answers. An open loop at 100
# requests/s overlaps ~1 arrival in 10. Counted over arrivals, not time, so that a slow model's
# closed loop is recognised from its second arrival on (0 of 1, then 1 of 2, 1 of 3 overlapped).
SPARSE_OVERLAP_ARRIVALS = 8
SPARSE_OVERLAP_FRAC = 0.3


def closes_at_preferred(rows: int, preferred: tuple[int, ...], limit: int, expected_rows: float) -> bool:
    """Whether a batch of `rows` should go now rather than wait for more: `rows` is a preferred size
    and the rows expected before the window ends would not reach the next one (or `limit`, the most
    the batch may take). `preferred` is sorted. Waiting is worth it only for a batch the model is
    tuned for (e.g. CUDA graphs captured at 1, 8, 64 pad a batch of 9 up to 64)."""
    if rows not in preferred or rows >= limit:
        return False
    following = next((p for p in preferred if p > rows), limit)
    return rows + expected_rows < min(following, limit)


@dataclass(slots=True)
class Arrivals:
    """The arrival signals of one batcher; `window_s` is its max_queue_delay_s."""

    window_s: float
    track_rate: bool = False  # the rate only serves closes_at_preferred (preferred sizes set)
    # Moving fraction of arrivals that found another caller of this model in the server. At
    # concurrency 1 it is exactly 0 (a client sends its next request only after the answer), so the
    # batch goes at once; once requests overlap at all, the window pays off even while the runner is
    # idle, because the next arrival is likely within it.
    overlap_frac: float = 0.0
    last_overlap_at: float = -math.inf
    callers_peak: int = 0
    callers_peak_at: float = -math.inf  # last time callers reached the peak (its decay)
    callers_peak_rose_at: float = -math.inf  # last time callers went above it
    # (arrival time, rows) of recent submits, for the arrival rate (expected_rows).
    _recent: deque[tuple[float, int]] = field(default_factory=deque)
    _recent_rows: int = 0
    # Arrival times of recent requests, for the request rate (sparse): only as many as it takes to
    # tell one a window (maxlen set in __post_init__), so a long window keeps no long history; the
    # old ones are forgotten when sparse reads them.
    _arrival_times: deque[float] = field(init=False, repr=False)
    # Whether each of the last tracked arrivals overlapped another caller (sparse).
    _overlaps: deque[bool] = field(default_factory=lambda: deque(maxlen=SPARSE_OVERLAP_ARRIVALS))

    def __post_init__(self) -> None:
        windows = self._sparse_horizon_s() / self.window_s if self.window_s > 0 else 0.0
        self._arrival_times = deque(maxlen=max(1, math.ceil(windows)))

    def arrived(self, now: float, n_rows: int, callers: int, queued_requests: int) -> None:
        """A request of `n_rows` reached the queue, `callers` tracked RPCs in the server (0: not
        tracked), `queued_requests` queued before it."""
        if self.track_rate:
            self._recent.append((now, n_rows))
            self._recent_rows += n_rows
            self._forget_old(now)
        self._arrival_times.append(now)
        if not callers:
            return
        overlapped = callers > 1 or queued_requests > 0
        self._overlaps.append(overlapped)
        self.overlap_frac += 0.05 * (overlapped - self.overlap_frac)
        if overlapped:
            self.last_overlap_at = now
        if callers > self.callers_peak:
            self.callers_peak_rose_at = now
        if callers >= self.callers_peak or now - self.callers_peak_at > CALLERS_PEAK_MEMORY_S:
            self.callers_peak = callers
            self.callers_peak_at = now

    def more_expected(self, now: float, callers: int, queued_requests: int) -> bool:
        """Whether more rows are likely to arrive within the window."""
        if not callers:
            return queued_requests > 1
        if callers > queued_requests:
            return True  # RPCs in the server that have not reached the queue yet
        # Overlapping arrivals lately: RPCs the event loop has not parsed yet are likely (open loop,
        # or the loop is the bottleneck)...
        if self.overlap_frac < OVERLAP_FRAC_TO_WAIT or now - self.last_overlap_at > OVERLAP_MEMORY_S:
            return False
        # ...unless as many are queued as the most callers seen lately, and that peak has held for a
        # window (while a burst ramps up, the peak is still rising and says nothing).
        peak_settled = now - self.callers_peak_rose_at > self.window_s
        return not (peak_settled and queued_requests >= self.callers_peak)

    def expected_rows(self, now: float, within_s: float, callers: int, queued_requests: int) -> float:
        """Rows likely to arrive within `within_s`: inf while a request in the server has not reached
        the queue yet (tracked callers), else the rate of the last few windows times `within_s`."""
        if callers > queued_requests:
            return math.inf
        self._forget_old(now)
        return self._recent_rows / self._horizon_s() * within_s

    def sparse(self, now: float, callers: int, queued_requests: int) -> bool:
        """Whether no more requests are likely within a window: no tracked caller in the server is on
        its way to the queue, recent arrivals mostly found no other caller there (an open loop at a
        low rate, not closed-loop callers coming back with their answers), and fewer than one request
        a window arrived lately. At 100 requests/s a 4-ms window brings a second request one time in
        three, and a lone request would pay the whole window for it."""
        if callers > queued_requests:
            return False
        if sum(self._overlaps) >= SPARSE_OVERLAP_FRAC * max(1, len(self._overlaps)):
            return False
        self._forget_old_arrivals(now)
        # A full history (maxlen: one a window) fails this too, whatever older arrivals it dropped.
        return len(self._arrival_times) * self.window_s < self._sparse_horizon_s()

    def _sparse_horizon_s(self) -> float:
        return max(SPARSE_HORIZON_MIN_S, SPARSE_HORIZON_WINDOWS * self.window_s)

    def _forget_old_arrivals(self, now: float) -> None:
        horizon_s = self._sparse_horizon_s()
        while self._arrival_times and now - self._arrival_times[0] > horizon_s:
            self._arrival_times.popleft()

    def _horizon_s(self) -> float:
        return max(RATE_HORIZON_MIN_S, RATE_HORIZON_WINDOWS * self.window_s)

    def _forget_old(self, now: float) -> None:
        horizon_s = self._horizon_s()
        while self._recent and now - self._recent[0][0] > horizon_s:
            self._recent_rows -= self._recent.popleft()[1]
