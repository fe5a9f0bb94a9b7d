"""Real photographs that ship inside installed packages, with a fixed train / held-out split.

Only files already on disk are read: scikit-learn's ``load_sample_image`` (china, flower),
matplotlib's ``sample_data/grace_hopper.jpg`` and the images bundled in scikit-image's own
``skimage/data`` folder. scikit-image's fetcher functions are deliberately *not* called: for the
images that are not bundled they would try to download (through pooch), and training must never
touch the network. A file missing from a given install is skipped, not fetched.

The split is by image name and fixed in code (:data:`HOLDOUT_NAMES`), so every recipe and every
quality check holds out the same photos, and the names are recorded in each card.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

Package = Literal["scikit-learn", "matplotlib", "scikit-image"]


@dataclass(frozen=True, slots=True)
class PhotoSource:
    """Where one bundled photo lives."""

    name: str
    package: Package
    filename: str
    color: bool  # False: a grayscale photo, served to RGB models with its channel repeated


# Natural photographs only: no documents (page, text), synthetic patterns (checkerboard, logo,
# colorwheel), binary masks (horse) or pre-blurred images (clock_motion).
PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("china", "scikit-learn", "china.jpg", True),
    PhotoSource("flower", "scikit-learn", "flower.jpg", True),
    PhotoSource("grace_hopper", "matplotlib", "grace_hopper.jpg", True),
    PhotoSource("astronaut", "scikit-image", "astronaut.png", True),
    PhotoSource("chelsea", "scikit-image", "chelsea.png", True),
    PhotoSource("coffee", "scikit-image", "coffee.png", True),
    PhotoSource("rocket", "scikit-image", "rocket.jpg", True),
    PhotoSource("motorcycle", "scikit-image", "motorcycle_left.png", True),
    PhotoSource("hubble_deep_field", "scikit-image", "hubble_deep_field.jpg", True),
    PhotoSource("retina", "scikit-image", "retina.jpg", True),
    PhotoSource("immunohistochemistry", "scikit-image", "ihc.png", True),
    PhotoSource("camera", "scikit-image", "camera.png", False),
    PhotoSource("moon", "scikit-image", "moon.png", False),
    PhotoSource("coins", "scikit-image", "coins.png", False),
    PhotoSource("brick", "scikit-image", "brick.png", False),
    PhotoSource("grass", "scikit-image", "grass.png", False),
    PhotoSource("gravel", "scikit-image", "gravel.png", False),
)

# Held out from every photo model's training: three colour photos of different kinds (a
# portrait with fine texture, a close-up with smooth gradients, an old gray-toned portrait).
HOLDOUT_NAMES: tuple[str, ...] = ("astronaut", "coffee", "grace_hopper")

DATA_DESCRIPTION = (
    "photos bundled in installed packages (scikit-learn sample images, matplotlib sample_data, "
    "scikit-image data); split by image name"
)


@dataclass(frozen=True, slots=True)
class Photo:
    """One loaded photo: float32 RGB pixels in [0, 1], shape [H, W, 3]."""

    name: str
    pixels: np.ndarray
    color: bool
    package: Package


def _package_path(source: PhotoSource) -> Path:
    # Resolved from each package's own install directory; nothing here can download.
    if source.package == "scikit-learn":
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "images" / source.filename
    if source.package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / source.filename
    import skimage.data

    return Path(skimage.data.__file__).parent / source.filename


@functools.cache
def _load(source: PhotoSource) -> Photo | None:
    path = _package_path(source)
    if not path.is_file():
        logger.warning("bundled photo %s not found at %s; skipped", source.name, path)
        return None
    with Image.open(path) as img:
        rgb = img.convert("RGB")  # gray -> 3 equal channels; RGBA/palette -> RGB
        pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    pixels.setflags(write=False)  # cached and shared: callers must copy before editing
    return Photo(source.name, pixels, source.color, source.package)


def available_sources() -> list[PhotoSource]:
    """The sources whose file is present in this install."""
    return [s for s in PHOTO_SOURCES if _package_path(s).is_file()]


def load_photos(names: Iterable[str] | None = None, *, color_only: bool = False) -> list[Photo]:
    """Load photos by name (all known ones when ``names`` is None), skipping missing files."""
    by_name = {s.name: s for s in PHOTO_SOURCES}
    wanted = list(by_name) if names is None else list(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise KeyError(f"unknown photo name(s) {unknown}; known: {sorted(by_name)}")
    photos = [p for n in wanted if (p := _load(by_name[n])) is not None]
    return [p for p in photos if p.color] if color_only else photos


def train_names(*, color_only: bool = False) -> list[str]:
    return [s.name for s in PHOTO_SOURCES if s.name not in HOLDOUT_NAMES and (s.color or not color_only)]


def train_photos(*, color_only: bool = False) -> list[Photo]:
    return load_photos(train_names(color_only=color_only))


def holdout_photos() -> list[Photo]:
    return load_photos(HOLDOUT_NAMES)


def holdout_card(photos_used: Sequence[Photo], holdout: Sequence[Photo], **extra: Any) -> dict[str, Any]:
    """The card's ``holdout`` object: which photos were held out and which trained the model."""
    return {
        "data": DATA_DESCRIPTION,
        "names": [p.name for p in holdout],
        "train_names": [p.name for p in photos_used],
        **extra,
    }


def random_crops(
    photos: Sequence[Photo], size: int, count: int, rng: np.random.Generator, *, flip: bool = True
) -> np.ndarray:
    """``count`` random ``size``×``size`` crops, [count, 3, size, size] float32 in [0, 1].

    Photos are drawn uniformly (not by area), so the big retina and hubble images do not swamp
    the small ones; random flips and 90° turns multiply the few photos we have.
    """
    usable = [p for p in photos if min(p.pixels.shape[:2]) >= size]
    if not usable:
        raise ValueError(f"no photo is at least {size}x{size}")
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        px = usable[int(rng.integers(len(usable)))].pixels
        y = int(rng.integers(px.shape[0] - size + 1))
        x = int(rng.integers(px.shape[1] - size + 1))
        crop = px[y : y + size, x : x + size].transpose(2, 0, 1)
        if flip:
            if rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            crop = np.rot90(crop, k=int(rng.integers(4)), axes=(1, 2))
        out[i] = crop
    return out


# Fixed crops of the held-out photos (top, left of a region with faces or fine detail) for sample
# grids: the same pixels every time, so grids of two builds can be compared by eye.
_GRID_CROP_ORIGINS: dict[str, tuple[int, int]] = {
    "astronaut": (30, 150),
    "coffee": (60, 170),
    "grace_hopper": (90, 160),
}


def holdout_grid_crops(size: int) -> np.ndarray:
    """One ``size``×``size`` crop of each held-out photo, [N, 3, size, size] float32 in [0, 1]."""
    crops = []
    for photo in holdout_photos():
        y, x = _GRID_CROP_ORIGINS.get(photo.name, (0, 0))
        h, w = photo.pixels.shape[:2]
        y, x = min(y, h - size), min(x, w - size)
        crops.append(photo.pixels[y : y + size, x : x + size].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(crops))


def center_crop(pixels: np.ndarray, multiple: int, max_size: int | None = None) -> np.ndarray:
    """Crop an [H, W, C] array to H, W multiples of ``multiple`` (and at most ``max_size``)."""
    h, w = pixels.shape[:2]
    if max_size is not None:
        h, w = min(h, max_size), min(w, max_size)
    h, w = h - h % multiple, w - w % multiple
    y, x = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
    return pixels[y : y + h, x : x + w]
