"""Power sources: each turns one kind of sensor into :class:`~wattspan.SampleBatch` readings
on the monotonic nanosecond clock."""

from ._base import PowerSource, SourceUnavailable

__all__ = ["PowerSource", "SourceUnavailable"]
