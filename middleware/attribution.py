"""Apportion measured energy to requests.

The conventions (see the README's "How energy is apportioned"):

* **dynamic** energy is measured energy above the idle baseline;
* a **batch step**'s dynamic energy is split among its requests in proportion to
  their weights (the tokens each processed in that step);
* without batch steps, dynamic energy at each instant is shared by the requests
  in flight on that device (equally, or by given weights);
* the **idle baseline** at each instant is shared equally by the requests in
  flight; idle energy while nothing is in flight is **unattributed**;
* requests + unattributed = measured energy, always.

Real sensors are coarse: an NVML energy counter moves every 20-100 ms, instant
power covers ~25 ms of each 100 ms, Hopper's power usage is a 1 s average. A
5 ms batch step cannot be read off such a trace directly. So the
``batch-fit`` method (1) fits how a step's dynamic energy depends on its
composition by non-negative least squares over the sensor's readings, each
reading being a linear function of the steps it overlaps, choosing the family
of step terms (energy additive in tokens, power linear in composition,
saturating, combinations: :mod:`wattspan._stepmodel`) by blocked
cross-validation in time; (2) cuts time into reconciliation windows, of the
length that best predicts held-out readings, and scales the fitted step
energies in each window to what was measured there; (3) gives every request a
90 % band from the held-out errors. Measurement sets the totals; the fit only
decides how a window's energy is spread over its steps. What the fit cannot
place (a window with energy but no step) is shared by time among the requests
in flight, or unattributed.

Everything is vectorised: per device, a handful of sorts, ``searchsorted`` and
prefix sums over all samples, steps and requests; no Python loop per item.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._samples import DeviceTrace, SampleKind
from ._stepmodel import BASIS, FAMILIES, basis, correlation_lag, group_errors, nnls_gram, select_family, select_window

__all__ = [
    "Requests",
    "Steps",
    "StepModel",
    "DeviceSummary",
    "Attribution",
    "attribute",
    "FEATURES",
]

#: The step features the batch-fit model uses; a step's dynamic energy is their
#: non-negative combination. Units: seconds, tokens, tokens, thousands of tokens.
FEATURES = ("duration_s", "prefill_tokens", "decode_tokens", "decode_context_ktokens")

_NS = 1e-9


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Requests:
    """Request lifetimes, columnar. ``start_ns``/``end_ns`` on the trace's clock."""

    ids: np.ndarray  # object array of str
    start_ns: np.ndarray  # int64
    end_ns: np.ndarray  # int64
    device: np.ndarray  # object array of str
    weight: np.ndarray  # float64, time-share weight (default 1)
    route: np.ndarray | None = None
    model: np.ndarray | None = None
    tenant: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("start_ns", "end_ns", "device", "weight"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Requests.{name} has {len(getattr(self, name))} rows for {n} ids")
        if n and np.any(self.end_ns < self.start_ns):
            bad = int(np.argmax(self.end_ns < self.start_ns))
            raise ValueError(f"request {self.ids[bad]!r} ends before it starts")
        if n and (not np.all(np.isfinite(self.weight)) or np.any(self.weight < 0)):
            raise ValueError("request weights must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(cls, rows: Iterable[Mapping]) -> "Requests":
        """Build from dicts with ``id, start_ns, end_ns, gpu`` (or ``device``) and
        optional ``weight, route, model, tenant``."""
        rows = list(rows)
        ids = np.array([str(r["id"]) for r in rows], dtype=object)
        dev = np.array([_device_key(r.get("device", r.get("gpu", "0"))) for r in rows], dtype=object)

        def col(key):
            if not any(key in r for r in rows):
                return None
            return np.array([str(r.get(key) or "") for r in rows], dtype=object)

        return cls(
            ids=ids,
            start_ns=np.array([int(r["start_ns"]) for r in rows], dtype=np.int64),
            end_ns=np.array([int(r["end_ns"]) for r in rows], dtype=np.int64),
            device=dev,
            weight=np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float64),
            route=col("route"),
            model=col("model"),
            tenant=col("tenant"),
        )


@dataclass(frozen=True)
class Steps:
    """Batch steps, columnar, with their (request, tokens) entries in CSR form.

    ``entry_step[i]`` is the step of entry ``i``, ``entry_request[i]`` an index
    into the :class:`Requests` it was built against, ``entry_tokens[i]`` the
    tokens that request processed in that step.
    """

    start_ns: np.ndarray
    end_ns: np.ndarray
    device: np.ndarray
    entry_step: np.ndarray
    entry_request: np.ndarray
    entry_tokens: np.ndarray

    def __post_init__(self) -> None:
        if len(self.start_ns) and np.any(self.end_ns <= self.start_ns):
            bad = int(np.argmax(self.end_ns <= self.start_ns))
            raise ValueError(f"batch step {bad} does not end after it starts")
        if len(self.entry_tokens) and (not np.all(np.isfinite(self.entry_tokens)) or np.any(self.entry_tokens < 0)):
            raise ValueError("batch step token counts must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.start_ns)

    @classmethod
    def from_records(cls, rows: Iterable[Mapping], requests: Requests) -> "Steps":
        """Build from dicts ``{start_ns, end_ns, gpu, requests: {id: tokens}}``.

        Raises ``KeyError`` naming the first request id not in ``requests``.
        """
        index = {rid: i for i, rid in enumerate(requests.ids)}
        starts, ends, devs, e_step, e_req, e_tok = [], [], [], [], [], []
        for s, r in enumerate(rows):
            starts.append(int(r["start_ns"]))
            ends.append(int(r["end_ns"]))
            devs.append(_device_key(r.get("device", r.get("gpu", "0"))))
            for rid, tok in r["requests"].items():
                try:
                    e_req.append(index[str(rid)])
                except KeyError:
                    raise KeyError(f"batch step {s} names unknown request {rid!r}") from None
                e_step.append(s)
                e_tok.append(float(tok))
        return cls(
            start_ns=np.array(starts, dtype=np.int64),
            end_ns=np.array(ends, dtype=np.int64),
            device=np.array(devs, dtype=object),
            entry_step=np.array(e_step, dtype=np.int64),
            entry_request=np.array(e_req, dtype=np.int64),
            entry_tokens=np.array(e_tok, dtype=np.float64),
        )


def _device_key(value) -> str:
    """Trace, request and batch files name a GPU by index (``0``) or by id (``gpu0``), and a
    device group by a list or a comma-separated string (see :mod:`wattspan._groups`)."""
    if isinstance(value, (list, tuple)) or "," in str(value) or "+" in str(value):
        from ._groups import group_key

        return group_key(value)
    s = str(value).strip()
    return f"gpu{s}" if s.isdigit() else s


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class StepModel:
    """Fitted dynamic energy of a batch step: ``coef . basis`` joules.

    ``coef`` is over :data:`wattspan._stepmodel.BASIS` (its first four entries
    follow :data:`FEATURES`: W, J/token, J/token, J/ktoken; then W/token,
    W/token, W/ktoken, W, W); a four-entry ``coef`` is read as :data:`FEATURES`
    alone. ``family`` is the candidate family that won the blocked time
    cross-validation, ``cv_error`` its held-out RMS error relative to the
    readings' RMS, ``cv_r2`` its held-out r2, ``why`` why it won and
    ``candidates`` every family's held-out error. ``r2`` is the in-sample
    coefficient of determination over the sensor readings it used (``rows``).
    ``rates`` are the throughputs (tokens/s) of the saturating terms.
    """

    coef: np.ndarray
    r2: float
    rows: int
    family: str = "energy"
    cv_error: float = math.nan
    cv_r2: float = math.nan
    why: str = ""
    candidates: dict | None = None
    rates: tuple[float, float] | None = None

    @property
    def wait_coef(self) -> np.ndarray:
        """The wait terms' coefficients (W, J per wait; zeros when the model has none)."""
        c = np.asarray(self.coef, dtype=np.float64)
        return c[len(BASIS):len(BASIS) + 2] if len(c) >= len(BASIS) + 2 else np.zeros(2)

    @property
    def full_coef(self) -> np.ndarray:
        c = np.asarray(self.coef, dtype=np.float64)
        if len(c) >= len(BASIS):
            return c[: len(BASIS)]
        return np.concatenate((c, np.zeros(len(BASIS) - len(c))))

    def predict(self, features: np.ndarray) -> np.ndarray:
        return features[:, : len(self.coef)] @ self.coef[: features.shape[1]]

    def as_dict(self) -> dict:
        return {
            "family": self.family,
            "features": list(BASIS),
            "coef": self.full_coef.tolist(),
            "wait_coef": dict(zip(("wait_w", "j_per_wait"), self.wait_coef.tolist())),
            "r2": self.r2,
            "cv_error": self.cv_error,
            "cv_r2": self.cv_r2,
            "why": self.why,
            "candidates": dict(self.candidates or {}),
            "rows": self.rows,
        }


@dataclass(frozen=True)
class DeviceSummary:
    device: str
    sensor: str
    simulated: bool
    method: str
    t0_ns: int
    t1_ns: int
    measured_j: float
    attributed_j: float
    unattributed_j: float
    idle_j: float
    idle_w: float  # mean idle baseline over the period
    idle_source: str  # configured | idle-periods | low-quantile
    steps: int = 0
    model: StepModel | None = None
    windows: int = 0
    scale_p5: float = math.nan  # spread of the per-window reconciliation scale
    scale_p95: float = math.nan
    window_s: float = math.nan  # reconciliation window chosen by held-out readings
    window_why: str = ""
    shift_s: float = 0.0  # how much earlier the trace was read to undo stale readings (chosen like the window)
    band_rel: float = math.nan  # 90 % relative error of one held-out reading's dynamic energy
    quality: str = ""  # good | coarse | misfit (batch-fit only)
    noise: dict | None = None  # the held-out error model behind the bands (see _noise_model)
    wait_j: float = 0.0  # fitted dynamic energy while waiting between the device's steps (shared by time)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "model"}
        if self.model is not None:
            d["model"] = self.model.as_dict()
        return d


@dataclass(frozen=True)
class Attribution:
    """Per-request results (arrays aligned with the input :class:`Requests`) and per-device totals."""

    requests: Requests
    energy_j: np.ndarray
    dynamic_j: np.ndarray
    idle_j: np.ndarray
    device_s: np.ndarray
    coverage: np.ndarray
    method: np.ndarray  # object array of str
    devices: dict[str, DeviceSummary] = field(default_factory=dict)
    energy_j_low: np.ndarray | None = None  # 90 % band on energy_j (J)
    energy_j_high: np.ndarray | None = None
    quality: np.ndarray | None = None  # object array: good | coarse | misfit
    #: requests on device groups: each (request, member device)'s part, columnar
    #: (``request`` index, ``device``, ``energy_j``, ``dynamic_j``, ``idle_j``, ``device_s``); see wattspan._groups
    parts: dict | None = None

    @property
    def measured_j(self) -> float:
        return float(sum(d.measured_j for d in self.devices.values()))

    @property
    def unattributed_j(self) -> float:
        return float(sum(d.unattributed_j for d in self.devices.values()))

    @property
    def attributed_j(self) -> float:
        return float(self.energy_j.sum())

    def records(self) -> list[dict]:
        """One dict per request: ``id, gpu, energy_j, dynamic_j, idle_j, device_s, method, sensor, coverage,
        energy_j_low, energy_j_high, quality`` (plus ``route, model, tenant`` where given)."""
        r = self.requests
        out = []
        from ._groups import device_parts, members

        per_dev = device_parts(self.parts, len(r))
        for i in range(len(r)):
            d = self.devices.get(r.device[i]) or self.devices.get(members(r.device[i])[0])
            rec = {
                "id": r.ids[i],
                "gpu": r.device[i],
                "energy_j": float(self.energy_j[i]),
                "dynamic_j": float(self.dynamic_j[i]),
                "idle_j": float(self.idle_j[i]),
                "device_s": float(self.device_s[i]),
                "method": self.method[i],
                "sensor": d.sensor if d else "none",
                "simulated": bool(d.simulated) if d else False,
                "coverage": float(self.coverage[i]),
            }
            if self.energy_j_low is not None:
                rec["energy_j_low"] = float(self.energy_j_low[i])
                rec["energy_j_high"] = float(self.energy_j_high[i])
            if self.quality is not None:
                rec["quality"] = self.quality[i]
            if per_dev is not None and len(per_dev[i]) > 1:
                rec["devices"] = per_dev[i]  # a device group: each member's joules
            for key in ("route", "model", "tenant"):
                col = getattr(r, key)
                if col is not None:
                    rec[key] = col[i]
            out.append(rec)
        return out


# --------------------------------------------------------------------------- engine


def attribute(
    traces: Mapping[str, DeviceTrace] | Sequence[DeviceTrace],
    requests: Requests,
    steps: Steps | None = None,
    *,
    idle_w: float | Mapping[str, float] | None = None,
    t0_ns: int | None = None,
    t1_ns: int | None = None,
    reconcile_s: float | None = None,
    models: Mapping[str, StepModel] | None = None,
) -> Attribution:
    """Apportion each device's measured energy over ``[t0_ns, t1_ns]`` to ``requests``.

    ``idle_w``: the idle baseline in watts (one value, or per device); ``None``
    estimates it from the trace (median power in periods with nothing in flight,
    tracked in 30 s bins; a low quantile of the readings if there are none).
    ``t0_ns``/``t1_ns`` default to each device trace's first and last reading;
    requests are clipped to the period (the live meter attributes period by
    period and sums). ``reconcile_s`` overrides the reconciliation window for
    power-only sensors. ``models`` gives a step model per device to use instead
    of fitting one (for short live periods).
    """
    if not isinstance(traces, Mapping):
        traces = {t.device: t for t in traces}
    traces = {_device_key(k): v for k, v in traces.items()}
    from ._groups import any_group, attribute_grouped

    if any_group(requests, steps):  # device groups: per member device, summed per request
        return attribute_grouped(attribute, traces, requests, steps, idle_w=idle_w, t0_ns=t0_ns, t1_ns=t1_ns,
                                 reconcile_s=reconcile_s, models=models)
    n = len(requests)
    energy = np.zeros(n)
    dynamic = np.zeros(n)
    idle = np.zeros(n)
    dev_s = np.zeros(n)
    coverage = np.zeros(n)
    method = _obj_full(n, "no-trace")
    half_dyn = np.zeros(n)
    half_idle = np.zeros(n)
    quality = _obj_full(n, "misfit")
    summaries: dict[str, DeviceSummary] = {}

    req_dev = requests.device
    step_dev = steps.device if steps is not None else None
    for dev, trace in traces.items():
        if len(trace) < 2:
            continue
        rmask = req_dev == dev
        ridx = np.flatnonzero(rmask)
        if (trace.energy_j is not None and trace.power_w is not None and trace.power_kind == SampleKind.AVERAGE
                and steps is not None and models is None):
            # A counter read seldom (and late) can know less than the averaged power readings
            # beside it (each the exact mean over its window, read on time): keep whichever
            # predicts its own held-out readings clearly better (the counter on a tie).
            s_pre = np.flatnonzero(step_dev == dev)
            pa = int(trace.t_ns[0]) if t0_ns is None else max(int(t0_ns), int(trace.t_ns[0]))
            pb = int(trace.t_ns[-1]) if t1_ns is None else min(int(t1_ns), int(trace.t_ns[-1]))
            if len(s_pre) and pb > pa and _prefer_power(_CumEnergy.from_trace(trace), trace, steps, s_pre, pa, pb):
                trace = dataclasses.replace(trace, energy_j=None, sensor=(trace.sensor or "") + (" (power readings)" if trace.sensor else ""))
        tr_t0 = int(trace.t_ns[0]) - _lead_ns(trace)  # an averaged reading covers [t - window, t]
        tr_t1 = int(trace.t_ns[-1])
        a = tr_t0 if t0_ns is None else max(int(t0_ns), tr_t0)
        b = tr_t1 if t1_ns is None else min(int(t1_ns), tr_t1)
        if b <= a:
            continue
        cum = _CumEnergy.from_trace(trace)
        starts = np.clip(requests.start_ns[ridx], a, b)
        ends = np.clip(requests.end_ns[ridx], a, b)
        life = (requests.end_ns[ridx] - requests.start_ns[ridx]).astype(np.float64)
        cov_num = (np.clip(requests.end_ns[ridx], tr_t0, tr_t1) - np.clip(requests.start_ns[ridx], tr_t0, tr_t1)).astype(np.float64)
        coverage[ridx] = np.where(life > 0, cov_num / np.where(life > 0, life, 1), 1.0)

        # Idle baseline, as a piecewise-linear power curve.
        busy = _busy_intervals(starts, ends, steps, dev)
        if idle_w is not None:
            v = float(idle_w[dev]) if isinstance(idle_w, Mapping) else float(idle_w)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"idle_w for {dev!r} must be a finite number >= 0, got {v!r}")
            idle_curve = _Piecewise(np.array([a, b], dtype=np.int64), np.array([v, v]))
            idle_source = "configured"
        else:
            idle_curve, idle_source = _estimate_idle(trace, busy, a, b)

        # Time boundaries of the in-flight segments.
        seg = _Segments(starts, ends, requests.weight[ridx], a, b)
        idle_seg = idle_curve.over(seg.edges)
        meas_seg = cum.over(seg.edges)
        idle_share, idle_un = seg.share_equal(idle_seg)
        dev_time, _ = seg.share_equal(np.diff(seg.edges).astype(np.float64) * _NS)

        measured = float(cum.energy(np.array([a]), np.array([b]))[0])
        summary_extra: dict = {}

        s_idx = np.flatnonzero(step_dev == dev) if steps is not None else np.empty(0, dtype=np.int64)
        if len(s_idx) and idle_source == "low-quantile":
            # Never idle: a low quantile of the readings still holds dynamic power.
            # Fit the baseline as the intercept of the step model instead.
            v = _fit_idle(cum, trace, steps, s_idx, requests, a, b)
            if v is not None:
                idle_curve = _Piecewise(np.array([a, b], dtype=np.int64), np.array([v, v]))
                idle_source = "fit-intercept"
                idle_seg = idle_curve.over(seg.edges)
                idle_share, idle_un = seg.share_equal(idle_seg)
        if len(s_idx):
            model = models.get(dev) if models else None
            dyn, dyn_un, summary_extra, spread = _batch_fit(
                cum, trace, steps, s_idx, requests, ridx, seg, idle_curve, a, b, reconcile_s, model
            )
            in_steps = np.zeros(len(requests), dtype=bool)
            on_this = np.zeros(len(steps), dtype=bool)
            on_this[s_idx] = True
            in_steps[steps.entry_request[on_this[steps.entry_step]]] = True
            is_fit = in_steps[ridx]
            meth = np.array(["time-share", "batch-fit"], dtype=object)[is_fit.astype(np.intp)]
            dev_quality = _quality(summary_extra)
            summary_extra["quality"] = dev_quality
        else:
            dyn, dyn_un = seg.share_weighted(meas_seg - idle_seg)
            meth = "time-share"

        idle_total = float(idle_seg.sum())
        # A share below zero (the meter read under the idle baseline: noise, or a
        # baseline set too high) is not a request's saving: it stays unattributed.
        dyn = np.maximum(dyn, 0.0)
        dyn, idle_share = _conserve(measured, dyn, idle_share)
        if len(s_idx):
            hd = _dyn_half_width(dyn, spread, starts, ends, summary_extra)
            if dev_quality == "misfit":
                # the model explains little of what the sensor saw: the split inside each
                # window is uncertain by the share it leaves unexplained
                r2 = summary_extra["model"].cv_r2 if summary_extra.get("model") is not None else math.nan
                hd = np.maximum(hd, (1.0 - (max(r2, 0.0) if math.isfinite(r2) else 0.0)) * dyn)
            half_dyn[ridx] = np.where(is_fit, hd, dyn)
            quality[ridx] = np.array(["coarse", dev_quality], dtype=object)[is_fit.astype(np.intp)]
        else:
            half_dyn[ridx] = dyn  # a time-overlap split can be off by its whole dynamic share
            quality[ridx] = "coarse"
        half_idle[ridx] = _IDLE_REL * idle_share
        dynamic[ridx] += dyn
        idle[ridx] += idle_share
        dev_s[ridx] += dev_time
        method[ridx] = meth
        # Conservation: whatever float rounding left goes to unattributed, so the
        # books close exactly.
        attributed = float(dyn.sum() + idle_share.sum())
        unattributed = max(0.0, measured - attributed)
        summaries[dev] = DeviceSummary(
            device=dev,
            sensor=trace.sensor or _describe_sensor(trace),
            simulated=trace.simulated,
            method="batch-fit" if len(s_idx) else "time-share",
            t0_ns=a,
            t1_ns=b,
            measured_j=measured,
            attributed_j=attributed,
            unattributed_j=unattributed,
            idle_j=idle_total,
            idle_w=idle_total / ((b - a) * _NS),
            idle_source=idle_source,
            **summary_extra,
        )
    energy[:] = dynamic + idle
    half = _Z90 * np.sqrt(half_dyn**2 + half_idle**2)
    low = np.maximum(energy - half, 0.0)
    high = energy + half
    return Attribution(requests, energy, dynamic, idle, dev_s, coverage, method, summaries, low, high, quality)


def _obj_full(n: int, value: str) -> np.ndarray:
    """``np.full(n, value, dtype=object)``, 20x faster for millions of rows (repeat, not a Python fill)."""
    return np.array([value], dtype=object).repeat(n)


def _describe_sensor(trace: DeviceTrace) -> str:
    if trace.energy_j is not None:
        return "energy-counter"
    if trace.power_kind == SampleKind.AVERAGE:
        return f"average-{trace.window_ns / 1e9:g}s"
    return "instant"


# --------------------------------------------------------------------------- pieces


class _Piecewise:
    """A piecewise-linear function of time (ns), constant beyond its knots."""

    __slots__ = ("t", "v", "_c")

    def __init__(self, t: np.ndarray, v: np.ndarray) -> None:
        self.t = t.astype(np.int64)
        self.v = v.astype(np.float64)
        dt = np.diff(self.t).astype(np.float64) * _NS
        self._c = np.concatenate(([0.0], np.cumsum(dt * (self.v[1:] + self.v[:-1]) * 0.5)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.interp(x.astype(np.float64), self.t.astype(np.float64), self.v)

    def cumulative(self, x: np.ndarray) -> np.ndarray:
        """Integral from the first knot to ``x`` (joules when ``v`` is watts)."""
        t, v, c = self.t, self.v, self._c
        x = np.asarray(x, dtype=np.int64)
        k = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 1)
        vx = self(x)
        dx = (x - t[k]).astype(np.float64) * _NS
        # beyond the last knot (or before the first) the value is held constant
        return c[k] + dx * (v[k] + vx) * 0.5

    def integral(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.cumulative(b) - self.cumulative(a)

    def over(self, edges: np.ndarray) -> np.ndarray:
        """``integral(edges[:-1], edges[1:])``, the same numbers, one look-up per edge."""
        return np.diff(self.cumulative(edges))


class _CumEnergy:
    """The device's cumulative energy E(t), piecewise linear between knots.

    From the energy counter where there is one (knots at the counter's change
    points), otherwise by integrating the power readings (an AVERAGE reading is
    placed at the middle of its window).
    """

    __slots__ = ("t", "e", "source", "_tf")

    def __init__(self, t: np.ndarray, e: np.ndarray, source: str) -> None:
        self.t, self.e, self.source = t, e, source
        self._tf = t.astype(np.float64)

    @classmethod
    def from_trace(cls, trace: DeviceTrace) -> "_CumEnergy":
        if trace.energy_j is not None:
            t, e = counter_knots(trace.t_ns, trace.energy_j)
            if len(t) >= 2:
                return cls(t, e - e[0], "energy-counter")
        t, p, span = _points_mid(trace)
        lead = _lead_ns(trace)
        if lead and len(t):
            # the first reading's window reaches back to t0 - window, the last ends at its read
            t = np.concatenate(([t[0] - span // 2], t, [t[-1] + span // 2]))
            p = np.concatenate(([p[0]], p, [p[-1]]))
        dt = np.diff(t).astype(np.float64) * _NS
        e = np.concatenate(([0.0], np.cumsum(dt * (p[1:] + p[:-1]) * 0.5)))
        return cls(t, e, "power")

    def at(self, x: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(x, dtype=np.float64), self._tf, self.e)

    def energy(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.at(b) - self.at(a)

    def over(self, edges: np.ndarray) -> np.ndarray:
        """``energy(edges[:-1], edges[1:])``, the same numbers, one look-up per edge."""
        return np.diff(self.at(edges))


def counter_knots(t_ns: np.ndarray, energy_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Change points of a cumulative counter that is read more often than it moves.

    A counter read every 10 ms that the driver refreshes every 50 ms repeats
    values; the refresh happened between the last read of the old value and the
    first read of the new one, so a change point is placed at their midpoint.
    Where reads are slower than refreshes (few repeats), the read time is used.
    """
    ok = np.isfinite(energy_j)
    t, e = t_ns[ok], energy_j[ok]
    if len(t) < 2:
        return t, e
    changed = np.concatenate(([True], np.diff(e) != 0))
    repeats = 1.0 - changed.mean()
    idx = np.flatnonzero(changed)
    tk = t[idx].copy()
    if repeats > 0.3:
        prev = np.maximum(idx - 1, 0)
        tk[1:] = (t[prev[1:]] + t[idx[1:]]) // 2
    ek = e[idx]
    if idx[-1] != len(t) - 1:  # keep the last read so the trace's end is covered
        tk = np.append(tk, t[-1])
        ek = np.append(ek, e[-1])
    return tk, ek


def power_points(trace: DeviceTrace) -> tuple[np.ndarray, np.ndarray, int]:
    """The power readings as ``(t_end, watts, span_ns)``: each reading is taken
    as the mean power over ``[t_end - span_ns, t_end]``.

    AVERAGE readings span their window. INSTANT readings that repeat (a sensor
    polled faster than the driver refreshes it) are reduced to the first read
    of each new value; if fresh values then come more than 5 ms apart, each is
    taken to stand for the interval since the previous one (an A100/H100
    "instant" value covers only part of each 100 ms, at an unknown place in
    it), else as a true instant (``span_ns`` 0).
    """
    p = trace.power_w
    ok = np.isfinite(p)
    t, p = trace.t_ns[ok], p[ok]
    if trace.power_kind == SampleKind.AVERAGE:
        return t, p, int(trace.window_ns)
    if len(t) > 2:
        fresh = np.concatenate(([True], np.diff(p) != 0))
        starts = np.flatnonzero(fresh)
        if len(starts) >= 10 and fresh.mean() < 0.7:
            # runs of a repeated value: keep one read per typical run length, so a
            # value that really stays put (an idle GPU) still has its points
            lengths = np.diff(np.append(starts, len(t)))
            r = int(np.median(lengths[: 100_000]))
            periodic = np.mean(np.abs(lengths[:-1] - r) <= 1) > 0.8  # a refresh clock, not the signal
            if r >= 2 and periodic:
                pos = np.arange(len(t)) - starts[np.cumsum(fresh) - 1]
                keep = pos % r == 0
                t, p = t[keep], p[keep]
    span = _typical_interval(t)
    return t, p, (span if span > 5_000_000 else 0)


def _typical_interval(t: np.ndarray) -> int:
    """Median interval between readings (from at most ~100k of them: it is a typical value)."""
    if len(t) < 3:
        return 0
    stride = max(1, len(t) // 100_000)
    return int(np.median(np.diff(t[::stride]))) // stride if stride > 1 else int(np.median(np.diff(t)))


def _lead_ns(trace: DeviceTrace) -> int:
    """How far before its first reading a power-only AVERAGE trace measures (its window)."""
    if trace.energy_j is None and trace.power_kind == SampleKind.AVERAGE and trace.power_w is not None:
        return max(int(trace.window_ns), 0)
    return 0


def _points_mid(trace: DeviceTrace) -> tuple[np.ndarray, np.ndarray, int]:
    t, p, span = power_points(trace)
    return t - span // 2, p, span


def _busy_intervals(starts, ends, steps: Steps | None, dev: str) -> tuple[np.ndarray, np.ndarray]:
    """Merged intervals when anything is in flight or running on ``dev``."""
    s, e = [starts], [ends]
    if steps is not None and len(steps):
        m = steps.device == dev
        s.append(steps.start_ns[m])
        e.append(steps.end_ns[m])
    s = np.concatenate(s)
    e = np.concatenate(e)
    if not len(s):
        return s, e
    o = np.argsort(s, kind="stable")
    s, e = s[o], np.maximum.accumulate(e[o])
    new = np.concatenate(([True], s[1:] > e[:-1]))
    grp = np.cumsum(new) - 1
    ms = s[new]
    me = np.zeros(len(ms), dtype=np.int64)
    np.maximum.at(me, grp, e)
    return ms, me


def _estimate_idle(trace: DeviceTrace, busy, a: int, b: int, bin_s: float = 30.0) -> tuple[_Piecewise, str]:
    """Idle baseline from readings taken when nothing was in flight, per 30 s bin.

    The energy counter is tried first; where it saw no idle time (a counter read
    once a second starts with the trace), the power readings, whose averaging
    window can reach back before the first read."""
    sources = []
    if trace.energy_j is not None:
        tk, ek = counter_knots(trace.t_ns, trace.energy_j)
        mid = (tk[1:] + tk[:-1]) // 2
        half = (tk[1:] - tk[:-1]) // 2
        sources.append((mid, half, np.diff(ek) / (np.diff(tk).astype(np.float64) * _NS)))
    if trace.power_w is not None:
        mid, pw, span = _points_mid(trace)
        sources.append((mid, np.full(len(mid), span // 2, dtype=np.int64), pw))
    pw_all = sources[0][2]
    for mid, half, pw in sources:
        got = _idle_from(mid, half, pw, busy, a, b, bin_s)
        if got is not None:
            return got, "idle-periods"
    ok = np.isfinite(pw_all)
    v = float(np.quantile(pw_all[ok], 0.02)) if ok.any() else 0.0
    return _Piecewise(np.array([a, b]), np.array([v, v])), "low-quantile"


def _idle_from(mid, half, pw, busy, a: int, b: int, bin_s: float) -> _Piecewise | None:
    # guard: readings within a sensor window (and 50 ms of settling) of activity are not idle
    guard = half + 50_000_000
    bs, be = busy
    if len(bs):
        # distance to the nearest busy interval: a reading is idle if [t-guard, t+guard] misses all
        k = np.searchsorted(bs, mid + guard, side="right") - 1  # last busy starting before t+guard
        k_ok = k >= 0
        overlaps = np.zeros(len(mid), dtype=bool)
        overlaps[k_ok] = be[k[k_ok]] > (mid[k_ok] - guard[k_ok])
        is_idle = ~overlaps
    else:
        is_idle = np.ones(len(mid), dtype=bool)
    is_idle &= np.isfinite(pw)
    if is_idle.sum() >= 5:
        ti, pi = mid[is_idle], pw[is_idle]
        edges = np.arange(a, b + 1, int(bin_s * 1e9), dtype=np.int64)
        bidx = np.searchsorted(edges, ti, side="right") - 1
        knots_t, knots_v = [], []
        for k in np.unique(bidx):  # one iteration per 30 s bin, not per sample
            m = bidx == k
            if m.sum() >= 3:
                knots_t.append(int(np.median(ti[m])))
                knots_v.append(float(np.median(pi[m])))
        if knots_t:
            if len(knots_t) == 1:
                knots_t = [a, b]
                knots_v = knots_v * 2
            return _Piecewise(np.array(knots_t), np.array(knots_v))
    if is_idle.any() and float((2 * half[is_idle]).sum()) * _NS >= 0.5:
        # A coarse sensor gives few readings, but a few averaged over half a second or
        # more of nothing in flight still measure idle far better than any fit can.
        v = float(np.median(pw[is_idle]))
        return _Piecewise(np.array([a, b]), np.array([v, v]))
    return None


class _Segments:
    """Elementary time segments between request starts and ends on one device.

    ``share_equal(x)`` splits each segment's amount ``x`` equally among the
    requests in flight; ``share_weighted`` by their weights. Both return the
    per-request totals and the amount in segments with nothing in flight. Cost:
    one sort and prefix sums, O((R + S) log R).
    """

    __slots__ = ("edges", "si", "ei", "n", "w", "weights")

    def __init__(self, starts, ends, weights, a: int, b: int) -> None:
        edges = np.sort(np.concatenate(([a, b], starts, ends)))
        edges = edges[np.concatenate(([True], edges[1:] != edges[:-1]))]
        self.edges = edges
        self.si = _search_sorted(edges, starts)
        self.ei = _search_sorted(edges, ends)
        m = len(edges) - 1
        live = self.ei > self.si
        cnt = np.bincount(self.si[live], minlength=m + 1)[: m + 1] - np.bincount(self.ei[live], minlength=m + 1)[: m + 1]
        self.n = np.cumsum(cnt)[:m].astype(np.float64)
        wd = np.bincount(self.si[live], weights=weights[live], minlength=m + 1)[: m + 1] - np.bincount(
            self.ei[live], weights=weights[live], minlength=m + 1
        )[: m + 1]
        self.w = np.cumsum(wd)[:m]
        self.w[np.abs(self.w) < 1e-12] = 0.0
        self.weights = weights

    def _share(self, x: np.ndarray, denom: np.ndarray, mult: np.ndarray | None):
        has = denom > 0
        per = np.where(has, x / np.where(has, denom, 1.0), 0.0)
        c = np.concatenate(([0.0], np.cumsum(per)))
        out = c[self.ei] - c[self.si]
        if mult is not None:
            out = out * mult
        return out, float(x[~has].sum())

    def share_equal(self, x: np.ndarray):
        return self._share(x, self.n, None)

    def share_weighted(self, x: np.ndarray):
        return self._share(x, self.w, self.weights)


# --------------------------------------------------------------------------- batch-fit


def _prefix(a: np.ndarray) -> np.ndarray:
    """Prefix sums along axis 0 with a leading row of zeros, written in place (no stacking copy)."""
    out = np.empty((a.shape[0] + 1, a.shape[1]))
    out[0] = 0.0
    out[1:] = a
    np.add.accumulate(out[1:], axis=0, out=out[1:])  # in place on a copy: ~1.7x faster than cumsum(out=)
    return out


def _search_sorted(hay: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.searchsorted(hay, q)`` (left); unsorted queries are looked up in sorted order and put
    back (cache-friendly: about 2x faster for millions of request ends)."""
    if len(q) < 4096 or bool(np.all(q[1:] >= q[:-1])):
        return np.searchsorted(hay, q)
    o = np.argsort(q, kind="stable")
    out = np.empty(len(q), dtype=np.intp)
    out[o] = np.searchsorted(hay, q[o])
    return out


class _StepFeatures:
    """Cumulative feature mass F(t) = sum_s x_s * clip((t - start_s) / dur_s, 0, 1).

    Exact for overlapping steps too: two prefix sums, over steps sorted by start
    and by end. Times are seconds relative to the period start (float64).
    """

    __slots__ = ("x", "st", "en", "dur", "_os", "_oe", "_st_sorted", "_en_sorted", "_cs_rate", "_cs_rate_st", "_ce_rate", "_ce_rate_st", "_ce_x")

    def __init__(self, x: np.ndarray, st: np.ndarray, en: np.ndarray) -> None:
        self.x, self.st, self.en = x, st, en
        self.dur = en - st
        rate = x / self.dur[:, None]
        # steps usually come in time order: skip the sorts and gathers then
        s_ok = len(st) < 2 or bool(np.all(st[1:] >= st[:-1]))
        e_ok = len(en) < 2 or bool(np.all(en[1:] >= en[:-1]))
        os_ = slice(None) if s_ok else np.argsort(st, kind="stable")
        oe = slice(None) if e_ok else np.argsort(en, kind="stable")
        self._st_sorted, self._en_sorted = st[os_], en[oe]
        rate_s = rate[os_]
        rate_e = rate_s if (s_ok and e_ok) else rate[oe]
        self._cs_rate = _prefix(rate_s)
        self._cs_rate_st = _prefix(rate_s * self._st_sorted[:, None])
        self._ce_rate = self._cs_rate if (s_ok and e_ok) else _prefix(rate_e)
        self._ce_rate_st = self._cs_rate_st if (s_ok and e_ok) else _prefix(rate_e * st[oe, None])
        self._ce_x = _prefix(x[oe])

    def mass(self, t: np.ndarray) -> np.ndarray:
        """F(t): shape (len(t), n_features)."""
        i = np.searchsorted(self._st_sorted, t, side="right")  # steps started by t
        j = np.searchsorted(self._en_sorted, t, side="right")  # steps ended by t
        running = t[:, None] * (self._cs_rate[i] - self._ce_rate[j]) - (self._cs_rate_st[i] - self._ce_rate_st[j])
        return self._ce_x[j] + running

    def density(self, t: np.ndarray) -> np.ndarray:
        """dF/dt at t: the feature rate of the steps running at that instant."""
        i = np.searchsorted(self._st_sorted, t, side="right")
        j = np.searchsorted(self._en_sorted, t, side="right")
        return self._cs_rate[i] - self._ce_rate[j]


def step_features(steps: Steps, s_idx: np.ndarray) -> np.ndarray:
    """Per-step features (see :data:`FEATURES`) for the steps ``s_idx``.

    Prefill tokens are entries with more than one token, decode tokens entries
    with one; a decode entry's context is the tokens its request had processed
    in earlier steps (prompt + generated so far).
    """
    ns = len(steps)
    st = steps.entry_step
    tok = steps.entry_tokens
    # context before each entry: the request's tokens in earlier steps
    order = np.lexsort((steps.start_ns[st], steps.entry_request))
    tok_o = tok[order]
    req_o = steps.entry_request[order]
    before = np.cumsum(tok_o) - tok_o
    first = np.concatenate(([True], req_o[1:] != req_o[:-1]))
    group = np.cumsum(first) - 1
    ctx = np.empty_like(tok)
    ctx[order] = before - before[first][group]
    decode = tok <= 1.0
    prefill_tok = np.bincount(st, weights=np.where(decode, 0.0, tok), minlength=ns)
    decode_tok = np.bincount(st, weights=np.where(decode, tok, 0.0), minlength=ns)
    decode_ctx = np.bincount(st, weights=np.where(decode, ctx + tok, 0.0), minlength=ns) / 1000.0
    dur = (steps.end_ns - steps.start_ns).astype(np.float64) * _NS
    x = np.column_stack((dur, prefill_tok, decode_tok, decode_ctx))
    return x[s_idx]


def nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 100) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson) for the few columns we fit.

    Works on the normal equations (columns scaled to unit norm): with millions
    of readings and four features, one pass over the data builds the 4x4 Gram
    matrix and everything after is tiny.
    """
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    As = A / scale
    x = nnls_gram(As.T @ As, As.T @ b, max_iter)
    return x / scale


def _waits(seg: "_Segments", st_ns: np.ndarray, en_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The device's waits: stretches with requests in flight but none of its own steps
    running (``[start, end)`` in ns, merged). A pipeline stage waits while the other
    stages run its micro-batch; a lone GPU waits for the host between steps."""
    if not len(st_ns) or len(seg.edges) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    o = np.argsort(st_ns, kind="stable")
    ss, se = st_ns[o], np.maximum.accumulate(en_ns[o])
    new = np.concatenate(([True], ss[1:] > se[:-1]))
    ms = ss[new]
    me = np.maximum.reduceat(se, np.flatnonzero(new))
    lo, hi = seg.edges[0], seg.edges[-1]
    e = np.unique(np.concatenate((seg.edges, np.clip(ms, lo, hi), np.clip(me, lo, hi))))
    left = e[:-1]
    inflight = seg.n[np.clip(np.searchsorted(seg.edges, left, side="right") - 1, 0, len(seg.n) - 1)] > 0
    k = np.searchsorted(ms, left, side="right") - 1
    in_step = (k >= 0) & (me[np.maximum(k, 0)] > left)
    flag = inflight & ~in_step
    if not flag.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    d = np.diff(np.concatenate(([0], flag.astype(np.int8), [0])))
    return e[np.flatnonzero(d == 1)], e[np.flatnonzero(d == -1)]


#: The wait terms, fitted beside the step terms: W while the device waits with requests in
#: flight (a pipeline bubble, clocks held between steps) and J per wait (the electrical tail
#: of the step before it: power decays over milliseconds, not at the step's end).
WAIT_TERMS = ("wait_s", "waits")
_WAIT_SHARE = 0.1  # waits this share of the in-flight time or more: the device is a pipeline stage


def _batch_fit(cum, trace, steps, s_idx, requests, ridx, seg, idle_curve, a, b, reconcile_s, model):
    """Dynamic energy per request of one device by the batch-fit method."""
    st_ns = steps.start_ns[s_idx]
    en_ns = steps.end_ns[s_idx]
    x4 = step_features(steps, s_idx)
    rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
    x, rates = basis(x4, model.rates if model is not None else None)
    feats = _StepFeatures(x, rel(st_ns), rel(en_ns))
    # The waits between the device's own steps, as rows of two more terms: what the sensor
    # reads there is explained by them, and their energy is shared by time among the
    # requests in flight (no step ran), not by the tokens of the steps next to them.
    w_st, w_en = _waits(seg, st_ns, en_ns)
    nb, nw = x.shape[1], len(WAIT_TERMS)
    if len(w_st):
        xw = np.zeros((len(w_st), nb + nw))
        xw[:, nb] = (w_en - w_st) * _NS
        xw[:, nb + 1] = 1.0
        fit_feats = _StepFeatures(np.vstack((np.hstack((x, np.zeros((len(x), nw)))), xw)),
                                  np.concatenate((rel(st_ns), rel(w_st))), np.concatenate((rel(en_ns), rel(w_en))))
        families = dict(FAMILIES)
        families.update({f"{k}+wait": v + tuple(range(nb, nb + nw)) for k, v in FAMILIES.items()})
    else:
        fit_feats = feats
        families = FAMILIES

    # 1. Fit: every reading is a linear function of the steps it overlaps; the
    #    family of step terms is chosen by blocked cross-validation in time.
    A, y, w_row, t_row, overlap, len_row = _fit_rows(cum, trace, feats, idle_curve, a, b, rel, with_weights=True)
    shift_ns = 0
    sel = None
    with_waits = False
    if model is None:
        sel = select_family(A, y) if len(y) else None
        # A coarse sensor's reading may be stale (a counter read some time after the driver
        # refreshed it): try reading the trace a fraction of its interval earlier, keep what
        # predicts held-out readings best.
        interval = _typical_interval(t_row) if len(t_row) > 2 else 0
        if sel is not None and interval >= 20_000_000:
            for frac in (0.25, 0.5):
                d_ns = int(interval * frac)
                cum_d, trace_d = _shifted(cum, trace, d_ns)
                rows_d = _fit_rows(cum_d, trace_d, feats, idle_curve, a, b, rel, with_weights=True)
                sel_d = select_family(rows_d[0], rows_d[1]) if len(rows_d[1]) else None
                # a shift must win clearly: by more than the held-out error's own noise
                if sel_d is not None and sel_d.cv_error < sel.cv_error * (1 - max(0.03, 1 / math.sqrt(len(rows_d[1])))):
                    sel, shift_ns = sel_d, d_ns
                    A, y, w_row, t_row, overlap, len_row = rows_d
            if shift_ns:
                cum, trace = _shifted(cum, trace, shift_ns)
        if sel is not None and len(w_st):
            # The same readings with the waits' terms beside the steps'. A device that waits
            # a material part of its busy time (a pipeline stage: the other stages run its
            # micro-batch) always gets them, read on time: its wait energy (the electrical
            # tail of each step, clocks held in the bubble) is a large share of its dynamic
            # energy and is no step's. Elsewhere (a lone GPU's host gaps) and where the
            # readings' timing had to be corrected (a stale counter: a shift of a quarter
            # interval is wider than a stage's slice, so steps and waits blur), only when
            # they predict held-out readings clearly better.
            rows_w = _fit_rows(cum, trace, fit_feats, idle_curve, a, b, rel, with_weights=True)
            busy_s = float(np.diff(seg.edges)[seg.n > 0].sum())
            stage = not shift_ns and float((w_en - w_st).sum()) >= _WAIT_SHARE * busy_s
            fam_w = ({k: v for k, v in families.items() if k.endswith("+wait")} if stage
                     else {f"{sel.family}+wait": families[f"{sel.family}+wait"]})
            sel_w = select_family(rows_w[0], rows_w[1], families=fam_w) if len(rows_w[1]) else None
            if sel_w is not None and np.any(sel_w.coef[nb:]) and (
                    stage or sel_w.cv_error < sel.cv_error * (1 - max(0.03, 1 / math.sqrt(len(rows_w[1]))))):
                sel, with_waits = sel_w, True
                A, y, w_row, t_row, overlap, len_row = rows_w
        if sel is not None and np.any(sel.coef):
            family, why = sel.family, sel.why
            if with_waits:  # the steps' family, the wait terms beside it (StepModel.wait_coef)
                family, why = family[: -len("+wait")], why + "; with the waits' terms (W while waiting, J per wait)"
            model = StepModel(sel.coef, sel.r2, sel.rows, family, sel.cv_error, sel.cv_r2, why, sel.candidates, rates)
        else:
            # Too little to fit: every step costs in proportion to its duration.
            model = StepModel(np.eye(len(BASIS))[0], math.nan, 0, "duration", why="too few readings to fit: energy by step duration", rates=rates)
    coef = model.full_coef
    if model is not None and sel is None and len(w_st) and np.any(model.wait_coef):
        with_waits = True  # a given model (a live period) with wait terms
        A, y, w_row, t_row, overlap, len_row = _fit_rows(cum, trace, fit_feats, idle_curve, a, b, rel, with_weights=True)
    if not with_waits:
        fit_feats = feats
    coef_w = model.wait_coef if with_waits else np.zeros(0)
    coef_fit = np.concatenate((coef, coef_w))

    # 2. Reconcile: the window length is chosen by predicting held-out readings
    #    from the model scaled to what the rest of their window measured.
    window_why = "given"
    band_rel = math.nan
    noise = None
    if reconcile_s is None:
        m_row = y * w_row
        p_row = (A @ coef_fit) * w_row
        base = max(_typical_interval(t_row), 1_000_000) if len(t_row) > 2 else (b - a)
        lengths = base * (2 ** np.arange(0, 40))
        lengths = lengths[lengths < (b - a)]
        if len(t_row) >= 8 and np.any(p_row > 0):
            # Readings whose errors are correlated over longer than a step or two
            # (aliasing of periodic load with a sensor's refresh, part-time
            # coverage) would vouch for each other: leave them out together.
            g = m_row.sum() / p_row.sum() if p_row.sum() > 0 else 1.0
            lag = correlation_lag(m_row - g * p_row)
            step_ns = float(np.median(en_ns - st_ns))
            spacing = max(float(np.median(np.diff(t_row))), 1.0)
            excess = max(0, lag - int(math.ceil(2 * step_ns / spacing)))
            L, scores, pred = select_window(t_row, m_row, p_row, a, b, lengths, max(overlap, excess))
            reconcile_s = L * _NS
            window_why = f"lowest held-out error of {len(scores)} window lengths"
            band_rel = _band_rel(m_row, pred, p_row)
            noise = _noise_model(m_row - pred, p_row, t_row, len_row, m_row, x @ coef, feats, rel, a, L,
                                 max(overlap, excess))
        else:
            reconcile_s = (b - a) * _NS
            window_why = "too few readings: the whole period"
    edges = _reconcile_edges(cum, trace, a, b, reconcile_s)
    w_meas = cum.over(edges) - idle_curve.over(edges)
    F = fit_feats.mass(rel(edges))
    w_pred = np.diff(F, axis=0) @ coef_fit
    ok = (w_pred > 1e-12) & (w_meas > 0)
    scale = np.where(ok, w_meas / np.where(ok, w_pred, 1.0), 0.0)
    resid = w_meas - scale * w_pred  # nonzero only where nothing was predicted, or measured <= idle

    # 3. Each step's energy: its fitted power times the integrated scale over its span.
    e_rel = rel(edges)
    cum_scale = np.concatenate(([0.0], np.cumsum(scale * np.diff(e_rel))))

    def scale_integral(t):  # t already clipped to [e_rel[0], e_rel[-1]]
        k = np.clip(np.searchsorted(e_rel, t, side="right") - 1, 0, len(scale) - 1)
        return cum_scale[k] + scale[k] * (t - e_rel[k])

    lo = np.clip(rel(st_ns), e_rel[0], e_rel[-1])
    hi = np.clip(rel(en_ns), e_rel[0], e_rel[-1])
    step_power = (x @ coef) / feats.dur  # W at scale 1
    scale_span = scale_integral(hi) - scale_integral(lo)  # integrated scale over each step (s)
    e_step = step_power * scale_span

    # 4. Steps to requests by tokens; entries' request indices map into ridx order.
    local = np.full(len(requests), -1, dtype=np.int64)
    local[ridx] = np.arange(len(ridx))
    step_pos = np.full(len(steps), -1, dtype=np.int64)
    step_pos[s_idx] = np.arange(len(s_idx))
    em = step_pos[steps.entry_step] >= 0
    e_s = step_pos[steps.entry_step[em]]
    e_r = local[steps.entry_request[em]]
    e_t = steps.entry_tokens[em]
    tok_sum = np.bincount(e_s, weights=e_t, minlength=len(s_idx))
    share = np.where(tok_sum[e_s] > 0, e_t / np.where(tok_sum[e_s] > 0, tok_sum[e_s], 1.0), 0.0)
    val = e_step[e_s] * share
    on_dev = e_r >= 0
    dyn = np.bincount(e_r[on_dev], weights=val[on_dev], minlength=len(ridx))
    lost = float(val[~on_dev].sum()) + float(e_step[tok_sum == 0].sum())  # steps naming requests of another device

    # 4b. What the fit does not know: the same split under the bootstrap's coefficients
    #     and under the other families, per request (for the error band).
    if sel is not None and sel.boot is not None and sel.boot.shape[1] > nb:  # the steps' terms only
        sel = dataclasses.replace(sel, boot=sel.boot[:, :nb], fits={f: v[:nb] for f, v in (sel.fits or {}).items()})
    spread = _dyn_spread(sel, coef, x, np.where(feats.dur > 0, scale_span / np.where(feats.dur > 0, feats.dur, 1.0), 0.0),
                         e_s, e_r, share, on_dev, len(ridx))
    # Per request: sum over its steps of (its share of the step's energy)^2, for the step-noise term.
    s2 = np.bincount(e_r[on_dev], weights=(e_step[e_s[on_dev]] * share[on_dev]) ** 2, minlength=len(ridx))
    spread = (*spread, s2, noise)
    extra_noise = noise

    # 5. The residual, as a piecewise-constant power over windows, shared by time.
    res_rate = resid / np.diff(e_rel)
    res_curve_c = np.concatenate(([0.0], np.cumsum(resid)))
    seg_rel = rel(seg.edges)
    k = np.clip(np.searchsorted(e_rel, seg_rel, side="right") - 1, 0, len(resid) - 1)
    cres = res_curve_c[k] + res_rate[k] * np.clip(seg_rel - e_rel[k], 0, e_rel[k + 1] - e_rel[k])
    dyn_t, un_t = seg.share_weighted(np.diff(cres))
    dyn = dyn + dyn_t
    wait_j = 0.0
    if with_waits and np.any(coef_w):
        # 5b. The waits' fitted energy, scaled like the steps', shared by time.
        w_lo = np.clip(rel(w_st), e_rel[0], e_rel[-1])
        w_hi = np.clip(rel(w_en), e_rel[0], e_rel[-1])
        w_dur = np.maximum(w_hi - w_lo, 1e-12)
        e_wait = (coef_w[0] + coef_w[1] / w_dur) * (scale_integral(w_hi) - scale_integral(w_lo))
        wf = _StepFeatures(e_wait[:, None], w_lo, w_lo + w_dur)
        dyn_w, un_w = seg.share_weighted(np.diff(wf.mass(seg_rel)[:, 0]))
        dyn = dyn + dyn_w
        un_t = un_t + un_w
        wait_j = float(e_wait.sum())
    extra = {
        "steps": int(len(s_idx)),
        "model": model,
        "windows": int(len(scale)),
        "scale_p5": float(np.quantile(scale[ok], 0.05)) if ok.any() else math.nan,
        "scale_p95": float(np.quantile(scale[ok], 0.95)) if ok.any() else math.nan,
        "window_s": float(reconcile_s),
        "window_why": window_why,
        "band_rel": band_rel,
        "shift_s": shift_ns * _NS,
        "noise": extra_noise,
        "wait_j": wait_j,
    }
    return dyn, un_t + lost, extra, spread


def _prefer_power(cum, trace, steps, s_idx, a, b) -> bool:
    """Whether a trace's power readings predict held-out readings clearly better than its
    energy counter does (each fitted with the full basis and an idle intercept)."""
    if _typical_interval(cum.t) >= 0.9 * trace.window_ns > 0:
        # the counter is read no more often than the averages cover: each average is the exact
        # mean over its window, read on time; the counter value is as old as its last refresh
        return True
    x, _ = basis(step_features(steps, s_idx))
    rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
    feats = _StepFeatures(x, rel(steps.start_ns[s_idx]), rel(steps.end_ns[s_idx]))
    zero = _Piecewise(np.array([a, b], dtype=np.int64), np.zeros(2))
    fam = {"all": tuple(range(x.shape[1] + 1))}
    scores = []
    for c, tr in ((cum, trace), (_CumEnergy.from_trace(dataclasses.replace(trace, energy_j=None)), dataclasses.replace(trace, energy_j=None))):
        A, y, one = _fit_rows(c, tr, feats, zero, a, b, rel, with_time=True)
        pick = _chunks(len(y))
        sel = select_family(np.column_stack((one, A))[pick], y[pick], families=fam) if len(y) >= 8 else None
        scores.append(sel.cv_error if sel is not None else math.inf)
    return scores[1] < 0.6 * scores[0]  # the counter has its stale-reading shift still to come


def _fit_idle(cum, trace, steps, s_idx, requests, a, b) -> float | None:
    """The idle baseline (W) as the intercept of the step-model regression, or None."""
    x = step_features(steps, s_idx)
    rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
    feats = _StepFeatures(x, rel(steps.start_ns[s_idx]), rel(steps.end_ns[s_idx]))
    zero = _Piecewise(np.array([a, b], dtype=np.int64), np.zeros(2))
    A, y, one = _fit_rows(cum, trace, feats, zero, a, b, rel, with_time=True)
    if len(y) < 4 * (x.shape[1] + 1):
        return None
    coef = nnls(np.column_stack((one, A)), y)
    return float(coef[0]) if coef[0] > 0 else None


def _fit_rows(cum, trace, feats, idle_curve, a, b, rel, with_time=False, with_weights=False):
    """Regression rows (A, y): one per sensor reading inside the period.

    ``with_weights`` also returns each row's length in seconds (rows times it are
    energies), its end time (ns) and how many neighbouring rows overlap it.
    """
    p = feats.x.shape[1]
    if cum.source == "energy-counter":
        t = cum.t[(cum.t >= a) & (cum.t <= b)]
        if len(t) >= 3:
            lo, hi = t[:-1], t[1:]
            if with_weights:
                pick = _chunks(len(hi))
                lo, hi = lo[pick], hi[pick]
            y = cum.energy(lo, hi) - idle_curve.integral(lo, hi)
            A = feats.mass(rel(hi)) - feats.mass(rel(lo))
            if with_weights:
                return A, y, np.ones(len(y)), hi, 0, (hi - lo).astype(np.float64)
            return (A, y, (hi - lo) * _NS) if with_time else (A, y)
    if trace.power_w is None:
        if with_weights:
            return np.zeros((0, p)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), 0, np.zeros(0)
        empty = np.zeros((0, p)), np.zeros(0)
        return (*empty, np.zeros(0)) if with_time else empty
    t, pv, span = power_points(trace)
    ok = (t >= a) & (t <= b)
    if span:
        ok &= t - span >= a
    t, pv = t[ok], pv[ok]
    if with_weights:
        dt_all = _typical_interval(t) if len(t) > 2 else span
        pick = _chunks(len(t))
        t, pv = t[pick], pv[pick]
    if span:
        lo = t - span
        A = (feats.mass(rel(t)) - feats.mass(rel(lo))) / (span * _NS)
        y = pv - idle_curve.integral(lo, t) / (span * _NS)
    else:
        A = feats.density(rel(t))
        y = pv - idle_curve(t)
    if with_weights:
        dt = dt_all
        overlap = int(math.ceil(span / dt)) - 1 if span and dt else 0
        return A, y, np.full(len(y), max(span, dt) * _NS), t, max(overlap, 0), np.full(len(y), float(max(span, dt)))
    return (A, y, np.ones(len(y))) if with_time else (A, y)


def _dyn_spread(sel, coef, x, scale_per_s, e_s, e_r, share, on_dev, n_req):
    """Per-request spread of dynamic energy across alternative step models:
    ``(bootstrap sd, largest departure under a close family)``, joules; zeros without a fit.

    Linear in the coefficients: each request's dynamic energy is ``B_i . c`` with ``B_i``
    its token share of its steps' basis terms times their reconciliation scale. Each
    alternative is renormalised to the same total (reconciliation keeps measured totals),
    so what remains is how it would move energy between requests."""
    z = np.zeros(n_req)
    if sel is None or sel.boot is None or not len(e_s):
        return z, z
    w = share[on_dev]
    r = e_r[on_dev]
    s_on = e_s[on_dev]
    xw = x * scale_per_s[:, None]  # each step's basis terms times its reconciliation scale
    fam = [v for f, v in (sel.fits or {}).items() if f != sel.family and np.any(v)
           and sel.candidates.get(f, math.inf) <= 1.25 * sel.cv_error]
    tot = np.bincount(s_on, weights=w, minlength=len(x)) @ xw  # basis totals over the requests
    base = float(tot @ coef)
    if base <= 0:
        return z, z

    def norm(C):
        t = C @ tot
        return C * np.where(t > 0, base / np.where(t > 0, t, 1.0), 0.0)[:, None]

    def per_request(direction):  # B_i . direction, for every request, in one pass over the entries
        return np.bincount(r, weights=(xw @ direction)[s_on] * w, minlength=n_req)

    boots = norm(sel.boot)
    cov = np.cov(boots.T) if len(boots) > 1 else np.zeros((len(coef), len(coef)))
    lam, vec = np.linalg.eigh(cov)
    keep = np.argsort(lam)[::-1][:3]  # the three main directions carry nearly all the spread
    keep = keep[lam[keep] > 1e-6 * max(float(lam.max()), 1e-300)]
    sd = np.sqrt(sum(per_request(vec[:, k] * math.sqrt(lam[k])) ** 2 for k in keep)) if len(keep) else z
    dep = z
    if fam:
        D = norm(np.array(fam)) - boots.mean(0)
        dep = np.max([np.abs(per_request(d)) for d in D[:3]], axis=0)
    return sd, dep


_SELECT_ROWS = 200_000  # readings the window choice and the error model look at, at most
_Z90 = 1.6449  # two-sided 90 %: +-1.645 standard deviations
_IDLE_REL = 0.015  # relative sd of a request's idle share: the baseline moves a few W over tens of s


def _quality(extra: dict) -> str:
    """``good``: the model predicts held-out readings well and the sensor resolves requests;
    ``coarse``: it predicts them well but the readings are coarse (the band says how coarse);
    ``misfit``: the model explains little of the held-out readings (or could not be fitted)."""
    m = extra.get("model")
    if m is None or not m.rows or not (m.cv_r2 >= 0.5):
        return "misfit"
    nz = extra.get("noise") or {}
    return "coarse" if nz.get("reading_ns", 0.0) > 25e6 else "good"


def _dyn_half_width(dyn, spread, starts, ends, extra) -> np.ndarray:
    """One standard deviation (J) of each batch-fit request's dynamic energy (see the README)."""
    sd, dep, s2, noise = spread
    # the truth could lie anywhere between the chosen model and a close runner-up: a
    # uniform spread over +-dep has standard deviation dep / sqrt(3)
    var = sd**2 + dep**2 / 3.0
    if noise is None:
        cv = extra["model"].cv_error if extra.get("model") is not None else math.nan
        rel_sd = cv if math.isfinite(cv) else 0.25
        return np.sqrt(var + (rel_sd * dyn) ** 2)
    life = np.maximum((ends - starts).astype(np.float64), 1.0)
    groups = noise["groups"]
    if groups:
        gs = np.array(sorted(groups), dtype=np.float64)
        sig = np.array([groups[g] for g in sorted(groups)])
        G = np.maximum(1.0, life / noise["spacing_ns"])
        sig_i = np.interp(np.log2(G), np.log2(gs), sig)
        # longer than the longest group checked (half a window): the windows inside the
        # request are measured, the errors of its parts average out
        far = G > gs[-1]
        sig_i[far] = sig[-1] * np.sqrt(gs[-1] / G[far])
    else:
        sig_i = np.full(len(dyn), 0.25)
    # A request shorter than a reading is placed inside it by the model alone.
    # ... and a step inside a reconciliation window much longer than itself gets the model's
    # share of the window, whatever the step really drew.
    L, sd_ns = noise.get("window_ns", 0.0), noise.get("step_ns", 0.0)
    u_w = max(0.0, 1.0 - sd_ns / L) if L > 0 else 0.0
    u = np.maximum(np.minimum(1.0, noise["reading_ns"] / life), u_w)
    # the held-out groups already hold the steps' scatter at their scale: the step term adds
    # only where it says more (a request whose energy sits in a few steps)
    var = var + np.maximum((sig_i * dyn) ** 2, noise["step_var"] * s2 * u)
    return np.sqrt(var)


def _noise_model(r, p, t, len_ns, m, e_mod, feats, rel, a, L, overlap):
    """What the held-out readings say about each request's error.

    ``groups``: {G readings: relative sigma} of a run of G readings predicted from the
    rest of its window (see :func:`wattspan._stepmodel.group_errors`). ``step_var``: the
    relative variance of one batch step's energy about the model, if all of a single
    reading's held-out scatter is put on its steps (sum of squared step energies in it);
    it matters for requests shorter than a reading, whose placement inside the reading no
    reading can check. ``spacing_ns``: the readings' spacing."""
    if len(r) < 8:
        return None
    spacing = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
    groups = group_errors(t, m, p, a, L, sizes, overlap)
    sq = _StepFeatures((e_mod**2)[:, None], feats.st, feats.en)
    t_rel = rel(t)
    Q = (sq.mass(t_rel) - sq.mass(t_rel - len_ns * _NS))[:, 0]
    w_typ = float(np.median(len_ns)) * _NS
    ok = Q > 0
    step_var = 0.0
    if ok.sum() >= 8:
        # squared held-out residuals = step noise x (sum of squared step energies) + sensor
        # noise x (predicted energy)^2: non-negative least squares splits the two
        A2 = np.column_stack((Q[ok], p[ok] ** 2))
        split = float(nnls(A2, r[ok] ** 2)[0])
        # When the two regressors move together (many similar steps per reading) the split
        # is not identified: all of the scatter on the steps bounds it from above. Take the
        # geometric mean of the split and that bound, weighted to the bound as they align.
        upper = float(np.sum(r[ok] ** 2) / np.sum(Q[ok]))
        with np.errstate(all="ignore"):
            rho = float(np.corrcoef(Q[ok], p[ok] ** 2)[0, 1]) if np.std(Q[ok]) > 0 and np.std(p[ok] ** 2) > 0 else 1.0
        rho = rho if math.isfinite(rho) else 1.0
        wgt = 0.5 + 0.5 * min(max(rho, 0.0), 1.0)
        step_var = math.exp(wgt * math.log(max(upper, 1e-12)) + (1 - wgt) * math.log(max(split, 1e-12))) if upper > 0 else 0.0
    return {"groups": groups, "step_var": step_var, "spacing_ns": spacing, "reading_ns": max(w_typ * 1e9, spacing),
            "window_ns": float(L), "step_ns": float(np.median(feats.dur)) * 1e9}


def _shifted(cum, trace, d_ns: int):
    """The cumulative energy and trace read ``d_ns`` earlier (a stale-reading correction)."""
    c = _CumEnergy(cum.t - d_ns, cum.e, cum.source)
    return c, dataclasses.replace(trace, t_ns=trace.t_ns - d_ns)


def _chunks(n: int, limit: int | None = None) -> np.ndarray | slice:
    """Rows to fit and choose on: all of them, or with millions of readings, 8 evenly spaced
    stretches of consecutive ones (the fit needs a few thousand readings, the window choice
    runs of consecutive ones; the reconciliation itself uses every reading)."""
    limit = limit or _SELECT_ROWS
    if n <= limit:
        return slice(None)
    size = limit // 8
    starts = np.linspace(0, n - size, 8).astype(np.int64)
    return (starts[:, None] + np.arange(size)[None, :]).ravel()


def _band_rel(m: np.ndarray, pred: np.ndarray, p: np.ndarray) -> float:
    """90 % quantile of a held-out reading's relative error (measured vs predicted dynamic energy),
    over the readings carrying the most predicted energy (the ones requests are made of)."""
    ok = p > 0
    if ok.sum() < 8:
        return math.nan
    heavy = p >= np.quantile(p[ok], 0.25)
    heavy &= ok
    r = np.abs(m[heavy] - pred[heavy]) / np.maximum(pred[heavy], 1e-12)
    return float(np.quantile(r, 0.9))


def _reconcile_edges(cum, trace, a, b, reconcile_s):
    """Window edges for reconciliation, always starting at ``a`` and ending at ``b``.

    ``reconcile_s`` is normally chosen by held-out readings (see ``_batch_fit``);
    the fallbacks below (a counter every 0.5 s or 5 updates, a true instant
    sensor every 8 readings, a part-time or averaged reading every 30 s) only
    serve a caller that passes ``None`` directly.
    """
    if reconcile_s is None:
        if cum.source == "energy-counter":
            reconcile_s = max(0.5, 5 * _typical_interval(cum.t) * _NS)
        else:
            t, _, span = power_points(trace)
            reconcile_s = 30.0 if span else max(8 * _typical_interval(t) * _NS, 1e-3)
    step = int(reconcile_s * 1e9)
    inner = np.arange(a + step, b, step, dtype=np.int64)
    return np.concatenate(([a], inner, [b])).astype(np.int64)


def _conserve(measured: float, dyn: np.ndarray, idle_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Never bill requests more than was measured: when the shares add up to more
    (a configured idle baseline above the readings, a fit that over-reaches), scale
    them down in proportion, so requests + unattributed = measured with
    unattributed >= 0."""
    total = float(dyn.sum() + idle_share.sum())
    cap = measured if math.isfinite(measured) and measured > 0 else 0.0
    if total <= cap:
        return dyn, idle_share
    k = cap / total if total > 0 else 0.0
    return dyn * k, idle_share * k
