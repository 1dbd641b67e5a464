"""A correction to onnxscript's rewrite rules that torch.onnx's export and our passes run.

onnxscript's no-op rules (`x + 0`, `x - 0`, `x * 1`, `x / 1`) accept any constant within abs_tol 1e-8
and rel_tol 1e-5 of 0 or 1 (onnxscript 0.7), so `variance + 1e-8` (Helium's RMSNorm epsilon) is removed
as `x + 0`: the norm of an all-zero embedding row (a padding token) becomes 0/0 = NaN, which the left-
padded rows of a batch then carry into every position. A no-op is exact or it is not a no-op.
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
