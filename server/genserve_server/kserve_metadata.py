"""KServe v2 model configuration and statistics, from genserve's config, card and metrics."""

from __future__ import annotations

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import model_config_pb2 as mc
from genserve_server.config import VersionPolicy
from genserve_server.infer_stats import Duration
from genserve_server.kserve_tensors import DTYPES, protocol_shape
from genserve_server.repository import ModelVersion

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def model_config(
    mv: ModelVersion, max_rows: int, policy: VersionPolicy | None = None, *, response_cache: bool = False
) -> mc.ModelConfig:
    """Triton's ModelConfig of a version, from its config.json and card.json; `max_rows`: the most
    rows a ModelInfer may carry (max_batch_size, or the server's per-request limit when lower; 0
    for a kind ModelInfer does not take: no dynamic batching then, and dims are whole shapes, batch
    axis included, as Triton reads a max_batch_size of 0); `policy`: the version policy the model's
    versions are picked by now (the last config.json a rescan applied; a version's own config is the
    one it loaded with, and an edit of it applies at the rescan), else the version's;
    `response_cache`: its Sample goes through the image cache (declared as Triton's response_cache,
    whose hits and misses ModelStatistics counts, so perf_analyzer reports them)."""
    card = mv.card
    assert card is not None
    cfg = mv.config
    batching = cfg.batching
    config = mc.ModelConfig(
        name=mv.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=max_rows,
        default_model_filename="model.fp16.onnx" if mv.precision == "fp16" else "model.onnx",
        dynamic_batching=mc.ModelDynamicBatching(
            # Triton: a preferred size is never above max_batch_size (the most rows one request may
            # carry here, which can be below config.json's batch limit).
            preferred_batch_size=[b for b in batching.preferred_batch_sizes if b <= max_rows],
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
    if response_cache:
        config.response_cache.enable = True
    if max_rows == 0:
        config.ClearField("dynamic_batching")
    first_dim = 0 if max_rows == 0 else 1  # Triton: dims leave out the batch axis when max_batch_size > 0
    policy = policy or cfg.version_policy
    if policy.specific is not None:
        config.version_policy.specific.versions.extend(int(v) for v in policy.specific)
    else:
        config.version_policy.latest.num_versions = policy.latest or 1
    for spec in card.inputs:
        entry = config.input.add(
            name=spec.name, data_type=DTYPES[spec.dtype][1], dims=protocol_shape(spec)[first_dim:]
        )
        if spec.name in ("z", "label") and card.kind.takes_latent:
            entry.optional = True  # may come as request parameters instead (module docstring)
        if len(spec.shape) == 4:
            entry.format = mc.ModelInput.FORMAT_NCHW
    for spec in card.outputs:
        config.output.add(
            name=spec.name, data_type=DTYPES[spec.dtype][1], dims=protocol_shape(spec)[first_dim:]
        )
    return config


def _duration(d: Duration) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=d.count, ns=d.ns)


def statistics(mv: ModelVersion) -> kpb.ModelStatistics:
    """Triton's statistics of a version, as counted per request and per execution (infer_stats.py):
    queue and compute per request sum to at most its duration; batch_stats count executions."""
    stats = mv.metrics.infer_stats
    return kpb.ModelStatistics(
        name=mv.name,
        version=mv.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=kpb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=_duration(stats.cache_hit),
            cache_miss=_duration(stats.cache_miss),
        ),
        batch_stats=[
            # genserve measures a batch's model call as one span: all of it is compute_infer.
            kpb.InferBatchStatistics(
                batch_size=size,
                compute_input=kpb.StatisticDuration(count=d.count),
                compute_infer=_duration(d),
                compute_output=kpb.StatisticDuration(count=d.count),
            )
            for size, d in sorted(stats.batches.items())
        ],
    )
