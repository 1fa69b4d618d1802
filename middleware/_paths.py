"""Checks of output paths before a long job, so a path that cannot be written is a clear error at the
start, not a traceback (or a silently dropped result) after the work is done. No imports of wattspan."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["writable_dir", "writable_file"]


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def writable_file(path: str | os.PathLike[str], option: str, example: str = "wattspan.sqlite") -> None:
    """Raise ValueError unless ``path`` names a regular file this process may write (or create);
    ``example``: the file name the message suggests inside a folder given instead."""
    if str(path) == "":
        raise ValueError(f"{option}: empty path; give a file name")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p}: is a directory; give a file in it, e.g. {p / example}")
    if p.exists():
        if not p.is_file():
            raise ValueError(f"{option} {p}: not a regular file")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{option} {p}: cannot write: permission denied")
        return
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {p}: cannot write: no folder {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: cannot write in {parent}: permission denied")


def writable_dir(path: str | os.PathLike[str], option: str) -> None:
    """Raise ValueError unless ``path`` is a folder this process may write, or one it may create."""
    if str(path) == "":
        raise ValueError(f"{option}: empty path; give a folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {p}: exists and is not a folder")
    q = _nearest_existing(p.absolute())
    if not q.is_dir():
        raise ValueError(f"{option} {p}: cannot create a folder under {q}, which is not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p}: cannot write in {q}: permission denied")
