"""Capture a model's graphs as AOTInductor packages (`model.pt2`) with the IO contract of its kind.

Each package is compiled ahead of time by Inductor and runs from C++ through `aoti_load_package`; it
takes its inputs in the structure of the kind's module (the adapter rebuilds that from the signature's
flat order through the package's call spec).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import torch

from exporter.capture import CapturedGraph, export_failure, graph_path, kind_graphs, quiet_exporter
from exporter.errors import ExportError
from exporter.sources import LoadedModel


def capture_aoti(loaded: LoadedModel, out_dir: Path, device: str = "cpu", kiln_attention: bool = False) -> dict[str, CapturedGraph]:
    """torch.export each graph of `loaded` with fully dynamic axes, then compile it into a `model.pt2`.

    With `kiln_attention`, every attention layer calls the kiln::causal_attention op (the package then
    needs that op loaded wherever it runs: the manifest lists it under `torch_ops`).
    """
    from torch.export import Dim

    from exporter.kiln_attention import kiln_attention as kiln_attention_layers

    captured = {}
    loaded.module.to(device)
    try:
        for role, graph in kind_graphs(loaded).items():
            args = torch.utils._pytree.tree_map(lambda a: a.to(device), graph.args)
            # Dim.DYNAMIC lets torch.export derive the relations between the axes (total = past + sequence)
            # that named Dims would have to spell out; the axes stay fully dynamic.
            shapes = graph.dynamic_shapes(lambda name, **bounds: Dim.DYNAMIC)
            path = graph_path(out_dir, role, ".pt2")
            routed = kiln_attention_layers(loaded.module) if kiln_attention else contextlib.nullcontext()
            try:
                with quiet_exporter(), routed, graph.capturing():
                    program = torch.export.export(graph.module, args, dynamic_shapes=shapes, strict=False)
                    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
            except Exception as e:  # export and Inductor raise many types; all mean "this model cannot be compiled"
                raise ExportError(export_failure(e).replace("exported to ONNX", "compiled by AOTInductor")) from e
            calls = Counter(str(n.target) for n in program.graph.nodes if str(n.target).startswith("kiln."))
            captured[role] = CapturedGraph(path, [path], external_data=False, opset=0, signature=graph.signature,
                                           torch_ops=dict(calls))
    finally:
        # The eager reference that verifies the package runs on the CPU (seen on an H100: left on the GPU,
        # it received CPU tensors and failed).
        loaded.module.to("cpu")
    return captured
