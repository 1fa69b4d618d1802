"""Helpers for your own tests: capture the records wattspan makes, replay a power trace, simulate a GPU.

No GPU and no network needed::

    from wattspan.testing import RecordCollector, metered, constant_trace

    def test_my_endpoint_is_metered():
        with metered(constant_trace(100.0)) as (meter, records):
            app = EnergyMiddleware(my_app, meter=meter)
            ...                                  # serve requests through ``app``
            meter.flush(10)
        assert records.records[0].route == "/v1/chat"

* :class:`RecordCollector`: a :class:`~wattspan.meter.sinks.RecordSink` that keeps what it is given;
* :func:`constant_trace` and :class:`ReplaySource`: a recorded (or made-up, constant) power trace played
  back in real time, so the figures are known in advance (``watts x seconds``);
* :class:`SimulatedSource`, :func:`simulate_server`, :func:`sense`: the labelled simulator (records say
  ``simulated=True``; never a measurement);
* :func:`metered`: a started :class:`~wattspan.Meter` on one of those, with a collector, closed on exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from contextlib import contextmanager

import numpy as np

from .meter import Meter
from .meter.sinks import DeviceFigures
from .records import RequestRecord
from .samples import DeviceTrace
from .simulate import sense, simulate_server
from .sources.replay import ReplaySource
from .sources.simulated import SimulatedSource

__all__ = [
    "RecordCollector",
    "ReplaySource",
    "SimulatedSource",
    "constant_trace",
    "metered",
    "sense",
    "simulate_server",
]


class RecordCollector:
    """A record sink that keeps every final record (``records``) and the latest device figures (``devices``).

    Thread-safe (the meter calls it from its own thread). :meth:`wait` blocks until ``n`` records
    have arrived; :meth:`by_id` finds one; :meth:`clear` forgets them.
    """

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []
        self.devices: dict[str, DeviceFigures] = {}
        self.passes = 0
        self._cond = threading.Condition()

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        with self._cond:
            self.records.extend(records)
            self.passes += 1
            self._cond.notify_all()

    def on_device(self, figures: DeviceFigures) -> None:
        with self._cond:
            self.devices[figures.device] = figures

    def wait(self, n: int = 1, timeout: float = 10.0) -> bool:
        """True once at least ``n`` records arrived, False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.records) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def by_id(self, request_id: str) -> RequestRecord | None:
        with self._cond:
            return next((r for r in self.records if r.id == request_id), None)

    def clear(self) -> None:
        with self._cond:
            self.records.clear()
            self.devices.clear()


def constant_trace(watts: float = 100.0, seconds: float = 3600.0, dt_ms: int = 5, device: str = "gpu0") -> DeviceTrace:
    """A power trace at ``watts`` W for ``seconds`` s, one reading every ``dt_ms`` ms, with its energy counter (J)."""
    t = np.arange(0, int(seconds * 1e9), dt_ms * 1_000_000, dtype=np.int64)
    return DeviceTrace(device, t, np.full(len(t), float(watts)), energy_j=watts * t * 1e-9, sensor="constant")


@contextmanager
def metered(source: Any = None, *, collector: RecordCollector | None = None, **meter_kw: Any) -> Iterator[tuple[Meter, RecordCollector]]:
    """A started :class:`~wattspan.Meter` on ``source`` with a :class:`RecordCollector`; closed on exit.

    ``source``: a power source, a :class:`~wattspan.DeviceTrace` (replayed, looping) or None (a constant
    100 W ``gpu0``). Short periods by default (``period_s=0.05``, ``lag_s=0.05``) so records arrive in
    a fraction of a second; other keywords go to the meter (``carbon=``, ``idle_w=`` ...).
    """
    if source is None:
        source = constant_trace()
    if isinstance(source, DeviceTrace):
        source = ReplaySource([source], loop=True)
    sink = collector if collector is not None else RecordCollector()
    meter_kw.setdefault("period_s", 0.05)
    meter_kw.setdefault("lag_s", 0.05)
    meter = Meter(sources=[source], sinks=[sink, *meter_kw.pop("sinks", ())], **meter_kw)
    try:
        if not meter.wait_ready(30):
            raise RuntimeError("the meter's power source did not open within 30 s")
        yield meter, sink
    finally:
        meter.close()
