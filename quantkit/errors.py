"""One error type for everything a user can get wrong; the CLI prints it as one line and exits 2."""

from __future__ import annotations


class QuantkitError(Exception):
    """A problem with the user's input or environment: what was wrong and what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class MissingDependencyError(QuantkitError):
    """An optional library (an extra) is not installed."""

    def __init__(self, library: str, extra: str) -> None:
        super().__init__(
            f"{library} is not installed",
            f"install it with: pip install 'quantkit[{extra}]'",
        )
        self.library = library
        self.extra = extra


class QuantkitWarning(UserWarning):
    """Something that makes numbers less trustworthy but is not an error (the CLI prints it as one
    line on stderr)."""
