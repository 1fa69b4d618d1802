"""The trivial app of the overhead benchmark, in each of its variants.

``uvicorn benchmarks.overhead_app:app`` serves the variant named by
``WATTSPAN_BENCH_VARIANT``: ``bare``; ``otel`` (opentelemetry-instrumentation-asgi
with a tracer provider whose batch processor exports nowhere); ``wattspan``
(EnergyMiddleware and a live meter, no export); ``otel+wattspan`` (both, with
wattspan exporting: server spans held and completed by its span processor, OTel
metrics, and the SQLite ledger).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VARIANTS = ("bare", "otel", "wattspan", "otel+wattspan")


async def hello(request):
    return PlainTextResponse("ok")


async def work(request):
    """About a millisecond of pure-Python CPU: a stand-in for an endpoint that does real work."""
    return PlainTextResponse(str(sum(i * i for i in range(25_000))))


def _meter(export: bool, tracer_provider=None):
    from wattspan import DeviceTrace, Meter
    from wattspan.carbon import CarbonModel
    from wattspan.sources.replay import ReplaySource

    t = np.arange(0, 3600 * 10**9, 5 * 10**6, dtype=np.int64)
    trace = DeviceTrace("gpu0", t, np.full(len(t), 300.0), energy_j=300.0 * t * 1e-9, sensor="constant")
    sinks = []
    if export:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from wattspan.export import otel
        from wattspan.export.ledger import Ledger

        metrics = otel.EnergyMetrics(MeterProvider(metric_readers=[InMemoryMetricReader()]))
        ledger = Ledger(os.path.join(tempfile.mkdtemp(), "bench.sqlite"))
        processor = tracer_provider._wattspan_processor if tracer_provider is not None else None
        sinks = [*([processor] if processor is not None else []), metrics, ledger]
    return Meter(sources=[ReplaySource([trace], loop=True)], carbon=CarbonModel(intensity_g_per_kwh=400.0), idle_w=100.0, sinks=sinks)


def _tracer_provider(with_wattspan: bool):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Nowhere(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    downstream = BatchSpanProcessor(Nowhere())
    if with_wattspan:
        from wattspan.export.otel import EnergySpanProcessor

        proc = EnergySpanProcessor(downstream)
        provider.add_span_processor(proc)
        provider._wattspan_processor = proc
    else:
        provider.add_span_processor(downstream)
    return provider


def create(variant: str):
    if variant not in VARIANTS:
        raise SystemExit(f"WATTSPAN_BENCH_VARIANT must be one of {VARIANTS}, got {variant!r}")
    app = Starlette(routes=[Route("/", hello), Route("/work", work)])
    meter = provider = None
    if variant == "wattspan":
        from wattspan import EnergyMiddleware

        meter = _meter(False)
        app.add_middleware(EnergyMiddleware, meter=meter)
    elif variant == "otel":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        provider = _tracer_provider(False)
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)
    elif variant == "otel+wattspan":
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        from wattspan import EnergyMiddleware

        provider = _tracer_provider(True)
        meter = _meter(True, provider)
        app.add_middleware(EnergyMiddleware, meter=meter)
        app.add_middleware(OpenTelemetryMiddleware, tracer_provider=provider)  # outermost: the server span
    app.state.meter = meter
    app.state.tracer_provider = provider
    return app


def __getattr__(name: str):
    """``app`` (what ``uvicorn benchmarks.overhead_app:app`` serves), built on first use: importing
    the module for :func:`create` (the in-process benchmark) starts no stray meter of its own,
    whose sampler would run beside the measured one and be counted in its CPU."""
    if name == "app":
        globals()["app"] = made = create(os.environ.get("WATTSPAN_BENCH_VARIANT", "bare"))
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
