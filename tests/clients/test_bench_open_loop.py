"""The open loop's arrivals, in process against stand-in calls (no server): it sends at the rate
asked and keeps its calls moving while it sends."""

from __future__ import annotations

import asyncio
import socket
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
