"""A device's energy as a function of time: cumulative energy from power readings or an energy counter."""

from __future__ import annotations

import numpy as np

from ..samples import DeviceTrace, SampleKind
from .inputs import _NS

__all__ = ["counter_knots", "power_points"]


class _Piecewise:
    """A piecewise-linear function of time (ns), constant beyond its knots."""

    __slots__ = ("t", "v", "_c", "_const")

    def __init__(self, t: np.ndarray, v: np.ndarray) -> None:
        self.t = t.astype(np.int64)
        self.v = v.astype(np.float64)
        dt = np.diff(self.t).astype(np.float64) * _NS
        self._c = np.concatenate(([0.0], np.cumsum(dt * (self.v[1:] + self.v[:-1]) * 0.5)))
        # one finite value throughout (a configured baseline): what np.interp returns at every time
        self._const = len(self.v) > 0 and bool(np.isfinite(self.v[0])) and bool(np.all(self.v == self.v[0]))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._const and x.dtype.kind in "iu":
            return np.full(x.shape, self.v[0])
        return np.interp(x.astype(np.float64), self.t.astype(np.float64), self.v)

    def cumulative(self, x: np.ndarray) -> np.ndarray:
        """Integral from the first knot to ``x`` (joules when ``v`` is watts)."""
        t, v, c = self.t, self.v, self._c
        x = np.asarray(x, dtype=np.int64)
        k = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 1)
        dx = (x - t[k]).astype(np.float64) * _NS
        # beyond the last knot (or before the first) the value is held constant
        out: np.ndarray
        if self._const:  # v[k] + self(x) is the same sum at every time
            out = c[k] + dx * (v[0] + v[0]) * 0.5
            return out
        vx = self(x)
        out = c[k] + dx * (v[k] + vx) * 0.5
        return out

    def integral(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.cumulative(b) - self.cumulative(a)
        return out

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
        if span and len(t):
            # each reading stands for the span before it (an AVERAGE's window, or the interval since the last
            # fresh instant value): the first reaches back to t0 - span, the last ends at its read, so the
            # curve runs to the last read (a constant 300 W read every 100 ms for 1 s is 300 J, not 285)
            t = np.concatenate(([t[0] - span // 2], t, [t[-1] + span // 2]))
            p = np.concatenate(([p[0]], p, [p[-1]]))
        dt = np.diff(t).astype(np.float64) * _NS
        e = np.concatenate(([0.0], np.cumsum(dt * (p[1:] + p[:-1]) * 0.5)))
        return cls(t, e, "power")

    def at(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.interp(np.asarray(x, dtype=np.float64), self._tf, self.e)
        return out

    def energy(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.at(b) - self.at(a)
        return out

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
        gap = t[idx[1:]] - t[prev[1:]]  # between the last read of the old value and the first of the new
        half = gap // 2  # (no int64 overflow on a clock past 2**62 ns)
        if len(gap):
            # a hole in the reads (a paused sampler, a lost connection): the refresh happened somewhere in it,
            # and the energy it shows was drawn all along it. The midpoint squeezed a hole's energy into its
            # first half (a 5 s hole took the p95 from 4.5 to 17 %, every request's); the knot goes half a
            # typical read interval before the new value's first read, so the rise spans the hole
            typical = max(int(np.median(gap)), 1)
            half = np.where(gap > 4 * typical, gap - typical // 2, half)
        tk[1:] = t[prev[1:]] + half
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
    assert p is not None, "a power curve needs power readings"
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
