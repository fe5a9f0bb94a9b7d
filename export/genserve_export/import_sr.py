"""``genserve-export import-rrdn``: a pretrained TF.js super-resolution model -> a repository entry.

The source is an npm package of the upscalerjs family (``@upscalerjs/esrgan-thick``: idealo's RRDN,
ESRGAN's residual-in-residual dense blocks, trained on DIV2K; MIT), fetched beforehand by
``make pretrained`` (``scripts/fetch_pretrained.sh``) into ``.cache/pretrained/``: serving never
needs npm. The steps:

1. read ``package.json`` (name, version, licence) and ``models/x<scale>/model.json`` + shards;
2. rebuild the layer graph in PyTorch (``tfjs_graph``) and check it against the plain-numpy
   reference (``tfjs_reference``) on a small input;
3. check it against the package's own TF.js output: upscalerjs ships ``assets/fixture.png`` and
   ``assets/samples/<s>x/result.png``, the fixture upscaled by the original model in TF.js; the
   rebuild must match it within one grey level. This also settles the input range (RRDN models take
   [0, 1], RDN models [0, 255]): ``pixel_max="auto"`` picks the one that reproduces the sample;
4. measure PSNR against bicubic on held-out photos (:func:`quality_figures`), export ONNX with
   dynamic H/W (``export_model``: parity <= 1e-4 vs PyTorch, optional fp16) and write a card that
   records the source package, version, licence and the figures. The licence text and the
   reference pair are copied into the version directory, so that ``verify`` can recompute both the
   reference check and the PSNR from ``model.onnx`` (:func:`evaluate_imported`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from genserve_export.data import photos
from genserve_export.errors import ExportError
from genserve_export.export import check_entry_name, export_model, refuse_published
from genserve_export.onnx_utils import round_weights_fp16
from genserve_export.provenance import source_commit
from genserve_export.recipe import OnnxRun
from genserve_export.tfjs_graph import TfjsGraph, read_layers_model
from genserve_export.tfjs_reference import run_reference

logger = logging.getLogger(__name__)

IMPORTER = "tfjs-layers-sr"
LICENSE_FILE = "LICENSE"
REFERENCE_INPUT = "reference-input.png"
REFERENCE_OUTPUT = "reference-output.png"
# The held-out set and the protocol, fixed before any per-photo figure of this protocol was looked at
# (issue 18: "held-out photos that no recipe trained on"):
# - photos: the project's fixed held-out split (photos.HOLDOUT_NAMES: astronaut, coffee, grace_hopper),
#   the only bundled photos that no recipe trains on and the set every photo recipe's card reports
#   on. The other bundled colour photos (chelsea, rocket, china, flower, motorcycle) train the
#   in-house photo recipes, so they are not "held out" in the sense; the README reports
#   them beside it, ungated.
# - whole images, trimmed to a multiple of the scale (as sr-photos-x4's card): no crop to choose.
# - gate on PSNR of the BT.601 luma with <scale> px shaved, the protocol of the SR papers (the
#   figures the bar is quoted in); RGB PSNR with the same shave is reported beside it.
QUALITY_PHOTOS: tuple[str, ...] = photos.HOLDOUT_NAMES
REFERENCE_TOLERANCE_255 = 1.0  # grey levels: the sample PNG is the TF.js float output, rounded
GATED_FIGURE = "psnr_y_gain_db"
QUALITY_METRIC = (
    "mean PSNR over the held-out photos (whole images trimmed to a multiple of <scale>, 8-bit), border "
    "of <scale> px shaved; psnr_y_*: on BT.601 luma (MATLAB rgb2ycbcr's Y), the SR papers' protocol "
    "and the gated figure; psnr_*: on RGB in [0, 1]; low resolution = bicubic downscale (PIL, "
    "antialiased, a = -0.5, as MATLAB imresize); baseline = PIL bicubic upscale of the same input"
)


class ImportFailedError(ExportError):
    """The package cannot be imported, or the rebuilt network does not reproduce the original."""


@dataclass(frozen=True, slots=True)
class Package:
    """An unpacked npm package (a directory with package.json) or its ``.tgz`` (read in place)."""

    path: Path

    def _member(self, relative: str) -> str:
        return relative if self.path.is_dir() else f"package/{relative}"

    def read(self, relative: str) -> bytes:
        if self.path.is_dir():
            target = self.path / relative
            if not target.is_file():
                raise ImportFailedError(f"{target} not found (is {self.path} an unpacked npm package?)")
            return target.read_bytes()
        try:
            opened = tarfile.open(self.path)
        except tarfile.TarError as exc:  # a failed download, an HTML error page: no tarball
            raise ImportFailedError(
                f"{self.path} is neither an npm package's .tgz nor its unpacked directory ({exc})"
            ) from exc
        with opened as tar:
            try:
                member = tar.extractfile(self._member(relative))
            except KeyError:
                member = None
            if member is None:
                raise ImportFailedError(f"{self._member(relative)} not found in {self.path}")
            return member.read()

    def metadata(self) -> dict[str, Any]:
        """package.json: a JSON object whose name and version are strings."""
        where = f"{self._member('package.json')} in {self.path}"
        try:
            meta = json.loads(self.read("package.json"))
        except ValueError as exc:  # not UTF-8, or not JSON
            raise ImportFailedError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ImportFailedError(f"{where} must be a JSON object, got {type(meta).__name__}")
        for key in ("name", "version"):
            if not isinstance(meta.get(key), str) or not meta[key]:
                raise ImportFailedError(f"{where}: field {key!r} must be a non-empty string")
        return meta

    def model_source(self, scale: int) -> tuple[Path, str]:
        """(source, model.json path within it) for ``read_layers_model``."""
        return self.path, self._member(f"models/x{scale}/model.json")

    def image(self, relative: str) -> np.ndarray:
        """An RGB PNG of the package as float32 [3, H, W] in [0, 1]."""
        data = self.read(relative)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
        except OSError as exc:  # PIL's UnidentifiedImageError, a truncated file
            where = f"{self._member(relative)} in {self.path}"
            raise ImportFailedError(f"{where} is not an image: {exc}") from exc


class PretrainedSR(nn.Module):
    """image [N, 3, h, w] in [0, 1] -> [N, 3, s*h, s*w] in [0, 1], as upscalerjs runs the model:
    inputs scaled to the model's pixel range, outputs scaled back and clipped."""

    def __init__(self, graph: TfjsGraph, pixel_max: float) -> None:
        super().__init__()
        self.graph = graph
        self.pixel_max = float(pixel_max)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pixel_max == 1.0:
            out: torch.Tensor = self.graph(image)
        else:
            out = self.graph(image * self.pixel_max) / self.pixel_max
        return out.clamp(0.0, 1.0)


# --- quality ---------------------------------------------------------------------------------


def _to_uint8_image(chw: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(chw, 0.0, 1.0) * 255).astype(np.uint8).transpose(1, 2, 0))


def bicubic_resize(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic (a = -0.5, antialiased when shrinking) of an 8-bit-quantised [3, H, W] image."""
    out = _to_uint8_image(chw).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(out, np.float32).transpose(2, 0, 1) / 255.0


def psnr_db(a: np.ndarray, b: np.ndarray, shave: int) -> float:
    """PSNR of [0, 1] images, ignoring a ``shave``-pixel border."""
    a, b = a[..., shave:-shave, shave:-shave], b[..., shave:-shave, shave:-shave]
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def luma(chw: np.ndarray) -> np.ndarray:
    """BT.601 studio-range luma in [0, 1] of an RGB [3, H, W] image (MATLAB ``rgb2ycbcr``'s Y / 255),
    shape [1, H, W]: the channel SR papers report PSNR on."""
    weights = np.array([65.481, 128.553, 24.966]).reshape(3, 1, 1)
    y: np.ndarray = (16.0 + (chw.astype(np.float64) * weights).sum(axis=0, keepdims=True)) / 255.0
    return y


def quality_images(
    scale: int, names: tuple[str, ...] = QUALITY_PHOTOS, size: int | None = None
) -> list[tuple[str, np.ndarray]]:
    """(photo name, 8-bit-quantised [3, H, W] image): the whole photo trimmed to a multiple of scale
    (``size``: a centre crop of at most that, for the README's wider comparison only)."""
    images = []
    for photo in photos.load_photos(names):
        image = photos.center_crop(photo.pixels, scale, size).transpose(2, 0, 1)
        images.append((photo.name, np.rint(image * 255) / 255))
    return images


def quality_figures(
    run: OnnxRun, scale: int, names: tuple[str, ...] = QUALITY_PHOTOS, size: int | None = None
) -> dict[str, float]:
    """PSNR of the model and of bicubic on the held-out photos (see QUALITY_METRIC)."""
    model_db, bicubic_db, model_y, bicubic_y = [], [], [], []
    for _, hr in quality_images(scale, names, size):
        h, w = hr.shape[1:]
        lr = bicubic_resize(hr, h // scale, w // scale)
        sr = run({"image": lr[None].astype(np.float32)})["output_image"][0]
        up = bicubic_resize(lr, h, w)
        model_db.append(psnr_db(sr, hr, scale))
        bicubic_db.append(psnr_db(up, hr, scale))
        model_y.append(psnr_db(luma(sr), luma(hr), scale))
        bicubic_y.append(psnr_db(luma(up), luma(hr), scale))
    gain_y = np.subtract(model_y, bicubic_y)
    return {
        "psnr_y_db": round(float(np.mean(model_y)), 4),
        "bicubic_psnr_y_db": round(float(np.mean(bicubic_y)), 4),
        "psnr_y_gain_db": round(float(np.mean(gain_y)), 4),
        "min_image_psnr_y_gain_db": round(float(np.min(gain_y)), 4),
        "max_image_psnr_y_gain_db": round(float(np.max(gain_y)), 4),
        "psnr_db": round(float(np.mean(model_db)), 4),
        "bicubic_psnr_db": round(float(np.mean(bicubic_db)), 4),
        "psnr_gain_db": round(float(np.mean(model_db) - np.mean(bicubic_db)), 4),
        "min_image_psnr_gain_db": round(float(np.min(np.subtract(model_db, bicubic_db))), 4),
        "max_image_psnr_gain_db": round(float(np.max(np.subtract(model_db, bicubic_db))), 4),
    }


def reference_diff_255(run: OnnxRun, fixture: np.ndarray, expected: np.ndarray) -> float:
    """Largest |ours - the package's TF.js sample| in grey levels, our output rounded to 8 bits."""
    out = run({"image": fixture[None].astype(np.float32)})["output_image"][0]
    if out.shape != expected.shape:
        raise ImportFailedError(f"output {list(out.shape)} vs the package's sample {list(expected.shape)}")
    return float(np.abs(np.rint(out * 255) - np.rint(expected * 255)).max())


def _torch_run(module: nn.Module) -> OnnxRun:
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"output_image": module(torch.from_numpy(np.ascontiguousarray(feeds["image"]))).numpy()}

    return run


def evaluate_imported(card: Mapping[str, Any], version_dir: Path, run: OnnxRun) -> dict[str, float]:
    """verify's recomputation for an imported model: PSNR figures and the reference check."""
    scale = int(card["scale_factor"])
    figures = quality_figures(run, scale)
    fixture, expected = version_dir / REFERENCE_INPUT, version_dir / REFERENCE_OUTPUT
    if fixture.exists() and expected.exists():
        load = Package(version_dir).image
        figures["reference_max_abs_diff_255"] = reference_diff_255(
            run, load(REFERENCE_INPUT), load(REFERENCE_OUTPUT)
        )
    return figures


# --- import ----------------------------------------------------------------------------------


def _choose_pixel_max(
    graph: TfjsGraph, fixture: np.ndarray, expected: np.ndarray, pixel_max: str
) -> tuple[float, float]:
    candidates = (1.0, 255.0) if pixel_max == "auto" else (float(pixel_max),)
    diffs = {}
    for candidate in candidates:
        diffs[candidate] = reference_diff_255(_torch_run(PretrainedSR(graph, candidate)), fixture, expected)
        if diffs[candidate] <= REFERENCE_TOLERANCE_255:
            return candidate, diffs[candidate]
    raise ImportFailedError(
        "the rebuilt network does not reproduce the package's own sample output "
        + ", ".join(f"(input range [0, {c:g}]: max diff {d:g} grey levels)" for c, d in diffs.items())
        + f"; tolerance {REFERENCE_TOLERANCE_255:g}"
    )


def _check_against_numpy(graph: TfjsGraph, source: Path, model_json: str) -> float:
    """Max abs diff of the PyTorch rebuild vs the plain-numpy NHWC run, on a 12x10 input."""
    model = read_layers_model(source, model_json)
    x = np.random.default_rng(0).uniform(0.0, 1.0, (1, 12, 10, 3))
    want = run_reference(model, x)
    with torch.no_grad():
        got = graph(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).numpy().transpose(0, 2, 3, 1)
    diff = float(np.abs(got - want).max())
    if diff > 1e-4:
        raise ImportFailedError(f"the PyTorch rebuild differs from the numpy reference by {diff:.3g} > 1e-4")
    return diff


def import_tfjs_sr(
    package_path: str | Path,
    *,
    out_dir: str | Path,
    name: str,
    scale: int = 4,
    version: str = "1",
    pixel_max: str = "auto",
    fp16: bool = True,
    weights_fp16: bool = False,
    config: Mapping[str, Any] | None = None,
    tile_size: int = 64,
    tile_overlap: int = 16,
    min_quality_gain_db: float = 0.5,
    command: str = "",
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Import ``models/x<scale>`` of an upscalerjs npm package as ``out_dir/name/version``.

    ``weights_fp16``: round the weights to float16 *before* the reference check, the quality figures
    and the export, and store them so in model.onnx (computed in float32): half the file, and every
    figure in the card is the served network's. A published ``out_dir/name/version`` is immutable:
    refused before any work (:class:`RepositoryExistsError`) unless ``overwrite=True``, which
    replaces it whole.
    """
    check_entry_name(name, version)  # as the CLI's argparse types do, before the minutes of work
    if not overwrite:
        refuse_published([Path(out_dir) / name / version])
    say = progress or logger.info
    started = time.perf_counter()
    package = Package(Path(package_path))
    meta = package.metadata()
    licence_text = package.read("LICENSE")
    source, model_json = package.model_source(scale)
    model = read_layers_model(source, model_json)
    graph = TfjsGraph(model).eval()
    numpy_diff = _check_against_numpy(graph, source, model_json)
    if weights_fp16:
        round_weights_fp16(graph)
    n_params = sum(p.numel() for p in graph.parameters())
    say(f"{meta['name']}@{meta['version']}: {len(model.layers)} layers, {n_params:,} parameters")
    fixture = package.image("assets/fixture.png")
    expected = package.image(f"assets/samples/{scale}x/result.png")
    chosen, reference_diff = _choose_pixel_max(graph, fixture, expected, pixel_max)
    module = PretrainedSR(graph, chosen).eval()
    say(
        f"matches the numpy reference (max diff {numpy_diff:.2g}) and the package's TF.js sample "
        f"(max diff {reference_diff:g} grey levels, input range [0, {chosen:g}])"
    )
    t0 = time.perf_counter()
    quality = quality_figures(_torch_run(module), scale)
    say(f"quality on {len(QUALITY_PHOTOS)} held-out photos: {quality} ({time.perf_counter() - t0:.1f} s)")
    quality["reference_max_abs_diff_255"] = reference_diff
    files = {
        f"models/x{scale}/model.json": hashlib.sha256(package.read(f"models/x{scale}/model.json")).hexdigest()
    }
    provenance: dict[str, Any] = {}
    card: dict[str, Any] = {
        "description": f"x{scale} photo super-resolution: pretrained RRDN (ESRGAN-style dense residual "
        f"blocks, DIV2K) imported from {meta['name']}@{meta['version']}, RGB in [0, 1]",
        "recipe": None,
        "input_range": [0.0, 1.0],
        "output_range": [0.0, 1.0],
        "scale_factor": scale,
        "size_multiple": 1,
        "min_size": 8,
        "tile_size": tile_size,
        "tile_overlap": tile_overlap,
        "source": provenance,
    }
    provenance.update(
        {
            "importer": IMPORTER,
            "package": meta["name"],
            "version": meta["version"],
            "registry": "npm",
            "fetch": f"npm pack {meta['name']}@{meta['version']}",
            "model_file": f"models/x{scale}/model.json",
            "model_file_sha256": files[f"models/x{scale}/model.json"],
            "license": meta.get("license"),
            "license_file": LICENSE_FILE,
            "author": meta.get("author"),
            "homepage": meta.get("homepage") or "https://github.com/thekevinscott/UpscalerJS",
            "converted_by": model.meta.get("convertedBy"),
            "generated_by": model.meta.get("generatedBy"),
            "parameters": n_params,
            "input_pixel_max": chosen,
            "numpy_reference_max_abs_diff": numpy_diff,
            "weights": "rounded to float16, stored so in model.onnx (computed in float32)"
            if weights_fp16
            else "float32 as published",
            "reference_files": [REFERENCE_INPUT, REFERENCE_OUTPUT],
            "reference_note": f"the package's assets/fixture.png and its x{scale} result made by the "
            "original model in TF.js; verify reruns model.onnx on the fixture and reports the max diff in "
            "grey levels",
        }
    )
    quality_block = {
        **quality,
        "metric": QUALITY_METRIC.replace("<scale>", str(scale)),
        "thresholds": {
            GATED_FIGURE: {"min": min_quality_gain_db},
            "reference_max_abs_diff_255": {"max": REFERENCE_TOLERANCE_255},
        },
    }
    holdout = {
        "data": photos.DATA_DESCRIPTION + "; whole photos, trimmed to a multiple of the scale",
        "names": list(QUALITY_PHOTOS),
        "note": "the project's fixed held-out split (no recipe trains on these photos); the model was "
        "pretrained on DIV2K elsewhere, which holds none of them",
    }
    training = {
        "data": "DIV2K (pretrained by the package's authors; not retrained here)",
        "command": command or f"genserve-export import-rrdn {package_path} --name {name}",
        "seed": None,
        "source_commit": source_commit(),
        "steps": None,
        "duration_s": None,
        "notes": "imported: TF.js layers graph rebuilt in PyTorch, weights HWIO -> OIHW, TF depth-to-space "
        "(DCR channel order); outputs clipped to [0, 1] as upscalerjs does",
    }
    example = np.random.default_rng(0).uniform(0.0, 1.0, (2, 3, 16, 16)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="genserve-import-") as tmp:
        extras = {}
        for file_name, data in (
            (LICENSE_FILE, licence_text),
            (REFERENCE_INPUT, package.read("assets/fixture.png")),
            (REFERENCE_OUTPUT, package.read(f"assets/samples/{scale}x/result.png")),
        ):
            (Path(tmp) / file_name).write_bytes(data)
            extras[file_name] = Path(tmp) / file_name
        provenance["files_sha256"] = {
            f: hashlib.sha256(p.read_bytes()).hexdigest() for f, p in extras.items()
        }
        t0 = time.perf_counter()
        target = export_model(
            module,
            kind="super_resolution",
            name=name,
            version=version,
            out_dir=out_dir,
            example_inputs={"image": example},
            card=card,
            config=config,
            quality=quality_block,
            holdout=holdout,
            training=training,
            fp16=fp16,
            overwrite=overwrite,
            extra_files=extras,
            weights_fp16=weights_fp16,
        )
    say(
        f"exported {target} in {time.perf_counter() - t0:.1f} s (total {time.perf_counter() - started:.1f} s)"
    )
    return target
