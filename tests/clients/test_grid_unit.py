"""Grid layout: geometry, placement, labels, empty cells."""

from __future__ import annotations

import numpy as np
from PIL import Image

from genserve_client.grid import BACKGROUND, GridLayout, GridRow, make_grid


def solid(value: int, size: int = 8, channels: int = 1) -> np.ndarray:
    return np.full((size, size, channels), value, np.uint8)


def test_layout_geometry() -> None:
    layout = GridLayout(rows=2, cols=3, cell_w=10, cell_h=20, label_w=30, caption_h=12, pad=2)
    assert layout.size == (30 + 3 * 12 + 2, 12 + 2 * 22 + 2)
    assert layout.origin(0, 0) == (32, 14)
    assert layout.origin(1, 2) == (32 + 24, 14 + 22)


def test_images_land_in_their_cells_scaled_up() -> None:
    rows = [GridRow([solid(10), solid(20)]), GridRow([solid(30), None, solid(200, channels=3)])]
    grid = make_grid(rows, pad=2)
    scale = 8  # 8 px images reach MIN_CELL_PX = 64
    assert grid.size == (2 + 3 * (64 + 2), 2 + 2 * (64 + 2))
    pixels = np.asarray(grid)
    for (r, c), value in {(0, 0): 10, (0, 1): 20, (1, 0): 30, (1, 2): 200}.items():
        x, y = 2 + c * (8 * scale + 2), 2 + r * (8 * scale + 2)
        assert (pixels[y : y + 64, x : x + 64] == value).all()
    x, y = 2 + 1 * 66, 2 + 66  # the None cell stays background
    assert (pixels[y : y + 64, x : x + 64] == BACKGROUND).all()


def test_row_labels_and_captions_are_drawn_outside_the_cells() -> None:
    plain = make_grid([GridRow([solid(255)])], pad=2)
    labelled = make_grid([GridRow([solid(255)], "class 7")], captions=["t=0.50"], pad=2)
    assert labelled.width > plain.width and labelled.height > plain.height
    ink = np.asarray(labelled.convert("L")) < 128
    assert ink[:, :20].any()  # label text left of the row
    assert ink[:8, 20:].any()  # caption text above the column


def test_pil_and_gray_inputs_mix() -> None:
    grid = make_grid(
        [GridRow([Image.new("L", (28, 28), 0), solid(255, size=28, channels=3)])], scale=1, pad=0
    )
    assert grid.mode == "RGB" and grid.size == (56, 28)


def test_every_cli_subcommand_prints_its_help() -> None:
    import argparse

    from genserve_client.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "bulk" in subparsers.choices
    for name, sub in subparsers.choices.items():
        assert sub.format_help().startswith("usage: genserve-client"), name  # a stray % used to raise here
