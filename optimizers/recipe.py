"""Recipes per (recipe name, precision), and `run_recipe`, which runs one over a model.

A recipe is an ordered list of pass names, plain data that `kiln convert --passes` can print and override.
A kiln target names the recipe row it uses (rocm uses "cuda"'s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import onnx_ir as ir

from optimizers.errors import PassFailed, RecipeError
from optimizers.onnx_io import contract_changes, io_contract, save
from optimizers.pass_types import Pass, PassContext, PassReport
from optimizers.passes import PASSES

# (recipe, precision) -> pass names, in order. Recipes are data: print them, or pass your own list.
RECIPES: dict[tuple[str, str], list[str]] = {
    # CPU only: split_skip_layer_norm (ONNX Runtime's CPU SkipLayerNormalization is slower than its two ops),
    # winograd (GPU libraries choose Winograd themselves) and tied_head_layout (its CPU MatMul prepacks a [K, N]
    # weight, not a transposed one). Convolutions stay fp32 at every precision: the quantizing passes take MatMuls
    # whose weight is their second input; winograd's weights are the first.
    ("cpu", "fp32"): ["cleanup", "tied_head_layout", "fusion", "split_skip_layer_norm", "winograd", "logits_to_keep"],
    ("cpu", "int8"): ["cleanup", "fold_weight_transposes", "fusion", "split_skip_layer_norm", "winograd",
                      "logits_to_keep", "int8_dynamic"],
    ("cpu", "int8-static"): ["cleanup", "fold_weight_transposes", "fusion", "split_skip_layer_norm", "winograd",
                             "logits_to_keep", "int8_static"],
    ("cpu", "int4"): ["cleanup", "fold_weight_transposes", "fusion", "split_skip_layer_norm", "winograd",
                      "logits_to_keep", "int4"],
    ("cuda", "fp32"): ["cleanup", "fusion", "logits_to_keep"],
    ("cuda", "fp16"): ["cleanup", "fusion", "logits_to_keep", "fp16"],
    ("cuda", "int8"): ["cleanup", "fold_weight_transposes", "fusion", "logits_to_keep", "int8_dynamic"],
    ("cuda", "int4"): ["cleanup", "fold_weight_transposes", "fusion", "logits_to_keep", "int4"],
    # TensorRT fuses by itself; TensorRT 11 builds strongly typed, so fp16 is cast in the graph (TensorRT 10
    # gets the same graph and its FP16 flag). bf16 has no pass yet: TensorRT 10's BF16 flag lowers fp32.
    ("tensorrt", "fp32"): ["cleanup"],
    ("tensorrt", "fp16"): ["cleanup", "fp16"],
    ("tensorrt", "bf16"): ["cleanup"],
}


def recipe_for(recipe: str, precision: str) -> list[str]:
    try:
        return list(RECIPES[(recipe, precision)])
    except KeyError:
        known = ", ".join(f"{r}/{p}" for r, p in RECIPES)
        raise RecipeError(f"no optimization recipe for {recipe!r} at precision {precision!r} (known: {known})") from None


def passes_named(names: Sequence[str]) -> list[Pass]:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise RecipeError(f"unknown pass {unknown[0]!r} (passes: {', '.join(PASSES)})")
    return [PASSES[n] for n in names]


def run_recipe(
    model: ir.Model | str | Path,
    context: PassContext,
    passes: Sequence[str | Pass] | None = None,
    output: str | Path | None = None,
    external_data: bool | None = None,
    after_pass: Callable[[PassReport, ir.Model], None] | None = None,
) -> tuple[ir.Model, list[PassReport]]:
    """Run `passes` (default: the recipe of `context.recipe or context.target` at `context.precision`) over `model`.

    `model` is an `onnx_ir.Model` or the path of an .onnx file (weights may be in external data beside
    it). With `output`, the result is saved there; weights go to `<output>.data` when `external_data` is
    True, or when it is None and they exceed `EXTERNAL_DATA_BYTES`. After every pass the IO contract (input and output
    names, element types, dims) is checked against the input model's. A failing pass raises PassFailed
    naming it and the passes that ran before it. `after_pass(report, model)` sees the model after each
    pass, e.g. to verify it and find the pass that made the error grow.
    """
    if passes is None:
        passes = recipe_for(context.recipe or context.target, context.precision)
    chosen = [passes_named([p])[0] if isinstance(p, str) else p for p in passes]
    for one in chosen:
        one.settings(context.options.get(one.name, {}))  # an undeclared option fails here, before any work
    if isinstance(model, (str, Path)):
        model = ir.load(str(model))
    contract = io_contract(model)
    reports: list[PassReport] = []
    for one in chosen:
        applied = [r.name for r in reports]
        try:
            model, report = one(model, context)
        except Exception as e:
            raise PassFailed(
                f"pass {one.name!r} failed (after {', '.join(applied) or 'no other pass'}): {type(e).__name__}: {e}",
                one.name, applied,
            ) from e
        broken = contract_changes(contract, io_contract(model), check_types=context.keep_io_types or one.name != "fp16")
        if broken:
            raise PassFailed(
                f"pass {one.name!r} changed the engine's IO contract (after {', '.join(applied) or 'no other pass'}): "
                + "; ".join(broken[:3]),
                one.name, applied,
            )
        reports.append(report)
        if after_pass is not None:
            after_pass(report, model)
    if output is not None:
        save(model, output, external_data)
    forget_rewriter_matches()
    return model, reports


def forget_rewriter_matches() -> None:
    """onnxscript's rules keep what their last match saw: its matchers the match and graph, and class-based
    rules the values their check() stored (MultiHeadAttention's mask, for one). They are module-level
    objects, so the whole model they last saw stays in memory after its caller drops it (measured after
    converting gpt2 to int4: 220 MB). Drop those references; a rule sets them again before it reads them.
    The rules are only reachable through the garbage collector."""
    import gc

    from onnxscript.rewriter import _basics, _matcher, _rewrite_rule

    graph_objects = (ir.Value, ir.Node, ir.Graph)
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance() dereferences a weakref.proxy, which raises once its referent is gone.
        kind = type(obj)
        if issubclass(kind, _matcher.SimplePatternMatcher):
            obj._match, obj._graph, obj._current_node, obj._tracer = _basics.MatchResult(), None, None, None
        elif issubclass(kind, _rewrite_rule.PatternBase):
            for name, value in list(vars(obj).items()):
                if isinstance(value, graph_objects):
                    setattr(obj, name, None)
