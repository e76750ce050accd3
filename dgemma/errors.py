"""Errors that dgemma raises for bad input. Each names what was wrong and where."""


class DgemmaError(Exception):
    """Base class: every error a user can cause derives from this."""


class CheckpointError(DgemmaError):
    """A checkpoint directory or file is missing, malformed or inconsistent (the message names the file)."""


class ConfigError(DgemmaError, ValueError):
    """A configuration value is missing or nonsensical (the message names the field and the value)."""


class RequestError(DgemmaError, ValueError):
    """A generation request is invalid (the message names the parameter)."""
