"""Errors the CLI reports in one line: the user's (exit code 2) and a failed run's (exit code 1)."""


class ReportedError(Exception):
    """An error the CLI reports as one line, ``memray: error: <message>``, with ``exit_code``."""

    exit_code = 1


class UserError(ReportedError):
    """An error in something the user supplied: a config, an input file, a checkpoint, an address."""

    exit_code = 2


class RunFailed(ReportedError):
    """The run itself failed (a rank died or raised, a save failed): exit code 1. ``details``:
    what the one line leaves out (tracebacks), kept by the CLI in the run directory."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class ConfigError(UserError, ValueError):
    """A config key or value is wrong; the message names the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.reason = message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with the key qualified by the enclosing section."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.reason)


class InputError(UserError):
    """An input file (facts, text, checkpoint) is missing or malformed; the message names it."""


class UsageError(UserError):
    """Command-line options that do not go together, or an address that cannot be used."""
