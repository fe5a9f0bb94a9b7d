"""A running server's /metrics agrees with the traffic sent, and exports every name deploy/ uses."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import grpc
import pytest
from monitoring_support import (
    CODE_PRIOR_METRICS,
    GPU_METRICS,
    PROMETHEUS_SYNTHETIC,
    TINY_MAX_BATCH,
    TINY_MODEL,
    TLS_METRICS,
    MonitoredServer,
    Scrape,
    contract_metrics,
    dashboard_exprs,
    drive_sample_traffic,
    metric_names,
    rule_exprs,
    scrape,
    start_server,
)
from prometheus_client import CollectorRegistry

from genserve.v1 import genserve_pb2, genserve_pb2_grpc
from genserve_server.gpu_metrics import register_gpu_collector

TINY = {"model": TINY_MODEL, "version": "1"}


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def gpu_present() -> bool:
    collector = register_gpu_collector(CollectorRegistry())
    if collector is None:
        return False
    collector.close()
    return True


def test_counters_and_histograms_agree_with_the_traffic_sent(monitored_server: MonitoredServer) -> None:
    url = monitored_server.metrics_url()
    before = scrape(url)
    counts = [1, 2, 3, 4, 5, 6, 7, 8] * 6  # 48 requests, 216 images, each fits one batch
    stats = drive_sample_traffic(monitored_server.target, counts, concurrency=8)
    invalid = drive_sample_traffic(monitored_server.target, [100_000] * 3, concurrency=1)  # count > limit

    # A refused call is counted as its handler ends, after its client has the status (grpc.aio's
    # abort sends it, then raises through the handler): the last refusal's count can miss a scrape
    # taken at once. Take "after" once every call sent is counted (or 10 s have passed).
    def counted(after: Scrape) -> float:  # the Sample RPCs in both the counter and the histogram
        return min(
            delta(after, before, name, method="Sample")
            for name in ("genserve_requests_total", "genserve_request_duration_seconds_count")
        )

    after = scrape(url)
    settle_deadline = time.monotonic() + 10
    while counted(after) < len(counts) + 3 and time.monotonic() < settle_deadline:
        time.sleep(0.05)
        after = scrape(url)

    assert stats.codes == {"OK": len(counts)}, stats.codes
    assert invalid.codes == {"INVALID_ARGUMENT": 3}, invalid.codes
    images = sum(counts)
    assert stats.ok_images == images

    # Requests by method and code.
    assert delta(after, before, "genserve_requests_total", **TINY, method="Sample", code="OK") == len(counts)
    assert delta(after, before, "genserve_requests_total", method="Sample", code="INVALID_ARGUMENT") == 3
    assert delta(after, before, "genserve_requests_rejected_total", reason="invalid") == 3
    # End-to-end latency: one observation per finished RPC, whatever its code.
    sample_rpcs = delta(after, before, "genserve_requests_total", method="Sample")
    assert sample_rpcs == len(counts) + 3
    assert delta(after, before, "genserve_request_duration_seconds_count", method="Sample") == sample_rpcs
    assert (
        delta(after, before, "genserve_request_duration_seconds_bucket", method="Sample", le="+Inf")
        == sample_rpcs
    )
    assert delta(after, before, "genserve_request_duration_seconds_sum", **TINY, method="Sample") > 0

    # Images and batches: every image computed once, in batches of at most max_batch_size.
    assert delta(after, before, "genserve_images_total", **TINY) == images
    assert delta(after, before, "genserve_batch_size_sum", **TINY) == images
    batches = delta(after, before, "genserve_batch_size_count", **TINY)
    # A batch that closes short of max_batch_size took every row queued, so it finishes each request in
    # it; only full batches can leave a request for later (fair shares split several at once).
    assert math.ceil(images / TINY_MAX_BATCH) <= batches <= len(counts) + images // TINY_MAX_BATCH
    assert delta(after, before, "genserve_batch_size_bucket", **TINY, le="+Inf") == batches
    assert (
        delta(after, before, "genserve_batch_size_bucket", **TINY, le=f"{float(TINY_MAX_BATCH)}") == batches
    )
    assert delta(after, before, "genserve_compute_duration_seconds_count", **TINY) == batches
    # Each request is in at least one batch, each batch holds at least one request, and a request is
    # counted once per batch it has rows in: never more than its rows (fair shares may give it one row
    # of each of several batches).
    requests_per_batch_sum = delta(after, before, "genserve_batch_requests_sum", **TINY)
    assert max(len(counts), batches) <= requests_per_batch_sum <= images
    assert delta(after, before, "genserve_batch_requests_count", **TINY) == batches
    assert delta(after, before, "genserve_queue_duration_seconds_count", **TINY, lane="interactive") >= len(
        counts
    )
    assert delta(after, before, "genserve_queue_duration_seconds_count", **TINY, lane="bulk") == 0
    assert delta(after, before, "genserve_encode_duration_seconds_count", **TINY, format="raw_uint8") == len(
        counts
    )

    # Gauges at rest, readiness and load time.
    assert after.value("genserve_queue_depth", **TINY) == 0
    assert after.value("genserve_requests_in_flight", method="Sample") == 0
    assert after.value("genserve_model_ready", **TINY) == 1
    assert after.value("genserve_model_load_duration_seconds", **TINY) > 0
    assert delta(after, before, "genserve_batch_failures_total", **TINY) == 0
    assert delta(after, before, "genserve_requests_dropped_total", **TINY) == 0


def test_families_have_contract_types_and_labels(monitored_server: MonitoredServer) -> None:
    drive_sample_traffic(monitored_server.target, [1])
    current = scrape(monitored_server.metrics_url())
    exposition_type = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}
    for name, metric in contract_metrics().items():
        if name in GPU_METRICS or name in TLS_METRICS or name in CODE_PRIOR_METRICS:
            continue
        family = name.removesuffix("_total") if metric.type == "counter" else name
        assert current.family_types.get(family) == exposition_type[metric.type], name
        sample_name = name + ("_count" if metric.type == "histogram" else "")
        label_sets = [dict(items) for n, items in current.samples if n == sample_name]
        assert label_sets, f"{name}: no series exported"
        for labels in label_sets:
            labels.pop("le", None)
            assert set(labels) == set(metric.labels), f"{name}: labels {sorted(labels)} != {metric.labels}"


def test_every_metric_name_of_dashboard_and_rules_is_exported(monitored_server: MonitoredServer) -> None:
    drive_sample_traffic(monitored_server.target, [1, 2])
    exported = scrape(monitored_server.metrics_url()).names()
    used = {name for expr in dashboard_exprs() + rule_exprs() for name in metric_names(expr.promql)}
    used -= PROMETHEUS_SYNTHETIC
    has_gpu = gpu_present()
    absent = used - exported - TLS_METRICS - CODE_PRIOR_METRICS
    missing = sorted(n for n in absent if has_gpu or n not in GPU_METRICS)
    assert not missing, f"used in deploy/ but not exported by the running server: {missing}"
    if has_gpu:
        assert GPU_METRICS <= exported
    else:
        assert not GPU_METRICS & exported, "GPU series must be absent without a GPU"
        assert not any(
            line.startswith("genserve_gpu_")
            for line in scrape(monitored_server.metrics_url()).text.splitlines()
        )


def test_request_id_comes_back_in_trailing_metadata(monitored_server: MonitoredServer) -> None:
    with grpc.insecure_channel(monitored_server.target) as channel:
        stub = genserve_pb2_grpc.GenerationServiceStub(channel)
        request = genserve_pb2.SampleRequest(model=TINY_MODEL, count=1, base_seed=1)
        _, call = stub.Sample.with_call(
            request, metadata=(("x-request-id", "monitoring-test-42"),), timeout=30
        )
        assert ("x-request-id", "monitoring-test-42") in tuple(call.trailing_metadata() or ())
        _, call = stub.Sample.with_call(request, timeout=30)
        made = dict(call.trailing_metadata() or ()).get("x-request-id")
        assert made, "the server makes a request id when the caller sends none"
        # Errors carry it too.
        with pytest.raises(grpc.RpcError) as info:
            stub.Sample(
                genserve_pb2.SampleRequest(model="no-such-model", count=1),
                metadata=(("x-request-id", "monitoring-test-err"),),
                timeout=30,
            )
        assert ("x-request-id", "monitoring-test-err") in tuple(info.value.trailing_metadata() or ())


def test_json_logs_have_a_line_per_request_and_per_batch(monitoring_models: Path, tmp_path: Path) -> None:
    server = start_server(monitoring_models, tmp_path, extra_args=("--log-json", "--log-level", "DEBUG"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = genserve_pb2_grpc.GenerationServiceStub(channel)
            stub.Sample(
                genserve_pb2.SampleRequest(model=TINY_MODEL, count=3, base_seed=7),
                metadata=(("x-request-id", "log-line-check"),),
                timeout=30,
            )
    finally:
        server.stop()
    records = []
    for line in server.log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, "--log-json must write JSON lines"
    text = [json.dumps(r) for r in records]
    request_lines = [t for t in text if "log-line-check" in t]
    assert request_lines, "a request's log line carries its request id"
    assert any("batch" in t.lower() and TINY_MODEL in t for t in text), "one line per batch"


def test_model_level_series_exist_only_for_loaded_models(monitored_server: MonitoredServer) -> None:
    # RPCs that never resolved a model are counted under model="" (genserve_requests_total,
    # genserve_request_duration_seconds), but a phantom model="" must not report readiness, a
    # queue or a load time: genserve_model_ready{model=""} == 0 would fire GenserveModelNotReady.
    current = scrape(monitored_server.metrics_url())
    for name in ("genserve_model_ready", "genserve_model_load_duration_seconds", "genserve_queue_depth"):
        models = {dict(items).get("model") for n, items in current.samples if n == name}
        assert models == {TINY_MODEL}, f"{name} has series for models {models}"


def test_no_created_series_and_the_runtime_info_of_the_loaded_model(
    monitored_server: MonitoredServer,
) -> None:
    current = scrape(monitored_server.metrics_url())
    assert not [n for n, _ in current.samples if n.endswith("_created")]
    runtime = [dict(items) for n, items in current.samples if n == "genserve_model_runtime_info"]
    assert [(r["model"], r["provider"]) for r in runtime] == [(TINY_MODEL, "CPUExecutionProvider")]
    assert runtime[0]["gpu_requested"] in {"true", "false"} and runtime[0]["precision"] == "fp32"
    # The tiny model computes in microseconds: "auto" leaves its batches at max_batch_size.
    rows = [
        (dict(items)["model"], v)
        for (n, items), v in current.samples.items()
        if n == "genserve_batch_max_rows"
    ]
    assert rows == [(TINY_MODEL, TINY_MAX_BATCH)]
    assert "genserve_build_info" in current.names()
