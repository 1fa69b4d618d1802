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
    from wattspan.otel import EnergySpanProcessor, EnergyMetrics

    provider = TracerProvider()
    spans = EnergySpanProcessor(BatchSpanProcessor(OTLPSpanExporter()))
    provider.add_span_processor(spans)          # instead of the BatchSpanProcessor itself
    trace.set_tracer_provider(provider)
    metrics = EnergyMetrics()                   # the global MeterProvider
    meter = Meter(span_processor=spans, sinks=[metrics.observe])

or, from the standard ``OTEL_*`` environment variables, :func:`configure_from_env`.

Span attributes (:func:`record_attributes`; names from the OpenTelemetry
semantic conventions where one exists: ``hw.*``, ``gen_ai.*``):

===============================  ========  ==============================================
attribute                        type      meaning
===============================  ========  ==============================================
``wattspan.energy_j``            double    the request's accelerator energy, joules
                                           (dynamic + idle share)
``wattspan.energy.dynamic_j``    double    energy above the idle baseline, J
``wattspan.energy.idle_j``       double    the request's share of the idle baseline, J
``wattspan.energy.host_j``       double    the request's share of host (CPU package) energy, J
``wattspan.co2e_g``              double    grams CO2e: operational (accelerator + host energy x
                                           PUE x grid intensity) + embodied
``wattspan.co2e.embodied_g``     double    the embodied (manufacturing) part, g CO2e
``wattspan.device_s``            double    accelerator-seconds charged to the request
``wattspan.energy_j.low``        double    lower end of the 90 % band on ``energy_j``, J
                                           (when the attribution gave a band)
``wattspan.energy_j.high``       double    upper end of that band, J
``wattspan.quality``             string    ``good`` | ``coarse`` | ``misfit``: how well the
                                           step model fits the sensor's readings
``wattspan.method``              string    ``batch-fit`` | ``time-share`` | ``no-trace``
``wattspan.sensor``              string    which reading the energy rests on
``wattspan.coverage``            double    fraction of the request's life the power trace
                                           covered (0..1)
``wattspan.simulated``           boolean   true when the power came from the simulated
                                           source - never a measurement
``wattspan.status``              string    ``final`` (energy attached) | ``pending``
                                           (record not final in time; no energy)
``wattspan.request_id``          string    wattspan's request id (the ledger's key)
``wattspan.tenant``              string    the tenant, when known
``wattspan.intensity.*``         mixed     the intensity the carbon used: ``g_per_kwh``,
                                           ``provider``, ``zone``, ``hour`` (UTC), ``basis``
``wattspan.co2e.market_g``       double    market-based operational g CO2e, when a factor is set
``wattspan.co2e.marginal_g``     double    marginal operational g CO2e, when a provider is set
``hw.id``                        string    the device the request ran on (``gpu0``), or its
                                           device group (``gpu0,gpu1``)
``wattspan.device.ids``          string[]  a device group's members, when a group
``wattspan.device.energy_j``     double[]  the request's J on each of them, same order
``hw.type``                      string    ``gpu``
``gen_ai.request.model``         string    the model, when known
``gen_ai.usage.input_tokens``    int       prompt tokens, when known
``gen_ai.usage.output_tokens``   int       output tokens, when known
===============================  ========  ==============================================

Metrics (:class:`EnergyMetrics`; OTel names, units UCUM; a Prometheus
exporter turns ``wattspan.energy`` in ``J`` into ``wattspan_energy_joules_total``):

================================  ===============  =====  =========================================
instrument                        kind             unit   attributes
================================  ===============  =====  =========================================
``wattspan.energy``               counter          J      ``http.route``, ``http.request.method``,
``wattspan.co2e``                 counter          g      ``wattspan.status_class`` (``2xx``...),
``wattspan.request.energy``       histogram        J      ``gen_ai.request.model``, ``wattspan.tenant``
``wattspan.request.co2e``         histogram        g      (capped), ``hw.id``, ``wattspan.simulated``
                                                          (a group's request adds to the counters
                                                          once per member, ``hw.id`` that member's)
``hw.energy``                     counter (obs.)   J      ``hw.id``, ``hw.type``
``hw.power``                      gauge (obs.)     W      ``hw.id``, ``hw.type``
``wattspan.unattributed.energy``  counter (obs.)   J      ``hw.id``
``wattspan.sampler.poll_errors``  gauge (obs.)     1      ``wattspan.source``
``wattspan.sampler.dropped``      gauge (obs.)     1      ``hw.id`` (readings overwritten, buffer full)
``wattspan.sampler.poll_age``     gauge (obs.)     s      (seconds since the sampler's last poll)
================================  ===============  =====  =========================================

Nothing here raises into the request path or the meter's thread: failures are
logged once, counted (``stats()``), and the span goes on unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

try:
    from opentelemetry import metrics as _metrics_api
    from opentelemetry import trace as _trace_api
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
except ImportError as exc:  # pragma: no cover - exercised without the otel extra
    raise ImportError("wattspan.otel needs the OpenTelemetry SDK: pip install 'wattspan[otel]'") from exc

from ._asgi import Cardinality
from ._records import RequestRecord

__all__ = [
    "EnergyMetrics",
    "EnergySpanProcessor",
    "OTelSetup",
    "configure_from_env",
    "connect_metrics",
    "install",
    "record_attributes",
    "wrap_provider",
]

log = logging.getLogger("wattspan")

_monotonic = time.monotonic

#: Histogram bucket bounds: per-request accelerator energy spans ~10 mJ (an
#: embedding) to kJ (a long generation on a big GPU).
ENERGY_BUCKETS_J = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
#: ... and its carbon, micrograms to grams.
CO2E_BUCKETS_G = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


# ---------------------------------------------------------------------------- span attributes


def record_attributes(record: RequestRecord) -> dict[str, Any]:
    """The span attributes for one final record (see the module's table).

    Optional values (model, tenant, token counts) are left out when unknown.
    """
    a: dict[str, Any] = {
        "wattspan.energy_j": float(record.energy_j),
        "wattspan.energy.dynamic_j": float(record.dynamic_j),
        "wattspan.energy.idle_j": float(record.idle_j),
        "wattspan.energy.host_j": float(record.host_j),
        "wattspan.co2e_g": float(record.co2e_g),
        "wattspan.co2e.embodied_g": float(record.embodied_g),
        "wattspan.device_s": float(record.device_s),
        "wattspan.method": record.method,
        "wattspan.sensor": record.sensor,
        "wattspan.coverage": float(record.coverage),
        "wattspan.simulated": bool(record.simulated),
        "wattspan.status": "final",
        "wattspan.request_id": record.id,
        "hw.id": record.device,
        "hw.type": "gpu",
    }
    if record.device_energy:  # a device group: each member's id and energy, in the same order
        parts = record.device_energy_j
        a["wattspan.device.ids"] = list(parts)
        a["wattspan.device.energy_j"] = [float(v) for v in parts.values()]
    if record.model:
        a["gen_ai.request.model"] = record.model
    if record.prompt_tokens:
        a["gen_ai.usage.input_tokens"] = int(record.prompt_tokens)
    if record.output_tokens:
        a["gen_ai.usage.output_tokens"] = int(record.output_tokens)
    if record.tenant:
        a["wattspan.tenant"] = record.tenant
    if record.intensity_provider:  # which intensity the carbon used (issue 11)
        a["wattspan.intensity.g_per_kwh"] = float(record.intensity_g_per_kwh)
        a["wattspan.intensity.provider"] = record.intensity_provider
        a["wattspan.intensity.zone"] = record.intensity_zone
        a["wattspan.intensity.hour"] = record.intensity_hour
        a["wattspan.intensity.basis"] = record.intensity_basis
        if record.market_g_per_kwh:
            a["wattspan.co2e.market_g"] = float(record.co2e_market_g)
        if record.marginal_g_per_kwh:
            a["wattspan.co2e.marginal_g"] = float(record.co2e_marginal_g)
    if record.energy_j_high > 0:
        a["wattspan.energy_j.low"] = float(record.energy_j_low)
        a["wattspan.energy_j.high"] = float(record.energy_j_high)
    if record.quality:
        a["wattspan.quality"] = record.quality
    return a


_PENDING = {"wattspan.status": "pending"}


class _Faults:
    """Counts failures; logs each kind with its traceback the first time only (a broken
    exporter must not flood the log once per span)."""

    __slots__ = ("counts", "_seen")

    def __init__(self, counts: dict) -> None:
        self.counts = counts
        self._seen: set[str] = set()

    def __call__(self, what: str, counter: str = "errors") -> None:
        self.counts[counter] += 1
        if what not in self._seen:
            self._seen.add(what)
            log.exception("wattspan: %s (logged once; counted in stats())", what)


def _with_attributes(span: ReadableSpan, extra: Mapping[str, Any]) -> ReadableSpan:
    """A copy of the ended ``span`` with ``extra`` merged into its attributes.

    Everything else is the original's (events and links keep their dropped
    counts; the attribute dropped count carries over). The copy's attributes
    are not subject to the span's attribute limit: wattspan's are added even
    to a span that was full.
    """
    merged = dict(span.attributes or {})
    merged.update(extra)  # the span's own values are clean already; ours are primitives
    attrs: Mapping[str, Any] = merged
    if span.dropped_attributes:  # keep the count, at the cost of re-validating every value
        attrs = BoundedAttributes(None, merged, immutable=True)
        attrs.dropped = span.dropped_attributes
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attrs,
        events=getattr(span, "_events", None) or span.events,
        links=getattr(span, "_links", None) or span.links,
        kind=span.kind,
        instrumentation_info=getattr(span, "_instrumentation_info", None),
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _span_id_of(span_or_context) -> int:
    """The span id of an int, a SpanContext or a Span (0 when there is none to wait for)."""
    if isinstance(span_or_context, int):
        return span_or_context
    if hasattr(span_or_context, "get_span_context"):
        if not span_or_context.is_recording():  # on_end is never called for it
            return 0
        span_or_context = span_or_context.get_span_context()
    if isinstance(span_or_context, _trace_api.SpanContext):
        return span_or_context.span_id if span_or_context.is_valid else 0
    raise TypeError(f"expect() takes a span id (int), a SpanContext or a Span, not {type(span_or_context).__name__}")


# ---------------------------------------------------------------------------- the span processor


class EnergySpanProcessor(SpanProcessor):
    """Holds metered server spans until their energy is known, then passes them on.

    ``downstream``: the processor that exports (``BatchSpanProcessor(exporter)``).
    Add this processor to the ``TracerProvider`` *instead of* ``downstream``.

    * :meth:`expect` at request start marks a span as one wattspan meters;
    * :meth:`on_end` passes unmarked spans straight on, and holds marked ones;
    * :meth:`resolve` (any thread) merges the record's attributes into the held
      span and passes it on; a record that comes before its span ends is kept
      and applied when it ends.

    A span held longer than ``hold_timeout_s`` seconds goes on marked
    ``wattspan.status="pending"`` (a background thread wakes at each deadline),
    as does the oldest held span when more than ``max_held`` are held. At most
    ``max_expected`` spans are marked at once (spans still running); beyond
    that the oldest mark is forgotten and that span goes on without energy.
    ``force_flush`` and ``shutdown`` pass on every held span (pending) and then
    delegate. All operations are O(1) per span and thread-safe; none raises:
    failures are counted in :meth:`stats` and logged.
    """

    def __init__(
        self,
        downstream: SpanProcessor,
        *,
        hold_timeout_s: float = 5.0,
        max_held: int = 10_000,
        max_expected: int = 100_000,
    ) -> None:
        if not callable(getattr(downstream, "on_end", None)):
            raise TypeError(
                f"downstream must be a SpanProcessor (e.g. BatchSpanProcessor(exporter)), not {type(downstream).__name__}"
            )
        if not (isinstance(hold_timeout_s, (int, float)) and math.isfinite(hold_timeout_s) and hold_timeout_s > 0):
            raise ValueError(f"hold_timeout_s must be a finite number of seconds > 0, got {hold_timeout_s!r}")
        for name, v in (("max_held", max_held), ("max_expected", max_expected)):
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.downstream = downstream
        self.hold_timeout_s = float(hold_timeout_s)
        self.max_held = max_held
        self.max_expected = max_expected
        self._early_ttl_s = max(60.0, self.hold_timeout_s)
        self._cond = threading.Condition(threading.Lock())
        self._expected: OrderedDict[int, None] = OrderedDict()
        self._held: OrderedDict[int, tuple[ReadableSpan, float]] = OrderedDict()  # deadline order
        self._early: OrderedDict[int, tuple[dict, float]] = OrderedDict()
        self._gone: OrderedDict[int, None] = OrderedDict()  # recently passed on as pending
        self._thread: threading.Thread | None = None
        self._closed = False
        self._counts = dict.fromkeys(
            (
                "final",  # passed on with energy
                "pending_timeout",  # passed on without: hold_timeout_s ran out
                "pending_overflow",  # ... more than max_held held
                "pending_flush",  # ... force_flush or shutdown
                "expect_evicted",  # marks forgotten: more than max_expected spans running
                "early",  # records that came before their span ended
                "early_expired",  # ... whose span never ended in time
                "late",  # records for spans already passed on as pending
                "unmatched",  # records for spans never marked
                "errors",
            ),
            0,
        )
        self._fault = _Faults(self._counts)

    # -------------------------------------------------------------- marks and records

    def expect(self, span_or_context) -> None:
        """Mark a server span (its id, SpanContext or the Span) as metered: hold it at its end."""
        try:
            sid = _span_id_of(span_or_context)
        except TypeError:
            self._fault("EnergySpanProcessor.expect got a bad argument")
            return
        if not sid:
            return
        with self._cond:
            if self._closed:
                return
            exp = self._expected
            exp[sid] = None
            if len(exp) > self.max_expected:
                exp.popitem(last=False)
                self._counts["expect_evicted"] += 1

    def resolve(self, span_id: int, attributes: Mapping[str, Any]) -> None:
        """The record of span ``span_id`` is final: pass the span on with ``attributes``."""
        out: list[ReadableSpan] = []
        try:
            attrs = dict(attributes)
            attrs.setdefault("wattspan.status", "final")
            now = _monotonic()
            with self._cond:
                item = self._held.pop(span_id, None)
                if item is not None:
                    out.append(_with_attributes(item[0], attrs))
                    self._counts["final"] += 1
                elif span_id in self._expected and not self._closed:
                    early = self._early
                    early[span_id] = (attrs, now + self._early_ttl_s)
                    early.move_to_end(span_id)
                    self._counts["early"] += 1
                    if len(early) > self.max_held:
                        early.popitem(last=False)
                        self._counts["early_expired"] += 1
                elif span_id in self._gone:
                    self._counts["late"] += 1
                else:
                    self._counts["unmatched"] += 1
                self._expire_locked(now, out)
        except Exception:
            self._fault("EnergySpanProcessor.resolve failed")
        self._forward(out)

    # -------------------------------------------------------------- SpanProcessor

    def on_start(self, span, parent_context=None) -> None:
        fn = getattr(self.downstream, "on_start", None)
        if fn is None:
            return
        try:
            fn(span, parent_context=parent_context)
        except Exception:
            self._fault("downstream on_start failed")

    def _on_ending(self, span) -> None:
        fn = getattr(self.downstream, "_on_ending", None)
        if fn is None:
            return
        try:
            fn(span)
        except Exception:
            self._fault("downstream _on_ending failed")

    def on_end(self, span: ReadableSpan) -> None:
        out: list[ReadableSpan] = []
        try:
            ctx = span.context
            sid = ctx.span_id if ctx is not None else 0
            now = _monotonic()
            with self._cond:
                if sid in self._expected:
                    del self._expected[sid]
                    early = self._early.pop(sid, None)
                    if early is not None:
                        out.append(_with_attributes(span, early[0]))
                        self._counts["final"] += 1
                    elif self._closed:
                        out.append(self._pending(sid, span, "pending_flush"))
                    else:
                        held = self._held
                        if not held:
                            self._cond.notify()
                        held[sid] = (span, now + self.hold_timeout_s)
                        if len(held) > self.max_held:
                            osid, (ospan, _) = held.popitem(last=False)
                            out.append(self._pending(osid, ospan, "pending_overflow"))
                        if self._thread is None or not self._thread.is_alive():
                            self._start_thread()
                else:
                    out.append(span)
                self._expire_locked(now, out)
        except Exception:
            self._fault("EnergySpanProcessor.on_end failed; passing the span on as it is")
            if not out:
                out.append(span)
        self._forward(out)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Pass on every held span (``pending``), then flush ``downstream``."""
        self._forward(self._take_all())
        try:
            return bool(self.downstream.force_flush(timeout_millis))
        except Exception:
            self._fault("downstream force_flush failed")
            return False

    def shutdown(self) -> None:
        """Pass on every held span (``pending``), stop the timer, shut ``downstream`` down."""
        with self._cond:
            self._closed = True
            self._expected.clear()
            self._early.clear()
            self._cond.notify_all()
        self._forward(self._take_all())
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(5.0)
        try:
            self.downstream.shutdown()
        except Exception:
            self._fault("downstream shutdown failed")

    # -------------------------------------------------------------- introspection

    def stats(self) -> dict[str, int]:
        """Counters (see ``__init__``) and the current ``held``, ``expected`` and ``early`` sizes."""
        with self._cond:
            return dict(self._counts, held=len(self._held), expected=len(self._expected), early=len(self._early))

    # -------------------------------------------------------------- internals

    def _pending(self, sid: int, span: ReadableSpan, why: str) -> ReadableSpan:
        self._counts[why] += 1
        gone = self._gone
        gone[sid] = None
        if len(gone) > self.max_held:
            gone.popitem(last=False)
        return _with_attributes(span, _PENDING)

    def _expire_locked(self, now: float, out: list) -> None:
        held = self._held
        while held:
            sid, (span, deadline) = next(iter(held.items()))
            if deadline > now:
                break
            del held[sid]
            out.append(self._pending(sid, span, "pending_timeout"))
        early = self._early
        while early:
            sid, (_, deadline) = next(iter(early.items()))
            if deadline > now:
                break
            del early[sid]
            self._counts["early_expired"] += 1

    def _take_all(self) -> list[ReadableSpan]:
        with self._cond:
            out = [self._pending(sid, span, "pending_flush") for sid, (span, _) in self._held.items()]
            self._held.clear()
            return out

    def _forward(self, spans: list[ReadableSpan]) -> None:
        on_end = self.downstream.on_end
        for s in spans:
            try:
                on_end(s)
            except Exception:
                self._fault("downstream on_end failed")

    def _start_thread(self) -> None:
        th = threading.Thread(target=self._run, name="wattspan-span-hold", daemon=True)
        self._thread = th
        th.start()

    def _run(self) -> None:
        cond = self._cond
        while True:
            out: list[ReadableSpan] = []
            with cond:
                if self._closed:
                    return
                if not self._held:
                    cond.wait()
                    continue
                delay = next(iter(self._held.values()))[1] - _monotonic()
                if delay > 0:
                    cond.wait(delay)
                    continue
                try:
                    self._expire_locked(_monotonic(), out)
                except Exception:  # pragma: no cover - defensive: never let the timer die
                    self._fault("span hold timer failed")
            self._forward(out)


# ---------------------------------------------------------------------------- metrics


def _status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code <= 599 else "unknown"


def _per_key(value, key: str) -> list[tuple[float, dict]]:
    """Observations from a health() entry: a number, or a mapping name -> number."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [(float(v), {key: str(k)}) for k, v in value.items() if v is not None]
    return [(float(value), {})]


class EnergyMetrics:
    """Energy and carbon metrics from final records and device readings.

    ``meter_provider``: where the instruments live (default: the global one).
    ``max_tenants``: distinct ``wattspan.tenant`` values admitted; later new
    tenants are reported as ``"other"`` (counted in :meth:`stats`).
    ``health``: a callable returning the sampler's ``health()`` dict
    (``poll_errors`` per source, ``dropped_rows`` per device,
    ``last_poll_age_s``), read at each collection.

    :meth:`observe` takes each final :class:`~wattspan.RequestRecord` (give it
    to the meter as a sink); :meth:`observe_device` the devices' running
    totals. Neither raises: bad input and failures are counted in :meth:`stats`.
    """

    def __init__(
        self,
        meter_provider=None,
        *,
        max_tenants: int = 100,
        health: Callable[[], Mapping] | None = None,
        max_devices: int = 256,
    ) -> None:
        if not (isinstance(max_tenants, int) and max_tenants >= 1):
            raise ValueError(f"max_tenants must be an integer >= 1, got {max_tenants!r}")
        if not (isinstance(max_devices, int) and max_devices >= 1):
            raise ValueError(f"max_devices must be an integer >= 1, got {max_devices!r}")
        if health is not None and not callable(health):
            raise TypeError("health must be a callable returning the sampler's health() dict, e.g. meter.sampler.health")
        from . import __version__

        mp = meter_provider if meter_provider is not None else _metrics_api.get_meter_provider()
        m = mp.get_meter("wattspan", __version__)
        self.health = health
        self.max_devices = max_devices
        self._tenants = Cardinality(max_tenants)
        self._models = Cardinality(max_tenants)  # any client can name a model: bounded like tenants
        self._lock = threading.Lock()
        self._devices: dict[str, tuple[str, float | None, float | None, float | None]] = {}
        self._counts = {"observed": 0, "invalid": 0, "errors": 0, "devices_dropped": 0}
        self._fault = _Faults(self._counts)
        self._energy = m.create_counter("wattspan.energy", unit="J", description="Accelerator energy of finished requests")
        self._co2e = m.create_counter("wattspan.co2e", unit="g", description="CO2e of finished requests (operational + embodied)")
        self._req_energy = m.create_histogram(
            "wattspan.request.energy",
            unit="J",
            description="Accelerator energy per request",
            explicit_bucket_boundaries_advisory=ENERGY_BUCKETS_J,
        )
        self._req_co2e = m.create_histogram(
            "wattspan.request.co2e",
            unit="g",
            description="CO2e per request",
            explicit_bucket_boundaries_advisory=CO2E_BUCKETS_G,
        )
        m.create_observable_counter("hw.energy", callbacks=[self._cb_hw_energy], unit="J", description="Energy consumed by the component")
        m.create_observable_gauge("hw.power", callbacks=[self._cb_hw_power], unit="W", description="Instantaneous power consumed by the component")
        m.create_observable_counter(
            "wattspan.unattributed.energy",
            callbacks=[self._cb_unattributed],
            unit="J",
            description="Measured device energy not charged to any request",
        )
        m.create_observable_gauge(
            "wattspan.sampler.poll_errors", callbacks=[self._cb_poll_errors], unit="1", description="Failed sensor polls, per source"
        )
        m.create_observable_gauge(
            "wattspan.sampler.dropped",
            callbacks=[self._cb_dropped],
            unit="1",
            description="Power readings overwritten before use (buffer full), per device",
        )
        m.create_observable_gauge(
            "wattspan.sampler.poll_age", callbacks=[self._cb_poll_age], unit="s", description="Seconds since the sampler's last poll"
        )

    # -------------------------------------------------------------- feeding

    def _attrs(self, record: RequestRecord) -> dict[str, Any] | None:
        e, c = float(record.energy_j), float(record.co2e_g)
        if not (math.isfinite(e) and math.isfinite(c) and e >= 0 and c >= 0):
            self._counts["invalid"] += 1
            return None
        attrs: dict[str, Any] = {
            "http.route": record.route or "(unknown)",
            "http.request.method": record.http_method or "_OTHER",
            "wattspan.status_class": _status_class(int(record.status_code)),
            "hw.id": record.device,
            "wattspan.simulated": bool(record.simulated),
        }
        if record.model:
            attrs["gen_ai.request.model"] = self._models(record.model)
        if record.tenant:
            attrs["wattspan.tenant"] = self._tenants(record.tenant)
        return attrs

    def observe(self, record: RequestRecord) -> None:
        """Count one final record (a :class:`~wattspan.Meter` sink)."""
        self.observe_many((record,))

    def observe_many(self, records) -> None:
        """Count a batch of final records (the meter hands over each pass's at once).

        The counters get one addition per distinct label set of the batch; the
        histograms one measurement per record. Same totals as ``observe`` on
        each, at a fraction of the SDK calls.
        """
        try:
            sums: dict[tuple, list] = {}
            for record in records:
                attrs = self._attrs(record)
                if attrs is None:
                    continue
                e, c = float(record.energy_j), float(record.co2e_g)
                self._req_energy.record(e, attrs)
                self._req_co2e.record(c, attrs)
                # the counters per device: a device group's request adds each member's part
                # under its own hw.id (its host energy and the carbon in proportion)
                split = [(attrs, e, c)]
                if record.device_energy:
                    parts = record.device_energy_j
                    tot = sum(parts.values())
                    if parts and tot > 0 and all(math.isfinite(v) and v >= 0 for v in parts.values()):
                        split = [({**attrs, "hw.id": d}, e * v / tot, c * v / tot) for d, v in parts.items()]
                for at, ei, ci in split:
                    key = tuple(at.items())
                    acc = sums.get(key)
                    if acc is None:
                        sums[key] = [ei, ci, at]
                    else:
                        acc[0] += ei
                        acc[1] += ci
                self._counts["observed"] += 1
            for e, c, attrs in sums.values():
                self._energy.add(e, attrs)
                self._co2e.add(c, attrs)
        except Exception:
            self._fault("EnergyMetrics.observe failed")

    __call__ = observe

    def observe_device(
        self,
        device_id: str,
        energy_j_total: float | None,
        power_w: float | None = None,
        *,
        unattributed_j_total: float | None = None,
        device_type: str = "gpu",
    ) -> None:
        """The latest running totals of one device: energy since start (J), power now (W),
        and measured energy charged to no request (J). ``None`` leaves a value unreported."""
        try:
            vals = []
            for v in (energy_j_total, power_w, unattributed_j_total):
                if v is not None:
                    v = float(v)
                    if not (math.isfinite(v) and v >= 0):
                        self._counts["invalid"] += 1
                        v = None
                vals.append(v)
            key = str(device_id)
            with self._lock:
                if key not in self._devices and len(self._devices) >= self.max_devices:
                    self._counts["devices_dropped"] += 1
                    return
                self._devices[key] = (str(device_type), *vals)
        except Exception:
            self._fault("EnergyMetrics.observe_device failed")

    def stats(self) -> dict[str, int]:
        """``observed``, ``invalid``, ``errors``, ``devices_dropped``, ``tenants_overflowed``."""
        return dict(self._counts, tenants_overflowed=self._tenants.overflowed, models_overflowed=self._models.overflowed)

    # -------------------------------------------------------------- callbacks

    def _device_obs(self, i: int, with_type: bool):
        from opentelemetry.metrics import Observation

        with self._lock:
            items = list(self._devices.items())
        out = []
        for dev, row in items:
            v = row[i]
            if v is None:
                continue
            attrs = {"hw.id": dev, "hw.type": row[0]} if with_type else {"hw.id": dev}
            out.append(Observation(v, attrs))
        return out

    def _cb_hw_energy(self, options):
        return self._safe(lambda: self._device_obs(1, True))

    def _cb_hw_power(self, options):
        return self._safe(lambda: self._device_obs(2, True))

    def _cb_unattributed(self, options):
        return self._safe(lambda: self._device_obs(3, False))

    def _health_obs(self, entry: str, key: str):
        from opentelemetry.metrics import Observation

        if self.health is None:
            return []
        h = self.health() or {}
        return [Observation(v, a) for v, a in _per_key(h.get(entry), key)]

    def _cb_poll_errors(self, options):
        return self._safe(lambda: self._health_obs("poll_errors", "wattspan.source"))

    def _cb_dropped(self, options):
        return self._safe(lambda: self._health_obs("dropped_rows", "hw.id"))

    def _cb_poll_age(self, options):
        return self._safe(lambda: self._health_obs("last_poll_age_s", "hw.id"))

    def _safe(self, fn):
        try:
            return fn()
        except Exception:
            self._fault("a metrics callback failed")
            return []


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


def _load_exporter(group: str, name: str, var: str):
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


def _span_exporters_from_env() -> list:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return []
    return [_load_exporter("opentelemetry_traces_exporter", n, "OTEL_TRACES_EXPORTER")() for n in _exporter_names("traces")]


def install(
    tracer_provider=None,
    *,
    exporter=None,
    hold_timeout_s: float = 5.0,
    max_held: int = 10_000,
    meter=None,
) -> EnergySpanProcessor:
    """Add an :class:`EnergySpanProcessor` exporting to ``exporter`` to a TracerProvider.

    ``tracer_provider``: an SDK ``TracerProvider`` (default: the global one,
    which must be an SDK provider). ``exporter``: a ``SpanExporter`` (default:
    the ones ``OTEL_TRACES_EXPORTER`` / ``OTEL_EXPORTER_OTLP_*`` name). Each is
    wrapped ``EnergySpanProcessor(BatchSpanProcessor(exporter))``; do not add
    the same exporter to the provider yourself, or every span goes out twice.
    ``meter``: a :class:`wattspan.Meter` whose records resolve the spans
    (its ``span_processor`` is set). Returns the processor.
    """
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = tracer_provider if tracer_provider is not None else _trace_api.get_tracer_provider()
    if not callable(getattr(provider, "add_span_processor", None)):
        raise TypeError(
            f"install() needs an SDK TracerProvider, got {type(provider).__name__}: create one "
            "(opentelemetry.sdk.trace.TracerProvider), set it with trace.set_tracer_provider(), "
            "or use wattspan.otel.configure_from_env()"
        )
    exporters = [exporter] if exporter is not None else _span_exporters_from_env()
    if not exporters:
        raise ValueError("install(): no exporter given and OTEL_TRACES_EXPORTER=none (or OTEL_SDK_DISABLED): nothing to export to")
    if len(exporters) == 1:
        downstream = BatchSpanProcessor(exporters[0])
    else:
        downstream = SynchronousMultiSpanProcessor()
        for e in exporters:
            downstream.add_span_processor(BatchSpanProcessor(e))
    proc = EnergySpanProcessor(downstream, hold_timeout_s=hold_timeout_s, max_held=max_held)
    provider.add_span_processor(proc)
    if meter is not None:
        meter.span_processor = proc
    return proc


@dataclass(frozen=True)
class OTelSetup:
    """What :func:`configure_from_env` built. ``span_processor`` is ``None`` when traces
    are off; ``prometheus_address`` is ``(host, port)`` when the Prometheus endpoint
    serves. :meth:`shutdown` flushes and stops everything it started."""

    tracer_provider: Any
    meter_provider: Any
    span_processor: EnergySpanProcessor | None
    metrics: EnergyMetrics
    prometheus_address: tuple[str, int] | None = None
    _servers: tuple = field(default=(), repr=False)

    def shutdown(self) -> None:
        for fn in (self.tracer_provider.shutdown, self.meter_provider.shutdown):
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
    resource=None,
    hold_timeout_s: float = 5.0,
    max_tenants: int = 100,
    health: Callable[[], Mapping] | None = None,
    meter=None,
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
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    res = resource if resource is not None else Resource.create()
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE
    span_exporters = _span_exporters_from_env()
    readers = []
    servers = []
    prom_addr = None
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
        for server, thread in servers:
            server.shutdown()
            server.server_close()
        raise

    tp = TracerProvider(resource=res)
    proc = None
    if span_exporters:
        if len(span_exporters) == 1:
            downstream = BatchSpanProcessor(span_exporters[0])
        else:
            downstream = SynchronousMultiSpanProcessor()
            for e in span_exporters:
                downstream.add_span_processor(BatchSpanProcessor(e))
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
        meter.span_processor = proc
        connect_metrics(meter, em)
    return OTelSetup(tp, mp, proc, em, prom_addr, tuple(servers))


def connect_metrics(meter, metrics: "EnergyMetrics") -> None:
    """Feed ``metrics`` from ``meter``: every final record, and each device's
    measured and unattributed energy and power after every attribution pass."""
    meter.batch_sinks.append(metrics.observe_many)
    meter.device_sinks.append(
        lambda dev, kind, energy_j, power_w, unattributed_j: metrics.observe_device(
            dev, energy_j, power_w, unattributed_j_total=unattributed_j, device_type=kind
        )
    )


def wrap_provider(tracer_provider=None, *, meter=None, hold_timeout_s: float = 5.0, max_held: int = 10_000) -> EnergySpanProcessor:
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
    multi = getattr(provider, "_active_span_processor", None)
    if multi is None or not hasattr(multi, "_span_processors"):
        raise TypeError(f"wrap_provider() needs an SDK TracerProvider, got {type(provider).__name__}")
    with multi._lock:
        existing = tuple(multi._span_processors)
        inner = SynchronousMultiSpanProcessor()
        for p in existing:
            inner.add_span_processor(p)
        proc = EnergySpanProcessor(inner, hold_timeout_s=hold_timeout_s, max_held=max_held)
        multi._span_processors = (proc,)
    if meter is not None:
        meter.span_processor = proc
    return proc
