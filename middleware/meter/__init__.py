"""The live meter: request and batch-step events in, final per-request records out.

* :mod:`.core`: :class:`Meter` (and :class:`Balance`, where its measured energy went);
* :mod:`.sinks`: where records go (:class:`RecordSink`, :class:`DeviceFigures`, callback adapters);
* :mod:`.context`: the request being served (:func:`current_request_id`, :func:`set_tokens`);
* :mod:`.peers`: sharing events between the worker processes of one host;
* :mod:`.provisional`: a request's provisional energy at its response's end (:func:`usage_energy`).

The meter knows no exporter: the process's default meter and its sinks are set
up by :mod:`wattspan.defaults`.
"""

from __future__ import annotations

from .context import current_request_id, set_tokens
from .core import Balance, Meter
from .sinks import BatchCallback, DeviceCallback, DeviceFigures, RecordCallback, RecordSink, SpanSink

__all__ = [
    "Balance",
    "BatchCallback",
    "DeviceCallback",
    "DeviceFigures",
    "Meter",
    "RecordCallback",
    "RecordSink",
    "SpanSink",
    "current_request_id",
    "set_tokens",
]
