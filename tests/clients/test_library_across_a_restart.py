"""A client that keeps one channel across a restart of its server (a crash and restart, a rolling
update on the same port): its calls succeed as soon as the new server serves, and a call to a server
that stays down still fails within its retry and reconnect window (docs/client.md, "Retries and
server restarts")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from server_support import TINY_LATENT, ServerProcess, generator_graph, start_server, write_model

from genserve_client import AsyncGenserveClient, GenserveClient, GenserveClientError
from genserve_client.channel import ChannelConfig
from genserve_client.retry import RetryPolicy

MODEL = "gen"
CONFIG = {"warmup": False, "drain_grace_s": 1.0}
# The outage lasts until the clients' channels have tried to reconnect this many times: gRPC's
# reconnect backoff (1 s, x1.6 per failed attempt, +-20 %) is then at the 2 s cap
# (ChannelConfig.max_reconnect_backoff_s), where it stays however long the outage lasts, so the
# channel's next attempt is 1.6-2.4 s away when the calls start. (The old 10 s cap let it grow on to
# seconds: the test checks the cap the channels are given rather than waiting that growth out.)
ATTEMPTS_BEFORE_RESTART = 3
# Retries that alone span a few hundredths of a second: a call made as the server comes back
# succeeds only by waiting for its channel to connect again (RetryPolicy.reconnect_wait_s), not
# because its retries happened to outlast the channel's next attempt.
QUICK_RETRIES = RetryPolicy(initial_backoff_s=0.005, max_backoff_s=0.01)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class StartingServer:
    """The port while its server is down or still starting, as the client sees it: every connection
    is accepted and closed before a word of HTTP/2, so each is a failed reconnect attempt of the
    client's channel, counted here. `serve_from` ends the outage right after a failed attempt: from
    then on each connection reaches the new server (started meanwhile on a port of its own), so the
    clients' calls start while their channels' next attempt is one whole backoff away, however long
    the new server took to start."""

    def __init__(self, port: int) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.attempts = 0
        self._serve_after: int | None = None
        self._backend = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            if self._serve_after is not None and self.attempts >= self._serve_after:
                backend = socket.create_connection(("127.0.0.1", self._backend), timeout=5)
                backend.settimeout(None)
                for src, dst in ((conn, backend), (backend, conn)):
                    threading.Thread(target=_pump, args=(src, dst), daemon=True).start()
                continue
            conn.close()
            self.attempts += 1

    def wait_attempts(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.attempts < n:
            assert time.monotonic() < deadline, f"only {self.attempts} reconnect attempts in {timeout_s} s"
            time.sleep(0.01)

    def serve_from(self, port: int, after: int, timeout_s: float) -> None:
        """Forward every connection to `port` from the failed attempt number `after` on (or the next
        one, if that is past); returns then."""
        self._backend = port
        self._serve_after = max(after, self.attempts + 1)
        self.wait_attempts(self._serve_after, timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def _start_behind(tmp_path: Path, repo: Path, port: StartingServer) -> ServerProcess:
    """Start a new server (on a port of its own) and wait, on a channel of its own, until it serves;
    hold `port` down through ATTEMPTS_BEFORE_RESTART reconnect attempts of the clients' channels (or
    the first after the new server serves), right after which it reaches the new server."""
    new = start_server(repo, tmp_path / "new", config=CONFIG)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{new.port}") as fresh:
            grpc.channel_ready_future(fresh).result(timeout=30)
        port.serve_from(new.port, after=ATTEMPTS_BEFORE_RESTART, timeout_s=60)
    except BaseException:
        new.stop()  # not yet in the caller's list of servers to stop
        raise
    return new


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_calls_right_after_the_server_restarted_succeed_on_the_channels_they_had(
    client_kind: str, tmp_path: Path, server_port: int
) -> None:
    """A channel that lost its server kept failing UNAVAILABLE after the server was back: gRPC's
    reconnect backoff (capped at 10 s) had its next attempt seconds away, and the call's retries
    (about 1.5 s in all) were spent before it, so a call made right after a restart failed for up to
    ~10 s. Now the backoff is capped at 2 s and a retry waits (up to RetryPolicy.reconnect_wait_s)
    for the channel to connect again: the call succeeds, a unary call and a sample_stream (a bulk
    job's streams) alike, in both clients."""
    # The cap the clients give their channels (the outage below is only as long as reaching it takes).
    assert ("grpc.max_reconnect_backoff_ms", 2000) in ChannelConfig("127.0.0.1:1").options()
    repo = tmp_path / "models"
    card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]}
    write_model(repo, MODEL, "generator", generator_graph(TINY_LATENT, 1, 8, 8), card)
    port = server_port  # no one else's between the old server and StartingServer
    target = f"127.0.0.1:{port}"
    servers = [start_server(repo, tmp_path / "old", config=CONFIG, extra_args=("--port", str(port)))]
    down: list[StartingServer] = []

    def restart() -> None:  # the clients' channels share one connection (gRPC's subchannel pool)
        servers[0].proc.send_signal(signal.SIGKILL)  # by its pid
        servers[0].proc.wait(10)
        down.append(StartingServer(port))
        servers.append(_start_behind(tmp_path, repo, down[0]))

    def timed(call: Callable[[], object]) -> float:
        began = time.monotonic()
        call()  # raised GenserveClientError UNAVAILABLE
        return time.monotonic() - began

    try:
        if client_kind == "sync":
            with (
                GenserveClient(target, timeout_s=30, retry=QUICK_RETRIES) as unary,
                GenserveClient(target, retry=QUICK_RETRIES) as streams,
            ):
                calls: list[Callable[[], object]] = [
                    lambda: unary.sample(MODEL, seeds=[1]),
                    lambda: list(streams.sample_stream(MODEL, 4, base_seed=1, timeout_s=30)),
                ]
                for call in calls:
                    call()
                restart()
                with ThreadPoolExecutor(2) as pool:
                    took = list(pool.map(timed, calls))
        else:

            async def scenario() -> list[float]:
                async with (
                    AsyncGenserveClient(target, timeout_s=30, retry=QUICK_RETRIES) as unary,
                    AsyncGenserveClient(target, retry=QUICK_RETRIES) as streams,
                ):

                    async def sample() -> None:
                        await unary.sample(MODEL, seeds=[1])

                    async def stream() -> None:
                        async for _ in streams.sample_stream(MODEL, 4, base_seed=1, timeout_s=30):
                            pass

                    async def timed(call: Callable[[], Awaitable[None]]) -> float:
                        began = time.monotonic()
                        await call()
                        return time.monotonic() - began

                    await sample()
                    await stream()
                    await asyncio.to_thread(restart)
                    return list(await asyncio.gather(timed(sample), timed(stream)))

            took = asyncio.run(scenario())
    finally:
        for server in servers:
            server.stop()
        for starting in down:
            starting.close()
    # One reconnect backoff (2 s, +20 % jitter) at most, with room for a busy machine.
    assert max(took) < 5.0, took


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_a_call_to_a_server_that_stays_down_fails_within_its_retry_and_reconnect_window(
    client_kind: str, idle_port: int
) -> None:
    """Waiting for the channel to reconnect is bounded: a call to a server that is down fails
    UNAVAILABLE after its retries and at most RetryPolicy.reconnect_wait_s more, and a call whose
    deadline is shorter fails UNAVAILABLE (the connection's error) by its deadline."""
    target = f"127.0.0.1:{idle_port}"  # nothing listens
    policy = RetryPolicy()
    window = policy.reconnect_wait_s + sum(
        min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier**k)
        for k in range(policy.max_attempts - 1)
    )

    def timed(timeout_s: float) -> tuple[float, GenserveClientError]:
        began = time.monotonic()
        try:
            if client_kind == "sync":
                with GenserveClient(target, timeout_s=timeout_s) as client:
                    client.list_models()
            else:

                async def call() -> None:
                    async with AsyncGenserveClient(target, timeout_s=timeout_s) as client:
                        await client.list_models()

                asyncio.run(call())
        except GenserveClientError as exc:
            return time.monotonic() - began, exc
        raise AssertionError("a call to a port nobody listens on succeeded")

    took, error = timed(60.0)
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    assert policy.reconnect_wait_s <= took < window + 1.5, (took, window)
    took, error = timed(1.0)
    assert error.code == grpc.StatusCode.UNAVAILABLE, error
    # By its 1 s deadline, not after the reconnect wait (reconnect_wait_s, 3 s): a bound between the
    # two, with room for the client's set-up on a busy 2-core machine (1.15 s seen; 1.5 left 0.35 s).
    assert took < policy.reconnect_wait_s - 0.5, took


@pytest.mark.parametrize("client_kind", ["sync", "asyncio"])
def test_closing_the_client_while_a_call_waits_for_its_channel_to_reconnect_ends_it_at_once(
    client_kind: str, idle_port: int
) -> None:
    """close() under a call that waits for its channel (the server is down) ends it with CANCELLED
    at once, as it does during a retry's backoff, not when the reconnect wait runs out."""
    target = f"127.0.0.1:{idle_port}"  # nothing listens
    policy = RetryPolicy(reconnect_wait_s=30.0)
    began = time.monotonic()
    if client_kind == "sync":
        client = GenserveClient(target, retry=policy)
        threading.Timer(0.5, client.close).start()
        with pytest.raises(GenserveClientError) as info:
            client.list_models()
        error = info.value
    else:

        async def scenario() -> GenserveClientError:
            client = AsyncGenserveClient(target, retry=policy)
            task = asyncio.ensure_future(client.list_models())
            await asyncio.sleep(0.5)
            await client.close()
            with pytest.raises(GenserveClientError) as info:
                await asyncio.wait_for(task, 10)
            return info.value

        error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.CANCELLED, error
    assert time.monotonic() - began < 3.0
