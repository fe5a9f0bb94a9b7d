"""Image grids with a labelled row per class (or per set) and optional column captions."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from genserve_client.convert import array_to_pil

GridImage = Image.Image | npt.NDArray[np.uint8]

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
MIN_CELL_PX = 64  # 28x28 digits are scaled up (nearest) so they can be seen


@dataclass(frozen=True, slots=True)
class GridRow:
    images: Sequence[GridImage | None]  # None leaves the cell empty
    label: str = ""


@dataclass(frozen=True, slots=True)
class GridLayout:
    """Pixel geometry of a grid: cells of cell_w x cell_h, `pad` apart, after a label column of
    label_w and a caption row of caption_h (both 0 when unused)."""

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    label_w: int
    caption_h: int
    pad: int

    @property
    def size(self) -> tuple[int, int]:
        width = self.label_w + self.cols * (self.cell_w + self.pad) + self.pad
        height = self.caption_h + self.rows * (self.cell_h + self.pad) + self.pad
        return width, height

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel of cell (row, col)."""
        return (
            self.label_w + self.pad + col * (self.cell_w + self.pad),
            self.caption_h + self.pad + row * (self.cell_h + self.pad),
        )


def _as_rgb(image: GridImage) -> Image.Image:
    pil = image if isinstance(image, Image.Image) else array_to_pil(image)
    return pil.convert("RGB")


def make_grid(
    rows: Sequence[GridRow],
    *,
    captions: Sequence[str] = (),
    scale: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """Paste rows of images (uint8 HWC arrays or PIL) into one RGB picture; the row label sits left
    of each row and captions above the columns, drawn in PIL's default font."""
    pictures = [[None if im is None else _as_rgb(im) for im in row.images] for row in rows]
    flat = [p for row in pictures for p in row if p is not None]
    if not flat:
        raise ValueError("a grid needs at least one image")
    max_w, max_h = max(p.width for p in flat), max(p.height for p in flat)
    scale = scale or max(1, math.ceil(MIN_CELL_PX / max(max_w, max_h)))
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
        return int(right - left), int(bottom - top)

    labels = [row.label for row in rows]
    label_w = max((text_size(t)[0] for t in labels if t), default=-2 * pad) + 2 * pad
    caption_h = max((text_size(t)[1] for t in captions if t), default=-2 * pad) + 2 * pad
    layout = GridLayout(
        rows=len(rows),
        cols=max(len(row) for row in pictures),
        cell_w=max_w * scale,
        cell_h=max_h * scale,
        label_w=label_w,
        caption_h=caption_h,
        pad=pad,
    )
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(pictures):
        for c, picture in enumerate(row):
            if picture is None:
                continue
            x, y = layout.origin(r, c)
            canvas.paste(
                picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST),
                (x, y),
            )
        if labels[r]:
            _, y = layout.origin(r, 0)
            draw.text(
                (pad, y + (layout.cell_h - text_size(labels[r])[1]) // 2), labels[r], fill=TEXT, font=font
            )
    for c, caption in enumerate(captions[: layout.cols]):
        x, _ = layout.origin(0, c)
        draw.text((x + (layout.cell_w - text_size(caption)[0]) // 2, pad), caption, fill=TEXT, font=font)
    return canvas
