"""Capture a decoder LM as an AOTInductor package (`model.pt2`) with the KV-cache IO contract.

The package is compiled ahead of time by Inductor and runs from C++ through `aoti_load_package`;
its inputs are those of `DecoderWithCache.forward`, its outputs the contract's, in `io_names` order.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

import torch

from exporter.capture import CapturedGraph, DecoderWithCache, dynamic_shapes, example_inputs, export_failure, quiet_exporter
from exporter.errors import ExportError
from exporter.sources import LoadedModel

PACKAGE_FILE = "model.pt2"


def capture_aoti(loaded: LoadedModel, out_dir: Path, device: str = "cpu", kiln_attention: bool = False) -> CapturedGraph:
    """torch.export `loaded` with dynamic batch/sequence/past dims, then compile it into `out_dir/model.pt2`.

    With `kiln_attention`, every attention layer calls the kiln::causal_attention op (the package then
    needs that op loaded wherever it runs: the manifest lists it under `torch_ops`).
    """
    from torch.export import Dim

    from exporter.kiln_attention import kiln_attention as kiln_attention_layers

    facts = loaded.facts
    wrapper = DecoderWithCache(loaded.module.to(device), facts.layers).eval()
    args = [a.to(device) for a in example_inputs(facts)]
    # Dim.DYNAMIC lets torch.export derive the relations between the axes (total = past + sequence)
    # that named Dims would have to spell out; the axes stay fully dynamic.
    shapes = dynamic_shapes(facts.layers, *[Dim.DYNAMIC] * 4)
    path = Path(out_dir) / PACKAGE_FILE
    routed = kiln_attention_layers(loaded.module) if kiln_attention else contextlib.nullcontext()
    try:
        with quiet_exporter(), routed:
            program = torch.export.export(wrapper, (args[0], args[1], args[2], args[3:]), dynamic_shapes=shapes, strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:  # export and Inductor raise many types; all mean "this model cannot be compiled"
        raise ExportError(export_failure(e).replace("exported to ONNX", "compiled by AOTInductor")) from e
    finally:
        # The eager reference that verifies the package runs on the CPU (seen on an H100: left on the GPU,
        # it received CPU tensors and failed).
        loaded.module.to("cpu")
    calls = Counter(str(n.target) for n in program.graph.nodes if str(n.target).startswith("kiln."))
    return CapturedGraph(path, [path], external_data=False, opset=0, torch_ops=dict(calls))
