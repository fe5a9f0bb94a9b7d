"""The default models: ``RECIPES`` maps a recipe name to the :class:`Recipe` that trains it.

To add a recipe, append one import line and one ``RECIPES[...] = ...`` line at the end; the order
of the lines is the order of ``build-defaults``. A recipe may define ``default_steps`` (used by
``--steps-scale``) and, optionally, ``evaluate_with_siblings`` and ``grid_pairs`` (see
``genserve_export.recipe``).
"""

from __future__ import annotations

from genserve_export.recipe import Recipe
from genserve_export.recipes.cgan import cgan_digits_recipe
from genserve_export.recipes.cgan_fashion import cgan_fashion_recipe
from genserve_export.recipes.cyclegan_digits import CycleGanDigitsRecipe
from genserve_export.recipes.dcgan_mnist import DcganMnistRecipe
from genserve_export.recipes.photos_colorize import PhotoColorizeRecipe
from genserve_export.recipes.photos_pix2pix import PhotoDenoiseRecipe
from genserve_export.recipes.photos_sr import PhotoSuperResolutionRecipe
from genserve_export.recipes.photos_srgan import PhotoSrganRecipe
from genserve_export.recipes.stylegan_digits import StyleganDigitsRecipe
from genserve_export.recipes.vae import VaeDigitsRecipe
from genserve_export.recipes.vqvae import VqvaeDigitsRecipe

RECIPES: dict[str, Recipe] = {}
RECIPES["vae-digits"] = VaeDigitsRecipe()
RECIPES["dcgan-digits"] = DcganMnistRecipe()
RECIPES["cgan-digits"] = cgan_digits_recipe()
RECIPES["sr-photos-x4"] = PhotoSuperResolutionRecipe()
RECIPES["srgan-photos-x4"] = PhotoSrganRecipe()
RECIPES["unet-denoise"] = PhotoDenoiseRecipe()
RECIPES["cgan-fashion"] = cgan_fashion_recipe()
RECIPES["vqvae-digits"] = VqvaeDigitsRecipe()
RECIPES["pix2pix-colorize"] = PhotoColorizeRecipe()
RECIPES["cyclegan-digits"] = CycleGanDigitsRecipe()
RECIPES["stylegan-digits"] = StyleganDigitsRecipe()


def recipe_for_entry(entry_name: str) -> tuple[str, Recipe] | None:
    """The (recipe name, recipe) that produces repository entry ``entry_name``, if any."""
    for recipe_name, recipe in RECIPES.items():
        if entry_name in recipe.names:
            return recipe_name, recipe
    return None
