"""Errors the plugins package raises for users; internal bugs stay tracebacks."""


class PluginBuildError(Exception):
    """A plugin could not be built: the message names the compiler, the file and what was expected."""


class AttentionInputError(ValueError):
    """Tensors handed to the attention plugin do not follow its contract (shapes, dtypes)."""
