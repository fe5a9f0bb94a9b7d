"""A byte-bounded LRU of encoded images from seeds.

A seeded image is a pure function of the model file, the execution provider, the precision, the
seed, the label, the truncation psi and the output options (latents are drawn on the host per seed,
so the batch never changes an image). A request for seeds already served -- a gallery page, a
client retrying, a preview refreshed -- gets the stored encoded image without a model call or an
encode. Keyed per image, not per request, so a request for seeds 0..9 after one for 0..4 computes
only 5..9. Explicit latents are not cached: they rarely repeat.

Used on the event loop only (no lock). Off unless `image_cache_bytes` > 0 in the server config.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from genserve_server.codecs import ImageFormat
from genserve_server.encoding import EncodedImage

# What an entry costs beyond its image and latent bytes: the key tuple, the entry, the bytes and
# shape objects, the dict slot (measured with tracemalloc: ~430 B; test_image_cache checks it).
ENTRY_OVERHEAD_BYTES = 450


class ImageKey(NamedTuple):
    # ModelVersion.load_id: the file, config.json (output_range, runtime options), provider and
    # precision of one loaded version. A reload loads a new version: it never sees old entries.
    # A style generator's: its load_id + "+" + its mapping's (`loaded_versions`).
    loaded_version: str
    seed: int
    label: int  # -1 for unconditional models
    psi: float | None
    format: int
    quality: int  # 0 unless JPEG or WEBP
    png_compression: int  # 0 unless PNG


def loaded_versions(*load_ids: str) -> str:
    """The `loaded_version` of a key whose images come from several loaded versions (a style
    generator and its mapping)."""
    return "+".join(load_ids)


def image_key(
    loaded_version: str,
    seed: int,
    label: int | None,
    psi: float | None,
    fmt: int,
    quality: int,
    png_compression: int,
) -> ImageKey:
    """The key of one image; options that do not change the bytes of `fmt` are left out, so that a
    RAW request with quality 80 and one with quality 90 share the entry."""
    lossy = fmt in (ImageFormat.JPEG, ImageFormat.WEBP)
    return ImageKey(
        loaded_version,
        seed,
        -1 if label is None else label,
        psi,
        fmt,
        quality if lossy else 0,
        png_compression if fmt == ImageFormat.PNG else 0,
    )


@dataclass(frozen=True, slots=True)
class CachedImage:
    """Plain bytes, not a message object and a numpy array: those cost ~1.5 KB more an entry."""

    data: bytes
    shape: tuple[int, ...]
    latent_bytes: bytes  # float32 [Z], little-endian
    nbytes: int

    def image(self, fmt: ImageFormat) -> EncodedImage:
        return EncodedImage(fmt, self.data, self.shape)

    def latent(self) -> np.ndarray:
        return np.frombuffer(self.latent_bytes, dtype="<f4")


class ImageCache:
    """`get` / `put` by ImageKey; the least recently used entries go once `max_bytes` is exceeded."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[ImageKey, CachedImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: ImageKey) -> CachedImage | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def drop_version(self, load_id: str) -> int:
        """Remove the entries of the loaded version `load_id` (it unloaded: nothing can ask for them
        again), a style generator's made through it as a mapping included; returns the bytes freed."""
        gone = [k for k in self._entries if load_id in k.loaded_version.split("+")]
        freed = 0
        for k in gone:
            freed += self._entries.pop(k).nbytes
        self.nbytes -= freed
        return freed

    def put(self, key: ImageKey, image: EncodedImage, latent: np.ndarray) -> None:
        data = image.data
        latent_bytes = np.asarray(latent, dtype="<f4").tobytes()
        nbytes = len(data) + len(latent_bytes) + ENTRY_OVERHEAD_BYTES
        if nbytes > self.max_bytes:
            return  # one image larger than the whole cache: not worth evicting everything for
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        self._entries[key] = CachedImage(data, tuple(image.shape), latent_bytes, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
