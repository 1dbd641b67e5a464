"""Run engines: `load(dir) -> Predictor`, the same `predict` / `generate` on every backend."""
from runtimes.errors import EngineError, FeedError
from runtimes.generate import DecoderLMPredictor
from runtimes.loading import load
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec

__all__ = ["load", "Predictor", "DecoderLMPredictor", "Signature", "TensorSpec", "EngineError", "FeedError"]
