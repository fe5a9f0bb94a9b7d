"""Request builders shared by the sync and asyncio clients (so the two cannot drift apart).

Each RPC's keyword options are declared once, as a TypedDict; the clients' typed methods take
`**opts: Unpack[...]` of the same TypedDict and hand them here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias, TypedDict, TypeVar, Unpack

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image as PILImage

from genserve.v1 import genserve_pb2, types_pb2
from genserve_client.convert import (
    ImageInputs,
    array_to_tensor,
    codes_to_tensor,
    image_format,
    to_image_message,
)

Format: TypeAlias = "str | types_pb2.ImageFormat.ValueType"
Latent: TypeAlias = "int | npt.ArrayLike"  # a seed, or an explicit float32 [Z] latent
# Seeds and labels: a list of ints or a numpy integer array (`np.arange(n)`), as protobuf takes them.
Ints: TypeAlias = "Sequence[int] | npt.NDArray[np.integer[Any]]"
# One integer the builders check as an int or a numpy integer (a crossover from np.arange).
Int: TypeAlias = "int | np.integer[Any]"

# Translate's direction: a two_way_translator's A -> B (the default) or B -> A (its card's `domains`).
DIRECTIONS = {
    "a_to_b": genserve_pb2.DIRECTION_A_TO_B,
    "b_to_a": genserve_pb2.DIRECTION_B_TO_A,
}
_MODES = {
    "slerp": genserve_pb2.INTERPOLATION_MODE_SLERP,
    "lerp": genserve_pb2.INTERPOLATION_MODE_LERP,
}


class OutputOptions(TypedDict, total=False):
    """How images come back (types.proto OutputOptions). Default PNG."""

    format: Format
    quality: int  # JPEG and WEBP: 1..100 (0: 90); with another format the server refuses it
    png_compression: int  # PNG: 0..9 (unset: 1); with another format the server refuses it
    return_latents: bool


class SampleOptions(OutputOptions, total=False):
    seeds: Ints
    base_seed: int
    latents: npt.ArrayLike
    labels: Ints
    psi: float
    version: str
    priority: types_pb2.Priority.ValueType


class StreamOptions(OutputOptions, total=False):
    base_seed: int
    labels: Ints
    psi: float
    version: str
    start_index: Int
    chunk_size: int


class CodesOptions(OutputOptions, total=False):
    """SampleCodes / SampleCodesStream (genserve.proto SampleCodesRequest)."""

    seeds: Ints
    base_seed: int
    labels: Ints
    temperature: float
    top_k: int
    # A bottom prior whose top prior samples the top grids: that level's own (absent: as above)
    top_temperature: float
    top_top_k: int
    top_codes: npt.ArrayLike  # int64 [N, Ht, Wt] or [Ht, Wt]: a bottom prior's given top grids
    return_codes: bool
    version: str


class CodesProgressOptions(CodesOptions, total=False):
    """SampleCodesStream's options: SampleCodes' and its progress chunks' spacing (SampleCodes
    refuses preview_every)."""

    preview_every: int  # steps between progress chunks (0: about 8 per level)


class InterpolateOptions(OutputOptions, total=False):
    # "slerp" or "lerp"; absent: the server's choice (slerp in z, a straight line in a style
    # generator's w space)
    mode: str
    labels: Ints
    psi: float
    version: str


class MixOptions(OutputOptions, total=False):
    """MixStyles (genserve.proto MixStylesRequest)."""

    crossover: Int  # the first fine layer of every mix that gives none: 0 < crossover < num_layers
    psi: float  # truncation in w space of every mix that gives none
    version: str
    priority: types_pb2.Priority.ValueType


# One image of a style mix: (coarse_seed, fine_seed) or (coarse_seed, fine_seed, crossover).
Mix: TypeAlias = "tuple[Int, Int] | tuple[Int, Int, Int]"


class EncodeOptions(TypedDict, total=False):
    sample: bool
    seed: int
    version: str


class DecodeOptions(OutputOptions, total=False):
    version: str


class ImageOptions(OutputOptions, total=False):
    tile_size: int
    tile_overlap: int
    version: str
    direction: str  # Translate: "a_to_b" (the default) or "b_to_a" (a two_way_translator's reverse)


def check_options(method: str, opts: Mapping[str, object], allowed: Any) -> None:
    """TypeError naming the options `method` does not take (`allowed`: its options' TypedDict).
    `**opts` takes any keyword at run time, and a builder reads only its own: a misspelt or
    misplaced option (`seed=` for `base_seed=`, `seeds=` on sample_stream) was silently dropped."""
    known: frozenset[str] = allowed.__required_keys__ | allowed.__optional_keys__
    unknown = sorted(set(opts) - known)
    if unknown:
        raise TypeError(
            f"{method}() got unexpected keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; its options are {', '.join(sorted(known))}"
        )


M = TypeVar("M", bound=Message)

# The integer fields' ranges on the wire: protobuf's own refusal ("Value out of range: -1") named
# neither the field nor the range.
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}


def _field_error(cls: type[Message], prefix: str, name: str, value: object, exc: Exception) -> Exception:
    """`exc` (protobuf's TypeError or ValueError for a value a field cannot hold) as the same type,
    naming the field (the element of a repeated one) and what it holds."""
    field = cls.DESCRIPTOR.fields_by_name[name]
    where = f"{prefix}{name}"
    # is_repeated: protobuf >= 6.31 (label is deprecated there)
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        repeated = getattr(field, "label", None) == FieldDescriptor.LABEL_REPEATED
    if repeated and not isinstance(value, str | bytes):
        try:
            items = list(value)  # type: ignore[call-overload]
        except TypeError:
            return TypeError(f"{where}: must be a sequence, got {value!r}")
        for i, item in enumerate(items):
            try:
                cls(**{name: [item]})
            except (TypeError, ValueError) as item_exc:
                where, value, exc = f"{where}[{i}]", item, item_exc
                break
    if field.cpp_type in _INT_RANGES and isinstance(exc, ValueError):
        kind, lo, hi = _INT_RANGES[field.cpp_type]
        return ValueError(f"{where}: must be in [{lo}, {hi}] ({kind}), got {value!r}")
    return type(exc)(f"{where}: {exc} (got {value!r})")


def _build(cls: type[M], prefix: str = "", **fields: Any) -> M:
    """cls(**fields); a value a field cannot hold raises naming the field (`prefix` + its name)."""
    # An iterator (a generator of seeds) is read once: the field checks below would see it empty.
    fields = {name: list(value) if isinstance(value, Iterator) else value for name, value in fields.items()}
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                cls(**{name: value})
            except (TypeError, ValueError) as field_exc:
                raise _field_error(cls, prefix, name, value, field_exc) from None
        raise


def _assign(message: Message, name: str, value: object, prefix: str = "") -> None:
    """setattr(message, name, value), naming the field when it cannot hold the value."""
    try:
        setattr(message, name, value)
    except (TypeError, ValueError) as exc:
        raise _field_error(type(message), prefix, name, value, exc) from None


def image_messages(images: ImageInputs) -> list[types_pb2.Image]:
    """The request's images: a list of images, or an N x H x W x C array (N images). One image where
    a list belongs is refused: a path (a str is a sequence of one-letter paths: "No such file or
    directory: 'p'"), bytes (of integers), a PIL image, an HW array (of 1-D rows) or an HWC array
    (`np.asarray(Image.open(p))`: H gray images of W x C pixels) all failed with a message that
    never said to pass a list, or not at all. A 3-D array whose last axis is above 4 is N gray HW
    images; a 1-D array of paths or encoded files (str, bytes or object items:
    `df["path"].to_numpy()`) is a list."""
    what = None
    if isinstance(images, str | bytes | os.PathLike | PILImage.Image):
        what = f"one {type(images).__name__}"
    elif isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[2] <= 4):
            layout = "HW" if images.ndim == 2 else "HWC"
            what = f"one {layout} image (an array of shape {images.shape})"
        elif images.ndim < 2 and not (images.ndim == 1 and images.dtype.kind in "OUS"):
            what = f"a {images.ndim}-D array"
    if what is not None:
        raise TypeError(
            f"images: must be a list of images, got {what}; pass [image] for one "
            "(an N x H x W x C array is N images)"
        )
    messages = []
    for i, image in enumerate(images):
        try:
            messages.append(to_image_message(image))
        except ValueError as exc:  # a float or CHW array: name the image it is
            raise ValueError(f"images[{i}]: {exc}") from None
    return messages


def output_options(opts: OutputOptions) -> types_pb2.OutputOptions:
    out = _build(
        types_pb2.OutputOptions,
        "output.",
        format=image_format(opts.get("format", "png")),
        quality=opts.get("quality", 0),
        return_latents=opts.get("return_latents", False),
    )
    if "png_compression" in opts:
        _assign(out, "png_compression", opts["png_compression"], "output.")
    return out


def get_model_request(name: str, version: str = "") -> genserve_pb2.GetModelRequest:
    return _build(genserve_pb2.GetModelRequest, name=name, version=version)


def sample_request(model: str, n: int = 0, **opts: Unpack[SampleOptions]) -> genserve_pb2.SampleRequest:
    req = _build(
        genserve_pb2.SampleRequest,
        model=model,
        version=opts.get("version", ""),
        count=n,
        seeds=opts.get("seeds", ()),
        labels=opts.get("labels", ()),
        priority=opts.get("priority", types_pb2.PRIORITY_UNSPECIFIED),
        output=output_options(opts),
    )
    if "base_seed" in opts:
        _assign(req, "base_seed", opts["base_seed"])
    if "latents" in opts:
        req.latents.CopyFrom(array_to_tensor(opts["latents"]))
    if "psi" in opts:
        _assign(req, "truncation_psi", opts["psi"])
    return req


def sample_codes_request(
    model: str, n: int = 0, **opts: Unpack[CodesProgressOptions]
) -> genserve_pb2.SampleCodesRequest:
    req = _build(
        genserve_pb2.SampleCodesRequest,
        model=model,
        version=opts.get("version", ""),
        count=n,
        seeds=opts.get("seeds", ()),
        labels=opts.get("labels", ()),
        top_k=opts.get("top_k", 0),
        top_top_k=opts.get("top_top_k", 0),
        return_codes=opts.get("return_codes", False),
        preview_every=opts.get("preview_every", 0),
        output=output_options(opts),
    )
    if "base_seed" in opts:
        _assign(req, "base_seed", opts["base_seed"])
    if "temperature" in opts:
        _assign(req, "temperature", opts["temperature"])
    if "top_temperature" in opts:
        _assign(req, "top_temperature", opts["top_temperature"])
    if "top_codes" in opts:
        req.top_codes.CopyFrom(codes_to_tensor(opts["top_codes"]))
    return req


def sample_stream_request(
    model: str, count: Int, **opts: Unpack[StreamOptions]
) -> genserve_pb2.SampleStreamRequest:
    # A job of no images would silently yield nothing: refused. start_index == count is a stream
    # resumed after its last image (as genserve.proto allows): nothing is left, so it yields nothing
    # (the clients open no stream for it).
    start_index = opts.get("start_index", 0)
    for name, value in (("count", count), ("start_index", start_index)):
        if not isinstance(value, int | np.integer):  # compared below before any field is built
            raise TypeError(f"sample_stream: {name} must be an int, got {value!r}")
    if count < 1:
        raise ValueError(f"sample_stream: count must be >= 1, got {count}")
    if not 0 <= start_index <= count:
        raise ValueError(f"sample_stream: start_index must be in [0, count={count}], got {start_index}")
    sample = _build(
        genserve_pb2.SampleRequest,
        model=model,
        version=opts.get("version", ""),
        count=count,
        labels=opts.get("labels", ()),
        base_seed=opts.get("base_seed", 0),
        output=output_options(opts),
    )
    if "psi" in opts:
        _assign(sample, "truncation_psi", opts["psi"])
    return _build(
        genserve_pb2.SampleStreamRequest,
        sample=sample,
        start_index=start_index,
        chunk_size=opts.get("chunk_size", 0),
    )


def latent_point(point: Latent, where: str = "") -> genserve_pb2.LatentPoint:
    if isinstance(point, int | np.integer):
        # A bool (an int to Python) is left to protobuf, which refuses it as it does every seed's.
        seed = point if isinstance(point, bool) else int(point)
        return _build(genserve_pb2.LatentPoint, f"{where}.", seed=seed)
    if np.ndim(point) == 0:  # a float seed (1.0) went as a latent of one value, refused as its shape
        raise TypeError(
            f"{where}: a seed is an int and a latent a 1-D array of latent_dim floats, got {point!r}"
        )
    return genserve_pb2.LatentPoint(latent=array_to_tensor(point, where))


def interpolate_request(
    model: str, start: Latent, end: Latent, steps: int, **opts: Unpack[InterpolateOptions]
) -> genserve_pb2.InterpolateRequest:
    mode = opts.get("mode")
    if mode is not None and mode not in _MODES:
        raise ValueError(f"interpolation mode must be one of {sorted(_MODES)}, got {mode!r}")
    req = _build(
        genserve_pb2.InterpolateRequest,
        model=model,
        version=opts.get("version", ""),
        start=latent_point(start, "start"),
        end=latent_point(end, "end"),
        steps=steps,
        mode=genserve_pb2.INTERPOLATION_MODE_UNSPECIFIED if mode is None else _MODES[mode],
        labels=opts.get("labels", ()),
        output=output_options(opts),
    )
    if "psi" in opts:
        _assign(req, "truncation_psi", opts["psi"])
    return req


def _check_crossover(field: str, crossover: object) -> None:
    """An explicit crossover of 0 is out of range (0 < crossover < num_layers), but on the wire it is
    proto3's unset: a mix's would take the request's crossover (an image mixed elsewhere), the
    request's would come back as 'mixes[0].crossover: required'. A numpy integer 0 likewise."""
    if isinstance(crossover, int | np.integer) and not isinstance(crossover, bool) and crossover == 0:
        raise ValueError(
            f"{field}: must be in 1..num_layers - 1 (0 < crossover < num_layers: layers [0, crossover) "
            f"come from the coarse seed, the rest from the fine one), got 0"
        )


def mix_styles_request(
    model: str, mixes: Sequence[Mix], **opts: Unpack[MixOptions]
) -> genserve_pb2.MixStylesRequest:
    if opts.get("return_latents"):
        raise ValueError("mix_styles: return_latents is not supported (a mixed image has two w)")
    if "crossover" in opts:
        _check_crossover("crossover", opts["crossover"])
    req = _build(
        genserve_pb2.MixStylesRequest,
        model=model,
        version=opts.get("version", ""),
        crossover=opts.get("crossover", 0),
        output=output_options(opts),
        priority=opts.get("priority", types_pb2.PRIORITY_UNSPECIFIED),
    )
    for i, mix in enumerate(mixes):
        if not hasattr(mix, "__len__"):  # a seed: one mix's seeds given where the list of mixes belongs
            raise TypeError(
                f"mixes[{i}] must be (coarse_seed, fine_seed[, crossover]), got {mix!r}; "
                "pass [(coarse_seed, fine_seed)] for one mix"
            )
        if len(mix) not in (2, 3):
            raise ValueError(f"mixes[{i}] must be (coarse_seed, fine_seed[, crossover]), got {mix!r}")
        if len(mix) == 3:
            _check_crossover(f"mixes[{i}].crossover", mix[2])
        req.mixes.append(
            _build(
                genserve_pb2.StyleMix,
                f"mixes[{i}].",
                coarse_seed=mix[0],
                fine_seed=mix[1],
                crossover=mix[2] if len(mix) == 3 else 0,
            )
        )
    if "psi" in opts:
        _assign(req, "truncation_psi", opts["psi"])
    return req


def encode_request(
    model: str, images: ImageInputs, **opts: Unpack[EncodeOptions]
) -> genserve_pb2.EncodeRequest:
    return _build(
        genserve_pb2.EncodeRequest,
        model=model,
        version=opts.get("version", ""),
        images=image_messages(images),
        sample=opts.get("sample", False),
        seed=opts.get("seed", 0),
    )


def decode_request(
    model: str, latents: npt.ArrayLike, **opts: Unpack[DecodeOptions]
) -> genserve_pb2.DecodeRequest:
    return _build(
        genserve_pb2.DecodeRequest,
        model=model,
        version=opts.get("version", ""),
        latents=array_to_tensor(latents),
        output=output_options(opts),
    )


def image_request(model: str, images: ImageInputs, **opts: Unpack[ImageOptions]) -> genserve_pb2.ImageRequest:
    req = _build(
        genserve_pb2.ImageRequest,
        model=model,
        version=opts.get("version", ""),
        images=image_messages(images),
        output=output_options(opts),
        tile_size=opts.get("tile_size", 0),
    )
    if "tile_overlap" in opts:
        _assign(req, "tile_overlap", opts["tile_overlap"])
    if "direction" in opts:
        direction = opts["direction"]
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        req.direction = DIRECTIONS[direction]
    return req
