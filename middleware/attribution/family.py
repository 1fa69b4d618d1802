"""Step-energy model selection for batch-fit: candidate families, blocked time cross-validation,
and the choice of the reconciliation window.

A batch step's dynamic energy is modelled as a non-negative combination of basis terms of its
composition. Real GPUs differ in which terms matter, so there is no single feature set:

* **energy** terms (the step's energy is additive in what it does): duration (s), prefill tokens,
  decode tokens, decode context (ktokens);
* **power** terms (the step's *power* is linear in its composition, so its energy is that power
  times the duration): prefill tokens x s, decode tokens x s, decode context x s;
* **saturating** terms (power saturates with token throughput, as compute does once a step is
  compute-bound): ``duration * (1 - exp(-rate / r))`` at two rates ``r`` set from the run's own
  steps (its median throughput and 4x that), so the fit needs no constants from us;
* **knee** terms (power concave in the step's work, as a square root or a board's power cap
  bends it): ``duration * min(prefill + w x decode, k)`` at four knees ``k`` spaced
  geometrically between the 10th and 99th percentiles of the run's steps' work; with
  non-negative coefficients, power is any monotone concave piecewise-linear function of the
  work. ``w`` (decoding requests counted as that many prefill tokens) is the one of
  :data:`KNEE_WEIGHTS` whose fit predicts held-out readings best (``fit._knee_weight``);
* a **step** term: a fixed energy per step (weights read once per step, launch overhead), which
  the duration and token terms can express only with negative coefficients.

Families are column subsets of one basis. Every sensor reading is a linear function of the steps
it overlaps, so one pass over the readings builds per-block Gram matrices; each family and fold
is then a tiny non-negative least squares on the normal equations. Folds are contiguous blocks of
time; the blocks next to a held-out block are left out of its training set too (averaged
readings overlap their neighbours). The family with the lowest held-out error wins unless a
simpler one is within 2 % of it. A small ridge keeps short runs from overfitting.

The reconciliation window is chosen the same way: for each candidate length, each reading is
predicted from the fitted model scaled by what the *other* readings of its window measured
(its own and overlapping neighbours left out); the length with the lowest held-out error wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterable

import numpy as np

__all__ = ["BASIS", "FAMILIES", "KNEES", "KNEE_WEIGHTS", "Selection", "basis", "select_family", "select_window", "nnls_gram"]


#: The basis of step terms; units in the names (s, tokens, ktokens; "_s" terms are x seconds).
BASIS = (
    "duration_s",
    "prefill_tokens",
    "decode_tokens",
    "decode_context_ktokens",
    "prefill_tokens_s",
    "decode_tokens_s",
    "decode_context_ktokens_s",
    "saturating_lo_s",
    "saturating_hi_s",
    "work_knee_1_s",
    "work_knee_2_s",
    "work_knee_3_s",
    "work_knee_4_s",
    "steps",
)

#: The knees' columns in :data:`BASIS`, and the quantiles of the steps' work they sit at.
KNEES = (9, 10, 11, 12)
#: The per-step term's column in :data:`BASIS`.
STEP = BASIS.index("steps")
_KNEE_Q = (0.1, 0.99)
_KNEE_SAMPLE = 50_000  # steps the knees' percentiles are taken on, at most (evenly spaced)
#: Decode weights tried for the knees' work (decoding requests counted as this many prefill tokens):
#: factors of 2 over a wide range, the one whose fit predicts held-out readings best is kept.
KNEE_WEIGHTS = tuple(2.0**k for k in range(-1, 7))

#: Candidate families, simplest first: name -> basis column indices.
FAMILIES: dict[str, tuple[int, ...]] = {
    "energy": (0, 1, 2, 3),
    "power": (0, 4, 5, 6),
    "saturating": (0, 7, 8, 6),
    "energy+power": (0, 1, 2, 3, 4, 5, 6),
    "power+saturating": (0, 4, 5, 6, 7, 8),
    "all": tuple(range(9)),
    "energy+steps": (0, 1, 2, 3, STEP),
    "power+knees": (0, 4, 5, 6, *KNEES),
    "all+knees": tuple(range(14)),
}

_RIDGE = 1e-6  # relative to the (unit) diagonal of the scaled Gram matrix
_PARSIMONY = 1.02  # a simpler family within 2 % of the best held-out error wins
#: families whose held-out error is within 5 % of the best are not told apart by the readings:
#: their fits are blended (see :func:`select_family`)
_BLEND_WITHIN = 1.05
_BOOT_BLOCKS = 40  # time blocks the bootstrap resamples
_BOOT = 24  # bootstrap resamples


def basis(x4: np.ndarray, rates: tuple[float, ...] | None = None, weight: float | None = None
          ) -> tuple[np.ndarray, tuple[float, ...]]:
    """Expand the four step features (duration s, prefill, decode, decode context ktokens) to
    :data:`BASIS`. ``rates``: the basis's parameters from an earlier call (the saturating terms'
    throughputs, tokens/s; then the decode weight and the knees' work, when it had them); ``None``
    takes them from these steps (median throughput and 4x it; the knees at quantiles of the
    steps' work ``prefill + weight x decode``, ``weight`` 1 unless given). Returns the basis
    and the parameters used."""
    d = x4[:, 0]
    tokens = x4[:, 1] + x4[:, 2]
    rate = tokens / np.where(d > 0, d, 1.0)
    if rates is None:
        rates = basis_rates(x4, weight, rate)
    # column by column into a column-major buffer (each write contiguous), then one transposing copy
    # to the row-major basis the fit reads by rows
    out = np.zeros((len(x4), len(BASIS)), order="F")
    out[:, :4] = x4
    np.multiply(x4[:, 1:4], d[:, None], out=out[:, 4:7])
    out[:, 7] = -np.expm1(-rate / rates[0]) * d
    out[:, 8] = -np.expm1(-rate / rates[1]) * d
    if len(rates) >= 3 + len(KNEES):
        work = x4[:, 1] + rates[2] * x4[:, 2]
        for j, k in zip(KNEES, rates[3:3 + len(KNEES)]):
            np.multiply(np.minimum(work, k), d, out=out[:, j])
    out[:, STEP] = 1.0
    return np.ascontiguousarray(out), rates


def basis_rates(x4: np.ndarray, weight: float | None = None, rate: np.ndarray | None = None) -> tuple[float, ...]:
    """The parameters :func:`basis` takes from the steps themselves (see there), without the basis."""
    if rate is None:
        d = x4[:, 0]
        rate = (x4[:, 1] + x4[:, 2]) / np.where(d > 0, d, 1.0)
    pos = rate[rate > 0]
    r = float(np.median(pos)) if len(pos) else 1.0
    w = 1.0 if weight is None else float(weight)
    knees = knee_points(x4, w)
    return (max(r, 1e-9), max(4.0 * r, 1e-9), *((w, *knees) if knees else ()))


def knee_points(x4: np.ndarray, weight: float) -> tuple[float, ...]:
    """Where the knees sit on the steps' work ``prefill + weight x decode``: spaced geometrically
    between its 10th and 99th percentiles over the steps that do any; ``()`` where that span is empty."""
    if len(x4) > _KNEE_SAMPLE:  # percentiles of a long run from an even sample of its steps
        x4 = x4[:: -(-len(x4) // _KNEE_SAMPLE)]
    work = x4[:, 1] + weight * x4[:, 2]
    wp = work[work > 0]
    if not len(wp):
        return ()
    lo, hi = (float(v) for v in np.quantile(wp, _KNEE_Q))
    if not hi > lo > 0:
        return ()
    return tuple(lo * (hi / lo) ** (j / (len(KNEES) + 1)) for j in range(1, len(KNEES) + 1))


def _nnls_tol(c: np.ndarray) -> float:
    """The gradient below which :func:`nnls_gram` (and :func:`_nnls_from`'s check) lets a coefficient stay at 0."""
    return 1e-12 * max(1.0, float(np.abs(c).max()) if len(c) else 1.0)


def nnls_gram(G: np.ndarray, c: np.ndarray, max_iter: int = 60) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson) on normal equations ``G x = c``."""
    n = len(c)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = c.copy()
    tol = _nnls_tol(c)
    it = 0
    while it < max_iter and (~passive).any() and (w[~passive] > tol).any():
        it += 1
        j = np.flatnonzero(~passive)[np.argmax(w[~passive])]
        passive[j] = True
        for _ in range(3 * n + 3):
            z = np.zeros(n)
            P = np.flatnonzero(passive)
            try:
                z[P] = np.linalg.solve(G[np.ix_(P, P)], c[P])
            except np.linalg.LinAlgError:
                z[P] = np.linalg.lstsq(G[np.ix_(P, P)], c[P], rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
        else:
            break
        w = c - G @ x
    return x


def _nnls_from(G: np.ndarray, c: np.ndarray, P: np.ndarray) -> np.ndarray:
    """``nnls_gram(G, c)``, given a guess ``P`` (sorted) of the coefficients its solution keeps (another
    fit's, on nearly the same rows): nnls_gram ends on the solve over the coefficients it keeps, once
    they are positive and no other's gradient is above its tolerance. Where that one solve over ``P``
    meets those conditions it is nnls_gram's answer, in the same arithmetic; else nnls_gram itself."""
    n = len(c)
    if len(P):
        x = np.zeros(n)
        try:
            x[P] = np.linalg.solve(G[np.ix_(P, P)], c[P])
        except np.linalg.LinAlgError:
            return nnls_gram(G, c)
        if (x[P] > 0).all():
            w = c - G @ x
            free = np.ones(n, dtype=bool)
            free[P] = False
            if not (w[free] > _nnls_tol(c)).any():
                return x
    return nnls_gram(G, c)


@dataclass(frozen=True)
class Selection:
    """The winning family, its coefficients over :data:`BASIS`, and how it was chosen.

    ``cv_error``: held-out RMS error of the readings relative to their RMS (0 is perfect);
    ``cv_r2``: held-out coefficient of determination; ``candidates``: family -> cv_error;
    ``why``: one line for the reader."""

    family: str
    coef: np.ndarray
    cv_error: float
    cv_r2: float
    r2: float
    rows: int
    candidates: dict[str, float]
    why: str
    boot: np.ndarray | None = None  # bootstrap coefficients of the chosen family (resamples x basis)
    fits: dict[str, np.ndarray] | None = None  # every family's coefficients over the basis
    #: the families blended into ``coef`` and their weights (None: the chosen family alone)
    blend: dict[str, float] | None = None

    @property
    def family_error(self) -> float:
        """The chosen family's own held-out error: what that family fitted alone (through a lag) is
        held against; ``cv_error`` is the blend's where there is one."""
        return self.candidates.get(self.family, self.cv_error)


def _blocks(n: int, k: int) -> np.ndarray:
    return np.minimum((np.arange(n) * k) // max(n, 1), k - 1)


def select_family(A: np.ndarray, y: np.ndarray, *, folds: int = 10, families: dict[str, tuple[int, ...]] | None = None) -> Selection | None:
    """Fit every family on rows ``A`` (readings x basis, in time order) against ``y`` and pick one
    by blocked cross-validation. ``None`` when there are too few rows."""
    families = families or FAMILIES
    n, p = A.shape
    if n < 8 or not np.any(A):
        return None
    scale = np.sqrt(np.einsum("ij,ij->j", A, A))
    scale[scale == 0] = 1.0
    As = A / scale
    # The blocks hold equal numbers of the rows a basis term reaches: rows no term reaches (idle
    # readings) are the same nothing to every family, and counted in the blocks they would push
    # a run's busy readings into a fold or two (a run followed by an hour of idle readings: every
    # other fold trained on nothing). They stay in the sums, in their place in time.
    live = np.any(A != 0, axis=1)
    n_live = int(live.sum())
    k = int(min(folds, max(3, n_live // 6)))
    kb = int(min(_BOOT_BLOCKS, max(k, n_live // 4)))  # fine blocks: k folds of them, and the bootstrap's units
    blk = _blocks(n_live, kb)[np.maximum(np.cumsum(live) - 1, 0)] if n_live < n else _blocks(n, kb)
    Gf = np.zeros((kb, p, p))
    cf = np.zeros((kb, p))
    yf = np.zeros(kb)
    for b in range(kb):  # a few dozen small matrix products
        lo, hi = np.searchsorted(blk, b), np.searchsorted(blk, b, side="right")
        Ab, yb = As[lo:hi], y[lo:hi]
        Gf[b] = Ab.T @ Ab
        cf[b] = Ab.T @ yb
        yf[b] = yb @ yb
    fold = (np.arange(kb) * k) // kb
    Gb = np.stack([Gf[fold == f].sum(0) for f in range(k)])
    cb = np.stack([cf[fold == f].sum(0) for f in range(k)])
    yy = np.array([yf[fold == f].sum() for f in range(k)])
    G, c = Gb.sum(0), cb.sum(0)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ms = float(yy.sum())
    ridge = _RIDGE * n / max(n, 1)
    scores: dict[str, float] = {}
    fits: dict[str, np.ndarray] = {}
    fold_fits: dict[str, np.ndarray] = {}  # each family's fit without each fold (folds x basis)
    for name, family_cols in families.items():
        cols = np.array(family_cols)
        if n < 3 * len(cols):
            continue
        # the fit on every row first: the coefficients it keeps are each fold's first guess
        x_all = nnls_gram(G[np.ix_(cols, cols)] + ridge * np.eye(len(cols)), c[cols])
        keep = np.flatnonzero(x_all > 0)
        sse = 0.0
        held = np.zeros((k, p))
        for b in range(k):
            excl = [b] + ([b - 1] if b > 0 else []) + ([b + 1] if b + 1 < k else [])
            if k < 5:
                excl = [b]
            Gt = G - Gb[excl].sum(0)
            ct = c - cb[excl].sum(0)
            Gs = Gt[np.ix_(cols, cols)] + ridge * np.eye(len(cols))
            xb = _nnls_from(Gs, ct[cols], keep)
            xf = held[b]
            xf[cols] = xb
            sse += float(yy[b] - 2 * xf @ cb[b] + xf @ Gb[b] @ xf)
        fold_fits[name] = held
        scores[name] = math.sqrt(max(sse, 0.0) / ms) if ms > 0 else math.inf
        xf = np.zeros(p)
        xf[cols] = x_all
        fits[name] = xf
    if not scores:
        return None
    best = min(scores, key=scores.__getitem__)
    order = list(families)
    chosen = best
    for name in order:  # simplest first
        if name in scores and scores[name] <= scores[best] * _PARSIMONY:
            chosen = name
            break
    coef_s = fits[chosen]
    scores_chosen = scores[chosen]
    # Families the held-out readings do not tell apart (within 5 % of the best error) are
    # blended, each weighted by its held-out likelihood over the k blocks, (best / its error)^k:
    # where the readings cannot say which split of a window's energy is right, the average of
    # the splits they allow is the better guess. The blend's own held-out error is scored on the
    # same folds (each fold's blend of the families' fits without it) and reported as it is: it is
    # at most its members' weighted mean, and can be a little above the chosen family's (kept all
    # the same: held-out errors within 5 % decide nothing; requiring the blend to beat the chosen
    # family cost the independent simulator's part-time cell 5.8 -> 6.4 % p95).
    close = [f for f in scores if scores[f] <= scores[best] * _BLEND_WITHIN]
    blend = None
    if len(close) > 1 and ms > 0 and 0 < scores[best] < math.inf:
        wt = np.array([(scores[best] / scores[f]) ** k for f in close])
        wt /= wt.sum()
        coef_s = wt @ np.stack([fits[f] for f in close])
        held_b = np.tensordot(wt, np.stack([fold_fits[f] for f in close]), axes=1)
        sse_b = sum(float(yy[b] - 2 * held_b[b] @ cb[b] + held_b[b] @ Gb[b] @ held_b[b]) for b in range(k))
        scores_chosen = math.sqrt(max(sse_b, 0.0) / ms)
        blend = {f: float(w) for f, w in zip(close, wt)}
    sse_in = float(ms - 2 * coef_s @ c + coef_s @ G @ coef_s)
    r2 = 1.0 - sse_in / ss_tot if ss_tot > 0 else 0.0
    cv_sse = scores_chosen**2 * ms
    cv_r2 = 1.0 - cv_sse / ss_tot if ss_tot > 0 else 0.0
    # Block bootstrap of the chosen family: how far its coefficients move when the run's
    # stretches of time are resampled (the spread feeds each request's error band), about
    # the blend where there is one.
    chosen_cols = np.array(families[chosen])
    rng = np.random.default_rng(12345)
    wts = rng.multinomial(kb, np.full(kb, 1.0 / kb), size=_BOOT)
    boot = np.zeros((_BOOT, p))
    eye = ridge * np.eye(len(chosen_cols))
    keep = np.flatnonzero(fits[chosen][chosen_cols] > 0)  # each resample's first guess: the full fit's coefficients
    for i in range(_BOOT):
        Gs = np.tensordot(wts[i], Gf, axes=1)
        cs = wts[i] @ cf
        boot[i, chosen_cols] = _nnls_from(Gs[np.ix_(chosen_cols, chosen_cols)] + eye, cs[chosen_cols], keep)
    if blend is not None:
        boot += coef_s - fits[chosen]  # the chosen family's spread, about the blend
    if chosen == best:
        why = f"lowest held-out error of {len(scores)} families over {k} time blocks"
    else:
        why = f"simplest family within {(_PARSIMONY - 1) * 100:.0f} % of the best ({best}) held-out error over {k} time blocks"
    if blend is not None:
        why += (f"; blended with the {len(blend) - 1} other famil{'y' if len(blend) == 2 else 'ies'} within "
                f"{(_BLEND_WITHIN - 1) * 100:.0f} % of the best, by held-out likelihood")
    return Selection(chosen, coef_s / scale, scores_chosen, cv_r2, r2, n, dict(scores), why,
                     boot / scale, {f: v / scale for f, v in fits.items()}, blend)


def correlation_lag(r: np.ndarray, max_lag: int = 4096, level: float = 0.2) -> int:
    """First lag (in readings) at which the autocorrelation of ``r`` falls below ``level``."""
    n = len(r)
    if n < 16:
        return 0
    r = r - r.mean()
    if n > 200_000:
        r = r[:200_000]
        n = len(r)
    m = 1 << int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(r, m)
    ac = np.fft.irfft(f * np.conj(f), m)[: min(max_lag, n // 2) + 1]
    if ac[0] <= 0:
        return 0
    ac = ac / ac[0]
    below = np.flatnonzero(ac < level)
    return int(below[0]) if len(below) else len(ac)


def _runs(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a sorted array, each element's run of equal values as ``[first, last)`` indices."""
    starts, ends, lens = _run_bounds(w)
    return np.repeat(starts, lens), np.repeat(ends, lens)


def _run_bounds(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For a sorted array, its runs of equal values: ``[start, end)`` indices and lengths."""
    n = len(w)
    new = np.ones(n, dtype=bool)
    new[1:] = w[1:] != w[:-1]
    starts = np.flatnonzero(new)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1:] = n
    return starts, ends, ends - starts


_WINDOW_Z = 1.0  # a shorter reconciliation window must predict held-out readings better by this many standard errors


def select_window(t: np.ndarray, m: np.ndarray, p: np.ndarray, a: int, b: int, lengths_ns: np.ndarray,
                  overlap: int = 0) -> tuple[int, dict[int, float], np.ndarray | None]:
    """Choose a reconciliation window length by leave-out prediction of readings.

    ``t``: each reading's end time (ns, sorted); ``m``: its measured dynamic energy; ``p``: the
    model's prediction of it. For each length L in ``lengths_ns`` (and the whole period), each
    reading is predicted as ``p_i`` times ``(M - m_near) / (P - p_near)`` over its window,
    leaving out the readings within ``overlap`` positions of it (they share its information).
    The whole period (one scale) is the default; a shorter length, which fits a scale per
    window, is taken only where it predicts clearly better than the best so far: its squared
    errors less than the best's, reading by reading, by more than ``_WINDOW_Z`` standard errors
    of that difference (over contiguous blocks of readings, whose errors are correlated). On
    readings that each err by much (part-time power) the lengths score within a per cent of each
    other, and the shortest of them would scale every second by its few readings' noise.
    Returns the chosen length (ns; ``b - a`` for the whole period), ``{L: error}`` and the
    winner's held-out predictions of the readings (``None`` where no length gave a finite error).
    """
    n = len(t)
    total_m, total_p = float(m.sum()), float(p.sum())
    g = total_m / total_p if total_p > 0 else 1.0
    cm = np.concatenate(([0.0], np.cumsum(m)))
    cp = np.concatenate(([0.0], np.cumsum(p)))
    idx = np.arange(n)
    k = max(int(overlap), 0)
    scores: dict[int, float] = {}
    if k == 0:  # each reading leaves out itself only: the same differences for every length
        m_own, p_own = cm[1:] - cm[:-1], cp[1:] - cp[:-1]

    def predict(L: int) -> np.ndarray | None:
        w = (t - a) // L
        # per run of readings in one window, then repeated over its readings (the same numbers
        # as indexing the prefix sums at each reading's run bounds)
        r0, r1, rl = _run_bounds(w)
        Mw = np.repeat(cm[r1] - cm[r0], rl)
        Pw = np.repeat(cp[r1] - cp[r0], rl)
        if k == 0:
            Mo = Mw - m_own
            Po = Pw - p_own
            mostly = float(rl[rl >= 2].sum()) / n if n else math.nan  # the share of readings with others in their window
        else:
            first, last = np.repeat(r0, rl), np.repeat(r1, rl)
            lo = np.maximum(idx - k, first)
            hi = np.minimum(idx + k + 1, last)
            Mo = Mw - (cm[hi] - cm[lo])
            Po = Pw - (cp[hi] - cp[lo])
            others = (last - first) - (hi - lo)
            mostly = float(np.mean(others >= 1))
        if L < b - a and mostly < 0.9:
            return None  # most windows would hold no reading but the left-out ones: no honest estimate
        ok = Po > 1e-9 * max(abs(total_p), 1e-30)
        s = np.where(ok, Mo / np.where(ok, Po, 1.0), g)
        s = np.clip(s, 0.0, 10.0 * max(g, 1e-9))
        out: np.ndarray = s * p
        return out

    # Compared on the readings the model puts energy in: elsewhere every length predicts the
    # same nothing, and a run followed by an hour of idle readings would spread the few blocks
    # that tell the lengths apart over blocks of zeros (the longest length always kept).
    busy = np.flatnonzero(p > 0)
    if not len(busy):
        busy = np.arange(n)
    nu = len(busy)
    nb = int(min(_BOOT_BLOCKS, nu))
    cut = np.searchsorted(_blocks(nu, nb), np.arange(nb + 1)) if nu else np.zeros(1, dtype=np.int64)
    best_L, best_sq = b - a, None
    for L in [b - a] + sorted((int(x) for x in lengths_ns if 0 < int(x) < b - a), reverse=True):
        pred = predict(L)
        if pred is None:
            continue
        sq = (m[busy] - pred[busy]) ** 2
        err = float(np.sqrt(np.mean(sq)))
        scores[L] = err
        if not math.isfinite(err):
            continue
        if best_sq is None:
            best_L, best_sq = L, sq
            continue
        # paired with the best so far, reading by reading, over contiguous blocks of them
        # (neighbours' errors are correlated): better by more than its standard error
        dsum = np.add.reduceat(sq - best_sq, cut[:-1]) if nb > 1 else np.array([float((sq - best_sq).sum())])
        se = math.sqrt(nb * float(np.var(dsum, ddof=1))) if nb > 1 else math.inf
        if float(dsum.sum()) < -_WINDOW_Z * se:
            best_L, best_sq = L, sq
    if best_sq is None:
        return b - a, scores, None
    return best_L, scores, predict(best_L)


def group_errors(t: np.ndarray, m: np.ndarray, p: np.ndarray, a: int, L: int, sizes: Iterable[int],
                 overlap: int = 0) -> dict[int, float]:
    """Held-out relative error of groups of consecutive readings, by group size.

    For each size G (readings) every run of G readings is predicted from the model scaled by
    what the rest of its reconciliation window (length ``L`` ns) measured, leaving out the
    group and ``overlap`` readings either side. Returns ``{G: sigma}``: a robust standard
    deviation (the 90 % quantile of |relative error| / 1.645) over the groups that carry at
    least the median predicted energy. This is what a request spanning G readings can expect
    from the sensor, its noise and its aliasing included."""
    n = len(t)
    out: dict[int, float] = {}
    if n < 8:
        return out
    cm = np.concatenate(([0.0], np.cumsum(m)))
    cp = np.concatenate(([0.0], np.cumsum(p)))
    w = (t - a) // max(int(L), 1)
    first, last = _runs(w)
    total = max(float(p.sum()), 1e-30)
    g_all = float(m.sum()) / total
    per_window = max(1.0, float(L) / max(float(np.median(np.diff(t))), 1.0))
    for G in sizes:
        G = int(G)
        if G < 1 or G > n // 2 or (G > 1 and G > per_window / 2):
            continue  # a group as long as its window is measured, not predicted: see the caller
        i = np.arange(0, n - G + 1, max(1, G // 2))
        j = i + G
        mg, pg = cm[j] - cm[i], cp[j] - cp[i]
        f, l = first[i], last[j - 1]
        lo = np.maximum(i - overlap, f)
        hi = np.minimum(j + overlap, l)
        Mo = (cm[l] - cm[f]) - (cm[hi] - cm[lo]) + 0.0
        Po = (cp[l] - cp[f]) - (cp[hi] - cp[lo])
        ok = Po > 1e-9 * total
        scale = np.where(ok, Mo / np.where(ok, Po, 1.0), g_all)
        pred = scale * pg
        heavy = pg >= np.median(pg)
        heavy &= pred > 0
        if heavy.sum() < 5:
            continue
        rel = np.abs(mg[heavy] - pred[heavy]) / pred[heavy]
        out[G] = float(np.quantile(rel, 0.9) / 1.645)
    return out
