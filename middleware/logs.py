"""wattspan's log lines, visible in every process it runs in.

wattspan logs to the ``wattspan`` logger (and its children). A host that
configures logging (a handler on the root logger: ``logging.basicConfig``,
uvicorn's ``--log-config``, Django, ...) gets them through its own handlers, as
usual. A process that configures none (``vllm serve``'s engine process,
``wattspan proxy``, a plain script) would show them only through Python's
last-resort handler, bare and for warnings only: :func:`setup_logging` gives
the ``wattspan`` logger a stderr handler that writes only while the root logger
has no handler of its own, so nothing is printed twice.

Level: ``WATTSPAN_LOG_LEVEL`` (``DEBUG``, ``INFO``, ``WARNING``, ``ERROR``) or
``setup_logging(level=...)`` sets the ``wattspan`` logger's level; without
either the fallback handler shows WARNING and above and the logger keeps the
level the application gave it (or inherits the root's).

Inside wattspan every module logs through ``log = get_logger(__name__)``: its
logger is named after the module (``wattspan.meter.core``, ``wattspan.sources.nvml``,
``wattspan.integrations.vllm``), a child of ``wattspan``, so configuring the
``wattspan`` logger covers them all and a host can still quieten one of them.
Messages that could repeat (a failing source polled every few milliseconds, a
provider that is down) go through one :class:`LogOnce` per owner: the first one
per key is logged, the rest are dropped, or logged at a lower level, or logged
again after ``every_s`` seconds, with at most ``max_keys`` keys remembered.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, TextIO, Union

__all__ = ["LogOnce", "get_logger", "setup_logging"]

_ExcInfo = Union[bool, BaseException, tuple[type[BaseException], BaseException, Union[TracebackType, None]], None]

_FORMAT = "%(asctime)s wattspan %(levelname)s [%(process)d] %(message)s"
_lock = threading.Lock()
_LEVELS = {"DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"}


if TYPE_CHECKING:
    _StderrHandler = logging.StreamHandler[TextIO]
else:  # subscriptable at run time only from Python 3.11 on
    _StderrHandler = logging.StreamHandler


class _FallbackHandler(_StderrHandler):
    """Writes to stderr unless the root logger has handlers (then propagation delivers the record)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow a replaced stderr (pytest's capture, daemonisation)
        super().emit(record)


def _level(value: str | int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    name = str(value).strip().upper()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    if name not in _LEVELS:
        logging.getLogger("wattspan").warning(
            "WATTSPAN_LOG_LEVEL=%r is not a log level (DEBUG, INFO, WARNING, ERROR); using WARNING", value
        )
        return logging.WARNING
    level: int = logging.getLevelName("WARNING" if name == "WARN" else name)
    return level


def get_logger(name: str) -> logging.Logger:
    """The logger of the module ``name`` (pass ``__name__``), always under ``wattspan``.

    A module run as a script (``__main__``) gets ``wattspan.__main__``.
    """
    if name != "wattspan" and not name.startswith("wattspan."):
        name = "wattspan." + name
    return logging.getLogger(name)


class LogOnce:
    """Logs a message once per key, so a fault that repeats cannot flood the log.

    ``once = LogOnce(log)``; ``once.warning(key, msg, *args)`` logs the first
    time ``key`` is seen and returns ``True``; later calls with that key return
    ``False`` and are dropped, or logged at ``then`` (``logging.DEBUG``) when
    given, or logged again once ``every_s`` seconds have passed since the last
    time it was logged. ``forget(key)`` (or ``forget()`` for all keys) makes the
    next one log again, e.g. when a provider that failed has recovered. At most
    ``max_keys`` keys are remembered (the oldest is forgotten first). Thread-safe.
    """

    __slots__ = ("logger", "every_s", "max_keys", "suppressed", "_seen", "_lock")

    def __init__(self, logger: logging.Logger, *, every_s: float | None = None, max_keys: int = 1000) -> None:
        self.logger = logger
        self.every_s = every_s
        self.max_keys = max(1, int(max_keys))
        self.suppressed = 0  # calls that were dropped or demoted
        self._seen: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: Hashable, msg: str, *args: object, then: int | None = None,
            exc_info: _ExcInfo = None) -> bool:
        """Log ``msg % args`` at ``level`` if ``key`` is new (or due again); ``True`` if it did."""
        return self._log(level, key, msg, args, then, exc_info)

    def warning(self, key: Hashable, msg: str, *args: object, then: int | None = None,
                exc_info: _ExcInfo = None) -> bool:
        return self._log(logging.WARNING, key, msg, args, then, exc_info)

    def error(self, key: Hashable, msg: str, *args: object, then: int | None = None,
              exc_info: _ExcInfo = None) -> bool:
        return self._log(logging.ERROR, key, msg, args, then, exc_info)

    def _log(self, level: int, key: Hashable, msg: str, args: tuple[object, ...], then: int | None,
             exc_info: _ExcInfo) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            due = last is None or (self.every_s is not None and now - last >= self.every_s)
            if due:
                if last is None and len(self._seen) >= self.max_keys:
                    del self._seen[next(iter(self._seen))]
                self._seen[key] = now
            else:
                self.suppressed += 1
        if due:
            self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        elif then is not None:
            self.logger.log(then, msg, *args, exc_info=exc_info, stacklevel=3)
        return due

    def forget(self, key: Hashable | None = None) -> None:
        """The next message for ``key`` (for every key when ``None``) is logged again."""
        with self._lock:
            if key is None:
                self._seen.clear()
            else:
                self._seen.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._seen


def setup_logging(level: str | int | None = None) -> logging.Logger:
    """Make the ``wattspan`` logger visible (idempotent); returns it.

    ``level`` (or ``WATTSPAN_LOG_LEVEL``) sets the logger's level; without either,
    a logger with no level of its own gets WARNING.
    """
    logger = logging.getLogger("wattspan")
    with _lock:
        handler = next((h for h in logger.handlers if isinstance(h, _FallbackHandler)), None)
        if handler is None:
            handler = _FallbackHandler()
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler.setLevel(logging.WARNING)
            logger.addHandler(handler)
        lv = _level(level) if level is not None else _level(os.environ.get("WATTSPAN_LOG_LEVEL"))
        if lv is not None:  # asked for: the logger and the fallback handler both
            logger.setLevel(lv)
            handler.setLevel(lv)
    return logger
