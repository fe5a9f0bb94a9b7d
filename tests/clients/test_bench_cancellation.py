"""The load generator stops when its run is cancelled (Ctrl-C is asyncio.run cancelling the main
task), even where a call swallows the cancel: grpc.aio's call task catches the CancelledError of a
call whose answer arrived as the cancel came and returns that answer, so the worker awaiting it sees
a normal result and, unchecked, went on calling until --duration ended (the clean-clone CI's
`test_bench_stopped_by_a_signal_mid_run_exits_with_one_line_and_no_traceback` sat out its 60 s
twice on a loaded machine). In process, no server: the calls are stand-ins."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest

from genserve_client.bench import LoadGenerator
from genserve_client.channel import ChannelConfig


def _unused_target() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class _SwallowingCall:
    """A unary call that answers after a moment and, cancelled meanwhile, answers anyway (grpc.aio's
    call task when the answer and the cancel cross)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: bytes, **_: Any) -> bytes:
        self.calls += 1
        inner = asyncio.ensure_future(asyncio.sleep(0.01))
        try:
            await inner
        except asyncio.CancelledError:
            pass  # the answer was in: returned, as grpc.aio's _invoke does
        return b""


@pytest.mark.parametrize("loop_kind", ["closed", "open"])
def test_a_cancelled_run_stops_although_a_call_swallowed_the_cancel(loop_kind: str) -> None:
    async def scenario() -> tuple[bool, int, int]:
        gen = LoadGenerator(ChannelConfig(target=_unused_target()), lambda: b"")
        fake = _SwallowingCall()
        gen._calls = [fake]  # type: ignore[list-item]
        try:
            if loop_kind == "closed":
                run = asyncio.ensure_future(gen.closed_loop(concurrency=4, duration_s=30.0))
            else:
                run = asyncio.ensure_future(gen.open_loop(400.0, 30.0, max_outstanding=8))
            await asyncio.sleep(0.3)
            assert fake.calls > 0
            run.cancel()
            # The run's duration is 30 s: ended well before it, or not at all.
            done, _ = await asyncio.wait({run}, timeout=10.0)
            stopped = bool(done) and run.cancelled()
            calls_at_stop = fake.calls
            await asyncio.sleep(0.2)  # no call of the cancelled run goes out after it stopped
            if not done:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            return stopped, calls_at_stop, fake.calls
        finally:
            await gen.close()

    stopped, calls_at_stop, calls_later = asyncio.run(scenario())
    assert stopped, "the cancelled run went on calling"
    assert calls_later == calls_at_stop


def test_bench_runs_where_the_event_loop_takes_no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows asyncio's loops have no add_signal_handler (NotImplementedError), and run_async,
    which `genserve-client bench` runs in, set one for SIGTERM: every bench failed with a
    traceback before its first call. There it runs as asyncio.run (Ctrl-C still stops it; SIGTERM
    ends the process, Windows' own way)."""
    import signal
    from asyncio import unix_events

    from genserve_client.interrupt import raise_terminated, run_async

    def unsupported(self: Any, sig: int, callback: Any, *args: Any) -> None:
        raise NotImplementedError  # asyncio's BaseEventLoop, what Windows' loops inherit

    monkeypatch.setattr(unix_events._UnixSelectorEventLoop, "add_signal_handler", unsupported)

    async def answer() -> int:
        await asyncio.sleep(0)
        return 7

    before = signal.signal(signal.SIGTERM, raise_terminated)  # as genserve_client/__main__.py sets it
    try:
        assert run_async(answer()) == 7
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("loop_kind", ["closed", "open"])
def test_more_calls_at_once_than_a_connection_takes_stop_the_run_naming_channels(loop_kind: str) -> None:
    """A server's max_concurrent_streams below the calls at once on one channel: gRPC refuses the
    extra streams UNAVAILABLE (RST_STREAM, REFUSED_STREAM) at once, and the bench called again at
    once, thousands of 'errors' a second counted as requests it had sent. The run stops at the first
    such refusal with a message naming the channels to spread the calls over."""
    from genserve_client.bench import StreamsRefused

    async def scenario() -> tuple[BaseException | None, int]:
        handled = 0

        async def sample(request: bytes, context: object) -> bytes:
            nonlocal handled
            handled += 1
            await asyncio.sleep(0.05)
            return b""

        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 4)])
        handler = grpc.method_handlers_generic_handler(
            "genserve.v1.GenerationService", {"Sample": grpc.unary_unary_rpc_method_handler(sample)}
        )
        server.add_generic_rpc_handlers([handler])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        gen = LoadGenerator(ChannelConfig(target=f"127.0.0.1:{port}"), lambda: b"", channels=1)
        try:
            if loop_kind == "closed":
                run = gen.closed_loop(concurrency=16, duration_s=2.0)
            else:
                run = gen.open_loop(2000.0, 2.0, max_outstanding=16, poisson=False)
            try:
                await asyncio.wait_for(run, 30)
            except StreamsRefused as exc:
                return exc, handled
            return None, handled
        finally:
            await gen.close()
            await server.stop(0)

    refused, _ = asyncio.run(scenario())
    assert refused is not None, "the run counted the refused streams as requests"
    assert "channels" in str(refused) and "max_concurrent_streams" in str(refused), refused
