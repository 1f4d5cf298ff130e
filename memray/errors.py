"""Errors a user can cause. The CLI reports them in one line and exits with code 2."""


class UserError(Exception):
    """An error in something the user supplied: a config, an input file, a checkpoint, an address."""

    exit_code = 2


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
