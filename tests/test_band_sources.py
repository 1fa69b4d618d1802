"""Estimators behind batch-fit's point estimate and its 90 % band: part-time readings weighted by
their expected error, a counter fitted together with the part-time power beside it, the fitted
idle intercept's own uncertainty, and the fitted electrical lag's own uncertainty."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan.attribution import fit as fitmod
from wattspan.attribution.fit import _intercept_rel_sd, _part_time_weights, _StepFeatures
from wattspan.simulate import LAWS, sense, simulate_server


def test_part_time_readings_across_a_power_step_weigh_less_than_steady_ones():
    # steps of alternating power; readings of 0.1 s: each either inside one steady stretch or
    # across a change of level (a prefill next to decoding), whose slice-placement error is larger
    rng = np.random.default_rng(0)
    n_steps = 400
    st = np.arange(n_steps) * 0.05
    en = st + 0.05
    level = np.where((np.arange(n_steps) // 4) % 2 == 0, 100.0, 400.0)  # 0.2 s at 100 W, 0.2 s at 400 W
    x = np.column_stack((level * 0.05,))  # one term: the step's energy (J)
    feats = _StepFeatures(x, st, en)
    t_end = np.arange(1, 200) * 0.1 + 0.05  # reading ends, offset: some readings straddle a change
    span = 0.1
    A = (feats.mass(t_end) - feats.mass(t_end - span)) / span  # mean power over each reading (W per unit coef)
    inside = np.abs(A[:, 0] - np.round(A[:, 0] / 100.0) * 100.0) < 1e-6
    inside &= (np.abs(A[:, 0] - 100.0) < 1e-6) | (np.abs(A[:, 0] - 400.0) < 1e-6)
    assert inside.any() and (~inside).any()
    coef = np.array([1.0])
    sd = np.where(inside, 2.0, 60.0)  # a straddling reading errs by much more
    y = A @ coef + sd * rng.standard_normal(len(A))
    rel = lambda t: np.asarray(t, dtype=np.float64) * 1e-9  # noqa: E731  (times given in ns below)
    w = _part_time_weights(A, y, coef, x, feats, rel, (t_end * 1e9).astype(np.int64), np.full(len(A), span * 1e9))
    assert w is not None
    assert np.median(w[inside]) > 2.0 * np.median(w[~inside])


def test_idle_intercept_uncertainty_grows_when_the_device_never_idles():
    rng = np.random.default_rng(1)
    n = 200
    # with idle readings (rows with no step energy) the intercept is pinned; without them it
    # is told apart from the steps' watts only by how their mix varies
    dur_idle = np.where(np.arange(n) % 3 == 0, 0.0, 1.0)
    dur_busy = 0.9 + 0.1 * rng.random(n)
    out = []
    for dur in (dur_idle, dur_busy):
        X = np.column_stack((np.ones(n), dur, dur * rng.random(n)))
        y = X @ np.array([90.0, 200.0, 50.0]) + 3.0 * rng.standard_normal(n)
        coef = fitmod.nnls(X, y)
        out.append(_intercept_rel_sd(X, y, coef))
    assert out[0] < 0.02 < out[1]


@pytest.fixture(scope="module")
def saturating_run():
    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=80.0, tau_s=0.008)
    run = simulate_server(seed=2, duration_s=30.0, rate_per_s=3.0, power_model=pm)
    req = Requests.from_records(run.requests)
    return run, req, Steps.from_records(run.steps, req), np.array([run.truth[i]["energy_j"] for i in req.ids])


def test_a_counter_is_fitted_together_with_the_part_time_power_beside_it(saturating_run, monkeypatch):
    run, req, steps, truth = saturating_run
    trace = sense(run, "counter-100ms", seed=102)
    both = attribute([trace], req, steps)
    with monkeypatch.context() as m:
        m.setattr(fitmod, "_with_power_rows", lambda sel, *a, **k: sel)
        alone = attribute([trace], req, steps)
    assert both.devices["gpu0"].model.rows > alone.devices["gpu0"].model.rows  # the power readings' rows too
    # pooled over a few runs (one run's p95 moves either way), the joint fit is closer to the truth
    errs: dict[str, list[np.ndarray]] = {"both": [], "alone": []}
    for seed in range(4):
        pm = dataclasses.replace(LAWS["saturating"], between_steps_w=(30.0, 0.0, 80.0)[seed % 3], tau_s=(0.004, 0.002, 0.008)[seed % 3])
        r = simulate_server(seed=seed, duration_s=30.0, bursty=seed % 3 == 1, rate_per_s=(8.0, 6.0, 3.0)[seed % 3], power_model=pm)
        rq = Requests.from_records(r.requests)
        sp = Steps.from_records(r.steps, rq)
        tr = sense(r, "counter-100ms", seed=100 + seed)
        tru = np.array([r.truth[i]["energy_j"] for i in rq.ids])
        errs["both"].append(np.abs(attribute([tr], rq, sp).energy_j - tru) / tru)
        with monkeypatch.context() as m:
            m.setattr(fitmod, "_with_power_rows", lambda sel, *a, **k: sel)
            errs["alone"].append(np.abs(attribute([tr], rq, sp).energy_j - tru) / tru)
    p95 = {k: float(np.quantile(np.concatenate(v), 0.95)) for k, v in errs.items()}
    assert p95["both"] < p95["alone"]


def test_the_fitted_lag_s_own_uncertainty_widens_the_band_of_fine_readings_only(saturating_run, monkeypatch):
    """1 ms readings choose a lag and deconvolve the windows through it; the lags as likely by held-out
    error move each request's share, and the band says so. Coarse readings choose none: nothing to add."""
    run, req, steps, truth = saturating_run
    widths = {}
    for sensor in ("ideal-1ms", "instant-100ms"):
        trace = sense(run, sensor, seed=102)
        with_lag = attribute([trace], req, steps)
        monkeypatch.setattr(fitmod, "_lag_interval", lambda *a, **k: None)  # the lag taken as exact
        without = attribute([trace], req, steps)
        monkeypatch.undo()
        ratio = (with_lag.energy_j_high - with_lag.energy_j_low) / (without.energy_j_high - without.energy_j_low)
        assert np.all(ratio >= 1.0 - 1e-9)  # it only adds
        widths[sensor] = float(np.mean(ratio > 1.001))  # the share of requests it widens
        assert np.array_equal(with_lag.energy_j, without.energy_j)  # the band only, not the estimate
    assert widths["ideal-1ms"] > 0.2
    assert widths["instant-100ms"] == 0.0


def test_a_given_lag_is_known_and_adds_nothing_to_the_band(saturating_run, monkeypatch):
    """The board's lag given (measured once elsewhere) is taken as known: no interval is searched."""
    run, req, steps, truth = saturating_run
    trace = sense(run, "ideal-1ms", seed=102)
    calls = []
    real = fitmod._lag_interval
    monkeypatch.setattr(fitmod, "_lag_interval", lambda *a, **k: calls.append(a) or real(*a, **k))
    attribute([trace], req, steps, board_lag_s=0.004)
    assert calls == []
    attribute([trace], req, steps)
    assert len(calls) == 1


def test_the_lag_interval_comes_from_the_held_out_errors_curvature():
    # a parabola in log2(lag) with its minimum at 4 ms: the interval widens as the curve flattens
    taus = [0.002, 0.003, 0.004, 0.005, 0.008]
    sharp = {t: 0.05 + 0.02 * np.log2(t / 0.004) ** 2 for t in taus}
    flat = {t: 0.05 + 0.002 * np.log2(t / 0.004) ** 2 for t in taus}
    lo_s, hi_s = fitmod._lag_interval(sharp, 0.004, 10_000)
    lo_f, hi_f = fitmod._lag_interval(flat, 0.004, 10_000)
    assert lo_f < lo_s < 0.004 < hi_s < hi_f
    assert hi_s / 0.004 == pytest.approx(0.004 / lo_s)
    # more readings tell lags apart more finely
    lo_n, hi_n = fitmod._lag_interval(sharp, 0.004, 1_000_000)
    assert lo_s < lo_n < hi_n < hi_s
    assert fitmod._lag_interval({0.004: 0.05, 0.008: 0.06}, 0.004, 10_000) is None  # too few lags near it
    assert fitmod._lag_interval({t: 0.05 - 0.001 * np.log2(t / 0.004) ** 2 for t in taus}, 0.004, 10_000) is None
