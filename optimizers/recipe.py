"""Passes, their context and reports, recipes per (target, precision), and `run_recipe`.

A pass is a callable `(model: onnx_ir.Model, context) -> (model, PassReport)`; a recipe is an ordered
list of pass names, plain data that `kiln convert --passes` can print and override. Passes work on
`onnx_ir.Model` (what onnxscript's optimizer and rewriter take); those that call onnxruntime's tools
convert to a ModelProto and back inside.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import onnx_ir as ir

from optimizers.errors import PassFailed, RecipeError


@dataclass(frozen=True)
class ModelSizes:
    """The facts of a decoder LM that passes need (the fields of `exporter.families.ModelFacts`)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int = 0


@dataclass
class PassContext:
    """What passes may read: where the engine runs, at which precision, and the model's sizes.

    `calibration` is a list of feed dicts (name -> array) for static quantization; `options` holds
    per-pass knobs, e.g. `{"int4": {"block_size": 64}}`.
    """

    target: str = "cpu"
    precision: str = "fp32"
    facts: ModelSizes | None = None
    family: str | None = None  # "gpt2", "gpt-neo", "bloom", "llama"
    keep_io_types: bool = True  # fp16: inputs and outputs stay fp32
    calibration: list[dict] | None = None
    options: dict = field(default_factory=dict)

    def option(self, pass_name: str, key: str, default):
        return self.options.get(pass_name, {}).get(key, default)


@dataclass
class PassReport:
    """What one pass did: for the manifest and `kiln inspect`."""

    name: str
    changed: bool
    seconds: float = 0.0
    ops_before: dict[str, int] = field(default_factory=dict)  # op type -> count (domain-prefixed if not ONNX)
    ops_after: dict[str, int] = field(default_factory=dict)
    fused: dict[str, int] = field(default_factory=dict)  # fused op type -> nodes created
    quantized: dict[str, int] = field(default_factory=dict)  # quantized op type -> nodes
    bytes_before: int = 0  # initializer bytes
    bytes_after: int = 0
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Pass(Protocol):
    name: str

    def __call__(self, model: ir.Model, context: PassContext) -> tuple[ir.Model, PassReport]: ...


@dataclass(frozen=True)
class FunctionPass:
    """A pass made of a function `(model, context) -> (model, details)`; timing and op counts come from here."""

    name: str
    run: Callable[[ir.Model, PassContext], tuple[ir.Model, dict]]
    description: str = ""

    def __call__(self, model: ir.Model, context: PassContext) -> tuple[ir.Model, PassReport]:
        ops_before, bytes_before = op_counts(model), initializer_bytes(model)
        start = time.perf_counter()
        model, details = self.run(model, context)
        seconds = time.perf_counter() - start
        ops_after, bytes_after = op_counts(model), initializer_bytes(model)
        grown = {op: n - ops_before.get(op, 0) for op, n in ops_after.items() if n > ops_before.get(op, 0)}
        report = PassReport(
            name=self.name,
            changed=ops_before != ops_after or bytes_before != bytes_after or bool(details.pop("changed", False)),
            seconds=round(seconds, 3),
            ops_before=ops_before,
            ops_after=ops_after,
            fused={op: n for op, n in grown.items() if op in FUSED_OPS},
            quantized={op: n for op, n in grown.items() if op in QUANTIZED_OPS},
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            details=details,
        )
        return model, report


FUSED_OPS = {
    "com.microsoft::MultiHeadAttention", "com.microsoft::GroupQueryAttention", "com.microsoft::Attention",
    "com.microsoft::SkipLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization",
    "com.microsoft::SimplifiedLayerNormalization", "SimplifiedLayerNormalization", "com.microsoft::RotaryEmbedding",
    "com.microsoft::FastGelu", "com.microsoft::BiasGelu", "com.microsoft::Gelu", "com.microsoft::FusedMatMul",
    "kiln::CausalAttention",
}
QUANTIZED_OPS = {
    "MatMulInteger", "DynamicQuantizeLinear", "com.microsoft::DynamicQuantizeMatMul", "com.microsoft::MatMulNBits",
    "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "com.microsoft::MatMulIntegerToFloat",
}


def op_counts(model: ir.Model) -> dict[str, int]:
    counts = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes()
    )
    return dict(sorted(counts.items()))


def add_initializer(model: ir.Model, name: str, array) -> ir.Value:
    """Register `array` (a NumPy array) as an initializer of `model`'s graph; returns its value."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    value.const_value = ir.tensor(array, name=name)
    model.graph.register_initializer(value)
    return value


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


# (target, precision) -> pass names, in order. Recipes are data: print them, or pass your own list.
RECIPES: dict[tuple[str, str], list[str]] = {
    ("cpu", "fp32"): ["cleanup", "fusion"],
    ("cpu", "int8"): ["cleanup", "fold_weight_transposes", "fusion", "int8_dynamic"],
    ("cpu", "int8-static"): ["cleanup", "fold_weight_transposes", "fusion", "int8_static"],
    ("cpu", "int4"): ["cleanup", "fold_weight_transposes", "fusion", "int4"],
    ("cuda", "fp32"): ["cleanup", "fusion"],
    ("cuda", "fp16"): ["cleanup", "fusion", "fp16"],
    ("cuda", "int8"): ["cleanup", "fold_weight_transposes", "fusion", "int8_dynamic"],
    ("cuda", "int4"): ["cleanup", "fold_weight_transposes", "fusion", "int4"],
}


def recipe_for(target: str, precision: str) -> list[str]:
    try:
        return list(RECIPES[(target, precision)])
    except KeyError:
        known = ", ".join(f"{t}/{p}" for t, p in RECIPES)
        raise RecipeError(f"no optimization recipe for target {target!r} at precision {precision!r} (known: {known})") from None


def passes_named(names: Sequence[str]) -> list[Pass]:
    from optimizers.passes import PASSES

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
    """Run `passes` (default: the recipe of `context.target`/`context.precision`) over `model`.

    `model` is an `onnx_ir.Model` or the path of an .onnx file (weights may be in external data beside
    it). With `output`, the result is saved there; weights go to `<output>.data` when `external_data` is
    True, or when it is None and they exceed `EXTERNAL_DATA_BYTES`. After every pass the IO contract (input and output
    names, element types, dims) is checked against the input model's. A failing pass raises PassFailed
    naming it and the passes that ran before it. `after_pass(report, model)` sees the model after each
    pass, e.g. to verify it and find the pass that made the error grow.
    """
    if isinstance(model, (str, Path)):
        model = ir.load(str(model))
    chosen = passes_named(recipe_for(context.target, context.precision)) if passes is None else [
        passes_named([p])[0] if isinstance(p, str) else p for p in passes
    ]
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


# Saving weights inside the .onnx file builds the whole protobuf in memory first (measured on gpt2: peak
# 2.1 GB instead of 1.05 GB); external data is written tensor by tensor.
EXTERNAL_DATA_BYTES = 64 * 1024**2


def save(model: ir.Model, path: str | Path, external_data: bool | None = None) -> list[Path]:
    """Write `model` to `path` (+ `path.data` when external); returns the files written."""
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if not external_data:
        load_external_weights(model)  # else they would stay references to a file about to be replaced
    # Written beside, then renamed: `path` may be the file the model's weights are still read from.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.saving-", dir=path.parent))
    try:
        ir.save(model, str(staging / path.name), external_data=data.name if external_data else None)
        os.replace(staging / path.name, path)
        if external_data:
            os.replace(staging / data.name, data)
        elif data.exists():
            data.unlink()  # a stale .data of an earlier save would be taken for part of this model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path] + ([data] if external_data else [])


def load_external_weights(model: ir.Model) -> None:
    """Read weights held in external data files into memory (the model may outlive, or be saved over,
    the files they are in)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            value.const_value = ir.tensor(tensor.numpy(), name=tensor.name)


def io_contract(model: ir.Model) -> dict[str, list[tuple]]:
    """Inputs and outputs as `(name, element type, dims)`, dims as ints or symbolic names."""
    def describe(value: ir.Value) -> tuple:
        dims = None if value.shape is None else tuple(d if isinstance(d, int) else str(d) for d in value.shape)
        return value.name, str(value.dtype), dims

    return {"inputs": [describe(v) for v in model.graph.inputs], "outputs": [describe(v) for v in model.graph.outputs]}


def contract_changes(before: dict, after: dict, check_types: bool = True) -> list[str]:
    changes = []
    for side in ("inputs", "outputs"):
        if [v[0] for v in before[side]] != [v[0] for v in after[side]]:
            changes.append(f"{side} were {[v[0] for v in before[side]]}, now {[v[0] for v in after[side]]}")
            continue
        for (name, dtype, dims), (_, new_dtype, new_dims) in zip(before[side], after[side]):
            if check_types and dtype != new_dtype:
                changes.append(f"{name}: type was {dtype}, now {new_dtype}")
            if dims != new_dims:
                changes.append(f"{name}: dims were {list(dims or [])}, now {list(new_dims or [])}")
    return changes
