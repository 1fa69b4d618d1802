"""Attributed energy columns to :class:`~wattspan.records.RequestRecord` s, with carbon applied once.

:func:`request_records` is the one place where a request's joules become grams: the live
meter (:mod:`wattspan.meter.core`) and ``wattspan attribute`` (:mod:`wattspan.cli.attribute`)
both build their records with it, so a record means the same thing wherever it came from.

The host rule (the same in every output: spans, metrics, ledger, ``wattspan report``, the
demo, the bench): ``energy_j`` is the accelerator's energy alone (``dynamic_j + idle_j``);
``host_j`` is the request's share of host (CPU package) energy, kept apart, and 0 where no
host source was metered (``wattspan attribute`` meters no host). ``co2e_g`` prices
``energy_j + host_j``: operational ``(energy_j + host_j) x PUE x grid intensity`` plus
``embodied_g``. The 90 % band moves only the accelerator's part
(``co2e_g_low`` prices ``energy_j_low + host_j``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ..records import FIELDS, RecordBatch, RequestLabels, RequestRecord
from ..devices import members

if TYPE_CHECKING:
    from ..attribution import Attribution
    from .model import CarbonModel

__all__ = ["attribution_batch", "attribution_records", "request_batch", "request_records"]

_NO_LABELS = RequestLabels()

# The order request_records hands _record its values in: RequestRecord's own field order, the
# labels (RequestLabels, in that order) in the middle and the intensity columns at the end.
_ORDER = ("id", "device", "start_ns", "end_ns", "energy_j", "dynamic_j", "idle_j", "device_s", "co2e_g", "embodied_g",
          "method", "sensor", "coverage", "simulated", *RequestLabels._fields, "host_j", "energy_j_low", "energy_j_high",
          "co2e_g_low", "co2e_g_high", "quality")
if FIELDS[: len(_ORDER)] != _ORDER:  # pragma: no cover - a field added to RequestRecord out of place
    raise ImportError("RequestRecord's fields are not in the order wattspan.carbon.records builds them")


def _column(x: Any, n: int, dtype: Any = float) -> NDArray[Any]:
    a = np.asarray(x, dtype=dtype)
    if a.ndim == 0:
        return np.full(n, a.item(), dtype=dtype)
    if len(a) != n:
        raise ValueError(f"a column has {len(a)} rows for {n} requests")
    return a


def _values(x: Any, n: int, default: Any) -> list[Any]:
    """A per-request column (sequence) or one value for every request, as a list."""
    if x is None:
        return [default] * n
    if isinstance(x, (str, bool, int, float)):
        return [x] * n
    out = list(x)
    if len(out) != n:
        raise ValueError(f"a column has {len(out)} rows for {n} requests")
    return out


def request_records(
    carbon: CarbonModel,
    *,
    ids: Sequence[str],
    device: Sequence[str] | str,
    start_ns: Any,
    end_ns: Any,
    dynamic_j: Any,
    idle_j: Any,
    device_s: Any,
    host_j: Any = 0.0,
    wall_s: Any = None,
    energy_j_low: Any = None,
    energy_j_high: Any = None,
    method: Sequence[str] | str = "",
    sensor: Sequence[str] | str = "",
    coverage: Any = 1.0,
    simulated: Sequence[bool] | bool = False,
    quality: Sequence[str] | str = "",
    labels: Sequence[RequestLabels] | None = None,
    device_energy: Sequence[str] | str = "",
    label_columns: Sequence[Sequence[Any]] | None = None,
) -> list[RequestRecord]:
    """One :class:`RequestRecord` per request, carbon applied once, vectorised over the batch:
    :func:`request_batch`'s records, built (see there for the columns)."""
    return request_batch(
        carbon, ids=ids, device=device, start_ns=start_ns, end_ns=end_ns, dynamic_j=dynamic_j, idle_j=idle_j,
        device_s=device_s, host_j=host_j, wall_s=wall_s, energy_j_low=energy_j_low, energy_j_high=energy_j_high,
        method=method, sensor=sensor, coverage=coverage, simulated=simulated, quality=quality, labels=labels,
        device_energy=device_energy, label_columns=label_columns,
    ).records()


def request_batch(
    carbon: CarbonModel,
    *,
    ids: Sequence[str],
    device: Sequence[str] | str,
    start_ns: Any,
    end_ns: Any,
    dynamic_j: Any,
    idle_j: Any,
    device_s: Any,
    host_j: Any = 0.0,
    wall_s: Any = None,
    energy_j_low: Any = None,
    energy_j_high: Any = None,
    method: Sequence[str] | str = "",
    sensor: Sequence[str] | str = "",
    coverage: Any = 1.0,
    simulated: Sequence[bool] | bool = False,
    quality: Sequence[str] | str = "",
    labels: Sequence[RequestLabels] | None = None,
    device_energy: Sequence[str] | str = "",
    label_columns: Sequence[Sequence[Any]] | None = None,
) -> RecordBatch:
    """The records of a batch of requests, carbon applied once, vectorised over the batch: a
    :class:`~wattspan.records.RecordBatch` (columns; its records built on first use).

    Columns are arrays (or sequences) with one row per request; ``device``, ``method``,
    ``sensor``, ``coverage``, ``simulated``, ``quality`` and ``host_j`` may also be one value
    for all. Units: joules, seconds (``device_s``), nanoseconds (``start_ns``/``end_ns``),
    ``wall_s`` each request's time in unix seconds for the hourly intensity (None: the
    carbon model's yearly value). ``energy_j_low``/``energy_j_high``: the 90 % band on the
    accelerator energy (None: no band, both equal ``energy_j``). ``labels``: each request's
    :class:`~wattspan.records.RequestLabels` (route, method, status, model, tenant, tokens,
    trace and span ids), or None. ``device_energy``: a device group's request's energy per
    member device as JSON (see :attr:`RequestRecord.device_energy`), "" on one device.
    ``label_columns``: instead of ``labels``, the nine RequestLabels fields as columns (in
    that order, a value per request each): no RequestLabels built per request.

    ``co2e_g`` covers ``energy_j + host_j`` (see the module's host rule) plus embodied carbon.
    """
    n = len(ids)
    dyn = _column(dynamic_j, n)
    idle = _column(idle_j, n)
    dev_s = _column(device_s, n)
    host = _column(host_j, n)
    energy = dyn + idle
    it = energy + host
    per = carbon.per_request(it, dev_s, wall_s)
    op, emb = np.asarray(per.operational_g, dtype=float), np.asarray(per.embodied_g, dtype=float)
    e_lo = energy if energy_j_low is None else _column(energy_j_low, n)
    e_hi = energy if energy_j_high is None else _column(energy_j_high, n)
    # the band at the same hourly intensity: operational grams scale with energy
    per_j = np.divide(op, it, out=np.zeros(n), where=it > 0)
    if label_columns is not None and (len(label_columns) != len(RequestLabels._fields) or any(len(c) != n for c in label_columns)):
        raise ValueError(f"label_columns must be {len(RequestLabels._fields)} columns of {n} values")
    labs = _values(labels, n, _NO_LABELS) if label_columns is None else []
    sims = [bool(simulated)] * n if isinstance(simulated, (bool, int, float, np.bool_)) else [bool(x) for x in _values(simulated, n, False)]
    columns = [
        list(ids), _values(device, n, ""), _column(start_ns, n, np.int64), _column(end_ns, n, np.int64), energy, dyn, idle, dev_s,
        op + emb, emb, _values(method, n, ""), _values(sensor, n, ""), _column(coverage, n),
        sims,
        *(label_columns if label_columns is not None else zip(*labs) if n else [[]] * len(RequestLabels._fields)),
        host, np.asarray(e_lo, dtype=float), np.asarray(e_hi, dtype=float), per_j * (e_lo + host) + emb, per_j * (e_hi + host) + emb,
        _values(quality, n, ""), *per.columns(), _values(device_energy, n, ""),
    ]
    return _records(n, columns)


def _records(n: int, columns: Sequence[Any]) -> RecordBatch:
    """The :class:`~wattspan.records.RecordBatch` of ``n`` records from one column per field
    (:data:`FIELDS` order): an array or a sequence of ``n`` values.

    A column with one value throughout (the sensor, the intensity, most labels on a busy
    endpoint) is kept as that one value (``const``); the others as lists of Python values."""
    if len(columns) != len(FIELDS):  # pragma: no cover - a field added to RequestRecord and not here
        raise ValueError(f"{len(columns)} columns for RequestRecord's {len(FIELDS)} fields")
    const: dict[str, Any] = {}
    varying: dict[str, list[Any]] = {}
    for name, col in zip(FIELDS, columns):
        if isinstance(col, np.ndarray):
            if n and bool((col == col[0]).all()):  # NaN is never equal: such a column stays per record
                const[name] = col[:1].tolist()[0]
                continue
            col = col.tolist()
        elif n and col.count(col[0]) == n:
            const[name] = col[0]
            continue
        elif not n:
            col = []
        varying[name] = col if type(col) is list else list(col)
    return RecordBatch(n, const, varying)


def attribution_records(result: Attribution, carbon: CarbonModel, *, host_j: Any = 0.0, wall_s: Any = None,
                        labels: Sequence[RequestLabels] | None = None) -> list[RequestRecord]:
    """The records of an offline :class:`~wattspan.attribution.Attribution`, through :func:`request_records`.

    Route, model and tenant come from the attribution's requests where given (``labels``, when
    passed, win). ``wall_s``: as :func:`request_records` (``wattspan.carbon.wall_times`` of the
    requests' times when those are on the unix clock).
    """
    return attribution_batch(result, carbon, host_j=host_j, wall_s=wall_s, labels=labels).records()


def attribution_batch(result: Attribution, carbon: CarbonModel, *, host_j: Any = 0.0, wall_s: Any = None,
                      labels: Sequence[RequestLabels] | None = None) -> RecordBatch:
    """:func:`attribution_records` as columns (a :class:`~wattspan.records.RecordBatch`): no record
    object per request, for a long run's file (``wattspan attribute``)."""
    r = result.requests
    n = len(r)
    dev = [str(d) for d in r.device]
    # sensor and simulated per request, as the attribution saw its devices (a group: its first member's)
    seen: dict[str, tuple[str, bool]] = {}
    for d in set(dev):
        info = result.devices.get(d) or result.devices.get(members(d)[0]) if d else None
        seen[d] = (info.sensor, bool(info.simulated)) if info else ("none", False)
    label_columns: list[list[Any]] | None = None
    if labels is None and any(c is not None for c in (r.route, r.model, r.tenant)):
        def col(c: Any) -> list[str]:
            return [str(x) for x in c] if c is not None else [""] * n
        d0 = RequestLabels()
        label_columns = [col(r.route), [d0.http_method] * n, [d0.status_code] * n, col(r.model), col(r.tenant),
                         [d0.prompt_tokens] * n, [d0.output_tokens] * n, [d0.trace_id] * n, [d0.span_id] * n]
    return request_batch(
        carbon, ids=[str(x) for x in r.ids], device=dev, start_ns=r.start_ns, end_ns=r.end_ns,
        dynamic_j=result.dynamic_j, idle_j=result.idle_j, device_s=result.device_s, host_j=host_j, wall_s=wall_s,
        energy_j_low=result.energy_j_low, energy_j_high=result.energy_j_high,
        method=[str(m) for m in result.method], sensor=[seen[d][0] for d in dev], coverage=result.coverage,
        simulated=[seen[d][1] for d in dev],
        quality=[str(q) for q in result.quality] if result.quality is not None else "", labels=labels,
        label_columns=label_columns,
    )
