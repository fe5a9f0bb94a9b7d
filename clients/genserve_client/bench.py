"""Load generator: closed loop (C workers back to back) and open loop (arrivals at a fixed rate).

Its own CPU cost is kept low because it shares a 2-core machine with the server: one asyncio
loop, requests pre-serialized (a constant prefix plus a hand-encoded seed field, so no message is
built per call) and responses left as bytes (never parsed).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from genserve.v1 import genserve_pb2
from genserve_client.attempts import grpc_timeout
from genserve_client.channel import ChannelConfig, new_request_id
from genserve_client.requests import output_options

SAMPLE_METHOD = "/genserve.v1.GenerationService/Sample"
CLIENT_BACKLOG = "CLIENT_BACKLOG"  # open loop: an arrival found max_outstanding calls in flight
# Open loop: arrivals 10 us apart at most. One asyncio loop sends a few thousand calls a second; its
# arrival loop awaits only when ahead of its schedule, so at a rate its bare iterations cannot keep
# up with (1e7/s) the calls it started went out only once the level's arrivals ran out, and a rate
# whose gaps vanish beside the clock (1e300/s) never ended.
MAX_RATE = 100_000


class StreamsRefused(Exception):
    """The server refused a call's HTTP/2 stream: more calls at once on one connection than its
    max_concurrent_streams. gRPC answers each such call UNAVAILABLE at once, so a loop calling again
    measured a storm of refusals as requests; the run stops instead."""


def _refused_stream(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC C-core's answer to a stream over the server's limit: RST_STREAM REFUSED_STREAM (7)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "RST_STREAM with error code 7" in (
        exc.details() or ""
    )


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class PayloadFactory:
    """Serialized single-image SampleRequests with fresh seeds (so a server-side cache never hits).

    Protobuf parsing merges concatenated messages, so prefix + the encoding of field 4
    (`seeds`, packed: tag 0x22, length, varint) is a valid SampleRequest with that one seed.
    """

    def __init__(
        self,
        model: str,
        *,
        version: str = "",
        labels: Sequence[int] = (),
        fmt: str = "raw",
        base_seed: int | None = None,
    ):
        out = output_options({"format": fmt})
        self._prefixes: list[bytes] = [
            genserve_pb2.SampleRequest(
                model=model, version=version, labels=[label], output=out
            ).SerializeToString()
            for label in labels
        ] or [genserve_pb2.SampleRequest(model=model, version=version, output=out).SerializeToString()]
        self._seed = random.randrange(2**40) if base_seed is None else base_seed
        self._i = 0

    def __call__(self) -> bytes:
        prefix = self._prefixes[self._i % len(self._prefixes)]
        self._i += 1
        self._seed += 1
        seed = varint(self._seed)
        return prefix + b"\x22" + varint(len(seed)) + seed


@dataclass
class BenchResult:
    mode: str  # "closed" or "open"
    concurrency: int  # closed: workers; open: the bound on outstanding calls
    rate: float | None  # open loop: arrivals per second
    duration_s: float
    requests: int = 0
    images: int = 0
    images_per_s: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # The first failed call's message for each code in `errors` (the server's reason: what makes a
    # run that measured nothing actionable); not in the table.
    error_messages: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Recorder:
    def __init__(self) -> None:
        self.latencies_s: list[float] = []
        self.errors: Counter[str] = Counter()
        self.error_messages: dict[str, str] = {}
        # The last success's answer: a failed call's (one the server never answered ends at
        # --timeout) does not stretch the window its successes are counted over.
        self.last_ok = 0.0
        self.streams_refused = False  # a call's stream was refused: the run stops (StreamsRefused)

    def result(self, base: BenchResult, started: float, end: float) -> BenchResult:
        # The window: the scheduled `end` at least, on to the last success if later.
        elapsed = max(max(self.last_ok, end) - started, 1e-9)
        base.requests = len(self.latencies_s) + sum(self.errors.values()) - self.errors[CLIENT_BACKLOG]
        base.images = len(self.latencies_s)
        base.images_per_s = round(base.images / elapsed, 2) if base.images else 0.0
        base.duration_s = round(elapsed, 3)
        if self.latencies_s:
            p50, p95, p99 = np.percentile(np.asarray(self.latencies_s) * 1e3, [50, 95, 99])
            base.p50_ms, base.p95_ms, base.p99_ms = round(p50, 2), round(p95, 2), round(p99, 2)
        base.errors = dict(self.errors)
        base.error_messages = dict(self.error_messages)
        return base


class LoadGenerator:
    def __init__(
        self,
        config: ChannelConfig,
        payloads: Callable[[], bytes],  # e.g. PayloadFactory: one serialized request per call
        *,
        channels: int = 1,
        timeout_s: float = 30.0,
        method: str = SAMPLE_METHOD,  # the full method path the payloads are requests of
    ) -> None:
        self.config = config
        self.payloads = payloads
        self.timeout_s = timeout_s
        # One HTTP/2 connection per channel: gRPC would otherwise carry them all over one.
        self._channels = [config.aio_channel(own_connection=True) for _ in range(max(1, channels))]
        # No (de)serializers: requests go out as the pre-built bytes, responses stay bytes.
        self._calls: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            ch.unary_unary(method) for ch in self._channels
        ]
        # Each call its own x-request-id (the server echoes and logs it): the run's prefix, then
        # the call's number, so the server's log tells the calls apart and groups them by run.
        self._run_id = new_request_id()[:16]
        self._next = 0

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    def _check_streams(self, rec: _Recorder, at_once: int) -> None:
        if rec.streams_refused:
            per_channel = math.ceil(at_once / len(self._calls))
            raise StreamsRefused(
                f"the server refused calls beyond its HTTP/2 streams per connection "
                f"(max_concurrent_streams): up to {at_once} calls at once over {len(self._calls)} "
                f"channel(s), {per_channel} per connection, is more than it takes; spread them over "
                f"more channels (--channels) or send fewer at once"
            )

    async def _one(self, rec: _Recorder, started_at: float) -> None:
        call = self._calls[self._next % len(self._calls)]
        metadata = self.config.metadata(f"{self._run_id}-{self._next}")
        self._next += 1
        try:
            await call(self.payloads(), timeout=grpc_timeout(self.timeout_s), metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if _refused_stream(exc):
                rec.streams_refused = True  # not a request the server took: the run stops
                return
            code = exc.code().name
            rec.errors[code] += 1
            rec.error_messages.setdefault(code, exc.details() or "")
        else:
            # Open loop measures from the scheduled arrival, so a slow server cannot hide its
            # queueing by slowing the arrivals down (coordinated omission).
            rec.last_ok = time.perf_counter()
            rec.latencies_s.append(rec.last_ok - started_at)

    async def closed_loop(self, concurrency: int, duration_s: float) -> BenchResult:
        rec = _Recorder()
        started = time.perf_counter()
        end = started + duration_s

        async def worker() -> None:
            task = asyncio.current_task()
            while time.perf_counter() < end and not rec.streams_refused:
                await self._one(rec, time.perf_counter())
                # grpc.aio's call task swallows a cancel that crosses its answer and returns the
                # answer: the worker's cancel (Ctrl-C) is then only in its count, not raised.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self._check_streams(rec, concurrency)
        return rec.result(BenchResult("closed", concurrency, None, duration_s), started, end)

    async def open_loop(
        self,
        rate: float,
        duration_s: float,
        *,
        max_outstanding: int = 256,
        poisson: bool = True,
        seed: int = 0,
    ) -> BenchResult:
        if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
            # 0 divides by zero; a negative or NaN rate never reaches `end` and spins forever.
            raise ValueError(f"open loop rate must be > 0 and at most {MAX_RATE} per second, got {rate}")
        rec = _Recorder()
        rng = random.Random(seed)
        started = time.perf_counter()
        end = started + duration_s
        in_flight: set[asyncio.Task[None]] = set()
        # Fixed arrivals at k / rate for k = 0, 1, ...: rate x duration of them in [started, end),
        # each time computed, not summed (a sum of 1/rate drifts across `end`). Poisson: the first
        # after an exponential gap too, as every other (memoryless), rate x duration on average.
        arrival = started
        k = 0
        while True:
            if poisson:
                arrival += rng.expovariate(rate)
            elif k >= rate * duration_s:  # k / rate >= duration_s, without its rounding
                break
            else:
                arrival = started + k / rate
                k += 1
            if arrival >= end or rec.streams_refused:
                break
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= max_outstanding:
                rec.errors[CLIENT_BACKLOG] += 1
                continue
            task = asyncio.create_task(self._one(rec, arrival))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.gather(*in_flight)
        self._check_streams(rec, max_outstanding)
        # The window is the scheduled one at least: a sparse loop's last arrival (or answer) comes
        # before `end`, and measuring up to it alone would overstate the throughput.
        return rec.result(BenchResult("open", max_outstanding, rate, duration_s), started, end)


def format_table(results: Sequence[BenchResult]) -> str:
    header = ["mode", "conc", "rate", "requests", "img/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    rows = [header]
    for r in results:
        errors = ", ".join(f"{k}={v}" for k, v in sorted(r.errors.items())) or "-"

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        rate = "-" if r.rate is None else f"{r.rate:g}"
        rows.append(
            [
                r.mode,
                str(r.concurrency),
                rate,
                str(r.requests),
                f"{r.images_per_s:.1f}",
                ms(r.p50_ms),
                ms(r.p95_ms),
                ms(r.p99_ms),
                errors,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
