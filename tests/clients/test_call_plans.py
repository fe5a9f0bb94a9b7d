"""The layer both clients share: call plans (calls.py), attempts and stream resumption (attempts.py),
and the one table of RPC methods (binding.py). No server needed."""

from __future__ import annotations

import inspect
import random
import time

import grpc
import pytest

from genserve.v1 import genserve_pb2, types_pb2
from genserve_client import (
    AsyncGenserveClient,
    ChannelConfig,
    GenserveClient,
    GenserveClientError,
    RetryPolicy,
    calls,
)
from genserve_client.attempts import Attempts, StreamResume

RETRY = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)


def rpc_error(code: grpc.StatusCode, details: str = "", server_id: str | None = None) -> grpc.RpcError:
    trailing = grpc.aio.Metadata(("x-request-id", server_id)) if server_id else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    unconnected = cls.__new__(cls)  # binding a method needs no channel
    return {
        name: inspect.signature(getattr(unconnected, name)) for name in dir(cls) if not name.startswith("_")
    }


def test_both_clients_offer_the_same_rpc_methods_with_the_same_signatures() -> None:
    sync, aio = public_methods(GenserveClient), public_methods(AsyncGenserveClient)
    assert sorted(sync) == sorted(aio)
    assert {"sample", "interpolate", "encode", "decode", "super_resolve", "translate"} <= set(sync)
    assert {"list_models", "get_model", "sample_stream"} <= set(sync)
    assert sync == aio
    # The bound method shows the builder's parameters and docs, not the plan it returns.
    assert (
        "timeout_s" in sync["sample"].parameters
        and sync["sample"].return_annotation is inspect.Signature.empty
    )
    assert GenserveClient.sample.__doc__ == calls.sample.__doc__


def test_a_plan_names_its_rpc_and_checks_arguments_before_any_call() -> None:
    plan = calls.sample("gen", 2, base_seed=5, psi=0.7, format="raw", timeout_s=3.0)
    assert (plan.rpc, plan.timeout_s) == ("Sample", 3.0)
    assert (plan.request.count, plan.request.base_seed, plan.request.output.format) == (
        2,
        5,
        types_pb2.IMAGE_FORMAT_RAW_UINT8,
    )
    assert plan.request.truncation_psi == pytest.approx(0.7)
    assert calls.get_model("gen", "2").request == genserve_pb2.GetModelRequest(name="gen", version="2")
    with pytest.raises(ValueError, match="mode"):
        calls.interpolate("gen", 1, 2, 5, mode="cubic")
    with pytest.raises(ValueError, match="start_index"):
        calls.sample_stream("gen", 4, start_index=5)


def test_attempts_retry_transient_errors_and_map_final_ones_to_the_one_error_type() -> None:
    attempts = Attempts(ChannelConfig(token="t"), RETRY, random.Random(0), timeout_s=None)
    assert dict(attempts.metadata) == {"x-request-id": attempts.request_id, "authorization": "Bearer t"}
    assert 0 <= attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE)) <= RETRY.max_backoff_s
    assert attempts.wait_s(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")) >= 0
    with pytest.raises(GenserveClientError) as info:  # the third failure spends max_attempts
        attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE, "down", server_id="srv-9"))
    assert (info.value.code, info.value.details, info.value.request_id) == (
        grpc.StatusCode.UNAVAILABLE,
        "down",
        "srv-9",
    )
    fresh = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=None)
    with pytest.raises(GenserveClientError) as info:
        fresh.wait_s(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "count: must be >= 1"))
    assert info.value.request_id == fresh.request_id  # the server echoed none: the one sent


def test_an_expired_deadline_ends_the_retries() -> None:
    attempts = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=0.0)
    assert attempts.timeout_s() == 0.0
    with pytest.raises(GenserveClientError):
        attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))


def chunk(*indices: int) -> genserve_pb2.SampleStreamChunk:
    return genserve_pb2.SampleStreamChunk(images=[types_pb2.GeneratedImage(index=i) for i in indices])


def test_stream_resumes_after_the_last_index_and_progress_renews_the_retry_budget() -> None:
    attempts = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=None)
    resume = StreamResume(calls.sample_stream("gen", 6, start_index=1, chunk_size=2), attempts)
    first = resume.next_request()
    assert first is not None and (first.start_index, first.sample.count, first.chunk_size) == (1, 6, 2)
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert resume.chunk(chunk(1, 2)).indices == [1, 2]
    again = resume.next_request()
    assert again is not None and again.start_index == 3
    # Two failures before the progress no longer count: two more are still retried.
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    resume.chunk(chunk())  # an empty chunk is no progress
    same = resume.next_request()
    assert same is not None and same.start_index == 3
    resume.chunk(chunk(3, 4, 5))
    assert resume.next_request() is None


def test_a_reconnect_wait_that_runs_out_past_the_deadline_fails_with_the_connections_unavailable() -> None:
    """docs/client.md: a server that stays down fails the call with UNAVAILABLE by its deadline where
    that is shorter than the retries and reconnect wait: the wait for the channel that ran out with
    the deadline passed raises the connection's UNAVAILABLE, not a last attempt with no time left
    (DEADLINE_EXCEEDED, naming no server)."""
    attempts = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=0.05)
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    attempts.reconnect_waited(0.01, ran_out=False)  # a connection came back: the attempt goes on
    time.sleep(0.06)
    with pytest.raises(GenserveClientError) as info:
        attempts.reconnect_waited(0.01, ran_out=True)
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses",
    )
    with_time = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=None)
    with_time.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    with_time.reconnect_waited(3.0, ran_out=True)  # no deadline: the next attempt is made


def test_a_reopened_stream_asks_for_the_version_its_first_images_came_from() -> None:
    """docs/client.md: a sample_stream started without `version` and reopened after a transient
    error asks for the version its first images came from, not the server's default at the time it
    reopens (after a reload, another version whose images the same iteration would mix in)."""
    attempts = Attempts(ChannelConfig(), RETRY, random.Random(0), timeout_s=None)
    resume = StreamResume(calls.sample_stream("gen", 6), attempts)
    first = resume.next_request()
    assert first is not None and first.sample.version == ""  # the server's default
    served = chunk(0, 1)
    served.provenance.version = "2"
    resume.chunk(served)
    again = resume.next_request()
    assert again is not None and (again.start_index, again.sample.version) == (2, "2")
    later = chunk(2)
    later.provenance.version = "3"  # not what the stream asked for: the pin stays
    resume.chunk(later)
    last = resume.next_request()
    assert last is not None and (last.start_index, last.sample.version) == (3, "2")


def test_progress_gives_a_stream_back_its_whole_reconnect_wait() -> None:
    """docs/client.md: a retry after UNAVAILABLE waits for its channel to connect again at most
    RetryPolicy.reconnect_wait_s in all per call, and a stream's progress gives it back: a long
    stream whose server restarts twice waits the whole 3 s again the second time, not what the
    first restart left of it."""
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002, reconnect_wait_s=3.0)
    attempts = Attempts(ChannelConfig(), policy, random.Random(0), timeout_s=None)
    resume = StreamResume(calls.sample_stream("gen", 6), attempts)
    assert attempts.reconnect_wait_s() == 0.0  # no failure yet
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert attempts.reconnect_wait_s() == 3.0
    attempts.reconnect_waited(2.5, ran_out=False)
    assert attempts.reconnect_wait_s() == pytest.approx(0.5)  # what is left for the call
    resume.chunk(chunk(0, 1))  # progress
    attempts.wait_s(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert attempts.reconnect_wait_s() == 3.0
    attempts.wait_s(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"))
    assert attempts.reconnect_wait_s() == 0.0  # a refusal from a connected server waits for none


def test_every_result_type_the_methods_return_is_importable_from_the_package() -> None:
    """docs/client.md: `sample_codes` returns a CodesResult and `sample_codes_progress` yields
    CodesProgress items, then the CodesResult, told apart with isinstance; `from genserve_client
    import CodesResult` raised AttributeError (the package exported the other result types only)."""
    import genserve_client
    from genserve_client import results

    public = {
        name
        for name, value in vars(results).items()
        if inspect.isclass(value) and value.__module__ == results.__name__ and not name.startswith("_")
    }
    assert {"CodesProgress", "CodesResult"} <= public
    for name in sorted(public):
        assert name in genserve_client.__all__, name
        assert getattr(genserve_client, name) is getattr(results, name)
