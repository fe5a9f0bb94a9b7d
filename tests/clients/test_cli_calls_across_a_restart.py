"""CLI commands that split their work over several calls, while the server is restarted between two
of them (a rolling upgrade: SIGTERM, a new process on the same port serving a new model version):
one command's images come from one model, and every PNG's provenance names the model that made it."""

from __future__ import annotations

import io
import json
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from client_fakes import cli_main
from PIL import Image
from server_support import (
    TINY_LATENT,
    ServerProcess,
    externalize_weights,
    generator_graph,
    start_server,
    write_model,
)
from style_models import (
    MIX_CROSSOVER,
    NUM_LAYERS,
    SIDE,
    STYLE_LATENT,
    W_AVG,
    W_DIM,
    mapping_graph,
    synthesis_graph,
)

from genserve_client import GenserveClient
from genserve_client.binding import ClientBase

MODEL = "gen"
PER_CALL = 8  # the model's queue: `sample` asks at most this many images a call
N = 3 * PER_CALL
SEED = 500
CONFIG = {"warmup": False, "drain_grace_s": 10.0}


def _write_version(repo: Path, version: str, seed: int, *, external: bool = False) -> None:
    write_model(
        repo,
        MODEL,
        "generator",
        generator_graph(TINY_LATENT, 1, 8, 8, seed=seed),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": PER_CALL, "max_queue_size": PER_CALL}},
        version=version,
    )
    if external:  # its weights in model.onnx.data, as torch.onnx.export writes them
        externalize_weights(repo / MODEL / version)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _reference(server: ServerProcess) -> tuple[str, dict[int, np.ndarray]]:
    """(model sha256, pixels by seed) of the images of seeds SEED..SEED+N-1 the server gives now."""
    seeds = list(range(SEED, SEED + N))
    pixels: dict[int, np.ndarray] = {}
    sha256 = ""
    with GenserveClient(server.target) as client:
        for start in range(0, N, PER_CALL):
            result = client.sample(MODEL, seeds=seeds[start : start + PER_CALL], format="png")
            sha256 = result.provenance.model_sha256
            pixels.update({item.seed: _pixels(item.raw) for item in result.items})
    return sha256, pixels


def _sample_across_a_restart(
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    port: int,
    change: Callable[[], None],
    *,
    on_old: Callable[[ServerProcess], None] | None = None,
    on_new: Callable[[ServerProcess], None] | None = None,
    seen: list[Any] | None = None,
) -> tuple[int, str, Path]:
    """`sample --n N` from a server on `repo` that is stopped after the command's first call (SIGTERM),
    `change()`d on disk, and started again on the same `port` (a rolling upgrade between two calls):
    (exit status, stderr, the --out folder). `on_old`/`on_new` see each server while it runs; `seen`
    gets each call's provenance."""
    servers = [start_server(repo, tmp_path / "old", config=CONFIG, extra_args=("--port", str(port)))]
    sample = ClientBase.sample

    def restart_after_the_first_call(self: GenserveClient, *args: Any, **kwargs: Any) -> Any:
        result = sample.__get__(self)(*args, **kwargs)
        if seen is not None:
            seen.append(result.provenance)
        if len(servers) == 1:  # the operator's rolling upgrade lands between two calls
            old = servers[0]
            old.proc.send_signal(signal.SIGTERM)
            old.proc.wait(30)
            change()
            new = start_server(repo, tmp_path / "new", config=CONFIG, extra_args=("--port", str(port)))
            servers.append(new)
            # The next call finds the new server up (not the channel's reconnect backoff).
            grpc.channel_ready_future(self._channel).result(timeout=30)
        return result

    out = tmp_path / "out"
    try:
        if on_old is not None:
            on_old(servers[0])
        with monkeypatch.context() as patch:
            patch.setattr(GenserveClient, "sample", restart_after_the_first_call)
            code, _, err = cli_main(
                capsys,
                "--target", f"127.0.0.1:{port}", "sample", "--model", MODEL, "--n", str(N),
                "--seed", str(SEED), "--out", str(out),
            )  # fmt: skip
        assert len(servers) == 2  # the restart happened mid-command
        if on_new is not None:
            on_new(servers[1])
    finally:
        for server in servers:
            server.stop()
    return code, err, out


@pytest.mark.parametrize("new_version", ["2", "1"], ids=["a new version", "version 1 replaced"])
def test_a_sample_split_over_calls_never_mixes_two_models_across_a_restart(
    new_version: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    server_port: int,
) -> None:
    repo = tmp_path / "models"
    _write_version(repo, "1", seed=0)
    references: dict[str, dict[int, np.ndarray]] = {}

    def new_version_only() -> None:
        shutil.rmtree(repo / MODEL / "1")
        _write_version(repo, new_version, seed=1)

    def reference(server: ServerProcess) -> None:
        references.update([_reference(server)])

    code, err, out = _sample_across_a_restart(
        repo, tmp_path, monkeypatch, capsys, server_port, new_version_only, on_old=reference, on_new=reference
    )
    assert len(references) == 2  # two model files
    files = sorted(out.glob("*.png")) if out.exists() else []
    # Each file's PNG text names the model file that made its pixels, and all of them one file:
    # either the command finished on one model, or it refused to mix (then it wrote nothing).
    made_by = []
    for path in files:
        picture = Image.open(path)
        sha256, seed = picture.text["model_sha256"], int(picture.text["seed"])
        assert np.array_equal(np.asarray(picture), references[sha256][seed]), (path.name, sha256)
        made_by.append(sha256)
    assert len(set(made_by)) <= 1, sorted(made_by)
    if code == 0:
        assert len(files) == N, err
    else:
        assert not files
        assert "version 1" in err or "'1'" in err, err


def test_a_sample_split_over_calls_refuses_weights_retrained_under_the_same_graph(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    server_port: int,
) -> None:
    # Version 1 keeps its weights in model.onnx.data; retrained, its graph file is byte for byte the
    # same, and so is its model_sha256: the command took the new server's images as the first's and
    # wrote one set of PNGs from two models. Provenance.weights_sha256 now tells them apart.
    repo = tmp_path / "models"
    _write_version(repo, "1", seed=0, external=True)
    graph = (repo / MODEL / "1" / "model.onnx").read_bytes()

    def retrain() -> None:
        shutil.rmtree(repo / MODEL / "1")
        _write_version(repo, "1", seed=1, external=True)
        assert (repo / MODEL / "1" / "model.onnx").read_bytes() == graph

    code, err, out = _sample_across_a_restart(repo, tmp_path, monkeypatch, capsys, server_port, retrain)
    assert code != 0, err
    assert "the model changed" in err and "weights sha256" in err, err
    assert not (sorted(out.glob("*.png")) if out.exists() else [])


def _write_styled(repo: Path, mapping_seed: int) -> None:
    """A style generator whose mapping keeps its weights in model.onnx.data: retrained (another
    `mapping_seed`), the mapping's graph file is byte for byte the same."""
    batching = {"batching": {"max_batch_size": PER_CALL, "max_queue_size": PER_CALL}}
    write_model(
        repo,
        "mapping",
        "style_mapping",
        mapping_graph(seed=mapping_seed),
        {"latent_dim": STYLE_LATENT, "w_dim": W_DIM, "output_range": None},
        config=batching,
    )
    externalize_weights(repo / "mapping" / "1")
    card = {
        "latent_dim": STYLE_LATENT,
        "w_dim": W_DIM,
        "num_layers": NUM_LAYERS,
        "w_avg": W_AVG,
        "mix_crossover": MIX_CROSSOVER,
        "channels": 1,
        "image_size": [SIDE, SIDE],
    }
    write_model(
        repo, MODEL, "style_generator", synthesis_graph(), card, config={"mapping": "mapping", **batching}
    )


def test_a_sample_split_over_calls_refuses_a_mapping_retrained_under_the_same_graph(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    server_port: int,
) -> None:
    # The style generator is the same file; its mapping, whose weights are in model.onnx.data, is
    # retrained between two calls: same graph bytes, same model_sha256 in used_models, other images.
    # The command compared the mapping's (model, version, sha256) alone and wrote one set of PNGs
    # from two mappings; UsedModel.weights_sha256 tells them apart, and the refusal names both.
    repo = tmp_path / "models"
    _write_styled(repo, mapping_seed=0)
    graph = (repo / "mapping" / "1" / "model.onnx").read_bytes()
    used: list[Any] = []
    retrained: list[Any] = []

    def retrain_the_mapping() -> None:
        shutil.rmtree(repo / "mapping" / "1")
        _write_styled(repo, mapping_seed=1)
        assert (repo / "mapping" / "1" / "model.onnx").read_bytes() == graph

    def sample_one(server: ServerProcess) -> None:
        with GenserveClient(server.target) as client:
            retrained.append(client.sample(MODEL, seeds=[SEED], format="png").provenance)

    code, err, out = _sample_across_a_restart(
        repo, tmp_path, monkeypatch, capsys, server_port, retrain_the_mapping, on_new=sample_one, seen=used
    )
    assert code != 0, err
    before = dict(used[0].used_weights_sha256)["mapping"]
    after = dict(retrained[0].used_weights_sha256)["mapping"]
    assert before and after and before != after
    assert "the model changed" in err and before in err and after in err, err
    assert not (sorted(out.glob("*.png")) if out.exists() else [])


def test_a_sample_split_over_calls_refuses_a_card_edited_beside_the_same_graph(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    server_port: int,
) -> None:
    # The same graph and weights under an edited card.json (output_range: other pixels for the same
    # seed): model_sha256 and weights_sha256 agree, so the command took the new server's images as
    # the first's. Provenance.card_sha256 tells them apart.
    repo = tmp_path / "models"
    _write_version(repo, "1", seed=0)
    card_path = repo / MODEL / "1" / "card.json"

    def edit_the_card() -> None:
        card = json.loads(card_path.read_text())
        card["output_range"] = [-2.0, 2.0]
        card_path.write_text(json.dumps(card))

    code, err, out = _sample_across_a_restart(repo, tmp_path, monkeypatch, capsys, server_port, edit_the_card)
    assert code != 0, err
    assert "the model changed" in err and "card sha256" in err, err
    assert not (sorted(out.glob("*.png")) if out.exists() else [])
