"""OpenTelemetry export: each request's energy on its server span, and energy metrics.


A request's energy is known only some time (up to a second or two) after its
HTTP server span has ended, because power sensors lag; the OpenTelemetry SDK
ignores attributes set on an ended span. :class:`EnergySpanProcessor` therefore
sits in front of the exporting processor: it holds back the server spans that
wattspan meters until their record is final, adds the energy attributes, and
passes them on; a span whose record does not come within ``hold_timeout_s``
goes on without energy, marked ``wattspan.status="pending"``.

Quick start (the SDK's usual setup, one line changed)::

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from wattspan import Meter
    from wattspan.export.otel import EnergySpanProcessor, EnergyMetrics

    provider = TracerProvider()
    spans = EnergySpanProcessor(BatchSpanProcessor(OTLPSpanExporter()))
    provider.add_span_processor(spans)          # instead of the BatchSpanProcessor itself
    trace.set_tracer_provider(provider)
    metrics = EnergyMetrics()                   # the global MeterProvider
    meter = Meter(span_processor=spans, sinks=[metrics.observe])

or, from the standard ``OTEL_*`` environment variables, :func:`configure_from_env`.

Modules: :mod:`.attributes` (the span attributes), :mod:`.spans` (:class:`EnergySpanProcessor`),
:mod:`.metrics` (:class:`EnergyMetrics`), :mod:`.configure` (setup from code or ``OTEL_*``).
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
