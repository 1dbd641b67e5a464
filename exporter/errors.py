"""Errors a user of the exporter can cause: a bad model spec, or a model that cannot be captured."""


class ModelSourceError(Exception):
    """The model spec, folder, config or weights are not usable; the message names which and why."""


class ExportError(Exception):
    """The model could not be captured; the message carries the exporter's reason and failing op."""
