"""Apportion measured energy to requests.

The conventions (see the README's "How energy is apportioned"):

* **dynamic** energy is measured energy above the idle baseline;
* a **batch step**'s dynamic energy is split among its requests in proportion to
  their weights (the tokens each processed in that step);
* a **wait** (requests in flight on a device, none of its own steps running) is
  the step's that another device runs for those requests meanwhile (a pipeline's
  other stage), split by its tokens; a wait no such step covers is shared by time;
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
saturating, combinations: :mod:`wattspan.attribution.family`) by blocked
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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..devices import device_key
from ..samples import DeviceTrace, SampleKind
from .energy import _CumEnergy, _Piecewise, _lead_ns
from .fit import BAND_PARTS, _IDLE_REL, _Segments, _Z90, _batch_fit, _dyn_half_width, _fit_idle, _prefer_power, _quality
from .idle import _busy_intervals, _estimate_idle, idle_rel_sd
from .inputs import Requests, Steps, _NS, check_board_lag, check_trace
from .reconcile import _conserve
from .results import Attribution, DeviceSummary, StepModel

__all__ = ["attribute"]


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
    board_lag_s: float | Mapping[str, float] | None = None,
    wait_owners: Steps | None = None,
) -> Attribution:
    """Apportion each device's measured energy over ``[t0_ns, t1_ns]`` to ``requests``.

    ``idle_w``: the idle baseline in watts (one value, or per device); ``None``
    estimates it from the trace (median power in periods with nothing in flight,
    tracked in 30 s bins; a low quantile of the readings if there are none).
    ``t0_ns``/``t1_ns`` default to each device trace's first and last reading;
    requests are clipped to the period (the live meter attributes period by
    period and sums). ``reconcile_s`` overrides the reconciliation window for
    power-only sensors. ``models`` gives a step model per device to use instead
    of fitting one (for short live periods). ``board_lag_s``: the electrical lag of each
    device's board (first-order time constant, s; one value, or per device), measured
    once on fine readings of the same GPU model: the step model is then fitted through
    it on the device's own readings, at any interval, instead of the lag being searched
    (readings over 50 ms apart cannot show one); 0 for none. A device given a model
    keeps that model's lag. (Not the live meter's ``lag_s``: how long it waits for a
    sensor's readings.) ``wait_owners``: for requests and steps that each name one device, the
    steps other devices ran for those requests (a pipeline's other stages; ``device``: the
    device whose waits each owns, entries indexing ``requests``): a device's energy while it
    waits during one is that step's, by its tokens. Device groups derive them themselves.
    """
    board_lag_s = check_board_lag(board_lag_s)
    if not isinstance(traces, Mapping):
        traces = {t.device: t for t in traces}
    traces = {device_key(k): v for k, v in traces.items()}
    from .groups import any_group, attribute_grouped

    kw: dict[str, Any] = dict(idle_w=idle_w, t0_ns=t0_ns, t1_ns=t1_ns, reconcile_s=reconcile_s, models=models, board_lag_s=board_lag_s)
    if any_group(requests, steps):  # device groups: per member device, summed per request
        if wait_owners is not None:
            raise ValueError("wait_owners is for requests and steps that each name one device; device groups derive their own")
        return attribute_grouped(_attribute_devices, traces, requests, steps, **kw)
    return _attribute_devices(traces, requests, steps, wait_owners=wait_owners, **kw)


def _attribute_devices(
    traces: Mapping[str, DeviceTrace],
    requests: Requests,
    steps: Steps | None,
    *,
    idle_w: float | Mapping[str, float] | None,
    t0_ns: int | None,
    t1_ns: int | None,
    reconcile_s: float | None,
    models: Mapping[str, StepModel] | None,
    board_lag_s: float | Mapping[str, float] | None,
    wait_owners: Steps | None = None,
    shared_steps: set[str] | frozenset[str] = frozenset(),
) -> Attribution:
    """:func:`attribute` of requests and steps that each name one device (``traces`` keyed and
    ``board_lag_s`` checked). ``wait_owners``: steps other devices run for each device's requests
    (a pipeline's other stages, from :func:`.groups.attribute_grouped`), which own what a device
    draws while it waits during them. ``shared_steps``: the devices whose steps are a group's
    whole steps (no clock offset is searched on them)."""
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
        check_trace(trace)  # negative or infinite watts, a counter going back, no reading: a TraceError naming it
        rmask = req_dev == dev
        ridx = np.flatnonzero(rmask)
        # every request on this device (one device): a slice, not a gather and scatter of each column
        rsel = slice(None) if len(ridx) == n else ridx
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
        starts = np.clip(requests.start_ns[rsel], a, b)
        ends = np.clip(requests.end_ns[rsel], a, b)
        life = (requests.end_ns[rsel] - requests.start_ns[rsel]).astype(np.float64)
        cov_num = (np.clip(requests.end_ns[rsel], tr_t0, tr_t1) - np.clip(requests.start_ns[rsel], tr_t0, tr_t1)).astype(np.float64)
        coverage[rsel] = np.where(life > 0, cov_num / np.where(life > 0, life, 1), 1.0)

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
        seg = _Segments(starts, ends, requests.weight[rsel], a, b)
        idle_seg = idle_curve.over(seg.edges)
        meas_seg = cum.over(seg.edges)
        idle_share, idle_un = seg.share_equal(idle_seg)
        dev_time, _ = seg.share_equal(np.diff(seg.edges).astype(np.float64) * _NS)

        measured = float(cum.energy(np.array([a]), np.array([b]))[0])
        summary_extra: dict[str, Any] = {}

        s_idx = np.flatnonzero(step_dev == dev) if steps is not None else np.empty(0, dtype=np.int64)
        fit_rel = _IDLE_REL
        if len(s_idx) and steps is not None and idle_source == "low-quantile":
            # Never idle: a low quantile of the readings still holds dynamic power.
            # Fit the baseline as the intercept of the step model instead.
            fitted = _fit_idle(cum, trace, steps, s_idx, requests, a, b, seg)
            if fitted is not None:
                fit_w, fit_rel = fitted
                idle_curve = _Piecewise(np.array([a, b], dtype=np.int64), np.array([fit_w, fit_w]))
                idle_source = "fit-intercept"
                idle_seg = idle_curve.over(seg.edges)
                idle_share, idle_un = seg.share_equal(idle_seg)
        meth: np.ndarray | str
        slow_w: np.ndarray | None = None
        if len(s_idx) and steps is not None:
            model = models.get(dev) if models else None
            lag = board_lag_s.get(dev) if isinstance(board_lag_s, Mapping) else board_lag_s
            dyn, dyn_un, summary_extra, spread = _batch_fit(
                cum, trace, steps, s_idx, requests, ridx, seg, idle_curve, a, b, reconcile_s, model,
                None if lag is None else float(lag), wait_owners,
                np.flatnonzero(wait_owners.device == dev) if wait_owners is not None else None, busy,
                scan_offset=dev not in shared_steps,
            )
            slow_w = summary_extra.pop("idle_slow_w", None)
            in_steps = np.zeros(len(requests), dtype=np.bool_)
            on_this = np.zeros(len(steps), dtype=np.bool_)
            on_this[s_idx] = True
            in_steps[steps.entry_request[on_this[steps.entry_step]]] = True
            is_fit = in_steps[rsel]
            all_fit = bool(is_fit.all())  # every request in some step: one value for all, no gather
            meth = "batch-fit" if all_fit else np.array(["time-share", "batch-fit"], dtype=object)[is_fit.astype(np.intp)]
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
        parts: dict[str, np.ndarray] = {}
        take = slice(None, None, max(1, len(dyn) // _PARTS_SAMPLE))  # the requests the band is taken apart on
        if len(s_idx):
            hd = _dyn_half_width(dyn, spread, starts, ends, summary_extra, parts, take)
            if dev_quality == "misfit" and "misfit_var" not in (summary_extra.get("noise") or {}):
                # the model explains little of what the sensor saw: the split inside each
                # window is uncertain by the share it leaves unexplained
                r2 = summary_extra["model"].cv_r2 if summary_extra.get("model") is not None else math.nan
                floor = (1.0 - (max(r2, 0.0) if math.isfinite(r2) else 0.0)) * dyn
                bind = floor[take] > hd[take]
                parts = {k: np.where(bind, 0.0, v) for k, v in parts.items()}
                parts["misfit"] = np.where(bind, floor[take] ** 2, 0.0)
                hd = np.maximum(hd, floor)
            half_dyn[rsel] = hd if all_fit else np.where(is_fit, hd, dyn)
            quality[rsel] = dev_quality if all_fit else np.array(["coarse", dev_quality], dtype=object)[is_fit.astype(np.intp)]
        else:
            half_dyn[rsel] = dyn  # a time-overlap split can be off by its whole dynamic share
            quality[rsel] = "coarse"
        # The idle baseline's error moves joules between idle and dynamic inside each measured
        # window: a request gains the idle it was given and loses its dynamic share of the
        # same joules, net: its time share less its dynamic share of the window's idle.
        rel_idle: np.ndarray | float | None = None
        if idle_source == "idle-periods":
            rel_idle = idle_rel_sd(trace, busy, starts + (ends - starts) // 2, (a, b), idle_curve, slow_w)  # no int64 overflow
        elif idle_source == "fit-intercept":
            rel_idle = fit_rel  # the intercept's own spread: the device never idled
        k_id = float(idle_share.sum() / dyn.sum()) if len(s_idx) and float(dyn.sum()) > 0 else 0.0
        half_idle[rsel] = (_IDLE_REL if rel_idle is None else rel_idle) * np.abs(idle_share - k_id * dyn)
        if parts:
            parts["idle"] = half_idle[rsel][take] ** 2
            summary_extra["band_parts"] = band_parts(parts, None if all_fit else is_fit[take])
        dynamic[rsel] += dyn
        idle[rsel] += idle_share
        dev_s[rsel] += dev_time
        method[rsel] = meth
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


_PARTS_SAMPLE = 65_536  # requests a device's band_parts are averaged over, at most (every k-th)


def band_parts(parts: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """What a device's bands are made of: for each source (:data:`wattspan.attribution.fit.BAND_PARTS`),
    its share of a request's band variance, averaged over the requests (``mask``: those the
    parts are for); the shares sum to 1 (to four decimals). Sources under 0.005 % are left out."""
    n = max((np.size(v) for v in parts.values()), default=0)
    if n == 0:
        return {}
    arrs = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for k, v in parts.items()}
    tot = np.zeros(n)
    for v in arrs.values():
        tot += v
    ok: np.ndarray = tot > 0
    if mask is not None:
        ok &= mask
    m = int(ok.sum())
    if m == 0:
        return {}
    share = {k: float(np.sum(v[ok] / tot[ok])) / m for k, v in arrs.items()}
    rounded = {k: round(share.get(k, 0.0), 4) for k in BAND_PARTS}
    return {k: v for k, v in rounded.items() if v > 0}


def _obj_full(n: int, value: str) -> np.ndarray:
    """``np.full(n, value, dtype=object)``, 20x faster for millions of rows (repeat, not a Python fill)."""
    return np.array([value], dtype=object).repeat(n)


def _describe_sensor(trace: DeviceTrace) -> str:
    if trace.energy_j is not None:
        return "energy-counter"
    if trace.power_kind == SampleKind.AVERAGE:
        return f"average-{trace.window_ns / 1e9:g}s"
    return "instant"
