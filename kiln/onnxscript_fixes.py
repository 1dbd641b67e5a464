"""A correction to onnxscript's rewrite rules that torch.onnx's export and our passes run.

onnxscript's no-op rules (`x + 0`, `x - 0`, `x * 1`, `x / 1`) accept any constant within abs_tol 1e-8
and rel_tol 1e-5 of 0 or 1 (onnxscript 0.7), so `variance + 1e-8` (Helium's RMSNorm epsilon) is removed
as `x + 0`: the norm of an all-zero embedding row (a padding token) becomes 0/0 = NaN, which the left-
padded rows of a batch then carry into every position. A no-op is exact or it is not a no-op.
"""
from __future__ import annotations


def make_no_op_rules_exact() -> None:
    """Match the no-op rules' constants exactly (idempotent; the rule objects are shared by every caller)."""
    from onnxscript.rewriter._pattern_ir import Constant
    from onnxscript.rewriter.rules.common import _no_op

    for rule in _no_op.rules.rules:
        for node in rule._target_pattern._nodes:
            for value in node.inputs:
                if isinstance(value, Constant):
                    value._abs_tol = value._rel_tol = 0.0
