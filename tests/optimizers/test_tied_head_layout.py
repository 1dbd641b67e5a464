"""tied_head_layout: a tied LM head stored in its MatMul's layout, the embedding reading its transpose."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from optimizers import PassContext, run_recipe, save
from tests.optimizers.conftest import prefill_feeds


def test_the_head_is_a_plain_matmul_over_one_copy_of_the_table(exported, tmp_path):
    path, loaded = exported("tiny-gpt2")  # gpt2 ties its LM head to the token embedding
    context = PassContext(facts=loaded.facts, family=loaded.family)
    before, _ = run_recipe(path, context, passes=["cleanup"])
    save(before, tmp_path / "before.onnx")
    after, reports = run_recipe(tmp_path / "before.onnx", context, passes=["tied_head_layout"])
    save(after, tmp_path / "after.onnx")
    assert reports[0].details["heads_moved"] == 1

    graph = onnx.load(str(tmp_path / "after.onnx")).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    hidden, vocab = loaded.facts.hidden_size, loaded.facts.vocab_size
    head = next(node for node in graph.node if node.op_type == "MatMul" and shapes.get(node.input[1]) == [hidden, vocab])
    assert head is not None  # its weight an initializer in [K, N] layout: ONNX Runtime prepacks it
    assert [dims for dims in shapes.values() if sorted(dims) == sorted([hidden, vocab])] == [[hidden, vocab]]
    transpose = next(node for node in graph.node if node.op_type == "Transpose" and node.input[0] == head.input[1])
    assert [node.op_type for node in graph.node if transpose.output[0] in node.input] == ["Gather"]

    feeds = prefill_feeds(np.random.default_rng(0).integers(0, vocab, (2, 7)), loaded.facts)
    want, got = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
                 for name in ("before.onnx", "after.onnx"))
    np.testing.assert_array_equal(got, want)


def test_an_untied_head_is_left_alone(exported):
    path, loaded = exported("tiny-llama")  # Llama's head has weights of its own
    context = PassContext(facts=loaded.facts, family=loaded.family)
    _, reports = run_recipe(path, context, passes=["cleanup", "tied_head_layout"])
    assert reports[1].details["heads_moved"] == 0 and not reports[1].changed
