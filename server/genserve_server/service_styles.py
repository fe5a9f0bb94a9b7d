"""genserve.v1 on style generators: MixStyles, and Interpolate in w space (style_sampling.py does the
work). A sibling of service.py's handlers, kept apart so that service.py stays a list of thin
handlers."""

from __future__ import annotations

import numpy as np

from genserve.v1 import genserve_pb2 as pb
from genserve_contract.kinds import Kind
from genserve_server import style_sampling, validate
from genserve_server.batcher import Lane
from genserve_server.config import Limits
from genserve_server.core import Call, GenerationCore
from genserve_server.errors import invalid
from genserve_server.repository import ModelVersion
from genserve_server.service_parts import (
    add_generated,
    lane,
    latent_point,
    output_spec,
    provenance,
    row_limit,
)
from genserve_server.validate import OutputSpec


async def interpolate_styles(
    core: GenerationCore,
    request: pb.InterpolateRequest,
    call: Call,
    mv: ModelVersion,
    psi: float | None,
    out: OutputSpec,
) -> pb.SampleResponse:
    """Interpolate on a style generator: a straight line in w space (style_sampling.interpolate)."""
    card = mv.card
    assert card is not None and card.latent_dim is not None
    if request.mode == pb.INTERPOLATION_MODE_SLERP:
        raise invalid(
            "mode",
            "a style generator interpolates in w space along a straight line: LERP or unspecified "
            "(SLERP is for Gaussian latents, and w is not Gaussian)",
        )
    if request.labels:
        validate.labels(request.labels, card, request.steps)  # raises: a style generator takes none
    # The ends' z untruncated: truncation is in w space.
    start, start_seed = latent_point(request.start, card.latent_dim, None, "start")
    end, end_seed = latent_point(request.end, card.latent_dim, None, "end")
    images, path, batch_sizes = await style_sampling.interpolate(
        core, mv, call, start, end, request.steps, psi, out
    )
    response = pb.SampleResponse(provenance=provenance(mv, batch_sizes, call.uses))
    add_generated(response.images, images, path, None, None, out)
    if start_seed is not None:
        response.images[0].seed = start_seed
    if end_seed is not None:
        response.images[-1].seed = end_seed
    return response


async def mix_styles(
    core: GenerationCore, limits: Limits, request: pb.MixStylesRequest, call: Call
) -> pb.SampleResponse:
    """MixStyles: coarse layers from one seed, fine from another (style_sampling.mix)."""
    mv = core.resolve(call, request.model, request.version, (Kind.STYLE_GENERATOR,), "MixStyles")
    card = mv.card
    assert card is not None and card.num_layers is not None
    out = output_spec(request.output)
    if out.return_latents:
        raise invalid("output.return_latents", "not supported by MixStyles (a mixed image has two w)")
    priority = lane(request.priority, Lane.INTERACTIVE)
    validate.count(len(request.mixes), "mixes", *row_limit(limits.max_images_per_request, mv))
    default_psi = validate.psi(
        request.truncation_psi if request.HasField("truncation_psi") else None, w_space=True
    )
    layers = card.num_layers
    default_crossover = request.crossover
    if default_crossover:
        style_sampling.check_crossover(default_crossover, layers, "crossover")
    coarse: list[int] = []
    fine: list[int] = []
    crossovers: list[int] = []
    psis: list[float | None] = []
    for i, mix in enumerate(request.mixes):
        coarse.append(validate.seed(mix.coarse_seed, f"mixes[{i}].coarse_seed"))
        fine.append(validate.seed(mix.fine_seed, f"mixes[{i}].fine_seed"))
        if mix.crossover:
            crossovers.append(style_sampling.check_crossover(mix.crossover, layers, f"mixes[{i}].crossover"))
        elif default_crossover:
            crossovers.append(default_crossover)
        else:
            raise invalid(
                f"mixes[{i}].crossover",
                f"required here or in crossover: 0 < crossover < num_layers = {layers}",
            )
        given = mix.truncation_psi if mix.HasField("truncation_psi") else None
        psi = validate.psi(given, f"mixes[{i}].truncation_psi", w_space=True)
        psis.append(default_psi if psi is None else psi)
    # Every distinct seed is mapped in one request to the mapping's queue (style_sampling.mix): up to
    # twice as many rows as mixes, which row_limit does not bound.
    distinct = len(set(coarse) | set(fine))
    mapping = style_sampling.style_mapping(core, call, mv)
    queue = mapping.batcher.max_queue_size if mapping.batcher is not None else distinct
    if distinct > queue:
        raise invalid(
            "mixes",
            f"{len(coarse)} mixes of {distinct} distinct seeds: at most {queue} distinct seeds "
            f"({mapping.name}'s batching.max_queue_size: each distinct seed is mapped in one request to "
            "its queue); send fewer mixes or share seeds between them",
        )
    images, batch_sizes = await style_sampling.mix(
        core, mv, call, coarse, fine, crossovers, psis, out, priority
    )
    response = pb.SampleResponse(provenance=provenance(mv, batch_sizes, call.uses))
    add_generated(response.images, images, np.empty(0), coarse, None, out)
    return response
