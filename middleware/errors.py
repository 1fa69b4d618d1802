"""Errors a user can cause, each saying where and how to fix it."""

from __future__ import annotations

import os

__all__ = ["InputError"]


class InputError(ValueError):
    """A bad input file: ``str(err)`` is ``"path:line: message"`` (line 1 is the header).

    ``line`` is 0 when the problem is the file as a whole (missing, empty).
    """

    def __init__(self, path: str | os.PathLike[str], line: int, message: str) -> None:
        self.path = str(path)
        self.line = int(line)
        self.message = message
        super().__init__(f"{self.path}:{self.line}: {message}" if self.line else f"{self.path}: {message}")
