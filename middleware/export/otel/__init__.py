"""OpenTelemetry export: each request's energy on its server span, and energy metrics.

:mod:`~wattspan.export.otel.spans` holds :class:`EnergySpanProcessor` (the server span held
until its record is final; its module docstring has the quick start),
:mod:`~wattspan.export.otel.metrics` :class:`EnergyMetrics`,
:mod:`~wattspan.export.otel.attributes` the span attribute table, and
:mod:`~wattspan.export.otel.configure` the setup from ``OTEL_*`` variables. Both the span
processor and the metrics are :class:`wattspan.RecordSink` s: ``Meter(sinks=[spans, metrics])``.
"""

from __future__ import annotations

from .attributes import record_attributes
from .configure import OTelSetup, configure_from_env, connect_metrics, install, is_sdk_provider, wrap_provider
from .metrics import CO2E_BUCKETS_G, ENERGY_BUCKETS_J, EnergyMetrics
from .spans import EnergySpanProcessor

__all__ = [
    "CO2E_BUCKETS_G",
    "ENERGY_BUCKETS_J",
    "EnergyMetrics",
    "EnergySpanProcessor",
    "OTelSetup",
    "configure_from_env",
    "connect_metrics",
    "install",
    "is_sdk_provider",
    "record_attributes",
    "wrap_provider",
]
