"""Errors of the optimization stage: an unknown recipe or pass, or a pass that failed on a model."""


class RecipeError(Exception):
    """No recipe for that (target, precision), or a pass name that does not exist; the message lists the known."""


class PassFailed(Exception):
    """A pass raised or broke the engine's IO contract; the message names the pass and the passes before it."""

    def __init__(self, message: str, pass_name: str, applied: list[str]):
        super().__init__(message)
        self.pass_name = pass_name
        self.applied = applied
