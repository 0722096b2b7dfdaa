"""Exceptions that the command line turns into one-line messages and exit codes."""


class KdrunError(Exception):
    """Base class of kdrun's own errors; the CLI prints ``str(err)`` on one line."""

    exit_code = 1


class ConfigError(KdrunError):
    """Bad user input (a value, a path, a name): exit status 2, raised before training."""

    exit_code = 2


class DataError(ConfigError):
    """A dataset that is not on disk and cannot be downloaded."""


class CheckpointError(ConfigError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(KdrunError):
    """Training itself went wrong (for example a non-finite loss)."""


class Interrupted(KdrunError):
    """Ctrl-C or SIGTERM during training; ``last.pt`` is kept for resume."""

    exit_code = 130
