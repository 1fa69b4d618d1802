"""Power sources: each turns one kind of sensor into :class:`~wattspan.SampleBatch` readings
on the monotonic nanosecond clock."""

from typing import Any

from ._base import PowerSource, SourceUnavailable

__all__ = ["NvmlSource", "PowerSource", "RaplSource", "ReplaySource", "SourceUnavailable", "read_trace_csv"]

# imported on first use: each pulls in its own driver binding or parser
_LAZY = {"NvmlSource": ".nvml", "RaplSource": ".rapl", "ReplaySource": ".replay", "read_trace_csv": ".replay"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'wattspan.sources' has no attribute {name!r}")
