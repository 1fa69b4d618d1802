"""wattspan: how much energy, and how much CO2e, every single inference request costs.

The public API (see ``__all__``): the meter and its sinks, the ASGI middleware,
records, the carbon model, the ledger, power sources, the batch-step API and
offline attribution. The pipeline runs one way:
:mod:`wattspan.sources` -> :mod:`wattspan.sampler` -> :mod:`wattspan.meter` ->
:mod:`wattspan.attribution` -> :mod:`wattspan.carbon` -> sinks
(:mod:`wattspan.export.otel`, :mod:`wattspan.export.ledger`); the process's
default meter and its wiring live in :mod:`wattspan.defaults`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
import typing as _typing

from .attribution import Attribution, Requests, StepModel, Steps, attribute
from .errors import InputError
from .meter.context import current_request_id, set_tokens
from .phases import phase
from .records import RecordBatch, RequestLabels, RequestRecord
from .samples import DeviceInfo, DeviceTrace, RingBuffer, SampleBatch, SampleKind

try:
    __version__ = version("wattspan")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = sorted(
    [
        # the live meter, its sinks and the middleware
        "Meter",
        "RecordSink",
        "DeviceFigures",
        "RecordCallback",
        "BatchCallback",
        "EnergyMiddleware",
        "get_default_meter",
        # records
        "RequestRecord",
        "RecordBatch",
        "RequestLabels",
        "request_records",
        "InputError",
        # the batch-step API and request context
        "current_request_id",
        "set_tokens",
        "usage_energy",
        "phase",
        # carbon
        "CarbonModel",
        "Embodied",
        # the ledger
        "Ledger",
        # power sources and samples
        "PowerSource",
        "SourceUnavailable",
        "DeviceInfo",
        "DeviceTrace",
        "RingBuffer",
        "SampleBatch",
        "SampleKind",
        # offline attribution
        "Attribution",
        "Requests",
        "StepModel",
        "Steps",
        "attribute",
    ]
)

# The middleware, the live meter, exporters and the rest pull in threads, SQLite
# and optional dependencies: imported only when asked for.
_LAZY = {
    "Meter": ".meter",
    "RecordSink": ".meter.sinks",
    "DeviceFigures": ".meter.sinks",
    "RecordCallback": ".meter.sinks",
    "BatchCallback": ".meter.sinks",
    "EnergyMiddleware": ".asgi",
    "get_default_meter": ".defaults",
    "usage_energy": ".meter.provisional",
    "CarbonModel": ".carbon",
    "Embodied": ".carbon",
    "request_records": ".carbon.records",
    "Ledger": ".export.ledger",
    "PowerSource": ".sources",
    "SourceUnavailable": ".sources",
}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'wattspan' has no attribute {name!r}")
