"""bench.ab gives each side its own server config file: an A/B of one setting of one tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ab
from bench.common import REPO_ROOT
from bench.servers import BenchError


def test_each_side_starts_with_its_own_server_config(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"idle_spin_s": 0.5}))  # out of range: the server must refuse it
    with pytest.raises(BenchError, match="idle_spin_s"), ab._serve(REPO_ROOT, models, config):
        pass
    assert "--config" not in ab._serve(REPO_ROOT, models).command
