"""Load a model from a spec and capture its graphs with the IO contract of its kind."""
from exporter.errors import ExportError, ModelSourceError
from exporter.families import FAMILIES, Family
from runtimes.decoder_lm import ModelFacts
from exporter.presets import PRESETS
from exporter.sources import LoadedModel, load_model

__all__ = ["load_model", "LoadedModel", "PRESETS", "FAMILIES", "Family", "ModelFacts", "ModelSourceError", "ExportError"]
