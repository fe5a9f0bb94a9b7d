"""Draw docs/images/pix2pix-colorize.png: grey input | mean chroma | L1 only | pix2pix | original.

One crop of each held-out photo; its luma goes through the ONNX graphs of ``pix2pix-colorize``
(``model.onnx``, L1 + PatchGAN) and of its L1-only twin (``l1_only.onnx``, the same U-Net, steps
and crops without the adversarial term); "mean chroma" is the classical baseline (the grey plus the
train photos' mean colour).

    PYTHONPATH=api:export .venv/bin/python scripts/colorize_strip.py [--models models] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw

from genserve_export.data import photos
from genserve_export.recipes import photos_colorize as pc

ROOT = Path(__file__).resolve().parents[1]
CROP = 112
ORIGINS = {"astronaut": (0, 100), "coffee": (40, 150), "grace_hopper": (60, 140)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/pix2pix-colorize.png")
    args = parser.parse_args()
    version = args.models / pc.NAME / "1"
    graphs = {"L1 only": version / pc.L1_ONLY_FILE, "pix2pix (L1 + GAN)": version / "model.onnx"}
    sessions = {
        t: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for t, p in graphs.items()
    }
    mean_cbcr = np.array(pc.train_mean_chroma(), dtype=np.float32).reshape(1, 2, 1, 1)
    titles = ["grey input", "mean chroma", *sessions, "original"]
    rows = []
    for photo in photos.holdout_photos():
        y, x = ORIGINS[photo.name]
        rgb = np.ascontiguousarray(photo.pixels[y : y + CROP, x : x + CROP].transpose(2, 0, 1))[None]
        grey = pc.grey_of(rgb)
        columns = [grey[0], pc.with_chroma(grey, mean_cbcr)[0]]
        columns += [(s.run(None, {"image": grey * 2.0 - 1.0})[0][0] + 1.0) / 2.0 for s in sessions.values()]
        rows.append(np.concatenate([*columns, rgb[0]], axis=2))
    grid = np.rint(np.clip(np.concatenate(rows, axis=1), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + 16), "white")
    canvas.paste(Image.fromarray(grid), (0, 16))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(titles):
        draw.text((i * CROP + 4, 2), title, fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, optimize=True)
    sys.stdout.write(f"wrote {args.out} ({', '.join(titles)})\n")


if __name__ == "__main__":
    main()
