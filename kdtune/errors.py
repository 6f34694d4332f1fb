"""User-facing errors: each message is one line naming the value and what is allowed.

Entry points (study scripts, the `kdtune` command) catch `KdtuneError`, print the message and exit non-zero,
so a user never sees a traceback for a mistake in their input.
"""


class KdtuneError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(KdtuneError, ValueError):
    """A bad configuration value or argument."""


class DatasetError(KdtuneError):
    """A dataset that is missing, unreadable or could not be downloaded."""


class TrackingError(KdtuneError):
    """The MLflow tracking server or registry cannot be used as asked."""


class TrainingDiverged(KdtuneError):
    """A loss became NaN or infinite; the trial ends as failed with this reason."""
