"""User-facing errors: each message names the file or field and what would fix it."""

from __future__ import annotations

from .config import ConfigError


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message alone, with no traceback."""


# Config mistakes are user mistakes too.
USER_ERRORS = (UserError, ConfigError)
