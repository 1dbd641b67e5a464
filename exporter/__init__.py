"""Load a model from a spec and capture its graph with the IO contract of its family."""
from exporter.errors import ExportError, ModelSourceError
from exporter.families import FAMILIES, Family, ModelFacts
from exporter.presets import PRESETS
from exporter.sources import LoadedModel, load_model

__all__ = ["load_model", "LoadedModel", "PRESETS", "FAMILIES", "Family", "ModelFacts", "ModelSourceError", "ExportError"]
