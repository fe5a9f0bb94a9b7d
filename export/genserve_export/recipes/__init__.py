"""The default models: ``RECIPES`` maps a recipe name to the :class:`Recipe` that trains it.

To add a recipe, append one import line and one ``RECIPES[...] = ...`` line at the end; the order
of the lines is the order of ``build-defaults``. A recipe may define ``default_steps`` (used by
``--steps-scale``) and, optionally, ``evaluate_with_siblings`` and ``grid_pairs`` (see
``genserve_export.recipe``).
"""

from __future__ import annotations

from genserve_export.recipe import Recipe
from genserve_export.recipes.cgan import CganDigitsRecipe
from genserve_export.recipes.dcgan import DcganDigitsRecipe
from genserve_export.recipes.photos_dcgan256 import PhotoDcgan256Recipe
from genserve_export.recipes.photos_pix2pix import PhotoDenoiseRecipe
from genserve_export.recipes.photos_sr import PhotoSuperResolutionRecipe
from genserve_export.recipes.vae import VaeDigitsRecipe

RECIPES: dict[str, Recipe] = {}
RECIPES["vae-digits"] = VaeDigitsRecipe()
RECIPES["dcgan-digits"] = DcganDigitsRecipe()
RECIPES["cgan-digits"] = CganDigitsRecipe()
RECIPES["sr-photos-x4"] = PhotoSuperResolutionRecipe()
RECIPES["pix2pix-denoise"] = PhotoDenoiseRecipe()
RECIPES["dcgan-photos-256"] = PhotoDcgan256Recipe()


def recipe_for_entry(entry_name: str) -> tuple[str, Recipe] | None:
    """The (recipe name, recipe) that produces repository entry ``entry_name``, if any."""
    for recipe_name, recipe in RECIPES.items():
        if entry_name in recipe.names:
            return recipe_name, recipe
    return None
