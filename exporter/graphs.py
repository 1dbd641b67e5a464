"""What a model kind hands the capturers for each of its graphs, and the kinds by name."""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

from exporter.errors import ModelSourceError
from runtimes.signature import Signature


@dataclass(frozen=True)
class GraphExport:
    """One graph to capture: a module, example arguments in its forward's structure, and its contract."""

    module: Any  # torch.nn.Module
    args: tuple
    # dim(name, min=, max=) -> a torch.export Dim (ONNX: named, with those bounds; AOTInductor: Dim.DYNAMIC)
    # => `dynamic_shapes` for export
    dynamic_shapes: Callable[[Callable[[str], Any]], Any]
    signature: Signature  # IO names in the order of the module's flattened inputs and outputs, with dim names
    capturing: Callable[[], ContextManager] = contextlib.nullcontext  # what must hold while it is captured
    repeated: "RepeatedLayers | None" = None  # its layers repeat one block: an ONNX capture may stamp them


@dataclass(frozen=True)
class RepeatedLayers:
    """Layers 1..count-1 of a graph are one block repeated (alike in class, weight shapes, settings and per-layer
    config): an ONNX capture may export `short`, the same graph with its first layers only, and stamp out the
    last of those for the rest (`exporter.layer_stamping`)."""

    scope: str  # the layers' ModuleList as a module path in GraphExport.module; layer i is `{scope}.{i}`
    count: int
    short: GraphExport


@dataclass(frozen=True)
class ExportKind:
    """A model kind as the exporter sees it. `module` ("exporter.decoder_lm") provides `AUTO_CLASS`, the
    transformers class that builds and loads such models; `model_facts(module, where)`, its sizes (or
    ModelSourceError when the kind cannot carry it); `graphs(loaded) -> {role: GraphExport}`; and
    `eager_functions(loaded) -> {role: callable}`, the source in PyTorch eager (flat tensors in and out); and
    `manifest_fields(loaded) -> dict`, what the engine's manifest records of the kind beyond its graphs.

    A kind whose sources are not transformers models (`folder_marker` set) loads them itself: its module adds
    `FAMILY`, `build_preset(name, preset)`, `load_folder(folder) -> (source, weight files)`, `accepts(source)`
    (a factory's result), `prepared(source)`, `source_config(source)` and `weights_sha256(source)`."""

    name: str
    module: str
    folder_marker: str | None = None  # a source folder holding this file is of this kind (diffusers: model_index.json)

    def load(self):
        return importlib.import_module(self.module)


KINDS = {k.name: k for k in (ExportKind("decoder-lm", "exporter.decoder_lm"),
                              ExportKind("diffusion", "exporter.diffusion", folder_marker="model_index.json"))}


def export_kind(name: str, where: str) -> ExportKind:
    if name not in KINDS:
        raise ModelSourceError(f"{where}: a {name} model; torchkiln converts {', '.join(KINDS)} models so far")
    return KINDS[name]
