"""Exceptions that carry a message a user can act on."""

from __future__ import annotations


class UsaggError(Exception):
    """Base class for errors shown to the user without a traceback."""


class ConfigError(UsaggError):
    """A study, task card or option is invalid."""


class DataError(UsaggError):
    """An input file or one of its rows is missing, unreadable or inconsistent."""


class TrainingError(UsaggError):
    """A training run cannot continue (for example a non-finite loss)."""


class AnalysisError(UsaggError):
    """An analysis cannot be computed from the given results."""
