"""Typed errors. Each message names the problem and the fix; the CLI prints it on one line."""


class EdgeMoEError(Exception):
    """Base class of every error the user can cause and fix."""

    exit_code = 2


class ModelFormatError(EdgeMoEError):
    """The model path is missing, unreadable, truncated, or not a GGUF file / checkpoint directory."""


class UnsupportedError(EdgeMoEError):
    """The model uses an architecture, tensor type or feature edgemoe does not support yet."""


class UsageError(EdgeMoEError):
    """A command-line argument or request parameter is invalid."""


class ContextOverflowError(UsageError):
    """The prompt (plus generation) does not fit in the model's context."""


class NumericalError(EdgeMoEError):
    """The model computed NaN or infinite values: its weights are corrupt or out of range."""
