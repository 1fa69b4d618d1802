"""OpenTelemetry setup: wattspan's span processor and metrics on a TracerProvider / MeterProvider.

:func:`install` (an exporter), :func:`wrap_provider` (an application's own provider),
:func:`configure_from_env` (the standard ``OTEL_*`` variables), :func:`connect_metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics as _metrics_api
    from opentelemetry import trace as _trace_api
except ImportError as exc:  # pragma: no cover - exercised without the otel extra
    raise ImportError("wattspan.export.otel needs the OpenTelemetry SDK: pip install 'wattspan[otel]'") from exc

from ...logs import get_logger
from .metrics import EnergyMetrics
from .spans import EnergySpanProcessor

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from ...meter import Meter

__all__ = ["OTelSetup", "configure_from_env", "connect_metrics", "install", "is_sdk_provider", "wrap_provider"]

log = get_logger(__name__)

# ---------------------------------------------------------------------------- setup helpers

_TRUE = ("1", "true", "yes", "on")


def _exporter_names(signal: str) -> list[str]:
    """Exporter entry-point names for ``signal`` from ``OTEL_{TRACES,METRICS}_EXPORTER``
    (default ``otlp``), ``otlp`` resolved by ``OTEL_EXPORTER_OTLP[_SIGNAL]_PROTOCOL``
    exactly as the SDK's auto-configuration does (``grpc`` when unset)."""
    var = f"OTEL_{signal.upper()}_EXPORTER"
    raw = os.environ.get(var, "otlp")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    if "none" in names:
        raise ValueError(f"{var}={raw!r}: 'none' cannot be combined with other exporters")
    pvar = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    protocol = (os.environ.get(pvar) or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    by_protocol = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}
    out = []
    for n in names:
        if n == "otlp":
            if protocol not in by_protocol:
                raise ValueError(
                    f"{pvar} / OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use 'grpc' or 'http/protobuf'"
                )
            n = by_protocol[protocol]
        out.append(n)
    return out


def _load_exporter(group: str, name: str, var: str) -> Any:
    """The object the entry point ``name`` of ``group`` names (a SpanExporter class for traces;
    a MetricExporter or MetricReader class for metrics): Any, as EntryPoint.load() gives it."""
    from importlib.metadata import entry_points

    found = list(entry_points(group=group, name=name))
    if not found:
        known = sorted({e.name for e in entry_points(group=group)} | {"otlp", "none"})
        hint = {
            "otlp_proto_grpc": "pip install opentelemetry-exporter-otlp-proto-grpc",
            "otlp_proto_http": "pip install opentelemetry-exporter-otlp-proto-http",
            "prometheus": "pip install opentelemetry-exporter-prometheus",
        }.get(name, f"choose one of {', '.join(known)}")
        raise ValueError(f"{var}: no exporter named {name!r} is installed ({hint})")
    return found[0].load()


def _span_exporters_from_env() -> list[SpanExporter]:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return []
    return [_load_exporter("opentelemetry_traces_exporter", n, "OTEL_TRACES_EXPORTER")() for n in _exporter_names("traces")]


def install(
    tracer_provider: _trace_api.TracerProvider | None = None,
    *,
    exporter: SpanExporter | None = None,
    hold_timeout_s: float = 5.0,
    max_held: int = 10_000,
    meter: Meter | None = None,
) -> EnergySpanProcessor:
    """Add an :class:`EnergySpanProcessor` exporting to ``exporter`` to a TracerProvider.

    ``tracer_provider``: an SDK ``TracerProvider`` (default: the global one,
    which must be an SDK provider). ``exporter``: a ``SpanExporter`` (default:
    the ones ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*`` name). Each is
    wrapped ``EnergySpanProcessor(BatchSpanProcessor(exporter))``; do not add
    the same exporter to the provider yourself, or every span goes out twice.
    ``meter``: a :class:`wattspan.Meter` whose records resolve the spans
    (the processor becomes one of its sinks). Returns the processor.
    """
    from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = tracer_provider if tracer_provider is not None else _trace_api.get_tracer_provider()
    # an SDK TracerProvider's (the API's has none): checked here, called below
    add_span_processor: Callable[[SpanProcessor], None] | None = getattr(provider, "add_span_processor", None)
    if not callable(add_span_processor):
        raise TypeError(
            f"install() needs an SDK TracerProvider, got {type(provider).__name__}: create one "
            "(opentelemetry.sdk.trace.TracerProvider), set it with trace.set_tracer_provider(), "
            "or use wattspan.export.otel.configure_from_env()"
        )
    exporters = [exporter] if exporter is not None else _span_exporters_from_env()
    if not exporters:
        raise ValueError("install(): no exporter given and OTEL_TRACES_EXPORTER=none (or OTEL_SDK_DISABLED): nothing to export to")
    if len(exporters) == 1:
        downstream: SpanProcessor = BatchSpanProcessor(exporters[0])
    else:
        # the SDK's __init__ has no "-> None", so mypy takes it for an untyped function
        multi = downstream = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        for e in exporters:
            multi.add_span_processor(BatchSpanProcessor(e))
    proc = EnergySpanProcessor(downstream, hold_timeout_s=hold_timeout_s, max_held=max_held)
    add_span_processor(proc)
    if meter is not None:
        meter.add_sink(proc)
    return proc


@dataclass(frozen=True)
class OTelSetup:
    """What :func:`configure_from_env` built. ``span_processor`` is ``None`` when traces
    are off; ``prometheus_address`` is ``(host, port)`` when the Prometheus endpoint
    serves. :meth:`shutdown` flushes and stops everything it started."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    span_processor: EnergySpanProcessor | None
    metrics: EnergyMetrics
    prometheus_address: tuple[str, int] | None = None
    _servers: tuple[tuple[WSGIServer, threading.Thread], ...] = field(default=(), repr=False)

    def shutdown(self) -> None:
        shutdowns: tuple[Callable[[], object], ...] = (self.tracer_provider.shutdown, self.meter_provider.shutdown)
        for fn in shutdowns:
            try:
                fn()
            except Exception:
                log.exception("wattspan: OpenTelemetry shutdown failed")
        for server, thread in self._servers:
            server.shutdown()
            server.server_close()
            thread.join(5.0)


def configure_from_env(
    *,
    set_global: bool = True,
    resource: Resource | None = None,
    hold_timeout_s: float = 5.0,
    max_tenants: int = 100,
    health: Callable[[], Mapping[str, Any]] | None = None,
    meter: Meter | None = None,
) -> OTelSetup:
    """A TracerProvider and a MeterProvider configured by the standard ``OTEL_*`` variables.

    * ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``: the resource (unless ``resource``);
    * ``OTEL_TRACES_EXPORTER``: comma list of ``otlp`` (default), ``console``, ``none``;
      each exports through ``EnergySpanProcessor(BatchSpanProcessor(...))``;
    * ``OTEL_METRICS_EXPORTER``: ``otlp`` (default), ``prometheus``, ``console``, ``none``;
      ``prometheus`` serves ``/metrics`` on ``OTEL_EXPORTER_PROMETHEUS_HOST``
      (default ``localhost``) : ``OTEL_EXPORTER_PROMETHEUS_PORT`` (default 9464);
    * ``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_PROTOCOL``: ``grpc`` (the Python SDK's
      default) or ``http/protobuf``; ``OTEL_EXPORTER_OTLP[_TRACES|_METRICS]_ENDPOINT``,
      ``_HEADERS``, ``_TIMEOUT`` and the ``OTEL_BSP_*``, ``OTEL_METRIC_EXPORT_*``,
      ``OTEL_TRACES_SAMPLER*`` variables are read by the SDK itself;
    * ``OTEL_SDK_DISABLED=true``: no exporters.

    ``set_global`` installs both providers as the process's globals (only the
    first call in a process can). ``health``, ``max_tenants``: see
    :class:`EnergyMetrics`; ``meter``: a :class:`wattspan.Meter` to wire
    (span processor and the metrics sink).
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    res = resource if resource is not None else Resource.create()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE
    span_exporters = _span_exporters_from_env()
    readers: list[MetricReader] = []
    servers: list[tuple[WSGIServer, threading.Thread]] = []
    prom_addr: tuple[str, int] | None = None
    try:
        for name in [] if disabled else _exporter_names("metrics"):
            if name == "prometheus":
                from opentelemetry.exporter.prometheus import PrometheusMetricReader
                from prometheus_client import start_http_server

                host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "localhost")
                raw_port = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464")
                try:
                    port = int(raw_port)
                except ValueError:
                    raise ValueError(f"OTEL_EXPORTER_PROMETHEUS_PORT={raw_port!r} is not a port number") from None
                reader = PrometheusMetricReader()
                readers.append(reader)
                servers.append(start_http_server(port, addr=host))
                prom_addr = (host, servers[-1][0].server_port)
            else:
                cls = _load_exporter("opentelemetry_metrics_exporter", name, "OTEL_METRICS_EXPORTER")
                readers.append(cls() if isinstance(cls, type) and issubclass(cls, MetricReader) else PeriodicExportingMetricReader(cls()))
    except BaseException:
        _close_servers(servers)
        raise

    try:
        tp = TracerProvider(resource=res)
        proc = None
        if span_exporters:
            if len(span_exporters) == 1:
                downstream: SpanProcessor = BatchSpanProcessor(span_exporters[0])
            else:
                multi = downstream = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]  # as in install()
                for e in span_exporters:
                    multi.add_span_processor(BatchSpanProcessor(e))
            proc = EnergySpanProcessor(downstream, hold_timeout_s=hold_timeout_s)
            tp.add_span_processor(proc)
        mp = MeterProvider(resource=res, metric_readers=readers)
        if health is None and meter is not None:
            health = lambda: meter.sampler.health() if meter.sampler is not None else {}  # noqa: E731
        em = EnergyMetrics(mp, max_tenants=max_tenants, health=health)
        if set_global:
            _trace_api.set_tracer_provider(tp)
            _metrics_api.set_meter_provider(mp)
        if meter is not None:
            if proc is not None:  # None when traces are off (OTEL_TRACES_EXPORTER=none, OTEL_SDK_DISABLED)
                meter.add_sink(proc)
            connect_metrics(meter, em)
    except BaseException:  # nothing half set up keeps serving /metrics
        _close_servers(servers)
        raise
    return OTelSetup(tp, mp, proc, em, prom_addr, tuple(servers))


def _close_servers(servers: list[tuple[WSGIServer, threading.Thread]]) -> None:
    for server, _thread in servers:
        server.shutdown()
        server.server_close()


def connect_metrics(meter: Meter, metrics: EnergyMetrics) -> None:
    """Feed ``metrics`` from ``meter``: every final record, and each device's
    measured and unattributed energy and power after every attribution pass."""
    meter.add_sink(metrics)


def is_sdk_provider(provider: object) -> bool:
    """True for an OpenTelemetry SDK ``TracerProvider`` that :func:`wrap_provider` can wrap."""
    return hasattr(provider, "_active_span_processor")


def wrap_provider(
    tracer_provider: _trace_api.TracerProvider | None = None,
    *,
    meter: Meter | None = None,
    hold_timeout_s: float = 5.0,
    max_held: int = 10_000,
) -> EnergySpanProcessor:
    """Put an :class:`EnergySpanProcessor` in front of the span processors a
    TracerProvider already has (the user's own exporters), so the server spans
    wattspan meters reach them with energy attached, once.

    For an application that set up its own ``TracerProvider`` (and, say,
    ``FastAPIInstrumentor``): call it once after that setup. It reaches into the
    SDK's ``_active_span_processor`` (stable across SDK 1.x); a provider without
    it raises ``TypeError``, and then :func:`install` with an exporter is the way.
    """
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor

    provider = tracer_provider if tracer_provider is not None else _trace_api.get_tracer_provider()
    # the SDK's private SynchronousMultiSpanProcessor (its _lock, _span_processors): Any
    multi: Any = getattr(provider, "_active_span_processor", None)
    if multi is None or not hasattr(multi, "_span_processors"):
        raise TypeError(f"wrap_provider() needs an SDK TracerProvider, got {type(provider).__name__}")
    with multi._lock:
        existing = tuple(multi._span_processors)
        inner = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]  # as in install()
        for p in existing:
            inner.add_span_processor(p)
        proc = EnergySpanProcessor(inner, hold_timeout_s=hold_timeout_s, max_held=max_held)
        multi._span_processors = (proc,)
    if meter is not None:
        meter.add_sink(proc)
    return proc
