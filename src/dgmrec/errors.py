"""Error types for bad user input.

Every problem with a user's files, options or configuration raises :class:`InputError` (or a subclass)
with one line that names the file or field; the CLI prints that line and exits with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: malformed file, wrong shape, unknown key, ..."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class DataError(InputError):
    """A dataset file (interactions, features, mask) is malformed or inconsistent."""


class ConfigError(InputError):
    """A configuration key or value is unknown or invalid."""
