"""User-facing errors: the CLI prints these as one line, never a traceback."""


class CurationError(Exception):
    """A problem the user can fix (bad config, missing input, unreadable shard)."""


class ConfigError(CurationError):
    """The pipeline YAML is malformed or names something unknown."""


class InputError(CurationError):
    """An input path is missing, empty or unreadable."""


class AccountingError(CurationError):
    """Inputs != kept + dropped + failed: a sample was lost or counted twice."""
