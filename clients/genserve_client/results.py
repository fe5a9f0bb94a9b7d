"""Typed results: numpy arrays (zero-copy views where the format allows), PIL on request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TypedDict

import grpc
import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from genserve.v1 import genserve_pb2, types_pb2
from genserve_client.convert import array_to_pil, image_to_array, tensor_to_array
from genserve_client.errors import GenserveClientError


class ReplayOptions(TypedDict, total=False):
    """A code prior's sampling as `sample_codes` options (requests.CodesOptions' keys and types), so
    that `**provenance.replay_options()` type-checks where the options do."""

    temperature: float
    top_k: int
    top_temperature: float
    top_top_k: int


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where images came from (see types.proto Provenance)."""

    model: str
    version: str
    model_sha256: str
    onnxruntime_version: str
    execution_provider: str
    precision: str
    executed_batch_sizes: tuple[int, ...]
    rng_algorithm: str
    server_version: str
    # (model, version, sha256) of the other models the images went through (a style generator's
    # mapping, a code prior's top prior and decoder).
    used_models: tuple[tuple[str, str, str], ...] = ()
    # The digest of the external data files the model loaded its weights from (types.proto); "" where
    # its graph file holds them (model_sha256 covers them) or the server does not say.
    weights_sha256: str = ""
    # (model, weights_sha256) of those of used_models that keep their weights in external data files
    # (UsedModel.weights_sha256): a mapping retrained under the same graph keeps its sha256.
    used_weights_sha256: tuple[tuple[str, str], ...] = ()
    # A code prior's (SampleCodes): the temperature and top_k it sampled with, config.json's defaults
    # filled in (types.proto); None and 0 for other models or a server that does not say.
    temperature: float | None = None
    top_k: int = 0
    # (model, temperature, top_k) of a code prior's top prior that sampled the top grids.
    used_sampling: tuple[tuple[str, float, int], ...] = ()
    # The sha256 of the card.json the model loaded (types.proto): its w_avg, output_range or tile
    # defaults change the images under the same graph; "" where the server does not say.
    card_sha256: str = ""
    # (model, card_sha256) of those of used_models whose server reports it (UsedModel.card_sha256).
    used_card_sha256: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_proto(cls, p: types_pb2.Provenance) -> Provenance:
        return cls(
            p.model,
            p.version,
            p.model_sha256,
            p.onnxruntime_version,
            p.execution_provider,
            p.precision,
            tuple(p.executed_batch_sizes),
            p.rng_algorithm,
            p.server_version,
            tuple((m.model, m.version, m.model_sha256) for m in p.used_models),
            p.weights_sha256,
            tuple((m.model, m.weights_sha256) for m in p.used_models if m.weights_sha256),
            p.temperature if p.HasField("temperature") else None,
            p.top_k,
            tuple((m.model, m.temperature, m.top_k) for m in p.used_models if m.HasField("temperature")),
            p.card_sha256,
            tuple((m.model, m.card_sha256) for m in p.used_models if m.card_sha256),
        )

    def replay_options(self) -> ReplayOptions:
        """A code prior's sampling as it ran, as `sample_codes` options: with the same model,
        version, seeds and labels, the same grids and images bit for bit. `temperature` and `top_k`,
        and where a top prior sampled the top grids at its own settings `top_temperature` and
        `top_top_k` (a provenance without them: both levels at `temperature` and `top_k`, as it
        always replayed); empty for other models."""
        if self.temperature is None:
            return {}
        options: ReplayOptions = {"temperature": self.temperature, "top_k": self.top_k}
        for _, temperature, top_k in self.used_sampling[:1]:  # a two-level prior has one top prior
            options["top_temperature"], options["top_top_k"] = temperature, top_k
        return options


@dataclass(frozen=True, slots=True)
class GeneratedItem:
    """One generated image and what made it."""

    index: int
    seed: int | None
    label: int | None
    message: types_pb2.Image
    latent: npt.NDArray[np.float32] | None
    # Served from the server's image cache, not computed for this request.
    from_cache: bool = False

    @property
    def raw(self) -> bytes:
        """The bytes as the server sent them (PNG/JPEG/WEBP file, or raw pixels)."""
        data: bytes = self.message.data
        return data

    @property
    def array(self) -> npt.NDArray[np.generic]:
        return image_to_array(self.message)

    @classmethod
    def from_proto(cls, g: types_pb2.GeneratedImage) -> GeneratedItem:
        return cls(
            index=g.index,
            seed=g.seed if g.HasField("seed") else None,
            label=g.label if g.HasField("label") else None,
            message=g.image,
            latent=tensor_to_array(g.latent).astype(np.float32, copy=False) if g.HasField("latent") else None,
            from_cache=g.from_cache,
        )


class _Images:
    """Shared image accessors for results that carry a list of Image messages."""

    __slots__ = ()

    def _messages(self) -> Sequence[types_pb2.Image]:
        raise NotImplementedError

    @property
    def raw(self) -> list[bytes]:
        return [m.data for m in self._messages()]

    @cached_property
    def images(self) -> list[npt.NDArray[np.generic]]:
        """uint8 HWC for PNG/JPEG/WEBP/RAW, float32 CHW for TENSOR_F32 (RAW/TENSOR: no copy)."""
        return [image_to_array(m) for m in self._messages()]

    def pil(self, value_range: tuple[float, float] | None = None) -> list[PILImage.Image]:
        return [array_to_pil(a, value_range) for a in self.images]


@dataclass(frozen=True)
class SampleResult(_Images):
    """Sample / Interpolate / Decode responses and each SampleStream chunk."""

    items: list[GeneratedItem]
    provenance: Provenance
    request_id: str | None = None

    def _messages(self) -> Sequence[types_pb2.Image]:
        return [item.message for item in self.items]

    @property
    def seeds(self) -> list[int | None]:
        return [item.seed for item in self.items]

    @property
    def labels(self) -> list[int | None]:
        return [item.label for item in self.items]

    @property
    def indices(self) -> list[int]:
        return [item.index for item in self.items]

    @property
    def latents(self) -> npt.NDArray[np.float32] | None:
        """float32 [N, Z] when the request asked for return_latents, else None."""
        lat = [item.latent for item in self.items]
        if not lat or any(z is None for z in lat):
            return None
        return np.stack([z for z in lat if z is not None])

    @classmethod
    def from_proto(
        cls, resp: genserve_pb2.SampleResponse | genserve_pb2.SampleStreamChunk, request_id: str | None
    ) -> SampleResult:
        return cls(
            [GeneratedItem.from_proto(g) for g in resp.images],
            Provenance.from_proto(resp.provenance),
            request_id,
        )


@dataclass(frozen=True)
class CodesResult(SampleResult):
    """SampleCodes responses: the images (empty for a prior without a decoder) and, when asked or
    when there are no images, each sample's code grid int64 [H, W] (and its top grid)."""

    codes: list[npt.NDArray[np.int64]] = field(default_factory=list)
    top_codes: list[npt.NDArray[np.int64]] = field(default_factory=list)
    # SampleCodesResponse.seeds: sample i's seed, also where there are no images (no decoder).
    sample_seeds: list[int] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        """Sample i's seed: the response's (a server older than its `seeds` field: the images', or
        without images the request's seeds or base_seed + i, None where the server picked them)."""
        if self.sample_seeds:
            return list(self.sample_seeds)
        if not self.items:
            return [None] * len(self.codes)
        return super().seeds

    @classmethod
    def from_codes_proto(
        cls,
        resp: genserve_pb2.SampleCodesResponse,
        request_id: str | None,
        request: genserve_pb2.SampleCodesRequest | None = None,
    ) -> CodesResult:
        def grids(tensors: Sequence[types_pb2.Tensor]) -> list[npt.NDArray[np.int64]]:
            return [tensor_to_array(t).astype(np.int64, copy=False) for t in tensors]

        provenance = Provenance.from_proto(resp.provenance)
        if request is not None:
            _check_top_level_applied(request, provenance, request_id)
        seeds = list(resp.seeds)
        if not seeds and not resp.images and request is not None:
            # A server older than SampleCodesResponse.seeds, grids only: the seeds the request gave.
            if request.seeds:
                seeds = list(request.seeds)
            elif request.HasField("base_seed"):
                seeds = [request.base_seed + i for i in range(len(resp.codes))]
        return cls(
            [GeneratedItem.from_proto(g) for g in resp.images],
            provenance,
            request_id,
            grids(resp.codes),
            grids(resp.top_codes),
            seeds,
        )


@dataclass(frozen=True)
class CodesProgress(_Images):
    """A SampleCodesStream progress chunk: `filled` of `positions` at `level` ("top" or "codes"),
    with previews (the grids so far, decoded) at the "codes" level of a prior with a decoder."""

    level: str
    filled: int
    positions: int
    previews: list[GeneratedItem]

    def _messages(self) -> Sequence[types_pb2.Image]:
        return [item.message for item in self.previews]

    @classmethod
    def from_proto(cls, chunk: genserve_pb2.SampleCodesChunk) -> CodesProgress:
        return cls(
            chunk.level, chunk.filled, chunk.positions, [GeneratedItem.from_proto(g) for g in chunk.previews]
        )


@dataclass(frozen=True)
class ImageResult(_Images):
    """SuperResolve / Translate responses."""

    messages: list[types_pb2.Image]
    provenance: Provenance
    tiles: list[int]
    request_id: str | None = None

    def _messages(self) -> Sequence[types_pb2.Image]:
        return self.messages

    @classmethod
    def from_proto(cls, resp: genserve_pb2.ImageResponse, request_id: str | None) -> ImageResult:
        return cls(list(resp.images), Provenance.from_proto(resp.provenance), list(resp.tiles), request_id)


@dataclass(frozen=True)
class EncodeResult:
    """VAE encoder output: mu and logvar [N, Z] and, when asked, a sample z [N, Z]."""

    mu: npt.NDArray[np.float32]
    logvar: npt.NDArray[np.float32]
    z: npt.NDArray[np.float32] | None
    provenance: Provenance
    request_id: str | None = None

    @classmethod
    def from_proto(
        cls,
        resp: genserve_pb2.EncodeResponse,
        request_id: str | None,
        request: genserve_pb2.EncodeRequest | None = None,
    ) -> EncodeResult:
        """INTERNAL naming what is missing where the answer holds no latents, or (`request` given)
        not one per image sent: a server always does, a proxy or an older server may not."""
        sent, n = (len(request.images) if request is not None else None), len(resp.latents)
        if not n or (sent is not None and n != sent):
            got = f"{n} latent{'' if n == 1 else 's'}" if n else "no latents"
            images = f" for the {sent} image{'s' if sent != 1 else ''} sent" if sent is not None else ""
            raise GenserveClientError(
                grpc.StatusCode.INTERNAL,
                f"the server's Encode answer holds {got}{images} (one latent per image expected)",
                request_id,
            )

        def stack(name: str) -> npt.NDArray[np.float32]:
            return np.stack([tensor_to_array(getattr(d, name)) for d in resp.latents]).astype(np.float32)

        has_z = bool(resp.latents) and all(d.HasField("z") for d in resp.latents)
        return cls(
            stack("mu"),
            stack("logvar"),
            stack("z") if has_z else None,
            Provenance.from_proto(resp.provenance),
            request_id,
        )


def _check_top_level_applied(
    request: genserve_pb2.SampleCodesRequest, provenance: Provenance, request_id: str | None
) -> None:
    """A server older than SampleCodesRequest.top_temperature / top_top_k ignores them (unknown
    fields) and samples the top grids at its defaults: grids other than those asked for. Where the
    provenance does not show the top level sampled as asked, FAILED_PRECONDITION naming the field."""
    asked: list[tuple[str, float | int, int]] = []  # (field, value, its index in used_sampling's rows)
    if request.HasField("top_temperature"):
        asked.append(("top_temperature", float(np.float32(request.top_temperature)), 1))
    if request.top_top_k:
        asked.append(("top_top_k", request.top_top_k, 2))
    top = provenance.used_sampling[:1]  # a two-level prior has one top prior
    for name, value, at in asked:
        if not top or top[0][at] != value:
            shown = f"{top[0][at]:g}" if top else "no top level sampling"
            raise GenserveClientError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server did not apply {name}={value:g} (its provenance shows {shown}): a server "
                f"older than {name} ignores it; upgrade the server or send no {name}",
                request_id,
            )
