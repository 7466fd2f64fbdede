"""Project exceptions.

Every error a user can cause (bad data, bad config, bad checkpoint) is raised as a
``SegError`` subclass whose message is one line naming the file, key or value at fault.
The tools catch ``SegError`` at the top, print the message and exit with status 2, so
users see one clear line instead of a traceback.
"""


class SegError(Exception):
    """Base class of the errors that ``tools/*.py`` report as a single line."""


class DatasetError(SegError):
    """A dataset root, split, image or label is missing, unreadable or inconsistent."""


class CheckpointError(SegError):
    """A checkpoint file is missing, truncated, not a checkpoint, or does not fit the config."""


class ConfigError(SegError):
    """A configuration value is invalid (wrong range, unknown name, inconsistent sizes)."""
