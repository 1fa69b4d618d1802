"""wattspan: how much energy, and how much CO2e, every single inference request costs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._context import current_request_id, set_tokens
from ._phase import phase
from ._records import RequestRecord
from ._samples import DeviceInfo, DeviceTrace, RingBuffer, SampleBatch, SampleKind
from .attribution import Attribution, Requests, StepModel, Steps, attribute
from .errors import InputError

try:
    __version__ = version("wattspan")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = sorted(
    [
        "Attribution",
        "DeviceInfo",
        "DeviceTrace",
        "EnergyMiddleware",
        "InputError",
        "Meter",
        "RequestRecord",
        "Requests",
        "RingBuffer",
        "SampleBatch",
        "SampleKind",
        "StepModel",
        "Steps",
        "attribute",
        "current_request_id",
        "phase",
        "set_tokens",
        "usage_energy",
    ]
)

_LAZY = {"EnergyMiddleware": "._asgi", "Meter": "._meter", "usage_energy": "._provisional"}


def __getattr__(name: str):
    # The middleware and the live meter pull in threads and optional exporters:
    # import them only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'wattspan' has no attribute {name!r}")
