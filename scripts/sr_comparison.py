"""Draw docs/images/sr-comparison.png: bicubic | sr-photos-x4 | srgan-photos-x4 | esrgan-x4 | original.

One crop of each held-out photo, downscaled x4 as the photo recipes do (antialiased bicubic), then
upscaled by each model's ONNX graph. esrgan-x4 is not committed: pass the repository that
`make import-esrgan` wrote (default models/), or its column is left out.

    PYTHONPATH=api:export .venv/bin/python scripts/sr_comparison.py [--esrgan-repo models] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image, ImageDraw

from genserve_export.data import photos
from genserve_export.recipes.photos_sr import bicubic_upscale, downscale

ROOT = Path(__file__).resolve().parents[1]
CROP = 128
ORIGINS = {"astronaut": (30, 150), "coffee": (60, 170), "grace_hopper": (90, 160)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--esrgan-repo", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/sr-comparison.png")
    args = parser.parse_args()
    graphs = {
        "sr-photos-x4": ROOT / "models/sr-photos-x4/1/model.onnx",
        "srgan-photos-x4": ROOT / "models/srgan-photos-x4/1/model.onnx",
        "esrgan-x4": args.esrgan_repo / "esrgan-x4/1/model.onnx",
    }
    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in graphs.items()
        if path.is_file()
    }
    titles = ["bicubic", *sessions, "original"]
    rows = []
    for photo in photos.holdout_photos():
        y, x = ORIGINS[photo.name]
        hr = np.ascontiguousarray(photo.pixels[y : y + CROP, x : x + CROP].transpose(2, 0, 1))[None]
        lr = downscale(torch.from_numpy(hr)).numpy()
        columns = [bicubic_upscale(torch.from_numpy(lr)).numpy()[0]]
        columns += [sess.run(None, {"image": lr})[0][0] for sess in sessions.values()]
        rows.append(np.concatenate([*columns, hr[0]], axis=2))
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
