"""Phase markers a metered job sets on itself: ``with wattspan.phase("epoch 3"): ...``.

Under ``wattspan run`` the runner passes a file in ``WATTSPAN_RUN_PHASES``; each
phase appends two short lines to it (begin and end, on the monotonic clock the
runner's sampler uses), with one ``os.write`` on an ``O_APPEND`` descriptor, so
lines from several processes or threads never interleave. Outside a run it does
nothing. It never raises into the job: a marker that cannot be written is
counted in :func:`phase_errors` and the job goes on.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["phase", "phase_errors"]

ENV = "WATTSPAN_RUN_PHASES"
MAX_NAME = 120  # characters of a phase name kept

_lock = threading.Lock()
_fd: int | None = None
_fd_pid = 0
_fd_path = ""
_ids = itertools.count(1)
_errors = 0
_ENVIRON = os.environ


def phase_errors() -> int:
    """Markers that could not be written in this process (the file went away, the disk is full)."""
    return _errors


def _clean(name: object) -> str:
    if type(name) is str and name.isprintable() and "\t" not in name and 0 < len(name) <= MAX_NAME and name.strip() == name:
        return name  # the common case, without a loop per character
    s = str(name)
    s = "".join(c if c.isprintable() and c not in "\t" else " " for c in s).strip()
    return s[:MAX_NAME] or "(unnamed)"


def _write(line: str) -> None:
    global _fd, _fd_pid, _fd_path, _errors
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with _lock:
            if _fd is None or _fd_pid != os.getpid() or _fd_path != path:  # a forked worker reopens
                _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
                _fd_pid, _fd_path = os.getpid(), path
            os.write(_fd, line.encode("utf-8", "replace"))
    except Exception:  # never into the job
        _errors += 1


class phase:
    """Mark a stretch of the job as one phase (``"train"``, ``"epoch 3"``, ``"evaluate"``).

    A context manager (``with wattspan.phase("evaluate"):``) and a decorator.
    Phases may nest and may overlap across threads; each is reported with the
    energy the metered devices used between its begin and end. Cost: two small
    appends to a local file (about 20 us a block on a busy 2-core machine, see
    ``benchmarks/results/run_dashboard_cost.md``): mark epochs and evaluations,
    not single steps. A no-op outside ``wattspan run``.
    """

    __slots__ = ("name", "_id")

    def __init__(self, name: str) -> None:
        self.name = _clean(name)
        self._id = ""

    def __enter__(self) -> "phase":
        if _ENVIRON.get(ENV):
            self._id = f"{os.getpid()}.{next(_ids)}"
            _write(f"B\t{self._id}\t{time.monotonic_ns()}\t{self.name}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._id:
            _write(f"E\t{self._id}\t{time.monotonic_ns()}\n")

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        import functools

        @functools.wraps(fn)
        def wrapped(*a: P.args, **kw: P.kwargs) -> R:
            with phase(self.name):
                return fn(*a, **kw)

        return wrapped


def read_phases(path: str | os.PathLike[str], end_ns: int) -> list[tuple[str, int, int]]:
    """``(name, begin_ns, end_ns)`` of every phase in the marker file, in order of begin.

    A phase the job never closed (it crashed, it was killed) ends at ``end_ns``;
    malformed lines are skipped.
    """
    begins: dict[str, tuple[str, int]] = {}
    ends: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                f = line.rstrip("\n").split("\t")
                try:
                    if f[0] == "B" and len(f) == 4:
                        begins[f[1]] = (f[3], int(f[2]))
                    elif f[0] == "E" and len(f) == 3:
                        ends[f[1]] = int(f[2])
                except ValueError:
                    continue
    except OSError:
        return []
    out = [(name, b, max(b, min(ends.get(pid, end_ns), end_ns))) for pid, (name, b) in begins.items()]
    return sorted(out, key=lambda x: (x[1], x[2]))
