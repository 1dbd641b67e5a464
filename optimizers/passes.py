"""Every pass by name (what recipes list and `kiln convert --passes` accepts), and pass options from the command line."""
from __future__ import annotations

from typing import Iterable

from optimizers.cleanup import CLEANUP, FOLD_WEIGHT_TRANSPOSES, TIED_HEAD_LAYOUT
from optimizers.errors import RecipeError
from optimizers.fusion import FUSION
from optimizers.logits_to_keep import LOGITS_TO_KEEP
from optimizers.pass_types import options_summary
from optimizers.plugin_attention import KILN_ATTENTION
from optimizers.quantize import FP16, INT4, INT8_DYNAMIC, INT8_STATIC, INT8_WEIGHT_ONLY
from optimizers.split_skip_norm import SPLIT_SKIP_LAYER_NORM
from optimizers.winograd import WINOGRAD

PASSES = {
    p.name: p for p in (CLEANUP, FOLD_WEIGHT_TRANSPOSES, FUSION, LOGITS_TO_KEEP, KILN_ATTENTION, FP16, INT8_DYNAMIC,
                        INT8_STATIC, INT8_WEIGHT_ONLY, INT4, SPLIT_SKIP_LAYER_NORM, TIED_HEAD_LAYOUT, WINOGRAD)
}


def parse_pass_options(items: Iterable[str]) -> dict[str, dict]:
    """`["int4.block_size=64", "fusion.gqa=true"]` -> `{"int4": {"block_size": 64}, "fusion": {"gqa": True}}`.

    Each value is converted to the type its pass declares; anything else raises RecipeError naming what is allowed.
    """
    options: dict[str, dict] = {}
    for item in items:
        setting, equals, text = item.partition("=")
        pass_name, dot, key = setting.strip().partition(".")
        if not (equals and dot and pass_name and key):
            raise RecipeError(f"pass option {item!r}: expected PASS.OPTION=VALUE, e.g. int4.block_size=64")
        if pass_name not in PASSES:
            raise RecipeError(f"pass option {item!r}: unknown pass {pass_name!r} (passes: {', '.join(PASSES)})")
        declared = {o.name: o for o in PASSES[pass_name].options}
        if key not in declared:
            raise RecipeError(
                f"pass option {item!r}: pass {pass_name!r} has no option {key!r} ({options_summary(PASSES[pass_name])})"
            )
        option = declared[key]
        try:
            value = option.parse(text)
        except ValueError:
            raise RecipeError(f"pass option {item!r}: {pass_name}.{key} expects {option.accepts}, got {text!r}") from None
        options.setdefault(pass_name, {})[key] = value
    return options
