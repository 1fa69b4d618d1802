"""The idle baseline: estimated from the stretches with no request in flight, as a piecewise curve."""

from __future__ import annotations

import numpy as np

from ..samples import DeviceTrace
from .energy import _Piecewise, _points_mid, counter_knots
from .inputs import Steps, _NS

def _busy_intervals(starts: np.ndarray, ends: np.ndarray, steps: Steps | None, dev: str) -> tuple[np.ndarray, np.ndarray]:
    """Merged intervals when anything is in flight or running on ``dev``."""
    s_parts, e_parts = [starts], [ends]
    if steps is not None and len(steps):
        m = steps.device == dev
        s_parts.append(steps.start_ns[m])
        e_parts.append(steps.end_ns[m])
    s = np.concatenate(s_parts)
    e = np.concatenate(e_parts)
    if not len(s):
        return s, e
    o = np.argsort(s, kind="stable")
    s, e = s[o], np.maximum.accumulate(e[o])
    new = np.concatenate(([True], s[1:] > e[:-1]))
    ms = s[new]
    # e is a running maximum: each merged interval ends where its last member's running end is
    me = e[np.concatenate((new[1:], [True]))].astype(np.int64, copy=False)
    return ms, me


def _estimate_idle(trace: DeviceTrace, busy: tuple[np.ndarray, np.ndarray], a: int, b: int, bin_s: float = 30.0) -> tuple[_Piecewise, str]:
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


def _idle_from(mid: np.ndarray, half: np.ndarray, pw: np.ndarray, busy: tuple[np.ndarray, np.ndarray], a: int, b: int, bin_s: float) -> _Piecewise | None:
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
