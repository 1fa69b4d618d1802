"""The one small interface every power source implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..samples import DeviceInfo, SampleBatch

__all__ = ["PowerSource", "SourceUnavailable"]


class SourceUnavailable(RuntimeError):
    """A source cannot run here (no driver, no permission, no device).

    The message always says what is missing and how to fix it.
    """


@runtime_checkable
class PowerSource(Protocol):
    """A sensor, polled from wattspan's one background sampler thread.

    ``devices()`` lists what the source meters, with the reading chosen for each
    (``DeviceInfo.sensor``). ``poll()`` returns the readings that arrived since the
    previous call, timestamps on ``time.monotonic_ns()``'s clock; it must be quick
    (well under a millisecond per device) and must not raise for a transient
    failure: it logs, counts it in ``errors`` and returns what it has.
    ``close()`` releases the driver.
    """

    name: str
    errors: int

    def devices(self) -> list[DeviceInfo]: ...

    def poll(self) -> list[SampleBatch]: ...

    def close(self) -> None: ...
