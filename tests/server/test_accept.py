"""accept.Acceptor on a real grpc.aio server over loopback: calls its own tasks accept are served
through grpc's per-call path (interceptors, deadlines, cancellation, graceful stop) like the calls
grpc accepts itself."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_server import accept
from genserve_server.config import Limits, ServerConfig
from genserve_server.limits import GuardedRegistrar
from genserve_server.main import App

SERVICE = "test.Echo"
ECHO = f"/{SERVICE}/Echo"
SLOW = f"/{SERVICE}/Slow"
COLD = f"/{SERVICE}/Cold"

pytestmark = pytest.mark.skipif(
    not accept.supported(),
    reason=f"grpc's private accept path is not usable here ({accept.unsupported_reason()}); "
    "genserve then accepts as grpc does",
)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


class Handlers:
    def __init__(self) -> None:
        self.slow_cancelled = 0
        self.echoing = 0

    async def echo(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        self.echoing += 1
        await asyncio.sleep(0.05)  # keeps calls in flight together
        return request

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.slow_cancelled += 1
            raise
        return request

    def generic(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, self.by_name())

    def by_name(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "Cold": grpc.unary_unary_rpc_method_handler(self.echo),
        }


class RefuseAll(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
            raise AssertionError("abort returns only by raising")

        return grpc.unary_unary_rpc_method_handler(refuse)


class Served:
    def __init__(self, server: grpc.aio.Server, acceptor: accept.Acceptor, port: int) -> None:
        self.server = server
        self.acceptor = acceptor
        self.target = f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serve(
    handlers: Handlers,
    depth: int,
    *,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
    hot: tuple[str, ...] = (ECHO, SLOW),
) -> AsyncIterator[Served]:
    server = grpc.aio.server(interceptors=interceptors)
    registrar = GuardedRegistrar(server, lambda method, handler: handler, hot=lambda m, h: m in hot)
    registrar.add_generic_rpc_handlers([handlers.generic()])
    registrar.add_registered_method_handlers(SERVICE, handlers.by_name())
    port = server.add_insecure_port("127.0.0.1:0")
    acceptor = accept.Acceptor(server, registrar.registered, interceptors, depth)
    await server.start()
    acceptor.start()
    try:
        yield Served(server, acceptor, port)
    finally:
        await server.stop(None)
        await acceptor.close()


async def many(target: str, method: str, n: int, timeout: float = 10) -> list[Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        return await asyncio.gather(
            *(call(b"%d" % i, timeout=timeout) for i in range(n)), return_exceptions=True
        )


def test_the_hot_methods_are_registered_and_the_rest_stay_generic() -> None:
    async def main() -> None:
        server = grpc.aio.server()
        registrar = GuardedRegistrar(server, lambda method, handler: handler, hot=lambda m, h: m == ECHO)
        registrar.add_registered_method_handlers(SERVICE, Handlers().by_name())
        assert list(registrar.registered) == [ECHO]
        quiet = GuardedRegistrar(server, lambda method, handler: handler)
        quiet.add_registered_method_handlers(SERVICE, Handlers().by_name())
        assert quiet.registered == {}

    run(main())


def test_concurrent_calls_are_accepted_by_the_extra_tasks_and_all_answered() -> None:
    async def main() -> None:
        handlers = Handlers()
        async with serve(handlers, depth=8) as served:
            assert served.acceptor.running == 7 * 2  # depth - 1 per hot method
            answers = await many(served.target, ECHO, 64)
            assert answers == [b"%d" % i for i in range(64)]
            assert served.acceptor.accepted > 0  # not all of them went through grpc's own accept
            # A method left generic is still served, by grpc's own accept.
            cold = await many(served.target, COLD, 4)
            assert cold == [b"%d" % i for i in range(4)]
        assert served.acceptor.running == 0  # the stop ended every accept task

    run(main())


def test_depth_one_is_grpcs_own_accept() -> None:
    async def main() -> None:
        async with serve(Handlers(), depth=1) as served:
            assert served.acceptor.running == 0
            assert await many(served.target, ECHO, 16) == [b"%d" % i for i in range(16)]
            assert served.acceptor.accepted == 0

        with pytest.raises(ValueError, match="accept_depth"):
            accept.Acceptor(grpc.aio.server(), {}, (), 0)

    run(main())


def test_the_servers_interceptors_apply_to_calls_the_extra_tasks_accept() -> None:
    async def main() -> None:
        async with serve(Handlers(), depth=8, interceptors=(RefuseAll(),)) as served:
            answers = await many(served.target, ECHO, 32)
            assert served.acceptor.accepted > 0
            codes = {a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError)}
            assert codes == {grpc.StatusCode.UNAUTHENTICATED}
            assert not any(isinstance(a, bytes) for a in answers)

    run(main())


def test_deadlines_and_cancellation_reach_the_handlers_of_extra_accepted_calls() -> None:
    async def main() -> None:
        handlers = Handlers()
        async with serve(handlers, depth=4, hot=(SLOW,)) as served:
            # Four calls at once: grpc's own accept takes one at most, the extra tasks the rest.
            answers = await many(served.target, SLOW, 4, timeout=0.3)
            assert {a.code() for a in answers} == {grpc.StatusCode.DEADLINE_EXCEEDED}
            assert served.acceptor.accepted >= 3
            for _ in range(100):  # every handler, whoever accepted its call, is cancelled
                if handlers.slow_cancelled == 4:
                    break
                await asyncio.sleep(0.05)
            assert handlers.slow_cancelled == 4

    run(main())


def test_a_graceful_stop_finishes_calls_in_flight_then_ends_the_accept_tasks() -> None:
    async def main() -> None:
        handlers = Handlers()
        async with serve(handlers, depth=8) as served:
            async with grpc.aio.insecure_channel(served.target) as channel:
                await channel.channel_ready()
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
                calls = [asyncio.ensure_future(call(b"%d" % i, timeout=10)) for i in range(16)]
                for _ in range(200):  # until every handler is running
                    if handlers.echoing == 16:
                        break
                    await asyncio.sleep(0.001)
                assert handlers.echoing == 16
                await served.server.stop(5)
                answers = await asyncio.gather(*calls, return_exceptions=True)
            await served.acceptor.close()
            assert answers == [b"%d" % i for i in range(16)]
            assert served.acceptor.accepted > 0
            assert served.acceptor.running == 0

    run(main())


def test_the_server_accepts_each_unary_generation_method_several_calls_at_a_time(tiny_repo: Path) -> None:
    async def main() -> None:
        app = App(tiny_repo, ServerConfig(), port=0, metrics_port=None)
        assert app.acceptor.depth == Limits().accept_depth > 1
        unary = ("Sample", "Interpolate", "Encode", "Decode", "SuperResolve", "Translate", "SampleCodes")
        expected = {f"/genserve.v1.GenerationService/{m}" for m in (*unary, "MixStyles")}
        expected.add("/inference.GRPCInferenceService/ModelInfer")
        # Control calls, health, reflection and the bulk streams keep grpc's own accept.
        assert set(app.acceptor.methods) == expected
        app.codec_pool.shutdown()
        one = App(tiny_repo, ServerConfig(limits=Limits(accept_depth=1)), port=0, metrics_port=None)
        assert one.acceptor.methods == []
        one.codec_pool.shutdown()

    run(main())


def test_where_grpcs_private_path_differs_nothing_is_registered_and_grpc_accepts(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accept, "unsupported_reason", lambda: "grpcio 9.9: changed")

    async def main() -> None:
        app = App(tiny_repo, ServerConfig(), port=0, metrics_port=None)
        assert app.acceptor.methods == []
        app.codec_pool.shutdown()

    run(main())


def test_close_refuses_while_the_server_runs() -> None:
    async def main() -> None:
        async with serve(Handlers(), depth=4) as served:
            with pytest.raises(RuntimeError, match="before the server's stop"):
                await served.acceptor.close()
            assert served.acceptor.running == 6
            assert await many(served.target, ECHO, 8) == [b"%d" % i for i in range(8)]

    run(main())


def _rpc_states() -> int:
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "RPCState")


@pytest.mark.parametrize("depth", [1, 32])
def test_a_generation_call_releases_its_response_bytes_at_its_end_and_leaves_no_cycle(
    tiny_repo: Path, tmp_path: Path, depth: int
) -> None:
    """The response budget holds a unary response's bytes until grpc has sent it. A call an accept
    task took releases them through at_call_end; grpc's done callback, which grpc accepted calls
    still use, leaves its call state in a cycle (partial(callback, context) inside the state the
    context refers to) that only a full garbage collection frees."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-gen").symlink_to(tiny_repo / "tiny-gen")

    async def main() -> None:
        app = App(models, ServerConfig(limits=Limits(accept_depth=depth)), port=0, metrics_port=None)
        await app.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = genserve_pb2_grpc.GenerationServiceStub(channel)

                async def sample(seed: int) -> genserve_pb2.SampleResponse:
                    request = genserve_pb2.SampleRequest(model="tiny-gen", count=1, base_seed=seed)
                    response: genserve_pb2.SampleResponse = await stub.Sample(request, timeout=10)
                    return response

                await asyncio.gather(*(sample(seed) for seed in range(8)))
                gc.collect()
                gc.disable()  # what is left below is what only the collector would free
                try:
                    states, accepted = _rpc_states(), app.acceptor.accepted
                    answers = await asyncio.gather(*(sample(seed) for seed in range(48)))
                    for _ in range(200):  # until every call's task has ended on the server
                        if not app.acceptor.in_flight and not app.core.responses.held:
                            break
                        await asyncio.sleep(0.01)
                    left = _rpc_states() - states
                    by_accept_tasks = app.acceptor.accepted - accepted
                finally:
                    gc.enable()
            assert [len(a.images) for a in answers] == [1] * 48
            assert app.core.responses.held == 0
            if depth > 1:
                assert by_accept_tasks > 0
                assert left <= 48 - by_accept_tasks  # only the calls grpc accepted itself
            else:
                assert by_accept_tasks == 0
        finally:
            await app.stop()

    run(main())
