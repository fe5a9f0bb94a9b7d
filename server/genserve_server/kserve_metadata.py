"""KServe v2 model configuration and statistics, from genserve's config, card and metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from genserve_server.kserve_tensors import DTYPES, protocol_shape
from genserve_server.repository import ModelVersion
from inference import grpc_service_pb2 as kpb
from inference import model_config_pb2 as mc

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def model_config(mv: ModelVersion) -> mc.ModelConfig:
    """Triton's ModelConfig of a version, from its config.json and card.json."""
    card = mv.card
    assert card is not None
    cfg = mv.config
    batching = cfg.batching
    config = mc.ModelConfig(
        name=mv.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=batching.max_batch_size,
        default_model_filename="model.fp16.onnx" if mv.precision == "fp16" else "model.onnx",
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(batching.preferred_batch_sizes),
            max_queue_delay_microseconds=round(batching.max_queue_delay_ms * 1000),
            default_queue_policy=mc.ModelQueuePolicy(max_queue_size=batching.max_queue_size),
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{mv.name}-{mv.version}",
                count=cfg.instances,
                kind=mc.ModelInstanceGroup.KIND_GPU
                if mv.provider in GPU_PROVIDERS
                else mc.ModelInstanceGroup.KIND_CPU,
            )
        ],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=False),
    )
    policy = cfg.version_policy
    if policy.specific is not None:
        config.version_policy.specific.versions.extend(int(v) for v in policy.specific)
    else:
        config.version_policy.latest.num_versions = policy.latest or 1
    for spec in card.inputs:
        entry = config.input.add(
            name=spec.name, data_type=DTYPES[spec.dtype][1], dims=protocol_shape(spec)[1:]
        )
        if spec.name in ("z", "label") and card.kind.takes_latent:
            entry.optional = True  # may come as request parameters instead (module docstring)
        if len(spec.shape) == 4:
            entry.format = mc.ModelInput.FORMAT_NCHW
    for spec in card.outputs:
        config.output.add(name=spec.name, data_type=DTYPES[spec.dtype][1], dims=protocol_shape(spec)[1:])
    return config


def metric_totals(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """One pass over the registry: (sample name, model, version) -> value, summed over the other
    labels; `genserve_requests_total` split into `..._ok` and `..._failed` by code."""
    totals: dict[tuple[str, str, str], float] = {}
    wanted = {
        "genserve_images_total",
        "genserve_batch_size_count",
        "genserve_queue_duration_seconds_count",
        "genserve_queue_duration_seconds_sum",
        "genserve_compute_duration_seconds_count",
        "genserve_compute_duration_seconds_sum",
        "genserve_request_duration_seconds_count",
        "genserve_request_duration_seconds_sum",
        "genserve_decode_duration_seconds_sum",
        "genserve_batch_requests_sum",
    }
    for family in registry.collect():
        for sample in family.samples:
            name = sample.name
            model = sample.labels.get("model", "")
            version = sample.labels.get("version", "")
            if name == "genserve_requests_total":
                code = sample.labels.get("code")
                # NOT_FOUND: a version that does not exist, counted against the model's highest
                # version (core.resolve); Triton counts no inference for it.
                name += "_ok" if code == "OK" else "_not_found" if code == "NOT_FOUND" else "_failed"
            elif name not in wanted:
                continue
            key = (name, model, version)
            totals[key] = totals.get(key, 0.0) + float(sample.value)
    return totals


def statistics(
    mv: ModelVersion, totals: dict[tuple[str, str, str], float], last_inference_ms: int
) -> kpb.ModelStatistics:
    def value(name: str) -> float:
        return totals.get((name, mv.name, mv.version), 0.0)

    def duration(count: str, seconds: str) -> kpb.StatisticDuration:
        return kpb.StatisticDuration(count=int(value(count)), ns=int(value(seconds) * 1e9))

    ok = int(value("genserve_requests_total_ok"))
    failed = int(value("genserve_requests_total_failed"))
    # Durations are recorded per request, not per status code: split the total by count (the
    # count includes the NOT_FOUND requests, which get no share).
    all_requests = value("genserve_request_duration_seconds_count")
    total_ns = value("genserve_request_duration_seconds_sum") * 1e9
    ok_ns = int(total_ns * ok / all_requests) if all_requests else 0
    failed_ns = int(total_ns * failed / all_requests) if all_requests else 0
    # Triton counts compute per request (each request is charged its batch's time) and
    # perf_analyzer wants the three compute counts equal. genserve measures compute per batch:
    # charge each request the mean batch time, times the batches it took part in.
    batches = value("genserve_compute_duration_seconds_count")
    mean_batch_s = value("genserve_compute_duration_seconds_sum") / batches if batches else 0.0
    memberships = value("genserve_batch_requests_sum")
    return kpb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=last_inference_ms,
        inference_count=int(value("genserve_images_total")),
        execution_count=int(batches),
        inference_stats=kpb.InferStatistics(
            success=kpb.StatisticDuration(count=ok, ns=ok_ns),
            fail=kpb.StatisticDuration(count=failed, ns=failed_ns),
            queue=duration("genserve_queue_duration_seconds_count", "genserve_queue_duration_seconds_sum"),
            compute_input=kpb.StatisticDuration(
                count=ok, ns=int(value("genserve_decode_duration_seconds_sum") * 1e9)
            ),
            compute_infer=kpb.StatisticDuration(count=ok, ns=int(mean_batch_s * memberships * 1e9)),
            compute_output=kpb.StatisticDuration(count=ok),
            cache_hit=kpb.StatisticDuration(),
            cache_miss=kpb.StatisticDuration(),
        ),
    )
