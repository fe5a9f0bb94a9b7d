"""PNG sample grids for eyeballing a repository's models (``genserve-export verify --grids``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genserve_contract.kinds import Kind
from genserve_export.recipe import OnnxRun

GRID_SEED = 0
_PAD = 2


def to_uint8(images: np.ndarray, value_range: Any) -> np.ndarray:
    """[N, C, H, W] floats in ``value_range`` → [N, H, W, C] uint8 (C is 1 or 3)."""
    lo, hi = (float(v) for v in value_range)
    scaled = (np.asarray(images, dtype=np.float64) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def tile(rows: list[list[np.ndarray]], scale: int = 1) -> Image.Image:
    """Lay out HWC uint8 images in rows (images in a row may differ in size) on a gray canvas."""
    rows = [[np.repeat(np.repeat(img, scale, 0), scale, 1) for img in row] for row in rows]
    channels = max(img.shape[2] for row in rows for img in row)
    width = max(sum(img.shape[1] + _PAD for img in row) for row in rows) + _PAD
    height = sum(max(img.shape[0] for img in row) + _PAD for row in rows) + _PAD
    canvas = np.full((height, width, channels), 128, dtype=np.uint8)
    y = _PAD
    for row in rows:
        x = _PAD
        for img in row:
            h, w = img.shape[:2]
            canvas[y : y + h, x : x + w] = img if img.shape[2] == channels else np.repeat(img, channels, 2)
            x += w + _PAD
        y += max(img.shape[0] for img in row) + _PAD
    return Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas)


def _fallback_pairs(card: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Two bundled scikit-image photos: targets at 96 px, SR inputs downscaled by the scale factor."""
    from skimage import data as skdata

    photos = (skdata.astronaut(), skdata.coffee())  # type: ignore[no-untyped-call]
    crops = [photos[0][40:232, 150:342], photos[1][100:292, 200:392]]
    lo, hi = card["input_range"]
    channels = int(card["input_channels"])
    scale = int(card.get("scale_factor") or 1)
    size = 96 - 96 % (int(card.get("size_multiple") or 1) * scale)
    targets: list[np.ndarray] = []
    inputs: list[np.ndarray] = []
    for crop in crops:
        img = Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)
        if channels == 1:
            img = img.convert("L")
        small = img.resize((size // scale, size // scale), Image.Resampling.BICUBIC) if scale > 1 else img
        for source, out in ((img, targets), (small, inputs)):
            arr = np.asarray(source, dtype=np.float32) / 255.0
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            out.append(arr * (hi - lo) + lo)
    return np.stack(inputs), (np.stack(targets) if scale > 1 else None)


def write_grid(card: Mapping[str, Any], run: OnnxRun, out_path: Path, recipe: Any = None) -> Path | None:
    """Write ``out_path`` for a generative or image-to-image model; None for kinds with no picture."""
    kind = Kind(card["kind"])
    rng = np.random.default_rng(GRID_SEED)
    if kind.takes_latent and not kind.conditional and kind.image_output_name is not None:  # not a mapping
        z = rng.standard_normal((64, card["latent_dim"])).astype(np.float32)
        images = to_uint8(run({"z": z})["image"], card["output_range"])
        grid = tile([list(images[r * 8 : r * 8 + 8]) for r in range(8)], scale=2)
    elif kind.conditional:
        classes = min(len(card["class_names"]), 16)
        labels = np.repeat(np.arange(classes, dtype=np.int64), 8)
        z = rng.standard_normal((len(labels), card["latent_dim"])).astype(np.float32)
        images = to_uint8(run({"z": z, "label": labels})["image"], card["output_range"])
        grid = tile([list(images[r * 8 : r * 8 + 8]) for r in range(classes)], scale=2)
    elif kind.two_way:
        hook = getattr(recipe, "strip_inputs", None)
        if hook is None:
            return None
        grid = translation_strip(card, run, *hook())
    elif kind.takes_image and kind.image_output_name is not None:
        hook = getattr(recipe, "grid_pairs", None)
        inputs, targets = hook(card["name"], card) if hook is not None else _fallback_pairs(card)
        outputs = run({"image": inputs.astype(np.float32)})["output_image"]
        scale = int(card.get("scale_factor") or 1)
        in_u8 = to_uint8(inputs, card["input_range"])
        out_u8 = to_uint8(outputs, card["output_range"])
        tg_u8 = to_uint8(targets, card["output_range"]) if targets is not None else None
        rows = []
        for i in range(len(inputs)):
            shown_in = np.repeat(np.repeat(in_u8[i], scale, 0), scale, 1)  # nearest, to output size
            rows.append([shown_in, out_u8[i]] + ([tg_u8[i]] if tg_u8 is not None else []))
        grid = tile(rows)
    else:
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return out_path


def translation_strip(card: Mapping[str, Any], run: OnnxRun, a: np.ndarray, b: np.ndarray) -> Image.Image:
    """A two-way translator's strip: rows A, A->B, A->B->A, then B, B->A, B->A->B (one digit a column)."""

    def translate(images: np.ndarray, direction: int) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {
            "image": images.astype(np.float32),
            "direction": np.full(len(images), direction, np.int64),
        }
        return run(feeds)["output_image"]

    a_b = translate(a, 0)
    b_a = translate(b, 1)
    rows = [a, a_b, translate(a_b, 1), b, b_a, translate(b_a, 0)]
    lo, hi = card["input_range"]
    return tile([list(to_uint8(row, (lo, hi))) for row in rows], scale=2)
