"""Graph passes on ONNX, chosen by a recipe per target and precision; every pass reports what it did."""
from optimizers.errors import PassFailed, RecipeError
from optimizers.recipe import (
    RECIPES, ModelSizes, Pass, PassContext, PassReport, io_contract, recipe_for, run_recipe, save,
)

__all__ = ["Pass", "PassContext", "PassReport", "ModelSizes", "RECIPES", "recipe_for", "run_recipe", "save",
           "io_contract", "PassFailed", "RecipeError"]
