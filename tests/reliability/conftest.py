"""Fixtures of the reliability tests: certificates, a faulty model repository and its server.

Sizes scale with two environment variables (nightly runs set them; the default suite stays short):
GENSERVE_FUZZ_CASES (default 2000) and GENSERVE_OVERLOAD_S (default 8; nightly 30).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reliability_support import SHARED_LIMITS, make_pki, write_flaky, write_gen, write_slow
from server_support import ServerProcess, healthy_models, image_to_image_graph, start_server, write_model


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def faulty_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gen (fast), slow (hundreds of ms per batch), over (tens of ms, queue 8), i2i, flaky (ORT fails
    at batch 3), a model whose file is missing and one whose file is corrupt (with a matching sha256,
    so ONNX Runtime itself refuses it)."""
    import hashlib
    import json

    root = tmp_path_factory.mktemp("faulty-models")
    write_gen(root)
    write_slow(root, "slow", iterations=20000, queue=64, batch=4)
    write_slow(root, "over", iterations=6000, queue=8, batch=4)
    write_flaky(root)
    write_model(
        root,
        "i2i",
        "image_to_image",
        image_to_image_graph(4),
        {"channels": 3, "input_channels": 3, "input_range": [-1.0, 1.0], "size_multiple": 4, "min_size": 4},
    )
    missing = write_gen(root, "missing-file")
    (missing / "model.onnx").unlink()
    corrupt = write_gen(root, "corrupt-file")
    garbage = b"\x08\x07" + b"\xff" * 200
    (corrupt / "model.onnx").write_bytes(garbage)
    card = json.loads((corrupt / "card.json").read_text())
    card["sha256"]["model.onnx"] = hashlib.sha256(garbage).hexdigest()
    (corrupt / "card.json").write_text(json.dumps(card))
    return root


@pytest.fixture(scope="session")
def faulty_server(faulty_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        faulty_repo,
        tmp_path_factory.mktemp("faulty-server"),
        config={"limits": SHARED_LIMITS, "drain_grace_s": 5.0},
        # missing-file and corrupt-file fail on purpose: SERVING means every other model is ready.
        extra_args=healthy_models(faulty_repo, broken=("missing-file", "corrupt-file")),
    )
    yield server
    server.stop()


@pytest.fixture
def channel(faulty_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(faulty_server.target) as ch:
        yield ch
