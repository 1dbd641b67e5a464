"""Capture a decoder LM as an AOTInductor package (`model.pt2`) with the KV-cache IO contract.

The package is compiled ahead of time by Inductor and runs from C++ through `aoti_load_package`;
its inputs are those of `DecoderWithCache.forward`, its outputs the contract's, in `io_names` order.
"""
from __future__ import annotations

from pathlib import Path

import torch

from exporter.capture import CapturedGraph, DecoderWithCache, dynamic_shapes, example_inputs, export_failure, quiet_exporter
from exporter.errors import ExportError
from exporter.sources import LoadedModel

PACKAGE_FILE = "model.pt2"


def capture_aoti(loaded: LoadedModel, out_dir: Path, device: str = "cpu") -> CapturedGraph:
    """torch.export `loaded` with dynamic batch/sequence/past dims, then compile it into `out_dir/model.pt2`."""
    from torch.export import Dim

    facts = loaded.facts
    wrapper = DecoderWithCache(loaded.module.to(device), facts.layers).eval()
    args = [a.to(device) for a in example_inputs(facts)]
    # Dim.DYNAMIC lets torch.export derive the relations between the axes (total = past + sequence)
    # that named Dims would have to spell out; the axes stay fully dynamic.
    shapes = dynamic_shapes(facts.layers, *[Dim.DYNAMIC] * 4)
    path = Path(out_dir) / PACKAGE_FILE
    try:
        with quiet_exporter():
            program = torch.export.export(wrapper, (args[0], args[1], args[2], args[3:]), dynamic_shapes=shapes, strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:  # export and Inductor raise many types; all mean "this model cannot be compiled"
        raise ExportError(export_failure(e).replace("exported to ONNX", "compiled by AOTInductor")) from e
    finally:
        # The eager reference that verifies the package runs on the CPU (seen on an H100: left on the GPU,
        # it received CPU tensors and failed).
        loaded.module.to("cpu")
    return CapturedGraph(path, [path], external_data=False, opset=0)
