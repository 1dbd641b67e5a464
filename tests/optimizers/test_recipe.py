"""Recipes as data, run_recipe's contract checks and its failure messages, file in and out."""
from __future__ import annotations

import onnx_ir as ir
import pytest

from kiln.verify import VerificationInputs, output_error, run_steps
from optimizers import PASSES, RECIPES, Pass, PassContext, PassFailed, RecipeError, recipe_for, run_recipe
from runtimes.onnxruntime_adapter import OnnxRuntimePredictor


def test_every_recipe_names_known_passes_and_starts_with_cleanup():
    for (target, precision), names in RECIPES.items():
        assert names[0] == "cleanup", (target, precision)
        assert set(names) <= set(PASSES), (target, precision)
    assert recipe_for("cpu", "int4") == ["cleanup", "fold_weight_transposes", "fusion", "split_skip_layer_norm",
                                        "winograd", "logits_to_keep", "int4"]


def test_unknown_recipe_and_pass_are_named():
    with pytest.raises(RecipeError, match=r"'cpu' at precision 'fp8'.*cpu/fp32"):
        recipe_for("cpu", "fp8")
    with pytest.raises(RecipeError, match=r"unknown pass 'fuse_everything'.*cleanup"):
        run_recipe(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), PassContext(), passes=["fuse_everything"])


def test_the_recipe_row_comes_from_context_recipe_else_the_target():
    empty = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    _, reports = run_recipe(empty, PassContext(target="rocm", recipe="cuda", precision="fp16"))
    assert [r.name for r in reports] == recipe_for("cuda", "fp16")
    with pytest.raises(RecipeError, match=r"no optimization recipe for 'rocm' at precision 'fp16'"):
        run_recipe(empty, PassContext(target="rocm", precision="fp16"))


def _boom(model, context):
    raise RuntimeError("kernel table is empty")


def _rename_logits(model, context):
    model.graph.outputs[0].name = "scores"
    return model, {}


def test_a_failing_pass_is_named_with_the_passes_before_it(exported):
    path, _ = exported("tiny-gpt2")
    with pytest.raises(PassFailed, match=r"pass 'boom' failed \(after cleanup\): RuntimeError: kernel table is empty") as e:
        run_recipe(path, PassContext(), passes=["cleanup", Pass("boom", _boom)])
    assert e.value.applied == ["cleanup"]


def test_a_pass_that_renames_an_output_breaks_the_contract(exported):
    path, _ = exported("tiny-gpt2")
    with pytest.raises(PassFailed, match=r"pass 'rename' changed the engine's IO contract.*outputs were \['logits'"):
        run_recipe(path, PassContext(), passes=[Pass("rename", _rename_logits)])


def test_path_in_path_out_with_external_data_keeps_outputs(exported, tmp_path):
    path, loaded = exported("tiny-gpt2")
    out = tmp_path / "model.onnx"
    _, reports = run_recipe(path, PassContext(facts=loaded.facts, family=loaded.family), output=out, external_data=True)
    assert [r.name for r in reports] == ["cleanup", "tied_head_layout", "fusion", "split_skip_layer_norm", "winograd",
                                         "logits_to_keep"]
    assert (tmp_path / "model.onnx.data").stat().st_size > 100_000
    assert all(r.seconds >= 0 and r.bytes_after > 0 for r in reports)
    plain, optimized = OnnxRuntimePredictor(path), OnnxRuntimePredictor(out)
    assert optimized.signature == plain.signature
    want, got = run_steps(plain, 1024, VerificationInputs()), run_steps(optimized, 1024, VerificationInputs())
    for name in want[0]:
        assert output_error([s[name] for s in got], [s[name] for s in want])["relative"] < 1e-5, name


def test_in_place_on_a_file_with_external_data(exported, tmp_path):
    """The engine dir case: read model.onnx + model.onnx.data, write the result over them."""
    from optimizers import save

    path, loaded = exported("tiny-trained")
    engine = tmp_path / "model.onnx"
    save(ir.load(str(path)), engine, external_data=True)
    context = PassContext(precision="int4", facts=loaded.facts, family=loaded.family)
    run_recipe(engine, context, output=engine, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    run_recipe(engine, context, passes=["cleanup"], output=engine, external_data=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    session = OnnxRuntimePredictor(engine).session
    assert sum(n.op_type == "MatMulNBits" for n in ir.load(str(engine)).graph) == 9 and session


def test_a_recipe_leaves_nothing_holding_the_model(exported):
    """onnxscript's rules keep their last match; run_recipe must let the model go (gpt2: 220 MB), and must
    not trip over a dead weak proxy somewhere in the heap while it looks for them."""
    import gc
    import weakref

    path, loaded = exported("tiny-gpt2")
    context = PassContext(target="cpu", precision="int4", facts=loaded.facts, family=loaded.family)

    class Gone:
        pass

    gone = Gone()
    proxy = weakref.proxy(gone)  # noqa: F841 (kept alive, dead)
    del gone
    model, _ = run_recipe(path, context)
    graph = weakref.ref(model.graph)
    del model
    gc.collect()
    assert graph() is None


def test_cleanup_runs_onnxscripts_optimizer_without_its_quadratic_multi_output_rules():
    """onnxscript matches a multi-output pattern (SlicesSplit) by scanning the graph per candidate: left out while
    the passes run, and the library's own rule list is back afterwards."""
    from onnxscript import rewriter

    from optimizers.cleanup import single_output_rewrites

    everything = rewriter._DEFAULT_REWRITE_RULES
    assert any(not rule._target_pattern.has_single_output_node for rule in everything if hasattr(rule, "_target_pattern"))
    with single_output_rewrites():
        kept = rewriter._DEFAULT_REWRITE_RULES
        assert 0 < len(kept) < len(everything)
        assert all(rule._target_pattern.has_single_output_node for rule in kept if hasattr(rule, "_target_pattern"))
    assert rewriter._DEFAULT_REWRITE_RULES is everything
