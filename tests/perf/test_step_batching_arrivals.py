"""bench.step_batching's open-loop arrivals are a Poisson process over the whole window."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from exec_support import exec_wrapped

from bench.common import REPO_ROOT
from bench.step_batching import ChainBatches, Setup, failed_levels, measure_rate, one_rate, poisson_arrivals


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


def test_a_request_that_fails_is_counted_and_a_policy_without_a_success_fails_the_run() -> None:
    """An error raised by a policy's submit (a graph that fails, a scheduler bug) crashed the whole
    run with its traceback, the figures of every other rate and policy lost: it is counted under
    errors, by type with its first message, and a policy that completed no request at a rate is
    a failed level (exit 1), as genserve-client bench's level without one success."""

    async def works(i: int) -> None:
        await asyncio.sleep(0.001)

    async def fails_odd(i: int) -> None:
        if i % 2:
            raise RuntimeError(f"prior call {i} failed")

    async def fails(i: int) -> None:
        raise ValueError("no rows")

    latencies, throughput, errors = asyncio.run(one_rate(fails_odd, 40.0, 0.5, seed=1))
    n = len(poisson_arrivals(40.0, 0.5, 1))
    assert len(latencies) + sum(errors.values()) == n and errors["RuntimeError"] > 0 and latencies
    setup = Setup("fake", {"step": fails, "request": works}, [], {"step": {}, "request": {}}, {})
    got = asyncio.run(measure_rate(setup, argparse.Namespace(rounds=2, duration=0.2), 0, 40.0))
    assert got["step"]["n"] == 0 and got["step"]["errors"]["ValueError"] > 0
    assert got["step"]["error_messages"] == {"ValueError": "no rows"}
    assert got["request"]["n"] > 0 and got["request"]["errors"] == {}
    (line,) = failed_levels([got])
    assert line.startswith("step at 40/s: no request completed (errors: {'ValueError': ")
    assert line.endswith("; ValueError: no rows)")


@pytest.mark.parametrize("cancelled", ["waiting", "admitted"])
def test_a_chain_batch_waiter_cancelled_fails_no_other_request_and_frees_its_place(cancelled: str) -> None:
    """--request-scope chain: a waiting request cancelled (the run stopped by Ctrl-C) still sat in
    the queue, and the batch that left next set a result on its cancelled future: InvalidStateError
    raised in that batch's request, counted as a failed one; one cancelled once admitted, before it
    ran, kept its place, and every later request waited for it forever."""

    async def scenario() -> list[str]:
        release = asyncio.Event()
        done: list[str] = []

        async def submit(i: int) -> None:
            if i == 0:
                await release.wait()
            done.append(f"ran {i}")

        chained = ChainBatches(1).around(submit)
        first = asyncio.create_task(chained(0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # first admitted, inside submit
        second = asyncio.create_task(chained(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # second waits for its entry
        if cancelled == "waiting":
            second.cancel()
            release.set()
        else:
            release.set()
            await asyncio.sleep(0)  # first leaves and admits second: second's wake-up is pending
            second.cancel()
        try:
            await first
        except Exception as exc:  # noqa: BLE001 - the failure under test
            done.append(f"first failed: {exc!r}")
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.wait_for(chained(2), timeout=5)
        return done

    assert asyncio.run(scenario()) == ["ran 0", "ran 2"]


def test_a_run_stopped_by_ctrl_c_mid_rate_exits_130_with_one_line_and_no_traceback() -> None:
    # Ctrl-C ended python -m bench.step_batching with asyncio.run's KeyboardInterrupt traceback (and
    # the request's CancelledError one before it), where every other command says one line, exit 130.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = ["--synthetic-chain", "--request-scope", "chain", "--rows", "4", "--lone", "1"]
    proc = subprocess.Popen(
        exec_wrapped(
            [sys.executable, "-m", "bench.step_batching", *argv, "--rates", "1.0", "--duration", "60"],
            sigint="default",  # as a terminal starts it
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.split()[:2] == ["rate/s", "policy"]:  # the arrivals of the first rate begin
                break
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{stderr}"
    assert stderr.splitlines() == ["bench.step_batching: interrupted"], stderr
