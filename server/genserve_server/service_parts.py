"""genserve.v1 message parts shared by the servicer's handlers (service.py and its siblings): the
proto <-> value converters at the edge (output options, lanes, latent tensors, latent points) and
the response's parts (provenance, generated images)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from genserve.v1 import genserve_pb2 as pb
from genserve.v1 import types_pb2 as tpb
from genserve_server import latents, validate
from genserve_server.batcher import Lane
from genserve_server.encoding import EncodedImage
from genserve_server.errors import invalid
from genserve_server.repository import ModelVersion
from genserve_server.validate import OutputSpec
from genserve_server.version import SERVER_VERSION

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer


def output_spec(options: tpb.OutputOptions, field_prefix: str = "output") -> OutputSpec:
    compression = options.png_compression if options.HasField("png_compression") else None
    return validate.output_spec(
        options.format, options.quality, compression, options.return_latents, field_prefix
    )


def row_limit(
    per_request: int, *versions: ModelVersion, per_request_name: str = "max_images_per_request"
) -> tuple[int, str]:
    """The most images one request may ask of the model `versions` it goes to (a style generator's
    rows go to its mapping too) and the name of that limit: the server's `per_request`
    (`per_request_name`), or the smallest of their queues (a request's rows are in each queue at
    once: more than a whole queue never fit, even split over several batch keys)."""
    limit, name = per_request, per_request_name
    for mv in versions:
        if mv.batcher is not None and mv.batcher.max_queue_size < limit:
            limit, name = mv.batcher.max_queue_size, f"{mv.name}'s batching.max_queue_size"
    return limit, name


def lane(priority: int, default: Lane, field_prefix: str = "") -> Lane:
    if priority == tpb.PRIORITY_INTERACTIVE:
        return Lane.INTERACTIVE
    if priority == tpb.PRIORITY_BULK:
        return Lane.BULK
    if priority != tpb.PRIORITY_UNSPECIFIED:
        raise invalid(f"{field_prefix}priority", f"unknown priority {priority}")
    return default


def latent_tensor(tensor: tpb.Tensor, dim: int, field: str, *, vector: bool = False) -> np.ndarray:
    """float32 [N, dim] (or [dim] when `vector`) from a Tensor, zero-copy, finite and bounded."""
    if tensor.dtype not in (tpb.DTYPE_UNSPECIFIED, tpb.DTYPE_FLOAT32):
        raise invalid(f"{field}.dtype", "must be DTYPE_FLOAT32")
    return validate.latent_bytes(tensor.data, tensor.shape, dim, field, vector=vector)


def latent_proto(z: np.ndarray) -> tpb.Tensor:
    return tpb.Tensor(shape=z.shape, dtype=tpb.DTYPE_FLOAT32, data=z.astype("<f4", copy=False).tobytes())


def add_images(into: RepeatedCompositeFieldContainer[tpb.Image], images: Sequence[EncodedImage]) -> None:
    """Each image added to `into` (a response's repeated `images`), built in place as add_generated
    builds them: an Image built apart and given to the response's constructor is copied again on the
    event loop (~150 ms of a 50 MB SuperResolve)."""
    for im in images:
        into.add(format=tpb.ImageFormat.ValueType(im.format), data=im.data, shape=im.shape)


def _card_sha256(mv: ModelVersion) -> str:
    """Provenance.card_sha256: the sha256 of the card.json `mv` loaded ("" before its card is read)."""
    return mv.card.file_sha256 if mv.card is not None else ""


def provenance(
    mv: ModelVersion, batch_sizes: Sequence[int], uses: Sequence[ModelVersion] | None = None
) -> tpb.Provenance:
    """`uses`: the versions of other models the images went through (Call.uses)."""
    return tpb.Provenance(
        model=mv.name,
        version=mv.version,
        model_sha256=mv.sha256,
        weights_sha256=mv.weights_sha256,
        card_sha256=_card_sha256(mv),
        onnxruntime_version=ort.__version__,
        execution_provider=mv.provider,
        precision=mv.precision,
        executed_batch_sizes=batch_sizes,
        rng_algorithm=latents.RNG_ALGORITHM,
        server_version=SERVER_VERSION,
        used_models=[
            tpb.UsedModel(
                model=used.name,
                version=used.version,
                model_sha256=used.sha256,
                weights_sha256=used.weights_sha256,
                card_sha256=_card_sha256(used),
            )
            for used in uses or ()
        ],
    )


def add_generated(
    into: RepeatedCompositeFieldContainer[tpb.GeneratedImage],
    images: Sequence[EncodedImage],
    z: np.ndarray,
    seeds: Sequence[int] | None,
    labels: np.ndarray | None,
    out: OutputSpec,
    first_index: int = 0,
    from_cache: Sequence[bool] | None = None,
) -> None:
    """Each image added to `into` (a response's repeated `images`), built in place: a message
    built apart and then put in the response is copied again, ~50 ms of event loop a 50 MB one."""
    for i, image in enumerate(images):
        g = into.add(index=first_index + i)
        g.image.format = tpb.ImageFormat.ValueType(image.format)
        g.image.data = image.data
        g.image.shape.extend(image.shape)
        if seeds is not None:
            g.seed = seeds[i]
        if labels is not None:
            g.label = int(labels[i])
        if out.return_latents:
            g.latent.CopyFrom(latent_proto(z[i]))
        if from_cache is not None:
            g.from_cache = from_cache[i]


def latent_point(
    point: pb.LatentPoint, dim: int, psi: float | None, field: str
) -> tuple[np.ndarray, int | None]:
    which = point.WhichOneof("point")
    if which == "seed":
        seed = validate.seed(point.seed, f"{field}.seed")  # here: latents_for_seeds would say "seed[0]"
        return latents.latents_for_seeds([seed], dim, psi, field=f"{field}.seed")[0], seed
    if which == "latent":
        return latent_tensor(point.latent, dim, f"{field}.latent", vector=True), None
    raise invalid(field, "required: a seed or a latent")
