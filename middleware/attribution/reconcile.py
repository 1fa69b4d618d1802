"""Conservation: per-request shares scaled so that requests + unattributed = measured, over reconciliation windows."""

from __future__ import annotations

import math

import numpy as np

from ..samples import DeviceTrace
from .energy import _CumEnergy, _typical_interval, power_points
from .inputs import _NS

def _reconcile_edges(cum: _CumEnergy, trace: DeviceTrace, a: int, b: int, reconcile_s: float | None,
                     skip: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Window edges for reconciliation, always starting at ``a`` and ending at ``b``: every
    ``reconcile_s`` from ``a``, except strictly inside the stretches ``skip`` (starts, ends; ns,
    sorted, apart), which stay one window each (an idle gap of a day is not tiled into 40 million
    windows of a 1 ms sensor's few milliseconds: the edges are made only where they are kept).

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
    step = max(int(reconcile_s * 1e9), 1)
    if skip is None or not len(skip[0]):
        inner = np.arange(a + step, b, step, dtype=np.int64)
        return np.concatenate(([a], inner, [b])).astype(np.int64)
    # the kept stretches [lo, hi] between the skipped ones; in each, the multiples k of step from a
    lo = np.concatenate(([a], np.asarray(skip[1], dtype=np.int64)))
    hi = np.concatenate((np.asarray(skip[0], dtype=np.int64), [b]))
    k_lo = np.maximum(-(-(lo - a) // step), 1)
    k_hi = np.minimum((hi - a) // step, (b - 1 - a) // step)
    cnt = np.maximum(k_hi - k_lo + 1, 0)
    k = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(k_lo, cnt)
    return np.concatenate(([a], a + k * step, [b])).astype(np.int64)


def _idle_gaps(busy_s: np.ndarray, busy_e: np.ndarray, a: int, b: int, margin_ns: int,
               min_gap_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """The idle gaps of :func:`_idle_cuts` as windows: ``(starts, ends)`` (ns), each gap of at least
    ``min_gap_ns`` less its margins (none at the period's own ends), in time order."""
    if not len(busy_s):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    g0 = np.concatenate(([a], busy_e.astype(np.int64)))
    g1 = np.concatenate((busy_s.astype(np.int64), [b]))
    g0, g1 = np.maximum(g0, a), np.minimum(g1, b)
    long = (g1 - g0) >= min_gap_ns
    g0, g1 = g0[long], g1[long]
    s = np.where(g0 == a, a, g0 + margin_ns)
    e = np.where(g1 == b, b, g1 - margin_ns)
    ok = e > s
    return s[ok], e[ok]


def _idle_cuts(busy_s: np.ndarray, busy_e: np.ndarray, a: int, b: int, margin_ns: int, min_gap_ns: int) -> np.ndarray:
    """Extra window edges that close every stretch with nothing in flight and no step running.

    ``busy_s``, ``busy_e``: the merged busy intervals (ns, sorted). Each idle gap of at least
    ``min_gap_ns`` (before the first, between two, after the last) gets an edge ``margin_ns``
    after its start and one ``margin_ns`` before its end: the margins keep a step's electrical
    tail and a reading's span with the busy window they belong to, and the gap becomes a window
    of its own. Nothing is predicted there, so what its readings hold above the idle baseline
    (the baseline's error, an interpolated hole in the readings) goes unattributed instead of
    scaling the requests of a window reaching over it (an hour of idle after a run, or a hole
    in the readings, had scaled them 1.3-25x)."""
    if not len(busy_s):
        return np.zeros(0, dtype=np.int64)
    g0 = np.concatenate(([a], busy_e.astype(np.int64)))
    g1 = np.concatenate((busy_s.astype(np.int64), [b]))
    g0, g1 = np.maximum(g0, a), np.minimum(g1, b)
    long = (g1 - g0) >= min_gap_ns
    lead, tail = g0[long] == a, g1[long] == b  # the period's own ends need no edge there
    cuts = np.concatenate(((g0[long] + margin_ns)[~lead], (g1[long] - margin_ns)[~tail]))
    cuts = cuts[(cuts > a) & (cuts < b)]
    return np.unique(cuts)


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
