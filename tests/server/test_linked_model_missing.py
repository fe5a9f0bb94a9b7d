"""A model whose config.json names another model its calls go through (a style generator's `mapping`,
a code prior's `decoder` and `top_prior`) where that model is not in the repository: the called
model exists and is READY, so its calls are UNAVAILABLE naming the called model and the config.json
field, not NOT_FOUND naming a model the client never asked for."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from code_models import prior_graph, write_code_models
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_support import (
    ServerProcess,
    metric_in,
    running_server,
    start_server,
    wait_until,
    write_model,
    write_tiny_generator,
)
from style_models import synthesis_graph, write_style_models

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

GRID = (6, 6)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("linked-missing")
    write_style_models(root)
    write_code_models(root, grid=GRID, k=16)
    generator = root / "style-gen"
    card = (generator / "1" / "card.json").read_text()
    write_model(
        root,
        "orphan-gen",
        "style_generator",
        synthesis_graph(),
        {k: v for k, v in json.loads(card).items() if k in _STYLE_CARD_KEYS},
        config={"mapping": "no-such-mapping"},
    )
    write_model(
        root,
        "orphan-prior",
        "code_prior",
        prior_graph(*GRID, 16),
        {"grid": list(GRID), "codebook_size": 16, "output_range": None},
        config={"decoder": "no-such-decoder", "batching": {"max_batch_size": 8, "max_queue_size": 64}},
    )
    chain = json.loads((root / "chain-prior" / "config.json").read_text())
    chain["top_prior"] = "no-such-top-prior"
    (root / "orphan-chain").mkdir()
    (root / "orphan-chain" / "config.json").write_text(json.dumps(chain))
    (root / "chain-prior" / "1").rename(root / "orphan-chain" / "1")
    server = start_server(root, tmp_path_factory.mktemp("linked-missing-server"))
    yield server, root
    server.stop()


_STYLE_CARD_KEYS = ("latent_dim", "w_dim", "num_layers", "w_avg", "mix_crossover", "channels", "image_size")


def _error(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    err = excinfo.value
    assert isinstance(err, grpc.Call)
    return err.code(), str(err.details())


def test_a_style_generator_whose_mapping_is_not_in_the_repository_is_unavailable_naming_its_mapping(
    served: tuple[ServerProcess, Path],
) -> None:
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="orphan-gen"))
        assert info.versions[0].state == pb.MODEL_STATE_READY
        assert info.versions[0].reason.startswith("every request fails: its mapping no-such-mapping")
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Sample(pb.SampleRequest(model="orphan-gen", seeds=[1]), timeout=30)
        code, details = _error(excinfo)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "orphan-gen" in details and "no-such-mapping" in details, details
        assert "config.json mapping" in details, details


def test_a_code_prior_whose_decoder_is_not_in_the_repository_is_unavailable_naming_its_decoder(
    served: tuple[ServerProcess, Path],
) -> None:
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SampleCodes(pb.SampleCodesRequest(model="orphan-prior", seeds=[1]), timeout=30)
        code, details = _error(excinfo)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "orphan-prior" in details and "no-such-decoder" in details, details
        assert "config.json decoder" in details, details


def test_get_model_says_every_call_fails_for_a_code_prior_whose_decoder_cannot_serve(
    served: tuple[ServerProcess, Path],
) -> None:
    """A READY style generator whose mapping cannot serve says 'every request fails: ...' in GetModel
    and ListModels; a READY code prior whose decoder is missing said nothing (reason empty) while
    every SampleCodes failed."""
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        version = stub.GetModel(pb.GetModelRequest(name="orphan-prior")).versions[0]
        assert version.state == pb.MODEL_STATE_READY
        assert version.reason.startswith("every request fails: its decoder no-such-decoder"), version
        listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert listed["orphan-prior"].versions[0].reason == version.reason
        assert stub.GetModel(pb.GetModelRequest(name="prior")).versions[0].reason == ""


def test_a_two_level_prior_whose_top_prior_is_not_in_the_repository_is_unavailable_naming_it(
    served: tuple[ServerProcess, Path],
) -> None:
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.SampleCodes(pb.SampleCodesRequest(model="orphan-chain", seeds=[1]), timeout=30)
        code, details = _error(excinfo)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "orphan-chain" in details and "no-such-top-prior" in details, details
        assert "config.json top_prior" in details, details


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    return status


def test_the_health_key_of_a_model_whose_linked_model_cannot_serve_is_not_serving(
    served: tuple[ServerProcess, Path],
) -> None:
    """Every call of a READY style generator whose mapping is missing or does not fit, and of a
    READY code prior whose decoder is missing, fails UNAVAILABLE: its health key said SERVING. A
    two-level prior whose top prior is missing still answers a SampleCodes given top_codes."""
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        assert _health(channel, "style-gen") == SERVING
        assert _health(channel, "prior") == SERVING
        for name in ("orphan-gen", "style-misfit", "orphan-prior"):
            assert _health(channel, name) == NOT_SERVING, name
        assert _health(channel, "orphan-chain") == SERVING


def test_required_models_are_ready_only_while_their_mapping_and_decoder_are(tmp_path: Path) -> None:
    """`--require-models style-gen,prior`: readiness ("") said SERVING while every call of style-gen
    (or prior) failed UNAVAILABLE because its mapping (decoder) had left the repository. The keys
    follow the linked models: NOT_SERVING once they are removed, SERVING again once they are back
    (hot reloads), and so does their genserve_model_ready."""
    root = tmp_path / "models"
    styles = write_style_models(root)
    codes = write_code_models(root, grid=GRID, k=16)
    linked = (styles["mapping"], codes["decoder"])
    required = (styles["generator"], codes["prior"])
    aside = tmp_path / "aside"
    aside.mkdir()
    with (
        running_server(
            root, tmp_path / "server", extra_args=("--require-models", ",".join(required))
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):

        def statuses(names: tuple[str, ...]) -> list[int]:
            return [_health(channel, name) for name in names]

        def gauges() -> list[float]:
            """genserve_model_ready of the required models, which follows their keys."""
            scrape = server.metrics_text()
            return [metric_in(scrape, "genserve_model_ready", model=name, version="1") for name in required]

        stub = pb_grpc.GenerationServiceStub(channel)
        assert statuses(("", *required, *linked)) == [SERVING] * 5
        assert gauges() == [1.0, 1.0]
        for name in linked:
            (root / name).rename(aside / name)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: statuses(linked) == [NOT_SERVING] * 2, 60, "the linked models' removal")
        wait_until(lambda: statuses(("", *required)) == [NOT_SERVING] * 3, 10, "readiness to follow them")
        assert gauges() == [0.0, 0.0]
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Sample(pb.SampleRequest(model=styles["generator"], seeds=[1]), timeout=30)
        assert _error(excinfo)[0] == grpc.StatusCode.UNAVAILABLE
        for name in linked:
            (aside / name).rename(root / name)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: statuses(linked) == [SERVING] * 2, 60, "the linked models' return")
        wait_until(lambda: statuses(("", *required)) == [SERVING] * 3, 10, "readiness to follow them")
        assert gauges() == [1.0, 1.0]
        assert (
            len(stub.Sample(pb.SampleRequest(model=styles["generator"], seeds=[1]), timeout=30).images) == 1
        )
        assert (
            len(
                stub.SampleCodes(
                    pb.SampleCodesRequest(model=codes["prior"], seeds=[1], labels=[0]), timeout=30
                ).images
            )
            == 1
        )


def test_a_hot_reload_adding_a_style_generator_with_its_mapping_keeps_readiness_serving(
    tmp_path: Path,
) -> None:
    """A hot reload that adds a style generator and the mapping it names (a correct pair) loads them
    one after the other (sorted: style-gen before style-mapping). Once style-gen is loaded its key
    turns NOT_SERVING (its mapping has not been read yet), and "" (every model required, by default)
    counted it: the whole pod went NOT_SERVING, out of its Service with every other model, until the
    mapping had loaded, though neither model failed. A model a hot reload adds counts once it has been
    tried (docs/server.md): nor should a model count as failed only because the model it links to,
    added in the same reload, has not been tried yet."""
    root = tmp_path / "models"
    write_tiny_generator(root, "tiny-gen")
    staged = tmp_path / "staged"
    styles = write_style_models(staged)
    pair = (styles["generator"], styles["mapping"])
    with (
        running_server(root, tmp_path / "server") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert _health(channel, "") == SERVING
        seen: list[int] = []
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))

        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):
                for answer in watch:
                    seen.append(answer.status)

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        wait_until(lambda: seen == [SERVING], 10, "the watch's first answer")
        for name in pair:
            (staged / name).rename(root / name)
        server.proc.send_signal(signal.SIGHUP)

        def pair_serving() -> bool:
            try:
                return [_health(channel, n) for n in pair] == [SERVING] * 2
            except grpc.RpcError:  # NOT_FOUND until the rescan has read it
                return False

        wait_until(pair_serving, 60, "the pair to load")
        time.sleep(0.5)
        watch.cancel()
        follower.join(10)
        assert NOT_SERVING not in seen, f'"" went {seen} (1 = SERVING, 2 = NOT_SERVING) during the reload'


def test_kserve_model_ready_is_false_for_a_model_whose_linked_model_cannot_serve(
    served: tuple[ServerProcess, Path],
) -> None:
    """KServe ModelReady answered ready=true for a READY style generator whose mapping is missing or
    does not fit, and a READY code prior whose decoder is missing (it asked only "has a READY
    version"), while their health keys say NOT_SERVING and every call fails UNAVAILABLE: a Triton or
    KServe client routed traffic to them. With or without an explicit version it answers as the key."""
    server, _ = served
    with grpc.insecure_channel(server.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)

        def ready(name: str, version: str = "") -> bool:
            request = kpb.ModelReadyRequest(name=name, version=version)
            answer: bool = stub.ModelReady(request, timeout=10).ready
            return answer

        for name in ("style-gen", "prior", "orphan-chain"):
            assert ready(name) and ready(name, "1"), name
        for name in ("orphan-gen", "style-misfit", "orphan-prior"):
            assert _health(channel, name) == NOT_SERVING, name
            assert not ready(name), name
            assert not ready(name, "1"), name


def test_genserve_model_ready_is_0_for_a_model_whose_linked_model_cannot_serve(
    served: tuple[ServerProcess, Path],
) -> None:
    """genserve_model_ready said 1 for a READY style generator whose mapping is missing or does not
    fit, and a READY code prior whose decoder is missing, while every call of it failed UNAVAILABLE:
    GenserveModelNotReady ("its requests are answered UNAVAILABLE") never fired, and where the linked
    model had left the repository or loaded READY but did not fit, no alert named anything at all."""
    server, _ = served
    scrape = server.metrics_text()
    for name in ("style-gen", "prior", "orphan-chain"):
        assert metric_in(scrape, "genserve_model_ready", model=name, version="1") == 1, name
    for name in ("orphan-gen", "style-misfit", "orphan-prior"):
        assert f'genserve_model_ready{{model="{name}",version="1"}} 0.0' in scrape, name


def test_readiness_names_why_a_ready_model_whose_linked_model_cannot_serve_does_not_count(
    served: tuple[ServerProcess, Path],
) -> None:
    """ "" (every model required) is NOT_SERVING because of orphan-gen, style-misfit and orphan-prior,
    whose versions are READY: /healthz and the log said only "required models not ready: orphan-gen,
    ...", which GetModel (READY) seemed to contradict. It names why each of them does not serve."""
    server, _ = served
    url = f"http://127.0.0.1:{server.metrics_port}/healthz"
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(url, timeout=5)
    body = excinfo.value.read().decode()
    assert "orphan-gen (every request fails: its mapping no-such-mapping is not in the repository)" in body
    assert "orphan-prior (every request fails: its decoder no-such-decoder" in body, body


def test_genserve_model_ready_stays_0_when_a_draining_old_copy_of_the_model_unloads(tmp_path: Path) -> None:
    """A style generator's directory moved away and back while a SampleStream holds its old copy
    (draining), and its mapping removed meanwhile: the copy loaded again is READY, every call of it
    fails UNAVAILABLE and App sets its genserve_model_ready to 0. When the old copy's drain ended,
    reload._forget set the shared series to 1 again ("READY") and told nobody (the model object it
    drained is no longer the repository's), so the gauge said 1 for a model that serves nothing."""
    root = tmp_path / "models"
    styles = write_style_models(root)
    generator, mapping = styles["generator"], styles["mapping"]
    aside = tmp_path / "aside"
    aside.mkdir()
    config = {"drain_grace_s": 4.0}
    with (
        running_server(root, tmp_path / "server", config=config) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.GenerationServiceStub(channel)

        def gauge() -> float:
            return metric_in(server.metrics_text(), "genserve_model_ready", model=generator, version="1")

        def known(name: str) -> bool:
            try:
                stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return False
            return True

        # A stream that holds the first copy: read slowly, so that it never finishes here.
        stream = stub.SampleStream(
            pb.SampleStreamRequest(sample=pb.SampleRequest(model=generator, count=100000), chunk_size=1),
            timeout=120,
        )
        ended = threading.Event()

        def read_slowly() -> None:
            try:
                for _ in stream:
                    time.sleep(0.5)
            except grpc.RpcError:
                pass
            finally:
                ended.set()

        reader = threading.Thread(target=read_slowly, daemon=True)
        reader.start()
        wait_until(
            lambda: server.metric("genserve_requests_in_flight", method="SampleStream") == 1, 30, "the stream"
        )
        (root / generator).rename(aside / generator)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: not known(generator), 60, "the generator's removal (its copy drains)")
        (root / mapping).rename(aside / mapping)
        (aside / generator).rename(root / generator)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: known(generator) and not known(mapping), 60, "the generator's return")
        wait_until(
            lambda: _health(channel, generator) == NOT_SERVING and gauge() == 0.0, 30, "the new copy's gauge"
        )
        assert not ended.is_set(), "the stream ended before the old copy's drain: nothing was tested"
        # The old copy's drain ends (drain_grace_s): its batcher closes, then the copy is forgotten.
        wait_until(
            lambda: f"model {generator} version 1 unloaded" in server.log(), 30, "the old copy's unload"
        )
        time.sleep(0.5)
        assert _health(channel, generator) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.Sample(pb.SampleRequest(model=generator, seeds=[1]), timeout=30)
        assert _error(excinfo)[0] == grpc.StatusCode.UNAVAILABLE
        assert gauge() == 0.0, "genserve_model_ready says 1 for a generator whose every call fails"
        stream.cancel()
        reader.join(10)
