"""`load(dir)`: check an engine directory and open its graphs with the adapter of its backend, behind
the Predictor of its model kind."""
from __future__ import annotations

import importlib
from pathlib import Path

from runtimes.engine_dir import MANIFEST, check_files, engine_device, engine_kind, graph_entries, read_manifest
from runtimes.foreign import is_foreign, load_foreign
from runtimes.errors import EngineError
from runtimes.predictor import Predictor
from runtimes.trust import check_pinned_digest, check_signature, refuse_untrusted_native_code

# The manifest's backend -> "module:Class" of the adapter that runs one graph of it. kiln's backend records
# register theirs here (kiln.backends); this table lets a service open engines without importing kiln.
ADAPTERS = {
    "onnxruntime": "runtimes.onnxruntime_adapter:OnnxRuntimePredictor",
    "tensorrt": "runtimes.tensorrt_adapter:TensorRTPredictor",
    "aoti": "runtimes.aoti_adapter:AotiPredictor",
}
# The manifest's kind -> "module:Class" of its Predictor; `Class.from_engine_dir(graphs, engine_dir, manifest)`
# takes the engine's opened graphs by role and reads what else of the engine the kind needs (its tokenizer...).
KINDS = {
    "decoder-lm": "runtimes.generate:DecoderLMPredictor",
    "diffusion": "runtimes.text_to_image:DiffusionPredictor",
}


def register_adapter(backend: str, adapter: str) -> None:
    """Run engines whose manifest says `backend` with `adapter` ("module:Class")."""
    ADAPTERS[backend] = adapter


def load(engine_dir, device: str | None = None, *, expect_digest: str | None = None, public_key=None,
         trust_native_code: bool = False, **backend_options) -> Predictor:
    """Open an engine directory as a Predictor after checking every file against the manifest.

    A folder without a manifest that holds one ONNX decoder graph (an Optimum export, onnxruntime-genai's
    builder output) opens too, on the CPU, marked `provenance = "not built by torchkiln: ..."`.

    Trust (runtimes.trust): `expect_digest` ("sha256:..." as `kiln convert --json` reports it) refuses any other
    engine before more than its manifest is read; `public_key` (PEM) requires a valid `kiln.sig`; an engine
    carrying native code (AOTInductor, TensorRT, torch ops) loads only with one of them or `trust_native_code`.

    `device` defaults to the engine's own (its manifest's `device`); "cuda:1" picks a GPU. `backend_options`
    go to the adapter (for ONNX Runtime: `threads`, `optimization_level`, `providers`, `allow_spinning`,
    `huge_pages`).
    """
    engine_dir = Path(engine_dir)
    if is_foreign(engine_dir):
        if expect_digest or public_key:
            raise EngineError(f"{engine_dir}: no {MANIFEST} (not built by torchkiln): nothing to pin or check a signature of")
        return load_foreign(engine_dir, device, **backend_options)  # an Optimum or genai folder, say
    manifest = read_manifest(engine_dir)
    if expect_digest:  # before anything but the manifest is read
        check_pinned_digest(engine_dir, manifest, expect_digest)
    if public_key is not None:
        check_signature(engine_dir, public_key)
    check_files(engine_dir, manifest)
    built_for = engine_device(manifest)
    device = device or built_for
    if device.split(":")[0] != built_for:
        raise EngineError(f"{engine_dir}: engine target {manifest['target']!r} runs on {built_for}, not device={device!r}")
    adapter = _resolve(ADAPTERS, manifest["backend"], "backend", engine_dir)
    refuse_untrusted_native_code(engine_dir, manifest, adapter, trusted=bool(expect_digest or public_key or trust_native_code))
    kind = _resolve(KINDS, engine_kind(manifest), "kind", engine_dir)
    graphs: dict[str, Predictor] = {}
    try:
        for role, graph in graph_entries(manifest).items():
            graphs[role] = adapter.from_engine_dir(engine_dir, manifest, graph, device=device, **backend_options)
        return kind.from_engine_dir(graphs, engine_dir, manifest)
    except BaseException:
        for opened in graphs.values():
            opened.close()
        raise


def kind_predictor(kind: str):
    """The Predictor class of a model kind; it takes the engine's graphs by role."""
    return _resolve(KINDS, kind, "kind", "engine")


def _resolve(table: dict[str, str], name: str, what: str, where):
    if name not in table:
        raise EngineError(f"{where}: {what} {name!r} is unknown (known: {', '.join(table)})")
    module_name, class_name = table[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
