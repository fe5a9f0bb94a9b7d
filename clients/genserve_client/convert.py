"""numpy / PIL <-> genserve.v1 messages. Reading is zero-copy: arrays view the bytes fields."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image as PILImage

from genserve.v1 import types_pb2

ImageInput: TypeAlias = "np.ndarray | PILImage.Image | bytes | str | os.PathLike[str]"
# A request's images: a list of ImageInput, an N x H x W x C array (N images) or a 1-D array of
# paths or encoded files (requests.image_messages).
ImageInputs: TypeAlias = "Sequence[ImageInput] | npt.NDArray[Any]"

FORMATS: dict[str, types_pb2.ImageFormat.ValueType] = {
    "png": types_pb2.IMAGE_FORMAT_PNG,
    "jpeg": types_pb2.IMAGE_FORMAT_JPEG,
    "jpg": types_pb2.IMAGE_FORMAT_JPEG,
    "webp": types_pb2.IMAGE_FORMAT_WEBP,
    "raw": types_pb2.IMAGE_FORMAT_RAW_UINT8,
    "tensor": types_pb2.IMAGE_FORMAT_TENSOR_F32,
}
FILE_SUFFIX: dict[types_pb2.ImageFormat.ValueType, str] = {
    types_pb2.IMAGE_FORMAT_UNSPECIFIED: ".png",
    types_pb2.IMAGE_FORMAT_PNG: ".png",
    types_pb2.IMAGE_FORMAT_JPEG: ".jpg",
    types_pb2.IMAGE_FORMAT_WEBP: ".webp",
}

_LE_F32 = np.dtype("<f4")


def image_format(name: str | types_pb2.ImageFormat.ValueType) -> types_pb2.ImageFormat.ValueType:
    if isinstance(name, str):
        try:
            return FORMATS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown image format {name!r}; one of {sorted(FORMATS)}") from None
    return name


_LE_I64 = np.dtype("<i8")
_TENSOR_DTYPES: dict[int, np.dtype[np.generic]] = {
    types_pb2.DTYPE_UINT8: np.dtype(np.uint8),
    types_pb2.DTYPE_INT64: _LE_I64,
}


def tensor_to_array(tensor: types_pb2.Tensor) -> npt.NDArray[np.generic]:
    """A read-only view of the tensor's bytes (no copy): uint8, int64 (code grids) or float32."""
    dtype: np.dtype[np.generic] = _TENSOR_DTYPES.get(tensor.dtype, _LE_F32)
    array: npt.NDArray[np.generic] = np.frombuffer(tensor.data, dtype=dtype)
    return array.reshape(tuple(tensor.shape))


def codes_to_tensor(array: npt.ArrayLike, field: str = "top_codes") -> types_pb2.Tensor:
    """An int64 little-endian C-order tensor (code grids: SampleCodesRequest.top_codes). Codes are
    whole numbers that int64 holds (floats of whole values too); anything else is a ValueError
    naming `field`, never numpy's unchecked cast (3.7 -> 3, NaN -> -2^63, a uint64 wrapped)."""
    given = np.asarray(array)
    if given.dtype.kind not in "biu" or given.dtype == np.uint64:
        if given.dtype.kind not in "uf":
            raise ValueError(
                f"{field}: codes must be integers that int64 holds, got an array of {given.dtype}"
            )
        with np.errstate(invalid="ignore"):
            differ = given.astype(_LE_I64) != given  # NaN, 3.7, 2^63 and above
        if differ.any():
            bad = given.flat[int(np.argmax(differ))].item()
            raise ValueError(f"{field}: codes must be integers that int64 holds, got {bad!r}")
    arr = np.ascontiguousarray(given, dtype=_LE_I64)
    return types_pb2.Tensor(shape=arr.shape, dtype=types_pb2.DTYPE_INT64, data=arr.tobytes())


def _past_float32(field: str, where: tuple[int, ...], value: str) -> ValueError:
    return ValueError(
        f"{field}[{', '.join(str(int(i)) for i in where)}]: {value} is past float32's range "
        f"(|value| <= {float(np.finfo(np.float32).max):g}), which latents are sent as"
    )


def _not_floats(field: str, array: object, exc: Exception) -> ValueError:
    shown = repr(array)
    shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
    return ValueError(f"{field}: must be a float32 array of numbers, got {shown} ({exc})")


def _object_to_float64(given: npt.NDArray[np.generic], field: str) -> npt.NDArray[np.float64]:
    """An object array (numpy's of Python ints past int64) as float64; an int past even float64's
    range (10**400, numpy's bare 'int too large to convert to float') is refused as past float32's."""
    try:
        return given.astype(np.float64)
    except OverflowError:
        for where in np.ndindex(given.shape):
            value = given[where]
            if isinstance(value, int) and abs(value) > float(np.finfo(np.float64).max):
                exponent = int(math.log10(abs(value)))
                mantissa = 10 ** (math.log10(abs(value)) - exponent)
                raise _past_float32(
                    field, where, f"{'-' if value < 0 else ''}{mantissa:g}e+{exponent}"
                ) from None
        raise
    except (TypeError, ValueError) as exc:  # a str beside a big int: 'could not convert string to float'
        raise _not_floats(field, given.tolist(), exc) from None


def array_to_tensor(array: npt.ArrayLike, field: str = "latents") -> types_pb2.Tensor:
    """float32 little-endian C-order tensor (the only dtype latents accept). A finite value past
    float32's range is a ValueError naming `field` and its index, never the Inf the cast makes of
    it (which the server could only refuse as 'values must be finite'); what is no array of numbers
    (a str, a ragged list) is a ValueError naming `field`, not numpy's bare text."""
    try:
        given = np.asarray(array)
    except ValueError as exc:  # a ragged list: 'inhomogeneous shape'
        raise _not_floats(field, array, exc) from None
    if given.dtype == object:  # Python ints past int64 (10**40): checked as float64 values
        given = _object_to_float64(given, field)
    try:
        with np.errstate(over="ignore"):
            arr = np.ascontiguousarray(given, dtype=_LE_F32)
    except (TypeError, ValueError) as exc:  # a str: 'could not convert string to float'
        raise _not_floats(field, array, exc) from None
    if given.dtype.kind == "f" and given.dtype.itemsize > 4:
        overflowed = np.isinf(arr) & np.isfinite(given)
        if overflowed.any():
            where = np.unravel_index(int(np.argmax(overflowed)), given.shape)
            raise _past_float32(field, tuple(int(i) for i in where), f"{given[where].item():g}")
    return types_pb2.Tensor(shape=arr.shape, dtype=types_pb2.DTYPE_FLOAT32, data=arr.tobytes())


def image_to_array(image: types_pb2.Image) -> npt.NDArray[np.generic]:
    """RAW -> uint8 HWC view; TENSOR_F32 -> float32 CHW view; PNG/JPEG/WEBP -> decoded uint8 HWC."""
    if image.format == types_pb2.IMAGE_FORMAT_RAW_UINT8:
        return np.frombuffer(image.data, dtype=np.uint8).reshape(tuple(image.shape))
    if image.format == types_pb2.IMAGE_FORMAT_TENSOR_F32:
        return np.frombuffer(image.data, dtype=_LE_F32).reshape(tuple(image.shape))
    with PILImage.open(io.BytesIO(image.data)) as pil:
        arr = np.asarray(pil)
    # Gray decodes to HW; keep the HWC contract so callers never branch on ndim.
    return arr[:, :, None] if arr.ndim == 2 else arr


def array_to_pil(
    array: npt.NDArray[np.generic], value_range: tuple[float, float] | None = None
) -> PILImage.Image:
    """uint8 HWC (C = 1 or 3) -> PIL; float32 CHW needs the model's output range to map to 0..255."""
    if array.dtype != np.uint8:
        if value_range is None:
            raise ValueError("a float32 [C, H, W] tensor needs value_range=(lo, hi) to become a picture")
        lo, hi = value_range
        # The server's PNG arithmetic (codecs.to_uint8), so a TENSOR_F32 answer made a picture here
        # is the server's PNG pixel for pixel: floor(x * scale + offset) in float32, round half up,
        # NaN -> 0 (np.rint rounded half to even and cast NaN to an undefined byte).
        scale = np.float32(255.0 / (hi - lo))
        offset = np.float32(0.5 - lo * 255.0 / (hi - lo))
        scaled = np.multiply(np.asarray(array, np.float32), scale, dtype=np.float32)
        np.add(scaled, offset, out=scaled)
        np.fmax(scaled, np.float32(0.0), out=scaled)  # fmax/fmin map NaN to the bound
        np.fmin(scaled, np.float32(255.0), out=scaled)
        array = scaled.astype(np.uint8).transpose(1, 2, 0)
    return PILImage.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))


def _pil_to_uint8(image: PILImage.Image) -> npt.NDArray[np.uint8]:
    """A PIL image as the server decodes the same picture from a file: gray stays gray, 16-bit
    gray (I;16, as Pillow opens a 16-bit PNG, or I, as an older Pillow does) scales 0..65535 onto
    0..255 with rounding as the server does (codecs._to_hwc_uint8; Pillow's own conversion clips
    every value above 255 to white), float gray (F, a 32-bit float TIFF) in 0..1 maps onto 0..255
    as the server's PNG of a [0, 1] tensor (Pillow's truncated it to black), anything else becomes
    RGB. ValueError naming the mode for F values outside 0..1 (or NaN): they have no agreed meaning."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if image.mode == "F":
        values = np.asarray(image, np.float32)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not 0.0 <= low <= high <= 1.0:  # False for a NaN too
            raise ValueError(
                f"a picture of mode F (32-bit float gray) must hold values in 0..1 (0 black, 1 white), "
                f"got {low:g}..{high:g}; scale it first"
            )
        # array_to_pil's (the server's PNG) arithmetic: floor(x * 255 + 0.5) in float32.
        scaled = np.multiply(values, np.float32(255.0), dtype=np.float32)
        np.add(scaled, np.float32(0.5), out=scaled)
        return scaled.astype(np.uint8)
    return np.asarray(image.convert("L" if image.mode in ("L", "1") else "RGB"))


def to_image_message(image: ImageInput) -> types_pb2.Image:
    """Build a request Image. Encoded bytes and files travel as they are (the server detects
    PNG/JPEG/WEBP, so nothing is decoded here); arrays and PIL images travel as raw uint8 HWC.
    An array's alpha channel (HWC with C = 2, gray+alpha, or 4, RGBA) is dropped, as the server
    does for the same picture sent as a file."""
    if isinstance(image, bytes):
        return types_pb2.Image(format=types_pb2.IMAGE_FORMAT_UNSPECIFIED, data=image)
    if isinstance(image, str | os.PathLike):
        return types_pb2.Image(format=types_pb2.IMAGE_FORMAT_UNSPECIFIED, data=Path(image).read_bytes())
    if isinstance(image, PILImage.Image):
        image = _pil_to_uint8(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 HWC or HW, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image arrays must be HW or HWC with C in 1..4, got shape {arr.shape}")
    if arr.shape[2] in (2, 4):
        arr = arr[:, :, : arr.shape[2] - 1]  # LA -> L, RGBA -> RGB (codecs: alpha is dropped)
    return types_pb2.Image(format=types_pb2.IMAGE_FORMAT_RAW_UINT8, data=arr.tobytes(), shape=arr.shape)
