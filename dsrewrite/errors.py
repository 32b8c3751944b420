"""Errors a user can cause, and the exit code each one maps to.

Every failure the CLI reports on one line is one of these classes. Exit codes are
decided in one place (:func:`exit_code_for`) and documented in the README.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``dsrewrite`` command."""

    OK = 0
    #: ``check``: an error-level budget was exceeded.
    BUDGET_EXCEEDED = 1
    #: Bad input: usage, configuration, model file, input shape.
    BAD_INPUT = 2
    #: ``check`` only: a budget's model could not be loaded or traced.
    MODEL_FAILED = 3
    #: A bug in dsrewrite itself (the message asks for --debug and a report).
    INTERNAL_ERROR = 70


class DsrewriteError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""


class UsageError(DsrewriteError):
    """A bad option, option value or output path."""


class ConfigError(DsrewriteError):
    """A bad configuration file, rules file or rules override."""


class ModelLoadError(DsrewriteError):
    """The model spec could not be turned into an ``nn.Module``."""


class InputError(DsrewriteError):
    """The example inputs are malformed, or the model rejects them."""


class AnalysisError(DsrewriteError):
    """The model loaded but could not be analyzed (shape propagation failed)."""


def exit_code_for(error: BaseException, command: str = "") -> ExitCode:
    """Map an exception to the exit code documented for ``command``.

    ``check`` separates "the model is broken" (3) from "the configuration is broken" (2)
    so that a CI log says which one to fix; every other command reports both as 2.
    """
    if command == "check" and isinstance(error, (ModelLoadError, InputError, AnalysisError)):
        return ExitCode.MODEL_FAILED
    return ExitCode.BAD_INPUT
