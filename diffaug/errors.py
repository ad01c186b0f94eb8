"""Exceptions raised by diffaug.

Every error a user can cause by passing bad input derives from :class:`DiffaugError`, so scripts can catch one type.
Messages name the offending file or argument and say what to do about it.
"""

from __future__ import annotations

__all__ = ["DiffaugError", "InvalidInputError", "DataFormatError", "ConfigError", "WeightsError", "MissingExtraError"]


class DiffaugError(Exception):
    """Base class of all errors raised by diffaug on purpose."""


class InvalidInputError(DiffaugError, ValueError):
    """An argument (array, parameter) is not what the function accepts."""


class DataFormatError(InvalidInputError):
    """A file or folder on disk is missing, corrupt or in an unexpected layout."""


class ConfigError(InvalidInputError):
    """A configuration (model config, training config, CLI flags) is invalid."""


class WeightsError(DiffaugError, OSError):
    """Model weights cannot be found, loaded, or do not match their config."""


class MissingExtraError(DiffaugError, ImportError):
    """An optional dependency is needed; the message names the pip extra that installs it."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(
            f"{feature} needs the optional package '{package}'. Install it with: pip install 'diffaug[{extra}]'"
        )
