"""A TensorRT engine cache directory the server cannot create (a read-only volume, a path under a file)
turns the cache off, not the model, with one warning that names the directory and the setting that
points the cache elsewhere (docs/deploy.md, "TensorRT engine cache"). No GPU needed: the provider
options are ONNX Runtime's, checked before a session is built."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from genserve_server.ort_session import (
    CUDA,
    TENSORRT,
    ProfileShapes,
    RuntimeConfig,
    _make_cache_dirs,
    provider_chain,
)


def test_an_engine_cache_that_cannot_be_made_is_a_warning_naming_the_directory_and_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # /dev/null is a file: not even root can make a directory under it.
    config = replace(RuntimeConfig(), trt_engine_cache_dir="/dev/null/trt")
    profile = ProfileShapes({"z": [1, 16]}, {"z": [8, 16]}, {"z": [64, 16]})
    chain = provider_chain([TENSORRT, CUDA], config, profile=profile, model_sha256="ab" * 32)
    trt = dict(chain)[TENSORRT]
    cache_path = trt["trt_engine_cache_path"]
    assert cache_path.startswith("/dev/null/trt/")
    with caplog.at_level(logging.WARNING, logger="genserve_server.ort_session"):
        _make_cache_dirs(chain, Path("/models/gen/1/model.onnx"))
    # The cache is off for this session; the rest of TensorRT's options stand.
    assert not [k for k in trt if k.startswith(("trt_engine_cache", "trt_timing_cache"))]
    assert trt["trt_profile_max_shapes"] == "z:64x16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert cache_path in warnings[0]
    assert "trt_engine_cache_dir" in warnings[0] and "--trt-engine-cache-dir" in warnings[0], warnings[0]
