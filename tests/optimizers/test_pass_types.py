"""Pass records: declared options (parsed from the command line, defaults through the context) and created ops."""
from __future__ import annotations

import onnx_ir as ir
import pytest

from optimizers import (
    PASSES, Pass, PassContext, PassOption, RecipeError, describe_options, parse_pass_options, run_recipe,
)

GQA, SLN = "com.microsoft::GroupQueryAttention", "com.microsoft::SkipLayerNormalization"
FAST_GELU, NBITS = "com.microsoft::FastGelu", "com.microsoft::MatMulNBits"
GATHER_BLOCKS = "com.microsoft::GatherBlockQuantized"

# What each pass creates on tiny-gpt2 (2 layers, tied LM head), after the passes a recipe runs before it.
CREATED_ON_TINY_GPT2 = {
    "cleanup": ([], {}),
    "fold_weight_transposes": (["cleanup"], {}),
    "fusion": (["cleanup", "fold_weight_transposes"], {GQA: 2, SLN: 5, FAST_GELU: 2}),
    "logits_to_keep": (["cleanup", "fold_weight_transposes", "fusion"], {}),
    "kiln_attention": (["cleanup"], {"kiln::CausalAttention": 2}),
    "fp16": (["cleanup", "fold_weight_transposes", "fusion"], {}),
    "int8_dynamic": (["cleanup", "fold_weight_transposes", "fusion"],
                     {"DynamicQuantizeLinear": 9, "MatMulInteger": 9, GATHER_BLOCKS: 1}),
    "int8_static": (["cleanup", "fold_weight_transposes", "fusion"], {"QuantizeLinear": 18, "DequantizeLinear": 27}),
    "int8_weight_only": (["cleanup", "fold_weight_transposes", "fusion"], {NBITS: 9, GATHER_BLOCKS: 1}),
    "int4": (["cleanup", "fold_weight_transposes", "fusion"], {NBITS: 9, GATHER_BLOCKS: 1}),
    "winograd": (["cleanup", "fusion"], {}),  # no convolutions: tests/optimizers/test_winograd.py
    "split_skip_layer_norm": (["cleanup", "fusion"], {}),  # standard ops: tests/optimizers/test_split_skip_norm.py
    "tied_head_layout": (["cleanup"], {}),  # standard ops: tests/optimizers/test_tied_head_layout.py
}


def empty_model() -> ir.Model:
    return ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)


def test_every_pass_is_in_the_table_and_declares_its_ops_by_domain():
    assert set(CREATED_ON_TINY_GPT2) == set(PASSES)
    for one in PASSES.values():
        assert one.counts_as in ("fused", "quantized"), one.name
        for op in one.creates:
            # ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain, as the export's op counts show.
            assert "::" in op or op in ("SimplifiedLayerNormalization", "DynamicQuantizeLinear", "MatMulInteger",
                                         "QuantizeLinear", "DequantizeLinear", "QLinearMatMul"), (one.name, op)


@pytest.mark.parametrize("name", list(CREATED_ON_TINY_GPT2))
def test_a_run_reports_exactly_the_ops_its_pass_declares(name, exported):
    path, loaded = exported("tiny-gpt2")
    before, expected = CREATED_ON_TINY_GPT2[name]
    context = PassContext(target="tensorrt", precision="fp32", facts=loaded.facts, family=loaded.family)
    _, reports = run_recipe(path, context, passes=[*before, name])
    report, one = reports[-1], PASSES[name]
    created = report.fused if one.counts_as == "fused" else report.quantized
    assert created == expected
    assert (report.quantized if one.counts_as == "fused" else report.fused) == {}
    assert set(created) <= set(one.creates)
    # A contrib or plugin op the pass makes without declaring it would be missing from the report.
    grown = {op for op, n in report.ops_after.items() if n > report.ops_before.get(op, 0)}
    assert {op for op in grown if "::" in op} <= set(one.creates)


def test_pass_options_from_the_command_line_get_their_declared_types():
    options = parse_pass_options([
        "int4.block_size=64", "int4.symmetric=false", "fusion.gqa=true", "kiln_attention.tolerance=1e-3",
        "fp16.keep_fp32=Softmax, LayerNormalization",
    ])
    assert options == {
        "int4": {"block_size": 64, "symmetric": False},
        "fusion": {"gqa": True},
        "kiln_attention": {"tolerance": 1e-3},
        "fp16": {"keep_fp32": ("Softmax", "LayerNormalization")},
    }


@pytest.mark.parametrize("item, message", [
    ("int5.block_size=64", r"unknown pass 'int5' \(passes: cleanup, .*int4, split_skip_layer_norm, tied_head_layout, winograd\)"),
    ("int4.blocksize=64", r"pass 'int4' has no option 'blocksize' \(options: block_size \(int\), "
                          r"accuracy_level \(int\), symmetric \(bool\), quantize_embedding \(bool\)\)"),
    ("cleanup.level=2", r"pass 'cleanup' has no option 'level' \(it takes none\)"),
    ("int4.block_size=big", r"int4.block_size expects int, got 'big'"),
    ("fusion.gqa=maybe", r"fusion.gqa expects bool \(true or false\), got 'maybe'"),
    ("kiln_attention.tolerance=tight", r"kiln_attention.tolerance expects float, got 'tight'"),
    ("int4.block_size", r"expected PASS.OPTION=VALUE"),
    ("block_size=64", r"expected PASS.OPTION=VALUE"),
])
def test_a_bad_pass_option_names_what_is_allowed(item, message):
    with pytest.raises(RecipeError, match=message):
        parse_pass_options([item])


def test_describe_options_lists_type_default_and_help():
    assert describe_options(PASSES["int4"])[0] == "block_size: int = 32  (weights per scale along K; a power of two >= 16)"
    assert describe_options(PASSES["fp16"])[0].startswith(
        "keep_fp32: list[str] = LayerNormalization,SimplifiedLayerNormalization,Softmax  (")
    assert describe_options(PASSES["fusion"])[0].startswith("gqa: bool = true  (")
    assert describe_options(PASSES["cleanup"]) == []
    # What describe_options prints, parse_pass_options takes back.
    for name, one in PASSES.items():
        for option, line in zip(one.options, describe_options(one)):
            shown = line.split(" = ", 1)[1].split("  (")[0]
            assert parse_pass_options([f"{name}.{option.name}={shown}"])[name][option.name] == option.default


def _probe(model, context):
    return model, {"level": context.option("probe", "level"), "mode": context.option("probe", "mode")}


PROBE = Pass("probe", _probe, options=(PassOption("level", int, 3, "how hard"), PassOption("mode", str, "fast")))


def test_context_option_defaults_come_from_the_declaration():
    context = PassContext(options={"probe": {"mode": "slow"}})
    _, reports = run_recipe(empty_model(), context, passes=[PROBE])
    assert reports[0].details == {"level": 3, "mode": "slow"}
    assert context.options == {"probe": {"mode": "slow"}}  # the caller's context is left as it was
    _, reports = run_recipe(empty_model(), PassContext(), passes=[PROBE])
    assert reports[0].details == {"level": 3, "mode": "fast"}


def test_an_undeclared_option_is_refused_before_any_pass_runs():
    ran = []

    def record(model, context):
        ran.append(context)
        return model, {}

    first = Pass("first", record)
    with pytest.raises(RecipeError, match=r"pass 'probe' has no option 'levle' \(options: level \(int\), mode \(str\)\)"):
        run_recipe(empty_model(), PassContext(options={"probe": {"levle": 1}}), passes=[first, PROBE])
    assert ran == []
