"""Errors a user of an engine can cause: a bad engine directory, a feed that does not fit."""


class EngineError(Exception):
    """The engine directory is missing, tampered with, or cannot run on this host."""


class FeedError(ValueError):
    """A feed does not match the engine's signature; the message names the input."""
