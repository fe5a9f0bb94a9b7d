"""bench.step_batching's open-loop arrivals are a Poisson process over the whole window."""

from __future__ import annotations

import numpy as np
import pytest

from bench.step_batching import poisson_arrivals


@pytest.mark.parametrize(("rate", "duration_s"), [(1.0, 1.0), (0.5, 3.0), (20.0, 2.0)])
def test_the_mean_count_of_arrivals_is_rate_times_duration(rate: float, duration_s: float) -> None:
    # A fixed draw of 1.5 x rate x duration (at least 1) capped the count: at rate 1 over 1 s at most
    # one arrival, 0.63 on average instead of 1.
    counts = [len(poisson_arrivals(rate, duration_s, seed)) for seed in range(2000)]
    expected = rate * duration_s
    assert np.mean(counts) == pytest.approx(expected, rel=0.08)
    assert np.var(counts) == pytest.approx(expected, rel=0.15)  # Poisson: variance = mean


def test_arrivals_are_sorted_inside_the_window_and_repeat_with_their_seed() -> None:
    arrivals = poisson_arrivals(5.0, 4.0, seed=3)
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 4.0
    assert poisson_arrivals(5.0, 4.0, seed=3) == arrivals != poisson_arrivals(5.0, 4.0, seed=4)
