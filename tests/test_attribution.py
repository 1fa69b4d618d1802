"""The attribution engine: its conventions, conservation, and the batch-fit method."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattspan import DeviceTrace, Requests, SampleKind, Steps, attribute
from wattspan.attribution.energy import _Piecewise, counter_knots
from wattspan.attribution.fit import nnls, step_features

T0 = 10**12
MS = 10**6
S = 10**9


def flat_trace(watts: float, seconds: float = 10.0, dt_ms: int = 1, device: str = "gpu0") -> DeviceTrace:
    t = np.arange(T0, T0 + int(seconds * S) + 1, dt_ms * MS)
    return DeviceTrace(device, t, np.full(len(t), watts))


def reqs(*spans, device="gpu0", weights=None):
    rows = [
        {"id": f"r{i}", "start_ns": T0 + int(a * S), "end_ns": T0 + int(b * S), "gpu": device}
        | ({"weight": weights[i]} if weights else {})
        for i, (a, b) in enumerate(spans)
    ]
    return Requests.from_records(rows)


class TestTimeShare:
    def test_idle_is_shared_equally_and_gaps_are_unattributed(self):
        # 100 W flat, idle configured at 100 W: only idle energy.
        r = reqs((1, 3), (2, 4))
        res = attribute([flat_trace(100.0)], r, idle_w=100.0)
        # r0: 1 s alone + 1 s shared -> 100 + 50 J; r1 symmetric
        np.testing.assert_allclose(res.idle_j, [150.0, 150.0], rtol=1e-9)
        np.testing.assert_allclose(res.dynamic_j, [0.0, 0.0], atol=1e-9)
        d = res.devices["gpu0"]
        np.testing.assert_allclose(d.measured_j, 1000.0, rtol=1e-9)
        np.testing.assert_allclose(d.unattributed_j, 700.0, rtol=1e-9)  # 0-1 s and 4-10 s

    def test_dynamic_split_by_weight_idle_split_equally(self):
        r = reqs((0, 10), (0, 10), weights=[1.0, 3.0])
        res = attribute([flat_trace(200.0)], r, idle_w=50.0)
        np.testing.assert_allclose(res.dynamic_j, [375.0, 1125.0], rtol=1e-9)  # 150 W x 10 s by 1:3
        np.testing.assert_allclose(res.idle_j, [250.0, 250.0], rtol=1e-9)
        np.testing.assert_allclose(res.device_s, [5.0, 5.0], rtol=1e-9)
        assert set(res.method) == {"time-share"}

    def test_request_outside_trace_gets_partial_coverage(self):
        r = reqs((9, 12))
        res = attribute([flat_trace(100.0)], r, idle_w=100.0)
        np.testing.assert_allclose(res.coverage, [1 / 3], rtol=1e-6)
        np.testing.assert_allclose(res.energy_j, [100.0], rtol=1e-6)

    def test_request_on_unmetered_device_is_flagged(self):
        r = reqs((1, 2), device="gpu7")
        res = attribute([flat_trace(100.0)], r, idle_w=100.0)
        assert res.method[0] == "no-trace" and res.energy_j[0] == 0.0
        assert res.records()[0]["sensor"] == "none"

    def test_bad_idle_value_is_refused(self):
        with pytest.raises(ValueError, match="idle_w"):
            attribute([flat_trace(100.0)], reqs((1, 2)), idle_w=float("nan"))


class TestIdleBaseline:
    def test_estimated_from_idle_periods_and_tracks_drift(self):
        # idle drifts 80 -> 92 W over 120 s; a request at 50-60 s adds 200 W.
        t = np.arange(T0, T0 + 120 * S + 1, 10 * MS)
        idle = 80.0 + 12.0 * (t - T0) / (120 * S)
        p = idle.copy()
        busy = (t >= T0 + 50 * S) & (t < T0 + 60 * S)
        p[busy] += 200.0
        res = attribute([DeviceTrace("gpu0", t, p)], reqs((50, 60)))
        d = res.devices["gpu0"]
        assert d.idle_source == "idle-periods"
        true_idle = float(np.trapezoid(idle[busy], t[busy] * 1e-9))
        assert res.idle_j[0] == pytest.approx(true_idle, rel=0.02)
        assert res.dynamic_j[0] == pytest.approx(2000.0, rel=0.02)

    def test_falls_back_to_low_quantile_when_never_idle(self):
        res = attribute([flat_trace(150.0)], reqs((0, 10)))
        assert res.devices["gpu0"].idle_source == "low-quantile"
        assert res.devices["gpu0"].idle_w == pytest.approx(150.0)


class TestBatchFit:
    def _scenario(self, seed=0, n=120, seconds=12.0):
        """Steps of random composition; true dynamic energy linear in the features."""
        rng = np.random.default_rng(seed)
        start = np.sort(rng.uniform(0, seconds - 2, n))
        rows = [{"id": f"r{i}", "start_ns": T0 + int(start[i] * S), "end_ns": T0 + int((start[i] + rng.uniform(0.2, 2)) * S), "gpu": 0} for i in range(n)]
        r = Requests.from_records(rows)
        t, steps, truth = T0, [], np.zeros(n)
        grid = np.arange(T0, T0 + int(seconds * S) + MS, MS // 4)
        p = np.full(len(grid), 60.0)
        coef = np.array([40.0, 0.002, 0.05, 0.0])
        while t < T0 + int((seconds - 0.1) * S):
            d = int(rng.integers(5, 30)) * MS
            live = np.flatnonzero((r.start_ns <= t) & (r.end_ns > t))
            if len(live):
                toks = {f"r{i}": int(rng.choice([1, 1, 1, 32, 512])) for i in live}
                steps.append({"start_ns": t, "end_ns": t + d, "gpu": 0, "requests": toks})
            t += d + int(rng.integers(1, 3)) * MS
        s = Steps.from_records(steps, r)
        x = step_features(s, np.arange(len(s)))
        e = x @ coef
        for k, row in enumerate(steps):
            m = (grid >= row["start_ns"]) & (grid < row["end_ns"])
            p[m] += e[k] / ((row["end_ns"] - row["start_ns"]) * 1e-9)
            tot = sum(row["requests"].values())
            for rid, tok in row["requests"].items():
                truth[int(rid[1:])] += e[k] * tok / tot
        return r, s, grid, p, truth, coef

    def test_recovers_step_model_and_per_request_energy_with_fine_sensor(self):
        r, s, grid, p, truth, coef = self._scenario()
        res = attribute([DeviceTrace("gpu0", grid, p)], r, s, idle_w=60.0)
        m = res.devices["gpu0"].model
        np.testing.assert_allclose(m.coef[:3], coef[:3], rtol=0.05)
        err = np.abs(res.dynamic_j - truth) / truth
        assert np.quantile(err, 0.95) < 0.02
        assert set(res.method) == {"batch-fit"}

    def test_beats_time_share_with_a_coarse_energy_counter(self):
        r, s, grid, p, truth, _ = self._scenario(seed=1)
        e = np.concatenate(([0.0], np.cumsum((p[1:] + p[:-1]) / 2 * np.diff(grid) * 1e-9)))
        # counter refreshed every 50 ms, read every 10 ms, mJ resolution
        reads = np.arange(grid[0], grid[-1], 10 * MS)
        refresh = reads - (reads - grid[0]) % (50 * MS)
        counter = np.floor(np.interp(refresh, grid, e) * 1000) / 1000
        tr = DeviceTrace("gpu0", reads, energy_j=counter)
        fit = attribute([tr], r, s, idle_w=60.0)
        naive = attribute([tr], r, None, idle_w=60.0)
        err_fit = np.quantile(np.abs(fit.dynamic_j - truth) / truth, 0.95)
        err_naive = np.quantile(np.abs(naive.dynamic_j - truth) / truth, 0.95)
        assert err_fit < 0.10
        assert err_fit < err_naive / 3

    def test_step_naming_request_of_other_device_is_unattributed_not_lost(self):
        r = Requests.from_records([{"id": "a", "start_ns": T0, "end_ns": T0 + 5 * S, "gpu": 1}])
        s = Steps.from_records([{"start_ns": T0 + S, "end_ns": T0 + 2 * S, "gpu": 0, "requests": {"a": 3}}], r)
        res = attribute([flat_trace(100.0)], r, s, idle_w=50.0)
        d = res.devices["gpu0"]
        assert d.attributed_j == 0.0 and d.unattributed_j == pytest.approx(d.measured_j)

    def test_features_count_prefill_decode_and_context(self):
        r = reqs((0, 10), (0, 10))
        s = Steps.from_records(
            [
                {"start_ns": T0, "end_ns": T0 + 10 * MS, "gpu": 0, "requests": {"r0": 100}},
                {"start_ns": T0 + 20 * MS, "end_ns": T0 + 30 * MS, "gpu": 0, "requests": {"r0": 1, "r1": 50}},
                {"start_ns": T0 + 40 * MS, "end_ns": T0 + 50 * MS, "gpu": 0, "requests": {"r0": 1, "r1": 1}},
            ],
            r,
        )
        x = step_features(s, np.arange(3))
        np.testing.assert_allclose(x[:, 0], [0.01, 0.01, 0.01])
        np.testing.assert_allclose(x[:, 1], [100, 50, 0])
        np.testing.assert_allclose(x[:, 2], [0, 1, 2])
        # decode context: r0 has 100 before step 1 -> 101; step 2: r0 102, r1 51
        np.testing.assert_allclose(x[:, 3], [0, 0.101, 0.153])


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 25))
    spans = []
    for _ in range(n):
        a = draw(st.integers(-2 * S, 12 * S))
        spans.append((a, a + draw(st.integers(0, 6 * S))))
    kind = draw(st.sampled_from(["instant", "average", "energy"]))
    seed = draw(st.integers(0, 2**16))
    with_steps = draw(st.booleans())
    idle = draw(st.one_of(st.none(), st.floats(0, 300)))
    return spans, kind, seed, with_steps, idle


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_requests_plus_unattributed_equal_measured(sc):
    """Conservation, whatever the sensor, the spans, the steps and the baseline."""
    spans, kind, seed, with_steps, idle = sc
    rng = np.random.default_rng(seed)
    t = T0 + np.cumsum(rng.integers(1 * MS, 120 * MS, 200))
    p = rng.uniform(20, 700, len(t))
    if kind == "energy":
        tr = DeviceTrace("gpu0", t, energy_j=np.cumsum(p * 0.05))
    elif kind == "average":
        tr = DeviceTrace("gpu0", t, p, power_kind=SampleKind.AVERAGE, window_ns=S)
    else:
        tr = DeviceTrace("gpu0", t, p)
    rows = [{"id": str(i), "start_ns": T0 + a, "end_ns": T0 + b, "gpu": 0} for i, (a, b) in enumerate(spans)]
    r = Requests.from_records(rows)
    s = None
    if with_steps:
        srows = []
        for i, (a, b) in enumerate(spans):
            if b > a:
                mid = T0 + (a + b) // 2
                srows.append({"start_ns": mid, "end_ns": mid + int(rng.integers(1, 40)) * MS, "gpu": 0, "requests": {str(i): int(rng.integers(0, 300))}})
        s = Steps.from_records(srows, r) if srows else None
    res = attribute([tr], r, s, idle_w=idle)
    d = res.devices["gpu0"]
    total = res.energy_j.sum() + d.unattributed_j
    assert total == pytest.approx(d.measured_j, rel=1e-9, abs=1e-6)
    assert np.all(np.isfinite(res.energy_j))
    np.testing.assert_allclose(res.energy_j, res.dynamic_j + res.idle_j)
    assert np.all(res.idle_j >= -1e-9)
    assert np.all(res.dynamic_j >= 0.0)
    # every request has a finite band around its estimate
    assert np.all(np.isfinite(res.energy_j_low)) and np.all(np.isfinite(res.energy_j_high))
    assert np.all(res.energy_j_low <= res.energy_j + 1e-9) and np.all(res.energy_j <= res.energy_j_high + 1e-9)


class TestPieces:
    def test_piecewise_integral_is_exact_for_linear(self):
        f = _Piecewise(np.array([0, 10 * S]), np.array([0.0, 10.0]))  # v = t (s)
        np.testing.assert_allclose(f.integral(np.array([2 * S]), np.array([4 * S])), [6.0])
        np.testing.assert_allclose(f.integral(np.array([10 * S]), np.array([12 * S])), [20.0])  # held beyond

    def test_counter_knots_place_refresh_between_reads(self):
        t = np.arange(0, 200, 10, dtype=np.int64) * MS
        e = np.floor(t / (50 * MS)).astype(float)  # refresh every 50 ms, read every 10 ms
        tk, ek = counter_knots(t, e)
        np.testing.assert_array_equal(ek, [0, 1, 2, 3, 3])
        np.testing.assert_array_equal(tk[1:4], [45 * MS, 95 * MS, 145 * MS])

    def test_nnls_matches_unconstrained_when_positive_and_clips_otherwise(self):
        rng = np.random.default_rng(3)
        A = rng.uniform(0, 1, (200, 3))
        x = np.array([2.0, 0.5, 1.0])
        np.testing.assert_allclose(nnls(A, A @ x), x, rtol=1e-8)
        b = A @ np.array([2.0, -1.0, 1.0])
        sol = nnls(A, b)
        assert np.all(sol >= 0) and sol[1] == 0.0


class TestTraceEdges:
    """An averaged reading covers [t - window, t]: the trace starts a window before its first read."""

    def _avg_trace(self, window_s=1.0):
        t = np.arange(T0 + int(window_s * S), T0 + 10 * S + 1, int(window_s * S))
        return DeviceTrace("gpu0", t, np.full(len(t), 200.0), power_kind=SampleKind.AVERAGE, window_ns=int(window_s * S))

    def test_request_inside_the_first_window_is_covered(self):
        tr = self._avg_trace()
        r = reqs((0.2, 0.8), (0.5, 3.0))  # both start before the first read at +1 s
        res = attribute([tr], r, idle_w=50.0)
        np.testing.assert_allclose(res.coverage, [1.0, 1.0])
        # 0.2..0.5 alone, 0.5..0.8 shared, 0.8..3.0 alone: 200 W throughout
        np.testing.assert_allclose(res.energy_j, [200 * (0.3 + 0.15), 200 * (0.15 + 2.2)], rtol=1e-6)
        d = res.devices["gpu0"]
        assert d.t0_ns == T0 and d.measured_j == pytest.approx(2000.0)
        assert res.energy_j.sum() + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-12)

    def test_request_before_the_first_window_is_not(self):
        tr = self._avg_trace()
        r = Requests.from_records([{"id": "x", "start_ns": T0 - 2 * S, "end_ns": T0 - S, "gpu": 0}])
        res = attribute([tr], r, idle_w=50.0)
        assert res.coverage[0] == 0.0 and res.energy_j[0] == 0.0

    def test_instant_traces_still_start_at_their_first_read(self):
        r = reqs((-1, 1))
        res = attribute([flat_trace(100.0)], r, idle_w=100.0)
        np.testing.assert_allclose(res.coverage, [0.5])


def test_fast_paths_give_the_same_numbers():
    """The speed paths (one look-up per edge, the object columns by repeat) return exactly
    what the plain numpy calls do (the batch fit's: tests/test_fit_fast_paths.py)."""
    from wattspan.attribution.attribute import _obj_full
    from wattspan.attribution.energy import _CumEnergy
    from wattspan.attribution.fit import _prefix

    rng = np.random.default_rng(3)
    hay = np.unique(rng.integers(0, 10**9, 20_000))
    pw = _Piecewise(np.array([0, 5 * 10**8, 10**9]), np.array([50.0, 80.0, 60.0]))
    edges = np.sort(rng.integers(-10**8, 11 * 10**8, 5_000))
    np.testing.assert_array_equal(pw.over(edges), pw.integral(edges[:-1], edges[1:]))
    cum = _CumEnergy(hay, np.cumsum(rng.random(len(hay))), "power")
    np.testing.assert_array_equal(cum.over(edges), cum.energy(edges[:-1], edges[1:]))
    a = rng.random((1000, 9))
    np.testing.assert_allclose(_prefix(a), np.vstack((np.zeros((1, 9)), np.cumsum(a, axis=0))), rtol=1e-12)
    m = _obj_full(4, "x")
    assert m.dtype == object and list(m) == ["x"] * 4
    m[0] = "y"
    assert list(m) == ["y", "x", "x", "x"]


@pytest.mark.parametrize("spacing_ms", [10, 100])
def test_instant_power_read_every_few_ms_is_integrated_to_the_last_read(spacing_ms):
    # readings more than 5 ms apart each stand for the interval before them: the curve must still run to the
    # last read (a constant 300 W over 0..1 s lost the last half-interval: 285 J, and the last request 0 J)
    t = np.arange(T0, T0 + S + 1, spacing_ms * MS, dtype=np.int64)
    trace = DeviceTrace("gpu0", t, np.full(len(t), 300.0))
    res = attribute([trace], reqs((0, 1), (0.95, 1)), idle_w=0.0)
    assert res.measured_j == pytest.approx(300.0, rel=1e-6)
    assert res.energy_j.sum() + res.unattributed_j == pytest.approx(300.0, rel=1e-6)
    assert res.energy_j[1] == pytest.approx(7.5, rel=0.02)  # 50 ms of 300 W, shared with r0
