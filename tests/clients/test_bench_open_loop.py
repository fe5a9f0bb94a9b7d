"""The open loop's arrivals, in process against stand-in calls (no server): it sends at the rate
asked and keeps its calls moving while it sends."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import pytest

from genserve_client.bench import BenchResult, LoadGenerator
from genserve_client.channel import ChannelConfig


def _unused_target() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class _InstantCall:
    """A unary call answered at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: bytes, **_: Any) -> bytes:
        self.calls += 1
        return b""


def _open_loop(call: Any, rate: float, duration_s: float, **kwargs: Any) -> BenchResult:
    async def scenario() -> BenchResult:
        gen = LoadGenerator(ChannelConfig(target=_unused_target()), lambda: b"")
        gen._calls = [call]
        try:
            return await gen.open_loop(rate, duration_s, **kwargs)
        finally:
            await gen.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize(("rate", "duration_s"), [(1.0, 1.0), (4.0, 0.5), (5.0, 0.6), (10.0, 0.3)])
def test_fixed_arrivals_send_rate_times_duration_calls(rate: float, duration_s: float) -> None:
    # Fixed arrivals came at 1/rate, 2/rate, ... and none at the level's start: a level sent
    # rate x duration - 1 calls, or that many + 1 where float sums fell short of the end
    # (`--rate 1 --duration 2 --arrivals fixed` sent 1 call: 0.5 img/s from a server idle).
    call = _InstantCall()
    result = _open_loop(call, rate, duration_s, poisson=False)
    expected = round(rate * duration_s)
    assert result.requests == result.images == call.calls == expected, result
    assert result.errors == {}
    assert result.images_per_s == pytest.approx(rate, rel=0.05), result


@pytest.mark.parametrize("rate", [1e300, 1e7])
def test_a_rate_past_what_one_client_loop_can_send_is_refused_naming_rate(rate: float) -> None:
    # The arrival loop awaits only when it is ahead of its schedule: at 1e7/s it never was, so the
    # calls it started were not sent until its level's arrivals ran out (`--rate 1e7 --duration 1`:
    # 256 calls, p50 6 s, 10,001,865 CLIENT_BACKLOG, a 6-s level), and at 1e300/s its sum of 1/rate
    # gaps never moved (`started + 1e-300 == started`): a hang at 100% CPU that Ctrl-C did not stop.
    from genserve_client import cli

    args = cli.build_parser().parse_args(["bench", "--model", "m", "--rate", f"1,{rate:g}"])
    with pytest.raises(cli.UsageError, match=r"--rate .*at most 100000.*got 1e\+(300|07)"):
        cli.check_bench_args(args)

    # The library's open loop refuses it too, before any call (run in a thread: a loop that never
    # awaits cannot be cancelled).
    outcome: list[BaseException | BenchResult] = []

    def run() -> None:
        try:
            outcome.append(_open_loop(_InstantCall(), rate, 0.1))
        except BaseException as exc:  # noqa: BLE001 - the outcome is the test's
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=10.0)
    assert outcome, "open_loop did not return"
    assert isinstance(outcome[0], ValueError) and "rate" in str(outcome[0]), outcome
    assert "100000" in str(outcome[0]), outcome
