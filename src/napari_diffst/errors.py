"""The package's error types.

Every problem with user input is raised as :class:`DataFormatError` with a message that names
the file, says what was wrong, and what was expected, so the CLI and the widgets can show it as-is.
"""
from __future__ import annotations

from pathlib import Path


class DiffSTError(Exception):
    """Base class for all napari-diffst errors."""


class DataFormatError(DiffSTError, ValueError):
    """Input data that cannot be used as given.

    Parameters
    ----------
    path : file the problem was found in (or ``None`` for in-memory data)
    problem : what was wrong
    expected : what form was expected / how to fix it
    """

    def __init__(self, path, problem: str, expected: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.expected = expected
        where = f"{self.path}: " if self.path is not None else ""
        msg = f"{where}{problem}"
        if expected:
            msg += f" (expected: {expected})"
        super().__init__(msg)


class GeneNotFoundError(DiffSTError, KeyError):
    """A requested gene is not in the data; the message carries near-match suggestions."""

    def __str__(self):  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class CancelledError(DiffSTError):
    """A long-running job was cancelled by the user."""
