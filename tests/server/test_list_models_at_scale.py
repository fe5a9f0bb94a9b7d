"""ListModels of a model zoo: many models whose cards are the size export/ writes (~27 KB: the
training record, quality and the holdout block). ListModels has no paging; its answer must still
reach the client within the server's max_send_message_bytes and a gRPC client's default 4 MiB
receive limit, as docs/server.md sends users of large repositories to it ("use Check per name, or
ListModels")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_fakes import cli_main
from server_support import REPO_ROOT, TINY_LATENT, ServerProcess, generator_graph, start_server, write_model

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

MIB = 1024 * 1024
# What export/ writes beside the tensors: a bundled model's training, quality, holdout and parity.
EXPORTED = json.loads((REPO_ROOT / "models" / "dcgan-digits" / "1" / "card.json").read_text())
EXTRA: dict[str, Any] = {k: EXPORTED[k] for k in ("training", "quality", "holdout", "parity")}


def _zoo(root: Path, models: int) -> Path:
    graph = generator_graph(TINY_LATENT, 1, 8, 8)
    card = {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8], **EXTRA}
    for i in range(models):
        write_model(root, f"digit-{i:04d}", "generator", graph, card)
    return root


@pytest.fixture(scope="module")
def zoo_1mib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """50 exported-size cards (~1.3 MB of card.json) under the lowest max_send_message_bytes (1 MiB):
    as 2,400 such model versions under the default 64 MiB."""
    root = _zoo(tmp_path_factory.mktemp("zoo-1mib"), 50)
    config = {"limits": {"max_send_message_bytes": MIB}}
    server = start_server(root, tmp_path_factory.mktemp("zoo-1mib-server"), config=config, timeout_s=120)
    yield server
    server.stop()


def test_list_models_of_many_models_fits_the_servers_send_limit(zoo_1mib: ServerProcess) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{zoo_1mib.port}", options=[("grpc.max_receive_message_length", 64 * MIB)]
    ) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        except grpc.RpcError as exc:
            pytest.fail(f"ListModels of 50 models: {exc.code()}: {exc.details()}")
    assert len(models) == 50
    assert all(not v.card_json for m in models for v in m.versions)  # GetModel has them


def test_get_model_still_gives_the_card(zoo_1mib: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{zoo_1mib.port}") as channel:
        info = pb_grpc.GenerationServiceStub(channel).GetModel(pb.GetModelRequest(name="digit-0007"))
    assert json.loads(info.versions[0].card_json)["holdout"] == EXTRA["holdout"]


def test_cli_models_lists_a_zoo(zoo_1mib: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_main(capsys, "--target", f"127.0.0.1:{zoo_1mib.port}", "models")
    assert code == 0, err
    assert "digit-0049" in out


def test_list_models_of_a_zoo_fits_a_default_grpc_clients_4_mib(tmp_path: Path) -> None:
    """160 exported-size cards under the default limits, read by a plain stub (4 MiB receive)."""
    root = _zoo(tmp_path / "models", 160)
    server = start_server(root, tmp_path / "server", timeout_s=120)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            try:
                models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            except grpc.RpcError as exc:
                pytest.fail(f"ListModels of 160 models: {exc.code()}: {exc.details()}")
        assert len(models) == 160
    finally:
        server.stop()
