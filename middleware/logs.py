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
"""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["setup_logging"]

_FORMAT = "%(asctime)s wattspan %(levelname)s [%(process)d] %(message)s"
_lock = threading.Lock()
_LEVELS = {"DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"}


class _FallbackHandler(logging.StreamHandler):
    """Writes to stderr unless the root logger has handlers (then propagation delivers the record)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow a replaced stderr (pytest's capture, daemonisation)
        super().emit(record)


def _level(value) -> int | None:
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
    return logging.getLevelName("WARNING" if name == "WARN" else name)


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
