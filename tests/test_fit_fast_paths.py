"""The batch fit's fast paths against the plain code they replaced (same numbers, not just close)."""

from __future__ import annotations

import numpy as np
import pytest

from wattspan.attribution.fit import _Beside, _Segments, _StepFeatures, _waits


def _waits_plain(seg, st_ns, en_ns):
    """The device's waits as first written: np.unique of the edges and two searchsorted."""
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
    d = np.diff(np.concatenate(([0], flag.astype(np.int8), [0])))
    return e[np.flatnonzero(d == 1)], e[np.flatnonzero(d == -1)]


def _case(seed: int, n_req: int, n_steps: int, grid: int):
    """Requests and steps on a coarse time grid (so edges, step bounds and the period's ends
    coincide often), steps overlapping, touching and reaching outside the period."""
    rng = np.random.default_rng(seed)
    a, b = 1_000, 1_000 + 200 * grid
    start = np.sort(rng.integers(a - 5 * grid, b, n_req) // grid * grid)
    end = start + rng.integers(0, 30, n_req) * grid
    seg = _Segments(np.clip(start, a, b), np.clip(end, a, b), np.ones(n_req), a, b)
    st = rng.integers(a - 10 * grid, b + 10 * grid, n_steps) // grid * grid
    en = st + rng.integers(1, 6, n_steps) * grid
    return seg, st.astype(np.int64), en.astype(np.int64)


def test_waits_are_those_of_the_plain_version():
    with_waits = 0
    for seed in range(18):
        seg, st, en = _case(seed, n_req=[3, 40, 400][seed % 3], n_steps=[1, 25, 300][(seed // 3) % 3], grid=[1, 7][seed % 2])
        got, want = _waits(seg, st, en), _waits_plain(seg, st, en)
        with_waits += len(want[0]) > 0
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    assert with_waits >= 9  # the cases compare waits, not only empty results


@pytest.mark.parametrize("seed", range(4))
def test_masses_side_by_side_equal_the_stacked_rows(seed):
    rng = np.random.default_rng(seed)
    n, m = 300, 120
    st = np.sort(rng.random(n) * 10)
    en = st + rng.random(n) * 0.2
    wst = np.sort(rng.random(m) * 10)
    wen = wst + rng.random(m) * 0.05
    x = rng.random((n, 5))
    xw = np.column_stack((wen - wst, np.ones(m)))
    stacked = _StepFeatures(np.vstack((np.hstack((x, np.zeros((n, 2)))), np.hstack((np.zeros((m, 5)), xw)))),
                            np.concatenate((st, wst)), np.concatenate((en, wen)))
    beside = _Beside(_StepFeatures(x, st, en), _StepFeatures(xw, wst, wen))
    t = np.sort(rng.random(500) * 11 - 0.5)
    assert beside.x.shape[1] == stacked.x.shape[1]
    np.testing.assert_array_equal(beside.mass(t), stacked.mass(t))
    np.testing.assert_array_equal(beside.density(t), stacked.density(t))


@pytest.mark.parametrize("seed", range(6))
def test_segments_index_their_edges_as_searchsorted_does(seed):
    rng = np.random.default_rng(seed)
    n = [1, 7, 500][seed % 3]
    a, b = 10**12, 10**12 + 10**6
    start = rng.integers(a, b, n) // 1000 * 1000  # ties between starts, ends and the period's ends
    end = np.minimum(start + rng.integers(0, 50, n) * 1000, b)
    if seed >= 3:
        start, end = np.sort(start), end[np.argsort(start, kind="stable")]  # the usual order
    seg = _Segments(start, end, np.ones(n), a, b)
    edges = np.unique(np.concatenate(([a, b], start, end)))
    np.testing.assert_array_equal(seg.edges, edges)
    np.testing.assert_array_equal(seg.si, np.searchsorted(edges, start))
    np.testing.assert_array_equal(seg.ei, np.searchsorted(edges, end))


@pytest.mark.parametrize("seed", range(6))
def test_order_is_the_stable_argsort(seed):
    from wattspan.attribution.fit import _order

    rng = np.random.default_rng(seed)
    n = [2, 17, 5000][seed % 3]
    q = rng.integers(0, [3, 1000, 2**40][seed // 2], n)  # many ties, few, none
    if seed == 5:
        q = q.astype(np.int64) - 2**41  # negative values, a wide span
    got = _order(q)
    assert got is not None
    np.testing.assert_array_equal(got, np.argsort(q, kind="stable"))
    assert _order(np.sort(q)) is None
    wide = np.array([0, 2**62, -(2**62), 5, 5], dtype=np.int64)  # keys that would not fit: the argsort
    np.testing.assert_array_equal(_order(wide), np.argsort(wide, kind="stable"))


@pytest.mark.parametrize("seed", range(6))
def test_tiled_steps_find_their_ends_as_searchsorted_does(seed):
    rng = np.random.default_rng(seed)
    n = [1, 40, 3000][seed % 3]
    gap = rng.integers(0, 3, n) * (seed % 2)  # back to back (seed even) or with gaps
    dur = rng.integers(1, 4, n)
    st = np.cumsum(np.concatenate(([0], (dur + gap)[:-1]))).astype(np.float64)
    en = st + dur
    x = rng.random((n, 3))
    tiled = _StepFeatures(x, st, en)
    assert tiled._tiled
    plain = _StepFeatures(x, st, en, tiled=False)  # the general prefix sums and binary searches
    assert not plain._tiled
    t = np.sort(np.concatenate((st, en, rng.random(500) * (en[-1] + 4) - 2)))  # on the bounds and between
    # the same masses and rates (the general path's differences of prefix sums round off more)
    scale = float(np.abs(x).sum())
    np.testing.assert_allclose(tiled.mass(t), plain.mass(t), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(tiled.density(t), plain.density(t), rtol=1e-12, atol=1e-12 * scale)
    on_bounds = np.concatenate((st, en))  # at a step's start or end: its share is exactly 0 or 1
    np.testing.assert_array_equal(tiled.mass(on_bounds), np.vstack((np.zeros((1, 3)), np.cumsum(x, axis=0)))[
        np.concatenate((np.arange(n), np.arange(1, n + 1)))])
    overlapping = _StepFeatures(x, st, en + 1.5)
    assert n < 2 or not overlapping._tiled


def _features_lexsort(steps, s_idx):
    """step_features' context as first written: a lexsort by request, then step start."""
    from wattspan.attribution.fit import _NS

    ns, st, tok = len(steps), steps.entry_step, steps.entry_tokens
    order = np.lexsort((steps.start_ns[st], steps.entry_request))
    tok_o, req_o = tok[order], steps.entry_request[order]
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
    return np.column_stack((dur, prefill_tok, decode_tok, decode_ctx))[s_idx]


@pytest.mark.parametrize("seed", range(4))
def test_step_features_match_the_lexsort_version(seed):
    from wattspan.attribution.fit import step_features
    from wattspan.attribution.inputs import Steps

    rng = np.random.default_rng(seed)
    ns, n_req = 300, 120
    start = np.sort(rng.integers(0, 10**9, ns))
    if seed % 2:
        start = rng.permutation(start)  # steps out of time order: the lexsort path
    e_step = np.repeat(np.arange(ns), 3)
    e_req = rng.integers(0, n_req, len(e_step))
    tok = np.where(rng.random(len(e_step)) < 0.2, rng.integers(2, 300, len(e_step)), 1).astype(np.float64)
    steps = Steps(start, start + rng.integers(1, 10**6, ns), np.full(ns, "gpu0", dtype=object), e_step, e_req, tok)
    s_idx = np.arange(ns)
    np.testing.assert_array_equal(step_features(steps, s_idx), _features_lexsort(steps, s_idx))


@pytest.mark.parametrize("v", [0.0, 90.0, 123.456789])
def test_constant_curve_reads_as_the_interpolation_does(v):
    from wattspan.attribution.energy import _Piecewise

    rng = np.random.default_rng(3)
    a, b = 10**12, 10**12 + 3600 * 10**9
    x = np.sort(rng.integers(a - 10**9, b + 10**9, 5000))  # inside, on the knots and beyond them
    x[:3] = (a, b, a - 1)
    const = _Piecewise(np.array([a, b], dtype=np.int64), np.array([v, v]))
    assert const._const
    plain = _Piecewise(np.array([a, b], dtype=np.int64), np.array([v, v]))
    plain._const = False
    np.testing.assert_array_equal(const(x), plain(x))
    np.testing.assert_array_equal(const.cumulative(x), plain.cumulative(x))
    np.testing.assert_array_equal(const.over(x), plain.over(x))
    assert not _Piecewise(np.array([a, b], dtype=np.int64), np.array([v, v + 1]))._const


@pytest.mark.parametrize("seed", range(4))
def test_unit_weights_count_as_the_weighted_sums_do(seed):
    rng = np.random.default_rng(seed)
    n = [5, 300, 4000, 50][seed]
    a, b = 0, 10**6
    start = np.sort(rng.integers(a, b, n)) // 100 * 100
    end = np.minimum(start + rng.integers(0 if seed == 3 else 1, 300, n) * 100, b)  # seed 3: empty lifetimes too
    seg = _Segments(start, end, np.ones(n), a, b)
    m = len(seg.edges) - 1
    live = seg.ei > seg.si
    wd = np.bincount(seg.si[live], weights=np.ones(n)[live], minlength=m + 1)[: m + 1] - np.bincount(
        seg.ei[live], weights=np.ones(n)[live], minlength=m + 1)[: m + 1]
    want = np.cumsum(wd)[:m]
    want[np.abs(want) < 1e-12] = 0.0
    np.testing.assert_array_equal(seg.w, want)
    assert np.signbit(seg.w).sum() == np.signbit(want).sum() == 0
