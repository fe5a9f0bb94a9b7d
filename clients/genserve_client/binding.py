"""What the sync and asyncio clients share: their settings and their table of RPC methods.

Each public method is a descriptor made from a plan builder of calls.py: its bound form has the
builder's signature and hands the plan to the client's transport (`_unary` / `_stream`), which
returns the result (GenserveClient) or an awaitable of it (AsyncGenserveClient). Each RPC's
arguments, checks and docs are written once, and so is the list of RPCs.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Self, TypeVar, overload

from genserve_client import calls
from genserve_client.attempts import Attempts
from genserve_client.channel import ChannelConfig
from genserve_client.results import CodesProgress, CodesResult, SampleResult
from genserve_client.retry import RetryPolicy

if TYPE_CHECKING:  # the two transports, for the bound methods' types only
    from genserve_client.aio import AsyncGenserveClient
    from genserve_client.client import GenserveClient, SampleStream

DEFAULT_TIMEOUT_S = 60.0

P = ParamSpec("P")
Out = TypeVar("Out")


class _Bound(Generic[P]):
    """Shared by the descriptors: the builder, and what help() and inspect show for the method
    (the builder's parameters and docs; what it returns is the client's business)."""

    def __init__(self, build: Callable[P, Any]) -> None:
        self._build = build
        self.__doc__ = build.__doc__
        self._signature = inspect.signature(build).replace(return_annotation=inspect.Signature.empty)

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def _method(self, client: object, perform: Callable[..., Any]) -> Callable[..., Any]:
        build = self._build

        def method(*args: Any, **kwargs: Any) -> Any:
            return perform(functools.partial(build, *args, **kwargs))

        method.__name__, method.__module__ = self._name, type(client).__module__
        method.__qualname__ = f"{type(client).__qualname__}.{self._name}"
        method.__doc__ = self.__doc__
        method.__signature__ = self._signature  # type: ignore[attr-defined]
        return method


class unary(_Bound[P], Generic[P, Out]):
    """A unary RPC method: the client's `_unary` performs the plan, retries included."""

    def __init__(self, build: Callable[P, calls.UnaryCall[Out]]) -> None:
        super().__init__(build)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, client: GenserveClient, owner: type | None = None) -> Callable[P, Out]: ...
    @overload
    def __get__(
        self, client: AsyncGenserveClient, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, Out]]: ...
    def __get__(self, client: ClientBase | None, owner: type | None = None) -> Any:
        if client is None:
            return self
        return self._method(client, lambda plan: client._unary(plan()))


class stream(_Bound[P]):
    """The SampleStream method: the client's `_stream` gets the plan unbuilt, so that an async
    generator checks its arguments when first iterated (as async generators do)."""

    def __init__(self, build: Callable[P, calls.StreamCall]) -> None:
        super().__init__(build)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, client: GenserveClient, owner: type | None = None) -> Callable[P, SampleStream]: ...
    @overload
    def __get__(
        self, client: AsyncGenserveClient, owner: type | None = None
    ) -> Callable[P, AsyncGenerator[SampleResult, None]]: ...
    def __get__(self, client: ClientBase | None, owner: type | None = None) -> Any:
        if client is None:
            return self
        return self._method(client, client._stream)


class progress(_Bound[P]):
    """The SampleCodesStream method: an iterator (GenserveClient) or async iterator
    (AsyncGenserveClient) of progress chunks, the answer last; built as SampleStream's: at the call
    (GenserveClient) or when first iterated (AsyncGenserveClient)."""

    def __init__(self, build: Callable[P, calls.ProgressCall]) -> None:
        super().__init__(build)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(
        self, client: GenserveClient, owner: type | None = None
    ) -> Callable[P, Iterator[CodesProgress | CodesResult]]: ...
    @overload
    def __get__(
        self, client: AsyncGenserveClient, owner: type | None = None
    ) -> Callable[P, AsyncGenerator[CodesProgress | CodesResult, None]]: ...
    def __get__(self, client: ClientBase | None, owner: type | None = None) -> Any:
        if client is None:
            return self
        return self._method(client, client._progress)


class ClientBase:
    """Settings and methods common to both clients. `timeout_s` (per call, default the client's)
    is the whole call's deadline, retries included; failures raise GenserveClientError once
    `retry` gives up."""

    def __init__(
        self,
        target: str | ChannelConfig = "127.0.0.1:50051",
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        calls.check_timeout(timeout_s)
        self.config = target if isinstance(target, ChannelConfig) else ChannelConfig(target)
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        self._pid = os.getpid()  # the process the channel belongs to
        self._connect()

    def _check_process(self) -> None:
        """A RuntimeError naming the fix when a call runs in a child forked after the client was
        made (a multiprocessing pool's worker): gRPC channels do not survive fork(), and a call on
        the parent's one worked, hung past its deadline or crashed the child, as the parent's
        threads happened to be in calls at the fork."""
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"{type(self).__name__}: this call runs in process {os.getpid()}, forked after the "
                f"client was created in process {self._pid}; a gRPC channel does not survive fork(): "
                "use multiprocessing's 'spawn' or 'forkserver' start method and create the client in "
                "the process that uses it (a pool's initializer)"
            )

    # --- the transport: each client its own -------------------------------------------------

    def _connect(self) -> None:
        """Open the channel and its stub."""
        raise NotImplementedError

    def _unary(self, call: calls.UnaryCall[Any]) -> object:
        """Perform a unary call: its result, or (asyncio) an awaitable of it."""
        raise NotImplementedError

    def _stream(self, plan: Callable[[], calls.StreamCall]) -> object:
        """Open a SampleStream job: an iterable (or async iterable) of its chunks."""
        raise NotImplementedError

    def _progress(self, plan: Callable[[], calls.ProgressCall]) -> object:
        """Open a SampleCodesStream: an iterable (or async iterable) of its chunks."""
        raise NotImplementedError

    def _attempts(self, timeout_s: float | None) -> Attempts:
        """A unary call's attempts; `timeout_s` None: the client's default."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return Attempts(self.config, self.retry, self._rng, timeout)

    def _stream_attempts(self) -> Attempts:
        """A stream's attempts: each is bounded by the call's own timeout, the retries by nothing."""
        return Attempts(self.config, self.retry, self._rng, None)

    # --- the RPCs (calls.py says what each sends and returns) ---------------------------------

    sample = unary(calls.sample)
    sample_codes = unary(calls.sample_codes)
    sample_codes_progress = progress(calls.sample_codes_progress)
    interpolate = unary(calls.interpolate)
    mix_styles = unary(calls.mix_styles)
    encode = unary(calls.encode)
    decode = unary(calls.decode)
    super_resolve = unary(calls.super_resolve)
    translate = unary(calls.translate)
    list_models = unary(calls.list_models)
    get_model = unary(calls.get_model)
    sample_stream = stream(calls.sample_stream)
