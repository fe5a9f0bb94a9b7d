"""Train a default recipe and export its entries into a repository (used by the CLI and tests)."""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from genserve_export.export import export_model, refuse_published
from genserve_export.provenance import source_commit
from genserve_export.recipe import DEFAULT_VERSION
from genserve_export.recipes import RECIPES

logger = logging.getLogger(__name__)
DEFAULT_SEED = 0


@dataclass(frozen=True, slots=True)
class BuildResult:
    """What one recipe produced and how long it took."""

    recipe: str
    paths: list[Path]
    train_s: float
    export_s: float
    steps: int | None


def version_dirs(recipe_name: str, out_dir: Path, version: str | None = None) -> list[Path]:
    """The version directories recipe ``recipe_name`` writes into ``out_dir``: each of its entries at
    ``version`` (default ``DEFAULT_VERSION``, every recipe's)."""
    return [Path(out_dir) / name / (version or DEFAULT_VERSION) for name in RECIPES[recipe_name].names]


def train_and_export(
    recipe_name: str,
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    steps: int | None = None,
    command: str = "",
    device: str | None = None,
    progress: bool = True,
    fp16: bool = True,
    threads: int | None = 1,
    version: str | None = None,
    overwrite: bool = False,
) -> BuildResult:
    """Train ``recipe_name`` (seeded) and export every entry it produces into ``out_dir``.

    ``threads=1`` by default: the 2-core build machines are shared with other training jobs.
    ``version``: every entry's version directory (default: the recipe's, "1"). A published version
    is immutable: one already in ``out_dir`` is refused before training (:class:`RepositoryExistsError`)
    unless ``overwrite=True``, which replaces it whole.
    """
    if recipe_name not in RECIPES:
        raise KeyError(f"unknown recipe {recipe_name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[recipe_name]
    if not overwrite:
        refuse_published(version_dirs(recipe_name, out_dir, version))
    if threads is not None:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    # A recipe that starts from another entry's model (its `after`) takes the repository it is
    # trained into, where that entry is looked for first.
    where = {"repository": out_dir} if "repository" in inspect.signature(recipe.train).parameters else {}
    specs = recipe.train(seed=seed, steps=steps, device=device, progress=progress, **where)
    train_s = time.perf_counter() - started
    commit = source_commit()
    paths = []
    for spec in specs:
        training = {
            "command": command or f"genserve-export train {recipe_name} --seed {seed}",
            "seed": seed,
            "source_commit": commit,
            "steps": steps if steps is not None else getattr(recipe, "default_steps", None),
            "duration_s": round(train_s, 2),
            "device": device,
            "torch_threads": torch.get_num_threads(),
            **spec.training,
        }
        paths.append(
            export_model(
                spec.module,
                kind=spec.kind,
                name=spec.name,
                version=version or spec.version,
                out_dir=out_dir,
                example_inputs=spec.example_inputs,
                card={"recipe": recipe_name, **spec.card},
                config=spec.config,
                quality=spec.quality,
                holdout=spec.holdout,
                training=training,
                fp16=fp16 and getattr(spec, "fp16", True),
                overwrite=overwrite,
                extra_files=spec.extra_files or None,
            )
        )
    export_s = time.perf_counter() - started - train_s
    logger.info("%s: trained in %.1f s, exported in %.1f s", recipe_name, train_s, export_s)
    return BuildResult(recipe_name, paths, train_s, export_s, training["steps"])
