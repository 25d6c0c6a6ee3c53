"""User-facing errors: each message names the file or field and what would fix it."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message alone, with no traceback."""


class ConfigError(ValueError):
    """A user mistake in a config file or an override; the message says how to fix it."""


# Config mistakes are user mistakes too.
USER_ERRORS = (UserError, ConfigError)
