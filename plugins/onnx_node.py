"""kiln::CausalAttention as an ONNX node: its name, a CPU host for it (onnx.reference) and its TensorRT tags.

The node: inputs query [b, h, q, d], key and value [b, kv_h, s, d] (the present cache), key_mask [b, s]
int32, alibi_slopes [h] float32 (zeros: no ALiBi); attribute scale (0.0: 1/sqrt(d)); output [b, h, q, d].
Works on onnx protos only: optimizers and kiln both call it, and plugins imports neither.
"""
from __future__ import annotations

import numpy as np

from plugins.tensorrt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = "kiln"
OP_TYPE = PLUGIN_NAME  # "CausalAttention": TensorRT's parser finds the plugin by the node's op type


def reference_evaluator(model, implementation: str = "numpy"):
    """onnx.reference.ReferenceEvaluator for a graph (serialized bytes or an onnx.ModelProto) with
    kiln::CausalAttention nodes; the plugin is computed by the NumPy reference ("numpy") or by the C++ CPU
    kernel through the PyTorch op ("torch")."""
    import onnx
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    from plugins.reference import attention_reference

    def compute(query, key, value, key_mask, slopes, scale):
        past_len = key.shape[2] - query.shape[2]
        slopes = slopes if np.any(slopes) else None
        if implementation == "numpy":
            return attention_reference(query, key, value, past_len, slopes, scale or None, key_mask)
        import torch

        from plugins.torch_op import load_torch_op

        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (query, key, value)]
        mask = torch.from_numpy(np.ascontiguousarray(key_mask))
        slopes = None if slopes is None else torch.from_numpy(np.array(slopes))
        return load_torch_op()(*tensors, past_len, slopes, scale or None, mask).numpy()

    class CausalAttention(OpRun):
        op_domain = DOMAIN

        def _run(self, query, key, value, key_mask, alibi_slopes, scale=None):
            return (compute(query, key, value, key_mask, alibi_slopes, scale),)

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    return ReferenceEvaluator(proto, new_ops=[CausalAttention])


def tag_plugin_nodes(model) -> int:
    """Mark the kiln::CausalAttention nodes of `model` (an onnx.ModelProto) for TensorRT's ONNX parser;
    returns how many there are.

    The parser finds a plugin by op_type plus the `plugin_namespace` / `plugin_version` attributes (not
    the ONNX domain), and takes its ahead-of-time implementation only when `aot` is set.
    """
    from onnx import helper

    wanted = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}
    count = 0
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        present = {a.name for a in node.attribute}
        node.attribute.extend(helper.make_attribute(k, v) for k, v in wanted.items() if k not in present)
        count += 1
    return count
