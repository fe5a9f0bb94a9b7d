"""Which series the server binds (issue 16: ~3.2k series per pod for 7 models): no `_created`
series, latency histograms only for the methods a model's kind serves, and the runtime info gauge."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from server_support import write_tiny_generator

from genserve_server import kserve, service
from genserve_server import metrics as metrics_module
from genserve_server.config import KINDS, SAMPLE_KINDS, ServerConfig
from genserve_server.metrics import KIND_METHODS, METHODS, Metrics
from genserve_server.repository import Repository


def exposition(metrics: Metrics) -> list[str]:
    return [line for line in generate_latest(metrics.registry).decode().splitlines() if line[:1] != "#"]


def duration_methods(lines: list[str], model: str) -> set[str]:
    prefix = "genserve_request_duration_seconds_count{"
    found = set()
    for line in lines:
        if line.startswith(prefix) and f'model="{model}"' in line:
            found.add(line.split('method="', 1)[1].split('"', 1)[0])
    return found


def test_no_created_series() -> None:
    metrics = Metrics()
    mm = metrics.for_model("gen", "1", 8, "generator")
    mm.request_done("Sample", "OK", 0.01)
    lines = exposition(metrics)
    assert any(line.startswith("genserve_requests_total{") for line in lines)
    assert not [line for line in lines if "_created" in line.split("{", 1)[0]]


def test_latency_histograms_only_for_the_methods_a_kind_serves() -> None:
    metrics = Metrics()
    metrics.for_model("sr", "1", 16, "super_resolution")
    metrics.for_model("gen", "1", 16, "generator")
    lines = exposition(metrics)
    assert duration_methods(lines, "sr") == {"SuperResolve", "ModelInfer"}
    assert duration_methods(lines, "gen") == {"Sample", "SampleStream", "Interpolate", "Decode", "ModelInfer"}
    # RPCs that resolved no model keep every method (ListModels, GetModel, refused calls).
    metrics.unresolved()
    assert duration_methods(exposition(metrics), "") == set(METHODS)


def test_encode_histograms_only_for_kinds_that_encode_images() -> None:
    metrics = Metrics()
    for name, kind in (("enc", "vae_encoder"), ("gen", "generator"), ("sr", "super_resolution")):
        metrics.for_model(name, "1", 8, kind)
    lines = exposition(metrics)

    def has(family: str, model: str) -> bool:
        return any(line.startswith(family + "{") and f'model="{model}"' in line for line in lines)

    assert not has("genserve_encode_duration_seconds_count", "enc")  # Encode answers latents
    assert has("genserve_encode_duration_seconds_count", "gen")
    assert has("genserve_encode_duration_seconds_count", "sr")


def test_the_step_gauge_exists_only_for_code_priors() -> None:
    """genserve_step_running_rows is a code prior's running set: the dashboard's "Code priors" row
    (running rows, steps/s, rows per step, join wait) shows the models that have this series, so a
    generator, a decoder or a super-resolution model exporting it at 0 showed up there too, its
    batches as 'steps' and its queue wait as a 'join wait'."""
    metrics = Metrics()
    kinds = {"prior": "code_prior", "gen": "generator", "dec": "code_decoder", "sr": "super_resolution"}
    for name, kind in kinds.items():
        metrics.for_model(name, "1", 8, kind)
    lines = [line for line in exposition(metrics) if line.startswith("genserve_step_running_rows{")]
    assert lines == ['genserve_step_running_rows{model="prior",version="1"} 0.0']


def test_a_method_outside_the_kind_is_still_recorded_when_it_happens() -> None:
    metrics = Metrics()
    mm = metrics.for_model("sr", "1", 16, "super_resolution")
    mm.request_done("Sample", "INVALID_ARGUMENT", 0.002)
    assert "Sample" in duration_methods(exposition(metrics), "sr")


def test_kind_methods_cover_every_kind_and_follow_the_service() -> None:
    assert set(KIND_METHODS) == set(KINDS)
    for kind, methods in KIND_METHODS.items():
        assert set(methods) <= set(METHODS), kind
        # The kind lists the servicers resolve with (a wrong kind is refused, counted under the model).
        assert ("Sample" in methods) == (kind in SAMPLE_KINDS), kind
        assert ("MixStyles" in methods) == (kind == "style_generator"), kind
        assert ("Decode" in methods) == (kind in service.DECODE_KINDS), kind
        assert ("ModelInfer" in methods) == (kind in kserve.INFER_KINDS), kind


def test_runtime_info_says_what_a_version_runs_on_and_goes_with_it() -> None:
    metrics = Metrics()
    mm = metrics.for_model("gen", "1", 8, "generator")
    mm.set_runtime("CPUExecutionProvider", "fp32", gpu_requested=True, batch_max_rows=2)
    line = 'genserve_model_runtime_info{gpu_requested="true",model="gen",precision="fp32",'
    line += 'provider="CPUExecutionProvider",version="1"} 1.0'
    assert line in exposition(metrics)
    assert 'genserve_batch_max_rows{model="gen",version="1"} 2.0' in exposition(metrics)
    # Loaded again on a config without a GPU provider: the one series says so.
    mm.set_runtime("CPUExecutionProvider", "fp32", gpu_requested=False, batch_max_rows=2)
    runtime = [x for x in exposition(metrics) if x.startswith("genserve_model_runtime_info")]
    assert runtime == [line.replace('gpu_requested="true"', 'gpu_requested="false"')]
    mm.clear_runtime()
    assert not [x for x in exposition(metrics) if x.startswith("genserve_model_runtime_info")]
    assert not [x for x in exposition(metrics) if x.startswith("genserve_batch_max_rows{")]
    assert [x for x in exposition(metrics) if x.startswith("genserve_build_info{")]


def test_forgetting_one_copy_of_a_version_leaves_the_series_a_live_copy_shares() -> None:
    """Two objects of one (model, version) (a model directory moved away and back while its old copy
    drained) bind the same children: forgetting the old copy removes only its runtime_info labels
    the new copy does not share; forgetting the last copy removes everything."""
    metrics = Metrics()
    old = metrics.for_model("gen", "1", 8, "generator")
    old.set_runtime("CUDAExecutionProvider", "fp16", gpu_requested=True, batch_max_rows=8)
    new = metrics.for_model("gen", "1", 8, "generator")
    new.set_runtime("CPUExecutionProvider", "fp32", gpu_requested=True, batch_max_rows=2)
    new.ready.set(1)

    def lines(family: str) -> list[str]:
        return [x for x in exposition(metrics) if x.startswith(family + "{")]

    metrics.forget_version(old, [new])
    assert lines("genserve_model_ready") == ['genserve_model_ready{model="gen",version="1"} 1.0']
    assert lines("genserve_batch_max_rows") == ['genserve_batch_max_rows{model="gen",version="1"} 2.0']
    assert [x for x in lines("genserve_model_runtime_info") if "CPUExecutionProvider" in x]
    assert not [x for x in lines("genserve_model_runtime_info") if "CUDAExecutionProvider" in x]
    new.step_running_rows.set(3)  # a code prior's running set
    metrics.forget_version(new)
    gone = ("genserve_model_ready", "genserve_batch_max_rows", "genserve_model_runtime_info")
    for family in (*gone, "genserve_step_running_rows", "genserve_queue_depth"):
        assert lines(family) == [], family


def test_a_version_is_loading_until_its_load_ends_ready_or_failed(tmp_path: Path) -> None:
    """genserve_model_loading tells a version that is not ready yet from one that failed: 1 from its
    registration until its load ends, then 0 whether it became READY or UNAVAILABLE (so
    GenserveModelNotReady waits out a long load, e.g. a TensorRT engine build)."""
    write_tiny_generator(tmp_path, "good")
    broken = write_tiny_generator(tmp_path, "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")

    def loading() -> dict[str, str]:
        rows = [x for x in exposition(metrics) if x.startswith("genserve_model_loading{")]
        return {row.split('model="')[1].split('"')[0]: row.rsplit(" ", 1)[1] for row in rows}

    metrics = Metrics()
    repo = Repository(tmp_path, ServerConfig(), metrics)
    repo.scan()
    assert loading() == {"good": "1.0", "broken": "1.0"}

    async def load() -> None:
        await repo.load_all()
        assert loading() == {"good": "0.0", "broken": "0.0"}
        assert repo.get("good").versions["1"].state.name == "READY"
        assert repo.get("broken").versions["1"].state.name == "UNAVAILABLE"
        await repo.close(1)

    asyncio.run(asyncio.wait_for(load(), 60))


def test_a_version_skipped_by_a_shutdown_during_start_up_is_not_left_loading(tmp_path: Path) -> None:
    """SIGTERM during start-up (cancel_loading) skips the versions not begun: they are not loading
    any more (the gauge stayed 1 through the drain, which kept GenserveModelNotReady quiet)."""
    write_tiny_generator(tmp_path, "good")
    metrics = Metrics()
    repo = Repository(tmp_path, ServerConfig(), metrics)
    repo.scan()
    repo.cancel_loading()

    async def load() -> None:
        await repo.load_all()
        await repo.close(1)

    asyncio.run(asyncio.wait_for(load(), 60))
    rows = [x for x in exposition(metrics) if x.startswith("genserve_model_loading{")]
    assert rows == ['genserve_model_loading{model="good",version="1"} 0.0'], rows


def test_an_unloaded_version_leaves_no_series_behind() -> None:
    """A server that runs for weeks loads a new version at every deploy: each version's ~300 series
    (request counters, latency, queue, compute, encode and batch histograms, drops, rejections)
    stayed in /metrics after it unloaded, so a model deployed daily for a month exported ~9k dead
    series. Once its last copy is forgotten, nothing of (model, version) is left; another version
    of the model, other models and the model="" series keep theirs."""
    metrics = Metrics()
    old = metrics.for_model("gen", "1", 8, "generator")
    new = metrics.for_model("gen", "2", 8, "generator")
    other = metrics.for_model("other", "1", 8, "generator")
    unresolved = metrics.unresolved()
    for mm in (old, new, other, unresolved):
        mm.request_done("Sample", "OK", 0.01)
        mm.request_done("Sample", "CANCELLED", 0.01)
        mm.request_done("GetModel", "OK", 0.01)  # a method outside the kind, bound on first use
        mm.rejected["queue_full"].inc()
    for mm in (old, new, other):
        mm.set_runtime("CPUExecutionProvider", "fp32", gpu_requested=False, batch_max_rows=8)
        mm.dropped["cancelled"].inc()
        mm.closed["window"].inc()
        mm.images.inc(3)
        mm.batch_size.observe(3)
        mm.batch_requests.observe(2)
        mm.compute_duration.observe(0.01)
        mm.queue_duration[0].observe(0.01)
        mm.encode_duration["png"].observe(0.01)
        mm.cache_hits.inc()

    def of(model: str, version: str) -> list[str]:
        return [x for x in exposition(metrics) if f'model="{model}"' in x and f'version="{version}"' in x]

    kept = {key: len(of(*key)) for key in (("gen", "2"), ("other", "1"), ("", ""))}
    assert of("gen", "1")
    metrics.forget_version(old)
    assert of("gen", "1") == []
    assert {key: len(of(*key)) for key in kept} == kept
    # A call of the unloaded version that ends after it (the drain grace ran out) adds no series back.
    old.request_done("Sample", "UNAVAILABLE", 0.01)
    assert of("gen", "1") == []
    # Nor one of a method it had no latency histogram for (bound on first use, Metrics.child).
    old.request_done("Encode", "UNAVAILABLE", 0.01)
    assert of("gen", "1") == []
    labelled = {
        f.describe()[0].name
        for f in vars(metrics).values()
        if isinstance(f, MetricWrapperBase) and {"model", "version"} <= set(f._labelnames)
    }
    assert {f.describe()[0].name for f in metrics.version_families()} == labelled


def test_an_unloaded_versions_counts_stay_for_a_scrape_then_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its series went the moment the version unloaded, so the counts it made since the last scrape
    were never scraped (a deploy lost the old version's last seconds of traffic from every rate and
    increase; the chaos storm's clients saw 739 Sample OKs where the server counted 502). Its
    counters and histograms stay SERIES_GRACE_S for Prometheus to scrape, its gauges (ready, queue
    depth, ...) go at once; a copy of the same version loaded again meanwhile keeps them."""
    monkeypatch.setattr(metrics_module, "SERIES_GRACE_S", 0.05)

    async def scenario() -> None:
        metrics = Metrics()

        def of(name: str) -> list[str]:
            return [x for x in exposition(metrics) if x.startswith(name) and 'version="1"' in x]

        old = metrics.for_model("gen", "1", 8, "generator")
        old.request_done("Sample", "OK", 0.01)
        old.ready.set(1)
        metrics.forget_version(old)
        assert of("genserve_model_ready") == []  # a gauge: at once
        old.request_done("Sample", "UNAVAILABLE", 0.01)  # a call that outlasted the drain grace
        assert len(of("genserve_requests_total")) == 2
        await asyncio.sleep(0.2)
        assert of("genserve_requests_total") == []

        again = metrics.for_model("gen", "2", 8, "generator")
        again.request_done("Sample", "OK", 0.01)
        metrics.forget_version(again)
        back = metrics.for_model("gen", "2", 8, "generator")  # the version loaded again meanwhile
        await asyncio.sleep(0.2)
        assert [
            x for x in exposition(metrics) if x.startswith("genserve_requests_total") and 'version="2"' in x
        ]
        back.request_done("Sample", "OK", 0.01)

    asyncio.run(scenario())


class VirtualTimers:
    """The running loop's call_later, on a clock the test moves: what is due runs in the order of
    its time when the test says the time has come, however late a loaded machine runs the loop."""

    def __init__(self) -> None:
        self.now = 0.0
        self._due: list[tuple[float, int, Callable[..., object], tuple[object, ...]]] = []

    def call_later(self, delay: float, callback: Callable[..., object], *args: object) -> None:
        self._due.append((self.now + delay, len(self._due), callback, args))

    def advance_to(self, moment: float) -> None:
        while due := sorted(entry for entry in self._due if entry[0] <= moment):
            self._due.remove(due[0])
            self.now = due[0][0]
            due[0][2](*due[0][3])
        self.now = moment


def test_a_version_unloaded_again_keeps_its_counts_a_full_grace_after_its_last_unload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 1 unloads, loads again (a rollback) and unloads again within SERIES_GRACE_S: the first
    unload's removal must not take the counts of the second copy a moment after its unload; they
    stay SERIES_GRACE_S after the last one."""
    grace_s = metrics_module.SERIES_GRACE_S
    timers = VirtualTimers()

    async def scenario() -> None:
        monkeypatch.setattr(asyncio.get_running_loop(), "call_later", timers.call_later)
        metrics = Metrics()

        def counted() -> list[str]:
            lines = exposition(metrics)
            return [x for x in lines if x.startswith("genserve_requests_total") and 'version="1"' in x]

        first = metrics.for_model("gen", "1", 8, "generator")
        metrics.forget_version(first)  # t = 0: removal due at grace_s
        timers.advance_to(grace_s / 4)
        second = metrics.for_model("gen", "1", 8, "generator")  # loaded again
        timers.advance_to(grace_s * 3 / 4)
        second.request_done("Sample", "OK", 0.01)
        metrics.forget_version(second)  # its counts stay until 1.75 grace_s
        timers.advance_to(grace_s * 5 / 4)  # the first unload's removal is past due
        assert counted(), "the second copy's counts went half a grace after its unload, not SERIES_GRACE_S"
        timers.advance_to(grace_s * 7 / 4 - 1e-6)
        assert counted(), "the second copy's counts went before SERIES_GRACE_S had passed"
        timers.advance_to(grace_s * 7 / 4)
        assert counted() == []

    asyncio.run(scenario())


def test_versions_loaded_and_unloaded_leave_no_bookkeeping_behind() -> None:
    """A server that loads a new version at every deploy (or a version that loads, fails and is
    removed, again and again) keeps no entry per (model, version) once each copy is forgotten and
    its counts removed: after N such versions the metrics' bookkeeping is as it was."""
    metrics = Metrics(enabled=False)  # no loop, no exposition: only what for_model/forget_version keep
    baseline = (len(metrics._copies), len(metrics._unloads))
    for version in range(1, 201):
        mm = metrics.for_model("gen", str(version), 8, "generator")
        mm.request_done("Sample", "OK", 0.01)
        metrics.forget_version(mm)
    assert (len(metrics._copies), len(metrics._unloads)) == baseline
    enabled = Metrics()
    baseline = (len(enabled._copies), len(enabled._unloads))
    for version in range(1, 201):  # no running loop: the counts go at once
        enabled.forget_version(enabled.for_model("gen", str(version), 8, "generator"))
    assert (len(enabled._copies), len(enabled._unloads)) == baseline


class _CountingSeries(dict):  # type: ignore[type-arg]
    """A family's children, counting the walks through all of them (remove_by_labels' scan)."""

    walks = 0

    def keys(self):  # type: ignore[no-untyped-def,override]
        _CountingSeries.walks += 1
        return super().keys()

    def __iter__(self):  # type: ignore[no-untyped-def]
        _CountingSeries.walks += 1
        return super().__iter__()


def test_unloading_a_version_among_many_removes_its_series_without_walking_the_others() -> None:
    """An operator with hundreds of models: each version's unload walked every series of every
    version family (prometheus_client's remove_by_labels) on the event loop, so removing 280 of 300
    models cost 280 walks over ~300 versions' series each (quadratic; seconds of a blocked loop).
    Its own series go by their labels; the other versions' stay."""
    metrics = Metrics()
    versions = [metrics.for_model(f"m{i:03d}", "1", 8, "generator") for i in range(50)]
    for mm in versions:
        mm.request_done("Sample", "OK", 0.01)
        mm.set_runtime("CPUExecutionProvider", "fp32", gpu_requested=False, batch_max_rows=8)
    for family in metrics.version_families():
        family._metrics = _CountingSeries(family._metrics)
    _CountingSeries.walks = 0
    metrics.forget_version(versions[7])  # no running loop: its counts go at once too
    assert _CountingSeries.walks == 0
    lines = exposition(metrics)
    assert not [x for x in lines if 'model="m007"' in x]
    for family in ("genserve_requests_total", "genserve_model_runtime_info", "genserve_model_ready"):
        assert [x for x in lines if x.startswith(family + "{") and 'model="m008"' in x], family


def test_build_info_names_the_server_version_when_the_package_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server run from a checkout on PYTHONPATH (tests, bench) has no genserve-server distribution:
    build_info still says its version (genserve_server.version), not "unknown"."""
    import importlib.metadata

    from genserve_server.version import SERVER_VERSION

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name.startswith("genserve-server"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    lines = [x for x in exposition(Metrics()) if x.startswith("genserve_build_info{")]
    assert len(lines) == 1 and f'version="{SERVER_VERSION}"' in lines[0], lines
