"""Training helpers shared by the default recipes: seeding, batches, progress, BN standing stats."""

from __future__ import annotations

import copy
import logging
import random
import sys
import weakref
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from genserve_export.recipe import OnnxRun

logger = logging.getLogger(__name__)

EVAL_SEED = 2024  # latents and labels used for quality figures, identical at train and verify time

_T = TypeVar("_T")
# What once() computed, by the first of its runs (kept while that run object lives).
_ONCE: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = weakref.WeakKeyDictionary()


def once(runs: tuple[OnnxRun, ...], key: Hashable, compute: Callable[[], _T]) -> _T:
    """``compute()``, computed once per ``key`` and run objects (the same graphs on the same fixed
    inputs give the same result): verify hands every entry of a repository the same OnnxRun per
    graph, so the figures one entry needs of a sibling (the VQ-VAE encoder's codes of the holdout
    set, a top prior's bits) are not computed again. Kept while ``runs[0]`` lives; the others are
    held weakly too. Callers must not change what it returns."""
    first, *others = runs
    try:
        kept = _ONCE.setdefault(first, {})
        full_key = (key, *(weakref.ref(r) for r in others))
    except TypeError:  # a run that cannot be weakly referenced: computed every time
        return compute()
    if full_key not in kept:
        kept[full_key] = compute()
    return kept[full_key]  # type: ignore[no-any-return]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def batches(n_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless reshuffled index batches (the last partial batch of an epoch is dropped)."""
    while True:
        order = torch.randperm(n_items, generator=generator)
        for start in range(0, n_items - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def progress_bar(steps: int, desc: str, enabled: bool) -> tqdm:
    """A tqdm bar over ``steps`` optimiser steps."""
    interactive = sys.stderr.isatty()  # a log file gets a line every 10 s, a terminal a live bar
    return tqdm(
        range(steps),
        desc=desc,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        mininterval=0.2 if interactive else 10.0,
    )


@torch.no_grad()
def standing_batch_stats(
    generator: nn.Module, sample_inputs: Callable[[], tuple[torch.Tensor, ...]], rounds: int = 20
) -> None:
    """Recompute BatchNorm running statistics as a plain average over fresh generator batches.

    GAN training leaves running statistics that lag the weights; eval-mode BN then drifts from
    what the discriminator saw ("standing statistics", BigGAN).
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator.train()
    for _ in range(rounds):
        generator(*sample_inputs())
    generator.eval()


def torch_run(module: nn.Module, output_names: tuple[str, ...]) -> OnnxRun:
    """An ``OnnxRun`` backed by the PyTorch module (for train-time quality figures)."""

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.asarray(v)) for v in feeds.values()))
        values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
        return {n: v.cpu().numpy() for n, v in zip(output_names, values, strict=True)}

    return run


def run_batched(
    run: OnnxRun, feeds: Mapping[str, np.ndarray], output: str, batch_size: int = 250
) -> np.ndarray:
    """Run ``run`` over ``feeds`` in chunks and concatenate ``output``."""
    n = len(next(iter(feeds.values())))
    parts = [
        run({k: v[i : i + batch_size] for k, v in feeds.items()})[output] for i in range(0, n, batch_size)
    ]
    return np.concatenate(parts)


def pick_device(device: str | None) -> str:
    """``device`` or CUDA when present, else CPU."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class EmaGenerator:
    """Exponential moving average of a generator's weights (the exported generator is the average).

    Averaging the iterates removes most of the high-frequency speckle a GAN generator carries from
    step to step (Yazici et al. 2019). BatchNorm buffers are not averaged: call
    ``standing_batch_stats`` on the averaged copy afterwards.
    """

    def __init__(self, generator: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.average = copy.deepcopy(generator).eval()
        for parameter in self.average.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        # warm-up: a plain mean over the first steps, so the early random weights fade quickly
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        for avg, live in zip(self.average.parameters(), generator.parameters(), strict=True):
            avg.lerp_(live, 1.0 - decay)


CHECKPOINT_EVERY = 500


def log_checkpoint(
    name: str,
    step: int,
    ema: EmaGenerator,
    sample_inputs: Callable[[], tuple[torch.Tensor, ...]],
    figures: Callable[[OnnxRun], Mapping[str, float]],
) -> None:
    """Log the averaged generator's quality figures mid-training (how many steps are enough)."""
    with torch.random.fork_rng(devices=[]):  # leave the training RNG stream untouched
        probe = copy.deepcopy(ema.average).cpu()
        standing_batch_stats(probe, sample_inputs)
    shown = {k: round(v, 3) for k, v in figures(torch_run(probe, ("image",))).items() if isinstance(v, float)}
    logger.info("%s step %d: %s", name, step, shown)
