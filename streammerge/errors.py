"""User-facing errors.

Anything the user can fix (a bad recipe, a broken input file, a too-small budget) raises
:class:`StreamMergeError` with a one-line message that names the file and tensor involved.
The CLI prints it without a traceback; bugs still surface as ordinary exceptions.
"""

from __future__ import annotations


class StreamMergeError(Exception):
    """A problem with the user's inputs, recipe or environment (not a bug)."""


class RecipeError(StreamMergeError):
    """The recipe is invalid."""


class InputError(StreamMergeError):
    """An input model folder or file is invalid or inconsistent with the others."""


class Interrupted(StreamMergeError):
    """The run was stopped by a signal after making its progress durable."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
