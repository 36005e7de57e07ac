"""User-facing errors: the CLI prints their message on one line and exits with code 2.

Raise these for anything the user can fix (bad data, bad config, a missing file) with a
message that names the file, line/row or field and says what to do. Anything else is a
bug and keeps its traceback.
"""


class PrefalignError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class DataError(PrefalignError):
    """A data file or row is malformed: the message names file, line/row and field."""


class ConfigError(PrefalignError):
    """A config key or value is invalid: the message names the key and the valid range."""
