"""genserve.v1 SampleCodes and SampleCodesStream: the request's proto <-> the core's values
(code_sampling.py).

A sibling of service.py's handlers, kept apart so that service.py stays a list of thin handlers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_contract.kinds import Kind
from genserve_server import code_sampling, validate
from genserve_server.code_sampling import CodeProgress, CodeSamples
from genserve_server.core import Call, GenerationCore
from genserve_server.encoding import EncodedImage
from genserve_server.errors import invalid
from genserve_server.repository import ModelVersion
from genserve_server.step_sampler import CODE_RNG_ALGORITHM, SamplingOptions, check_grids, check_labels
from genserve_server.validate import OutputSpec

Provenance = Callable[[ModelVersion, Sequence[int], Sequence[ModelVersion] | None], tpb.Provenance]


def codes_tensor(tensor: tpb.Tensor, field: str) -> np.ndarray:
    """int64 codes from a Tensor of DTYPE_INT64, shape checked against its bytes."""
    if tensor.dtype != tpb.DTYPE_INT64:
        raise invalid(f"{field}.dtype", "must be DTYPE_INT64")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise invalid(f"{field}.shape", f"must be [N, H, W] or [H, W], got {list(shape)}")
    size = math.prod(shape)  # Python ints: a huge shape cannot wrap around to the data's size
    if size * 8 != len(tensor.data):
        raise invalid(
            f"{field}.data", f"must hold {size * 8} bytes for shape {list(shape)}, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype="<i8").reshape(shape)


def codes_proto(grid: np.ndarray) -> tpb.Tensor:
    return tpb.Tensor(shape=grid.shape, dtype=tpb.DTYPE_INT64, data=grid.astype("<i8", copy=False).tobytes())


def sample_limit(core: GenerationCore, call: Call, mv: ModelVersion, *, top_given: bool) -> tuple[int, str]:
    """The most samples one SampleCodes of prior `mv` may ask for, and the name of that limit: the
    server's max_images_per_request, the prior's row budget, its top prior's where that samples the
    top grids, and its decoder's queue (a request's grids are decoded in one request to it: more
    than the whole queue never fit, and were found out only once every grid was sampled)."""
    limit, name = core.limits.max_images_per_request, "max_images_per_request"
    top = None if top_given else code_sampling.top_prior(core, call, mv)
    for prior in (mv, top):
        if prior is not None and prior.config.batching.max_batch_size < limit:
            limit, name = (
                prior.config.batching.max_batch_size,
                f"{prior.name}'s row budget, batching.max_batch_size",
            )
    decoder = code_sampling.code_decoder(core, call, mv)
    if decoder is not None and decoder.batcher is not None and decoder.batcher.max_queue_size < limit:
        limit, name = decoder.batcher.max_queue_size, f"{decoder.name}'s batching.max_queue_size"
    return limit, name


@dataclass(frozen=True, slots=True)
class _Parsed:
    mv: ModelVersion
    seeds: list[int]
    labels: list[int] | None
    tops: np.ndarray | None
    options: SamplingOptions


def _parse(
    core: GenerationCore, request: pb.SampleCodesRequest, call: Call, out: OutputSpec, rpc: str
) -> _Parsed:
    mv = core.resolve(call, request.model, request.version, (Kind.CODE_PRIOR,), rpc)
    card = mv.card
    assert card is not None and card.codebook_size is not None and card.grid is not None
    if out.return_latents:
        raise invalid("output.return_latents", f"not accepted by {rpc} (use return_codes)")
    limit, limit_name = sample_limit(core, call, mv, top_given=request.HasField("top_codes"))
    seeds = validate.request_seeds(
        request.seeds,
        request.count,
        request.base_seed if request.HasField("base_seed") else None,
        limit,
        core.random_base_seed,
        limit_name,
    )
    n = len(seeds)
    labels = check_labels(request.labels, card.class_names, n, mv.name)
    options = SamplingOptions.checked(
        request.temperature if request.HasField("temperature") else None, request.top_k, card.codebook_size
    )
    positions = card.grid[0] * card.grid[1]
    if request.preview_every >= positions:  # a level's last step is no chunk: it would send none
        raise invalid(
            "preview_every",
            f"must be in 0..{positions - 1} (a chunk comes at each multiple short of the grid's {positions} "
            f"positions: {positions} or more sends none; SampleCodes answers without progress), "
            f"got {request.preview_every}",
        )
    tops: np.ndarray | None = None
    if card.top_grid is not None:
        assert card.top_codebook_size is not None
        if not request.HasField("top_codes") and not mv.config.top_prior:
            raise invalid(
                "top_codes",
                f"required for bottom prior {mv.name}: int64 [N, {card.top_grid[0]}, {card.top_grid[1]}]",
            )
        if request.HasField("top_codes"):  # else the top prior samples them (config.json top_prior)
            given = codes_tensor(request.top_codes, "top_codes")
            tops = check_grids(given, n, card.top_grid, card.top_codebook_size, "top_codes")
    elif request.HasField("top_codes"):
        raise invalid("top_codes", f"{mv.name} is not a bottom prior (no top_grid); send no top_codes")
    options = _with_top_level(request, mv, options, samples_top=card.top_grid is not None and tops is None)
    return _Parsed(mv, list(seeds), labels, tops, options)


def _with_top_level(
    request: pb.SampleCodesRequest, mv: ModelVersion, options: SamplingOptions, *, samples_top: bool
) -> SamplingOptions:
    """`options` with the request's top_temperature and top_top_k, refused (INVALID_ARGUMENT) where
    no top prior samples top grids in this call."""
    if not request.HasField("top_temperature") and not request.top_top_k:
        return options
    field = "top_temperature" if request.HasField("top_temperature") else "top_top_k"
    if not samples_top:
        why = "its top_codes are given" if request.HasField("top_codes") else "it samples one level"
        raise invalid(
            field,
            f"only for a bottom prior whose top prior samples the top grids; {mv.name} samples none "
            f"here ({why})",
        )
    assert mv.card is not None and mv.card.top_codebook_size is not None
    top = SamplingOptions.checked(
        request.top_temperature if request.HasField("top_temperature") else None,
        request.top_top_k,
        mv.card.top_codebook_size,
        fields=("top_temperature", "top_top_k"),
        unset_top_k="the request's top_k",
    )
    return dataclasses.replace(options, top_temperature=top.temperature, top_top_k=top.top_k)


def _images(
    into: Any, images: Sequence[EncodedImage], seeds: Sequence[int], labels: Sequence[int] | None
) -> None:
    for i, image in enumerate(images):
        g = into.add(index=i, seed=seeds[i])
        g.image.CopyFrom(
            tpb.Image(format=tpb.ImageFormat.ValueType(image.format), data=image.data, shape=image.shape)
        )
        if labels is not None:
            g.label = labels[i]


def _sampled_with(prior: ModelVersion, options: SamplingOptions) -> tuple[float, int]:
    """(temperature, top_k) prior version `prior` samples with for `options` (its step scheduler's
    defaults are its config's `sampling`); top_k 0, every code, as its codebook_size."""
    card = prior.card
    assert card is not None and card.codebook_size is not None
    temperature, top_k = options.resolved(prior.config.sampling)
    return temperature, top_k or card.codebook_size


def _response(
    p: _Parsed, sampled: CodeSamples, request: pb.SampleCodesRequest, provenance: Provenance, call: Call
) -> pb.SampleCodesResponse:
    response = pb.SampleCodesResponse(provenance=provenance(p.mv, sampled.executed_batch_sizes, call.uses))
    response.provenance.rng_algorithm = CODE_RNG_ALGORITHM
    # What the priors sampled with, config.json's defaults filled in: the request alone does not say
    # (types.proto Provenance.temperature).
    response.provenance.temperature, response.provenance.top_k = _sampled_with(p.mv, p.options)
    if p.tops is None and p.mv.config.top_prior:  # its top prior sampled the top grids
        for used, entry in zip(call.uses or (), response.provenance.used_models, strict=True):
            if used.name == p.mv.config.top_prior:
                card = used.card
                assert card is not None and card.codebook_size is not None
                entry.temperature, entry.top_k = _sampled_with(used, p.options.top_level(card.codebook_size))
    response.seeds.extend(p.seeds)  # also where no image carries them (a prior without a decoder)
    _images(response.images, sampled.images, p.seeds, p.labels)
    if request.return_codes or not sampled.images:
        response.codes.extend(codes_proto(grid) for grid in sampled.codes)
        if sampled.tops is not None:
            response.top_codes.extend(codes_proto(grid) for grid in sampled.tops)
    return response


async def sample_codes(
    core: GenerationCore,
    request: pb.SampleCodesRequest,
    call: Call,
    out: OutputSpec,
    provenance: Provenance,
) -> pb.SampleCodesResponse:
    p = _parse(core, request, call, out, "SampleCodes")
    sampled = await code_sampling.sample_codes(
        core, p.mv, call, p.seeds, p.labels, p.tops, p.options, out, return_codes=request.return_codes
    )
    return _response(p, sampled, request, provenance, call)


async def sample_codes_stream(
    core: GenerationCore,
    request: pb.SampleCodesRequest,
    call: Call,
    out: OutputSpec,
    provenance: Provenance,
) -> AsyncIterator[pb.SampleCodesChunk]:
    p = _parse(core, request, call, out, "SampleCodesStream")
    stream = code_sampling.sample_codes_stream(
        core,
        p.mv,
        call,
        p.seeds,
        p.labels,
        p.tops,
        p.options,
        out,
        request.preview_every,
        return_codes=request.return_codes,
    )
    async for item in stream:
        if isinstance(item, CodeProgress):
            chunk = pb.SampleCodesChunk(level=item.level, filled=item.filled, positions=item.positions)
            _images(chunk.previews, item.previews, p.seeds, p.labels)
            yield chunk
        else:
            positions = int(item.codes.shape[1] * item.codes.shape[2])
            result = _response(p, item, request, provenance, call)
            yield pb.SampleCodesChunk(
                level=code_sampling.CODES_LEVEL, filled=positions, positions=positions, result=result
            )
