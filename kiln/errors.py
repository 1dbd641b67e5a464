"""User-facing errors of the spine and the exit codes the CLI maps them to."""
from exporter.errors import ExportError, ModelSourceError
from optimizers.errors import PassFailed, RecipeError
from plugins.errors import PluginBuildError
from runtimes.errors import EngineError, FeedError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_VERIFICATION = 3


class KilnError(Exception):
    """A problem the user can fix; the message names the thing, what was expected and what came."""

    exit_code = EXIT_USER


class VerificationFailed(KilnError):
    """The engine differs from the PyTorch model beyond the precision's tolerance."""

    exit_code = EXIT_VERIFICATION

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# Errors the lower packages raise for bad input: also user errors (exit 2), never tracebacks.
# A plugin build failure names the missing or failing compiler: the host's state, not a bug.
USER_ERRORS = (KilnError, ModelSourceError, ExportError, RecipeError, PassFailed, EngineError, FeedError,
               PluginBuildError)


def exit_code_of(error: BaseException) -> int:
    return getattr(error, "exit_code", EXIT_USER) if isinstance(error, USER_ERRORS) else EXIT_INTERNAL
