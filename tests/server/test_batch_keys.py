"""Typed batch keys: which rows share a batch, and each key's hook for its rows."""

from __future__ import annotations

import numpy as np

from genserve_server.batch_keys import (
    DRAWN_LATENTS_OUTPUT,
    SEED_INPUT,
    ImageRows,
    LatentRows,
    SeedRows,
    TileRows,
    input_shape,
)
from genserve_server.latents import latents_for_seeds


def test_keys_of_different_kinds_never_share_a_batch_even_with_equal_fields() -> None:
    assert TileRows((3, 8, 8)) != ImageRows((3, 8, 8))
    assert LatentRows() != ImageRows() and LatentRows() != SeedRows()
    assert SeedRows(0.5) == SeedRows(0.5) and SeedRows(0.5) != SeedRows(0.7) and SeedRows() != SeedRows(1.0)
    assert len({SeedRows(0.5), SeedRows(0.5), LatentRows(), LatentRows()}) == 2
    assert input_shape(TileRows((3, 8, 8))) == (3, 8, 8) and input_shape(SeedRows()) is None


def test_seed_rows_become_the_latents_of_each_seed_and_cost_what_latent_rows_cost() -> None:
    seeds = np.array([5, 2, 9], np.int64)
    labels = np.array([1, 0, 1], np.int64)
    feeds, added = SeedRows(0.8).prepare({SEED_INPUT: seeds, "label": labels}, 6)
    expected = latents_for_seeds([5, 2, 9], 6, 0.8)
    np.testing.assert_array_equal(feeds["z"], expected)
    np.testing.assert_array_equal(added[DRAWN_LATENTS_OUTPUT], expected)
    assert SEED_INPUT not in feeds and feeds["label"] is labels
    assert SeedRows().cost_part(SEED_INPUT, seeds, 6) == LatentRows().cost_part("z", expected, 6)
    plain = {"z": expected}
    assert LatentRows().prepare(plain, 6) == (plain, {})
    assert SeedRows(0.01).slow_to_prepare(6) or SeedRows(0.01).slow_to_prepare(64)
    assert not SeedRows().slow_to_prepare(64) and not LatentRows().slow_to_prepare(64)
