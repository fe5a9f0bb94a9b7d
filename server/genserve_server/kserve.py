"""The KServe v2 / Triton gRPC inference protocol (`inference.GRPCInferenceService`) over genserve.

Served beside genserve.v1 on the same port, over the same repository, batchers and metrics, so
tritonclient, perf_analyzer and other KServe v2 clients work unchanged (docs/kserve.md).

ModelInfer goes through the same boundary as genserve.v1 (boundary.py: request id, in-flight
gauge, `genserve_requests_total{method="ModelInfer"}`, one error translation), the same pure
validators (validate.py) and the same generation core (core.py): seed rows are submitted as seed
rows with the same typed batch key as genserve.v1's Sample, so rows of both protocols share
batches. What this module adds is only the tensor mapping:

- generator / vae_decoder / conditional_generator: input `z` FP32 [N, Z], or no `z` and request
  parameters `seed` (int64, image i uses seed + i, the same latents as genserve.v1's base_seed),
  `count` (int64, default 1) and `truncation_psi` (double); without `z` and `seed` the server picks
  a random seed and returns it as the response parameter `seed`. Conditional models take `label`
  INT64 [N, 1] (metadata [-1, 1], config dims [1]; [N] works too) as an input, or one `label`
  parameter (int64) for every image;
- super_resolution / image_to_image / vae_encoder: input `image` FP32 [N, C, H, W] in the model's
  input range (card.json `input_range`): raw tensors, no tiling, padding or resizing, so H and W
  must already be multiples of the card's `size_multiple` (and the fixed size for an encoder). A
  super-resolution or image-to-image call holds the working set genserve.v1's SuperResolve or
  Translate holds for the same images (core.holding_working_set: each image one whole tile), until
  its response is built: one that leaves while its batches compute or its response is built on the
  codec pool gives it back once they have ended;
- outputs are the card's output tensors (`image`, `output_image`, `mu`/`logvar`) as FP32 in
  `raw_output_contents`, values in the card's `output_range`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import grpc
import numpy as np

from genserve.kserve import grpc_service_pb2 as kpb
from genserve.kserve import grpc_service_pb2_grpc as kpb_grpc
from genserve_server import codecs, kserve_metadata, kserve_tensors, latents, links, validate, wire
from genserve_server.batcher import BatchResult, Lane
from genserve_server.boundary import Boundary, Context, adopt_request_id, echo_request_id
from genserve_server.config import KINDS, Card, Kind, TensorSpec
from genserve_server.core import Call, GenerationCore, image_batch_key
from genserve_server.errors import GenserveError, NotFound, invalid
from genserve_server.repository import Model, ModelState, ModelVersion, Repository
from genserve_server.version import SERVER_VERSION

logger = logging.getLogger(__name__)

EXTENSIONS = ("model_configuration", "statistics")
# ModelInferRequest.id is echoed in the response: a long one could take a response past
# max_send_message_bytes after the images were computed (a transport error, not INVALID_ARGUMENT).
# 4 KiB of UTF-8 at most stays well inside validate.SEND_OVERHEAD_BYTES.
MAX_INFER_ID_CHARS = 1024
# The response's last field: its values' bytes follow the rest of a serialized response as they are
# (wire.with_bytes_field).
RAW_OUTPUT_CONTENTS_FIELD: int = kpb.ModelInferResponse.DESCRIPTOR.fields_by_name[
    "raw_output_contents"
].number
# Outputs go as the model's float32 values, as genserve.v1's TENSOR_F32: no encode's copies in the
# working set of an image model's call (its bytes are the response's).
RAW_OUTPUT = validate.output_spec(codecs.ImageFormat.TENSOR_F32, 0, None, False)
# Code kinds are sampled step by step (genserve.v1 SampleCodes), not in one model call; style kinds
# are two graphs served together in w space (genserve.v1 Sample, MixStyles); a two-way translator's
# rows of one call must share a direction, which genserve.v1 Translate's batching guarantees.
INFER_KINDS = tuple(
    k for k in KINDS if not (Kind(k).takes_codes or Kind(k).styled or Kind(k).maps_latent or Kind(k).two_way)
)


def served_elsewhere(kind: str) -> str:
    """Which genserve.v1 RPC serves a model of `kind`, which ModelInfer does not take."""
    k = Kind(kind)
    if k.takes_codes:
        return "a code model: genserve.v1 SampleCodes (a code_prior) serves it"
    if k.styled:
        return "genserve.v1 Sample, Interpolate and MixStyles serve it"
    if k.maps_latent:
        return "a style_mapping is served through its style_generator: genserve.v1 Sample"
    if k.two_way:
        return "genserve.v1 Translate serves it, with a direction"
    return "see ListModels"


# card dtype -> (protocol datatype, config DataType, numpy little-endian dtype)


@dataclass(slots=True)
class LatentPlan:
    """The rows of a ModelInfer on a latent model: explicit `z`, or seeds (+ psi); labels either way."""

    n: int
    labels: np.ndarray | None
    rows_field: str  # the request field the rows came from, for refusals naming it
    z: np.ndarray | None = None
    seeds: list[int] | None = None
    psi: float | None = None


# Triton's own ModelInferRequest parameters, those tritonclient reserves (TRITON_RESERVED_REQUEST_PARAMS:
# it sets some from infer()'s arguments; other gRPC clients send `binary_data_output`, e.g.
# go-triton-client on every call naming no outputs; perf_analyzer sends
# `triton_enable_empty_final_response`, as Triton's other `triton_*` ones): accepted and ignored,
# as docs/kserve.md says.
TRITON_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "headers", "binary_data_output"}
)
TRITON_PREFIX = "triton_"


def check_parameters(request: kpb.ModelInferRequest, card: Card, label: str) -> None:
    """A request parameter the model's kind does not take is INVALID_ARGUMENT naming it: ignored, a
    typo such as `Seed` got a random seed and an answer that looked right."""
    takes: set[str] = set()
    if card.kind.takes_latent:
        takes = {"seed", "count", "truncation_psi"}
        if card.kind.conditional:
            takes.add("label")
    # label on an unconditional model: its own refusal ('only conditional models take labels').
    passes = takes | {"label"} if card.kind.takes_latent else takes
    for name in request.parameters:
        if name not in passes and name not in TRITON_PARAMETERS and not name.startswith(TRITON_PREFIX):
            raise invalid(
                f"parameters[{name}]",
                f"{label} ({card.kind}) takes no such parameter; it takes "
                f"{', '.join(sorted(takes)) or 'none'} (Triton's {', '.join(sorted(TRITON_PARAMETERS))} "
                f"and {TRITON_PREFIX}*: accepted and ignored)",
                verbatim=f"parameters[{name}]",  # the client's key, even one that looks like a path
            )


class InferenceService(kpb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on genserve's repository and batchers."""

    def __init__(
        self,
        repository: Repository,
        core: GenerationCore,
        boundary: Boundary,
        *,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        """`ready`: the server's readiness (main.py passes grpc.health ""'s: loading over and every
        required model READY), so that ServerReady and the health check never disagree."""
        self.repo = repository
        self._ready = ready
        self.core = core
        self.boundary = boundary
        self.limits = core.limits
        # Startup loading is finished once the repository has announced every model, which
        # `load_all` does after loading each one's versions; main.py sets grpc.health "" SERVING
        # right after that. Latched, so that a hot reload loading a version does not undo it.
        self._announced: set[str] = set()
        self._loaded = False
        repository.add_listener(self._on_model_state)

    def _on_model_state(self, name: str, serving: bool) -> None:
        if not self._loaded:
            self._announced.add(name)
            # Every name listed only once as many are announced: not for each of hundreds of models.
            models = self.repo.models
            self._loaded = len(self._announced) >= len(models) and self._announced >= set(models)

    # ================================================================== health and metadata

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: Context) -> kpb.ServerLiveResponse:
        echo_request_id(context)
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: Context) -> kpb.ServerReadyResponse:
        echo_request_id(context)
        return kpb.ServerReadyResponse(ready=self._server_ready())

    def _server_ready(self) -> bool:
        """grpc.health ""'s answer when the server gave one; else (a servicer on its own) startup
        loading finished and at least one model version serves. A hot reload loading or draining
        another version leaves the server ready; at shutdown every version drains."""
        if self._ready is not None:
            return self._ready()
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
                mv = self.repo.get(request.name).resolve(request.version)
            except GenserveError:
                return kpb.ModelReadyResponse(ready=False)
            # A style generator whose mapping, or code prior whose decoder, cannot serve: every call
            # would fail UNAVAILABLE. Ready as its health key says (main.py `_serves`), for the
            # version asked for (by default the one a request naming no version gets).
            return kpb.ModelReadyResponse(ready=links.serves(self.repo, mv))

        return await self.boundary.plain(context, handle, "ModelReady")

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: Context
    ) -> kpb.ServerMetadataResponse:
        echo_request_id(context)
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
                        name=s.name,
                        datatype=kserve_tensors.protocol_datatype(s),
                        shape=kserve_tensors.protocol_shape(s),
                    )
                    for s in specs
                ]

            return kpb.ModelMetadataResponse(
                name=mv.name,
                versions=[v.version for v in model.ready_versions()],
                platform=kserve_metadata.PLATFORM,
                inputs=tensors(card.inputs),
                outputs=tensors(card.outputs),
            )

        return await self.boundary.plain(context, handle, "ModelMetadata")

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context: Context) -> kpb.ModelConfigResponse:
        async def handle() -> kpb.ModelConfigResponse:
            mv = self._version(request.name, request.version)
            applied = self.repo.get(request.name).config  # the policy a reload picks versions by
            policy = applied.version_policy if applied is not None else None
            assert mv.card is not None
            # A kind ModelInfer refuses (genserve.v1 serves it), or a fixed input size above the
            # pixel limit (every image refused), takes no ModelInfer rows.
            takes_rows = mv.card.kind in INFER_KINDS and not self.limits.fixed_input_too_large(mv.card)
            max_rows = self._max_rows(mv)[0] if takes_rows else 0
            # The image cache serves Sample (core.sample) of the kinds that answer it.
            cached = self.core.image_cache is not None and mv.card.kind.answers_sample
            return kpb.ModelConfigResponse(
                config=kserve_metadata.model_config(mv, max_rows, policy, response_cache=cached)
            )

        return await self.boundary.plain(context, handle, "ModelConfig")

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
                    # As Triton (and ModelMetadata): the versions a request can reach, not one that
                    # failed to load, is loading or draining (a client reads model_stats[0]); none
                    # is an error, as Triton's 'requested model X is not available'.
                    versions = model.ready_versions() or [model.resolve("")]
            else:
                versions = [mv for m in self.repo for mv in m.ready_versions()]
            return kpb.ModelStatisticsResponse(
                model_stats=[kserve_metadata.statistics(mv) for mv in versions]
            )

        return await self.boundary.plain(context, handle, "ModelStatistics")

    # ================================================================== ModelInfer

    async def ModelInfer(self, request: kpb.ModelInferRequest, context: Context) -> kpb.ModelInferResponse:
        adopt_request_id(context, request.id)  # on the call's log lines where it sent no x-request-id
        return await self.boundary.unary("ModelInfer", request, context, self._do_infer)

    async def _do_infer(self, request: kpb.ModelInferRequest, call: Call) -> kpb.ModelInferResponse:
        if len(request.id) > MAX_INFER_ID_CHARS:
            # The id comes back in the response, past the send-size check made before compute.
            raise invalid("id", f"must be at most {MAX_INFER_ID_CHARS} characters, got {len(request.id)}")
        mv = self.core.resolve(
            call,
            request.model_name,
            request.model_version,
            INFER_KINDS,
            "ModelInfer",
            model_field="model_name",
            elsewhere=served_elsewhere,
        )
        card = mv.card
        assert card is not None
        check_parameters(request, card, mv.label)
        decoding = time.monotonic()
        tensors = kserve_tensors.read_inputs(request, card)
        call.timing.input_s += time.monotonic() - decoding
        outputs = kserve_tensors.requested_outputs(request, card)
        if card.kind.takes_latent:
            plan = self._latent_plan(request, card, tensors, self._max_rows(mv))
            await self.core.reserve_response(
                call, self._check_output_bytes(outputs, card, plan.n, None, plan.rows_field)
            )
            result, _ = await self.core.generate_batch(
                mv,
                call,
                plan.labels,
                Lane.INTERACTIVE,
                seeds=plan.seeds,
                psi=plan.psi,
                z=plan.z,
                seed_field="parameters[seed]",
                psi_field="parameters[truncation_psi]",
            )
            seed = {} if plan.seeds is None else {"seed": plan.seeds[0]}
            return await self._response(request, mv, call, outputs, result, seed)
        image = self._image_input(card, tensors, self._max_rows(mv))
        n, _, h, w = (int(d) for d in image.shape)
        out_bytes = self._check_output_bytes(outputs, card, n, image.shape, "inputs[image].shape")
        held: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
        if card.kind.tiled or card.kind.translates:
            # What genserve.v1's SuperResolve or Translate holds for the same images (each one tile
            # the model takes whole: nothing is tiled here), until the response is built; before
            # the response's bytes, as there.
            sizes = [(h, w)] * n
            working_set = self.core.whole_images_working_set(mv, sizes, sizes, RAW_OUTPUT)
            held = self.core.holding_working_set(call, card, working_set, "ModelInfer")
        async with held:
            await self.core.reserve_response(call, out_bytes)
            key = image_batch_key(card, (int(image.shape[1]), h, w))
            result = await self.core.submit(mv, call, key, {"image": image}, n, Lane.INTERACTIVE)
            return await self._response(request, mv, call, outputs, result, {})

    async def _response(
        self,
        request: kpb.ModelInferRequest,
        mv: ModelVersion,
        call: Call,
        outputs: Sequence[TensorSpec],
        result: BatchResult,
        response_params: dict[str, int],
    ) -> kpb.ModelInferResponse:
        """The requested `outputs` of `result` as raw FP32 tensors (encoding time counted in `call`).
        Outputs of wire.OFF_LOOP_BYTES or more come as the response's bytes, built on the codec pool
        (the boundary passes bytes through): two whole copies of each output on the event loop
        (tobytes, then into the message) held it ~70-700 ms for a 50 MB SR output."""
        build = functools.partial(self._response_parts, request, mv, outputs, result, response_params)
        n_bytes = sum(
            result.outputs[spec.name].size * np.dtype(kserve_tensors.DTYPES[spec.dtype][2]).itemsize
            for spec in outputs
        )
        if n_bytes < wire.OFF_LOOP_BYTES:
            encoding = time.monotonic()
            response, arrays = build()
            response.raw_output_contents.extend(array.tobytes() for array in arrays)
            call.timing.output_s += time.monotonic() - encoding
            return response

        def serialized() -> bytes:
            encoding = time.monotonic()
            response, arrays = build()
            views = [array.reshape(-1).view(np.uint8).data for array in arrays]
            data = wire.with_bytes_field(response.SerializeToString(), RAW_OUTPUT_CONTENTS_FIELD, views)
            call.timing.output_s += time.monotonic() - encoding
            return data

        # The boundary hands bytes to grpc as they are (wire.passing_bytes). The job holds the model's
        # outputs, which a super-resolution or image-to-image call's working set counts, and builds
        # the response's bytes, which its response reservation counts: a call that leaves meanwhile
        # gives both back once the job has ended (call.computing).
        return cast(kpb.ModelInferResponse, await self.core.codec.off_loop(serialized, call.computing))

    def _response_parts(
        self,
        request: kpb.ModelInferRequest,
        mv: ModelVersion,
        outputs: Sequence[TensorSpec],
        result: BatchResult,
        response_params: dict[str, int],
    ) -> tuple[kpb.ModelInferResponse, list[np.ndarray]]:
        """The response without its raw_output_contents, and those outputs' contiguous arrays."""
        response = kpb.ModelInferResponse(model_name=mv.name, model_version=mv.version, id=request.id)
        for name, value in response_params.items():
            response.parameters[name].int64_param = value
        arrays = []
        for spec in outputs:
            array = np.ascontiguousarray(
                result.outputs[spec.name], dtype=kserve_tensors.DTYPES[spec.dtype][2]
            )
            array = (
                array.reshape(len(array), *kserve_tensors.protocol_shape(spec)[1:])
                if len(spec.shape) == 1
                else array
            )
            response.outputs.add(
                name=spec.name, datatype=kserve_tensors.protocol_datatype(spec), shape=array.shape
            )
            arrays.append(array)
        return response, arrays

    def _check_output_bytes(
        self,
        outputs: Sequence[TensorSpec],
        card: Card,
        n: int,
        image_shape: tuple[int, ...] | None,
        rows_field: str,
    ) -> int:
        """Before compute: the response's tensors must fit the send limit; returns their bytes. A
        refusal names the field the rows came from (`rows_field`) and how many rows fit: KServe has
        no encoded formats, so fewer rows (or smaller images, or fewer outputs) is the only remedy."""
        out_bytes = sum(kserve_tensors.output_bytes(spec, card, n, image_shape) for spec in outputs)
        limit = self.limits.max_send_message_bytes
        room = limit - validate.SEND_OVERHEAD_BYTES  # the rest: id, parameters, framing
        if out_bytes <= room:
            return out_bytes
        per_row = out_bytes // max(n, 1)  # every output has n rows of the same size
        fit = room // per_row if per_row else n
        names = ", ".join(spec.name for spec in outputs)
        if fit:
            remedy = f"at most {fit} rows fit"
        elif image_shape is not None:
            remedy = "not even one row fits: send smaller images"
        else:
            remedy = "not even one row fits: the server's max_send_message_bytes is too small for this model"
        raise invalid(
            rows_field,
            f"the response's outputs ({names}) would be {out_bytes} bytes for {n} rows ({per_row} a row), "
            f"above max_send_message_bytes={limit} less {validate.SEND_OVERHEAD_BYTES} bytes kept for the "
            f"rest of the response; {remedy}",
        )

    def _max_rows(self, mv: ModelVersion) -> tuple[int, str]:
        """The most rows one ModelInfer may carry, and the name of that limit. As in Triton, a
        request's batch may not exceed ModelConfig.max_batch_size (the model's, unless the server's
        per-request limit is lower), so the config advertises exactly what is accepted."""
        card = mv.card
        assert card is not None
        if card.kind.takes_latent:
            server = self.limits.max_images_per_request, "max_images_per_request"
        else:
            server = self.limits.max_images_per_image_request, "max_images_per_image_request"
        model = mv.config.batching.max_batch_size, "max_batch_size in ModelConfig"
        return model if model[0] <= server[0] else server

    def _latent_plan(
        self,
        request: kpb.ModelInferRequest,
        card: Card,
        tensors: dict[str, np.ndarray],
        max_rows: tuple[int, str],
    ) -> LatentPlan:
        assert card.latent_dim is not None
        params = request.parameters
        seed = kserve_tensors.param_int(params, "seed")
        count = kserve_tensors.param_int(params, "count")
        psi = kserve_tensors.param_float(params, "truncation_psi")
        label_param = kserve_tensors.param_int(params, "label")
        label_tensor = tensors.get("label")
        if label_tensor is not None:
            if label_param is not None:
                raise invalid("parameters[label]", "cannot be combined with the label input")
            if label_tensor.ndim == 2 and label_tensor.shape[1] == 1:
                label_tensor = label_tensor[:, 0]
            if label_tensor.ndim != 1:
                raise invalid("inputs[label].shape", f"must be [N] or [N, 1], got {list(label_tensor.shape)}")
        limit, limit_name = max_rows
        z_tensor = tensors.get("z")
        if z_tensor is not None:
            for name, given in (("seed", seed), ("count", count), ("truncation_psi", psi)):
                if given is not None:
                    raise invalid(f"parameters[{name}]", "cannot be combined with the z input")
            z = validate.latent_rows(z_tensor, card.latent_dim, "inputs[z]")
            rows_field = "inputs[z].shape[0]"
            n = validate.count(len(z), rows_field, limit, limit_name)
            return LatentPlan(n, self._label_rows(card, n, label_tensor, label_param), rows_field, z=z)
        if psi is not None:
            # genserve.v1's truncation_psi is a proto float: the same float32 value here, checked as
            # that value (1e-300 is 0.0, 10.0000001 is 10.0), a refusal naming what the client sent.
            with np.errstate(over="ignore"):
                as_float32 = float(np.float32(psi))
            field = "parameters[truncation_psi]"
            validate.psi(as_float32, field, sent=psi)
            # Too small to draw (generate_batch checks it again): refused here, naming what was sent.
            latents.check_truncation_psi(as_float32, card.latent_dim, field=field, sent=psi)
            psi = as_float32
        if count is None and label_tensor is not None:  # one image per label: the count comes from the tensor
            rows_field = "inputs[label].shape[0]"
            n = validate.count(len(label_tensor), rows_field, limit, limit_name)
        else:
            rows_field = "parameters[count]"
            n = validate.count(1 if count is None else count, rows_field, limit, limit_name)
        if label_tensor is not None and len(label_tensor) != n:
            raise invalid(
                "inputs[label].shape", f"must be [{n}] (parameters[count]), got {len(label_tensor)}"
            )
        if seed is None:
            seed = self.core.random_base_seed(n)
        else:
            validate.base_seed(seed, n, "parameters[seed]")
        labels = self._label_rows(card, n, label_tensor, label_param)
        return LatentPlan(n, labels, rows_field, seeds=list(range(seed, seed + n)), psi=psi)

    @staticmethod
    def _label_rows(card: Card, n: int, tensor: np.ndarray | None, param: int | None) -> np.ndarray | None:
        """int64 [n] labels of a conditional model (validated like genserve.v1's `labels`)."""
        if not card.kind.conditional:
            if tensor is not None or param is not None:
                field = "inputs[label]" if tensor is not None else "parameters[label]"
                raise invalid(field, f"only conditional models take labels; {card.name} is a {card.kind}")
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
        else:  # either way of sending a label is named
            raise invalid(
                "inputs[label]",
                f"required for conditional model {card.name} (classes 0..{len(card.class_names) - 1}): "
                "the label input (one class per image) or parameters[label] (one class for every image)",
            )
        labels = validate.labels(values, card, n, where)
        assert labels is not None
        return np.ascontiguousarray(labels, dtype=np.int64)

    def _image_input(
        self, card: Card, tensors: dict[str, np.ndarray], max_rows: tuple[int, str]
    ) -> np.ndarray:
        image = tensors.get("image")
        if image is None:
            raise invalid("inputs", f"{card.name} needs the input 'image' (FP32 [N, C, H, W])")
        if image.ndim != 4:
            raise invalid("inputs[image].shape", f"must be [N, C, H, W], got {list(image.shape)}")
        n, c, h, w = image.shape
        limit, limit_name = max_rows
        if not 1 <= n <= limit:
            raise invalid("inputs[image].shape[0]", f"must be in 1..{limit} ({limit_name}), got {n}")
        if card.input_channels is not None and c != card.input_channels:
            raise invalid("inputs[image].shape[1]", f"must be {card.input_channels} channels, got {c}")
        validate.input_size(card, h, w, "inputs[image].shape")
        pixels, pixels_name = self.limits.input_pixels(card.kind)
        if h * w > pixels:
            raise invalid("inputs[image].shape", f"H*W must be <= {pixels} ({pixels_name}), got {h}x{w}")
        if min(h, w) < card.min_size:
            raise invalid("inputs[image].shape", f"H and W must be >= {card.min_size}, got {h}x{w}")
        multiple = card.size_multiple
        if h % multiple or w % multiple:
            raise invalid("inputs[image].shape", f"H and W must be multiples of {multiple}, got {h}x{w}")
        not_finite = "values must be finite"
        if card.input_range is not None and image.size:  # as genserve.v1's TENSOR_F32
            spec = next(s for s in card.inputs if s.name == "image")  # FP32 or FP16, as the client sent
            datatype = kserve_tensors.protocol_datatype(spec)
            validate.input_range(
                image, card.input_range, "inputs[image]", not_finite=not_finite, datatype=datatype
            )
        elif not codecs.all_finite(image):
            raise invalid("inputs[image]", not_finite)
        # The core's shape buckets (image_batch_key) are genserve.v1's (SR tiles, translated
        # images): same-shape rows of both protocols share batches.
        return np.ascontiguousarray(image, dtype=np.float32)


def service_name() -> str:
    """`inference.GRPCInferenceService`, for server reflection."""
    name: str = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    return name


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
