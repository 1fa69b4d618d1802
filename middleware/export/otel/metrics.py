"""Energy metrics per endpoint, model and tenant: :class:`EnergyMetrics`.

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

``wattspan.energy`` / ``wattspan.request.energy`` count the accelerator's energy (the record's
``energy_j``); ``wattspan.co2e`` / ``wattspan.request.co2e`` the record's ``co2e_g``, which prices
accelerator + host energy (host where a host source was metered; see :mod:`wattspan.carbon.records`).

Nothing here raises into the request path or the meter's thread: failures are
logged once, counted (``stats()``), and the span goes on unchanged.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import reduce
from typing import Any, cast

import numpy as np

try:
    from opentelemetry import metrics as _metrics_api
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.util.types import AttributeValue
except ImportError as exc:  # pragma: no cover - exercised without the otel extra
    raise ImportError("wattspan.export.otel needs the OpenTelemetry SDK: pip install 'wattspan[otel]'") from exc

from ...logs import get_logger
from ...meter.sinks import DeviceFigures
from ...records import Cardinality, RecordBatch, RequestRecord
from ._bulk import BulkHistogram
from ._faults import _Faults

__all__ = ["EnergyMetrics", "ENERGY_BUCKETS_J", "CO2E_BUCKETS_G"]

log = get_logger(__name__)

#: Histogram bucket bounds: per-request accelerator energy spans ~10 mJ (an
#: embedding) to kJ (a long generation on a big GPU).
ENERGY_BUCKETS_J = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
#: ... and its carbon, micrograms to grams.
CO2E_BUCKETS_G = (1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
#: label sets of a request metric past which a new set's tenant and model are counted as ``other``, and the
#: bound past which its route is too: under the OpenTelemetry SDK's 2,000 a metric (its cardinality limit)
LABEL_SETS, LABEL_SETS_HARD = 1_500, 1_900


# ---------------------------------------------------------------------------- metrics


# the fields a record's metric label set is made of, in _labels' argument order
_KEY_FIELDS = ("route", "http_method", "status_code", "device", "simulated", "model", "tenant")


def _status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code <= 599 else "unknown"


def _per_key(value: float | Mapping[str, float | None] | None, key: str) -> list[tuple[float, dict[str, str]]]:
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
        meter_provider: MeterProvider | None = None,
        *,
        max_tenants: int = 100,
        health: Callable[[], Mapping[str, Any]] | None = None,
        max_devices: int = 256,
    ) -> None:
        if not (isinstance(max_tenants, int) and max_tenants >= 1):
            raise ValueError(f"max_tenants must be an integer >= 1, got {max_tenants!r}")
        if not (isinstance(max_devices, int) and max_devices >= 1):
            raise ValueError(f"max_devices must be an integer >= 1, got {max_devices!r}")
        if health is not None and not callable(health):
            raise TypeError("health must be a callable returning the sampler's health() dict, e.g. meter.sampler.health")
        from ... import __version__

        mp = meter_provider if meter_provider is not None else _metrics_api.get_meter_provider()
        m = mp.get_meter("wattspan", __version__)
        self._provider = mp
        self.health = health
        self.max_devices = max_devices
        self._tenants = Cardinality(max_tenants)
        self._models = Cardinality(max_tenants)  # any client can name a model: bounded like tenants
        self._lock = threading.Lock()
        self._devices: dict[str, tuple[str, float | None, float | None, float | None]] = {}
        self._counts = {"observed": 0, "invalid": 0, "errors": 0, "devices_dropped": 0, "flush_overran": 0, "label_sets_folded": 0}
        self._sets: set[tuple[Any, ...]] = set()  # the label sets handed to the SDK (see _labels)
        self._fault = _Faults(self._counts)
        self._energy = m.create_counter("wattspan.energy", unit="J", description="Accelerator energy of finished requests")
        self._co2e = m.create_counter("wattspan.co2e", unit="g", description="CO2e of finished requests (operational over accelerator + host energy, + embodied)")
        self._req_energy = BulkHistogram(m.create_histogram(
            "wattspan.request.energy",
            unit="J",
            description="Accelerator energy per request",
            explicit_bucket_boundaries_advisory=ENERGY_BUCKETS_J,
        ))
        self._req_co2e = BulkHistogram(m.create_histogram(
            "wattspan.request.co2e",
            unit="g",
            description="CO2e per request",
            explicit_bucket_boundaries_advisory=CO2E_BUCKETS_G,
        ))
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

    def _labels(self, route: str | None, method: str | None, status: int, device: str, simulated: bool,
                model: str | None, tenant: str | None) -> dict[str, AttributeValue]:
        """The label set of a record with these fields (model and tenant capped)."""
        attrs: dict[str, AttributeValue] = {
            "http.route": route or "(unknown)",
            "http.request.method": method or "_OTHER",
            "wattspan.status_class": _status_class(int(status)),
            "hw.id": device,
            "wattspan.simulated": bool(simulated),
        }
        if model:
            attrs["gen_ai.request.model"] = self._models(model)
        if tenant:
            attrs["wattspan.tenant"] = self._tenants(tenant)
        # the label sets together stay under the SDK's 2,000 a metric (past it every new set is one unlabelled
        # "otel.metric.overflow" series, a new route's included): tenants and models are capped one by one,
        # but their product is not; past LABEL_SETS tenant and model fold into "other", past the hard bound
        # the route too, each counted (label_sets_folded)
        sets = self._sets
        full = tuple(attrs.values())
        if full not in sets:
            if len(sets) >= LABEL_SETS:
                self._counts["label_sets_folded"] += 1
                for k in ("gen_ai.request.model", "wattspan.tenant"):
                    if k in attrs:
                        attrs[k] = "other"
                if len(sets) >= LABEL_SETS_HARD and tuple(attrs.values()) not in sets:
                    attrs["http.route"] = "other"
                full = tuple(attrs.values())
            sets.add(full)
        return attrs

    def observe(self, record: RequestRecord) -> None:
        """Count one final record (a :class:`~wattspan.Meter` sink)."""
        self.observe_many((record,))

    def observe_many(self, records: Iterable[RequestRecord]) -> None:
        """Count a batch of final records (the meter hands over each pass's at once).

        The records are grouped by label set first; then each counter gets one
        addition per label set, and each histogram the label set's values in one
        step (:class:`~wattspan.export.otel._bulk.BulkHistogram`: into the SDK's
        aggregation at once, or one ``record`` per value where it cannot). The
        same totals, bucket counts, minima and maxima as one ``observe`` per
        record, at a fraction of the work. A meter pass's
        :class:`~wattspan.records.RecordBatch` is grouped from its columns (no record object built).
        """
        try:
            if type(records) is RecordBatch and self._observe_batch(records):
                return
            # the batch's label sets: raw labels -> [J, g, attributes, counted, J values, g values]
            groups: dict[tuple[Any, ...], list[Any]] = {}
            isfinite = math.isfinite
            invalid = observed = 0
            for record in records:
                e, c = float(record.energy_j), float(record.co2e_g)
                if not (isfinite(e) and isfinite(c) and e >= 0 and c >= 0):
                    invalid += 1
                    continue
                key = (record.route, record.http_method, record.status_code, record.device, record.simulated, record.model, record.tenant)
                acc = groups.get(key)
                if acc is None:
                    acc = groups[key] = [0.0, 0.0, None, False, [], []]
                acc[4].append(e)
                acc[5].append(c)
                observed += 1
                # the counters per device: a device group's request adds each member's part
                # under its own hw.id (its host energy and the carbon in proportion)
                parts = record.device_energy_j if record.device_energy else None
                tot = sum(parts.values()) if parts else 0.0
                if parts and tot > 0 and all(isfinite(v) and v >= 0 for v in parts.values()):
                    for d, v in parts.items():
                        mkey = key[:3] + (d,) + key[4:]
                        macc = groups.get(mkey)
                        if macc is None:
                            macc = groups[mkey] = [0.0, 0.0, None, False, [], []]
                        macc[0] += e * v / tot
                        macc[1] += c * v / tot
                        macc[3] = True
                else:
                    acc[0] += e
                    acc[1] += c
                    acc[3] = True
            self._counts["invalid"] += invalid
            self._counts["observed"] += observed
            for key, (e, c, _, counted, es, cs) in groups.items():
                attrs = self._labels(*key)
                if es:  # a device group's own label set carries its histograms only
                    self._req_energy.record_many(es, attrs)
                    self._req_co2e.record_many(cs, attrs)
                if counted:
                    self._energy.add(e, attrs)
                    self._co2e.add(c, attrs)
        except Exception:
            self._fault("EnergyMetrics.observe failed")

    def _observe_batch(self, batch: RecordBatch) -> bool:
        """:meth:`observe_many` of a batch from its columns: what the loop over its records adds,
        in the same order. False, with nothing added, where that loop's slower branches would be
        taken (a device group's request, a value not finite or negative)."""
        const, columns = batch.const, batch.columns
        if "device_energy" in columns or const["device_energy"]:
            return False  # a device group's request adds each member's part under its own hw.id
        n = len(batch)
        if not n:
            return True
        es, cs = batch.column("energy_j"), batch.column("co2e_g")
        ea, ca = np.asarray(es, dtype=float), np.asarray(cs, dtype=float)
        if not (np.isfinite(ea).all() and np.isfinite(ca).all() and (ea >= 0).all() and (ca >= 0).all()):
            return False  # counted one by one as invalid
        if type(es[0]) is not float or type(cs[0]) is not float:
            es, cs = ea.tolist(), ca.tolist()
        groups: dict[tuple[Any, ...], tuple[list[float], list[float]]]
        if not any(k in columns for k in _KEY_FIELDS):  # one label set (the usual pass)
            groups = {tuple(const[k] for k in _KEY_FIELDS): (es, cs)}
        else:
            groups = {}
            get = groups.get
            for key, e, c in zip(zip(*(batch.column(k) for k in _KEY_FIELDS)), es, cs):
                acc = get(key)
                if acc is None:
                    acc = groups[key] = ([], [])
                acc[0].append(e)
                acc[1].append(c)
        self._counts["observed"] += n
        add = operator.add
        for key, (ge, gc) in groups.items():
            attrs = self._labels(*key)
            self._req_energy.record_many(ge, attrs)
            self._req_co2e.record_many(gc, attrs)
            # summed from 0.0 in record order: the same float as the loop's += per record
            self._energy.add(reduce(add, ge, 0.0), attrs)
            self._co2e.add(reduce(add, gc, 0.0), attrs)
        return True

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
            vals: list[float | None] = []
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
                self._devices[key] = (str(device_type), vals[0], vals[1], vals[2])
        except Exception:
            self._fault("EnergyMetrics.observe_device failed")

    # ------------------------------------------------------------ wattspan.RecordSink

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        """RecordSink: a meter pass's final records (see :meth:`observe_many`)."""
        self.observe_many(records)

    def on_device(self, figures: DeviceFigures) -> None:
        """RecordSink: one device's running totals after a meter pass."""
        self.observe_device(figures.device, figures.energy_j, figures.power_w,
                            unattributed_j_total=figures.unattributed_j, device_type=figures.kind)

    def flush(self, timeout: float) -> bool | None:
        """FlushableSink (the meter's drain at shutdown): export what the provider's readers hold now,
        within ``timeout`` s. A server stopped by SIGTERM never runs the SDK's ``atexit`` flush (uvicorn
        re-raises the signal), which lost up to one export interval (60 s by default) of counters."""
        force = getattr(self._provider, "force_flush", None)  # the API's no-op and proxy providers have none
        if not callable(force):
            return None
        # bounded here: the SDK's OTLP exporters wait on their own timeout (10 s, OTEL_EXPORTER_OTLP_TIMEOUT)
        # whatever the flush is given, which with a dead or silent collector held a shutdown 9-19 s past its time
        box: list[bool] = []

        def run() -> None:
            try:
                box.append(bool(force(timeout_millis=int(max(0.1, timeout) * 1000))))
            except Exception:
                self._counts["errors"] += 1
                log.exception("wattspan metrics: the flush at shutdown failed")
                box.append(False)

        th = threading.Thread(target=run, name="wattspan-metrics-flush", daemon=True)
        th.start()
        th.join(max(0.0, timeout))
        if box:
            return box[0]
        self._counts["flush_overran"] += 1
        log.warning("wattspan metrics: the flush at shutdown ran past %.1f s (a collector that does not answer?); "
                    "not waited for any longer: what it held may be lost (counted in stats()['flush_overran'])", timeout)
        return False

    def stats(self) -> dict[str, int]:
        """``observed``, ``invalid``, ``errors``, ``devices_dropped``, ``flush_overran`` (a shutdown flush not
        finished in its time), ``label_sets_folded`` (records whose tenant and model, past :data:`LABEL_SETS`
        label sets, were counted as ``other``), ``tenants_overflowed``, ``models_overflowed``."""
        return dict(self._counts, tenants_overflowed=self._tenants.overflowed, models_overflowed=self._models.overflowed)

    # -------------------------------------------------------------- callbacks

    def _device_obs(self, i: int, with_type: bool) -> list[Observation]:
        with self._lock:
            items = list(self._devices.items())
        out: list[Observation] = []
        for dev, row in items:
            v = row[i]
            if v is None:
                continue
            attrs = {"hw.id": dev, "hw.type": row[0]} if with_type else {"hw.id": dev}
            out.append(Observation(cast(float, v), attrs))  # columns after the first (the type) are numbers
        return out

    def _cb_hw_energy(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._device_obs(1, True))

    def _cb_hw_power(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._device_obs(2, True))

    def _cb_unattributed(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._device_obs(3, False))

    def _health_obs(self, entry: str, key: str) -> list[Observation]:
        if self.health is None:
            return []
        h = self.health() or {}
        return [Observation(v, a) for v, a in _per_key(h.get(entry), key)]

    def _cb_poll_errors(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._health_obs("poll_errors", "wattspan.source"))

    def _cb_dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._health_obs("dropped_rows", "hw.id"))

    def _cb_poll_age(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._safe(lambda: self._health_obs("last_poll_age_s", "hw.id"))

    def _safe(self, fn: Callable[[], list[Observation]]) -> list[Observation]:
        try:
            return fn()
        except Exception:
            self._fault("a metrics callback failed")
            return []
