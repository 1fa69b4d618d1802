"""The batch fit: each step's dynamic energy from its features (non-negative least squares over the readings), split among its requests by tokens, with a noise band."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast, overload

import numpy as np

from .energy import _CumEnergy, _Piecewise, _typical_interval, power_points
from .family import (_BOOT_BLOCKS, _RIDGE, BASIS, FAMILIES, KNEE_WEIGHTS, KNEES, _blocks, basis, basis_rates, knee_points, correlation_lag, group_errors, nnls_gram, select_family,
                     select_window)
from ..samples import SampleKind
from .inputs import Steps, _NS
from .idle import _busy_intervals
from .reconcile import _idle_cuts, _idle_gaps, _reconcile_edges
from .results import StepModel

if TYPE_CHECKING:
    from ..samples import DeviceTrace
    from .family import Selection
    from .inputs import Requests

    _Features: TypeAlias = "_StepFeatures | _Beside | _Lagged"  # what the fit's rows are read from
    _Rel: TypeAlias = Callable[[np.ndarray], np.ndarray]  # times (ns) to seconds from the period start
    # _fit_rows(with_weights=True): A, y, each row's length (s), end (ns), overlap, length (ns)
    _Rows: TypeAlias = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]
    # _batch_fit's spread: bootstrap sd, close family's departure, squared step shares, noise model
    _Spread: TypeAlias = "tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any] | None]"

__all__ = ["nnls", "step_features"]


class _Segments:
    """Elementary time segments between request starts and ends on one device.

    ``share_equal(x)`` splits each segment's amount ``x`` equally among the
    requests in flight; ``share_weighted`` by their weights. Both return the
    per-request totals and the amount in segments with nothing in flight. Cost:
    one sort and prefix sums, O((R + S) log R).
    """

    __slots__ = ("edges", "si", "ei", "n", "w", "weights")

    def __init__(self, starts: np.ndarray, ends: np.ndarray, weights: np.ndarray, a: int, b: int) -> None:
        # The sorted distinct times of [a, starts, ends, b] and each start's and end's index
        # among them, from one stable sort: requests usually come in order of their start and
        # end soon after, so the sort merges a few sorted runs. Each time carries its run in
        # two low bits (times relative to a); a run's times come out in its own sorted order,
        # so the index of each is the count of distinct times before it.
        os_ = _order(starts)
        oe = _order(ends)
        ss = starts if os_ is None else starts[os_]
        es = ends if oe is None else ends[oe]
        tagged = np.concatenate((np.zeros(1, dtype=np.int64), (ss.astype(np.int64) - a) * 4 + 1,
                                 (es.astype(np.int64) - a) * 4 + 2, np.array([(b - a) * 4 + 3], dtype=np.int64)))
        tagged.sort(kind="stable")
        tag = tagged & 3
        tagged >>= 2  # the times, in place
        v = tagged
        first = np.empty(len(v), dtype=bool)
        first[0] = True
        np.not_equal(v[1:], v[:-1], out=first[1:])
        rank = np.cumsum(first)
        rank -= 1
        self.edges = edges = v[first] + a
        # np.compress, not a boolean index: starts and ends interleave, a mask's branches mispredict
        self.si = _unsort(np.compress(tag == 1, rank), os_)
        self.ei = _unsort(np.compress(tag == 2, rank), oe)
        m = len(edges) - 1
        live = self.ei > self.si
        if bool(live.all()):  # the usual case: no empty lifetime, nothing to leave out
            si_l, ei_l, w_l = self.si, self.ei, weights
        else:
            si_l, ei_l, w_l = np.compress(live, self.si), np.compress(live, self.ei), np.compress(live, weights)
        cnt = np.bincount(si_l, minlength=m + 1)[: m + 1] - np.bincount(ei_l, minlength=m + 1)[: m + 1]
        self.n = np.cumsum(cnt)[:m].astype(np.float64)
        if len(w_l) and bool(np.all(w_l == 1.0)):
            # unit weights (the default): the weighted counts are the counts, summed exactly
            self.w = self.n.copy()
        else:
            wd = np.bincount(si_l, weights=w_l, minlength=m + 1)[: m + 1] - np.bincount(
                ei_l, weights=w_l, minlength=m + 1
            )[: m + 1]
            self.w = np.cumsum(wd)[:m]
            self.w[np.abs(self.w) < 1e-12] = 0.0
        self.weights = weights

    def _share(self, x: np.ndarray, denom: np.ndarray, mult: np.ndarray | None) -> tuple[np.ndarray, float]:
        c = np.empty(len(x) + 1)
        c[0] = 0.0
        per = c[1:]
        has = denom > 0
        if bool(has.all()):  # something in flight in every segment (the usual busy period)
            np.divide(x, denom, out=per)
            unshared = 0.0
        else:
            per[:] = 0.0
            np.divide(x, denom, out=per, where=has)  # x / denom where anything is in flight, else 0
            unshared = float(x[~has].sum())
        np.cumsum(per, out=per)
        out = np.take(c, self.ei)
        out -= np.take(c, self.si)
        if mult is not None:
            out *= mult
        return out, unshared

    def share_equal(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        return self._share(x, self.n, None)

    def share_weighted(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        out, unshared = self._share(x, self.w, self.weights)
        none = (self.w <= 0) & (self.n > 0)
        if bool(none.any()):  # in flight, every one of weight 0: split equally, never left to no one
            x0 = np.where(none, x, 0.0)
            eq, _ = self._share(x0, self.n, None)
            out = out + eq
            unshared -= float(x0.sum())
        return out, unshared


# --------------------------------------------------------------------------- batch-fit


def _prefix(a: np.ndarray) -> np.ndarray:
    """Prefix sums along axis 0 with a leading row of zeros, written in place (no stacking copy)."""
    out = np.empty((a.shape[0] + 1, a.shape[1]))
    out[0] = 0.0
    out[1:] = a
    np.add.accumulate(out[1:], axis=0, out=out[1:])  # in place on a copy: ~1.7x faster than cumsum(out=)
    return out


def _order(q: np.ndarray) -> np.ndarray | None:
    """A stable sorting order of ``q``, or None when it is sorted already."""
    if len(q) < 2 or bool(np.all(q[1:] >= q[:-1])):
        return None
    if q.dtype.kind == "i":
        # Integers: each value with its index in the low bits, sorted as plain int64 (a
        # vectorised sort, ~6x faster than a stable argsort): the keys are distinct, so their
        # order is (value, index), the stable order, exactly. Only where the keys fit 63 bits.
        nb = int(len(q)).bit_length()
        lo, hi = int(q.min()), int(q.max())
        if hi - lo < (1 << (62 - nb)):
            key = (q.astype(np.int64) - lo) << nb
            key |= np.arange(len(q), dtype=np.int64)
            key.sort()
            key &= (1 << nb) - 1
            return key
    return np.argsort(q, kind="stable")


def _unsort(v: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """Values computed in sorted order, put back in the original order."""
    if order is None:
        return v
    out = np.empty_like(v)
    out[order] = v
    return out


_MEMO_SIZE = 1 << 22  # feature masses a _StepFeatures keeps for reuse, at most (values: 32 MiB)


class _StepFeatures:
    """Cumulative feature mass F(t) = sum_s x_s * clip((t - start_s) / dur_s, 0, 1).

    Exact for overlapping steps too: two prefix sums, over steps sorted by start
    and by end. Steps one after another (tiled: the usual case) take one prefix sum:
    at most one runs at any instant. Times are seconds relative to the period start (float64).
    """

    __slots__ = ("x", "st", "en", "dur", "_os", "_oe", "_st_sorted", "_en_sorted", "_cs_rate", "_cs_rate_st", "_ce_rate", "_ce_rate_st", "_ce_x",
                 "_memo", "_tiled")

    def __init__(self, x: np.ndarray, st: np.ndarray, en: np.ndarray, tiled: bool = True) -> None:
        """``tiled=False``: the general prefix sums even where the steps tile (for checks)."""
        self.x, self.st, self.en = x, st, en
        self.dur = en - st
        # steps usually come in time order: skip the sorts and gathers then
        s_ok = len(st) < 2 or bool(np.all(st[1:] >= st[:-1]))
        e_ok = len(en) < 2 or bool(np.all(en[1:] >= en[:-1]))
        if s_ok and e_ok:
            self._st_sorted, self._en_sorted = st, en
            self._memo: list[tuple[np.ndarray, np.ndarray]] = []
            # one after another, none overlapping the next (a device's own steps, its waits)
            self._tiled = tiled and len(st) > 0 and bool(np.all(self.dur > 0)) and (len(st) < 2 or bool(np.all(en[:-1] <= st[1:])))
            if self._tiled:
                # at most one step runs at any instant: the mass is the ended steps' prefix sum
                # plus the running one's share of its own features (no running-rate prefix sums)
                self._ce_x = _prefix(x)
                return
            # the same prefix sums, each written straight into its buffer (no rate, rate x start
            # or copy temporaries of steps x features)
            n, p = x.shape
            cs, cs_st = np.empty((n + 1, p)), np.empty((n + 1, p))
            cs[0] = cs_st[0] = 0.0
            np.divide(x, self.dur[:, None], out=cs[1:])  # the rates
            np.multiply(cs[1:], st[:, None], out=cs_st[1:])  # rate x start
            np.add.accumulate(cs[1:], axis=0, out=cs[1:])
            np.add.accumulate(cs_st[1:], axis=0, out=cs_st[1:])
            self._cs_rate, self._cs_rate_st = cs, cs_st
            self._ce_rate, self._ce_rate_st = self._cs_rate, self._cs_rate_st
            self._ce_x = _prefix(x)
            return
        self._tiled = False
        rate = x / self.dur[:, None]
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
        self._memo = []

    def mass(self, t: np.ndarray) -> np.ndarray:
        """F(t): shape (len(t), n_features), read-only. The last two are kept: the fit reads
        the steps' mass at the same readings' ends and starts again with the waits' beside."""
        for t_m, f_m in self._memo:
            if len(t_m) == len(t) and np.array_equal(t_m, t):
                return f_m
        if self._tiled:
            out = self._tiled_at(t, False)
            out.flags.writeable = False
            if out.size <= _MEMO_SIZE:
                self._memo = [(np.array(t, copy=True), out), *self._memo[:1]]
            return out
        i = np.searchsorted(self._st_sorted, t, side="right")  # steps started by t
        j = np.searchsorted(self._en_sorted, t, side="right")  # steps ended by t
        # t * (cs_rate[i] - ce_rate[j]) - (cs_rate_st[i] - ce_rate_st[j]) + ce_x[j], the same
        # operations in place on np.take's rows (a row gather ~3x faster than fancy indexing)
        running = np.take(self._cs_rate, i, axis=0)
        running -= np.take(self._ce_rate, j, axis=0)
        running *= t[:, None]
        st_part = np.take(self._cs_rate_st, i, axis=0)
        st_part -= np.take(self._ce_rate_st, j, axis=0)
        running -= st_part
        out = np.take(self._ce_x, j, axis=0)
        out += running
        out.flags.writeable = False
        if out.size <= _MEMO_SIZE:
            self._memo = [(np.array(t, copy=True), out), *self._memo[:1]]
        return out

    def _tiled_at(self, t: np.ndarray, density: bool) -> np.ndarray:
        """Tiled steps: F(t) (or dF/dt) from the one step running at t, if any (the last started by
        t, while it has not ended): the ended steps' features, plus its own times the share of it
        done by t (its rate, for the density)."""
        i = np.searchsorted(self._st_sorted, t, side="right")  # steps started by t
        k = i - 1
        np.maximum(k, 0, out=k)
        running = np.take(self._en_sorted, k) > t
        running &= i > 0
        # the running step's share done by t (its 1 / duration for the density), 0 where none runs
        f = np.reciprocal(np.take(self.dur, k)) if density else (t - np.take(self._st_sorted, k)) / np.take(self.dur, k)
        f *= running
        part = np.take(self.x, k, axis=0)
        part *= f[:, None]
        if density:
            return part
        i -= running  # the steps ended by t
        out = np.take(self._ce_x, i, axis=0)
        out += part
        return out

    def density(self, t: np.ndarray) -> np.ndarray:
        """dF/dt at t: the feature rate of the steps running at that instant."""
        if self._tiled:
            return self._tiled_at(t, True)
        i = np.searchsorted(self._st_sorted, t, side="right")
        j = np.searchsorted(self._en_sorted, t, side="right")
        out = np.take(self._cs_rate, i, axis=0)
        out -= np.take(self._ce_rate, j, axis=0)
        return out


class _Beside:
    """The feature mass of two disjoint sets of rows side by side: the steps' terms, then the
    waits' (each row is zero in the other set's columns, so this is exactly the mass of the
    stacked rows, without stacking, re-sorting and prefix-summing a million zeros)."""

    __slots__ = ("left", "right", "x")

    def __init__(self, left: _StepFeatures, right: _StepFeatures) -> None:
        self.left, self.right = left, right
        self.x = np.empty((0, left.x.shape[1] + right.x.shape[1]))  # the shape callers read

    def mass(self, t: np.ndarray) -> np.ndarray:
        return np.hstack((self.left.mass(t), self.right.mass(t)))

    def density(self, t: np.ndarray) -> np.ndarray:
        return np.hstack((self.left.density(t), self.right.density(t)))


class _Lagged:
    """The feature mass seen through a first-order electrical lag ``tau`` (s): a step's
    power rises towards its level and decays after it over ``tau`` (voltage regulators, clock
    ramps), so the same energy is drawn later. With ``u`` the steps' feature rate (piecewise
    constant) and ``Y`` its response to ``Y' = (u - Y) / tau``, the mass is
    ``G(t) = F(t) - tau * Y(t)``: exact, ``Y`` at every step edge by the recurrence (see
    :func:`_lag_states`), in between by the exponential. With ``cols``, only those features."""

    __slots__ = ("inner", "tau", "x", "cols", "_b", "_u", "_y", "_yu", "_kept")

    def __init__(self, inner: "_StepFeatures | _Beside", tau: float, edges: np.ndarray,
                 rates: tuple[np.ndarray, np.ndarray] | None = None, kept: list[tuple[np.ndarray, np.ndarray]] | None = None,
                 cols: list[int] | None = None) -> None:
        self.inner, self.tau, self.cols = inner, float(tau), cols
        self.x = inner.x if cols is None else np.empty((0, len(cols)))  # the shape callers read
        self._kept = kept  # with a list: every unlagged mass read, kept for the other lags (a few thousand times)
        # ``rates``: (the distinct edges, the rate after each), as _lag_rates gives them (of ``cols``
        # only, with them): they do not depend on tau, so a search over lags computes them once
        # (read-only here)
        if rates is None:
            b, u = _lag_rates(inner, edges)
            rates = (b, u if cols is None else u[:, cols])
        self._b, self._u = rates
        self._y = _lag_states(self._b, self._u, self.tau)
        self._yu = self._y - self._u

    def at(self, tau: float) -> "_Lagged":
        """The same features through another lag (the edges and their rates are kept)."""
        return _Lagged(self.inner, tau, self._b, (self._b, self._u), self._kept, self.cols)

    def density(self, t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self._b, t, side="right") - 1
        ic = np.maximum(i, 0)
        z = np.maximum(t - self._b[ic], 0.0) / self.tau
        d = np.where(z < 50.0, np.exp(-np.minimum(z, 50.0)), 0.0)  # a tail 50 lags on is nothing (e^-50)
        out: np.ndarray = self._yu[ic]
        out *= d[:, None]
        out += self._u[ic]
        out[i < 0] = 0.0
        return out

    def mass(self, t: np.ndarray) -> np.ndarray:
        f = None
        if self._kept is not None:
            f = next((f for t_k, f in self._kept if len(t_k) == len(t) and np.array_equal(t_k, t)), None)
        if f is None:
            f = self.inner.mass(t)
            f = f if self.cols is None else f[:, self.cols]
            if self._kept is not None:
                self._kept.append((np.array(t), f))
        return f - self.tau * self.density(t)


def _scan_blocks(x: np.ndarray, s: np.ndarray) -> None:
    """In place, ``s`` (M, blocks, k) holding the inputs ``c``, block ``b`` its M steps ``s[:, b]`` in time
    order: ``s_i = exp(-x_i) s_i-1 + c_i`` from a zero state. Each block runs from zero, all blocks side
    by side; then the state at each block's end (the same recurrence over the blocks) is carried into
    the next by its decay so far. A decay past e^-40 is taken as complete (below rounding)."""
    M, nb, k = s.shape
    a = np.exp(-np.minimum(x, 40.0))
    a[x >= 40.0] = 0.0
    tmp = np.empty((nb, k))
    for j in range(1, M):
        np.multiply(s[j - 1], a[j][:, None], out=tmp)
        s[j] += tmp
    if nb > 1:
        X = np.cumsum(x, axis=0)
        P = np.exp(-np.minimum(X, 40.0))
        P[X >= 40.0] = 0.0
        end = _blocked_scan(X[-1], s[-1], M)  # the state at each block's end
        s[:, 1:] += P[:, 1:, None] * end[None, :-1]


def _blocked_scan(x: np.ndarray, c: np.ndarray, M: int) -> np.ndarray:
    """``s_i = exp(-x_i) s_i-1 + c_i`` from ``s_-1 = 0`` (``x``: (m,), ``c``: (m, k)), in blocks of ``M``."""
    m, k = c.shape
    nb, r = -(-m // M), m % M
    X = np.full((M, nb), np.inf)  # the padding: a full decay, no input
    S = np.zeros((M, nb, k))
    f = m - r  # the full blocks' steps
    X.T[: f // M] = x[:f].reshape(-1, M)
    S.transpose(1, 0, 2)[: f // M] = c[:f].reshape(-1, M, k)
    if r:
        X[:r, -1], S[:r, -1] = x[f:], c[f:]
    _scan_blocks(X, S)
    out = np.empty((m, k))
    out[:f].reshape(-1, M, k)[...] = S.transpose(1, 0, 2)[: f // M]
    if r:
        out[f:] = S[:r, -1]
    return out


def _lag_states(b: np.ndarray, u: np.ndarray, tau: float) -> np.ndarray:
    """``Y(b_i)`` of the lag's recurrence ``Y(b_i+1) = u_i + (Y(b_i) - u_i) exp(-(b_i+1 - b_i) / tau)``,
    ``Y(b_0) = 0`` (every factor at most 1: nothing overflows however far apart the edges are)."""
    n, k = u.shape
    y = np.zeros_like(u)
    if n > 1:
        x = np.diff(b) / tau
        M = 1 << max(5, min(8, round(math.log2(n) / 2) - 2))  # block length: ~sqrt(n) / 4 (fewest passes), 32-256
        y[1:] = _blocked_scan(x, u[:-1] * -np.expm1(-x)[:, None], M)
    return y


def _lag_rates(inner: _StepFeatures | _Beside, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct edges and the feature rate on ``[b_i, b_i+1)``: what a lag acts on."""
    b = np.unique(edges)
    return b, inner.density(b)


def _with_lag(f: _StepFeatures | _Beside, tau: float, rates: tuple[np.ndarray, np.ndarray] | None = None,
              windows: tuple[np.ndarray, np.ndarray] | None = None, cols: Sequence[int] | None = None) -> _Lagged:
    """``f`` (the steps' features, or the steps' and the waits' side by side) seen through the lag
    (all of the device's power goes through it: a wait's held clocks ramp too). ``rates``: the
    edges' and rates of an earlier ``_lag_rates`` of the same ``f``. With ``windows`` (starts,
    ends; s, in time order), only there: the edges inside them and their starts (each window's
    lag state starts from its start's rate, and is right once its margin has decayed). With
    ``cols`` (the lag choice's), only those features, their unlagged mass kept for other lags."""
    parts = (f.left, f.right) if isinstance(f, _Beside) else (f,)
    kept: list[tuple[np.ndarray, np.ndarray]] | None = None if cols is None else []
    cols = None if cols is None else list(cols)
    if rates is not None:
        return _Lagged(f, tau, rates[0], rates, kept, cols)
    if windows is None:
        return _Lagged(f, tau, np.concatenate([e for p in parts for e in (p.st, p.en)]), kept=kept, cols=cols)
    lo, hi = windows
    cut = [e[i:j] for p in parts for e in (p._st_sorted, p._en_sorted)
           for i, j in zip(np.searchsorted(e, lo), np.searchsorted(e, hi, side="right"))]
    return _Lagged(f, tau, np.concatenate([lo, hi, *cut]), kept=kept, cols=cols)


def _sequential(st_ns: np.ndarray, en_ns: np.ndarray) -> bool:
    """Whether the device's steps never overlap (the lag's energy in each step is then that step's)."""
    if len(st_ns) < 2:
        return True
    o = np.argsort(st_ns, kind="stable")
    return bool(np.all(st_ns[o][1:] >= np.maximum.accumulate(en_ns[o])[:-1]))


#: Electrical lags tried (s): 0.25 ms to 32 ms by factors of 2, then refined between the best's
#: neighbours (a best at 32 ms is no lag found); on readings spaced ``_LAG_READING_NS`` or closer
#: (a lag of milliseconds moves energy between readings that fine), and on whole-window readings
#: at any spacing (:func:`_whole_windows`: a lag also moves each step's tail into the wait after
#: it, which changes how a window's energy follows its steps and waits).
_LAGS_S = tuple(0.00025 * 2.0**k for k in range(8))
_LAG_READING_NS = 50_000_000
_LAG_REFINE = 6  # golden-section steps after the grid (the bracket shrinks to 2 x 0.618^8 of a factor 2)
_LAG_ROWS = 24_000  # readings the lag is chosen on, at most (8 stretches of consecutive ones)
_LAG_MARGIN_NS = 1_000_000_000  # the steps this long before a stretch set its lag state (31 of the longest lags)


def _lag_stretches(cum: _CumEnergy, trace: DeviceTrace, t_row: np.ndarray, a: int
                   ) -> list[tuple[_CumEnergy, DeviceTrace, int, int]] | None:
    """With more than ``_LAG_ROWS`` readings, 8 evenly spaced stretches of consecutive ones to choose
    the lag on, ``(cum, trace, start, end)`` each (ns; the counter's knots or the trace's readings
    from a margin before the start); else ``None`` (every reading)."""
    n = len(t_row)
    if n <= _LAG_ROWS:
        return None
    size = _LAG_ROWS // 8
    span = _typical_interval(t_row) * size
    out = []
    for i in np.linspace(0, n - size, 8).astype(np.int64):
        lo = int(t_row[i - 1]) if i > 0 else int(a)
        hi = lo + span
        c, tr = cum, trace
        if cum.source == "energy-counter":
            j0, j1 = np.searchsorted(cum.t, [lo - _LAG_MARGIN_NS, hi], side="right")
            c = _CumEnergy(cum.t[max(j0 - 1, 0):j1 + 1], cum.e[max(j0 - 1, 0):j1 + 1], cum.source)
        elif trace.power_w is not None:
            j0, j1 = np.searchsorted(trace.t_ns, [lo - _LAG_MARGIN_NS, hi], side="right")
            tr = dataclasses.replace(trace, t_ns=trace.t_ns[j0:j1], power_w=trace.power_w[j0:j1], energy_j=None)
        out.append((c, tr, lo, hi))
    return out


def _cv_error(A: np.ndarray, y: np.ndarray, cols: tuple[int, ...], folds: int = 10) -> float:
    """The held-out error of one family on rows ``(A, y)`` as :func:`select_family` scores it (the
    same blocked folds, ridge and non-negative fit), without the bootstrap it runs after; ``inf``
    where it would choose nothing."""
    n = len(y)
    c_ = np.array(cols)
    if n < 8 or not np.any(A) or n < 3 * len(c_):
        return math.inf
    A = A[:, c_]
    scale = np.sqrt(np.einsum("ij,ij->j", A, A))
    scale[scale == 0] = 1.0
    As = A / scale
    k = int(min(folds, max(3, n // 6)))
    kb = int(min(_BOOT_BLOCKS, max(k, n // 4)))
    cut = np.searchsorted(_blocks(n, kb), np.arange(kb + 1))
    fold = (np.arange(kb) * k) // kb
    Gf = np.stack([As[i:j].T @ As[i:j] for i, j in zip(cut[:-1], cut[1:])])
    cf = np.stack([As[i:j].T @ y[i:j] for i, j in zip(cut[:-1], cut[1:])])
    yf = np.array([y[i:j] @ y[i:j] for i, j in zip(cut[:-1], cut[1:])])
    Gb = np.stack([Gf[fold == f].sum(0) for f in range(k)])
    cb = np.stack([cf[fold == f].sum(0) for f in range(k)])
    yy = np.array([yf[fold == f].sum() for f in range(k)])
    G, c = Gb.sum(0), cb.sum(0)
    ms = float(yy.sum())
    eye = _RIDGE * n / max(n, 1) * np.eye(len(c_))
    P = np.flatnonzero(nnls_gram(G + eye, c) > 0)  # the coefficients every fold's fit most likely keeps
    Q = np.setdiff1d(np.arange(len(c_)), P)
    sse = 0.0
    for f in range(k):
        excl = [f] if k < 5 else [f] + ([f - 1] if f > 0 else []) + ([f + 1] if f + 1 < k else [])
        Gt, ct = G - Gb[excl].sum(0) + eye, c - cb[excl].sum(0)
        xf = np.zeros(len(c_))
        try:
            xf[P] = np.linalg.solve(Gt[np.ix_(P, P)], ct[P]) if len(P) else 0.0
        except np.linalg.LinAlgError:
            xf[P] = -1.0
        # the non-negative fit itself where those coefficients stay positive and no other would grow
        # (its optimality conditions, at nnls_gram's tolerance); else nnls_gram from the start
        if not (np.all(xf[P] > 0) and np.all((ct - Gt @ xf)[Q] <= 1e-12 * max(1.0, float(np.abs(ct).max())))):
            xf = nnls_gram(Gt, ct)
        sse += float(yy[f] - 2 * xf @ cb[f] + xf @ Gb[f] @ xf)
    return math.sqrt(max(sse, 0.0) / ms) if ms > 0 else math.inf


def _whole_windows(cum: _CumEnergy, trace: DeviceTrace, t_row: np.ndarray) -> bool:
    """Whether each reading holds every joule of its interval: an energy counter's deltas, or average
    power over a window at least as long as the spacing. A part-time reading (an instant value, a
    short average) covers an unknown slice of its interval: where it fell blurs a lag's few
    milliseconds beyond telling at coarse spacing."""
    if cum.source == "energy-counter":
        return True
    return trace.power_kind == SampleKind.AVERAGE and trace.window_ns >= 0.9 * _typical_interval(t_row)


def _choose_lag(cum: _CumEnergy, trace: DeviceTrace, base: _StepFeatures | _Beside, idle_curve: _Piecewise, a: int, b: int,
                rel: _Rel, sel: Selection, fams: dict[str, tuple[int, ...]], t_row: np.ndarray
                ) -> tuple[float, _Rows | None, dict[float, float]]:
    """The electrical lag whose rows predict held-out readings clearly best for the chosen family,
    ``(tau, rows, scores)``, or ``(0.0, None, scores)``. Chosen on the family's features and at most
    ``_LAG_ROWS`` readings (:func:`_lag_stretches`), then held to the same test on every reading."""
    scores: dict[float, float] = {}
    if len(t_row) < 16 or (_typical_interval(t_row) > _LAG_READING_NS and not _whole_windows(cum, trace, t_row)):
        return 0.0, None, scores
    cols = fams[sel.family]
    own = tuple(range(len(cols)))  # the lagged rows' columns: the family's only
    best = [math.inf, 0]  # the best score so far and its rows' count
    parts = _lag_stretches(cum, trace, t_row, a)
    # the readings (every one, or the stretches') read once for every lag tried
    plans = ([_RowPlan(cum, trace, idle_curve, a, b, rel)] if parts is None
             else [_RowPlan(c, tr, idle_curve, lo, hi, rel) for c, tr, lo, hi in parts])
    y_all = plans[0].y if len(plans) == 1 else np.concatenate([pl.y for pl in plans])

    def rows_at(f: _Features) -> tuple[np.ndarray, np.ndarray]:
        return (plans[0].rows(f) if len(plans) == 1 else np.vstack([pl.rows(f) for pl in plans])), y_all

    if parts is None:
        ref = sel.family_error  # the chosen family alone, as each lag's fit is
        lagged = _with_lag(base, _LAGS_S[0], cols=cols)
    else:
        A0, y0 = rows_at(base)
        ref = _cv_error(A0, y0, cols)  # no lag, on the same readings
        lagged = _with_lag(base, _LAGS_S[0], windows=(rel(np.array([p[2] for p in parts]) - _LAG_MARGIN_NS),
                                                      rel(np.array([p[3] for p in parts]))), cols=cols)

    def score(tau: float) -> float:
        A, y = rows_at(lagged if tau == lagged.tau else lagged.at(tau))
        scores[tau] = _cv_error(A, y, own)
        if scores[tau] < best[0]:
            best[:] = [scores[tau], len(y)]
        return scores[tau]

    vals = [score(t) for t in _LAGS_S]
    k = int(np.argmin(vals))
    if k == len(_LAGS_S) - 1:
        # still falling at the longest: not a board's electrical lag (milliseconds) but the sensor's
        # own smoothing, which delays the readings, not the energy: left to the window choice
        return 0.0, None, scores
    if math.isfinite(vals[k]):
        # golden-section search in log tau between the best's neighbours on the grid
        lo, hi = math.log2(_LAGS_S[max(k - 1, 0)]), math.log2(_LAGS_S[min(k + 1, len(_LAGS_S) - 1)])
        g = (math.sqrt(5) - 1) / 2
        c, d = hi - g * (hi - lo), lo + g * (hi - lo)
        fc, fd = score(2.0**c), score(2.0**d)
        for _ in range(_LAG_REFINE):
            if fc < fd:
                hi, d, fd = d, c, fc
                c = hi - g * (hi - lo)
                fc = score(2.0**c)
            else:
                lo, c, fc = c, d, fd
                d = lo + g * (hi - lo)
                fd = score(2.0**d)
    tau = min(scores, key=lambda t: scores[t])
    if not scores[tau] < ref * (1 - max(0.03, 1 / math.sqrt(max(best[1], 1)))):
        return 0.0, None, scores
    # every reading and feature through it, held to the same test
    rows = _fit_rows(cum, trace, _with_lag(base, tau), idle_curve, a, b, rel, with_weights=True)
    if _cv_error(rows[0], rows[1], cols) < sel.family_error * (1 - max(0.03, 1 / math.sqrt(max(len(rows[1]), 1)))):
        return tau, rows, scores
    return 0.0, None, scores


def _given_lag_fit(cum: _CumEnergy, trace: DeviceTrace, base: _StepFeatures | _Beside, idle_curve: _Piecewise, a: int, b: int,
                   rel: _Rel, fams: dict[str, tuple[int, ...]], tau: float, wait_col: int | None
                   ) -> tuple[float, _Rows | None, Selection | None]:
    """The step model fitted through a given electrical lag ``tau`` (s; 0: none, each step's energy
    inside its window), on readings at any interval: ``(tau, rows, selection)``.

    A lag measured once on fine readings of the board (it is the board's, not the load's) where the
    device's own readings are too coarse to choose one (:func:`_choose_lag`). With the waits' terms
    (``wait_col``: the first, W while waiting), the J-per-wait term is left out (it stands for each
    step's electrical tail, which the lag now places) and the power held in a wait is bounded by
    the steps' own duration term (a board waiting with clocks held draws no more than when it runs:
    the fit's column for it covers the steps' time too, so the steps' W is that plus what is left):
    where a stage waits about as long as it runs, coarse readings cannot split the two otherwise."""
    rows = _fit_rows(cum, trace, _with_lag(base, tau) if tau > 0 else base, idle_curve, a, b, rel, with_weights=True)
    if not len(rows[1]):
        return 0.0, None, None
    if wait_col is None:
        return tau, rows, select_family(rows[0], rows[1], families=fams)
    return tau, rows, _held_wait_select(rows[0], rows[1], fams, wait_col)


def _held_wait_select(A: np.ndarray, y: np.ndarray, fams: dict[str, tuple[int, ...]], wait_col: int) -> Selection | None:
    """:func:`select_family` under a given lag's constraints on the waits' terms (see
    :func:`_given_lag_fit`): no J-per-wait column (``wait_col + 1``), and the W held in a wait
    drawn under the steps too (the steps' W is that plus what is left). Every refit of a model
    fitted through a given lag (the part-time readings' weights, a counter's stacked power
    readings) goes through here, so none brings back what the given lag took out."""
    fams = {k: tuple(c for c in v if c != wait_col + 1) for k, v in fams.items()}
    A2 = A.copy()
    A2[:, wait_col] += A2[:, 0]  # the held power is drawn under the steps too (BASIS[0]: duration)
    sel = select_family(A2, y, families=fams)
    if sel is None:
        return None

    def back(v: np.ndarray) -> np.ndarray:  # to the rows' own columns: the steps' W is both
        out = np.array(v, dtype=np.float64, copy=True)
        out[..., 0] += out[..., wait_col]
        return out

    return dataclasses.replace(sel, coef=back(sel.coef), boot=None if sel.boot is None else back(sel.boot),
                               fits=None if sel.fits is None else {k: back(v) for k, v in sel.fits.items()})


def _lag_free_excess(cum: _CumEnergy, trace: DeviceTrace, inner: _Features, coef_fit: np.ndarray, idle_curve: _Piecewise,
                     a: int, b: int, rel: _Rel, step_ns: float, spacing: float) -> int:
    """The readings' error correlation beyond two steps (readings), with the model's residuals
    read without the lag (see the window choice in :func:`_batch_fit`)."""
    A0, y0, w0 = _fit_rows(cum, trace, inner, idle_curve, a, b, rel, with_weights=True)[:3]
    m0, p0 = y0 * w0, (A0 @ coef_fit) * w0
    g0 = m0.sum() / p0.sum() if p0.sum() > 0 else 1.0
    return max(0, correlation_lag(m0 - g0 * p0) - int(math.ceil(2 * step_ns / spacing)))


def _lag_interval(scores: dict[float, float], tau: float, n: int) -> tuple[float, float] | None:
    """The lags (s) as likely as ``tau`` by their held-out errors (``scores``, from
    :func:`_choose_lag`): a parabola in log2(lag) through the lags tried within a factor 2 of
    ``tau``, out to where it rises by the error's own noise (1/sqrt(readings) of it). None
    where the scores cannot say (fewer than three lags tried near it, no curvature)."""
    near = sorted((math.log2(t), v) for t, v in scores.items() if abs(math.log2(t / tau)) <= 1.0 and math.isfinite(v))
    if len(near) < 3 or n < 1:
        return None
    x, y = np.array([p[0] for p in near]), np.array([p[1] for p in near])
    c2 = float(np.polyfit(x, y, 2)[0])
    if not c2 > 0:
        return None
    best = float(min(y))
    d = min(1.0, math.sqrt(best / math.sqrt(n) / c2))
    return tau * 2.0**-d, tau * 2.0**d


def _edge_power(cum: _CumEnergy, idle_curve: _Piecewise, lagged: _Lagged, coef: np.ndarray, edges: np.ndarray, rel: _Rel,
                half_ns: int) -> np.ndarray:
    """The dynamic power (W) at each reconciliation edge, for the lag's deconvolution: the lagged
    model's power there, at the level the readings within ``half_ns`` of it measured (the
    model's shape, the sensor's scale). 0 at the period's two ends: nothing is moved across them,
    so the windows still hold what was measured."""
    e = edges[1:-1]
    if not len(e):
        return np.zeros(len(edges))
    lo, hi = np.maximum(e - half_ns, edges[0]), np.minimum(e + half_ns, edges[-1])
    m = cum.energy(lo, hi) - idle_curve.integral(lo, hi)
    pm = (lagged.mass(rel(hi)) - lagged.mass(rel(lo))) @ coef
    dens = lagged.density(rel(e)) @ coef
    ok = pm > 1e-12
    p = np.where(ok, dens * np.maximum(m, 0.0) / np.where(ok, pm, 1.0), np.maximum(m, 0.0) / np.maximum((hi - lo) * _NS, 1e-12))
    return np.concatenate(([0.0], p, [0.0]))


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
    st_start = steps.start_ns[st]
    if len(st) < 2 or bool(np.all(st_start[1:] >= st_start[:-1])):
        # entries in time order already: the lexsort's order is the stable order by request
        order = np.argsort(steps.entry_request, kind="stable")
    else:
        order = np.lexsort((st_start, steps.entry_request))
    tok_o = tok[order]
    req_o = steps.entry_request[order]
    before = np.cumsum(tok_o) - tok_o
    first = np.concatenate(([True], req_o[1:] != req_o[:-1]))
    f_at = np.flatnonzero(first)  # each request's first entry: its context starts there
    ctx = np.empty_like(tok)
    ctx[order] = before - np.repeat(before[f_at], np.diff(np.append(f_at, len(first))))
    decode = tok <= 1.0
    prefill_tok = np.bincount(st, weights=np.where(decode, 0.0, tok), minlength=ns)
    decode_tok = np.bincount(st, weights=np.where(decode, tok, 0.0), minlength=ns)
    decode_ctx = np.bincount(st, weights=np.where(decode, ctx + tok, 0.0), minlength=ns) / 1000.0
    dur = (steps.end_ns - steps.start_ns).astype(np.float64) * _NS
    x = np.column_stack((dur, prefill_tok, decode_tok, decode_ctx))
    out: np.ndarray = x[s_idx]
    return out


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
    out: np.ndarray = x / scale
    return out


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
    # The stretches with anything in flight (maximal runs of busy segments: a few, where
    # requests overlap), by their bounds: starts at even positions, ends at odd ones.
    d = np.diff(np.concatenate(([0], (seg.n > 0).astype(np.int8), [0])))
    fe = np.take(seg.edges, np.flatnonzero(d))
    # The union of those bounds and the merged steps' bounds, and at each of its times how
    # many flight bounds and step starts lie at or before it (np.unique and two searchsorted):
    # one stable sort of the three sorted runs, each time tagged with its run in its two low
    # bits (times relative to the period, so the shift cannot overflow).
    tagged = np.concatenate(((fe - lo) * 4, (np.clip(ms, lo, hi) - lo) * 4 + 1, (np.clip(me, lo, hi) - lo) * 4 + 2))
    tagged.sort(kind="stable")
    tag = tagged & 3
    tagged >>= 2  # the times, in place
    v = tagged
    last = np.empty(len(v), dtype=bool)
    np.not_equal(v[1:], v[:-1], out=last[:-1])
    last[-1] = True  # each time's last copy
    li = np.flatnonzero(last)
    e = np.take(v, li)
    e += lo
    left = e[:-1]
    li = li[:-1]
    # in flight there (the last flight bound at or before it a start?); the merged step that
    # started last at or before it: counts of the runs' members up to each time's last copy
    q = np.take(np.cumsum(tag == 0), li)
    inflight = (q & 1) == 1
    k = np.take(np.cumsum(tag == 1), li) - 1
    in_step = (k >= 0) & (me[np.maximum(k, 0)] > left)
    flag = inflight & ~in_step
    if not flag.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    d = np.diff(np.concatenate(([0], flag.astype(np.int8), [0])))
    return e[np.flatnonzero(d == 1)], e[np.flatnonzero(d == -1)]


class _WaitOwners:
    """The steps another device runs for this device's requests (a pipeline's other stages):
    what this device draws while it waits during one of them is that step's, split among its
    requests by their tokens like its own energy; a wait no such step covers (a lone GPU's host
    gap, a pipeline with nothing in its other stages) is shared by time among those in flight.

    ``lo``, ``hi``: each step's span (s from the period's start, clipped to the windows);
    ``e_s``, ``e_r``, ``share``: its entries (step, local request index, token share)."""

    __slots__ = ("e_s", "e_r", "share", "n_req", "edges", "cnt", "lo_k", "hi_k")

    def __init__(self, lo: np.ndarray, hi: np.ndarray, e_s: np.ndarray, e_r: np.ndarray, share: np.ndarray, n_req: int) -> None:
        self.e_s, self.e_r, self.share, self.n_req = e_s, e_r, share, n_req
        self.edges = np.unique(np.concatenate((lo, hi)))
        self.lo_k = np.searchsorted(self.edges, lo)
        self.hi_k = np.searchsorted(self.edges, hi)
        d = np.bincount(self.lo_k, minlength=len(self.edges)) - np.bincount(self.hi_k, minlength=len(self.edges))
        self.cnt = np.cumsum(d)[:-1].astype(np.float64)  # steps covering each elementary span

    def share_waits(self, mass: _Rel, seg: _Segments, seg_rel: np.ndarray) -> tuple[np.ndarray, float]:
        """Per request, the wait energy whose cumulative (J, at times s from the period's start) is
        ``mass``: the owners' part by tokens, the rest by time (and what nobody was in flight for)."""
        E = self.edges
        m_e = mass(E)
        dm = np.diff(m_e)
        cov = self.cnt > 0
        per = np.concatenate(([0.0], np.cumsum(np.where(cov, dm / np.where(cov, self.cnt, 1.0), 0.0))))
        e_own = per[self.hi_k] - per[self.lo_k]  # each owner step's part of the waits
        got = np.bincount(self.e_r, weights=e_own[self.e_s] * self.share, minlength=self.n_req)
        # the covered part's cumulative at the segments' edges: taken out of the time share
        c_e = np.concatenate(([0.0], np.cumsum(np.where(cov, dm, 0.0))))
        m_seg = mass(seg_rel)
        j = np.clip(np.searchsorted(E, seg_rel, side="right") - 1, 0, max(len(E) - 2, 0))
        c_seg = np.where(seg_rel <= E[0], 0.0, np.where(seg_rel >= E[-1], c_e[-1], c_e[j] + np.where(cov[j], m_seg - m_e[j], 0.0)))
        rest, un = seg.share_weighted(np.diff(m_seg - c_seg))
        return got + rest, un


def _wait_owners(owners: Steps | None, o_idx: np.ndarray | None, requests_local: Callable[[np.ndarray], np.ndarray], rel: _Rel,
                 r0: float, r1: float, n_req: int) -> _WaitOwners | None:
    """:class:`_WaitOwners` of the steps ``o_idx`` of ``owners`` (entries' requests mapped to
    local indices by ``requests_local``, -1: not on this device), or None where there are none."""
    if owners is None or o_idx is None or not len(o_idx):
        return None
    pos = np.full(len(owners), -1, dtype=np.int64)
    pos[o_idx] = np.arange(len(o_idx))
    e_s = pos[owners.entry_step]
    e_r = requests_local(owners.entry_request)
    keep = (e_s >= 0) & (e_r >= 0) & (owners.entry_tokens > 0)
    e_s, e_r, e_t = e_s[keep], e_r[keep], owners.entry_tokens[keep]
    if not len(e_s):
        return None
    tok = np.bincount(e_s, weights=e_t, minlength=len(o_idx))
    lo = np.clip(rel(owners.start_ns[o_idx]), r0, r1)
    hi = np.clip(rel(owners.end_ns[o_idx]), r0, r1)
    live = (tok > 0) & (hi > lo)
    if not live.any():
        return None
    k = np.flatnonzero(live)
    new = np.full(len(o_idx), -1, dtype=np.int64)
    new[k] = np.arange(len(k))
    m = live[e_s]
    return _WaitOwners(lo[k], hi[k], new[e_s[m]], e_r[m], e_t[m] / tok[e_s[m]], n_req)


#: The wait terms, fitted beside the step terms: W while the device waits with requests in
#: flight (a pipeline bubble, clocks held between steps) and J per wait (the electrical tail
#: of the step before it: power decays over milliseconds, not at the step's end).
WAIT_TERMS = ("wait_s", "waits")
_WAITS = "+wait"  # a family's name with the waits' terms beside it (W while waiting, J per wait)


def _steps_family(name: str) -> str:
    """The steps' family of ``name``: without the waits' suffix (:data:`_WAITS`)."""
    return name[: -len(_WAITS)] if name.endswith(_WAITS) else name


_WAIT_SHARE = 0.1  # waits this share of the in-flight time or more: the device is a pipeline stage


def _knee_weight(cum: _CumEnergy, trace: DeviceTrace, x4: np.ndarray, st: np.ndarray, en: np.ndarray, idle_curve: _Piecewise,
                 a: int, b: int, rel: _Rel) -> float:
    """The decode weight of the knees' work (:data:`KNEE_WEIGHTS`) whose full basis predicts held-out
    readings best, on at most ``_LAG_ROWS`` readings (the lag search's stretches, :func:`_lag_stretches`,
    and the steps they see); 1 where none can be scored. Every other weight of the grid is scored, then
    the best one's two neighbours. The rows are linear in the basis's columns: those that do not depend
    on the weight are built once, only the knees' again for each weight."""
    knees = FAMILIES["all+knees"]
    if not len(x4):
        return 1.0
    x4_all = x4
    t_read = cum.t if cum.source == "energy-counter" else trace.t_ns
    parts = _lag_stretches(cum, trace, t_read[(t_read >= a) & (t_read <= b)], a)

    # the readings (every one, or the stretches') read once for every weight tried
    plans = ([_RowPlan(cum, trace, idle_curve, a, b, rel)] if parts is None
             else [_RowPlan(c, tr, idle_curve, lo, hi, rel) for c, tr, lo, hi in parts])
    y_all = plans[0].y if len(plans) == 1 else np.concatenate([pl.y for pl in plans])

    def rows(f: _StepFeatures) -> tuple[np.ndarray, np.ndarray]:
        return (plans[0].rows(f) if len(plans) == 1 else np.vstack([pl.rows(f) for pl in plans])), y_all

    kcols = list(KNEES)
    rates1 = basis_rates(x4, 1.0)  # the saturating terms' throughputs, from every step
    if parts is not None:  # the steps the stretches' readings can see, and only those
        keep = np.zeros(len(st), dtype=bool)
        for _, _, lo, hi in parts:
            r0, r1 = rel(np.array([lo - _LAG_MARGIN_NS, hi]))
            keep |= (en > r0) & (st < r1)
        x4, st, en = x4[keep], st[keep], en[keep]
    x1, _ = basis(x4, rates1)
    A1, y = rows(_StepFeatures(x1, st, en))
    d, pre, dec = x4[:, 0], x4[:, 1], x4[:, 2]
    errs: dict[float, float] = {}

    def score(w: float) -> None:
        if w == 1.0:  # A1's own weight
            errs[w] = _cv_error(A1, y, knees)
            return
        pts = knee_points(x4_all, w)
        if not pts:  # no span of work to put knees on
            errs[w] = math.inf
            return
        A = A1.copy()
        A[:, kcols] = rows(_StepFeatures(np.minimum((pre + w * dec)[:, None], np.array(pts)) * d[:, None], st, en))[0]
        errs[w] = _cv_error(A, y, knees)

    # every other weight of the grid, then the best one's neighbours on it (not scored yet: the odd ones)
    grid = KNEE_WEIGHTS
    for w in grid[1::2]:
        score(w)
    i = grid.index(min(errs, key=lambda w: errs[w]))
    for j in (i - 1, i + 1):
        if 0 <= j < len(grid):
            score(grid[j])
    best_w = min(errs, key=lambda w: (errs[w], w))
    return best_w if math.isfinite(errs[best_w]) else 1.0


def _batch_fit(cum: _CumEnergy, trace: DeviceTrace, steps: Steps, s_idx: np.ndarray, requests: Requests, ridx: np.ndarray,
               seg: _Segments, idle_curve: _Piecewise, a: int, b: int, reconcile_s: float | None, model: StepModel | None,
               lag_s: float | None = None, owners: Steps | None = None, o_idx: np.ndarray | None = None,
               busy: tuple[np.ndarray, np.ndarray] | None = None, scan_offset: bool = True
               ) -> tuple[np.ndarray, float, dict[str, Any], _Spread]:
    """Dynamic energy per request of one device by the batch-fit method. ``lag_s``: the board's
    electrical lag (s), measured elsewhere, fitted through instead of searched (:func:`_given_lag_fit`).
    ``owners``, ``o_idx``: the steps other devices run for this device's requests (:class:`_WaitOwners`),
    entries indexing ``requests``. ``busy``: the merged intervals with a request in flight or a step
    running (the idle gaps between them are windows of their own). ``scan_offset``: search the
    readings' clock offset from the steps' (:func:`_offset_scan`; not on a group's whole steps)."""
    st_ns = steps.start_ns[s_idx]
    en_ns = steps.end_ns[s_idx]
    x4 = step_features(steps, s_idx)
    rel: _Rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
    x, rates = basis(x4, model.rates if model is not None else None,
                     weight=None if model is not None else _knee_weight(cum, trace, x4, rel(st_ns), rel(en_ns), idle_curve, a, b, rel))
    feats = _StepFeatures(x, rel(st_ns), rel(en_ns))
    # The waits between the device's own steps, as rows of two more terms: what the sensor
    # reads there is explained by them, and their energy goes to the step another device
    # runs meanwhile for the same requests (a pipeline's other stage) or else is shared by
    # time among the requests in flight, not by the tokens of the steps next to them.
    w_st, w_en = _waits(seg, st_ns, en_ns)
    nb, nw = x.shape[1], len(WAIT_TERMS)
    fit_feats: _Features
    if len(w_st):
        xw = np.column_stack(((w_en - w_st) * _NS, np.ones(len(w_st))))  # the WAIT_TERMS
        fit_feats = _Beside(feats, _StepFeatures(xw, rel(w_st), rel(w_en)))
        families = dict(FAMILIES)
        families.update({k + _WAITS: v + tuple(range(nb, nb + nw)) for k, v in FAMILIES.items()})
    else:
        fit_feats = feats
        families = FAMILIES

    # 1. Fit: every reading is a linear function of the steps it overlaps; the
    #    family of step terms is chosen by blocked cross-validation in time.
    cum_in, trace_in = cum, trace  # as read (before any stale-reading shift of the counter)
    A, y, w_row, t_row, overlap, len_row = _fit_rows(cum, trace, feats, idle_curve, a, b, rel, with_weights=True)
    shift_ns = 0
    sel = None
    with_waits = False
    sel_steps = None  # the steps-only selection, when the waits' terms were chosen beside it
    sel_fams = None  # the families the selection chose among (None: FAMILIES)
    lag_tau = 0.0  # the electrical lag the readings are fitted through (s)
    lag_scores: dict[float, float] = {}  # held-out error of each lag tried (the lag's own uncertainty, for the band)
    lag_fam: dict[str, tuple[int, ...]] | None = None  # the family fitted through the lag chosen (refitted for the band)
    held_wait = False  # the waits' terms under a given lag's constraints (_held_wait_select)
    if model is None:
        sel = select_family(A, y) if len(y) else None
        # A coarse sensor's reading may be stale (a counter read some time after the driver
        # refreshed it): try reading the trace a fraction of its interval earlier (or later),
        # keep what predicts held-out readings best.
        # And any sensor's clock may be offset from the server's (another host's clock, a wall
        # clock read at a different moment): the offset that best lines the readings up with
        # the steps is tried too, either way.
        interval = _typical_interval(t_row) if len(t_row) > 2 else 0
        cands: list[int] = [int(interval * frac) for frac in _STALE_FRACS] if interval >= 20_000_000 else []
        scanned: int | None = None  # the scan's offset, where it is a candidate
        if sel is not None and interval > 0 and scan_offset:
            span_scan = 0 if cum.source == "energy-counter" else power_points(trace)[2]
            d_scan = _offset_scan(feats, sel.coef[: feats.x.shape[1]], t_row, y, len_row, span_scan,
                                  cum.source == "energy-counter", a, interval)
            # (a coarse sensor's offset below one interval is what its staleness tries; beyond, it is a clock's)
            least = interval if interval >= 20_000_000 else max(1_000_000, interval // 4)
            if abs(d_scan) >= least and all(abs(d_scan - c) > interval // 8 for c in cands):
                cands.append(d_scan)
                scanned = d_scan
        if sel is not None and cands:
            sel0, rows0 = sel, (A, y, w_row, t_row, overlap, len_row)
            lag_fine = (cum.source != "energy-counter" and interval <= _LAG_READING_NS and bool(np.any(sel0.coef))
                        and _sequential(st_ns, en_ns))
            lag_held = False  # the shift kept was already held against the lag read on time
            on_time_lag: float | None = None
            for d_ns in cands:
                cum_d, trace_d = _shifted(cum, trace, d_ns)
                rows_d = _fit_rows(cum_d, trace_d, feats, idle_curve, a, b, rel, with_weights=True)
                sel_d = select_family(rows_d[0], rows_d[1]) if len(rows_d[1]) else None
                if sel_d is None:
                    continue
                # a shift must win clearly: by more than the held-out error's own noise
                margin = 1 - max(0.03, 1 / math.sqrt(len(rows_d[1])))
                if sel_d.cv_error < sel.cv_error * margin:
                    sel, shift_ns, lag_held = sel_d, d_ns, False
                    A, y, w_row, t_row, overlap, len_row = rows_d
                elif lag_fine and d_ns == scanned and not shift_ns:
                    # The scan's offset, found with a lag beside it: through a lag, readings early by
                    # the offset can look on time to a fit without one (the lag's delay takes the
                    # offset's place), so the offset is held against the lag read on time, each with
                    # its own lag (a 1 ms trace 10 ms early on a board with an 8 ms lag: p95 4.8 %)
                    if on_time_lag is None:
                        tau0, rows_l0, _ = _choose_lag(cum, trace, feats, idle_curve, a, b, rel, sel0, FAMILIES, rows0[3])
                        on_time_lag = (_cv_error(rows_l0[0], rows_l0[1], FAMILIES[sel0.family])
                                       if tau0 > 0 and rows_l0 is not None else sel0.family_error)
                    tau_d, rows_ld, _ = _choose_lag(cum_d, trace_d, feats, idle_curve, a, b, rel, sel_d, FAMILIES, rows_d[3])
                    if tau_d > 0 and rows_ld is not None and \
                            _cv_error(rows_ld[0], rows_ld[1], FAMILIES[sel_d.family]) < on_time_lag * margin:
                        sel, shift_ns, lag_held = sel_d, d_ns, True
                        A, y, w_row, t_row, overlap, len_row = rows_d
            if shift_ns > 0 and lag_fine and not lag_held:
                # Readings late against the steps may be a board's electrical lag rather than stale
                # ones (a first-order lag delays the energy, a shift the readings): where the readings
                # are fine enough to show a lag, the lag read on time is kept when it predicts
                # held-out readings at least as well as the shift.
                # (the shift is held against the lag with its own lag too: a clock offset and a lag
                # together delay and smooth the readings, and either alone takes the other's part)
                tau0, rows_l0, _ = _choose_lag(cum, trace, feats, idle_curve, a, b, rel, sel0, FAMILIES, rows0[3])
                if tau0 > 0 and rows_l0 is not None:
                    on_time = _cv_error(rows_l0[0], rows_l0[1], FAMILIES[sel0.family])
                    shifted = sel.family_error
                    cum_d, trace_d = _shifted(cum, trace, shift_ns)
                    tau_d, rows_ld, _ = _choose_lag(cum_d, trace_d, feats, idle_curve, a, b, rel, sel, FAMILIES, t_row)
                    if tau_d > 0 and rows_ld is not None:
                        shifted = min(shifted, _cv_error(rows_ld[0], rows_ld[1], FAMILIES[sel.family]))
                    if on_time <= shifted:
                        sel, shift_ns = sel0, 0
                        A, y, w_row, t_row, overlap, len_row = rows0
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
            # (elsewhere the family chosen, or each family of its blend, with the waits' terms: the
            # selection over them is held against the selection without them)
            fam_w = ({k: v for k, v in families.items() if k.endswith(_WAITS)} if stage
                     else {f + _WAITS: families[f + _WAITS] for f in (sel.blend or {sel.family: 1.0})})
            sel_w = select_family(rows_w[0], rows_w[1], families=fam_w) if len(rows_w[1]) else None
            if sel_w is not None and np.any(sel_w.coef[nb:]) and (
                    stage or sel_w.cv_error < sel.cv_error * (1 - max(0.03, 1 / math.sqrt(len(rows_w[1]))))):
                sel_steps, sel, with_waits = sel, sel_w, True
                A, y, w_row, t_row, overlap, len_row = rows_w
                sel_fams = fam_w
        if sel is not None and np.any(sel.coef) and _sequential(st_ns, en_ns):
            # The electrical lag, where the readings are fine enough to show it: the family
            # chosen is refitted through each lag tried, one that predicts held-out readings
            # clearly better is kept and the family chosen again through it.
            if lag_s is not None:
                tau, rows_l, sel_l = _given_lag_fit(cum, trace, fit_feats if with_waits else feats, idle_curve, a, b, rel,
                                                    sel_fams or FAMILIES, lag_s, nb if with_waits else None)
            else:
                tau, rows_l, lag_scores = _choose_lag(cum, trace, fit_feats if with_waits else feats, idle_curve, a, b, rel, sel,
                                                      sel_fams or families, t_row)
                sel_l = select_family(rows_l[0], rows_l[1], families=sel_fams or FAMILIES) if rows_l is not None else None
            if sel_l is not None and with_waits and not np.any(sel_l.coef[nb:]):
                # through the lag the waits need no terms of their own (they were the steps' tails)
                rows_l = _fit_rows(cum, trace, _with_lag(feats, tau) if tau > 0 else feats, idle_curve, a, b, rel, with_weights=True)
                sel_l = select_family(rows_l[0], rows_l[1]) if len(rows_l[1]) else None
                if sel_l is not None:
                    with_waits, sel_steps, sel_fams = False, None, None
            if sel_l is not None and rows_l is not None and np.any(sel_l.coef):
                sel, lag_tau = sel_l, tau
                # the family fitted through the lag (each of its blend's): refitted through the lag's neighbours for the band
                lag_fam = {f: (sel_fams or FAMILIES)[f] for f in (sel_l.blend or {sel_l.family: 1.0})}
                A, y, w_row, t_row, overlap, len_row = rows_l
                # fitted through a given lag with the waits' terms: the refits below keep its constraints
                held_wait = lag_s is not None and with_waits
        if (sel is not None and np.any(sel.coef) and cum.source != "energy-counter" and _part_time(trace, len_row)
                and len(y) >= 40):
            # Part-time readings err by the spread of the power inside their interval (where
            # the covered slice fell is unknown): a reading across a prefill's edge says far
            # less than one inside steady decoding. Refit by weighted least squares, each
            # reading by the inverse of its expected squared error (its modelled power's
            # spread inside the interval, and a share of its level), both fitted on the first
            # fit's residuals.
            sw = _part_time_weights(A, y, sel.coef, x, feats, rel, t_row, len_row)
            if sw is not None:
                sel_g = (_held_wait_select(A * sw[:, None], y * sw, sel_fams or FAMILIES, nb) if held_wait
                         else select_family(A * sw[:, None], y * sw, families=sel_fams or FAMILIES))
                if sel_g is not None and np.any(sel_g.coef):
                    sel = sel_g
        if (sel is not None and np.any(sel.coef) and cum.source == "energy-counter" and trace_in.power_w is not None
                and trace_in.power_kind == SampleKind.INSTANT and len(y) >= 40 and _STACK):
            # A counter with part-time power beside it: the counter's deltas hold every joule
            # but their edges sit at refreshes of unknown, drifting phase; the power readings
            # are on time but each covers an unknown slice of its interval. Both are linear in
            # the same step terms: fit on both, in time order, each reading weighted by the
            # inverse of its expected squared error (the counter's from its residuals, the
            # power readings' as above). The counter alone still reconciles the windows.
            sel = _with_power_rows(sel, A, y, t_row, cum_in, trace_in, feats, fit_feats if with_waits else feats,
                                   lag_tau, idle_curve, a, b, rel, x, sel_fams or FAMILIES, nb if held_wait else None)
        if sel is not None and np.any(sel.coef):
            family, why = sel.family, sel.why
            if with_waits:  # the steps' family, the wait terms beside it (StepModel.wait_coef)
                family, why = _steps_family(family), why + ("; with the waits' W while waiting (the J per wait left out: the given "
                                                               "lag places each step's tail)" if held_wait else
                                                               "; with the waits' terms (W while waiting, J per wait)")
            if lag_tau > 0:
                why += f"; through a {lag_tau * 1e3:.2g} ms electrical lag" + (" (given)" if lag_s is not None else "")
            elif lag_s is not None:
                why += "; no electrical lag (given)"
            blend = {(_steps_family(f) if with_waits else f): w for f, w in sel.blend.items()} if sel.blend else None
            model = StepModel(sel.coef, sel.r2, sel.rows, family, sel.cv_error, sel.cv_r2, why, sel.candidates, rates, lag_tau, blend)
        else:
            # Too little to fit: every step costs in proportion to its duration.
            model = StepModel(np.eye(len(BASIS))[0], math.nan, 0, "duration", why="too few readings to fit: energy by step duration", rates=rates)
    coef = model.full_coef
    if model is not None and sel is None and len(w_st) and np.any(model.wait_coef):
        with_waits = True  # a given model (a live period) with wait terms
        A, y, w_row, t_row, overlap, len_row = _fit_rows(cum, trace, fit_feats, idle_curve, a, b, rel, with_weights=True)
    if not with_waits:
        fit_feats = feats
    lag_tau = float(model.lag_tau_s) if model.lag_tau_s > 0 and _sequential(st_ns, en_ns) else 0.0
    if lag_tau > 0:
        fit_feats = _with_lag(fit_feats, lag_tau)
        if sel is None:  # a given model: the readings through its lag
            A, y, w_row, t_row, overlap, len_row = _fit_rows(cum, trace, fit_feats, idle_curve, a, b, rel, with_weights=True)
    coef_w = model.wait_coef if with_waits else np.zeros(0)
    coef_fit = np.concatenate((coef, coef_w))

    # 2. Reconcile: the window length is chosen by predicting held-out readings
    #    from the model scaled to what the rest of their window measured.
    window_why = "given"
    band_rel = math.nan
    noise = None
    slow_w: np.ndarray | None = None  # the fit's slow residual over each request's lifetime (W)
    life_rel: tuple[np.ndarray, np.ndarray] | None = None  # each request's lifetime clipped to the period (s from a)
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
            if lag_tau > 0 and isinstance(fit_feats, _Lagged):
                # the sensor's own correlation is no longer than the residuals' without the lag
                # show (a closer model leaves the slow misfit, which short windows do correct)
                excess = min(excess, _lag_free_excess(cum, trace, fit_feats.inner, coef_fit, idle_curve, a, b, rel,
                                                      step_ns, spacing))
            L, scores, best_pred = select_window(t_row, m_row, p_row, a, b, lengths, max(overlap, excess))
            # the whole period is always a candidate: a prediction comes back unless every error was NaN
            pred = best_pred if best_pred is not None else p_row * (m_row.sum() / p_row.sum() if p_row.sum() > 0 else 1.0)
            reconcile_s = L * _NS
            window_why = f"lowest held-out error of {len(scores)} window lengths"
            band_rel = _band_rel(m_row, pred, p_row)
            noise = cast("dict[str, Any]", _noise_model(m_row - pred, p_row, t_row, len_row, m_row, x @ coef, feats, rel, a, L,
                                                        max(overlap, excess),
                                                        cum.source != "energy-counter" and _part_time(trace, len_row)))
            # >= 8 readings here: never None
            noise["resid"] = m_row - pred
            # The fit's own slow residual: over each request's lifetime, the power (W) that no step
            # term explains, beyond what its readings' own squares hold (overlapping readings: every
            # k-th tiles time). Reconciliation takes it out of the split, but where it is the idle
            # baseline's drift it moves joules between idle and dynamic (see idle_rel_sd's ``unseen_w``).
            k_ov = max(1, int(round(float(np.median(len_row)) / spacing)))
            r_slow, t_slow = (m_row - g * p_row)[::k_ov], t_row[::k_ov]
            c_r = np.concatenate(([0.0], np.cumsum(r_slow)))
            c_q = np.concatenate(([0.0], np.cumsum(r_slow**2)))
            # the lifetimes clipped to the period: seg's starts and ends (its edges, by index). The ends
            # are not in order: searched as the sorted edges, then gathered (a third of the time)
            l0, l1 = np.take(seg.edges, seg.si), np.take(seg.edges, seg.ei)
            j0 = np.searchsorted(t_slow, l0, side="left")
            j1 = np.take(np.searchsorted(t_slow, seg.edges, side="right"), seg.ei)
            life_rel = (rel(l0), rel(l1))
            # sqrt(max((c_r[j1] - c_r[j0])^2 - (c_q[j1] - c_q[j0]), 0)) / max(life, 1e-9), in place
            slow_w = np.take(c_r, j1)
            slow_w -= np.take(c_r, j0)
            slow_w *= slow_w
            dq = np.take(c_q, j1)
            dq -= np.take(c_q, j0)
            slow_w -= dq
            np.maximum(slow_w, 0.0, out=slow_w)
            np.sqrt(slow_w, out=slow_w)
            life_s = (l1 - l0) * _NS
            slow_w /= np.maximum(life_s, 1e-9, out=life_s)
        else:
            reconcile_s = (b - a) * _NS
            window_why = "too few readings: the whole period"
    # Stretches with nothing in flight and no step running are windows of their own (see
    # _idle_cuts): a margin past the last step holds its electrical tail and the readings'
    # span; a gap counts once it is longer than two margins and a few readings. No edge is
    # made inside one.
    spacing_ns = _typical_interval(cum.t) if len(cum.t) > 2 else 0
    margin_ns = int(max(_CUT_MARGIN_NS, 2 * spacing_ns, 2 * trace.window_ns, 5 * lag_tau * 1e9))
    if busy is None:  # (attribute passes the device's, already merged)
        busy = _busy_intervals(np.concatenate((requests.start_ns[ridx], st_ns)), np.concatenate((requests.end_ns[ridx], en_ns)), None, "")
    min_gap_ns = 2 * margin_ns + max(_CUT_GAP_NS, 4 * spacing_ns)
    cuts = _idle_cuts(busy[0], busy[1], a, b, margin_ns, min_gap_ns)
    edges = _reconcile_edges(cum, trace, a, b, reconcile_s, _idle_gaps(busy[0], busy[1], a, b, margin_ns, min_gap_ns))
    if len(cuts):
        edges = np.union1d(edges, cuts)
    w_meas = cum.over(edges) - idle_curve.over(edges)
    w_drawn: np.ndarray | None = None  # the windows' energy as drawn, where the lag's deconvolution changes it
    if lag_tau > 0 and isinstance(fit_feats, _Lagged):
        # A step's energy is what it makes the board draw, the tail its lag puts after its window
        # included (the conventions): the readings deconvolved. Through a first-order lag the
        # energy drawn in [e0, e1) falls short of what was caused there by lag x (the power at
        # e1 - the power at e0), the tail that crosses each edge; the model is then read unlagged.
        half_ns = max(_typical_interval(t_row), 1_000_000) if len(t_row) > 2 else 1_000_000
        w_drawn = w_meas
        w_meas = w_drawn + lag_tau * np.diff(_edge_power(cum, idle_curve, fit_feats, coef_fit, edges, rel, half_ns))
        fit_feats = unlagged = fit_feats.inner
    F = fit_feats.mass(rel(edges))
    w_pred = np.diff(F, axis=0) @ coef_fit
    e_rel = rel(edges)

    def window_scale(w_m: np.ndarray, w_p: np.ndarray) -> np.ndarray:
        """Each window's measured over modelled energy (0 where either is nothing)."""
        ok = (w_p > 1e-12) & (w_m > 0)
        out: np.ndarray = np.where(ok, w_m / np.where(ok, w_p, 1.0), 0.0)
        return out

    def integral_of(sc: np.ndarray) -> _Rel:
        """The integrated scale ``sc`` (per window) up to each time, t already clipped to the windows."""
        c = np.concatenate(([0.0], np.cumsum(sc * np.diff(e_rel))))

        def at(t: np.ndarray) -> np.ndarray:
            k = np.searchsorted(e_rel, t, side="right")
            k -= 1
            np.clip(k, 0, len(sc) - 1, out=k)
            out: np.ndarray = t - np.take(e_rel, k)  # c[k] + sc[k] * (t - e_rel[k]), in place
            out *= np.take(sc, k)
            out += np.take(c, k)
            return out
        return at

    scale = window_scale(w_meas, w_pred)
    ok = scale > 0  # the windows where both were something
    resid = w_meas - scale * w_pred  # nonzero only where nothing was predicted, or measured <= idle

    # 3. Each step's energy: its fitted power times the integrated scale over its span.
    scale_integral = integral_of(scale)
    lo = np.clip(rel(st_ns), e_rel[0], e_rel[-1])
    hi = np.clip(rel(en_ns), e_rel[0], e_rel[-1])
    if with_waits:  # the waits' geometry, for any coefficients with waits' terms (step_energy)
        w_lo = np.clip(rel(w_st), e_rel[0], e_rel[-1])
        w_hi = np.clip(rel(w_en), e_rel[0], e_rel[-1])
        w_dur = np.maximum(w_hi - w_lo, 1e-12)
        by_end = np.argsort(en_ns, kind="stable")
        k_prev = np.searchsorted(en_ns[by_end], w_st, side="right") - 1
        has = k_prev >= 0

    def step_energy(coef_x: np.ndarray, at: _Rel) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Each step's energy (J) under the coefficients ``coef_x`` (the waits' terms after the
        steps') and the integrated scale ``at``, the integrated scale over each step (s), and the
        power held in each wait (J; None without the waits' terms). 3b: the J per wait is the
        electrical tail of the step before it, so that step's (a step's energy is all it makes the
        board draw), or the wait's where no step came before it; the power held in a wait is the
        wait's (5b)."""
        span = at(hi) - at(lo)
        e = (x @ coef_x[:nb]) / feats.dur * span
        if not (with_waits and np.any(coef_x[nb:nb + 2])):
            return e, span, None
        s_wait = (at(w_hi) - at(w_lo)) / w_dur  # the mean scale over each wait
        e_jw = coef_x[nb + 1] * s_wait
        e = e + np.bincount(by_end[k_prev[has]], weights=e_jw[has], minlength=len(e))
        return e, span, coef_x[nb] * w_dur * s_wait + np.where(has, 0.0, e_jw)

    e_step, scale_span, e_hold = step_energy(coef_fit, scale_integral)

    # 4. Steps to requests by tokens; entries' request indices map into ridx order.
    # (one device: every request and step is this device's, in order, so the maps are the identity
    # where the entries' indices are too: none negative, which the maps would wrap)
    def _identity(idx: np.ndarray, n: int, refs: np.ndarray) -> bool:
        return len(idx) == n and (not n or (int(idx[0]) == 0 and bool(np.all(np.diff(idx) == 1)))) and (
            not len(refs) or int(refs.min()) >= 0)

    all_req = _identity(ridx, len(requests), steps.entry_request)
    all_steps = _identity(s_idx, len(steps), steps.entry_step)
    if not all_req:
        local = np.full(len(requests), -1, dtype=np.int64)
        local[ridx] = np.arange(len(ridx))
    if all_steps:
        e_s = steps.entry_step
        em = None
    else:
        step_pos = np.full(len(steps), -1, dtype=np.int64)
        step_pos[s_idx] = np.arange(len(s_idx))
        e_s = step_pos[steps.entry_step]
        em = e_s >= 0
    if em is None or bool(em.all()):  # every entry is of this device's steps (one device): no copies
        e_r = steps.entry_request if all_req else local[steps.entry_request]
        e_t = steps.entry_tokens
    else:
        e_s = np.compress(em, e_s)
        e_r = np.compress(em, steps.entry_request) if all_req else local[np.compress(em, steps.entry_request)]
        e_t = np.compress(em, steps.entry_tokens)
    tok_sum = np.bincount(e_s, weights=e_t, minlength=len(s_idx))
    ts = tok_sum[e_s]
    tok_any = ts > 0
    if bool(tok_any.all()):
        share = e_t / ts
    else:  # a step whose requests processed no tokens (as reported): split equally among them
        n_in = np.bincount(e_s, minlength=len(s_idx))[e_s]
        share = np.where(tok_any, e_t / np.where(tok_any, ts, 1.0), 1.0 / np.maximum(n_in, 1))
    val = e_step[e_s] * share
    on_dev = e_r >= 0
    all_on = bool(on_dev.all())
    dyn = np.bincount(e_r if all_on else e_r[on_dev], weights=val if all_on else val[on_dev], minlength=len(ridx))
    n_ent = np.bincount(e_s, minlength=len(s_idx))
    lost = (0.0 if all_on else float(val[~on_dev].sum())) + float(e_step[n_ent == 0].sum())  # steps naming requests of another device, or none

    # 4b. What the fit does not know: the same split under the bootstrap's coefficients
    #     and under the other families, per request (for the error band).
    if sel is not None and sel.boot is not None and sel.boot.shape[1] > nb:  # the steps' terms only
        boot = sel.boot[:, :nb]
        cut = _steps_family
        fits = {cut(f): v[:nb] for f, v in (sel.fits or {}).items()}
        if sel_steps is not None and len(fits) < 2:
            # the waits' terms were tried beside the chosen family only: the close families
            # (the band's departures) are those of the steps-only selection, on its own scores
            sel = dataclasses.replace(sel_steps, boot=boot)
        else:
            sel = dataclasses.replace(sel, family=cut(sel.family), boot=boot, fits=fits,
                                      candidates={cut(f): v for f, v in (sel.candidates or {}).items()})
    k_win = np.clip(np.searchsorted(e_rel, feats.st, side="right") - 1, 0, len(scale) - 1)  # each step's window
    spread: tuple[Any, ...] = _dyn_spread(sel, coef, x, np.where(feats.dur > 0, scale_span / np.where(feats.dur > 0, feats.dur, 1.0), 0.0),
                         e_s, e_r, share, on_dev, len(ridx), k_win)
    # Per request: sum over its steps of (its share of the step's energy)^2, for the step-noise term.
    s2 = np.bincount(e_r, weights=val**2, minlength=len(ridx)) if all_on else np.bincount(
        e_r[on_dev], weights=(e_step[e_s[on_dev]] * share[on_dev]) ** 2, minlength=len(ridx))
    if noise is not None and "resid" in noise:
        resid_row, alias_row = noise.pop("resid"), noise.pop("alias", None)
        noise = dict(noise, **_request_components(resid_row, p_row, t_row, len_row, rel, feats, e_step, e_s,
                                                  e_r, share, on_dev, e_rel, w_meas, w_pred, len(ridx), dyn, s2,
                                                  life_rel if life_rel is not None else
                                                  (rel(np.clip(requests.start_ns[ridx], a, b)), rel(np.clip(requests.end_ns[ridx], a, b))),
                                                  cum.source == "energy-counter", alias_row))
    extra_noise = {k: v for k, v in noise.items() if k != "exposure"} if noise is not None else None

    # 5. The residual, as a piecewise-constant power over windows, shared by time.
    widths = np.diff(e_rel)
    res_rate = resid / widths
    res_curve_c = np.concatenate(([0.0], np.cumsum(resid)))
    seg_rel = rel(seg.edges)
    k = np.searchsorted(e_rel, seg_rel, side="right")
    k -= 1
    np.clip(k, 0, len(resid) - 1, out=k)
    # res_curve_c[k] + res_rate[k] * clip(seg_rel - e_rel[k], 0, e_rel[k + 1] - e_rel[k]), in place
    cres = seg_rel - np.take(e_rel, k)
    np.clip(cres, 0, np.take(widths, k), out=cres)
    cres *= np.take(res_rate, k)
    cres += np.take(res_curve_c, k)
    dyn_split = dyn  # the steps' (and below the waits' terms') split, without the residual
    dyn_t, un_t = seg.share_weighted(np.diff(cres))
    wo = _wait_owners(owners, o_idx, (lambda r: r) if all_req else (lambda r: local[r]), rel, e_rel[0], e_rel[-1], len(ridx))

    def share_waits(mass: _Rel) -> tuple[np.ndarray, float]:
        """The waits' energy (cumulative ``mass``) to requests: another device's step, else by time."""
        if wo is None:
            return seg.share_weighted(np.diff(mass(seg_rel)))
        return wo.share_waits(mass, seg, seg_rel)

    dyn = dyn + dyn_t
    wait_j = 0.0
    if e_hold is not None:
        # 5b. The power held in the waits, to the steps other devices run meanwhile for the same
        #     requests, the rest by time (_WaitOwners).
        wf = _StepFeatures(e_hold[:, None], w_lo, w_lo + w_dur)
        dyn_w, un_w = share_waits(lambda t: wf.mass(t)[:, 0])
        dyn = dyn + dyn_w
        un_t = un_t + un_w
        wait_j = float(e_hold.sum())
        dyn_split = dyn_split + dyn_w
    lag_band = _lag_interval(lag_scores, lag_tau, len(t_row)) if lag_tau > 0 and lag_s is None and w_drawn is not None else None
    if lag_band is not None:
        # 4d. The lag is known only as well as its held-out error tells it apart from its
        #     neighbours: the model refitted through either end of that interval and the windows
        #     deconvolved through it are as likely; how far each request's share of the steps
        #     moves is a departure of the band.
        def steps_split(coef_x: np.ndarray, w_x: np.ndarray) -> np.ndarray:
            v_x = step_energy(coef_x, integral_of(window_scale(w_x, np.diff(F, axis=0) @ coef_x)))[0][e_s] * share
            return np.bincount(e_r[on_dev], weights=v_x[on_dev], minlength=len(ridx))

        base_split = steps_split(coef_fit, w_meas)
        d_lag = np.zeros(len(ridx))
        for tau_x in lag_band:
            lagged_x = _with_lag(unlagged, tau_x)
            coef_x = coef_fit
            rows_x = _fit_rows(cum, trace, lagged_x, idle_curve, a, b, rel) if lag_fam is not None else None
            sel_x = select_family(rows_x[0], rows_x[1], families=lag_fam) if rows_x is not None and len(rows_x[1]) else None
            if sel_x is not None and np.any(sel_x.coef):
                coef_x = np.zeros(len(coef_fit))
                n_c = min(len(coef_x), len(sel_x.coef))
                coef_x[:n_c] = np.asarray(sel_x.coef, dtype=np.float64)[:n_c]
            w_x = cast("np.ndarray", w_drawn) + tau_x * np.diff(_edge_power(cum, idle_curve, lagged_x, coef_x, edges, rel, half_ns))
            d_lag = np.maximum(d_lag, np.abs(steps_split(coef_x, w_x) - base_split))
        if noise is not None and noise.get("exposure") is not None:
            noise["exposure"]["lag"] = d_lag  # the truth anywhere between: a uniform spread's half-width
        else:
            spread = (spread[0], np.sqrt(spread[1] ** 2 + d_lag**2))
    spread = (*spread, s2, noise)
    extra: dict[str, Any] = {
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
    if slow_w is not None:
        extra["idle_slow_w"] = slow_w  # for the idle band (attribute takes it out of the summary)
    return dyn, un_t + lost, extra, spread


def _prefer_power(cum: _CumEnergy, trace: DeviceTrace, steps: Steps, s_idx: np.ndarray, a: int, b: int) -> bool:
    """Whether a trace's power readings predict held-out readings clearly better than its
    energy counter does (each fitted with the full basis and an idle intercept)."""
    if _typical_interval(cum.t) >= 0.9 * trace.window_ns > 0:
        # the counter is read no more often than the averages cover: each average is the exact
        # mean over its window, read on time; the counter value is as old as its last refresh
        return True
    x, _ = basis(step_features(steps, s_idx))
    rel: _Rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
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


def _fit_idle(cum: _CumEnergy, trace: DeviceTrace, steps: Steps, s_idx: np.ndarray, requests: Requests, a: int, b: int,
              seg: _Segments | None = None) -> tuple[float, float] | None:
    """The idle baseline (W) as the intercept of the step-model regression, or None. With the
    in-flight segments ``seg``, a device that waits a material part of its busy time (a pipeline
    stage) has its waits' terms beside the steps' (held clocks in the bubble are no idle power)."""
    x = step_features(steps, s_idx)
    rel: _Rel = lambda t: (np.asarray(t, dtype=np.int64) - a).astype(np.float64) * _NS  # noqa: E731
    steps_f = _StepFeatures(x, rel(steps.start_ns[s_idx]), rel(steps.end_ns[s_idx]))
    feats: _StepFeatures | _Beside = steps_f
    if seg is not None:
        w_st, w_en = _waits(seg, steps.start_ns[s_idx], steps.end_ns[s_idx])
        busy_s = float(np.diff(seg.edges)[seg.n > 0].sum())
        if len(w_st) and float((w_en - w_st).sum()) >= _WAIT_SHARE * busy_s:
            xw = np.column_stack(((w_en - w_st) * _NS, np.ones(len(w_st))))
            feats = _Beside(steps_f, _StepFeatures(xw, rel(w_st), rel(w_en)))
    zero = _Piecewise(np.array([a, b], dtype=np.int64), np.zeros(2))
    A, y, one = _fit_rows(cum, trace, feats, zero, a, b, rel, with_time=True)
    if len(y) < 4 * (x.shape[1] + 1):
        return None
    X = np.column_stack((one, A))
    coef = nnls(X, y)
    if not coef[0] > 0:
        return None
    w = float(coef[0])
    rel_sd = _intercept_rel_sd(X, y, coef)
    # The intercept is told apart from the steps' watts only through the step terms: a law the
    # four terms miss moves it. The same intercept under the other step families that predict
    # held-out readings about as well: the truth may lie anywhere between them.
    x9, _ = basis(x)
    A9, y9, one9 = _fit_rows(cum, trace, _StepFeatures(x9, steps_f.st, steps_f.en), zero, a, b, rel, with_time=True)
    X9 = np.column_stack((one9, A9))
    got: dict[str, tuple[float, float]] = {}
    for name, cols in FAMILIES.items():
        c9 = (0, *(1 + c for c in cols))
        cv = _cv_error(X9, y9, c9)
        if math.isfinite(cv):
            got[name] = (cv, float(nnls(X9[:, list(c9)], y9)[0]))
    if got:
        best = min(v[0] for v in got.values())
        ws = [v[1] for v in got.values() if v[0] <= 1.25 * best] + [w]
        dep = max(ws) - min(ws)
        rel_sd = min(1.0, math.sqrt(rel_sd**2 + (dep / w) ** 2 / 3.0))
    return w, rel_sd


def _power_points_in(trace: DeviceTrace, a: int, b: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The trace's power points (:func:`power_points`) whose interval lies inside ``[a, b]`` (ns):
    a point's time in it and, for averaged readings (``span`` ns), its window's start too."""
    t, pv, span = power_points(trace)
    ok = (t >= a) & (t <= b)
    if span:
        ok &= t - span >= a
    return t[ok], pv[ok], span


def _intercept_rel_sd(X: np.ndarray, y: np.ndarray, coef: np.ndarray) -> float:
    """Relative standard error of the fitted idle intercept (``coef[0]``, column 0 of ``X``): the
    least-squares standard error over the terms the non-negative fit kept. Where the device
    never idles the intercept is told apart from the steps' own watts only by how their mix
    varies, and it can be off by far more than the baseline drifts."""
    P = np.flatnonzero(coef > 0)
    n = len(y)
    if coef[0] <= 0 or n <= len(P) + 2:
        return _IDLE_REL
    Xp = X[:, P]
    rss = float(np.sum((y - X @ coef) ** 2))
    try:
        inv = np.linalg.inv(Xp.T @ Xp)
    except np.linalg.LinAlgError:
        return 1.0
    se = math.sqrt(max(rss / (n - len(P)), 0.0) * max(float(inv[0, 0]), 0.0))
    return float(max(_IDLE_REL, min(1.0, se / float(coef[0]))))


class _RowPlan:
    """The readings of ``_fit_rows(cum, trace, feats, idle_curve, a, b, rel)`` (plain rows: ``A``, ``y``)
    read once, for the rows of many features on the same readings (the lag's and the knees' searches):
    ``y`` and the times each row reads the features at; :meth:`rows` then gives ``A``, the same
    numbers as ``_fit_rows`` (which reads its plain rows through this)."""

    __slots__ = ("y", "_hi", "_lo", "_div")

    def __init__(self, cum: _CumEnergy, trace: DeviceTrace, idle_curve: _Piecewise, a: int, b: int, rel: _Rel) -> None:
        self._hi: np.ndarray | None = None  # the times of the rows' mass (their ends), or of their density
        self._lo: np.ndarray | None = None  # the rows' starts (None: a density)
        self._div: float | None = None  # the rows' span (s) where they are mean powers
        if cum.source == "energy-counter":
            t = cum.t[(cum.t >= a) & (cum.t <= b)]
            if len(t) >= 3:
                lo, hi = t[:-1], t[1:]
                self.y = cum.energy(lo, hi) - idle_curve.integral(lo, hi)
                self._hi, self._lo = rel(hi), rel(lo)
                return
        if trace.power_w is None:
            self.y = np.zeros(0)
            return
        t, pv, span = _power_points_in(trace, a, b)
        if span:
            lo = t - span
            self._hi, self._lo, self._div = rel(t), rel(lo), span * _NS
            self.y = pv - idle_curve.integral(lo, t) / (span * _NS)
        else:
            self._hi = rel(t)
            self.y = pv - idle_curve(t)

    def rows(self, feats: _Features) -> np.ndarray:
        if self._hi is None:
            return np.zeros((0, feats.x.shape[1]))
        if self._lo is None:
            out: np.ndarray = feats.density(self._hi)
            return out
        A: np.ndarray = feats.mass(self._hi) - feats.mass(self._lo)
        if self._div is not None:
            A /= self._div
        return A


@overload
def _fit_rows(cum: _CumEnergy, trace: DeviceTrace, feats: _Features, idle_curve: _Piecewise, a: int, b: int, rel: _Rel,
              with_time: bool = ..., *, with_weights: Literal[True]) -> _Rows: ...
@overload
def _fit_rows(cum: _CumEnergy, trace: DeviceTrace, feats: _Features, idle_curve: _Piecewise, a: int, b: int, rel: _Rel,
              with_time: Literal[True], with_weights: Literal[False] = ...) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
@overload
def _fit_rows(cum: _CumEnergy, trace: DeviceTrace, feats: _Features, idle_curve: _Piecewise, a: int, b: int, rel: _Rel,
              with_time: Literal[False] = ..., with_weights: Literal[False] = ...) -> tuple[np.ndarray, np.ndarray]: ...
def _fit_rows(cum: _CumEnergy, trace: DeviceTrace, feats: _Features, idle_curve: _Piecewise, a: int, b: int, rel: _Rel,
              with_time: bool = False, with_weights: bool = False
              ) -> _Rows | tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray]:
    """Regression rows (A, y): one per sensor reading inside the period.

    ``with_weights`` also returns each row's length in seconds (rows times it are
    energies), its end time (ns) and how many neighbouring rows overlap it.
    """
    if not with_time and not with_weights:
        plan = _RowPlan(cum, trace, idle_curve, a, b, rel)
        return plan.rows(feats), plan.y
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
    t, pv, span = _power_points_in(trace, a, b)
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


def _dyn_spread(sel: Selection | None, coef: np.ndarray, x: np.ndarray, scale_per_s: np.ndarray, e_s: np.ndarray,
                e_r: np.ndarray, share: np.ndarray, on_dev: np.ndarray, n_req: int, k_win: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-request spread of dynamic energy across alternative step models:
    ``(bootstrap sd, largest departure under a close family)``, joules; zeros without a fit.

    Linear in the coefficients: each request's dynamic energy is ``B_i . c`` with ``B_i``
    its token share of its steps' basis terms times their reconciliation scale. Each
    alternative is renormalised to the same total in every reconciliation window
    (``k_win``: each step's window; reconciliation keeps each window's measured total), so
    what remains is how it would move energy between the requests of one window: nothing
    where a window holds one step (a fine sensor), the global split where it holds the run."""
    z = np.zeros(n_req)
    if sel is None or sel.boot is None or not len(e_s):
        return z, z
    if bool(on_dev.all()):
        w, r, s_on = share, e_r, e_s
    else:
        w, r, s_on = share[on_dev], e_r[on_dev], e_s[on_dev]
    xw = x * scale_per_s[:, None]  # each step's basis terms times its reconciliation scale
    # (the chosen family departs too where the centre is a blend)
    fam = [v for f, v in (sel.fits or {}).items() if (f != sel.family or sel.blend) and np.any(v)
           and sel.candidates.get(f, math.inf) <= 1.25 * sel.family_error]
    tot = np.bincount(s_on, weights=w, minlength=len(x)) @ xw  # basis totals over the requests
    base = float(tot @ coef)
    if base <= 0:
        return z, z

    def norm(C: np.ndarray) -> np.ndarray:
        t = C @ tot
        return C * np.where(t > 0, base / np.where(t > 0, t, 1.0), 0.0)[:, None]

    e0 = xw @ coef  # each step's energy under the chosen model (J)
    nwin = int(k_win.max()) + 1 if k_win is not None and len(k_win) else 0
    e0_w = np.bincount(k_win, weights=e0, minlength=nwin) if nwin and k_win is not None else None

    def per_request(direction: np.ndarray) -> np.ndarray:  # B_i . direction, for every request, in one pass over the entries
        d = xw @ direction
        if e0_w is not None and k_win is not None:  # the window's measured total is kept: only the split inside it moves
            d_w = np.bincount(k_win, weights=d, minlength=nwin)
            d = d - e0 * np.take(np.where(e0_w > 0, d_w / np.where(e0_w > 0, e0_w, 1.0), 0.0), k_win)
        return np.bincount(r, weights=np.take(d, s_on) * w, minlength=n_req)

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


#: An idle gap's margins and its least length past them (see :func:`_idle_cuts`)
_CUT_MARGIN_NS, _CUT_GAP_NS = 250_000_000, 10_000_000_000
_SELECT_ROWS = 200_000  # readings the window choice and the error model look at, at most
_Z90 = 1.6449  # two-sided 90 %: +-1.645 standard deviations
_IDLE_REL = 0.015  # the idle baseline's relative sd where fewer than two idle stretches show its drift (a prior: a few W over tens of s)


def _quality(extra: dict[str, Any]) -> str:
    """``good``: the model predicts held-out readings well and the sensor resolves requests;
    ``coarse``: it predicts them well but the readings are coarse (the band says how coarse);
    ``misfit``: the model explains little of the held-out readings (or could not be fitted)."""
    m = extra.get("model")
    if m is None or not m.rows or not (m.cv_r2 >= 0.5):
        return "misfit"
    nz = extra.get("noise") or {}
    return "coarse" if nz.get("reading_ns", 0.0) > 25e6 else "good"


def _dyn_half_width(dyn: np.ndarray, spread: _Spread, starts: np.ndarray, ends: np.ndarray, extra: dict[str, Any],
                    parts: dict[str, np.ndarray] | None = None, take: slice = slice(None)) -> np.ndarray:
    """One standard deviation (J) of each batch-fit request's dynamic energy (see the README).
    ``parts``, if given, is filled with what each source adds to the variance (J^2) of the
    requests ``take`` picks; they sum to the square of the result there (see :data:`BAND_PARTS`)."""
    sd, dep, s2, noise = spread
    # the truth could lie anywhere between the chosen model and a close runner-up: a
    # uniform spread over +-dep has standard deviation dep / sqrt(3)
    var = sd**2 + dep**2 / 3.0
    if parts is not None:
        parts["coefficients"], parts["families"] = sd[take] ** 2, dep[take] ** 2 / 3.0
    if noise is None:
        cv = extra["model"].cv_error if extra.get("model") is not None else math.nan
        rel_sd = cv if math.isfinite(cv) else 0.25
        if parts is not None:
            parts["held-out"] = (rel_sd * dyn[take]) ** 2
        return np.sqrt(var + (rel_sd * dyn) ** 2)
    if noise.get("exposure") is not None:
        return _dyn_sd_components(dyn, var, noise, _group_var(noise, ends - starts), parts, take)
    sig_i = _group_sigma(dyn, starts, ends, noise)
    life = np.maximum((ends - starts).astype(np.float64), 1.0)
    # A request shorter than a reading is placed inside it by the model alone.
    # ... and a step inside a reconciliation window much longer than itself gets the model's
    # share of the window, whatever the step really drew.
    L, sd_ns = noise.get("window_ns", 0.0), noise.get("step_ns", 0.0)
    u_w = max(0.0, 1.0 - sd_ns / L) if L > 0 else 0.0
    u = np.maximum(np.minimum(1.0, noise["reading_ns"] / life), u_w)
    # the held-out groups already hold the steps' scatter at their scale: the step term adds
    # only where it says more (a request whose energy sits in a few steps)
    g, st = (sig_i * dyn) ** 2, noise["step_var"] * s2 * u
    if parts is not None:
        g_t, st_t = g[take], st[take]
        parts["groups"], parts["white"] = np.where(g_t >= st_t, g_t, 0.0), np.where(g_t >= st_t, 0.0, st_t)
    var = var + np.maximum(g, st)
    out: np.ndarray = np.sqrt(var)
    return out


#: what a request's band is made of (:func:`_dyn_half_width`'s ``parts``, then the idle baseline's):
#: the step model's coefficients (their block bootstrap), the close runner-up families' split,
#: the misfit that persists over a lifetime (common to all in flight, the request's own), the
#: white scatter (the steps' own, the sensor's through its windows), the held-out runs of readings
#: as long as the request where they say more, the fitted lag's own uncertainty, the model's
#: held-out error where no error model could be fitted or where it explains little (``misfit``),
#: and the idle baseline's error
BAND_PARTS = ("coefficients", "families", "persistent", "white", "groups", "lag", "held-out", "misfit", "idle")


def _group_sigma(dyn: np.ndarray, starts: np.ndarray, ends: np.ndarray, noise: dict[str, Any]) -> np.ndarray:
    """Relative sigma of each request's dynamic energy from the held-out groups of readings
    as long as its lifetime (see :func:`_noise_model`); 0.25 without any."""
    life = np.maximum((ends - starts).astype(np.float64), 1.0)
    groups = noise["groups"]
    if not groups:
        return np.full(len(dyn), 0.25)
    gs = np.array(sorted(groups), dtype=np.float64)
    sig = np.array([groups[g] for g in sorted(groups)])
    lg = np.log2(np.maximum(1.0, life / noise["spacing_ns"]))
    # piecewise linear in log2(G) between the sizes (powers of two): a table at every integer
    # log2 up to the longest, then one gather and a blend per request (np.interp is 3x slower)
    top = float(np.log2(gs[-1]))
    tbl = np.interp(np.arange(int(top) + 2, dtype=np.float64), np.log2(gs), sig)
    x = np.minimum(lg, top)
    i = x.astype(np.int64)
    f = x - i
    sig_i: np.ndarray = np.take(tbl, i) * (1.0 - f) + np.take(tbl, i + 1) * f
    # longer than the longest group checked (half a window): the windows inside the
    # request are measured, the errors of its parts average out
    far = lg > top
    if far.any():
        sig_i[far] = sig[-1] * np.exp2(0.5 * (top - lg[far]))
    return sig_i


def _group_var(noise: dict[str, Any], life_ns: np.ndarray) -> np.ndarray | None:
    """Relative variance of each request's dynamic energy that the held-out groups of
    readings as long as its lifetime show (:func:`_group_sigma`), less what the separated
    components call the sensor's own noise over as many readings (white, and the two end
    edges; see :func:`_request_components`), which inside a reconciliation window does not
    reach the request. A function of the lifetime alone: tabulated at 64 points an octave
    and looked up (a million requests in a few ms)."""
    groups = noise.get("groups")
    spacing = float(noise.get("spacing_ns", 0.0))
    if not groups or not spacing > 0 or not len(life_ns):
        return None
    lg = np.log2(np.maximum(life_ns.astype(np.float64) / spacing, 1.0))
    top = float(lg.max())
    u = np.arange(int(math.ceil(top * _PER_OCTAVE)) + 2, dtype=np.float64) / _PER_OCTAVE
    life_u = np.exp2(u) * spacing
    g2 = _group_sigma(u, np.zeros(len(u)), life_u, noise) ** 2
    rs = float(noise.get("reading_s", 0.0))
    if "sensor_rel" in noise and rs > 0:
        k = rs / np.maximum(life_u * _NS, rs)
        g2 = np.maximum(g2 - noise["sensor_rel"] * k - 2.0 * noise["edge_rel"] * k**2, 0.0)
    idx = (lg * _PER_OCTAVE + 0.5).astype(np.int64)
    out: np.ndarray = np.take(g2, idx)
    return out


_PER_OCTAVE = 64  # the group term's table: points per doubling of a lifetime


def _dyn_sd_components(dyn: np.ndarray, var: np.ndarray, noise: dict[str, Any], g2: np.ndarray | None = None,
                       parts: dict[str, np.ndarray] | None = None, take: slice = slice(None)) -> np.ndarray:
    """One standard deviation (J) of each request's dynamic energy from the separated components
    (see :func:`_request_components`); ``var``: the coefficients' own spread; ``parts`` as
    :func:`_dyn_half_width`'s."""
    ex = noise["exposure"]
    white = ex["white"]
    pers = (noise["misfit_var"] + noise["request_var"]) * (dyn * (1.0 - ex["psi"])) ** 2
    comp = pers + white
    if g2 is not None:
        # what the held-out groups of readings as long as the request say its stretch of
        # the sensor's readings is off by, the split inside each reading included, less the
        # sensor's own part (see _group_var). Those groups' errors are the same held-out
        # residuals the components above are fitted on (a misfit common to all in flight, the
        # requests' own, the steps' scatter), summed over whole readings; the groups add the
        # split inside each reading. Each measures the other's part: the larger holds the other.
        g = g2 * dyn**2
        if parts is not None:
            g_t, pers_t, white_t = g[take], pers[take], np.broadcast_to(white, dyn.shape)[take]
            held = g_t > pers_t + white_t
            parts["persistent"], parts["white"], parts["groups"] = (np.where(held, 0.0, pers_t), np.where(held, 0.0, white_t),
                                                                    np.where(held, g_t, 0.0))
        comp = np.maximum(comp, g)
    elif parts is not None:
        parts["persistent"], parts["white"] = pers[take], np.broadcast_to(white, dyn.shape)[take]
    if "lag" in ex:
        # the fitted lag's own uncertainty moves a request's energy to and from its neighbours'
        # steps (4d), as the steps' scatter does at the readings' edges: the larger holds the other
        lag = np.maximum(ex["lag"] ** 2 / 3.0 - white, 0.0)
        if parts is not None:
            parts["lag"] = np.broadcast_to(lag, dyn.shape)[take]
        comp = comp + lag
    out: np.ndarray = np.sqrt(var + comp)
    return out


def _interval_mass(feats: _StepFeatures, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per interval ``[lo, hi]`` (s), the sum over steps of ``x`` (steps x columns, each spread
    evenly over its step) times the share of the step inside: :class:`_StepFeatures`' mass
    difference. Steps one after another (the usual case) take one prefix sum and one search
    per end instead of its five prefix sums and two searches."""
    st, dur = feats.st, feats.dur
    if not feats._tiled or not len(st) or bool(np.any(dur <= 0)):
        f = _StepFeatures(x, feats.st, feats.en)
        out: np.ndarray = f.mass(hi) - f.mass(lo)
        return out
    cum = np.zeros((len(st) + 1, x.shape[1]))
    np.cumsum(x, axis=0, out=cum[1:])

    def at(t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(st, t, side="right") - 1  # the last step started by t (-1: none)
        k = np.maximum(i, 0)
        frac = np.clip((t - np.take(st, k)) / np.take(dur, k), 0.0, 1.0)
        frac[i < 0] = 0.0
        v: np.ndarray = np.take(cum, k, axis=0) + np.take(x, k, axis=0) * frac[:, None]
        return v

    out = at(hi) - at(lo)
    return out


def _noise_model(r: np.ndarray, p: np.ndarray, t: np.ndarray, len_ns: np.ndarray, m: np.ndarray, e_mod: np.ndarray,
                 feats: _StepFeatures, rel: _Rel, a: int, L: int, overlap: int, part_time: bool = False) -> dict[str, Any] | None:
    """What the held-out readings say about each request's error.

    ``groups``: {G readings: relative sigma} of a run of G readings predicted from the
    rest of its window (see :func:`wattspan.attribution.family.group_errors`). ``step_var``: the
    relative variance of one batch step's energy about the model, if all of a single
    reading's held-out scatter is put on its steps (sum of squared step energies in it);
    it matters for requests shorter than a reading, whose placement inside the reading no
    reading can check. ``spacing_ns``: the readings' spacing."""
    if len(r) < 8:
        return None
    spacing = float(np.median(np.diff(t))) if len(t) > 1 else 1.0
    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
    groups = group_errors(t, m, p, a, L, sizes, overlap)
    # per reading: the steps' squared energies in it; for part-time readings also the steps'
    # modelled J and W^2 s in it (the aliasing exposure, see _part_time)
    cols = [e_mod**2] if not part_time else [e_mod**2, e_mod, e_mod**2 / np.maximum(feats.dur, 1e-12)]
    t_rel = rel(t)
    mq = _interval_mass(feats, np.column_stack(cols), t_rel - len_ns * _NS, t_rel)
    Q = mq[:, 0]
    # L^2 (mean of P^2 - (mean of P)^2) over each reading's interval of length L
    alias = np.maximum(mq[:, 2] * (len_ns * _NS) - mq[:, 1] ** 2, 0.0) if part_time else None
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
            "window_ns": float(L), "step_ns": float(np.median(feats.dur)) * 1e9, "alias": alias}


_UNITS = 2_000  # requests whose lifetimes the band's components are fitted on, at most
_PAIRS = 200_000  # (lifetime, request in flight) pairs the fit looks at, at most


def _request_components(r: np.ndarray, p: np.ndarray, t: np.ndarray, len_ns: np.ndarray, rel: _Rel, feats: _StepFeatures,
                        e_step: np.ndarray, e_s: np.ndarray, e_r: np.ndarray, share: np.ndarray, on_dev: np.ndarray,
                        e_rel: np.ndarray, w_meas: np.ndarray, w_pred: np.ndarray, n_req: int, dyn: np.ndarray,
                        s2: np.ndarray, life: tuple[np.ndarray, np.ndarray], counter: bool = False,
                        alias: np.ndarray | None = None) -> dict[str, Any]:
    """The error band's components, estimated on the unit it is for: a request's lifetime.

    Over each request's lifetime the readings (or counter windows) that overlap it have
    held-out residuals ``r`` (each reading predicted from the model scaled by the rest of its
    reconciliation window) summing to ``R``: how far off the model is over that stretch of
    time, for all the requests in flight together. Its expected square is split, by
    non-negative least squares over many such lifetimes (as relative errors, one row each),
    into what each source would add:

    * ``misfit_var``: the step family wrong in a way common to everything in flight
      (exposure: the total, squared; it does not average out);
    * ``request_var``: each request's own persistent misfit (a prompt-heavy request's chunks
      all over-predicted), independent between requests (exposure: the sum of the squared
      energies of the requests in flight: it averages out over concurrency in the total, but
      not in any one request);
    * ``step_var``: each step off independently (exposure: the sum of squared step energies;
      it averages out over a request's many steps);
    * ``sensor_var``, ``edge_var``: white noise on each reading (the sum of squared reading
      energies) and a reading window placed early or late (the two end readings' squared
      energies): the sensor's, credited only as far as the data tell it apart from the
      steps' scatter (see :func:`_credited_split`);
    * ``alias_share``: for part-time instant readings, the share of the model's own power
      spread inside each reading that the readings show (see :func:`_part_time`): the
      sensor's, identified by how that spread varies from reading to reading.

    The persistent terms (misfit, request) are fitted on the cross products of each
    lifetime's residuals (its squared sum less its readings' squares), where white noise has
    no part; so are a counter's edges, which cancel inside a lifetime. What is left of the
    squares is white and split over the steps' scatter and the sensor's.

    Then each request's exposure once reconciled: the windows are measured, so a step's own
    error counts less the more of its window's energy it is, a request's misfit less the more
    of its windows' energy it holds (``s2phi``, ``psi``), and the sensor's noise reaches it
    only through its windows' measured totals (``v_req``). ``counter``: the readings are an
    energy counter's deltas, whose edge errors the consecutive residuals identify (see
    :func:`_edge_var`)."""
    out: dict[str, Any] = {}
    nw = len(w_pred)
    if len(t) < 8 or not len(e_step) or nw < 1 or n_req == 0 or not np.any(on_dev):
        return out
    len_ns = np.asarray(len_ns, dtype=np.int64)
    spacing = float(np.median(np.diff(t)))
    k_over = int(round(float(np.median(len_ns)) / spacing)) if spacing > 0 else 1
    if k_over > 1:
        # readings that overlap (a 1 s average polled every 100 ms): every k-th one tiles time,
        # so sums over a lifetime count each joule once, as the requests' parts do
        t, r, p, len_ns = t[::k_over], r[::k_over], p[::k_over], len_ns[::k_over]
        alias = alias[::k_over] if alias is not None else None
        if len(t) < 8:
            return out
    lo_t = np.maximum.accumulate(rel(t - len_ns))
    hi_t = rel(t)
    c: Callable[[np.ndarray], np.ndarray] = lambda v: np.concatenate(([0.0], np.cumsum(v)))  # noqa: E731
    cr, cp, cp2, cr2 = c(r), c(p), c(p**2), c(r**2)
    ca = c(alias) if alias is not None and len(alias) == len(r) and bool(np.any(alias > 0)) else None
    ls, le = life
    cand = np.flatnonzero((dyn > 0) & (le > ls))
    if len(cand) < 20:
        return out
    units = cand[np.linspace(0, len(cand) - 1, min(_UNITS, len(cand))).astype(np.int64)]
    j0 = np.searchsorted(hi_t, ls[units], side="right")
    j1 = np.searchsorted(lo_t, le[units], side="left")
    ok = j1 > j0
    units, j0, j1 = units[ok], j0[ok], j1[ok]
    if len(units) < 20:
        return out
    R, P = cr[j1] - cr[j0], cp[j1] - cp[j0]
    N = cp2[j1] - cp2[j0]
    # the steps' squared energies over each lifetime's readings (steps by their middle)
    mid = 0.5 * (feats.st + feats.en)
    o_m = None if len(mid) < 2 or bool(np.all(mid[1:] >= mid[:-1])) else np.argsort(mid, kind="stable")
    mid_s = mid if o_m is None else mid[o_m]
    cq = c(e_step**2 if o_m is None else e_step[o_m] ** 2)
    S = cq[np.searchsorted(mid_s, hi_t[j1 - 1], side="right")] - cq[np.searchsorted(mid_s, lo_t[j0], side="left")]
    E = p[j0] ** 2 + np.where(j1 - 1 > j0, p[j1 - 1] ** 2, 0.0)
    V = ca[j1] - ca[j0] if ca is not None else np.zeros(len(units))
    A_u, B_u = lo_t[j0], hi_t[j1 - 1]
    # the requests in flight over each unit, and their energy inside it (at their mean rate)
    if len(ls) < 2 or bool(np.all(ls[1:] >= ls[:-1])):
        ls_o, le_o, dyn_o = ls, le, dyn
    else:
        o = np.argsort(ls, kind="stable")
        ls_o, le_o, dyn_o = ls[o], le[o], dyn[o]
    span = np.maximum(le_o - ls_o, 1e-9)
    longest = float(np.quantile(span[:: max(1, len(span) // 100_000)], 0.99)) if len(span) else 0.0  # a typical bound
    k0 = np.searchsorted(ls_o, A_u - longest, side="left")
    k1 = np.searchsorted(ls_o, B_u, side="left")
    cnt = np.maximum(k1 - k0, 0)
    if int(cnt.sum()) > _PAIRS:  # thousands in flight: fewer lifetimes do (the fit has five terms)
        keep = np.arange(0, len(units), int(math.ceil(cnt.sum() / _PAIRS)))
        units, j0, j1, k0, cnt = units[keep], j0[keep], j1[keep], k0[keep], cnt[keep]
        R, P, N, S, E, V, A_u, B_u = R[keep], P[keep], N[keep], S[keep], E[keep], V[keep], A_u[keep], B_u[keep]
    u_of = np.repeat(np.arange(len(units)), cnt)
    k = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt) + np.repeat(k0, cnt)
    ov = np.clip(np.minimum(le_o[k], B_u[u_of]) - np.maximum(ls_o[k], A_u[u_of]), 0.0, None)
    Xreq = np.bincount(u_of, weights=(dyn_o[k] * ov / span[k]) ** 2, minlength=len(units))
    pos = P > 1e-9 * max(float(np.median(np.abs(P))), 1e-30)
    if pos.sum() < 20:
        return out
    P2 = P[pos] ** 2
    X = np.column_stack((np.ones(int(pos.sum())), Xreq[pos] / P2, S[pos] / P2, N[pos] / P2, E[pos] / P2, V[pos] / P2))
    yv = (R[pos] / P[pos]) ** 2
    yv = np.minimum(yv, float(np.quantile(yv, 0.99)))  # a burst the model never saw widens, not sets, the band
    # What persists over a lifetime (a misfit common to all in flight, each request's own)
    # shows in the products of its readings' residuals with each other; white noise (the
    # sensor's, a step's own) in their squares alone, and a counter's edges in both: each
    # value ends one delta and starts the next, so inside a lifetime they cancel and only the
    # two ends remain. The cross products identify the persistent terms and the edges; the
    # squares left over are white. A counter's edge errors need not be independent: where its
    # refresh phase drifts against the reads (a refresh interval that is not the read
    # interval), consecutive edges share most of their error, each delta errs by the change
    # between its two edges, far less than an edge does. So the two ends' variance (the
    # lifetime's R) and a delta's (the products inside it: -2 x their squares) are fitted
    # apart; independent edges make them equal.
    W = (cr2[j1] - cr2[j0])[pos]
    hi_y = float(np.quantile(yv, 0.99))
    cross = np.clip((R[pos] ** 2 - W) / P2, -hi_y, hi_y)
    Xc = X[:, :2] if not counter else np.column_stack((X[:, :2], X[:, 4], -2.0 * X[:, 3]))
    vc = nnls(Xc, cross)
    edge = max(_edge_var(r, p), float(vc[2])) if counter else 0.0
    v = np.zeros(X.shape[1])
    v[:2] = vc[:2]
    v[4] = edge
    if counter:
        # A counter's edges touch adjacent deltas only, so the products of deltas at least two
        # apart hold the persistent terms and no edge. Where the refresh phase drifts (a random
        # walk against the reads) the adjacent products are not what the two edge variances
        # model, and the fit above lets the persistent terms take up the difference; a request
        # is given only what both sets of products show. What only the adjacent ones show is
        # the counter's: it comes out of the squares with the rest of the persistent fit below,
        # not left for the steps' scatter (it reaches a request only through its windows' edges).
        v[:2] = np.minimum(vc[:2], _apart_persistent(r, p, j0, j1, pos, R, W, N, P2, X[:, 1], hi_y))
    y_rest = np.maximum(yv - X[:, :2] @ vc[:2] - edge * X[:, 4], 0.0)
    # the white part between the steps' scatter and the sensor's (where every reading holds
    # about as many steps as any other the two are not told apart: see _credited_split);
    # other readings' ends (an average's window reaching past the lifetime) with the sensor
    if counter:
        v[[2, 3, 5]] = _credited_split(X[:, [2, 3, 5]], y_rest, sensor=(1,))
    else:
        v[2:] = _credited_split(X[:, 2:], y_rest, sensor=(1, 2))
    # reconciliation's reach: each step's share of its window, each request's of its windows
    k_step = np.clip(np.searchsorted(e_rel, feats.st, side="right") - 1, 0, nw - 1)
    wp = np.where(w_pred > 0, w_pred, np.inf)
    phi = np.minimum(1.0, np.maximum(e_step, 0.0) / wp[k_step])
    kw = np.clip(np.searchsorted(e_rel, hi_t, side="left") - 1, 0, nw - 1)
    Nw = np.bincount(kw, weights=p**2, minlength=nw)
    Pw = np.bincount(kw, weights=p, minlength=nw)
    first = np.concatenate(([True], kw[1:] != kw[:-1]))
    last = np.concatenate((kw[1:] != kw[:-1], [True]))
    Ew = np.bincount(kw, weights=p**2 * (first | last), minlength=nw)
    Vw = np.bincount(kw, weights=np.diff(ca), minlength=nw) if ca is not None else 0.0
    vw = np.where(Pw > 0, (v[3] * Nw + v[4] * Ew + v[5] * Vw) / np.where(Pw > 0, Pw, 1.0) ** 2, 0.0)
    # per step, then gathered once per entry: the step term (its own scatter where its window
    # does not measure it) and the sensor's through the window; the window's energy for psi
    es, sh = (e_s, share) if bool(np.all(on_dev)) else (e_s[on_dev], share[on_dev])
    r_on = e_r if es is e_s else e_r[on_dev]
    e2 = e_step**2
    var_step = e2 * (v[2] * (1.0 - phi) + vw[k_step])
    white = np.bincount(r_on, weights=sh**2 * var_step[es], minlength=n_req)
    wsum = np.bincount(r_on, weights=sh * (e_step * np.maximum(w_meas, 0.0)[k_step])[es], minlength=n_req)
    win_e = np.where(dyn > 0, wsum / np.where(dyn > 0, dyn, 1.0), 0.0)
    psi = np.where(win_e > 0, np.minimum(1.0, dyn / np.where(win_e > 0, win_e, 1.0)), 1.0)
    out = {"units": int(pos.sum()), "misfit_var": float(v[0]), "request_var": float(v[1]), "step_var_req": float(v[2]),
           "sensor_var": float(v[3]), "edge_var": float(v[4]), "alias_share": float(v[5]),
           "exposure": {"white": white, "psi": psi}}
    # the sensor's part of a held-out run of readings (see _dyn_sd_components): per reading,
    # relative to its mean energy squared, and the reading's length (s)
    mp = float(np.mean(p))
    if mp > 0:
        out["sensor_rel"] = float((v[3] * np.mean(p**2) + (v[5] * float(np.mean(np.diff(ca))) if ca is not None else 0.0)) / mp**2)
        out["edge_rel"] = float(v[4] * np.mean(p**2) / mp**2)
        out["reading_s"] = spacing * max(k_over, 1) * _NS
    return out


_PART_TIME_NS = 5_000_000  # as power_points: instant values further apart stand for their interval


def _part_time(trace: DeviceTrace, len_row: np.ndarray) -> bool:
    """Whether the readings are part-time "instant" values (see
    :func:`wattspan.attribution.energy.power_points`): each stands for the interval since the
    one before but covers an unknown part of it. Read at a uniformly random instant, such a
    value errs about the interval's mean power by the variance of the power inside the
    interval (times its length squared, in joules): from the model's own step power, the
    aliasing exposure of each reading (see :func:`_noise_model`); a value that averages over
    part of the interval errs by less, and the band's fit decides how much of it the readings
    show (see :func:`_request_components`). An average is exact over its window; a counter's
    errors sit at its edges. ``len_row``: the rows' lengths (ns), which for instant readings
    are their spacing: power_points' test (fresh values more than 5 ms apart) without its cost."""
    return (trace.power_kind == SampleKind.INSTANT and trace.power_w is not None and len(len_row) > 0
            and float(np.median(len_row[:: max(1, len(len_row) // 10_000)])) > _PART_TIME_NS)


def _part_time_weights(A: np.ndarray, y: np.ndarray, coef: np.ndarray, x: np.ndarray, feats: _StepFeatures, rel: _Rel,
                       t_row: np.ndarray, len_row: np.ndarray, normalise: bool = True) -> np.ndarray | None:
    """Square roots of the least-squares weights of part-time readings (see :func:`_part_time`),
    or None. A reading covering an unknown slice of its interval errs about the interval's mean
    power by the spread of the power inside it: its expected squared error is taken as
    ``a + b * P^2 + c * V``, ``P`` the modelled mean power over the interval and ``V`` the
    modelled power's variance inside it (W^2), the three fitted (non-negative) on the squared
    residuals of the unweighted fit ``coef``. Weights are the inverse, floored at a tenth of the
    median error (no reading counts more than ten typical ones)."""
    nb = x.shape[1]
    p = A @ coef
    r2 = (y - p) ** 2
    e_mod = x @ coef[:nb]
    t_rel = rel(t_row)
    span = np.maximum(len_row * _NS, 1e-12)
    mq = _interval_mass(feats, np.column_stack((e_mod, e_mod**2 / np.maximum(feats.dur, 1e-12))), t_rel - span, t_rel)
    mean_p = mq[:, 0] / span
    var_p = np.maximum(mq[:, 1] / span - mean_p**2, 0.0)
    X = np.column_stack((np.ones(len(y)), p**2, var_p))
    keep = r2 <= np.quantile(r2, 0.99)  # a burst the model never saw sets no weight
    v = nnls(X[keep], r2[keep])
    s2 = X @ v
    med = float(np.median(s2))
    if not med > 0 or not v[2] > 0:
        return None
    out: np.ndarray = 1.0 / np.sqrt(np.maximum(s2, 0.1 * med))
    return out * math.sqrt(med) if normalise else out


_STACK = True


def _with_power_rows(sel: Selection, A: np.ndarray, y: np.ndarray, t_row: np.ndarray, cum: _CumEnergy, trace: DeviceTrace,
                     feats: _StepFeatures, base: _StepFeatures | _Beside, lag_tau: float, idle_curve: _Piecewise, a: int, b: int,
                     rel: _Rel, x: np.ndarray, families: dict[str, tuple[int, ...]], held_wait: int | None = None) -> Selection:
    """The selection refitted on a counter's rows and the part-time power readings beside it
    (see the caller), or ``sel`` unchanged where the power readings are not part-time.
    ``held_wait``: the waits' first column where the model was fitted through a given lag
    (the refit keeps its constraints: :func:`_held_wait_select`)."""
    tr_p = dataclasses.replace(trace, energy_j=None)
    cum_p = _CumEnergy.from_trace(tr_p)
    f_p: _Features = _with_lag(base, lag_tau) if lag_tau > 0 else base
    A_p, y_p, _, t_p, _, len_p = _fit_rows(cum_p, tr_p, f_p, idle_curve, a, b, rel, with_weights=True)
    if len(y_p) < 40 or not _part_time(tr_p, len_p):
        return sel
    sw = _part_time_weights(A_p, y_p, sel.coef, x, feats, rel, t_p, len_p, normalise=False)
    r_c = y - A @ sel.coef
    var_c = float(np.mean(np.minimum(r_c**2, np.quantile(r_c**2, 0.99))))
    if sw is None or not var_c > 0:
        return sel
    t_all = np.concatenate((t_row, t_p))
    o = np.argsort(t_all, kind="stable")
    A_s = np.vstack((A / math.sqrt(var_c), A_p * sw[:, None]))[o]
    y_s = np.concatenate((y / math.sqrt(var_c), y_p * sw))[o]
    sel_s = _held_wait_select(A_s, y_s, families, held_wait) if held_wait is not None else select_family(A_s, y_s, families=families)
    return sel_s if sel_s is not None and np.any(sel_s.coef) else sel


def _apart_persistent(r: np.ndarray, p: np.ndarray, j0: np.ndarray, j1: np.ndarray, pos: np.ndarray, R: np.ndarray,
                      W: np.ndarray, N: np.ndarray, P2: np.ndarray, h: np.ndarray, hi_y: float) -> np.ndarray:
    """The persistent terms of :func:`_request_components` (a misfit common to all in flight,
    each request's own) from the products of each lifetime's counter deltas at least two
    apart: its squared residual sum less the squares (``W``) and twice the adjacent
    products, against the exposures left once the same pairs are taken out (``h``: the
    requests' squared energies over the lifetime's, ``N``: the squared predicted deltas',
    ``P2``: the predicted total's squared; rows ``pos`` of lifetimes ``j0:j1``)."""
    cm: Callable[[np.ndarray], np.ndarray] = lambda v: np.concatenate(([0.0], np.cumsum(v)))  # noqa: E731
    ca, cq = cm(r[1:] * r[:-1]), cm(p[1:] * p[:-1])
    jl = np.maximum(j1 - 1, j0)
    adj, adj_p = (ca[jl] - ca[j0])[pos], (cq[jl] - cq[j0])[pos]
    y = np.clip((R[pos] ** 2 - W - 2.0 * adj) / P2, -hi_y, hi_y)
    g = np.clip(1.0 - (N[pos] + 2.0 * adj_p) / P2, 0.0, 1.0)
    out: np.ndarray = nnls(np.column_stack((g, h * g)), y)
    return out


def _edge_var(r: np.ndarray, p: np.ndarray) -> float:
    """Relative variance of an energy counter's edge error, from the held-out residuals of
    consecutive deltas: 0 unless they are clearly anticorrelated.

    Every counter value ends one delta and starts the next: a value that is stale, refreshed
    early or late, or quantised moves energy from one reading into the next, so reading ``j``
    errs by ``d_j - d_(j-1)``: consecutive residuals share one edge with opposite signs, ``E[r_j r_(j+1)] = -var(d_j)``,
    and over any run of readings the edges inside cancel (only the two ends remain). A
    step's own scatter is independent between readings (or positively shared, when a step
    straddles two), so it cannot make consecutive residuals anticorrelated. ``var(d_j)``
    relative to ``p_j p_(j+1)`` (the energies either side of the edge); applied only where the
    sum of the products is more than two of its standard errors below zero."""
    if len(r) < 8:
        return 0.0
    rr = r[1:] * r[:-1]
    pp = p[1:] * p[:-1]
    s, se = float(rr.sum()), math.sqrt(float(np.sum(rr**2)))
    if not (se > 0 and s < -2.0 * se) or float(pp.sum()) <= 0:
        return 0.0
    return -s / float(pp.sum())


def _credited_split(X: np.ndarray, y: np.ndarray, sensor: Sequence[int] = (3, 4)) -> np.ndarray:
    """Non-negative split of ``y`` over the exposures ``X``, crediting the sensor's columns only
    with what the data identify: where a reading holds about as many steps as any other, the
    steps' scatter and the sensor's noise have the same exposure and no fit can tell them
    apart. The sensor keeps the 10 % quantile of its share over a block bootstrap (contiguous blocks
    of lifetimes, in time order), never more than the full fit gives it; the rest is refitted
    on the other columns, which do reach the request."""
    v = nnls(X, y)
    n = len(y)
    kb = min(20, n // 5)
    sensor = list(sensor)
    if kb < 4 or not np.any(v[sensor] > 0):
        return v
    blk = np.minimum((np.arange(n) * kb) // max(n, 1), kb - 1)
    rng = np.random.default_rng(7)
    boots = []
    for _ in range(_SPLIT_BOOT):
        sw = np.sqrt(np.bincount(rng.integers(0, kb, kb), minlength=kb)[blk].astype(np.float64))
        boots.append(nnls(X * sw[:, None], y * sw)[sensor])
    lo = np.minimum(np.quantile(np.array(boots), _SENSOR_Q, axis=0), v[sensor])
    keep = [i for i in range(X.shape[1]) if i not in sensor]
    rest = nnls(X[:, keep], y - X[:, sensor] @ lo)
    out = np.zeros(X.shape[1])
    out[keep] = rest
    out[sensor] = lo
    return out


_SPLIT_BOOT = 40  # block-bootstrap resamples of the split
_SENSOR_Q = 0.1  # the sensor keeps what 9 in 10 resamples give it at least


#: the clock offset scan (see :func:`_offset_scan`): the grid step's bounds (ns), the offsets' reach
#: (s, and in readings' intervals) and the most grid points it correlates over
_SCAN_STEP_NS = (1_000_000, 5_000_000)
_SCAN_REACH_S, _SCAN_REACH_READINGS = 0.5, 4
_SCAN_POINTS = 1 << 16
#: a coarse sensor's readings read these fractions of their interval earlier (negative: later), tried beside
#: the scan's offset: a counter's own staleness up to a whole interval, plus a clock offset of either sign
#: (a 100 ms counter 50 ms late on top of its staleness: p95 7.3 -> 5.7 %, `benchmarks/clock_offset.py`)
_STALE_FRACS = (0.25, 0.5, 0.75, 1.0, -0.25, -0.5)
_SCAN_LAGS_S = tuple(0.0005 * 2.0**k for k in range(6))  # 0.5 to 16 ms


def _offset_scan(feats: _StepFeatures, coef: np.ndarray, t_row: np.ndarray, y: np.ndarray, len_row: np.ndarray,
                 span_ns: int, counter: bool, a: int, interval: int) -> int:
    """The clock offset (ns) between the readings and the steps that best lines up what the readings
    measured with what the fitted steps predict: the readings read ``d`` later than the steps they
    measured (a clock offset between the trace's host and the server's, an unsynchronised wall clock;
    negative: earlier). 0 when none stands out.

    The steps' predicted energy (the fit's ``coef``) as a cumulative curve on a uniform grid; each
    reading (its window's mean power; an instant one's over one grid step) against it at every offset
    within the reach, as one Pearson correlation per offset through FFTs (three of them, over at most
    :data:`_SCAN_POINTS` grid points: a few ms for a 40 s run of 1 ms readings). The peak, refined
    between grid points by a parabola, is only a candidate: the caller refits the readings shifted by
    it and keeps it only if held-out readings say so."""
    if len(t_row) < 32 or not np.any(coef):
        return 0
    e_step = feats.x @ coef
    if not np.any(e_step > 0):
        return 0
    h = int(min(max(interval // 4, _SCAN_STEP_NS[0]), _SCAN_STEP_NS[1]))
    K = int(math.ceil(max(_SCAN_REACH_S * 1e9, _SCAN_REACH_READINGS * interval) / h))
    win = int(np.median(len_row)) if counter else (span_ns or h)  # a reading's window (ns)
    lw = max(int(round(win / h)), 1)
    order = t_row
    lo = int(order[0])
    if (int(order[-1]) - lo) // h > _SCAN_POINTS:  # a long run: its middle stretch
        mid = (int(order[0]) + int(order[-1])) // 2
        keep = np.abs(order.astype(np.int64) - mid) <= (_SCAN_POINTS // 2) * h
        t_row, y, len_row = t_row[keep], y[keep], len_row[keep]
        if len(t_row) < 32:
            return 0
        lo = int(t_row[0])
    yp = y / (len_row * _NS) if counter else y  # each reading as power (W)
    j = ((t_row.astype(np.int64) - lo + h // 2) // h).astype(np.int64)  # each reading's nearest grid point
    n_j = int(j[-1]) + 1 if len(j) else 0
    # the model's mean power over each reading's window, on the grid, K points beyond either end
    c = 0 if (counter or span_ns) else h // 2  # an instant reading: the grid step around it
    g = lo + (np.arange(-K, n_j + K + 1, dtype=np.int64)) * h + c
    one = _StepFeatures(e_step[:, None], feats.st, feats.en)
    g_rel = (g - a).astype(np.float64) * _NS
    # corr(k) over readings i of y_i and D[j_i + K - k] (readings late by k grid steps)
    Y = np.bincount(j, weights=yp, minlength=n_j)
    W = np.bincount(j, minlength=n_j).astype(np.float64)
    nfft = 1 << int(math.ceil(math.log2(len(g) + n_j)))
    fY, fW = np.fft.rfft(Y[::-1], nfft), np.fft.rfft(W[::-1], nfft)
    # sum_j Y[j] D[j + m] = (Y reversed * D)[m + n_j - 1]; m = K - k for k in [-K, K]
    at = (K - np.arange(-K, K + 1)) + n_j - 1
    n = float(W.sum())
    sY, sY2 = float(Y.sum()), float((yp * yp).sum())
    vy = sY2 - sY * sY / n
    if vy <= 0:
        return 0

    def corr(C: np.ndarray) -> np.ndarray:
        D = np.zeros(len(g))
        D[lw:] = (C[lw:] - C[:-lw]) / (lw * h * _NS)  # the model's mean power over each reading's window
        sYD = np.fft.irfft(fY * np.fft.rfft(D, nfft), nfft)[at]
        sD = np.fft.irfft(fW * np.fft.rfft(D, nfft), nfft)[at]
        sD2 = np.fft.irfft(fW * np.fft.rfft(D * D, nfft), nfft)[at]
        vd = sD2 - sD * sD / n
        ok = vd > 1e-12 * max(float(vd.max()), 1e-300)
        r = np.full(len(at), -np.inf)
        r[ok] = (sYD[ok] - sY * sD[ok] / n) / np.sqrt(vy * vd[ok])
        return r

    # Through an electrical lag the readings trail the steps too, and smoothed: on readings fine
    # enough to show one, each lag of a coarse grid is tried with every offset, and the offset
    # taken is the best pair's (else the lag's own delay would pass for an offset)
    C0 = one.mass(g_rel)[:, 0]
    r = corr(C0)
    if interval <= _LAG_READING_NS:
        lagged = _with_lag(one, _SCAN_LAGS_S[0], cols=[0])
        lagged.mass(g_rel)  # (its unlagged mass, kept for every lag)
        for tau in _SCAN_LAGS_S:
            r_t = corr(lagged.at(tau).mass(g_rel)[:, 0])
            if r_t.max() > r.max():
                r = r_t
    i = int(np.argmax(r))
    # a peak that explains little, or no better than on time beyond a correlation's own noise, is none
    if r[i] < 0.2 or r[i] - r[K] <= 2.0 / math.sqrt(n):
        return 0
    k = float(i - K)
    if 0 < i < len(r) - 1 and np.isfinite(r[i - 1]) and np.isfinite(r[i + 1]):
        den = r[i - 1] - 2 * r[i] + r[i + 1]
        if den < 0:
            k += 0.5 * (r[i - 1] - r[i + 1]) / den
    return int(round(k * h))


def _shifted(cum: _CumEnergy, trace: DeviceTrace, d_ns: int) -> tuple[_CumEnergy, DeviceTrace]:
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
