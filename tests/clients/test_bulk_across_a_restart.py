"""A bulk job (the CLI's `bulk`) while its server is restarted between two of its streams (a rolling
upgrade: SIGTERM, a new process on the same port with another repository or other limits): the job
goes on where it can, and where it cannot it stops the way a resume would (docs/client.md, "Bulk
jobs")."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from client_fakes import cli_main
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
from genserve_client import bulk as bulk_module
from genserve_client.bulk import BulkJob, read_manifest

MODEL = "gen"
STREAM = 16  # the job's default stream size here (bulk's DEFAULT_STREAM_IMAGES, patched)
N = 3 * STREAM  # three streams, one after another (--concurrency 1)
CONFIG: dict[str, Any] = {"warmup": False, "drain_grace_s": 10.0}


def _write(repo: Path, name: str = MODEL, version: str = "1") -> None:
    write_model(
        repo,
        name,
        "generator",
        generator_graph(TINY_LATENT, 1, 8, 8, seed=0),
        {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
        config={"batching": {"max_batch_size": 8, "max_queue_size": 64}},
        version=version,
    )


class Restarts:
    """Servers on one port (held by the test: conftest's server_port); `restart` stops the one
    serving and starts another on `repo`."""

    def __init__(self, tmp_path: Path, repo: Path, port: int) -> None:
        self.tmp_path = tmp_path
        self.port = port
        self.target = f"127.0.0.1:{self.port}"
        self.servers: list[ServerProcess] = []
        self._start(repo, CONFIG)

    def _start(self, repo: Path, config: Mapping[str, Any]) -> None:
        work = self.tmp_path / f"server-{len(self.servers)}"
        self.servers.append(start_server(repo, work, config=config, extra_args=("--port", str(self.port))))

    def restart(self, repo: Path, config: Mapping[str, Any]) -> None:
        old = self.servers[-1]
        old.proc.send_signal(signal.SIGTERM)
        old.proc.wait(30)
        self._start(repo, config)
        with grpc.insecure_channel(self.target) as channel:  # the next stream finds it up
            grpc.channel_ready_future(channel).result(timeout=30)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def fast_bulk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk_module, "BACKOFF_INITIAL_S", 0.05)
    monkeypatch.setattr(bulk_module, "BACKOFF_MAX_S", 0.2)
    monkeypatch.setattr(bulk_module, "DEFAULT_STREAM_IMAGES", STREAM)


def _restart_before_the_second_stream(
    monkeypatch: pytest.MonkeyPatch, servers: Restarts, repo: Path, config: Mapping[str, Any]
) -> list[bool]:
    open_stream = BulkJob._open_stream
    restarted: list[bool] = []

    def restart_then_open(self: BulkJob, start: int, stop: int) -> Any:
        if start > 0 and not restarted:
            restarted.append(True)
            servers.restart(repo, config)
        return open_stream(self, start, stop)

    monkeypatch.setattr(BulkJob, "_open_stream", restart_then_open)
    return restarted


@pytest.fixture
def servers(tmp_path: Path, server_port: int) -> Iterator[Restarts]:
    repo = tmp_path / "models"
    _write(repo)
    restarts = Restarts(tmp_path, repo, server_port)
    try:
        yield restarts
    finally:
        restarts.stop()


@pytest.mark.parametrize("gone", ["model", "version"])
@pytest.mark.usefixtures("fast_bulk")
def test_a_bulk_job_whose_pinned_model_is_gone_after_a_restart_stops_as_its_resume_does(
    gone: str,
    servers: Restarts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The job pins version 1 of 'gen'. The new server has no 'gen' at all (its directory removed),
    # or only a version 2 of it. Either way the job cannot go on until version 1 is served again,
    # and a resume says so: exit 2, naming the pinned version. A model that was gone exited 1 with a
    # "resumable" hint whose command only failed the same way (exit 1 again: a Kubernetes Job spent
    # its retries on it), while a version that was gone exited 2.
    new_repo = tmp_path / "new-models"
    if gone == "model":
        _write(new_repo, "other")
    else:
        _write(new_repo, version="2")
    with monkeypatch.context() as patch:
        restarted = _restart_before_the_second_stream(patch, servers, new_repo, CONFIG)
        out = tmp_path / "job"
        args = ("--target", servers.target, "bulk", "--retry-window", "20")
        code, _, err = cli_main(capsys, *args, "--model", MODEL, "--n", str(N), "--out", str(out))
    assert restarted
    entries, _ = read_manifest(out / "manifest.jsonl")
    assert len(entries) == STREAM, err  # the first stream, written before the restart
    assert code == 2, err
    assert f"'{MODEL}' version 1" in err and "resumable" not in err, err
    # A resume meets the same server: it refuses the job the same way, and leaves it as it was.
    code, _, resumed = cli_main(capsys, *args, "--resume", str(out))
    assert code == 2, resumed
    assert re.search(r"version '?1\b", resumed) and "resumable" not in resumed, resumed
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM


@pytest.mark.usefixtures("fast_bulk")
def test_a_bulk_job_fits_its_streams_to_a_max_stream_images_lowered_by_a_restart(
    servers: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The job cut its streams to the first server's limit (its default of 16 here). The new server
    # sends at most 8 images a stream: the job's next stream was refused INVALID_ARGUMENT and the
    # job stopped with exit 2 and no resume hint, though `--resume` refits its streams and finishes.
    # It now refits them itself and finishes, the same images as one clean run.
    repo = tmp_path / "models"
    lowered = {**CONFIG, "limits": {"max_stream_images": STREAM // 2}}
    with monkeypatch.context() as patch:
        restarted = _restart_before_the_second_stream(patch, servers, repo, lowered)
        out = tmp_path / "job"
        args = ("--target", servers.target, "bulk", "--retry-window", "20")
        code, _, err = cli_main(capsys, *args, "--model", MODEL, "--n", str(N), "--out", str(out))
    assert restarted
    assert code == 0, err
    entries, _ = read_manifest(out / "manifest.jsonl")
    assert sorted(e["index"] for e in entries) == list(range(N))
    clean = tmp_path / "clean"
    code, _, err = cli_main(capsys, *args, "--model", MODEL, "--n", str(N), "--out", str(clean))
    assert code == 0, err
    for entry in entries:
        assert (out / entry["file"]).read_bytes() == (clean / entry["file"]).read_bytes(), entry["file"]


@pytest.mark.usefixtures("fast_bulk")
def test_a_bulk_job_whose_stream_images_a_restart_made_too_many_stops_as_its_resume_does(
    servers: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A --stream-images the user gave, above the new server's max_stream_images: a resume with it is
    # refused before any stream (exit 2, naming both), and so is the running job, not with the
    # server's bare INVALID_ARGUMENT.
    repo = tmp_path / "models"
    lowered = {**CONFIG, "limits": {"max_stream_images": STREAM // 2}}
    with monkeypatch.context() as patch:
        restarted = _restart_before_the_second_stream(patch, servers, repo, lowered)
        out = tmp_path / "job"
        args = ("--target", servers.target, "bulk", "--retry-window", "20")
        code, _, err = cli_main(
            capsys, *args, "--model", MODEL, "--n", str(N), "--stream-images", str(STREAM), "--out", str(out)
        )
    assert restarted
    assert code == 2, err
    assert f"--stream-images {STREAM}" in err and f"max_stream_images {STREAM // 2}" in err, err
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM
    # As the message says: a resume with at most the server's limit finishes the job.
    code, _, err = cli_main(capsys, *args, "--resume", str(out), "--stream-images", str(STREAM // 2))
    assert code == 0, err
    assert sorted(e["index"] for e in read_manifest(out / "manifest.jsonl")[0]) == list(range(N))


@pytest.mark.usefixtures("fast_bulk")
def test_a_bulk_job_refuses_retrained_weights_under_the_same_graph_after_a_restart(
    servers: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A model whose weights are in model.onnx.data (torch.onnx.export's default), retrained and
    # served again under the same version: its graph file is byte for byte the same, so its
    # model_sha256 is too. The job took the new server's images as the old one's (one job, two
    # models); it now compares the weights' digest too and stops as its resume does.
    old_repo, new_repo = tmp_path / "external-models", tmp_path / "retrained-models"
    for repo, seed in ((old_repo, 0), (new_repo, 1)):
        write_model(
            repo,
            MODEL,
            "generator",
            generator_graph(TINY_LATENT, 1, 8, 8, seed=seed),
            {"latent_dim": TINY_LATENT, "channels": 1, "image_size": [8, 8]},
            config={"batching": {"max_batch_size": 8, "max_queue_size": 64}},
        )
        externalize_weights(repo / MODEL / "1")
    graphs = [(repo / MODEL / "1" / "model.onnx").read_bytes() for repo in (old_repo, new_repo)]
    weights = [(repo / MODEL / "1" / "model.onnx.data").read_bytes() for repo in (old_repo, new_repo)]
    assert graphs[0] == graphs[1] and weights[0] != weights[1]
    servers.restart(old_repo, CONFIG)
    with monkeypatch.context() as patch:
        restarted = _restart_before_the_second_stream(patch, servers, new_repo, CONFIG)
        out = tmp_path / "job"
        args = ("--target", servers.target, "bulk", "--retry-window", "20")
        code, _, err = cli_main(capsys, *args, "--model", MODEL, "--n", str(N), "--out", str(out))
    assert restarted
    assert code == 2, err
    assert "mix two models" in err and "weights" in err, err
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM
    code, _, resumed = cli_main(capsys, *args, "--resume", str(out))
    assert code == 2, resumed
    assert "mix two models" in resumed and "weights" in resumed, resumed
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM


def _write_styled(repo: Path, mapping_seed: int) -> None:
    """A style generator 'gen' whose mapping keeps its weights in model.onnx.data: retrained (another
    `mapping_seed`), the mapping's graph file is byte for byte the same."""
    batching = {"batching": {"max_batch_size": 8, "max_queue_size": 64}}
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


@pytest.mark.usefixtures("fast_bulk")
def test_a_bulk_job_refuses_a_mapping_retrained_under_the_same_graph_after_a_restart(
    servers: Restarts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A style generator's job: the generator is the same file after the restart, its mapping (weights
    # in model.onnx.data) retrained under the same graph bytes, so the same sha256 in used_models.
    # The job compared used_models' sha256s alone and went on with the new mapping's images (one job,
    # two models); it compares UsedModel.weights_sha256 too, mid-job and on resume, naming both.
    old_repo, new_repo = tmp_path / "styled-models", tmp_path / "retrained-models"
    _write_styled(old_repo, mapping_seed=0)
    _write_styled(new_repo, mapping_seed=1)
    graphs = [(repo / "mapping" / "1" / "model.onnx").read_bytes() for repo in (old_repo, new_repo)]
    assert graphs[0] == graphs[1]
    servers.restart(old_repo, CONFIG)
    with monkeypatch.context() as patch:
        restarted = _restart_before_the_second_stream(patch, servers, new_repo, CONFIG)
        out = tmp_path / "job"
        args = ("--target", servers.target, "bulk", "--retry-window", "20")
        code, _, err = cli_main(capsys, *args, "--model", MODEL, "--n", str(N), "--out", str(out))
    assert restarted
    assert code == 2, err
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM
    digests = json.loads((out / "job.json").read_text())["used_weights_sha256"]
    with GenserveClient(servers.target) as client:
        retrained = dict(client.sample(MODEL, seeds=[0], format="png").provenance.used_weights_sha256)
    assert digests["mapping"] and retrained["mapping"] and digests["mapping"] != retrained["mapping"]
    assert "mix two models" in err and digests["mapping"] in err and retrained["mapping"] in err, err
    code, _, resumed = cli_main(capsys, *args, "--resume", str(out))
    assert code == 2, resumed
    assert "mix two models" in resumed and retrained["mapping"] in resumed, resumed
    assert len(read_manifest(out / "manifest.jsonl")[0]) == STREAM
