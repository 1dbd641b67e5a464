"""Corrections to onnxscript, whose rewrite rules and aten translations torch.onnx's export runs.

onnxscript's no-op rules (`x + 0`, `x - 0`, `x * 1`, `x / 1`) accept any constant within abs_tol 1e-8
and rel_tol 1e-5 of 0 or 1 (onnxscript 0.7), so `variance + 1e-8` (Helium's RMSNorm epsilon) is removed
as `x + 0`: the norm of an all-zero embedding row (a padding token) becomes 0/0 = NaN, which the left-
padded rows of a batch then carry into every position. A no-op is exact or it is not a no-op.

onnxscript's aten library also lacks a complex-valued `aten::unsqueeze` (0.7), which the rotary of Llama 4
and DeepSeek V2 needs (`freqs_cis[:, :, None, :]` on a `torch.polar` tensor): their export stops with "No
decompositions registered for the complex-valued input". The library has the neighbours (complex squeeze,
mul, view_as_real); this adds the missing one the same way.
"""
from __future__ import annotations


def make_no_op_rules_exact() -> None:
    """Match the no-op rules' constants exactly (idempotent; the rule objects are shared by every caller).

    These are onnxscript internals: where a later release moves them this does nothing rather than break
    every conversion, and tests/kiln/test_onnxscript_fixes.py fails to say the epsilon is lost again."""
    try:
        from onnxscript.rewriter._pattern_ir import Constant
        from onnxscript.rewriter.rules.common import _no_op
    except ImportError:
        return
    for rule in getattr(getattr(_no_op, "rules", None), "rules", []):
        for node in getattr(getattr(rule, "_target_pattern", None), "_nodes", []):
            for value in node.inputs:
                if isinstance(value, Constant):
                    value._abs_tol = value._rel_tol = 0.0


def add_complex_unsqueeze() -> None:
    """Register `aten::unsqueeze` for complex inputs, stored as real tensors with a trailing [re, im] axis."""
    try:
        from onnxscript import opset18 as op
        from onnxscript.function_libs.torch_lib import ops  # noqa: F401  (fills the registry first)
        from onnxscript.function_libs.torch_lib.registration import default_registry, torch_op
    except ImportError:
        return
    registered = default_registry._registry.get("aten::unsqueeze")
    if registered is None or registered.complex:
        return  # already there (from a later onnxscript, or an earlier call)

    @torch_op("aten::unsqueeze", complex=True, trace_only=True)
    def aten_unsqueeze_complex(self, dim: int):
        if dim < 0:
            dim -= 1  # counted from the end, past the [re, im] axis
        return op.Unsqueeze(self, [dim])
