"""The PyTorch eager reference for an engine: its source model behind its kind's Predictor interface."""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError
from runtimes.signature import Signature


def reference_predictor(loaded, signatures: dict[str, Signature]):
    """The kind's Predictor running `loaded` (an exporter.LoadedModel) in eager, with the engine's graph signatures."""
    from exporter.graphs import export_kind
    from runtimes.loading import kind_predictor
    from runtimes.torch_adapter import TorchPredictor

    functions = export_kind(loaded.kind, loaded.spec).load().eager_functions(loaded)
    graphs = {role: TorchPredictor(functions[role], signature) for role, signature in signatures.items()}
    return kind_predictor(loaded.kind)(graphs)


def load_source(engine_dir, trust_remote_code: bool = False):
    """The source model the engine's manifest names (an exporter.LoadedModel).

    Refuses when the source's weights are no longer those the engine was built from.
    """
    from exporter import load_model
    from runtimes.engine_dir import read_manifest

    manifest = read_manifest(Path(engine_dir))
    source = manifest["source"]
    loaded = load_model(source["spec"], trust_remote_code=trust_remote_code)
    if loaded.weights_sha256 != source["weights_sha256"]:
        raise KilnError(
            f"{engine_dir}: source {source['spec']!r} has changed since the engine was built "
            f"(weights sha256 {loaded.weights_sha256[:12]}…, manifest says {source['weights_sha256'][:12]}…)"
        )
    return loaded


def load_reference(engine_dir, trust_remote_code: bool = False):
    """Load the model the engine's manifest names and wrap it as the reference Predictor (see `load_source`)."""
    from runtimes.engine_dir import graph_entries, read_manifest

    loaded = load_source(engine_dir, trust_remote_code)
    manifest = read_manifest(Path(engine_dir))
    signatures = {role: Signature.from_json(graph["signature"]) for role, graph in graph_entries(manifest).items()}
    return reference_predictor(loaded, signatures)
