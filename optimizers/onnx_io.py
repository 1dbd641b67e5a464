"""ONNX files in and out (weights inline or in external data), and the IO contract a pass must keep."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from optimizers.pass_types import initializer_bytes
from runtimes.engine_dir import EXTERNAL_DATA_BYTES


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

    # An input with an initializer has a default: callers may leave it out (logits_to_keep), so it is no contract.
    required = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    return {"inputs": [describe(v) for v in required], "outputs": [describe(v) for v in model.graph.outputs]}


def contract_changes(before: dict, after: dict, check_types: bool = True) -> list[str]:
    """What differs between two `io_contract`s, one line per input or output; empty when they agree."""
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
