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
    sources = _idle_sources(trace)
    pw_all = sources[0][2]
    for mid, half, pw in sources:
        got = _idle_from(mid, half, pw, busy, a, b, bin_s)
        if got is not None:
            return got, "idle-periods"
    ok = np.isfinite(pw_all)
    v = float(np.quantile(pw_all[ok], 0.02)) if ok.any() else 0.0
    return _Piecewise(np.array([a, b]), np.array([v, v])), "low-quantile"


def _idle_sources(trace: DeviceTrace) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(middle, half-width, watts)`` of each reading: the counter's deltas first, then the power readings."""
    sources = []
    if trace.energy_j is not None:
        tk, ek = counter_knots(trace.t_ns, trace.energy_j)
        mid = tk[:-1] + (tk[1:] - tk[:-1]) // 2  # no int64 overflow on a clock past 2**62 ns
        half = (tk[1:] - tk[:-1]) // 2
        sources.append((mid, half, np.diff(ek) / (np.diff(tk).astype(np.float64) * _NS)))
    if trace.power_w is not None:
        mid, pw, span = _points_mid(trace)
        sources.append((mid, np.full(len(mid), span // 2, dtype=np.int64), pw))
    return sources


def idle_rel_sd(trace: DeviceTrace, busy: tuple[np.ndarray, np.ndarray], t_ns: np.ndarray,
                period: tuple[int, int] | None = None, curve: _Piecewise | None = None,
                unseen_w: np.ndarray | None = None) -> np.ndarray | None:
    """Relative standard deviation of the idle baseline at each time ``t_ns``, from the idle
    stretches themselves; ``None`` where fewer than two stretches were seen (no drift to measure).

    Each stretch with nothing in flight (readings between two busy intervals) measures the
    baseline's level there. Between stretches the baseline is unseen: taken as a random walk,
    its variance grows by ``s2`` per second, estimated from how far consecutive stretches'
    levels moved apart over the time between them (less what their own readings' scatter
    explains). At a time between two stretches the curve drawn through them is off by a
    Brownian bridge's variance ``s2 (t - t_a)(t_b - t) / (t_b - t_a)``, beyond the first or
    last by ``s2`` times the distance; plus the level's own standard error.

    ``period``: ``(a, b)``, the stretch ``busy`` describes; a reading wholly outside it (a
    live pass's trace starts before the pass, whose requests are clipped to it) is not
    known to be idle and is left out. ``curve``: the baseline as estimated; where it is not
    drawn through the stretches (one knot per 30 s bin), it is off by at least how far it
    passes from the line through their levels, which adds in square. ``unseen_w``: per time, the
    power (W) the step model's fit leaves unexplained over the request's lifetime; where only two
    stretches were seen (a run idle only at its ends) the walk's rate rests on one difference and
    a drift that comes back between them shows in no idle reading, so the baseline is taken to be
    off by at least that much (a model misfit there is read as drift: the band errs wide)."""
    bs = busy[0]
    for mid, half, pw in _idle_sources(trace):
        is_idle = _idle_mask(mid, half, pw, busy)
        if period is not None:
            is_idle &= (mid + half >= period[0]) & (mid - half <= period[1])
        if is_idle.sum() < 2:
            continue
        ti, pi = mid[is_idle].astype(np.float64), pw[is_idle]
        g = np.searchsorted(bs, mid[is_idle])  # the busy intervals before each: one stretch per value
        _, gi, n = np.unique(g, return_inverse=True, return_counts=True)
        if len(n) < 2:
            return None
        lvl = np.bincount(gi, weights=pi) / n
        tg = np.bincount(gi, weights=ti) / n
        dev2 = np.bincount(gi, weights=(pi - lvl[gi]) ** 2)
        # a stretch's level: its readings' mean, standard error from the readings' scatter
        # (pooled over the stretches with more than one reading; one reading: the pooled value)
        dof = int(np.sum(n - 1))
        w2 = float(dev2.sum() / dof) if dof > 0 else 0.0
        se2 = w2 / n
        dt = np.diff(tg) * _NS
        ok = dt > 0
        if not ok.any():
            return None
        move2 = np.maximum(np.diff(lvl) ** 2 - se2[1:] - se2[:-1], 0.0)
        s2 = float(move2[ok].sum() / dt[ok].sum())
        level = float(np.mean(lvl))
        if not level > 0:
            return None
        t = np.asarray(t_ns, dtype=np.float64)
        k = np.searchsorted(tg, t)
        inner = (k > 0) & (k < len(tg))
        kk = np.clip(k, 1, len(tg) - 1)
        ta, tb = tg[kk - 1], tg[kk]
        bridge = np.where(inner, (t - ta) * (tb - t) / np.maximum(tb - ta, 1.0), 0.0) * _NS
        outer = np.where(k == 0, tg[0] - t, np.where(k >= len(tg), t - tg[-1], 0.0)) * _NS
        se_lvl = float(np.mean(se2))
        # at most the whole baseline: a baseline read too low by more than itself would be negative
        off2 = (curve(np.asarray(t_ns)) - np.interp(t, tg, lvl)) ** 2 if curve is not None else 0.0
        out: np.ndarray = np.minimum(np.sqrt(s2 * (bridge + np.maximum(outer, 0.0)) + se_lvl + off2) / level, 1.0)
        if unseen_w is not None and len(n) < 3:
            out = np.minimum(np.maximum(out, unseen_w / level), 1.0)
        return out
    return None


def _idle_mask(mid: np.ndarray, half: np.ndarray, pw: np.ndarray, busy: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Readings that are idle: ``[t - guard, t + guard]`` misses every busy interval (guard:
    half the sensor's window and 50 ms of settling), with a finite value."""
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
    return is_idle


def _idle_from(mid: np.ndarray, half: np.ndarray, pw: np.ndarray, busy: tuple[np.ndarray, np.ndarray], a: int, b: int, bin_s: float) -> _Piecewise | None:
    is_idle = _idle_mask(mid, half, pw, busy)
    # a reading wholly outside [a, b] is not known to be idle: the requests are clipped to the period (a live
    # pass's trace reaches back before it, over the busy readings of requests already final)
    is_idle &= (mid + half >= a) & (mid - half <= b)
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
