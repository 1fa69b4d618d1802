"""Pure arithmetic of ``wattspan bench``: from measured records to energy and gCO2e at scale.

Nothing here does I/O or reads a clock; every function takes numbers (or arrays) and
returns numbers, so the figures in a bench report can be checked by hand.

Units are in the names: joules (``_j``), kilowatt-hours (``_kwh``), grams CO2e
(``_g``), seconds (``_s``), grid intensity in gCO2e per kWh, PUE dimensionless.

The three ways of counting idle energy (:data:`BASES`):

* ``dynamic``: only the energy above the idle baseline that the requests caused;
* ``attributed``: what wattspan bills each request: dynamic plus its share of the idle
  power *while it was in flight* (``energy_j`` of the records);
* ``amortised``: all idle energy of the run, also the gaps with nothing in flight, spread
  over its requests: what a dedicated device costs at this load. The gaps' idle energy is
  the idle power (records' ``idle_j`` over their busy time) times the idle wall time.

Embodied carbon follows the same logic: ``dynamic`` and ``attributed`` charge the records'
device-seconds, ``amortised`` charges the run's whole wall time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BASES",
    "ERROR_BANDS",
    "J_PER_KWH",
    "ModeMeasure",
    "PerRequest",
    "Projection",
    "Region",
    "accuracy_row",
    "busy_union_s",
    "error_band",
    "measure",
    "per_request",
    "project",
    "resolve_regions",
    "sensitivity_grid",
    "winner_grid",
]

J_PER_KWH = 3.6e6
BASES = ("dynamic", "attributed", "amortised")

#: Per-request relative error (95th percentile) of wattspan's attribution, by method and by
#: the accuracy benchmark's sensor row: the "Worst cell per sensor" table of
#: ``benchmarks/results/accuracy.md`` (every simulated power law and scenario; the worst law
#: per sensor). ``batch-fit`` is its "worst p95" column, ``time-share`` its "naive p95, worst"
#: column (a time-overlap split). ``tests`` check these numbers against that file.
ERROR_BANDS: Mapping[str, Mapping[str, float]] = {
    "ideal-1ms": {"batch-fit": 0.003, "time-share": 0.780},
    "instant-100ms": {"batch-fit": 0.040, "time-share": 0.779},
    "nvml-poll-20ms": {"batch-fit": 0.038, "time-share": 0.780},
    "hopper-1s-average": {"batch-fit": 0.037, "time-share": 0.782},
    "energy-counter": {"batch-fit": 0.035, "time-share": 0.779},
    "hopper-nvml": {"batch-fit": 0.040, "time-share": 0.781},
}
_NO_TRACE_ERROR = 1.0  # a record with no power trace behind it: +-100 %


def accuracy_row(sensor: str) -> str:
    """The row of :data:`ERROR_BANDS` that describes a record's ``sensor`` string.

    ``simulated`` (the labelled simulated source: exact power on a 1 ms grid) ->
    ``ideal-1ms``; NVML's energy counter with instant power -> ``hopper-nvml``; the counter
    alone -> ``energy-counter``; a 1 s averaged reading -> ``hopper-1s-average``; instant
    power alone -> ``nvml-poll-20ms``; anything else (RAPL, replayed traces, unknown) ->
    ``nvml-poll-20ms``, the row with the widest batch-fit band.
    """
    s = (sensor or "").lower()
    if s == "simulated":
        return "ideal-1ms"
    if s.startswith("nvml:"):
        if "avg1s" in s:
            return "hopper-1s-average"
        counter = "energy-counter" in s
        power = any(p in s for p in ("power-instant", "power-samples", "power-usage"))
        if counter and power:
            return "hopper-nvml"
        if counter:
            return "energy-counter"
    return "nvml-poll-20ms"


def _record_error(method: str, sensor: str, coverage: float) -> float:
    if method not in ("batch-fit", "time-share"):
        base = _NO_TRACE_ERROR
    else:
        base = ERROR_BANDS[accuracy_row(sensor)][method]
    cov = min(1.0, max(0.0, float(coverage))) if math.isfinite(coverage) else 0.0
    return base + (1.0 - cov)


def error_band(methods: Sequence[str], sensors: Sequence[str], coverages: Sequence[float],
               energies_j: Sequence[float]) -> float:
    """Relative uncertainty (a fraction) of a group of records' energy, from their quality flags.

    Each record's band is the 95th-percentile error of its method on its sensor
    (:data:`ERROR_BANDS`, via :func:`accuracy_row`; 100 % for ``no-trace``), plus the
    share of its lifetime the power trace did not cover (``1 - coverage``). The group's
    band is the energy-weighted mean (the plain mean when all energies are 0). It is a
    per-request p95: for a sum over many requests the error is usually smaller.
    """
    n = len(methods)
    if not (len(sensors) == len(coverages) == len(energies_j) == n):
        raise ValueError("methods, sensors, coverages and energies_j must have one length")
    if n == 0:
        return float("nan")
    err = np.fromiter((_record_error(m, s, c) for m, s, c in zip(methods, sensors, coverages)), float, n)
    w = np.clip(np.asarray(energies_j, dtype=np.float64), 0.0, None)
    total = float(w.sum())
    return float(err @ w / total) if total > 0 else float(err.mean())


def busy_union_s(start_ns: Sequence[int] | np.ndarray, end_ns: Sequence[int] | np.ndarray) -> float:
    """Seconds covered by at least one of the intervals ``[start_ns, end_ns)`` (their union)."""
    s = np.asarray(start_ns, dtype=np.int64)
    e = np.asarray(end_ns, dtype=np.int64)
    if s.shape != e.shape:
        raise ValueError("start_ns and end_ns must have one shape")
    if s.size == 0:
        return 0.0
    e = np.maximum(e, s)
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    reach = np.maximum.accumulate(e)
    # a new block starts where an interval begins after everything before it has ended
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, s.size - 1)
    return float((reach[last] - s[first]).sum()) / 1e9


@dataclass(frozen=True, slots=True)
class ModeMeasure:
    """One bench phase as wattspan's records saw it (accelerator energy unless ``host_j``).

    ``requests``: API calls served (a batch record counts its items); ``records``: ledger
    records; ``energy_j = dynamic_j + idle_j`` (attributed, summed); ``host_j``: host
    CPU/DRAM energy attributed to them; ``device_s``: summed records' device-seconds;
    ``busy_s``: wall seconds with at least one record in flight; ``window_s``: first
    start to last end.
    """

    requests: int
    records: int
    energy_j: float
    dynamic_j: float
    idle_j: float
    host_j: float
    device_s: float
    busy_s: float
    window_s: float
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def idle_w(self) -> float:
        """The idle baseline the records imply: their idle energy over their busy time (W)."""
        return self.idle_j / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def gap_s(self) -> float:
        """Wall seconds of the window with nothing in flight."""
        return max(0.0, self.window_s - self.busy_s)

    @property
    def unattributed_idle_j(self) -> float:
        """Idle energy of the gaps (no request in flight), which no record carries."""
        return self.idle_w * self.gap_s

    @property
    def utilisation(self) -> float:
        """Share of the window with at least one request in flight (0..1)."""
        return min(1.0, self.busy_s / self.window_s) if self.window_s > 0 else 0.0


def measure(*, start_ns, end_ns, energy_j, dynamic_j, idle_j, host_j, device_s, items=None,
            prompt_tokens=None, output_tokens=None) -> ModeMeasure:
    """Sum one phase's records (arrays, one entry per record) into a :class:`ModeMeasure`.

    ``items``: API calls per record (1 for on-demand requests, the batch size for a batch
    record; default all 1).
    """
    s = np.asarray(start_ns, dtype=np.int64)
    e = np.asarray(end_ns, dtype=np.int64)
    n = s.size
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in
            (("energy_j", energy_j), ("dynamic_j", dynamic_j), ("idle_j", idle_j), ("host_j", host_j),
             ("device_s", device_s))}
    for k, v in cols.items():
        if v.shape != (n,):
            raise ValueError(f"{k} has {v.size} entries for {n} records")
        if n and not np.all(np.isfinite(v)):
            raise ValueError(f"{k} holds NaN or infinity")
    it = np.ones(n, dtype=np.int64) if items is None else np.asarray(items, dtype=np.int64)
    if it.shape != (n,) or (n and it.min() < 1):
        raise ValueError("items must give one count >= 1 per record")
    tok = lambda x: int(np.asarray(x, dtype=np.int64).sum()) if x is not None else 0  # noqa: E731
    return ModeMeasure(
        requests=int(it.sum()), records=n,
        energy_j=float(cols["energy_j"].sum()), dynamic_j=float(cols["dynamic_j"].sum()),
        idle_j=float(cols["idle_j"].sum()), host_j=float(cols["host_j"].sum()),
        device_s=float(cols["device_s"].sum()), busy_s=busy_union_s(s, e),
        window_s=float(e.max() - s.min()) / 1e9 if n else 0.0,
        prompt_tokens=tok(prompt_tokens), output_tokens=tok(output_tokens),
    )


@dataclass(frozen=True, slots=True)
class PerRequest:
    """Energy (J) and device time (s) per API call, on one idle basis (see :data:`BASES`)."""

    basis: str
    energy_j: float
    device_s: float


def per_request(m: ModeMeasure, basis: str, *, include_host: bool = False) -> PerRequest:
    """Energy and device-seconds per API call of ``m`` on ``basis``.

    ``dynamic``: ``dynamic_j / requests``, ``device_s / requests``; ``attributed``:
    ``energy_j / requests`` (+ ``host_j`` with ``include_host``), ``device_s / requests``;
    ``amortised``: ``(energy_j + unattributed_idle_j) / requests`` (+ host), and
    ``window_s / requests`` device-seconds.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    if m.requests < 1:
        raise ValueError("no requests were measured: nothing to divide by")
    n = m.requests
    host = m.host_j if include_host else 0.0
    if basis == "dynamic":
        return PerRequest(basis, m.dynamic_j / n, m.device_s / n)
    if basis == "attributed":
        return PerRequest(basis, (m.energy_j + host) / n, m.device_s / n)
    return PerRequest(basis, (m.energy_j + m.unattributed_idle_j + host) / n, max(m.window_s, m.device_s) / n)


@dataclass(frozen=True, slots=True)
class Projection:
    """Energy and gCO2e of ``calls`` API calls.

    ``it_kwh``: energy at the device; ``facility_kwh = it_kwh * pue``;
    ``operational_g = facility_kwh * intensity``; ``embodied_g = device_s * calls *
    embodied_g_per_device_s``; ``total_g`` their sum. ``per_request_g`` and ``per_1k_g``
    are ``total_g`` per call and per 1000 calls.
    """

    calls: int
    energy_j_per_request: float
    device_s_per_request: float
    intensity_g_per_kwh: float
    pue: float
    embodied_g_per_device_s: float
    it_kwh: float
    facility_kwh: float
    operational_g: float
    embodied_g: float
    total_g: float

    @property
    def per_request_g(self) -> float:
        return self.total_g / self.calls

    @property
    def per_1k_g(self) -> float:
        return self.total_g / self.calls * 1000.0

    @property
    def embodied_share(self) -> float:
        """Embodied grams over total grams (0..1; 0 when the total is 0)."""
        return self.embodied_g / self.total_g if self.total_g > 0 else 0.0


def _num(name: str, v, lo: float, hi: float, unit: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in {unit}, got {v!r}")
    v = float(v)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} {unit}, got {v!r}")
    return v


def project(*, energy_j_per_request: float, device_s_per_request: float = 0.0, calls: int = 1_000_000,
            intensity_g_per_kwh: float, pue: float = 1.0, embodied_g_per_device_s: float = 0.0) -> Projection:
    """Scale one call's energy and device time to ``calls`` calls, then to gCO2e.

    Example: 0.5 J per call x 1e6 calls = 5e5 J = 0.1389 kWh; x PUE 1.1 = 0.1528 kWh; x 400
    gCO2e/kWh = 61.1 g operational.
    """
    if isinstance(calls, bool) or not isinstance(calls, (int, np.integer)) or not 1 <= calls <= 10**15:
        raise ValueError(f"calls must be an int between 1 and 1e15, got {calls!r}")
    e = _num("energy_j_per_request", energy_j_per_request, 0.0, 1e9, "J")
    d = _num("device_s_per_request", device_s_per_request, 0.0, 1e7, "s")
    i = _num("intensity_g_per_kwh", intensity_g_per_kwh, 0.0, 2500.0, "gCO2e/kWh")
    p = _num("pue", pue, 1.0, 3.0, "(facility / IT energy)")
    g = _num("embodied_g_per_device_s", embodied_g_per_device_s, 0.0, 1e3, "gCO2e per device-second")
    it_kwh = e * calls / J_PER_KWH
    facility = it_kwh * p
    op = facility * i
    emb = d * calls * g
    return Projection(int(calls), e, d, i, p, g, it_kwh, facility, op, emb, op + emb)


def sensitivity_grid(*, energy_j_per_request: float, device_s_per_request: float, intensities_g_per_kwh,
                     pues, embodied_g_per_device_s: float = 0.0, calls: int = 1_000_000) -> np.ndarray:
    """gCO2e of ``calls`` calls on a grid: shape ``(len(pues), len(intensities))``,
    ``[j, i] = e * calls / 3.6e6 * pues[j] * intensities[i] + d * calls * g``."""
    ii = np.asarray(intensities_g_per_kwh, dtype=np.float64)
    pp = np.asarray(pues, dtype=np.float64)
    if ii.ndim != 1 or pp.ndim != 1 or not ii.size or not pp.size:
        raise ValueError("intensities and pues must be non-empty 1-d sequences")
    if ii.min() < 0 or pp.min() < 1.0 or not (np.all(np.isfinite(ii)) and np.all(np.isfinite(pp))):
        raise ValueError("intensities must be >= 0 gCO2e/kWh and pues >= 1, all finite")
    e = _num("energy_j_per_request", energy_j_per_request, 0.0, 1e9, "J")
    d = _num("device_s_per_request", device_s_per_request, 0.0, 1e7, "s")
    g = _num("embodied_g_per_device_s", embodied_g_per_device_s, 0.0, 1e3, "gCO2e per device-second")
    return e * calls / J_PER_KWH * pp[:, None] * ii[None, :] + d * calls * g


def winner_grid(a_g: np.ndarray, b_g: np.ndarray, *, rel_err_a: float = 0.0, rel_err_b: float = 0.0) -> np.ndarray:
    """Which of two same-shape grids of grams is lower, beyond their uncertainty bands.

    ``-1`` where ``a`` wins (``a * (1 + rel_err_a) < b * (1 - rel_err_b)``), ``+1`` where
    ``b`` wins (the mirror), ``0`` where the bands overlap (too close to call). int8.
    """
    a = np.asarray(a_g, dtype=np.float64)
    b = np.asarray(b_g, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"grids must have one shape, got {a.shape} and {b.shape}")
    ra, rb = (_num(n, v, 0.0, 10.0, "(fraction)") for n, v in (("rel_err_a", rel_err_a), ("rel_err_b", rel_err_b)))
    out = np.zeros(a.shape, dtype=np.int8)
    out[a * (1 + ra) < b * (1 - rb)] = -1
    out[b * (1 + rb) < a * (1 - ra)] = 1
    return out


@dataclass(frozen=True, slots=True)
class Region:
    """A place to project to: its grid intensity, PUE and where both come from."""

    label: str
    intensity_g_per_kwh: float
    pue: float
    source: str
    pue_source: str


def resolve_regions(regions: Iterable[str] = (), intensities: Iterable[float] = (), *,
                    pue: float | None = None) -> list[Region]:
    """Regions from the offline table (``wattspan.carbon.grid_intensity``) and given intensities.

    Each region takes its provider's published PUE (``default_pue``: aws/gcp/azure; 1.0
    otherwise) unless ``pue`` is given. A given intensity (a live value, in gCO2e/kWh)
    becomes a region labelled ``"given 123 g/kWh"`` with PUE ``pue`` or 1.0. Raises
    ValueError (naming close matches) for an unknown region.
    """
    from ..carbon import default_pue, grid_intensity

    p = None if pue is None else _num("pue", pue, 1.0, 3.0, "(facility / IT energy)")
    out: list[Region] = []
    seen: set[str] = set()
    for r in regions:
        gi = grid_intensity(r)
        if gi.zone in seen:
            continue
        seen.add(gi.zone)
        cloud = gi.zone.split(":", 1)[0] if ":" in gi.zone else "on-prem"
        dp = default_pue(cloud)
        note = f"; {gi.maps_to}" if gi.maps_to else ""
        out.append(Region(gi.zone, gi.gco2e_per_kwh, dp.value if p is None else p,
                          f"{gi.source}, {gi.year} ({gi.licence}){note}",
                          dp.source if p is None else "given (--pue)"))
    for v in intensities:
        v = _num("intensity", v, 0.0, 2500.0, "gCO2e/kWh")
        out.append(Region(f"given {v:g} g/kWh", v, 1.0 if p is None else p, "given (--intensity)",
                          "no facility overhead assumed (1.0); set --pue" if p is None else "given (--pue)"))
    return out
