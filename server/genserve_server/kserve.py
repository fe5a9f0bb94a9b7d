"""The KServe v2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`) over genserve.

Served beside genserve.v1 on the same port, over the same repository, batchers and metrics, so
tritonclient, perf_analyzer and other KServe v2 clients work unchanged (docs/kserve.md).

ModelInfer goes through the genserve.v1 servicer's boundary (`GenerationService._unary`: request
id, in-flight gauge, `genserve_requests_total{method="ModelInfer"}`, one error translation) and
its validators (`_resolve`, `_count`, `_latent_tensor`, `_labels`, `_check_send_size`), then
submits to the model version's batcher like every genserve.v1 RPC. What it adds is only the
tensor mapping:

- generator / vae_decoder / conditional_generator: input `z` FP32 [N, Z], or no `z` and request
  parameters `seed` (int64, image i uses seed + i, the same latents as genserve.v1's base_seed),
  `count` (int64, default 1) and `truncation_psi` (double); without `z` and `seed` the server picks
  a random seed and returns it as the response parameter `seed`. Conditional models take `label`
  INT64 [N, 1] (metadata [-1, 1], config dims [1]; [N] works too) as an input, or one `label`
  parameter (int64) for every image;
- super_resolution / image_to_image / vae_encoder: input `image` FP32 [N, C, H, W] in the model's
  input range (card.json `input_range`): raw tensors, no tiling, padding or resizing, so H and W
  must already be multiples of the card's `size_multiple` (and the fixed size for an encoder);
- outputs are the card's output tensors (`image`, `output_image`, `mu`/`logvar`) as FP32 in
  `raw_output_contents`, values in the card's `output_range`.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from genserve.v1 import types_pb2 as tpb
from genserve_server import latents
from genserve_server.batcher import Lane
from genserve_server.config import KINDS, LATENT_KINDS, Card, TensorSpec
from genserve_server.errors import GenserveError, NotFound, invalid
from genserve_server.repository import Model, ModelState, ModelVersion, Repository
from genserve_server.service import (
    SEED_LIMIT,
    SERVER_VERSION,
    Call,
    Context,
    GenerationService,
    check_input_range,
)
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc as kpb_grpc
from inference import model_config_pb2 as mc

logger = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ("model_configuration", "statistics")
# card dtype -> (protocol datatype, config DataType, numpy little-endian dtype)
DTYPES: dict[str, tuple[str, int, str]] = {
    "float32": ("FP32", mc.TYPE_FP32, "<f4"),
    "float16": ("FP16", mc.TYPE_FP16, "<f2"),
    "int64": ("INT64", mc.TYPE_INT64, "<i8"),
}
# InferTensorContents field per protocol datatype, for clients that send typed contents.
CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

Resp = TypeVar("Resp")


def _datatype(spec: TensorSpec) -> str:
    return DTYPES.get(spec.dtype, ("FP32", mc.TYPE_FP32, "<f4"))[0]


def _shape(spec: TensorSpec) -> list[int]:
    """The protocol shape of a card tensor, batch axis first. A batch-only tensor (card shape [-1],
    e.g. `label`) is [-1, 1]: Triton's config needs non-empty dims after the batch axis, and
    perf_analyzer cannot set a shape from empty dims."""
    return list(spec.shape) if len(spec.shape) > 1 else [*spec.shape[:1], 1]


def _param_int(params: Any, name: str) -> int | None:
    """An integer request parameter (int64_param or uint64_param), or None when absent."""
    if name not in params:
        return None
    param = params[name]
    choice = param.WhichOneof("parameter_choice")
    if choice == "int64_param":
        return int(param.int64_param)
    if choice == "uint64_param":
        return int(param.uint64_param)
    raise invalid(f"parameters[{name}]", f"must be an int64 parameter, got {choice or 'nothing'}")


def _param_float(params: Any, name: str) -> float | None:
    if name not in params:
        return None
    param = params[name]
    choice = param.WhichOneof("parameter_choice")
    if choice == "double_param":
        return float(param.double_param)
    if choice in ("int64_param", "uint64_param"):
        return float(getattr(param, choice))
    raise invalid(f"parameters[{name}]", f"must be a double parameter, got {choice or 'nothing'}")


class InferenceService(kpb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on genserve's repository and batchers."""

    def __init__(
        self, repository: Repository, generation: GenerationService, registry: CollectorRegistry
    ) -> None:
        self.repo = repository
        self.gen = generation
        self.limits = generation.limits
        self.registry = registry
        # (model, version) -> ms since the epoch of the last successful ModelInfer.
        self._last_inference_ms: dict[tuple[str, str], int] = {}
        # Startup loading is finished once the repository has announced every model, which
        # `load_all` does after loading each one's versions; main.py sets grpc.health "" SERVING
        # right after that. Latched, so that a hot reload loading a version does not undo it.
        self._announced: set[str] = set()
        self._loaded = False
        repository.add_listener(self._on_model_state)

    def _on_model_state(self, name: str, serving: bool) -> None:
        if not self._loaded:
            self._announced.add(name)
            self._loaded = self._announced >= set(self.repo.models)

    # ================================================================== boundary (non-inference RPCs)

    async def _plain(self, context: Context, handler: Callable[[], Awaitable[Resp]]) -> Resp:
        """Metadata RPCs: the same error translation as genserve.v1, no per-RPC metrics."""
        try:
            return await handler()
        except GenserveError as exc:
            await context.abort(exc.code, exc.message)
            raise  # pragma: no cover - abort raises

    # ================================================================== health and metadata

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: Context) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: Context) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self._server_ready())

    def _server_ready(self) -> bool:
        """Startup loading finished (like grpc.health "") and at least one model version serves. A
        hot reload loading or draining another version leaves the server ready; at shutdown every
        version drains, so it turns not-ready."""
        return self._loaded and any(
            mv.state == ModelState.READY for model in self.repo for mv in model.versions.values()
        )

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: Context) -> kpb.ModelReadyResponse:
        async def handle() -> kpb.ModelReadyResponse:
            if not request.name:
                raise invalid("name", "required (the model name)")
            try:
                # An unknown model or version is not ready, with status OK, as Triton answers
                # (tritonclient's is_model_ready raises on an error status).
                self.repo.get(request.name).resolve(request.version)
            except GenserveError:
                return kpb.ModelReadyResponse(ready=False)
            return kpb.ModelReadyResponse(ready=True)

        return await self._plain(context, handle)

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: Context
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="genserve", version=SERVER_VERSION, extensions=EXTENSIONS)

    def _model(self, name: str) -> Model:
        if not name:
            raise invalid("name", "required (the model name)")
        return self.repo.get(name)

    def _version(self, name: str, version: str) -> ModelVersion:
        mv = self._model(name).resolve(version)
        if mv.card is None:  # pragma: no cover - a READY version always has its card
            raise NotFound(f"{mv.label} has no card.json")
        return mv

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: Context
    ) -> kpb.ModelMetadataResponse:
        async def handle() -> kpb.ModelMetadataResponse:
            mv = self._version(request.name, request.version)
            card = mv.card
            assert card is not None
            model = self.repo.get(request.name)

            def tensors(specs: Iterable[TensorSpec]) -> list[kpb.ModelMetadataResponse.TensorMetadata]:
                return [
                    kpb.ModelMetadataResponse.TensorMetadata(
                        name=s.name, datatype=_datatype(s), shape=_shape(s)
                    )
                    for s in specs
                ]

            return kpb.ModelMetadataResponse(
                name=mv.name,
                versions=[v.version for v in model.ready_versions()],
                platform=PLATFORM,
                inputs=tensors(card.inputs),
                outputs=tensors(card.outputs),
            )

        return await self._plain(context, handle)

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context: Context) -> kpb.ModelConfigResponse:
        async def handle() -> kpb.ModelConfigResponse:
            return kpb.ModelConfigResponse(
                config=self.model_config(self._version(request.name, request.version))
            )

        return await self._plain(context, handle)

    @staticmethod
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
            entry = config.input.add(name=spec.name, data_type=DTYPES[spec.dtype][1], dims=_shape(spec)[1:])
            if spec.name in ("z", "label") and card.kind in LATENT_KINDS:
                entry.optional = True  # may come as request parameters instead (module docstring)
            if len(spec.shape) == 4:
                entry.format = mc.ModelInput.FORMAT_NCHW
        for spec in card.outputs:
            config.output.add(name=spec.name, data_type=DTYPES[spec.dtype][1], dims=_shape(spec)[1:])
        return config

    # ================================================================== statistics

    async def ModelStatistics(
        self, request: kpb.ModelStatisticsRequest, context: Context
    ) -> kpb.ModelStatisticsResponse:
        async def handle() -> kpb.ModelStatisticsResponse:
            if request.name:
                model = self.repo.get(request.name)
                if request.version:
                    model.resolve(request.version)  # NOT_FOUND / UNAVAILABLE like the other RPCs
                    versions = [model.versions[request.version]]
                else:
                    versions = list(model.versions.values())
            else:
                versions = [mv for m in self.repo for mv in m.versions.values()]
            totals = self._metric_totals()
            return kpb.ModelStatisticsResponse(model_stats=[self._statistics(mv, totals) for mv in versions])

        return await self._plain(context, handle)

    def _metric_totals(self) -> dict[tuple[str, str, str], float]:
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
        for family in self.registry.collect():
            for sample in family.samples:
                name = sample.name
                model = sample.labels.get("model", "")
                version = sample.labels.get("version", "")
                if name == "genserve_requests_total":
                    code = sample.labels.get("code")
                    # NOT_FOUND: a version that does not exist, counted against the model's highest
                    # version (service._resolve); Triton counts no inference for it.
                    name += "_ok" if code == "OK" else "_not_found" if code == "NOT_FOUND" else "_failed"
                elif name not in wanted:
                    continue
                key = (name, model, version)
                totals[key] = totals.get(key, 0.0) + float(sample.value)
        return totals

    def _statistics(self, mv: ModelVersion, totals: dict[tuple[str, str, str], float]) -> kpb.ModelStatistics:
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
            last_inference=self._last_inference_ms.get((mv.name, mv.version), 0),
            inference_count=int(value("genserve_images_total")),
            execution_count=int(batches),
            inference_stats=kpb.InferStatistics(
                success=kpb.StatisticDuration(count=ok, ns=ok_ns),
                fail=kpb.StatisticDuration(count=failed, ns=failed_ns),
                queue=duration(
                    "genserve_queue_duration_seconds_count", "genserve_queue_duration_seconds_sum"
                ),
                compute_input=kpb.StatisticDuration(
                    count=ok, ns=int(value("genserve_decode_duration_seconds_sum") * 1e9)
                ),
                compute_infer=kpb.StatisticDuration(count=ok, ns=int(mean_batch_s * memberships * 1e9)),
                compute_output=kpb.StatisticDuration(count=ok),
                cache_hit=kpb.StatisticDuration(),
                cache_miss=kpb.StatisticDuration(),
            ),
        )

    # ================================================================== ModelInfer

    async def ModelInfer(self, request: kpb.ModelInferRequest, context: Context) -> kpb.ModelInferResponse:
        return await self.gen._unary("ModelInfer", request, context, self._do_infer)

    async def _do_infer(self, request: kpb.ModelInferRequest, call: Call) -> kpb.ModelInferResponse:
        mv = self.gen._resolve(call, request.model_name, request.model_version, KINDS, "ModelInfer")
        card = mv.card
        assert card is not None
        tensors = self._read_inputs(request, card)
        response_params: dict[str, int] = {}
        if card.kind in LATENT_KINDS:
            inputs, n, key = self._latent_inputs(request, card, tensors, response_params)
        else:
            inputs, n, key = self._image_inputs(card, tensors)
        outputs = self._requested_outputs(request, card)
        out_bytes = sum(self._output_bytes(spec, card, inputs, n) for spec in outputs)
        self.gen._check_send_size(out_bytes, "the response")
        result = await self.gen._run(mv, call, key, inputs, n, Lane.INTERACTIVE)
        response = kpb.ModelInferResponse(model_name=mv.name, model_version=mv.version, id=request.id)
        for name, value in response_params.items():
            response.parameters[name].int64_param = value
        for spec in outputs:
            array = np.ascontiguousarray(result.outputs[spec.name], dtype=DTYPES[spec.dtype][2])
            array = array.reshape(len(array), *_shape(spec)[1:]) if len(spec.shape) == 1 else array
            response.outputs.add(name=spec.name, datatype=_datatype(spec), shape=array.shape)
            response.raw_output_contents.append(array.tobytes())
        self._last_inference_ms[(mv.name, mv.version)] = int(time.time() * 1000)
        return response

    @staticmethod
    def _output_bytes(spec: TensorSpec, card: Card, inputs: dict[str, np.ndarray], n: int) -> int:
        """Bytes of one output for n rows; dynamic H/W follow the input image (times the SR scale)."""
        dims = list(spec.shape[1:])
        if any(d < 0 for d in dims) and "image" in inputs and len(dims) == 3:
            _, _, h, w = inputs["image"].shape
            scale = max(1, card.scale_factor)
            dims = [dims[0] if dims[0] > 0 else card.channels, h * scale, w * scale]
        return n * math.prod(max(d, 1) for d in dims) * np.dtype(DTYPES[spec.dtype][2]).itemsize

    @staticmethod
    def _requested_outputs(request: kpb.ModelInferRequest, card: Card) -> list[TensorSpec]:
        if not request.outputs:
            return list(card.outputs)
        by_name = {s.name: s for s in card.outputs}
        chosen = []
        for i, output in enumerate(request.outputs):
            spec = by_name.get(output.name)
            if spec is None:
                raise invalid(
                    f"outputs[{i}].name", f"{card.name} has outputs {sorted(by_name)}, got {output.name!r}"
                )
            if spec in chosen:
                raise invalid(f"outputs[{i}].name", f"output {output.name!r} requested twice")
            chosen.append(spec)
        return chosen

    @staticmethod
    def _read_inputs(request: kpb.ModelInferRequest, card: Card) -> dict[str, np.ndarray]:
        """Every input tensor as a numpy array of the card's dtype and the request's shape."""
        specs = {s.name: s for s in card.inputs}
        raw = request.raw_input_contents
        if raw and len(raw) != len(request.inputs):
            raise invalid(
                "raw_input_contents",
                f"must have one entry per input ({len(request.inputs)}), got {len(raw)}",
            )
        arrays: dict[str, np.ndarray] = {}
        for i, tensor in enumerate(request.inputs):
            where = f"inputs[{i}]"
            spec = specs.get(tensor.name)
            if spec is None:
                raise invalid(f"{where}.name", f"{card.name} has inputs {sorted(specs)}, got {tensor.name!r}")
            if tensor.name in arrays:
                raise invalid(f"{where}.name", f"input {tensor.name!r} given twice")
            datatype, _, np_dtype = DTYPES[spec.dtype]
            if tensor.datatype != datatype:
                raise invalid(
                    f"{where}.datatype", f"{tensor.name} must be {datatype}, got {tensor.datatype!r}"
                )
            shape = tuple(int(d) for d in tensor.shape)
            # The model's rank (or the protocol's, [N, 1] for a batch-only tensor) before numpy sees
            # the shape: numpy refuses over 64 dims, or zero-size shapes whose other dims overflow.
            ranks = sorted({len(spec.shape), len(_shape(spec))})
            if len(shape) not in ranks:
                forms = " or ".join(f"{n} dims" for n in ranks)
                raise invalid(
                    f"{where}.shape", f"{tensor.name} must have {forms} ({_shape(spec)}), got {len(shape)}"
                )
            if any(d < 0 for d in shape):
                raise invalid(f"{where}.shape", f"must be non-negative, got {list(shape)}")
            itemsize = np.dtype(np_dtype).itemsize
            if math.prod(d for d in shape if d) * itemsize > np.iinfo(np.intp).max:
                raise invalid(f"{where}.shape", f"{list(shape)} is too large")
            n_values = math.prod(shape)
            if raw and tensor.contents.ListFields():
                raise invalid(f"{where}.contents", "must not be set when raw_input_contents is used")
            if raw:
                data = raw[i]
                if len(data) != n_values * itemsize:
                    raise invalid(
                        f"raw_input_contents[{i}]",
                        f"{tensor.name} of shape {list(shape)} needs {n_values * itemsize} bytes, "
                        f"got {len(data)}",
                    )
                array = np.frombuffer(data, dtype=np_dtype).reshape(shape)
            else:
                field = CONTENTS_FIELD.get(datatype)
                values = getattr(tensor.contents, field) if field else ()
                if len(values) != n_values:
                    raise invalid(
                        f"{where}.contents",
                        f"{tensor.name} of shape {list(shape)} needs {n_values} values, got {len(values)}",
                    )
                array = np.asarray(values, dtype=np_dtype).reshape(shape)
            arrays[tensor.name] = array
        return arrays

    def _latent_inputs(
        self,
        request: kpb.ModelInferRequest,
        card: Card,
        tensors: dict[str, np.ndarray],
        response_params: dict[str, int],
    ) -> tuple[dict[str, np.ndarray], int, Any]:
        assert card.latent_dim is not None
        params = request.parameters
        seed = _param_int(params, "seed")
        count = _param_int(params, "count")
        psi = _param_float(params, "truncation_psi")
        label_param = _param_int(params, "label")
        label_tensor = tensors.get("label")
        if label_tensor is not None:
            if label_param is not None:
                raise invalid("parameters[label]", "cannot be combined with the label input")
            if label_tensor.ndim == 2 and label_tensor.shape[1] == 1:
                label_tensor = label_tensor[:, 0]
            if label_tensor.ndim != 1:
                raise invalid("inputs[label].shape", f"must be [N] or [N, 1], got {list(label_tensor.shape)}")
        z_tensor = tensors.get("z")
        if z_tensor is not None:
            for name, given in (("seed", seed), ("count", count), ("truncation_psi", psi)):
                if given is not None:
                    raise invalid(f"parameters[{name}]", "cannot be combined with the z input")
            proto = tpb.Tensor(
                shape=z_tensor.shape,
                dtype=tpb.DTYPE_FLOAT32,
                data=z_tensor.astype("<f4", copy=False).tobytes(),
            )
            z = GenerationService._latent_tensor(proto, card.latent_dim, "inputs[z]")
            n = self.gen._count(len(z), "inputs[z].shape[0]")
        else:
            if psi is not None and not (0.0 < psi <= 10.0 and math.isfinite(psi)):
                raise invalid("parameters[truncation_psi]", f"must be in (0, 10], got {psi:g}")
            default_n = len(label_tensor) if label_tensor is not None else 1
            n = self.gen._count(default_n if count is None else count, "parameters[count]")
            if label_tensor is not None and len(label_tensor) != n:
                raise invalid(
                    "inputs[label].shape", f"must be [{n}] (parameters[count]), got {len(label_tensor)}"
                )
            if seed is None:
                seed = secrets.randbelow(SEED_LIMIT - n)
            elif not 0 <= seed <= SEED_LIMIT - n:
                raise invalid("parameters[seed]", f"must be in [0, 2^63 - count], got {seed}")
            z = latents.latents_for_seeds(
                list(range(seed, seed + n)), card.latent_dim, psi, field="parameters[seed]"
            )
            response_params["seed"] = seed
        inputs: dict[str, np.ndarray] = {"z": z}
        labels = self._label_rows(card, n, label_tensor, label_param)
        if labels is not None:
            inputs["label"] = labels
        # Generators batch freely, as in genserve.v1 Sample: seeds and labels only change rows.
        return inputs, n, ()

    @staticmethod
    def _label_rows(card: Card, n: int, tensor: np.ndarray | None, param: int | None) -> np.ndarray | None:
        """int64 [n] labels of a conditional model (validated like genserve.v1's `labels`)."""
        if card.kind != "conditional_generator":
            if tensor is not None or param is not None:
                raise invalid("label", f"only conditional models take labels; {card.name} is a {card.kind}")
            return None
        values: Sequence[int]
        if tensor is not None:
            if len(tensor) != n:
                raise invalid(
                    "inputs[label].shape", f"must be [{n}] (one label per image), got {len(tensor)}"
                )
            values, where = [int(v) for v in tensor], "inputs[label]"
        elif param is not None:
            values, where = [param], "parameters[label]"
        else:
            values, where = [], "inputs[label]"
        labels = GenerationService._labels(values, card, n, where)
        assert labels is not None
        return np.ascontiguousarray(labels, dtype=np.int64)

    def _image_inputs(
        self, card: Card, tensors: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int, Any]:
        image = tensors.get("image")
        if image is None:
            raise invalid("inputs", f"{card.name} needs the input 'image' (FP32 [N, C, H, W])")
        if image.ndim != 4:
            raise invalid("inputs[image].shape", f"must be [N, C, H, W], got {list(image.shape)}")
        n, c, h, w = image.shape
        limit = self.limits.max_images_per_image_request
        if not 1 <= n <= limit:
            raise invalid(
                "inputs[image].shape[0]", f"must be in 1..{limit} (max_images_per_image_request), got {n}"
            )
        if card.input_channels is not None and c != card.input_channels:
            raise invalid("inputs[image].shape[1]", f"must be {card.input_channels} channels, got {c}")
        if card.image_size is not None and (h, w) != tuple(card.image_size):
            raise invalid(
                "inputs[image].shape", f"must be [N, {c}, {card.image_size[0]}, {card.image_size[1]}]"
            )
        pixel_limit = (
            self.limits.max_sr_input_pixels
            if card.kind == "super_resolution"
            else self.limits.max_input_pixels
        )
        if h * w > pixel_limit:
            raise invalid("inputs[image].shape", f"H*W must be <= {pixel_limit}, got {h}x{w}")
        if min(h, w) < card.min_size:
            raise invalid("inputs[image].shape", f"H and W must be >= {card.min_size}, got {h}x{w}")
        multiple = card.size_multiple
        if h % multiple or w % multiple:
            raise invalid("inputs[image].shape", f"H and W must be multiples of {multiple}, got {h}x{w}")
        if not np.isfinite(image).all():
            raise invalid("inputs[image]", "values must be finite")
        if card.input_range is not None and image.size:
            check_input_range(image, card.input_range, "inputs[image]")  # as genserve.v1's TENSOR_F32
        # The same shape buckets as genserve.v1 (SR tiles, translated images): same-shape rows of
        # both protocols share batches.
        prefix = "tile" if card.kind == "super_resolution" else "image"
        key: Any = (prefix, (c, h, w)) if card.image_size is None else ()
        return {"image": np.ascontiguousarray(image, dtype=np.float32)}, int(n), key


def service_name() -> str:
    """`inference.GRPCInferenceService`, for server reflection."""
    name: str = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return name


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
