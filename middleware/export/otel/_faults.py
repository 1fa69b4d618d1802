"""Failure counting for the OpenTelemetry sinks: count each, log each kind once."""

from __future__ import annotations


from ...logs import get_logger

log = get_logger(__name__)


class _Faults:
    """Counts failures; logs each kind with its traceback the first time only (a broken
    exporter must not flood the log once per span)."""

    __slots__ = ("counts", "_seen")

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self._seen: set[str] = set()

    def __call__(self, what: str, counter: str = "errors") -> None:
        self.counts[counter] += 1
        if what not in self._seen:
            self._seen.add(what)
            log.exception("wattspan: %s (logged once; counted in stats())", what)
