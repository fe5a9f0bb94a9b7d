"""Token handling: loading from file/env and the constant-time comparison's answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from genserve_server import boundary, security
from genserve_server.security import _bearer, load_tokens, token_matches


def test_load_tokens_from_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# ops team\nalpha\n\n  beta  \n")
    monkeypatch.setenv("GENSERVE_TOKENS", "gamma, delta")
    assert load_tokens(token_file, "GENSERVE_TOKENS") == (b"alpha", b"beta", b"gamma", b"delta")


def test_empty_token_sources_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no token"):
        load_tokens(empty)
    monkeypatch.delenv("GENSERVE_TOKENS", raising=False)
    with pytest.raises(ValueError, match="GENSERVE_TOKENS"):
        load_tokens(None, "GENSERVE_TOKENS")


def test_token_matches_any_configured_token_only() -> None:
    tokens = (b"alpha", b"beta")
    assert token_matches(b"beta", tokens)
    assert not token_matches(b"bet", tokens)
    assert not token_matches(b"", tokens)
    assert not token_matches(b"alphabeta", tokens)


def test_bearer_parsing() -> None:
    assert _bearer([("authorization", "Bearer s3cret")]) == b"s3cret"
    assert _bearer([("authorization", "bearer s3cret ")]) == b"s3cret"
    assert _bearer([("authorization", "Basic abc")]) is None
    assert _bearer([("x-other", "Bearer s3cret")]) is None
    assert _bearer(None) is None


def test_a_flood_of_rejected_calls_logs_a_line_per_interval_with_the_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each unauthenticated call logged a line: a scanner's flood flooded the log."""
    now = [100.0]
    monkeypatch.setattr(boundary.time, "monotonic", lambda: now[0])
    log = security.TokenAuthInterceptor([b"secret"])._log
    with caplog.at_level(logging.INFO, logger="genserve_server.security"):
        for _ in range(500):
            log.log(None, "rejected unauthenticated call to %s", "/genserve.v1.GenerationService/Sample")
        now[0] += 10.0
        log.log(None, "rejected unauthenticated call to %s", "/genserve.v1.GenerationService/Sample")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[1].endswith("(499 more since the last line)")


def test_a_denied_call_never_parses_its_request_bytes() -> None:
    """An unauthenticated call's message (up to 64 MiB) was parsed as the method's request before the
    refusal: a full protobuf parse per call for nothing (and garbage bytes are not even a request)."""
    import grpc

    from genserve.v1 import genserve_pb2 as pb

    async def sample(request: Any, context: Any) -> Any:
        raise AssertionError("the method must not run")

    handler = grpc.unary_unary_rpc_method_handler(
        sample, pb.SampleRequest.FromString, pb.SampleResponse.SerializeToString
    )
    denied = security._deny(handler)
    assert denied is not None and denied.request_deserializer is not None
    assert denied.request_deserializer(b"\xff\xff\xff") is None  # the real parser raises on these
