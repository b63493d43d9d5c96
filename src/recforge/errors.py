"""User-facing errors.

A :class:`RecForgeError` carries one line that names the problem and the fix. The CLI prints
it without a traceback and exits with status 2; the Python API lets it propagate.
"""


class RecForgeError(Exception):
    """Bad input or configuration: the message names the problem and how to fix it."""

    exit_code = 2


class DataError(RecForgeError):
    """A data file is missing, unreadable, or lacks what the pipeline needs."""


class ConfigError(RecForgeError):
    """An unknown model, an unknown override key, or a value of the wrong type."""


class TrainingError(RecForgeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""
