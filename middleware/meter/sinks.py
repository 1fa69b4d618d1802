"""Where the meter's output goes: the :class:`RecordSink` protocol.

The meter knows no exporter. Everything that takes its output - the span
processor (:mod:`wattspan.export.otel.spans`), the metrics
(:mod:`wattspan.export.otel.metrics`), the ledger
(:mod:`wattspan.export.ledger`) and a user's own code - implements the same
two calls, given on the meter's thread after each attribution pass:

* ``on_records(records)``: the pass's final :class:`~wattspan.RequestRecord` s (a
  :class:`~wattspan.records.RecordBatch`: a sequence of them, held as columns, its records
  built on first use; wattspan's own sinks read the columns);
* ``on_device(figures)``: one device's running totals (:class:`DeviceFigures`).

Both must be quick and should not raise: a sink that raises is logged and
counted (``meter.counters["sink_errors"]``), and the meter goes on.
:class:`RecordCallback` and :class:`BatchCallback` turn a plain function into a
sink::

    records = []
    meter = Meter(sinks=[RecordCallback(records.append)])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, runtime_checkable

from ..records import RequestRecord

__all__ = ["BatchCallback", "DeviceCallback", "DeviceFigures", "FlushableSink", "RecordCallback", "RecordSink", "SpanSink"]


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    """One device's running totals after a meter pass.

    ``energy_j``: energy measured since the meter started (J); ``power_w``: the
    latest power reading (W), ``None`` when the sensor gives energy only;
    ``unattributed_j``: measured energy charged to no request (J); ``kind``:
    the sample kind (``"gpu"``, ``"cpu"``, ...).
    """

    device: str
    kind: str
    energy_j: float
    power_w: float | None
    unattributed_j: float


@runtime_checkable
class RecordSink(Protocol):
    """Takes the meter's final records and per-device figures (see the module's text)."""

    def on_records(self, records: Sequence[RequestRecord]) -> None: ...

    def on_device(self, figures: DeviceFigures) -> None: ...


@runtime_checkable
class SpanSink(RecordSink, Protocol):
    """A sink that holds a request's tracing span until its record comes
    (:class:`wattspan.export.otel.EnergySpanProcessor`): the middleware marks
    the span at request start through :meth:`wattspan.Meter.expect_span`."""

    def expect(self, span_id: int) -> None: ...


@runtime_checkable
class FlushableSink(RecordSink, Protocol):
    """A sink that buffers (the ledger, the span processor): :meth:`wattspan.Meter.drain`
    flushes it at shutdown. ``flush`` returns ``False`` when it could not write
    everything within ``timeout`` seconds."""

    def flush(self, timeout: float) -> bool | None: ...


_T = TypeVar("_T")


def _takes_timeout(fn: Callable[..., object]) -> bool:
    """Whether ``fn`` accepts one positional argument (a flush's timeout), from its signature: a
    ``TypeError`` raised inside a flush is the flush's own failure, not a sign to call it again."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature (io's flush() takes none)
        return False
    try:
        sig.bind(0.0)
    except TypeError:
        return False
    return True


class _Callback(Generic[_T]):
    """A function taking one ``_T`` (a record, a pass's records, a device's figures) as a sink."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[_T], object]) -> None:
        self.fn = fn

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        pass

    def on_device(self, figures: DeviceFigures) -> None:
        pass

    def flush(self, timeout: float) -> bool | None:
        """Flush the object ``fn`` is a bound method of, if it has ``flush`` (``Ledger.write``'s ledger)."""
        # the bound method's owner's flush: a ledger's flush(timeout) -> bool, a file's flush() -> None
        fl: Callable[..., bool | None] | None = getattr(getattr(self.fn, "__self__", None), "flush", None)
        if not callable(fl):
            return None
        if _takes_timeout(fl):
            return fl(timeout)
        return fl()  # a flush() without a timeout (a file's)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r})"


class RecordCallback(_Callback[RequestRecord]):
    """A sink calling ``fn(record)`` for each final record. A call that raises does not keep
    the pass's other records from ``fn``: the first error is raised once all were given."""

    __slots__ = ()

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        fn = self.fn
        failed: Exception | None = None
        for rec in records:
            try:
                fn(rec)
            except Exception as exc:
                if failed is None:
                    failed = exc
        if failed is not None:
            raise failed  # the meter counts and logs it (sink_errors)


class BatchCallback(_Callback[list[RequestRecord]]):
    """A sink calling ``fn(records)`` once per pass with that pass's final records (a list)."""

    __slots__ = ()

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        self.fn(records if isinstance(records, list) else list(records))


class DeviceCallback(_Callback[DeviceFigures]):
    """A sink calling ``fn(figures)`` with each device's :class:`DeviceFigures`."""

    __slots__ = ()

    def on_device(self, figures: DeviceFigures) -> None:
        self.fn(figures)

