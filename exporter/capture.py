"""Capture a model's graphs as ONNX through torch.export, with the IO contract of its kind.

A decoder LM has one graph (role `model`, `model.onnx`); IO names and dims come from the kind's contract
(`runtimes.decoder_lm`): input_ids, attention_mask, position_ids, past_key_values.{i}.key|value ->
logits, present.{i}.key|value, dynamic batch/sequence/past_sequence/total_sequence.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.errors import ExportError
from exporter.graphs import GraphExport, export_kind
from exporter.layer_stamping import NotRepeated, stamp_layers
from exporter.sources import LoadedModel
from runtimes.engine_dir import EXTERNAL_DATA_BYTES
from runtimes.signature import Signature



@dataclass
class CapturedGraph:
    path: Path
    files: list[Path]
    external_data: bool
    opset: int
    signature: Signature  # the kind's contract for this graph
    torch_ops: dict[str, int] = field(default_factory=dict)  # custom ops in an AOTI package -> call sites
    stamped_layers: int = 0  # layers cloned from an exported one (exporter.layer_stamping), not traced


def graph_path(out_dir: Path, role: str, suffix: str) -> Path:
    """`model.onnx` for a kind's one graph `model`; `<role>/model.onnx` for graphs of a pipeline (Optimum's layout)."""
    path = Path(out_dir) / ("" if role == "model" else role) / f"model{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def kind_graphs(loaded: LoadedModel) -> dict[str, GraphExport]:
    return export_kind(loaded.kind, loaded.spec).load().graphs(loaded)


@contextlib.contextmanager
def quiet_exporter():
    """The exporters print progress and graph dumps and warn freely: keep them off the user's terminal."""
    log = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # e.g. "torchvision is not installed"
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), torch.no_grad():
        warnings.simplefilter("ignore")
        yield


def without_fake_tensor_cache():
    """torch.export's fake-tensor dispatch cache costs more than it saves on a one-off trace with symbolic
    shapes (a SmolLM-135M-shaped Llama: 82 s -> 72 s of capture without it)."""
    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def capture(loaded: LoadedModel, out_dir: Path, external_data_threshold: int = EXTERNAL_DATA_BYTES) -> dict[str, CapturedGraph]:
    """Export each graph of `loaded` to ONNX in `out_dir` (+ `.data` beside it when its weights pass the threshold)."""
    captured = {}
    for role, graph in kind_graphs(loaded).items():
        signature = graph.signature
        program, stamped = _export_stamped(graph)
        if program is None:
            program = _export(graph)
        _refuse_fixed_dims(program.model, signature, loaded)
        _name_dims(program.model, signature)
        weight_bytes = sum(p.numel() * p.element_size() for p in graph.module.parameters())
        external = weight_bytes > external_data_threshold
        path = graph_path(out_dir, role, ".onnx")
        program.save(path, external_data=external)
        files = [path] + ([path.with_name(path.name + ".data")] if external else [])
        captured[role] = CapturedGraph(path, files, external, program.model.opset_imports.get("", 0), signature,
                                       stamped_layers=stamped)
    return captured


def _export(graph: GraphExport):
    """torch.onnx.export of one graph -> its ONNXProgram; ExportError naming why it cannot be captured."""
    from torch.export import Dim

    signature = graph.signature
    try:
        # optimize=False: the `cleanup` pass that opens every ONNX recipe runs onnxscript's optimizer;
        # running it here as well doubled its share of the convert.
        with quiet_exporter(), without_fake_tensor_cache(), graph.capturing():
            return torch.onnx.export(
                graph.module, graph.args, dynamic_shapes=graph.dynamic_shapes(Dim), dynamo=True, optimize=False,
                input_names=[t.name for t in signature.inputs], output_names=[t.name for t in signature.outputs],
            )
    except Exception as e:  # the exporter raises many types; all mean "this model cannot be captured"
        raise ExportError(export_failure(e)) from e


def _export_stamped(graph: GraphExport):
    """(ONNXProgram, layers stamped) from the graph's first layers when its layers repeat, or (None, 0): the
    whole graph is exported then, and says why when it cannot be."""
    repeated = graph.repeated
    if repeated is None:
        return None, 0
    try:
        program = _export(repeated.short)
    except ExportError:
        return None, 0
    io_order = ([t.name for t in graph.signature.inputs], [t.name for t in graph.signature.outputs])
    try:
        stamped = stamp_layers(program.model, repeated.scope, repeated.count, graph.module.state_dict(keep_vars=True),
                               io_order)
    except NotRepeated:
        return None, 0
    return program, stamped


def _refuse_fixed_dims(model, signature: Signature, loaded: LoadedModel) -> None:
    """A dim the contract leaves free that the capture fixed (the model's forward specialized on the example's size)
    would make an engine that refuses every other length: say so now, not at the first feed that differs."""
    captured = {value.name: value.shape for value in model.graph.inputs}
    for spec in signature.inputs:
        for axis, (dim, got) in enumerate(zip(spec.shape, captured[spec.name])):
            if isinstance(dim, str) and isinstance(got, int):
                raise ExportError(
                    f"{type(loaded.module).__name__} cannot be captured with a free {dim}: its forward fixes "
                    f"{spec.name!r} axis {axis} to the example's {got}, so the engine would take no other {dim}"
                )


def _name_dims(model, signature: Signature) -> None:
    """Give inputs and outputs the contract's dim names; the exporter writes expressions like
    `past_sequence + sequence` (outputs) or `2*latent_height_blocks` (an input declared a multiple)."""
    import onnx_ir as ir

    shapes = {t.name: t.shape for t in signature.outputs}
    for value in model.graph.outputs:
        value.shape = ir.Shape(list(shapes[value.name]))
    declared = {t.name: t.shape for t in signature.inputs}
    for value in model.graph.inputs:
        dims = [want if isinstance(want, str) and not isinstance(got, int) else got
                for want, got in zip(declared[value.name], value.shape)]
        value.shape = ir.Shape(dims)


def export_failure(error: Exception) -> str:
    """One readable line: the innermost reason, and the op the exporter stopped at when it says."""
    innermost = error
    while innermost.__cause__ is not None:
        innermost = innermost.__cause__
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()] or [type(innermost).__name__]
    # A header line ("The following inconsistencies were found:") says nothing without the line under it.
    reason = " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    everything = "\n".join(str(e) for e in (error, innermost))
    op = re.search(r"(aten[.:]{1,2}\w+(?:\.\w+)?|torch\.ops\.[\w.]+)", everything)
    where = f" (failing op: {op.group(1)})" if op else ""
    return f"the model cannot be exported to ONNX: {type(innermost).__name__}: {reason}{where}"
