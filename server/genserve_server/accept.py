"""Accepting several new calls per event-loop turn for the generation methods.

grpc.aio's server keeps one request for a new call outstanding per registered method (and one for
every generic method together). Each accepted call costs the event loop a wake-up through the
completion-queue thread before the next call of that method can be accepted: a turn of the loop
accepts one call. Under a closed loop of 32-64 callers the answers of one batch come back as a
cohort that the loop then took in one at a time, with the model idle in between: the accept queue,
not the model, bounded a tiny model's throughput, and a request waited 8-12 ms before its handler
ran (bench/profile.md, fourteenth round). Accepting up to 32 per turn gave tiny models 1.4x the
images/s at c=64 for 0.7x the server CPU per request.

`Acceptor` keeps `accept_depth` requests outstanding per generation method: grpc's own one and
`accept_depth - 1` more held by tasks of its own, each of which hands the call it gets to grpc's own
per-call path (`_handle_rpc` under `_schedule_rpc_coro`). Interceptors, deadlines, cancellation,
status and the server's graceful stop are grpc's, exactly as for the calls grpc accepts itself.

That path is grpc's private Cython API (grpcio 1.85). `supported()` checks it by name and signature
at start; where it differs (a grpcio that changed it), the server logs one line and accepts as grpc
does, one call per method per turn.

`at_call_end` runs a function once a call these tasks accepted has ended (its response sent, or the
call cancelled or timed out), as `context.add_done_callback` would, without the reference cycle that
callback leaves behind: grpc keeps `partial(callback, context)` in the call's state, which the
context refers to, so every call with a done callback stayed in memory until a full garbage
collection, and those collections grew to 5 ms pauses of a saturated server (bench/profile.md,
fifteenth round).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import grpc

logger = logging.getLogger(__name__)

# The private names this module uses, with the parameters it passes them (grpcio 1.85.1).
_HANDLE_RPC_PARAMS = (
    "method_name",
    "method_resolver",
    "interceptors",
    "rpc_state",
    "loop",
    "concurrency_exceeded",
)
_SCHEDULE_PARAMS = ("rpc_coro", "rpc_state", "loop", "method_name")

# What runs once the current call has ended, for a call an Acceptor task accepted (None: grpc
# accepted it). Set by the accept task before it creates the call's task; the handler's task, which
# grpc creates inside that one, inherits it.
_CALL_END: ContextVar[list[Callable[[], None]] | None] = ContextVar("genserve_call_end", default=None)


def at_call_end(hook: Callable[[], None]) -> bool:
    """Run `hook` once the current call has ended (its response sent, or the call cancelled or timed
    out). False where this module did not accept the call: the caller uses grpc's done callback."""
    hooks = _CALL_END.get()
    if hooks is None:
        return False
    hooks.append(hook)
    return True


def _cygrpc() -> Any:
    return importlib.import_module("grpc._cython.cygrpc")


def _params(function: Any) -> tuple[str, ...] | None:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def unsupported_reason() -> str | None:
    """Why grpc's private accept path cannot be used here (None: it can)."""
    try:
        cygrpc = _cygrpc()
    except ImportError as exc:  # pragma: no cover - grpcio always ships it
        return f"grpc._cython.cygrpc: {exc}"
    for name in ("_handle_rpc", "_schedule_rpc_coro", "_MethodResolver", "AioServer"):
        if not hasattr(cygrpc, name):
            return f"grpcio {grpc.__version__} has no cygrpc.{name}"
    if not hasattr(cygrpc.AioServer, "_request_registered_call"):
        return f"grpcio {grpc.__version__} has no AioServer._request_registered_call"
    for name, expected in (("_handle_rpc", _HANDLE_RPC_PARAMS), ("_schedule_rpc_coro", _SCHEDULE_PARAMS)):
        found = _params(getattr(cygrpc, name))
        if found != expected:
            return f"grpcio {grpc.__version__}: cygrpc.{name} takes {found}, not {expected}"
    return None


def supported() -> bool:
    """Whether grpc's private accept path can be used here; logs why where it cannot."""
    reason = unsupported_reason()
    if reason is not None:
        logger.info("accepting one call per method per loop turn (accept_depth unused): %s", reason)
    return reason is None


class Acceptor:
    """`depth - 1` extra outstanding requests for new calls of each registered method of `server`.

    `handlers`: full method name -> the handler registered for it with
    `server.add_registered_method_handlers` (before the server started); `interceptors`: the server's.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        depth: int,
    ) -> None:
        if depth < 1:
            raise ValueError(f"accept_depth must be >= 1, got {depth}")
        self._server = server
        self._handlers = dict(handlers)
        self._interceptors = tuple(interceptors)
        self.depth = depth
        self._tasks: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[None]] = set()
        # Calls these tasks accepted (grpc's own accept counts none here).
        self.accepted = 0

    @property
    def methods(self) -> list[str]:
        """The methods whose calls are accepted `depth` at a time."""
        return list(self._handlers) if self.depth > 1 else []

    @property
    def in_flight(self) -> int:
        """Calls these tasks accepted that have not ended yet."""
        return len(self._calls)

    @property
    def running(self) -> int:
        """Accept tasks still waiting for calls."""
        return sum(1 for task in self._tasks if not task.done())

    def start(self) -> None:
        """After `server.start()`, on its event loop. Where grpc's private objects are not what this
        module expects, logs why and leaves the accepting to grpc."""
        if self.depth < 2 or not self._handlers:
            return
        try:
            cygrpc = _cygrpc()
            aio_server = self._server._server  # type: ignore[attr-defined]  # grpc.aio.Server's core server
            resolver = cygrpc._MethodResolver([], self._handlers)
            if not aio_server.is_running():
                raise RuntimeError("the server is not running")
        except Exception as exc:
            logger.info("accepting one call per method per loop turn: %s: %s", type(exc).__name__, exc)
            return
        loop = asyncio.get_running_loop()
        for method in self._handlers:
            for _ in range(self.depth - 1):
                task = loop.create_task(self._accept(cygrpc, aio_server, resolver, method, loop))
                self._tasks.append(task)

    async def _accept(self, cygrpc: Any, aio_server: Any, resolver: Any, method: str, loop: Any) -> None:
        method_bytes = method.encode()
        # Requests only while the server runs, as grpc's own loop: once its stop has begun, grpc
        # fails every outstanding request, and a request made after the stop would never end.
        while aio_server.is_running():
            try:
                rpc_state = await aio_server._request_registered_call(method_bytes)
            except Exception as exc:  # the stop failed this request; otherwise grpc's own accept goes on
                if aio_server.is_running():
                    logger.warning("accepting %s stopped: %s: %s", method, type(exc).__name__, exc)
                return
            self.accepted += 1
            hooks: list[Callable[[], None]] = []
            _CALL_END.set(hooks)  # copied into the call's task (and its handler's) by create_task
            # concurrency_exceeded=False: genserve sets no grpc maximum_concurrent_rpcs (admission.py
            # limits each class of RPC once its request has arrived).
            rpc = cygrpc._handle_rpc(method, resolver, self._interceptors, rpc_state, loop, False)
            call = loop.create_task(cygrpc._schedule_rpc_coro(rpc, rpc_state, loop, method))
            # The loop holds tasks weakly: keep each call's until it ends, as grpc's own accept does.
            self._calls.add(call)
            call.add_done_callback(functools.partial(self._ended, hooks))
            del rpc_state, rpc, call, hooks  # not held by this task while it waits for the next call

    def _ended(self, hooks: list[Callable[[], None]], call: asyncio.Task[None]) -> None:
        """The call's task ended: grpc has sent its status (or the call was cancelled)."""
        self._calls.discard(call)
        for hook in hooks:
            try:
                hook()
            except Exception:  # one failing hook must not keep the others from running
                logger.exception("a hook at the end of a call failed")
        hooks.clear()

    async def close(self, timeout_s: float = 5.0) -> None:
        """After `server.stop()`: waits for the accept tasks, whose requests the stop failed. Never
        while the server runs: grpc's core would still hold the requests of cancelled tasks."""
        if self._tasks and self._server._server.is_running():  # type: ignore[attr-defined]
            raise RuntimeError("Acceptor.close() before the server's stop")
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in pending:  # the core server is gone: nothing refers to their requests now
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
