"""Claims of the docs checked against the server's code (docs/operations.md, docs/server.md)."""

from __future__ import annotations

import json
from pathlib import Path

from genserve_server.config import load_server_config


def test_relative_trt_engine_cache_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """docs/operations.md: "Relative paths in the config file are relative to the file's directory."
    tls and auth paths were, but `trt_engine_cache_dir` was handed to TensorRT as written, so it
    resolved against whatever directory the server was started from."""
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    path = config_dir / "server.json"
    path.write_text(json.dumps({"trt_engine_cache_dir": "trt-cache"}))
    assert load_server_config(path).trt_engine_cache_dir == str(config_dir / "trt-cache")
    # An absolute path is kept as it is.
    path.write_text(json.dumps({"trt_engine_cache_dir": "/var/cache/genserve/trt"}))
    assert load_server_config(path).trt_engine_cache_dir == "/var/cache/genserve/trt"
