"""What a pass is: its record (`Pass`, with its declared options and the ops it creates), its context and its report.

A pass runs a function `(model: onnx_ir.Model, context) -> (model, details)`; the record around it times
the call, counts ops before and after and writes the `PassReport`. Passes work on `onnx_ir.Model` (what
onnxscript's optimizer and rewriter take); those that call onnxruntime's tools convert inside.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Mapping, Protocol

import onnx_ir as ir

from optimizers.errors import RecipeError
from runtimes.decoder_lm import ModelFacts

OpTypes = tuple[str, ...]  # an option holding op types, given on the command line as "Softmax,LayerNormalization"
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class PassOption:
    """One knob of a pass, declared with its type and default so the CLI can list, parse and check it."""

    name: str
    type: object  # bool, int, float, str or OpTypes
    default: object
    help: str = ""

    @property
    def type_name(self) -> str:
        return "list[str]" if self.type == OpTypes else self.type.__name__

    @property
    def accepts(self) -> str:
        """What the command line may give, for error messages."""
        if self.type is bool:
            return "bool (true or false)"
        return "list[str] (comma-separated)" if self.type == OpTypes else self.type_name

    def parse(self, text: str) -> object:
        """The value of `text` as this option's type; ValueError when it is not one."""
        if self.type == OpTypes:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if self.type is bool:
            if text.strip().lower() not in _TRUE + _FALSE:
                raise ValueError(text)
            return text.strip().lower() in _TRUE
        return self.type(text)

    def show(self, value: object) -> str:
        """`value` written as the command line takes it."""
        if self.type == OpTypes:
            return ",".join(value)
        return str(value).lower() if self.type is bool else str(value)


class FamilyFacts(Protocol):
    """What passes read of a family record (`exporter.families.Family`); any object with these attributes does."""

    name: str
    positions: str  # "learned" | "rotary" | "alibi"
    plugin_biases: str | None  # the biases kiln::CausalAttention rebuilds; None: it cannot replace this attention
    plugin_refusal: str  # why not, when plugin_biases is None
    fusion_note: str  # what ONNX Runtime's fusions give this family's export


@dataclass
class PassContext:
    """What passes may read: where the engine runs, at which precision, and the model's facts.

    `target` is the kiln target ("rocm"); `recipe` the RECIPES row it uses ("cuda"), None: the target's
    name. `calibration` is a list of feed dicts (name -> array) for static quantization, and
    `calibration_source` says where they came from. `options` holds per-pass knobs, e.g.
    `{"int4": {"block_size": 64}}`; read them with `option()`.
    """

    target: str = "cpu"
    precision: str = "fp32"
    recipe: str | None = None
    facts: ModelFacts | None = None
    family: FamilyFacts | None = None
    keep_io_types: bool = True  # fp16: inputs and outputs stay fp32
    calibration: list[dict] | None = None
    calibration_source: str | None = None  # e.g. "corpus.txt, 1234 tokens"
    options: dict[str, dict] = field(default_factory=dict)

    def option(self, pass_name: str, key: str):
        """The value of `key` for `pass_name`: the one given, else the default its Pass declared (a Pass fills
        the defaults in before it runs its function)."""
        return self.options[pass_name][key]


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


@dataclass(frozen=True)
class Pass:
    """A pass: its function `(model, context) -> (model, details)`, the options it reads and the op types it
    creates (domain-prefixed unless ONNX's, e.g. "com.microsoft::MatMulNBits"). The report counts the
    nodes of those types the pass added under `fused` or `quantized`, as `counts_as` says."""

    name: str
    run: Callable[[ir.Model, PassContext], tuple[ir.Model, dict]]
    description: str = ""
    options: tuple[PassOption, ...] = ()
    creates: tuple[str, ...] = ()
    counts_as: str = "fused"  # "fused" | "quantized"

    def settings(self, given: Mapping[str, object]) -> dict[str, object]:
        """`given` checked against the declared options, with the defaults of those not given."""
        declared = {o.name: o for o in self.options}
        unknown = [key for key in given if key not in declared]
        if unknown:
            raise RecipeError(f"pass {self.name!r} has no option {unknown[0]!r} ({options_summary(self)})")
        return {name: given.get(name, o.default) for name, o in declared.items()}

    def __call__(self, model: ir.Model, context: PassContext) -> tuple[ir.Model, PassReport]:
        settings = self.settings(context.options.get(self.name, {}))
        context = replace(context, options={**context.options, self.name: settings})  # the caller's stays as given
        ops_before, bytes_before = op_counts(model), initializer_bytes(model)
        start = time.perf_counter()
        model, details = self.run(model, context)
        seconds = time.perf_counter() - start
        ops_after, bytes_after = op_counts(model), initializer_bytes(model)
        created = {op: ops_after[op] - ops_before.get(op, 0) for op in self.creates
                   if ops_after.get(op, 0) > ops_before.get(op, 0)}
        return model, PassReport(
            name=self.name,
            changed=ops_before != ops_after or bytes_before != bytes_after or bool(details.pop("changed", False)),
            seconds=round(seconds, 3),
            ops_before=ops_before,
            ops_after=ops_after,
            fused=created if self.counts_as == "fused" else {},
            quantized=created if self.counts_as == "quantized" else {},
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            details=details,
        )


def describe_options(one: Pass) -> list[str]:
    """One line per declared option, as `kiln convert --passes list` prints them: `name: type = default  (help)`."""
    return [f"{o.name}: {o.type_name} = {o.show(o.default)}" + (f"  ({o.help})" if o.help else "") for o in one.options]


def options_summary(one: Pass) -> str:
    """The pass's options and their types on one line, for error messages."""
    if not one.options:
        return "it takes none"
    return "options: " + ", ".join(f"{o.name} ({o.type_name})" for o in one.options)


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


def replace_value(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of `old` read `new` instead, with `old`'s shape and type; a graph output keeps its name."""
    new.shape, new.type = old.shape, old.type
    if old.is_graph_output():
        name, old.name = old.name, None
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
