"""Graph passes on ONNX, chosen by a recipe per target and precision; every pass reports what it did."""
from optimizers.errors import PassFailed, RecipeError
from optimizers.onnx_io import io_contract, save
from optimizers.pass_types import Pass, PassContext, PassOption, PassReport, describe_options
from optimizers.passes import PASSES, parse_pass_options
from optimizers.recipe import RECIPES, passes_named, recipe_for, run_recipe

__all__ = ["Pass", "PassOption", "PassContext", "PassReport", "PASSES", "RECIPES", "recipe_for", "passes_named",
           "run_recipe", "parse_pass_options", "describe_options", "save", "io_contract", "PassFailed", "RecipeError"]
