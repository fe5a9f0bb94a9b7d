"""The client library against an in-process fake servicer: retries, errors, metadata, streams."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from client_fakes import FAKE_LATENT, FakeServer, fake_latent, fake_pixels
from server_support import wait_until

from genserve.v1 import genserve_pb2, types_pb2
from genserve_client import (
    AsyncGenserveClient,
    ChannelConfig,
    GenserveClient,
    GenserveClientError,
    RetryPolicy,
    calls,
)
from genserve_client.results import CodesResult

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01)


def test_unavailable_twice_then_success_is_retried(fake_server: FakeServer) -> None:
    fake_server.service.fail["Sample"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        result = client.sample("fake-gen", 2, base_seed=7)
    assert fake_server.service.calls["Sample"] == 3
    assert result.seeds == [7, 8]
    # All attempts of one call carry the same request id; the server's echo is what we report.
    ids = {md["x-request-id"] for md in fake_server.service.metadata}
    assert len(ids) == 1 and result.request_id == "srv-" + ids.pop()


def test_invalid_argument_is_never_retried_and_keeps_the_servers_message(fake_server: FakeServer) -> None:
    fake_server.service.fail["Sample"] = [grpc.StatusCode.INVALID_ARGUMENT]
    with (
        GenserveClient(fake_server.target, retry=FAST_RETRY) as client,
        pytest.raises(GenserveClientError) as info,
    ):
        client.sample("fake-gen", 1)
    assert fake_server.service.calls["Sample"] == 1
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == "injected INVALID_ARGUMENT for Sample"
    assert info.value.request_id and info.value.request_id.startswith("srv-")


def test_retries_stop_after_max_attempts(fake_server: FakeServer) -> None:
    fake_server.service.fail["GetModel"] = [grpc.StatusCode.UNAVAILABLE] * 10
    with (
        GenserveClient(fake_server.target, retry=FAST_RETRY) as client,
        pytest.raises(GenserveClientError) as info,
    ):
        client.get_model("fake-gen")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake_server.service.calls["GetModel"] == FAST_RETRY.max_attempts


def test_the_fake_answers_a_get_model_naming_a_version_as_the_server_does(fake_server: FakeServer) -> None:
    # The fake answered every GetModel with all its versions, and a version it does not have
    # without NOT_FOUND: tests of a client naming a version injected what the server would say.
    fake_server.service.version = "2"
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        assert [v.version for v in client.get_model("fake-gen", "2").versions] == ["2"]
        with pytest.raises(GenserveClientError) as info:
            client.get_model("fake-gen", "1")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.details == "model fake-gen has no version '1'; versions: 2"
    assert fake_server.service.model_versions == ["2", "1"]


def test_the_fake_answers_get_model_not_found_for_a_model_it_does_not_serve(fake_server: FakeServer) -> None:
    # The fake answered GetModel for any name: a client test could pass against a model the server
    # refuses (NOT_FOUND, naming the models it serves).
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(GenserveClientError) as info:
            client.get_model("no-such-model")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        served = "bad, fake-cond, fake-gen, fake-i2i, fake-prior"
        assert info.value.details == f"model 'no-such-model' not found; models: {served}"
        assert client.get_model("fake-i2i").kind == "image_to_image"
        assert [m.name for m in client.list_models()] == fake_server.service.models


@pytest.mark.parametrize("rpc", ["sample", "sample_stream", "sample_codes_progress", "translate"])
def test_the_fake_refuses_a_call_naming_a_model_the_server_would_refuse(
    fake_server: FakeServer, rpc: str
) -> None:
    """GetModel was strict but Sample, SampleStream, SampleCodesStream and Translate served any model
    name, of any kind: a client test could pass calling a model the server refuses. Each answers as
    the server's resolve does: NOT_FOUND naming the models served, INVALID_ARGUMENT for a model of a
    kind the RPC does not take."""
    image = np.zeros((4, 4, 1), dtype=np.uint8)
    call = {
        "sample": lambda c, m: c.sample(m, 1),
        "sample_stream": lambda c, m: list(c.sample_stream(m, 1)),
        "sample_codes_progress": lambda c, m: list(c.sample_codes_progress(m, 1)),
        "translate": lambda c, m: c.translate(m, [image]),
    }[rpc]
    served = ", ".join(sorted(fake_server.service.models))
    other_kind = "fake-gen" if rpc in ("sample_codes_progress", "translate") else "fake-i2i"
    field = "sample.model" if rpc == "sample_stream" else "model"
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(GenserveClientError) as info:
            call(client, "no-such-model")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert info.value.details == f"model 'no-such-model' not found; models: {served}"
        with pytest.raises(GenserveClientError) as info:
            call(client, other_kind)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details.startswith(f"{field}: {other_kind} is a "), info.value.details


@pytest.mark.parametrize("rpc", ["sample", "sample_stream", "sample_codes_progress", "translate"])
def test_the_fake_answers_a_call_naming_a_version_as_the_server_does(
    fake_server: FakeServer, monkeypatch: pytest.MonkeyPatch, rpc: str
) -> None:
    """Sample, SampleStream, SampleCodesStream and Translate served any version asked for, and their
    provenance named the fake's `version` whatever they were asked: a client test pinning a version
    could pass against a server that no longer serves it. Each answers as the server's resolve does
    (of the versions GetModel lists): NOT_FOUND naming the versions served for one it does not have,
    UNAVAILABLE for one not READY or, naming none, for a model with no READY version; and names the
    version it served (the one asked for, else the highest READY one) in its provenance."""
    image = np.zeros((4, 4, 1), dtype=np.uint8)
    model = {"sample_codes_progress": "fake-prior", "translate": "fake-i2i"}.get(rpc, "fake-gen")
    call: Callable[[GenserveClient, str], Any] = {
        "sample": lambda c, v: c.sample(model, 1, version=v),
        "sample_stream": lambda c, v: list(c.sample_stream(model, 1, version=v))[-1],
        "sample_codes_progress": lambda c, v: list(c.sample_codes_progress(model, 1, version=v))[-1],
        "translate": lambda c, v: c.translate(model, [image], version=v),
    }[rpc]
    service = fake_server.service
    service.version = "2"
    info, states = service._info, {"2": genserve_pb2.MODEL_STATE_READY}

    def versions(name: str) -> genserve_pb2.ModelInfo:
        answer = info(name)
        del answer.versions[:]
        for version, state in states.items():
            answer.versions.add(version=version, state=state, model_sha256=service.model_sha256)
        return answer

    monkeypatch.setattr(service, "_info", versions)
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        with pytest.raises(GenserveClientError) as refused:
            call(client, "1")
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        assert refused.value.details == f"model {model} has no version '1'; versions: 2"
        assert [call(client, v).provenance.version for v in ("2", "")] == ["2", "2"]
        states.update({"1": genserve_pb2.MODEL_STATE_READY, "10": genserve_pb2.MODEL_STATE_READY})
        assert [call(client, v).provenance.version for v in ("1", "2", "")] == ["1", "2", "10"]
        states.update({"10": genserve_pb2.MODEL_STATE_LOADING, "2": genserve_pb2.MODEL_STATE_DRAINING})
        assert call(client, "").provenance.version == "1"
        with pytest.raises(GenserveClientError) as refused:
            call(client, "10")
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert refused.value.details == f"model {model} version 10 is LOADING: not ready"
        states.pop("1")
        with pytest.raises(GenserveClientError) as refused:
            call(client, "")
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        reasons = "v2: DRAINING; v10: LOADING"
        assert refused.value.details == f"model {model} has no ready version ({reasons})"


def test_retry_policy_refuses_invalid_argument_and_bounds_backoff() -> None:
    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        RetryPolicy(retryable_codes=frozenset({grpc.StatusCode.INVALID_ARGUMENT}))
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(0)
    for attempt, cap in [(1, 0.1), (2, 0.2), (4, 0.8), (5, 1.0), (9, 1.0)]:
        waits = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= cap
        assert max(waits) > 0.7 * cap  # full jitter spreads over the whole interval
    assert policy.delay_s(grpc.StatusCode.INVALID_ARGUMENT, 1, None) is None
    assert policy.delay_s(grpc.StatusCode.UNAVAILABLE, 10, None) is None  # attempts spent
    assert policy.delay_s(grpc.StatusCode.UNAVAILABLE, 5, remaining_s=0.0) is None  # deadline first


def test_retry_backoffs_are_jittered_over_the_whole_interval_not_the_cap() -> None:
    """Full jitter: clients that failed together (a server restart) retry at spread times; waiting
    the cap itself would send every client's retry at the same moment."""
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(0)
    for attempt, cap in [(1, 0.1), (3, 0.4), (6, 1.0)]:
        waits = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert min(waits) < 0.1 * cap and max(waits) > 0.9 * cap
        assert len(set(waits)) == len(waits)
        delays = [policy.delay_s(grpc.StatusCode.UNAVAILABLE, attempt, None, rng) for _ in range(200)]
        assert len({d for d in delays if d is not None}) == 200


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1, got 0"),
        ({"initial_backoff_s": -0.1}, "0 <= initial_backoff_s <= max_backoff_s, got -0.1 and 5.0"),
        (
            {"initial_backoff_s": 2.0, "max_backoff_s": 1.0},
            "initial_backoff_s <= max_backoff_s, got 2.0 and 1.0",
        ),
        ({"reconnect_wait_s": -1.0}, "reconnect_wait_s must be >= 0, got -1.0"),
        ({"reconnect_wait_s": float("nan")}, "reconnect_wait_s must be >= 0, got nan"),
        ({"multiplier": 0.5}, "multiplier must be >= 1, got 0.5"),
    ],
)
def test_a_retry_policy_setting_out_of_range_is_refused_naming_it(
    settings: dict[str, float], named: str
) -> None:
    """RetryPolicy(max_attempts=0) would make no attempt at all, a multiplier below 1 shrink the
    backoff as failures grow: refused when made, naming the setting; each edge value is taken."""
    with pytest.raises(ValueError, match=re.escape(named)):
        RetryPolicy(**settings)  # type: ignore[arg-type]
    edge = RetryPolicy(
        max_attempts=1, initial_backoff_s=0.0, max_backoff_s=0.0, multiplier=1.0, reconnect_wait_s=0.0
    )
    assert edge.delay_s(grpc.StatusCode.UNAVAILABLE, 1, None) is None  # its one attempt made


@pytest.mark.parametrize("multiplier", [2.0, 10.0])
def test_a_retry_policy_of_many_attempts_keeps_its_capped_backoff_however_many_failed(
    multiplier: float,
) -> None:
    """A policy allowing many attempts (a stream meant to outlive a long outage) computed its cap as
    initial * multiplier ** (attempt - 1), a float that overflows past about 1024 doublings: the
    1025th failed attempt raised OverflowError out of the call instead of waiting max_backoff_s."""
    policy = RetryPolicy(
        max_attempts=100_000, initial_backoff_s=0.1, max_backoff_s=5.0, multiplier=multiplier
    )
    rng = random.Random(0)
    for attempt in (309, 1025, 1100, 99_999):
        delay = policy.delay_s(grpc.StatusCode.UNAVAILABLE, attempt, None, rng)
        assert delay is not None and 0 <= delay <= 5.0
    assert policy.delay_s(grpc.StatusCode.UNAVAILABLE, 100_000, None, rng) is None  # attempts spent
    no_wait = RetryPolicy(max_attempts=100_000, initial_backoff_s=0.0, max_backoff_s=0.0)
    assert no_wait.delay_s(grpc.StatusCode.UNAVAILABLE, 2000, None, rng) == 0.0


def test_token_and_request_id_travel_as_metadata(fake_server: FakeServer) -> None:
    with GenserveClient(ChannelConfig(fake_server.target, token="s3cret")) as client:
        client.list_models()
    md = fake_server.service.metadata[-1]
    assert md["authorization"] == "Bearer s3cret"
    assert len(md["x-request-id"]) == 32


def test_deadline_exceeded_surfaces_as_the_one_error_type(fake_server: FakeServer) -> None:
    with GenserveClient("127.0.0.1:1", retry=FAST_RETRY, timeout_s=0.3) as client:  # nothing listens there
        with pytest.raises(GenserveClientError) as info:
            client.list_models()
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_calls_own_timeout_wins_over_the_clients_default(fake_server: FakeServer) -> None:
    """`timeout_s` given to a call is that call's deadline, whatever the client's default (here
    none): a call to a server that never answers ends DEADLINE_EXCEEDED by it."""
    fake_server.service.sample_hangs = 1

    async def scenario() -> GenserveClientError:
        async with AsyncGenserveClient(fake_server.target, retry=FAST_RETRY, timeout_s=None) as client:
            with pytest.raises(GenserveClientError) as info:
                await client.sample("fake-gen", 1, timeout_s=0.3)
            return info.value

    error = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake_server.service.calls["Sample"] == 1


def test_results_are_typed_and_zero_copy(fake_server: FakeServer) -> None:
    with GenserveClient(fake_server.target) as client:
        raw = client.sample("fake-cond", seeds=[3, 4], labels=[5], format="raw", return_latents=True)
        png = client.sample("fake-cond", seeds=[3, 4], labels=[5], format="png")
    assert raw.labels == [5, 5] and raw.seeds == [3, 4]
    np.testing.assert_array_equal(raw.images[0], fake_pixels(3, 5))
    assert not raw.images[0].flags.writeable  # a view of the protobuf bytes, not a copy
    assert raw.latents is not None and raw.latents.shape == (2, 4)
    np.testing.assert_array_equal(raw.latents[1], fake_latent(4))
    # PNG decodes to the same pixels, in the same HWC layout.
    np.testing.assert_array_equal(png.images[1], raw.images[1])
    assert png.raw[0].startswith(b"\x89PNG") and png.pil()[0].size == (4, 4)
    assert png.latents is None


def test_stream_resumes_after_breaks_without_duplicates_or_gaps(fake_server: FakeServer) -> None:
    fake_server.service.stream_breaks_after_chunks = [2, 0, 1]
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        chunks = list(client.sample_stream("fake-cond", 50, labels=[1, 2, 3], chunk_size=7, start_index=5))
    indices = [i for c in chunks for i in c.indices]
    assert indices == list(range(5, 50))
    assert [item.label for c in chunks for item in c.items] == [[1, 2, 3][i % 3] for i in range(5, 50)]
    assert fake_server.service.calls["SampleStream"] == 4


def test_stream_stops_on_invalid_argument(fake_server: FakeServer) -> None:
    with (
        GenserveClient(fake_server.target, retry=FAST_RETRY) as client,
        pytest.raises(GenserveClientError) as info,
    ):
        list(client.sample_stream("bad", 10))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert fake_server.service.calls["SampleStream"] == 1


def test_async_client_retries_streams_and_errors(fake_server: FakeServer) -> None:
    fake_server.service.fail["Sample"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
    fake_server.service.stream_breaks_after_chunks = [1]

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target, retry=FAST_RETRY) as client:
            result = await client.sample("fake-gen", seeds=[11], format="raw")
            np.testing.assert_array_equal(result.images[0], fake_pixels(11, None))
            indices = [i async for c in client.sample_stream("fake-gen", 20, chunk_size=6) for i in c.indices]
            assert indices == list(range(20))
            fake_server.service.fail["GetModel"] = [grpc.StatusCode.INVALID_ARGUMENT]
            with pytest.raises(GenserveClientError) as info:
                await client.get_model("fake-gen")
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.request_id and info.value.request_id.startswith("srv-")

    asyncio.run(scenario())
    assert fake_server.service.calls["Sample"] == 3
    assert fake_server.service.calls["GetModel"] == 1


ROW_BUDGET_FULL = (
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    "fake-prior: row budget full (8 of 8 rows taken: 8 running); retry with backoff",
)


def test_sample_codes_progress_is_retried_until_its_first_message_never_after(
    fake_server: FakeServer,
) -> None:
    """Like sample_stream: a refusal before any message (a full row budget at admission: nothing
    began) is retried; a failure after progress was delivered raises, never samples again."""
    service = fake_server.service
    service.fail["SampleCodesStream"] = [ROW_BUDGET_FULL, grpc.StatusCode.UNAVAILABLE]
    with GenserveClient(fake_server.target, retry=FAST_RETRY) as client:
        *progress, last = client.sample_codes_progress("fake-prior", seeds=[3, 4])
        assert [p.filled for p in progress] == [8]
        assert isinstance(last, CodesResult) and last.seeds == [3, 4]
        assert service.calls["SampleCodesStream"] == 3
        service.codes_stream_breaks = [True]
        items = []
        with pytest.raises(GenserveClientError) as info:
            items.extend(client.sample_codes_progress("fake-prior", seeds=[3, 4]))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(items) == 1 and service.calls["SampleCodesStream"] == 4  # not re-run
    ids = {md["x-request-id"] for md in service.metadata[:3]}
    assert len(ids) == 1  # the attempts of one call carry one request id


def test_async_sample_codes_progress_is_retried_until_its_first_message_never_after(
    fake_server: FakeServer,
) -> None:
    service = fake_server.service
    service.fail["SampleCodesStream"] = [ROW_BUDGET_FULL, grpc.StatusCode.UNAVAILABLE]

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target, retry=FAST_RETRY) as client:
            items = [item async for item in client.sample_codes_progress("fake-prior", seeds=[5])]
            assert isinstance(items[-1], CodesResult) and items[-1].seeds == [5] and len(items) == 2
            assert service.calls["SampleCodesStream"] == 3
            service.codes_stream_breaks = [True]
            got = []
            with pytest.raises(GenserveClientError) as info:
                async for item in client.sample_codes_progress("fake-prior", seeds=[5]):
                    got.append(item)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert len(got) == 1 and service.calls["SampleCodesStream"] == 4

    asyncio.run(scenario())


class CountingRandom(random.Random):
    """Counts the backoffs drawn: one per retry the policy grants."""

    retries = 0

    def uniform(self, a: float, b: float) -> float:
        self.retries += 1
        return 0.0


TOO_LARGE = "Received message larger than max (300 vs. 200)"


def test_message_larger_than_max_is_final_but_a_full_queue_is_retried() -> None:
    policy = RetryPolicy()
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    for details in (
        TOO_LARGE,
        "Sent message larger than max (9 vs. 4)",
        "grpc: received message larger than max",
    ):
        assert policy.delay_s(exhausted, 1, None, details=details) is None, details
    for details in ("queue full: 1024 images queued", "Concurrent RPC limit exceeded!", ""):
        assert policy.delay_s(exhausted, 1, None, details=details) is not None, details


def test_oversized_messages_are_not_retried(fake_server: FakeServer) -> None:
    # Client side: the response breaks the client's receive limit.
    small = ChannelConfig(fake_server.target, max_message_bytes=200)
    rng = CountingRandom()
    with GenserveClient(small, retry=FAST_RETRY, rng=rng) as client:
        with pytest.raises(GenserveClientError) as info:
            client.sample("fake-gen", 50, format="raw")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details
        assert fake_server.service.calls["Sample"] == 1
        # The same for a stream (what bulk jobs use).
        with pytest.raises(GenserveClientError) as info:
            list(client.sample_stream("fake-gen", 50, chunk_size=50, format="raw"))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fake_server.service.calls["SampleStream"] == 1
    # Server side: a request over the fake server's 4 MiB receive limit, refused before the handler.
    with GenserveClient(fake_server.target, retry=FAST_RETRY, rng=rng) as client:
        with pytest.raises(GenserveClientError) as info:
            client.sample("fake-gen", latents=np.zeros((300_000, FAKE_LATENT), np.float32))
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rng.retries == 0
    # A server's own "larger than max" answer is final too; a full queue is still retried.
    fake_server.service.fail["Sample"] = [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_LARGE),
    ]
    with GenserveClient(fake_server.target, retry=FAST_RETRY, rng=rng) as client:
        with pytest.raises(GenserveClientError, match="larger than max"):
            client.sample("fake-gen", 1)
    assert rng.retries == 1 and fake_server.service.calls["Sample"] == 3


def test_async_client_does_not_retry_oversized_messages(fake_server: FakeServer) -> None:
    rng = CountingRandom()

    async def scenario() -> None:
        small = ChannelConfig(fake_server.target, max_message_bytes=200)
        async with AsyncGenserveClient(small, retry=FAST_RETRY, rng=rng) as client:
            with pytest.raises(GenserveClientError) as info:
                await client.sample("fake-gen", 50, format="raw")
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(GenserveClientError) as info:
                [c async for c in client.sample_stream("fake-gen", 50, chunk_size=50, format="raw")]
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    asyncio.run(scenario())
    assert rng.retries == 0
    assert fake_server.service.calls["Sample"] == 1
    assert fake_server.service.calls["SampleStream"] == 1


def test_breaking_out_of_a_sync_stream_cancels_the_call(fake_server: FakeServer) -> None:
    with GenserveClient(fake_server.target) as client:
        stream = client.sample_stream("fake-gen", 10**9, chunk_size=1)
        for _ in stream:
            break
        # The channel is still open and `stream` still referenced: only a cancel ends the call.
        assert fake_server.service.stream_ended.wait(5), "the server is still generating"


def test_closing_an_async_stream_the_consumer_broke_out_of_cancels_the_call(fake_server: FakeServer) -> None:
    """An async consumer that stops early (break, then aclose() or `async with aclosing(...)`)
    ends the server's stream; the client and its channel stay open, and the stream's RPC object
    is still alive in the test's hands, so only the client's cancel can end the server's call."""

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            stream = client.sample_stream("fake-gen", 10**9, chunk_size=1)
            async for _ in stream:
                break
            frame = stream.ag_frame
            call = frame.f_locals["stream"] if frame is not None else None
            await stream.aclose()
            ended = await asyncio.to_thread(fake_server.service.stream_ended.wait, 5)
            assert ended, "the server is still generating"
            assert call is not None and call.cancelled()
            assert await client.list_models()

    asyncio.run(scenario())


def test_closing_an_async_progress_stream_the_consumer_broke_out_of_cancels_the_call(
    fake_server: FakeServer,
) -> None:
    """As for sample_stream: an async consumer of sample_codes_progress that stops after a progress
    chunk and aclose()s it ends the server's sampling, the RPC object still alive in its hands."""
    fake_server.service.codes_stream_hangs = True

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            progress = client.sample_codes_progress("fake-prior", seeds=[3])
            async for _ in progress:
                break
            frame = progress.ag_frame
            call = frame.f_locals["stream"] if frame is not None else None
            await progress.aclose()
            ended = await asyncio.to_thread(fake_server.service.codes_stream_ended.wait, 5)
            assert ended, "the server is still sampling"
            assert call is not None and call.cancelled()
            assert await client.list_models()

    asyncio.run(scenario())


def test_an_async_streams_timeout_bounds_each_attempt(fake_server: FakeServer) -> None:
    """sample_stream(timeout_s=...) bounds each attempt of the stream in the asyncio client as in
    GenserveClient: a stream that outlasts it ends DEADLINE_EXCEEDED (final, not retried) rather
    than running on unbounded."""

    async def scenario() -> GenserveClientError:
        async with AsyncGenserveClient(fake_server.target, retry=FAST_RETRY) as client:
            with pytest.raises(GenserveClientError) as info:
                async for _ in client.sample_stream("fake-gen", 10**9, chunk_size=1, timeout_s=0.5):
                    pass
            return info.value

    error = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake_server.service.calls["SampleStream"] == 1


def test_empty_stream_ranges_are_refused_client_side_and_a_finished_one_is_empty(
    fake_server: FakeServer,
) -> None:
    with GenserveClient(fake_server.target) as client:
        with pytest.raises(ValueError, match="count"):
            client.sample_stream("fake-gen", 0)
        with pytest.raises(ValueError, match="start_index"):
            client.sample_stream("fake-gen", 3, start_index=5)
        assert list(client.sample_stream("fake-gen", 3, start_index=3)) == []  # nothing left

    async def scenario() -> None:
        async with AsyncGenserveClient(fake_server.target) as client:
            with pytest.raises(ValueError, match="start_index"):
                [c async for c in client.sample_stream("fake-gen", 3, start_index=4)]
            assert [c async for c in client.sample_stream("fake-gen", 3, start_index=3)] == []

    asyncio.run(scenario())
    assert fake_server.service.calls["SampleStream"] == 0


def test_a_grid_only_answer_from_a_server_older_than_its_seeds_field_has_a_seed_per_grid() -> None:
    """SampleCodesResponse.seeds (field 5) is newer than SampleCodes: an older server's answer from a
    prior without a decoder (a top prior) is grids alone, no images to carry the seeds. Sample i's
    seed is then the request's (seeds, or base_seed + i), and unknown (None) where the server
    picked the base, never an empty list beside two grids."""
    grid = np.zeros((4, 4), np.int64)
    tensor = types_pb2.Tensor(shape=grid.shape, dtype=types_pb2.DTYPE_INT64, data=grid.tobytes())
    old = genserve_pb2.SampleCodesResponse(
        codes=[tensor, tensor], provenance=types_pb2.Provenance(model="top")
    )
    wire = old.SerializeToString()  # what a server without field 5 sends
    for kwargs, seeds in (({"base_seed": 5}, [5, 6]), ({"seeds": [9, 3]}, [9, 3]), ({}, [None, None])):
        call = calls.sample_codes("top", 0 if "seeds" in kwargs else 2, labels=[1], **kwargs)
        result = call.parse(genserve_pb2.SampleCodesResponse.FromString(wire), "rid")
        assert len(result.codes) == 2 and result.seeds == seeds, kwargs
        progress = calls.sample_codes_progress("top", 0 if "seeds" in kwargs else 2, labels=[1], **kwargs)
        last = calls.progress_item(genserve_pb2.SampleCodesChunk(result=old), "rid", progress.request)
        assert isinstance(last, CodesResult) and last.seeds == seeds, kwargs


def test_an_encode_answer_without_latents_is_the_one_error_type_naming_what_is_missing() -> None:
    """A server always answers an Encode with one latent per image, but a proxy or an older server
    may answer an empty EncodeResponse: np.stack raised its bare 'need at least one array to
    stack', no GenserveClientError and nothing about the answer."""
    pixels = np.zeros((4, 4, 3), np.uint8)
    call = calls.encode("vae", [pixels, pixels])
    empty = genserve_pb2.EncodeResponse(provenance=types_pb2.Provenance(model="vae"))
    with pytest.raises(GenserveClientError) as info:
        call.parse(empty, "rid")
    assert info.value.code == grpc.StatusCode.INTERNAL and info.value.request_id == "rid"
    assert "no latents" in info.value.details and "2 images" in info.value.details, info.value.details
    z = np.ones(FAKE_LATENT, np.float32)
    tensor = types_pb2.Tensor(shape=z.shape, dtype=types_pb2.DTYPE_FLOAT32, data=z.tobytes())
    one = genserve_pb2.EncodeResponse(latents=[genserve_pb2.LatentDistribution(mu=tensor, logvar=tensor)])
    with pytest.raises(GenserveClientError, match="1 latent for the 2 images sent"):
        call.parse(one, "rid")
    result = call.parse(genserve_pb2.EncodeResponse(latents=[one.latents[0]] * 2), "rid")
    assert result.mu.shape == (2, FAKE_LATENT) and result.z is None


class _CancelCrossingStatusCall:
    """A stand-in for a unary RPC of a server that fails every attempt (UNAVAILABLE) after a while,
    and whose status arrives as its caller is cancelled: grpc.aio's call task catches the caller's
    CancelledError (the cancel of the task awaiting it is handed on to it) and the caller gets the
    status received, an AioRpcError, its own cancel left only in Task.cancelling(). Only the first
    call's status crosses the cancel; a later call is cancelled as any."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: object, **_: object) -> object:
        self.calls += 1
        crossing = self.calls == 1

        async def invoke() -> None:
            try:
                await asyncio.sleep(30.0)
            except asyncio.CancelledError:
                if not crossing:
                    raise
                # the status was in: grpc.aio's _invoke returns EOF and the status is raised

        async def answer() -> None:
            await asyncio.ensure_future(invoke())
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection reset"
            )

        return answer()


def test_a_cancelled_async_call_is_not_retried_although_grpc_swallowed_the_cancel() -> None:
    async def scenario() -> tuple[bool, int, int]:
        retry = RetryPolicy(max_attempts=100, initial_backoff_s=0.001, max_backoff_s=0.001)
        async with AsyncGenserveClient("127.0.0.1:1", retry=retry) as client:
            fake = _CancelCrossingStatusCall()
            client._stub = type("Stub", (), {"Sample": fake})()
            call = asyncio.ensure_future(client.sample("fake-gen", 1, base_seed=1))
            await asyncio.sleep(0.2)
            assert fake.calls == 1
            call.cancel()
            done, _ = await asyncio.wait({call}, timeout=5.0)
            stopped = bool(done) and call.cancelled()
            calls_at_stop = fake.calls
            if not done:
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
            return stopped, calls_at_stop, fake.calls

    stopped, calls_at_stop, calls = asyncio.run(scenario())
    assert stopped, "the cancelled call was retried"
    assert calls_at_stop == 1


def test_an_error_whose_message_quotes_its_request_id_names_it_once() -> None:
    """The server's INTERNAL message is 'internal error (request id R)' (its boundary), and the
    client appended ' (request id R)' again: every internal error printed 'genserve-client:
    INTERNAL: internal error (request id R) (request id R)'. A message that ends with it is left so."""
    error = GenserveClientError(grpc.StatusCode.INTERNAL, "internal error (request id abc123)", "abc123")
    assert str(error) == "INTERNAL: internal error (request id abc123)"
    other = GenserveClientError(grpc.StatusCode.UNAVAILABLE, "connection refused", "abc123")
    assert str(other) == "UNAVAILABLE: connection refused (request id abc123)"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("rpc", ["get_model", "sample_stream", "sample_codes_progress"])
@pytest.mark.parametrize("keep", ["clients and errors kept", "no cycle collection"])
def test_closing_an_asyncio_client_whose_call_failed_closes_its_connection(
    fake_server: FakeServer, rpc: str, keep: str
) -> None:
    """A grpc.aio channel keeps its connection open after close() while the channel, one of its
    calls or multicallables lives (a server that is down: it goes on reconnecting every backoff).
    The closed client kept its channel, and a failed call's GenserveClientError reached the call
    (its context's traceback) and the attempt's frames (its own), as did a reference cycle (the
    except block's error, its traceback, the frame) that only the cycle collector frees: after
    `async with`, the connection stayed open as long as the caller kept the client (the name an
    `async with ... as client` leaves bound) or an error. A closed client leaves none behind."""
    kept: list[GenserveClientError] = []
    clients: list[AsyncGenserveClient] = []

    async def cycle(model: str) -> None:
        async with AsyncGenserveClient(fake_server.target, retry=RetryPolicy(max_attempts=1)) as client:
            clients.append(client)
            try:
                if rpc == "get_model":
                    await client.get_model(model)
                else:
                    async for _ in getattr(client, rpc)(model, 2):
                        pass
            except GenserveClientError as exc:
                kept.append(exc)

    asyncio.run(cycle("fake-gen" if rpc == "sample_stream" else "fake-prior"))  # grpc.aio's own fds
    clients.clear()
    gc.collect()
    before = _open_fds()
    if keep == "no cycle collection":
        gc.disable()  # only close() may close the connection, not a collection that happens to run
    try:
        for _ in range(3):
            asyncio.run(cycle("nope"))  # NOT_FOUND
        assert len(kept) == 3 and all(e.code == grpc.StatusCode.NOT_FOUND for e in kept)
        if keep == "no cycle collection":
            kept.clear()
            clients.clear()
        else:
            gc.collect()
        wait_until(
            lambda: _open_fds() <= before, 3.0, f"the closed clients' connection closed ({before} fds)"
        )
    finally:
        gc.enable()
