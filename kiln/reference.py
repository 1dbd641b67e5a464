"""The PyTorch eager reference for an engine: its source model behind the Predictor interface."""
from __future__ import annotations

from pathlib import Path

from kiln.errors import KilnError
from runtimes.signature import Signature


def reference_predictor(loaded, signature: Signature):
    """A TorchPredictor running `loaded` (an exporter.LoadedModel) with the engine's signature."""
    from exporter.capture import DecoderWithCache
    from runtimes.torch_adapter import TorchPredictor

    wrapper = DecoderWithCache(loaded.module, loaded.facts.layers)
    return TorchPredictor(wrapper.flat_forward, signature)


def load_reference(engine_dir, trust_remote_code: bool = False):
    """Load the model the engine's manifest names and wrap it as the reference Predictor.

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
    return reference_predictor(loaded, Signature.from_json(manifest["signature"]))
