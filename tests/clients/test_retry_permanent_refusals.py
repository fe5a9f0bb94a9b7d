"""RESOURCE_EXHAUSTED answers that every attempt would get again are not retried (a real server)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import grpc
import pytest
from server_support import running_server, write_tiny_generator

from genserve_client import GenserveClient
from genserve_client.channel import ChannelConfig
from genserve_client.errors import GenserveClientError
from genserve_client.retry import RetryPolicy, is_permanent


class LongestWaits(random.Random):
    """Full jitter at its upper bound: each retry waits the whole backoff."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_request_headers_over_grpcs_hard_limit_are_not_retried(tmp_path: Path) -> None:
    """Above gRPC's 16 KiB hard metadata limit every call is refused (docs/operations.md): a 20 KB
    token (a JWT with many claims) must fail at the first answer, not after max_attempts refusals
    (nor, in a bulk job, after --retry-window, as "resumable")."""
    repo = tmp_path / "models"
    write_tiny_generator(repo, "gen")
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=2.0, max_backoff_s=2.0, multiplier=1.0)
    with running_server(repo, tmp_path / "work") as server:
        config = ChannelConfig(server.target, token="x" * 20_000)
        with GenserveClient(config, timeout_s=30, retry=policy, rng=LongestWaits()) as client:
            started = time.monotonic()
            with pytest.raises(GenserveClientError) as raised:
                client.sample("gen", 1, base_seed=1)
            elapsed = time.monotonic() - started
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds hard limit" in raised.value.details
    assert elapsed < 2.0, f"retried a refusal every attempt gets: {elapsed:.1f} s"


def test_only_the_hard_metadata_limit_is_permanent() -> None:
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert is_permanent(code, "received metadata size exceeds hard limit (value length 20007 vs. 16384)")
    # Between the soft and the hard limit gRPC refuses a share of the calls: a retry may pass.
    assert not is_permanent(code, "received metadata size exceeds soft limit (9000 vs. 8192), rejecting")
    assert not is_permanent(code, "queue full: 4 images queued, max_queue_size=4; retry with backoff")
