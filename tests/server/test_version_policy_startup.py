"""A version policy that picks no version directory at start-up: said, as a rescan says it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from server_support import write_tiny_generator

from genserve_server.config import ServerConfig
from genserve_server.errors import Unavailable
from genserve_server.metrics import Metrics
from genserve_server.repository import Repository


def test_a_version_policy_that_picks_no_version_at_start_up_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in `specific` on a first deploy: the model serves nothing, so ModelInfo.reason,
    genserve_model_config_error and the log say why, as a hot reload's rescan does (it used to be a
    model with no versions, an empty reason, config_error 0 and not a log line)."""
    root = tmp_path / "models"
    write_tiny_generator(root, "good")
    write_tiny_generator(root, "typo", config={"version_policy": {"specific": ["5"]}})
    metrics = Metrics()
    repo = Repository(root, ServerConfig(), metrics)
    with caplog.at_level(logging.INFO):
        repo.scan()
    assert list(repo.get("good").versions) == ["1"]
    model = repo.get("typo")
    assert not model.versions
    assert model.reason == (
        f"{root / 'typo' / 'config.json'}: version_policy picks none of the version directories on disk (1)"
    )
    assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "typo"}) == 1
    assert metrics.registry.get_sample_value("genserve_model_config_error", {"model": "good"}) == 0
    assert [r.getMessage() for r in caplog.records] == [f"model typo unavailable: {model.reason}"]
    with pytest.raises(Unavailable):
        model.resolve("")
