"""Small hand-written ONNX graphs with the decoder IO contract, for tests that only read names and shapes."""
from onnx import TensorProto, helper

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 1, 2, 8, 16


def contract_graph(extra_nodes=()):
    """One layer of the IO contract; the nodes only pass tensors through (nothing here runs it)."""
    cache = ["batch", KV_HEADS, "past_sequence", HEAD_DIM]
    present = ["batch", KV_HEADS, "total_sequence", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, cache),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, present),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, present),
    ]
    nodes = [
        helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
        helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"]),
        helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT),
        *extra_nodes,
    ]
    graph = helper.make_graph(nodes, "contract", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("kiln", 1)])


def attention_node(name="attn0", **attributes):
    return helper.make_node(
        "CausalAttention", ["q", "k", "v", "key_mask", "slopes"], [f"{name}_out"], name=name, domain="kiln", scale=0.0, **attributes
    )
