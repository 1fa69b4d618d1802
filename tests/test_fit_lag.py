"""The electrical lag in the batch fit: a step's power rises and decays over milliseconds, so part
of its energy is drawn in the next step or wait; on fine readings the fit finds the lag and splits
each stretch of time's energy as the conventions say (a step's own window to its requests)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan._sim_parallel import simulate_parallel
from wattspan.attribution.fit import _Beside, _StepFeatures, _with_lag
from wattspan.simulate import LAWS, sense


def _brute_force(feats, tau, t_end, dt):
    """The lagged rate and mass by stepping the filter on a fine grid (exact for a constant input)."""
    t = np.arange(int(t_end / dt)) * dt
    u = feats.density(t)
    a = np.exp(-dt / tau)
    y = np.zeros_like(u)
    for i in range(1, len(t)):
        y[i] = u[i - 1] + (y[i - 1] - u[i - 1]) * a
    # the mass: the integral of y, exact per grid cell for the first-order response
    cell = u[:-1] * dt + (y[:-1] - u[:-1]) * tau * (1 - a)
    return t, y, np.vstack((np.zeros((1, u.shape[1])), np.cumsum(cell, axis=0)))


@pytest.mark.parametrize("seed", range(3))
def test_lagged_mass_is_the_first_order_response_of_the_steps(seed):
    rng = np.random.default_rng(seed)
    n = 40
    dt = 2e-6  # the edges on the brute force's grid, so it is exact too
    d = rng.integers(500, 10_000, n)
    gap = rng.integers(0, 5_000, n) * (rng.random(n) < 0.7)  # back-to-back steps and gaps
    k = np.cumsum(np.concatenate(([1_000], (d + gap)[:-1])))
    st, en = k * dt, (k + d) * dt
    x = rng.uniform(0.0, 5.0, (n, 3))
    feats = _StepFeatures(x, st, en)
    tau = [0.001, 0.004, 0.0003][seed]
    lagged = _with_lag(feats, tau)
    t, y, mass = _brute_force(feats, tau, float(en[-1]) + 0.03, dt)
    pick = rng.integers(0, len(t), 60)
    np.testing.assert_allclose(lagged.density(t[pick]), y[pick], rtol=1e-6, atol=1e-6 * float(np.abs(y).max()))
    np.testing.assert_allclose(lagged.mass(t[pick]), mass[pick], rtol=1e-6, atol=1e-6 * float(mass[-1].max()))
    # the lag moves energy later, it does not make or lose any once the tail has decayed
    np.testing.assert_allclose(lagged.mass(np.array([en[-1] + 60 * tau]))[0], x.sum(axis=0), rtol=1e-9)
    assert np.all(lagged.mass(en[:1])[0] < feats.mass(en[:1])[0] + 1e-12)


def test_a_long_quiet_gap_and_the_waits_columns_go_through_the_lag_too():
    """Edges thousands of lags apart (the closed form restarts, nothing overflows), and the waits'
    terms beside the steps' are lagged with them."""
    st = np.array([0.0, 0.01, 50.0])
    en = np.array([0.01, 0.02, 50.01])
    steps = _StepFeatures(np.array([[1.0], [2.0], [3.0]]), st, en)
    waits = _StepFeatures(np.array([[0.5], [0.5]]), np.array([0.02, 50.01]), np.array([0.03, 50.02]))
    lagged = _with_lag(_Beside(steps, waits), 0.001)
    t = np.array([0.005, 0.025, 10.0, 50.005, 50.5])
    m = lagged.mass(t)
    assert np.all(np.isfinite(m)) and m.shape == (5, 2)
    np.testing.assert_allclose(m[2], [3.0, 0.5], rtol=1e-9)  # everything before the gap drawn by t = 10 s
    np.testing.assert_allclose(m[4], [6.0, 1.0], rtol=1e-9)
    assert 0.0 < m[3, 0] - 3.0 < 1.5  # the third step part-way, behind its unlagged mass
    assert m[3, 0] - 3.0 < steps.mass(t[3:4])[0, 0] - 3.0


def _overlapped(tau_s, seed=0, duration_s=12):
    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=30.0, tau_s=tau_s)
    return simulate_parallel(tp=1, pp=2, seed=seed, duration_s=duration_s, rate_per_s=8.0, power_model=pm,
                             overlap=True, stage_weights=(0.45, 0.55))


def _attribute(run, sensor, **kw):
    req = Requests.from_records(run.requests)
    traces = {g: sense(r, sensor, seed=11 + k) for k, (g, r) in enumerate(run.runs.items())}
    res = attribute(traces, req, Steps.from_records(run.steps, req), **kw)
    truth = np.array([run.truth[i]["energy_j"] for i in req.ids])
    return res, np.abs(res.energy_j - truth) / truth


def test_fine_readings_find_the_lag_of_an_overlapped_pipeline(monkeypatch):
    from wattspan.attribution import fit

    """Consecutive slices on a stage belong to different micro-batches: 1 ms readings show each slice's
    tail drawn in the next one's window, and the windows deconvolved through the lag found give it
    back to its own slice (p95 about 1 %)."""
    run = _overlapped(0.006)  # off the lags' grid (0.25 ms x 2^k)
    res, err = _attribute(run, "ideal-1ms")
    for g, d in res.devices.items():
        assert d.model.lag_tau_s == pytest.approx(0.006, rel=0.15), (g, d.model.lag_tau_s, d.model.why)
        assert "electrical lag" in d.model.why and d.model.as_dict()["lag_tau_s"] == d.model.lag_tau_s
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
    assert np.quantile(err, 0.95) < 0.015
    monkeypatch.setattr(fit, "_LAGS_S", fit._LAGS_S[-1:])  # no lag but the longest, which is never kept
    _, blind = _attribute(run, "ideal-1ms")
    assert np.quantile(err, 0.95) < 0.5 * np.quantile(blind, 0.95)


def test_coarse_readings_keep_no_lag_and_a_given_model_brings_its_own():
    """This 100 ms counter (jittered refreshes, part-time power beside it) shows no lag of milliseconds
    on a pipeline stage (tried, one of 32 ms stood in for the counter's staleness): it fits none; a model fitted on 1 ms readings of the same board carries
    its lag to them, and its split of each stretch of time follows the lag."""
    run = _overlapped(0.004, seed=1)
    own, err_own = _attribute(run, "counter-100ms")
    assert all(d.model.lag_tau_s == 0.0 for d in own.devices.values())
    fine, _ = _attribute(run, "ideal-1ms")
    models = {g: d.model for g, d in fine.devices.items()}
    assert all(m.lag_tau_s > 0 for m in models.values())
    given, err_given = _attribute(run, "counter-100ms", models=models)
    for d in given.devices.values():
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
    assert np.quantile(err_given, 0.95) < 0.8 * np.quantile(err_own, 0.95)


@pytest.mark.parametrize("tau_s", [0.0, 0.006])
def test_a_coarse_counter_finds_the_lag_through_where_each_step_s_tail_falls(tau_s, monkeypatch):
    """Readings 100 ms apart cannot place a lag of milliseconds in time, but a whole-window reading
    (a counter's delta) still sees where each step's tail falls: in the next step or the wait after
    it, which changes how the window's energy follows its steps. So the search runs on them too: it
    finds the lag there is and none where there is none. A step's tail is its own whichever window
    it is drawn in (the conventions), so on such long windows the split through it is about the
    split without it."""
    from wattspan.attribution import fit
    from wattspan.simulate import SensorSpec, simulate_server

    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=0.0, tau_s=max(tau_s, 1e-6))
    run = simulate_server(seed=4, duration_s=30, power_model=pm, rate_per_s=5.0)
    req = Requests.from_records(run.requests)
    steps = Steps.from_records(run.steps, req)
    truth = np.array([run.truth[i]["energy_j"] for i in req.ids])
    spec = SensorSpec("counter-only-100ms", 100_000_000, power="none", energy=True, energy_refresh_ns=100_000_000,
                      energy_refresh_jitter_ns=0)
    trace = sense(run, spec, seed=7)
    res = attribute([trace], req, steps)
    d = next(iter(res.devices.values()))
    p95 = np.quantile(np.abs(res.energy_j - truth) / truth, 0.95)
    assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
    if tau_s == 0.0:
        assert d.model.lag_tau_s == 0.0, d.model.why
        return
    assert d.model.lag_tau_s == pytest.approx(tau_s, rel=0.2), d.model.why
    monkeypatch.setattr(fit, "_whole_windows", lambda *a: False)  # the search as it was: readings 50 ms apart or closer
    blind = attribute([trace], req, steps)
    assert next(iter(blind.devices.values())).model.lag_tau_s == 0.0
    assert p95 < 1.2 * np.quantile(np.abs(blind.energy_j - truth) / truth, 0.95) and p95 < 0.04


def test_a_lag_still_falling_at_the_longest_tried_is_left_to_the_sensor():
    """A reading that trails the load by 100 ms is a sensor's smoothing (the A5000's `power.draw`),
    not a board's electrical lag: it delays the readings, not the energy, so no lag is fitted."""
    from wattspan.simulate import simulate_server

    pm = dataclasses.replace(LAWS["saturating"], tau_s=0.1)
    run = simulate_server(seed=3, duration_s=10, power_model=pm)
    req = Requests.from_records(run.requests)
    res = attribute([sense(run, "ideal-1ms", seed=5)], req, Steps.from_records(run.steps, req))
    d = next(iter(res.devices.values()))
    assert d.model.lag_tau_s == 0.0 and "lag" not in d.model.why


@pytest.mark.parametrize("n", [2, 33, 5_000, 70_000])
def test_lag_states_in_blocks_are_the_recurrence_step_by_step(n):
    """The vectorised blocks (and blocks of blocks) give the recurrence's states, edges close and
    thousands of lags apart alike."""
    from wattspan.attribution.fit import _lag_states

    rng = np.random.default_rng(n)
    b = np.cumsum(rng.exponential(0.002, n) * np.where(rng.random(n) < 0.01, 1000.0, 1.0))
    u = rng.uniform(0.0, 3.0, (n, 2)) * (rng.random((n, 1)) < 0.8)
    tau = 0.003
    y = np.zeros_like(u)
    a = np.exp(-np.diff(b) / tau)
    for i in range(n - 1):
        y[i + 1] = u[i] + (y[i] - u[i]) * a[i]
    np.testing.assert_allclose(_lag_states(b, u, tau), y, rtol=1e-10, atol=1e-12)


def test_lagged_features_on_windows_match_the_whole_run_inside_them():
    """The lag choice's features (edges inside stretches and a margin before them, the chosen
    family's columns) read inside the stretches what the whole run's do, for every lag tried."""
    rng = np.random.default_rng(7)
    n = 6_000
    st = np.cumsum(rng.uniform(0.002, 0.02, n))
    en = st + rng.uniform(0.001, 0.01, n) * (rng.random(n) < 0.9)
    en = np.minimum(en, np.append(st[1:], st[-1] + 1))
    feats = _StepFeatures(rng.uniform(0.0, 4.0, (n, 4)), st, np.maximum(en, st + 1e-4))
    lo, hi = np.array([5.0, 30.0]), np.array([12.0, 33.0])
    cols = (3, 1)
    part = _with_lag(feats, 0.004, windows=(lo, hi), cols=cols)
    t = np.concatenate([rng.uniform(l + 1.0, h, 200) for l, h in zip(lo, hi)])
    for tau in (0.004, 0.0005, 0.03):
        whole, seen = _with_lag(feats, tau), part if tau == 0.004 else part.at(tau)
        np.testing.assert_allclose(seen.density(t), whole.density(t)[:, cols], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(seen.mass(t), whole.mass(t)[:, cols], rtol=1e-9, atol=1e-9)
        assert seen.x.shape[1] == len(cols)


@pytest.mark.parametrize("n", [9, 60, 3_000])
def test_the_lag_choice_scores_a_family_as_the_selection_does(n):
    """The lag's held-out score of the chosen family is select_family's (without its bootstrap),
    families with coefficients held at zero too."""
    from wattspan.attribution.family import BASIS, FAMILIES, select_family
    from wattspan.attribution.fit import _cv_error

    rng = np.random.default_rng(n)
    A = np.abs(rng.normal(size=(n, len(BASIS))))
    A[:, 3] = 0.0
    y = A @ np.array([1.0, 2.0, 0.0, 0.0, 0.5, 0.0, 0.0, 3.0, 0.2, 0.0, 0.7, 0.0, 0.0, 0.4]) + rng.normal(size=n)
    for name, cols in FAMILIES.items():
        s = select_family(A, y, families={name: cols})
        ref = s.cv_error if s is not None else np.inf
        assert _cv_error(A, y, cols) == pytest.approx(ref, rel=1e-12), name


@pytest.mark.parametrize("sensor", ["ideal-1ms", "average-20ms", "energy-counter"])
def test_the_lag_choice_stretches_read_what_every_reading_does(sensor, monkeypatch):
    """The stretches the lag is chosen on (their own slice of the trace or counter, the lagged
    features only around them) give the very rows every reading's fit has at those readings."""
    from wattspan.attribution import fit
    from wattspan.simulate import simulate_server

    got = []
    real = fit._choose_lag
    monkeypatch.setattr(fit, "_choose_lag", lambda *a: got.append(a) or real(*a))
    run = simulate_server(seed=2, duration_s=20, power_model=LAWS["saturating"])
    req = Requests.from_records(run.requests)
    attribute([sense(run, sensor, seed=3)], req, Steps.from_records(run.steps, req))
    cum, trace, base, idle, a, b, rel, sel, fams, t_row = got[0]
    monkeypatch.setattr(fit, "_LAG_ROWS", 400)
    parts = fit._lag_stretches(cum, trace, t_row, a)
    assert parts is not None and len(parts) == 8
    cols = list(fams[sel.family])
    win = (rel(np.array([p[2] for p in parts]) - fit._LAG_MARGIN_NS), rel(np.array([p[3] for p in parts])))
    part = fit._with_lag(base, 0.004, windows=win, cols=cols)
    full = fit._fit_rows(cum, trace, fit._with_lag(base, 0.004), idle, a, b, rel, with_weights=True)
    n = 0
    for c, tr, lo, hi in parts:
        A, y, _, t = fit._fit_rows(c, tr, part, idle, lo, hi, rel, with_weights=True)[:4]
        i = np.searchsorted(full[3], t)
        assert len(t) >= 20 and np.array_equal(full[3][i], t)
        np.testing.assert_allclose(y, full[1][i], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(A, full[0][i][:, cols], rtol=1e-9, atol=1e-9 * np.abs(full[0]).max())
        n += len(t)
    assert n <= 400 + 8 * 2


def test_a_lag_from_rates_computed_once_is_the_same():
    from wattspan.attribution.fit import _lag_rates

    rng = np.random.default_rng(5)
    st = np.sort(rng.random(200) * 5)
    en = st + rng.random(200) * 0.01 + 1e-4
    feats = _StepFeatures(rng.random((200, 3)), st, en)
    rates = _lag_rates(feats, np.concatenate((st, en)))
    t = np.sort(rng.random(400) * 5.2)
    for tau in (0.00025, 0.004, 0.032):
        fresh, reused = _with_lag(feats, tau), _with_lag(feats, tau, rates)
        np.testing.assert_array_equal(reused.mass(t), fresh.mass(t))
        np.testing.assert_array_equal(reused.density(t), fresh.density(t))
