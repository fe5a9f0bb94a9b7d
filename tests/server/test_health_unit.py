"""health.py's grpc.health.v1 servicer, without a server: List answers what Check answers."""

from __future__ import annotations

import asyncio
import inspect
import types
from typing import Any

import grpc_health.v1 as grpc_health_v1
import pytest
from grpc_health.v1 import health_pb2

import genserve_server.health as genserve_health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health_module_on_a_renamed_base(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """genserve's health.py as it loads on a grpcio-health-checking release that keeps its statuses
    under another private name than today's `_server_status` (nothing promises that name)."""
    source = inspect.getsource(grpc_health_v1.health.aio).replace("_server_status", "_statuses_v2")
    renamed_aio = types.ModuleType("renamed_health_aio")
    exec(compile(source, "renamed_health_aio", "exec"), renamed_aio.__dict__)
    renamed_health = types.ModuleType("renamed_health")
    renamed_health.__dict__.update(vars(grpc_health_v1.health))
    renamed_health.aio = renamed_aio  # type: ignore[attr-defined]
    monkeypatch.setattr(grpc_health_v1, "health", renamed_health)
    module = types.ModuleType("genserve_health_on_a_renamed_base")
    path = genserve_health.__file__
    exec(compile(inspect.getsource(genserve_health), path, "exec"), module.__dict__)
    return module


@pytest.fixture(params=["installed", "renamed"])
def health_module(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    if request.param == "installed":
        return genserve_health
    module = _health_module_on_a_renamed_base(monkeypatch)
    assert not hasattr(module.ListingHealthServicer(), "_server_status")  # the rename took
    return module


def _listed(servicer: Any) -> dict[str, int]:
    response = asyncio.run(servicer.List(health_pb2.HealthListRequest(), _WatchContext()))
    return {name: answer.status for name, answer in response.statuses.items()}


def _checked(servicer: Any, names: list[str]) -> dict[str, int]:
    async def check_all() -> dict[str, int]:
        answers = {}
        for name in names:
            response = await servicer.Check(health_pb2.HealthCheckRequest(service=name), _WatchContext())
            answers[name] = response.status
        return answers

    return asyncio.run(check_all())


def test_health_list_answers_what_check_does_after_sets_and_graceful_shutdown(health_module: Any) -> None:
    """List is a snapshot of every service Check knows, from state genserve keeps: it answered from
    grpcio-health-checking's private `_server_status`, which a release may rename (the "renamed" case
    failed with AttributeError). After enter_graceful_shutdown every service is NOT_SERVING, and a
    later set() or clear() changes nothing, in List as in Check."""
    state = health_module.HealthState()
    servicer = state.servicer

    async def before_shutdown() -> None:
        await state.set("", True)
        await state.set("genserve.v1.GenerationService", True)
        await state.set("liveness", True)
        await state.set("model-a", True)
        await state.set("model-b", False)
        await state.set("model-a", False)

    asyncio.run(before_shutdown())
    expected = {
        "": SERVING,
        "genserve.v1.GenerationService": SERVING,
        "liveness": SERVING,
        "model-a": NOT_SERVING,
        "model-b": NOT_SERVING,
    }
    assert _listed(servicer) == expected == _checked(servicer, list(expected))

    async def shut_down_then_set() -> None:
        await state.shutdown()
        await state.set("model-b", True)
        await state.set("model-c", True)
        state.clear_soon("model-a")  # a model removed during the drain: its key stays NOT_SERVING
        await state.flush()

    asyncio.run(shut_down_then_set())
    expected = dict.fromkeys(expected, NOT_SERVING)
    assert _listed(servicer) == expected == _checked(servicer, list(expected))


def test_health_list_of_a_new_servicer_is_what_check_answers(health_module: Any) -> None:
    """Before any set(): the one service grpc's servicer starts with, "" SERVING (main.py turns it
    NOT_SERVING before the server starts)."""
    servicer = health_module.ListingHealthServicer()
    assert _listed(servicer) == {"": SERVING} == _checked(servicer, [""])


class _WatchContext:
    """What Check, List and Watch use of a grpc.aio.ServicerContext: the statuses written, the code,
    details and trailing metadata (the request id: docs/metrics.md)."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.code: Any = None
        self.details = ""
        self.trailing: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = metadata

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        self.written.append(response.status)

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


def test_every_open_watch_is_sent_not_serving_at_shutdown_an_unknown_services_too() -> None:
    """docs/server.md: at shutdown "each open health Watch is sent [NOT_SERVING], then ends with
    UNAVAILABLE". A Watch of a name the server does not know (a model not in the repository yet)
    was sent SERVICE_UNKNOWN, then ended with UNAVAILABLE "health watch ended (NOT_SERVING sent)",
    its client never told NOT_SERVING."""
    import grpc

    async def scenario() -> dict[str, _WatchContext]:
        servicer = genserve_health.ListingHealthServicer()
        await servicer.set("gen", SERVING)
        contexts = {name: _WatchContext() for name in ("gen", "not-a-model")}
        watches = [
            asyncio.create_task(servicer.Watch(health_pb2.HealthCheckRequest(service=name), context))
            for name, context in contexts.items()
        ]
        await asyncio.sleep(0.05)
        await servicer.enter_graceful_shutdown()
        await asyncio.wait_for(asyncio.gather(*watches), 5)
        return contexts

    contexts = asyncio.run(scenario())
    assert contexts["gen"].written == [SERVING, NOT_SERVING]
    assert contexts["not-a-model"].written == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN, NOT_SERVING]
    for context in contexts.values():
        assert context.code == grpc.StatusCode.UNAVAILABLE and "NOT_SERVING sent" in context.details


def test_the_whole_server_is_not_serving_without_models_or_with_a_required_one_missing() -> None:
    """overall_status: an empty repository serves nothing, and a required model that is not (or no
    longer) in the repository is named, not looked up (a KeyError in the health update)."""
    assert genserve_health.overall_status({}, None) == (False, "no models in the repository")
    assert genserve_health.overall_status({"a": True}, ["a", "gone"]) == (
        False,
        "required models not in the repository: gone",
    )
    assert genserve_health.overall_status({"a": True, "b": False}, ["a"]) == (True, "")


def test_a_serving_update_after_shutdown_leaves_healthz_not_serving() -> None:
    """/healthz reads HealthState.serving: a load that ends during the drain and marks the server
    SERVING (set_overall_soon) must not turn it back to 200 once shutdown began."""

    async def scenario() -> tuple[bool, str]:
        state = genserve_health.HealthState()
        state.set_overall_soon(True)
        await state.flush()
        await state.shutdown()
        state.set_overall_soon(True)
        await state.flush()
        return state.serving, state.reason

    assert asyncio.run(scenario()) == (False, "shutting down")


class _AbortContext(_WatchContext):
    async def abort(self, code: Any, details: str = "") -> None:
        self.code, self.details = code, details
        raise RuntimeError(details)


def test_list_answers_exactly_max_listed_services_and_refuses_one_more() -> None:
    """grpc.health.v1 List may refuse a listing too large: past MAX_LISTED_SERVICES, not at it."""
    import grpc

    servicer = genserve_health.ListingHealthServicer()  # "" already

    async def add(names: list[str]) -> None:
        for name in names:
            await servicer.set(name, SERVING)

    limit = genserve_health.MAX_LISTED_SERVICES
    asyncio.run(add([f"model-{i}" for i in range(limit - 1)]))
    assert len(_listed(servicer)) == limit
    asyncio.run(add(["one-more"]))
    context = _AbortContext()
    with pytest.raises(RuntimeError):
        asyncio.run(servicer.List(health_pb2.HealthListRequest(), context))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{limit + 1} health services, more than List answers ({limit})" in context.details


def test_a_stop_requested_turns_healthz_not_serving_at_once() -> None:
    """shutdown_soon (a signal handler, a stop during start-up): /healthz reads HealthState.serving
    from another thread, so it is NOT_SERVING from the call on, before the shutdown task has run."""

    async def scenario() -> tuple[tuple[bool, str], tuple[bool, str]]:
        state = genserve_health.HealthState()
        state.set_overall_soon(True)
        await state.flush()
        state.shutdown_soon()
        at_once = (state.serving, state.reason)
        await asyncio.sleep(0.05)
        return at_once, (state.serving, state.reason)

    assert asyncio.run(scenario()) == ((False, "shutting down"), (False, "shutting down"))


def test_a_key_cleared_right_after_a_stop_request_stays_not_serving() -> None:
    """docs/server.md: every name turns NOT_SERVING at the first moment of shutdown, and later
    changes are ignored. A removed model's key cleared (main.py's _drop_old_removed_keys) after the
    stop was requested (shutdown_soon) but before its shutdown task ran must not vanish (Check
    NOT_FOUND, left out of List): it stays NOT_SERVING, as a set() then does."""

    async def scenario() -> tuple[dict[str, int], Any]:
        state = genserve_health.HealthState()
        await state.set("", True)
        await state.set("model-a", True)
        state.shutdown_soon()
        state.clear_soon("model-a")
        state.set_soon("model-b", True)
        await asyncio.sleep(0.05)
        await state.flush()
        listed = await state.servicer.List(health_pb2.HealthListRequest(), _WatchContext())
        context = _AbortContext()
        try:
            answer = await state.servicer.Check(health_pb2.HealthCheckRequest(service="model-a"), context)
        except RuntimeError:  # aborted
            return {k: v.status for k, v in listed.statuses.items()}, context.code
        return {k: v.status for k, v in listed.statuses.items()}, answer.status

    listed, checked = asyncio.run(scenario())
    assert (listed, checked) == ({"": NOT_SERVING, "model-a": NOT_SERVING}, NOT_SERVING)


def test_check_of_an_unknown_service_names_it_and_the_names_there_are() -> None:
    """Every refusal names its field: Check of a name the server does not know (a probe's typo,
    `--service tiny_gen` for `tiny-gen`, or a model dropped from the last removed) answered NOT_FOUND
    with empty details, so grpcurl or a kubelet said `NotFound` and nothing more, where GetModel of
    the same name says `model 'tiny_gen' not found; models: ...`. A name of any length is shown
    within one status message (a grpc-message header)."""
    import grpc

    from genserve_server.errors import MAX_MESSAGE_BYTES

    servicer = genserve_health.ListingHealthServicer()
    asyncio.run(servicer.set("tiny-gen", SERVING))
    details = {}
    for name in ("tiny_gen", "a\nb", "n" * 100_000):
        context = _AbortContext()
        with pytest.raises(RuntimeError):
            asyncio.run(servicer.Check(health_pb2.HealthCheckRequest(service=name), context))
        assert context.code == grpc.StatusCode.NOT_FOUND
        details[name] = context.details
    assert details["tiny_gen"].startswith("health service 'tiny_gen' not found")
    for text in details.values():
        assert "liveness" in text and "List" in text, text  # the names there are, and where to see them
    assert "'a\\nb'" in details["a\nb"] and "\n" not in details["a\nb"]
    long = details["n" * 100_000]
    assert long.startswith("health service 'nnn") and len(long.encode()) <= MAX_MESSAGE_BYTES
