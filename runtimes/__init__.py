"""Run engines: `load(dir) -> Predictor`, the same `predict` / `generate` (`generate_image`) on every backend."""
from runtimes.errors import EngineError, FeedError
from runtimes.generate import DecoderLMPredictor
from runtimes.loading import load
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec
from runtimes.text_to_image import DiffusionPredictor

__all__ = ["load", "Predictor", "DecoderLMPredictor", "DiffusionPredictor", "Signature", "TensorSpec", "EngineError",
           "FeedError"]
