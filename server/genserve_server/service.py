"""The genserve.v1 GenerationService: protobuf <-> the serving core's values, nothing else.

Each RPC is one line through the boundary (boundary.py: request id, metrics, error -> status);
each `_do_<rpc>` reads its message into plain values (validators in validate.py name the fields as
the client spelled them), calls the generation core (core.py), and builds the response from what
the core returns. Validation, planning, batching and encoding live in the core, shared with the
KServe v2 servicer (kserve.py), which is a sibling of this module, not a user of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import genserve_pb2_grpc as pb_grpc
from genserve.v1 import types_pb2 as tpb
from genserve_contract.kinds import TRANSLATE_KINDS, Kind
from genserve_server import latents, service_codes, service_styles, style_sampling, validate
from genserve_server.batcher import Lane
from genserve_server.boundary import Boundary, Context
from genserve_server.config import SAMPLE_KINDS, ModelConfig, ServerConfig
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import NotFound, invalid
from genserve_server.links import every_request_fails
from genserve_server.metrics import Metrics
from genserve_server.repository import Model, ModelState, ModelVersion, Repository
from genserve_server.service_parts import (
    add_generated,
    add_images,
    lane,
    latent_point,
    latent_proto,
    latent_tensor,
    output_spec,
    provenance,
    row_limit,
)
from genserve_server.validate import OutputSpec

DEFAULT_CHUNK = 64
# Decode: latents -> images with no label to give (a conditional generator needs one per row).
DECODE_KINDS = tuple(k for k in Kind if k.takes_latent and k.answers_sample and not k.conditional)
# Translate's direction -> the graph's (validate.A_TO_B / B_TO_A); unset is A -> B.
_DIRECTIONS = {
    pb.DIRECTION_UNSPECIFIED: validate.A_TO_B,
    pb.DIRECTION_A_TO_B: validate.A_TO_B,
    pb.DIRECTION_B_TO_A: validate.B_TO_A,
}


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(
        self,
        repository: Repository,
        config: ServerConfig,
        metrics: Metrics,
        codec_pool: ThreadPoolExecutor,
        *,
        core: GenerationCore | None = None,
        boundary: Boundary | None = None,
    ) -> None:
        self.repo = repository
        self.limits = config.limits
        self.core = core or GenerationCore(repository, config, metrics, codec_pool)
        self.boundary = boundary or Boundary(metrics, redact=repository.redact)

    # ================================================================== RPCs

    async def Sample(self, request: pb.SampleRequest, context: Context) -> pb.SampleResponse:
        return await self.boundary.unary("Sample", request, context, self._do_sample)

    async def SampleStream(  # an async generator, as grpc.aio expects for server streaming
        self, request: pb.SampleStreamRequest, context: Context
    ) -> AsyncIterator[pb.SampleStreamChunk]:
        async for chunk in self.boundary.stream("SampleStream", request, context, self._do_sample_stream):
            yield chunk

    async def Interpolate(self, request: pb.InterpolateRequest, context: Context) -> pb.SampleResponse:
        return await self.boundary.unary("Interpolate", request, context, self._do_interpolate)

    async def MixStyles(self, request: pb.MixStylesRequest, context: Context) -> pb.SampleResponse:
        return await self.boundary.unary("MixStyles", request, context, self._mix_styles)

    async def _mix_styles(self, request: pb.MixStylesRequest, call: Call) -> pb.SampleResponse:
        return await service_styles.mix_styles(self.core, self.limits, request, call)

    async def Encode(self, request: pb.EncodeRequest, context: Context) -> pb.EncodeResponse:
        return await self.boundary.unary("Encode", request, context, self._do_encode)

    async def Decode(self, request: pb.DecodeRequest, context: Context) -> pb.SampleResponse:
        return await self.boundary.unary("Decode", request, context, self._do_decode)

    async def SuperResolve(self, request: pb.ImageRequest, context: Context) -> pb.ImageResponse:
        return await self.boundary.unary("SuperResolve", request, context, self._do_super_resolve)

    async def Translate(self, request: pb.ImageRequest, context: Context) -> pb.ImageResponse:
        return await self.boundary.unary("Translate", request, context, self._do_translate)

    async def SampleCodes(self, request: pb.SampleCodesRequest, context: Context) -> pb.SampleCodesResponse:
        return await self.boundary.unary("SampleCodes", request, context, self._do_sample_codes)

    async def _do_sample_codes(self, request: pb.SampleCodesRequest, call: Call) -> pb.SampleCodesResponse:
        if request.preview_every:  # refused, not dropped (as SuperResolve refuses return_latents)
            raise invalid(
                "preview_every",
                f"is for SampleCodesStream only (its progress chunks); SampleCodes sends one answer: "
                f"leave it 0, got {request.preview_every}",
            )
        out = output_spec(request.output)
        return await service_codes.sample_codes(self.core, request, call, out, provenance)

    async def SampleCodesStream(
        self, request: pb.SampleCodesRequest, context: Context
    ) -> AsyncIterator[pb.SampleCodesChunk]:
        stream = self.boundary.stream("SampleCodesStream", request, context, self._do_sample_codes_stream)
        async for chunk in stream:
            yield chunk

    def _do_sample_codes_stream(
        self, request: pb.SampleCodesRequest, call: Call
    ) -> AsyncIterator[pb.SampleCodesChunk]:
        out = output_spec(request.output)
        return service_codes.sample_codes_stream(self.core, request, call, out, provenance)

    def _mapping(self, call: Call, mv: ModelVersion) -> tuple[ModelVersion, ...]:
        """A style generator's mapping version (its rows are mapped in one request each), else none."""
        card = mv.card
        return (
            (style_sampling.style_mapping(self.core, call, mv),)
            if card is not None and card.kind.styled
            else ()
        )

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return await self.boundary.unary("ListModels", request, context, self._do_list_models)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:
        return await self.boundary.unary("GetModel", request, context, self._do_get_model)

    # ================================================================== Sample / SampleStream / Decode

    async def _do_sample(self, request: pb.SampleRequest, call: Call) -> pb.SampleResponse:
        mv = self.core.resolve(call, request.model, request.version, SAMPLE_KINDS, "Sample")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = output_spec(request.output)
        priority = lane(request.priority, Lane.INTERACTIVE)
        psi = validate.psi(
            request.truncation_psi if request.HasField("truncation_psi") else None, w_space=card.kind.styled
        )
        limit, limit_name = row_limit(self.limits.max_images_per_request, mv, *self._mapping(call, mv))
        seeds: list[int] | None
        if request.HasField("latents"):
            for name, given in (
                ("seeds", bool(request.seeds)),
                ("base_seed", request.HasField("base_seed")),
                # A style generator truncates in w space, after its mapping: explicit z take it too.
                ("truncation_psi", psi is not None and not card.kind.styled),
            ):
                if given:
                    raise invalid(name, "cannot be combined with explicit latents")
            z = latent_tensor(request.latents, card.latent_dim, "latents")
            n = validate.count(len(z), "latents.shape[0]", limit, limit_name)
            if request.count not in (0, n):
                raise invalid("count", f"must be 0 or {n} (the number of latents), got {request.count}")
            labels = validate.labels(request.labels, card, n)
            generated = await self.core.generate(mv, call, labels, out, priority, z=z, psi=psi)
            seeds = None
        else:
            base = request.base_seed if request.HasField("base_seed") else None
            seeds = validate.request_seeds(
                request.seeds,
                request.count,
                base,
                limit,
                self.core.random_base_seed,
                limit_name,
                "seeds or latents",
            )
            n = len(seeds)
            labels = validate.labels(request.labels, card, n)
            generated = await self.core.sample(mv, call, seeds, labels, psi, out, priority)
        response = pb.SampleResponse(provenance=provenance(mv, generated.executed_batch_sizes, call.uses))
        add_generated(
            response.images,
            generated.images,
            generated.latents,
            seeds,
            labels,
            out,
            from_cache=generated.from_cache,
        )
        return response

    async def _do_decode(self, request: pb.DecodeRequest, call: Call) -> pb.SampleResponse:
        mv = self.core.resolve(
            call, request.model, request.version, DECODE_KINDS, "Decode", elsewhere=_decoded_elsewhere
        )
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = output_spec(request.output)
        if not request.HasField("latents"):
            raise invalid("latents", f"required: float32 [N, {card.latent_dim}]")
        z = latent_tensor(request.latents, card.latent_dim, "latents")
        validate.count(len(z), "latents.shape[0]", *row_limit(self.limits.max_images_per_request, mv))
        generated = await self.core.generate(mv, call, None, out, Lane.INTERACTIVE, z=z)
        response = pb.SampleResponse(provenance=provenance(mv, generated.executed_batch_sizes, call.uses))
        add_generated(response.images, generated.images, z, None, None, out)
        return response

    async def _do_sample_stream(
        self, request: pb.SampleStreamRequest, call: Call
    ) -> AsyncIterator[pb.SampleStreamChunk]:
        sample = request.sample
        mv = self.core.resolve(call, sample.model, sample.version, SAMPLE_KINDS, "SampleStream", "sample.")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        if sample.seeds:
            raise invalid("sample.seeds", "not accepted by SampleStream: image i uses base_seed + i")
        if sample.HasField("latents"):
            raise invalid("sample.latents", "not accepted by SampleStream: image i uses base_seed + i")
        count = sample.count
        if count < 1:
            raise invalid("sample.count", f"must be >= 1, got {count}")
        base = validate.base_seed(
            sample.base_seed if sample.HasField("base_seed") else 0, count, "sample.base_seed"
        )
        if request.start_index > count:
            raise invalid("start_index", f"must be in 0..count ({count}), got {request.start_index}")
        # The limit is on the images this call sends, [start_index, count): a resumed stream, or a
        # bulk job's stream of a later index range, is as long as its range (ModelInfo says it).
        limit = self.limits.max_stream_images
        if count - request.start_index > limit:
            raise invalid(
                "sample.count",
                f"a stream sends at most {limit} images (max_stream_images): count - start_index "
                f"must be in 0..{limit}, got {count} - {request.start_index} = {count - request.start_index}",
            )
        # A chunk is one request to the model's queue (and a style generator's mapping's): one
        # larger than a whole queue never fits.
        versions = (mv, *self._mapping(call, mv))
        limit, limit_name = row_limit(self.limits.max_images_per_request, *versions)
        out = output_spec(sample.output, "sample.output")
        if request.chunk_size:
            chunk_size = request.chunk_size
            if chunk_size > limit:
                raise invalid("chunk_size", f"must be in 1..{limit} ({limit_name}), got {chunk_size}")
        else:  # the default: 64, or fewer where a limit is smaller, the send limit among them
            assert card.image_size is not None
            # The returned latents are each image's z (a style generator's too, as its Sample's).
            fits = validate.images_that_fit(
                out, card.channels, *card.image_size, card.latent_dim, self.limits.max_send_message_bytes
            )
            chunk_size = min(DEFAULT_CHUNK, limit, fits or DEFAULT_CHUNK)
        psi = validate.psi(
            sample.truncation_psi if sample.HasField("truncation_psi") else None,
            "sample.truncation_psi",
            w_space=card.kind.styled,
        )
        priority = lane(sample.priority, Lane.BULK, "sample.")
        label_cycle = np.asarray(sample.labels, dtype=np.int64)
        validate.labels(sample.labels, card, len(sample.labels) or 1, "sample.labels")  # values only
        queue_rows = min((v.batcher.max_queue_size for v in versions if v.batcher is not None), default=None)
        chunks = self.core.sample_range(
            mv,
            call,
            base,
            count,
            request.start_index,
            chunk_size,
            label_cycle,
            psi,
            out,
            priority,
            queue_rows,
        )
        async for start, seeds, labels, generated in chunks:
            chunk = pb.SampleStreamChunk(provenance=provenance(mv, generated.executed_batch_sizes, call.uses))
            add_generated(chunk.images, generated.images, generated.latents, seeds, labels, out, start)
            yield chunk

    # ================================================================== Interpolate

    async def _do_interpolate(self, request: pb.InterpolateRequest, call: Call) -> pb.SampleResponse:
        mv = self.core.resolve(call, request.model, request.version, SAMPLE_KINDS, "Interpolate")
        card = mv.card
        assert card is not None and card.latent_dim is not None
        out = output_spec(request.output)
        steps = request.steps
        # A style generator maps the path's two ends only: its steps go to the synthesis queue.
        limit, limit_name = row_limit(self.limits.max_images_per_request, mv)
        if not 2 <= steps <= limit:
            raise invalid("steps", f"must be in 2..{limit} ({limit_name}), got {steps}")
        if request.mode not in (
            pb.INTERPOLATION_MODE_UNSPECIFIED,
            pb.INTERPOLATION_MODE_LERP,
            pb.INTERPOLATION_MODE_SLERP,
        ):
            raise invalid("mode", f"unknown interpolation mode {request.mode}")
        psi = validate.psi(
            request.truncation_psi if request.HasField("truncation_psi") else None, w_space=card.kind.styled
        )
        if card.kind.styled:
            return await service_styles.interpolate_styles(self.core, request, call, mv, psi, out)
        if psi is not None and all(p.WhichOneof("point") == "latent" for p in (request.start, request.end)):
            # In z space truncation redraws a seed's out-of-range values: explicit latents have none to
            # redraw, and ignoring the field silently would return an untruncated path (as Sample refuses).
            raise invalid(
                "truncation_psi",
                "truncates the latents drawn from seeds; start and end are both explicit latents "
                "(send a seed end, or leave truncation_psi unset)",
            )
        start, start_seed = latent_point(request.start, card.latent_dim, psi, "start")
        end, end_seed = latent_point(request.end, card.latent_dim, psi, "end")
        z = latents.interpolate(start, end, steps, int(request.mode))
        labels: np.ndarray | None = None
        if card.kind.conditional:
            if len(request.labels) == 2:
                # The class embedding is not interpolated: the first ceil(steps / 2) images (an odd
                # path's middle one too) use the first label (genserve.proto InterpolateRequest).
                validate.labels(request.labels, card, 2)
                labels = np.where(
                    np.arange(steps) < (steps + 1) // 2, request.labels[0], request.labels[1]
                ).astype(np.int64)
            else:
                if len(request.labels) > 2:
                    raise invalid(
                        "labels",
                        f"must have 1 value (every image) or 2 (start, end), got {len(request.labels)}",
                    )
                one = validate.labels(request.labels, card, 1)
                assert one is not None
                labels = np.broadcast_to(one[:1], (steps,))
        elif request.labels:
            validate.labels(request.labels, card, steps)  # raises: labels on an unconditional model
        generated = await self.core.generate(mv, call, labels, out, Lane.INTERACTIVE, z=z)
        response = pb.SampleResponse(provenance=provenance(mv, generated.executed_batch_sizes, call.uses))
        add_generated(response.images, generated.images, z, None, labels, out)
        if start_seed is not None:
            response.images[0].seed = start_seed
        if end_seed is not None:
            response.images[-1].seed = end_seed
        return response

    # ================================================================== Encode (VAE)

    async def _do_encode(self, request: pb.EncodeRequest, call: Call) -> pb.EncodeResponse:
        mv = self.core.resolve(call, request.model, request.version, (Kind.VAE_ENCODER,), "Encode")
        n = validate.count(len(request.images), "images", *row_limit(self.limits.max_images_per_request, mv))
        if request.seed and not request.sample:
            # proto3's seed 0 is unset: a seed given is for the z that only sample draws.
            raise invalid(
                "seed", f"is used only with sample (the z it draws): set sample, got seed {request.seed}"
            )
        seed = validate.base_seed(request.seed, n, "seed", "len(images)") if request.sample else None
        encoded = await self.core.encode_vae(mv, call, request.images, seed)
        dists = []
        for i in range(n):
            d = pb.LatentDistribution(mu=latent_proto(encoded.mu[i]), logvar=latent_proto(encoded.logvar[i]))
            if encoded.z is not None:
                d.z.CopyFrom(latent_proto(encoded.z[i]))
            dists.append(d)
        return pb.EncodeResponse(latents=dists, provenance=provenance(mv, encoded.executed_batch_sizes))

    # ================================================================== SuperResolve / Translate

    async def _do_super_resolve(self, request: pb.ImageRequest, call: Call) -> pb.ImageResponse:
        if request.direction:
            raise invalid("direction", "only Translate takes a direction")
        mv = self.core.resolve(call, request.model, request.version, (Kind.SUPER_RESOLUTION,), "SuperResolve")
        validate.image_count(len(request.images), self.limits.max_images_per_image_request)
        out = _image_output(request.output, "SuperResolve")
        overlap = request.tile_overlap if request.HasField("tile_overlap") else None
        upscaled = await self.core.upscale(mv, call, request.images, request.tile_size, overlap, out)
        response = pb.ImageResponse(
            provenance=provenance(mv, upscaled.executed_batch_sizes), tiles=upscaled.tiles
        )
        add_images(response.images, upscaled.images)
        return response

    async def _do_translate(self, request: pb.ImageRequest, call: Call) -> pb.ImageResponse:
        mv = self.core.resolve(call, request.model, request.version, TRANSLATE_KINDS, "Translate")
        # The images are in the model's queue at once (one request per padded shape): more than
        # the queue holds never fit.
        validate.image_count(
            len(request.images),
            *row_limit(
                self.limits.max_images_per_image_request,
                mv,
                per_request_name="max_images_per_image_request",
            ),
        )
        if request.tile_size or request.HasField("tile_overlap"):
            field = "tile_size" if request.tile_size else "tile_overlap"
            raise invalid(field, "only SuperResolve takes tile_size/tile_overlap")
        out = _image_output(request.output, "Translate")
        direction = _DIRECTIONS.get(request.direction)
        if direction is None:
            names = " or ".join(validate.DIRECTION_NAMES)
            raise invalid("direction", f"must be {names}, got {request.direction}")
        translated = await self.core.translate(mv, call, request.images, out, direction)
        response = pb.ImageResponse(provenance=provenance(mv, translated.executed_batch_sizes))
        add_images(response.images, translated.images)
        return response

    # ================================================================== ListModels / GetModel

    def _images_per_request(self, model: Model, version: str = "") -> int:
        """ModelInfo.max_images_per_request: what row_limit allows a request of `model` (its queue,
        a style generator's mapping's), or service_codes.sample_limit a SampleCodes of a code prior
        (its row budget, its top prior's where it samples the top grids: a card with a top_grid, its
        decoder's queue), without holding a version: from the configs of the versions a request gets
        (a config.json edit applies to versions loaded from then on, so a loaded version's queue may
        differ from the file's). 0 for an encoder whose input size is above max_input_pixels: it can
        take no Encode."""
        config = _version_config(model, version)
        assert config is not None
        card = model.card(version)
        if card is not None and self.limits.fixed_input_too_large(card):
            return 0  # every Encode is refused naming the limit
        limit = self.limits.max_images_per_request
        if model.kind_of(version) == Kind.CODE_PRIOR:
            limit = min(limit, config.batching.max_batch_size)
            # Its top prior only where it samples the top grids (code_sampling.top_prior): a card
            # without a top_grid never calls the one its config.json may name.
            top = self._config_of(config.top_prior) if card is not None and card.top_grid else None
            if top is not None:
                limit = min(limit, top.batching.max_batch_size)
            decoder = self._config_of(config.decoder)
            if decoder is not None:
                limit = min(limit, decoder.batching.max_queue_size)
            return limit
        limit = min(limit, config.batching.max_queue_size)
        mapping = self._config_of(config.mapping)
        if mapping is not None:
            limit = min(limit, mapping.batching.max_queue_size)
        return limit

    def _config_of(self, name: str) -> ModelConfig | None:
        """The config of the version of the model `name` names (a mapping, decoder, top prior) that
        a request would use, if any."""
        if not name:
            return None
        with contextlib.suppress(NotFound):
            return _version_config(self.repo.get(name))
        return None

    def _warnings(self, mv: ModelVersion) -> str:
        """A loaded version's warnings, "; "-joined: its file changed on disk, its mapping does not
        fit, its rows depend on their batch (loader.check_rows), its card's fixed input size is
        above the pixel limit (every image it is sent is refused, whatever its kind)."""
        too_large = self.limits.fixed_input_too_large(mv.card) if mv.card is not None else ""
        no_request = f"takes no request: {too_large}" if too_large else ""
        found = (mv.file_changed, every_request_fails(self.repo, mv), mv.batch_dependence, no_request)
        return "; ".join(w for w in found if w)

    def _model_info(self, model: Model, version: str = "", *, cards: bool = True) -> pb.ModelInfo:
        """`cards`: each version's card_json (GetModel). ListModels leaves them out: an exported
        card is ~27 KB, so with them its answer grew with every card in the repository and a zoo
        passed max_send_message_bytes (and a gRPC client's default 4 MiB) with no paging."""
        card = model.card(version)  # the serving version's; GetModel naming a version: that one's
        # The serving version's kind (a config.json edit applies to later loads, `kind` included).
        kind = model.kind_of(version)
        info = pb.ModelInfo(name=model.name, kind=kind, reason=self.repo.redact(model.reason))
        serving = _version_config(model, version)  # a config.json edit applies to later loads
        if serving is not None:
            info.max_batch_size = serving.batching.max_batch_size
            if kind in (*SAMPLE_KINDS, *DECODE_KINDS, Kind.VAE_ENCODER, Kind.CODE_PRIOR):
                info.max_images_per_request = self._images_per_request(model, version)
            if kind in SAMPLE_KINDS:
                info.max_stream_images = self.limits.max_stream_images
        if model.reason and not model.versions:
            reason = self.repo.redact(model.reason)
            info.versions.append(pb.ModelVersionInfo(state=pb.MODEL_STATE_UNAVAILABLE, reason=reason))
        for mv in sorted(model.versions.values(), key=lambda v: int(v.version)):
            if version and mv.version != version:
                continue
            info.versions.append(
                pb.ModelVersionInfo(
                    version=mv.version,
                    state=_STATE[mv.state],
                    reason=self.repo.redact(mv.reason or self._warnings(mv)),
                    model_sha256=mv.sha256,
                    weights_sha256=mv.weights_sha256,
                    card_sha256=mv.card.file_sha256 if mv.card else "",
                    precision=mv.precision,
                    execution_provider=mv.provider,
                    card_json=mv.card.raw_json if cards and mv.card else "",
                )
            )
        if card is not None:
            info.description = card.description
            info.latent_dim = card.latent_dim or 0
            info.class_names.extend(card.class_names)
            # Every fixed-size image output: generators, VAE and code decoders (not the encoder's
            # input size, nor the size-free fully convolutional kinds).
            fixed_output = card.kind.image_output_name is not None and not card.kind.fully_convolutional
            if fixed_output and card.image_size is not None:
                info.output_shape.extend([card.channels, *card.image_size])
            info.scale_factor = card.scale_factor if card.kind.tiled else 1
            info.size_multiple = card.size_multiple
            info.w_dim = card.w_dim or 0
            info.num_layers = card.num_layers or 0
        return info

    async def _do_list_models(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m, cards=False) for m in self.repo])

    async def _do_get_model(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        if not request.name:
            raise invalid("name", "required (see ListModels)")
        model = self.repo.get(request.name)
        if request.version and request.version not in model.versions:
            raise NotFound(
                f"model {model.name} has no version {request.version!r}; versions: "
                f"{', '.join(model.versions) or 'none'}",
                field="version",
                verbatim=repr(request.version),
            )
        return self._model_info(model, request.version)


def _version_config(model: Model, version: str = "") -> ModelConfig | None:
    """The config of the version a request of `model` gets (`version`, else the highest READY
    one: what its batcher was made with), else its config.json's."""
    serving = model.versions.get(version) if version else model.newest_ready()
    return serving.config if serving is not None else model.config


def _decoded_elsewhere(kind: str) -> str:
    """Where latents go for a model Decode does not take: Sample's `latents` for the generators
    that need a label per row or a mapping to w first; nothing to add for other kinds."""
    if kind == Kind.CONDITIONAL_GENERATOR:
        return "send these latents to Sample's `latents` with `labels`"
    if kind == Kind.STYLE_GENERATOR:
        return "send these latents to Sample's `latents`"
    return ""


def _image_output(options: tpb.OutputOptions, rpc: str) -> OutputSpec:
    """SuperResolve's and Translate's output options: an ImageResponse has no latents to return, so
    return_latents is refused (as MixStyles and SampleCodes refuse it), not silently dropped."""
    out = output_spec(options)
    if out.return_latents:
        raise invalid(
            "output.return_latents",
            f"not accepted by {rpc}: its images come from input images, not latents "
            "(Sample, SampleStream, Interpolate and Decode return latents; Encode gives a VAE's)",
        )
    return out


_STATE = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNAVAILABLE: pb.MODEL_STATE_UNAVAILABLE,
    ModelState.DRAINING: pb.MODEL_STATE_DRAINING,
}
