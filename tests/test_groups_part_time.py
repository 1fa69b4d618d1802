"""Part-time "instant" readings (a random 25 ms of each 100 ms) of a pipeline stage: the weights of the
readings model the power inside each interval as the stage's slices and its waits, not its slices alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan._sim_parallel import simulate_parallel
from wattspan.attribution import fit
from wattspan.simulate import LAWS, sense


def _alternating(n: int = 40, slice_s: float = 0.004) -> tuple[fit._StepFeatures, fit._StepFeatures]:
    """``n`` slices of ``slice_s``, each followed by a wait as long (a balanced pipeline stage)."""
    st = np.arange(n) * 2 * slice_s
    steps = fit._StepFeatures(np.ones((n, 1)), st, st + slice_s)
    waits = fit._StepFeatures(np.column_stack((np.full(n, slice_s), np.ones(n))), st + slice_s, st + 2 * slice_s)
    return steps, waits


def test_a_wait_holding_the_slices_power_leaves_nothing_to_vary():
    steps, waits = _alternating()
    e_mod = np.full(len(steps.st), 400.0 * 0.004)  # 400 W over each 4 ms slice
    lo, hi = np.array([0.0, 0.048]), np.array([0.096, 0.144])  # whole slice-and-wait cycles
    mean_alone, var_alone = fit._interval_power(steps, e_mod, lo, hi)
    # slices alone: 400 W half the time, nothing between (variance 400^2 / 4)
    assert np.allclose(mean_alone, 200.0, rtol=0.02)
    assert np.allclose(var_alone, 200.0**2, rtol=0.05)
    # the waits at 400 W (W while waiting, no J per wait): the power never changes
    mean_w, var_w = fit._interval_power(steps, e_mod, lo, hi, waits, np.array([400.0, 0.0]))
    assert np.allclose(mean_w, 400.0, rtol=0.02)
    assert np.all(var_w < 1e-6 * 400.0**2)
    # waits at 100 W: the spread is the slices' contrast over the waits' (300 W), not their whole power
    _, var_100 = fit._interval_power(steps, e_mod, lo, hi, waits, np.array([100.0, 0.0]))
    assert np.allclose(var_100, 150.0**2, rtol=0.05)


def test_no_waits_given_is_the_slices_alone():
    steps, waits = _alternating()
    e_mod = np.full(len(steps.st), 1.6)
    lo, hi = np.array([0.0]), np.array([0.1])
    assert np.allclose(fit._interval_power(steps, e_mod, lo, hi, waits, None)[1], fit._interval_power(steps, e_mod, lo, hi)[1])


@pytest.fixture(scope="module")
def stage_pair():
    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=30.0, tau_s=0.004)
    run = simulate_parallel(tp=1, pp=2, seed=0, duration_s=15, rate_per_s=8.0, power_model=pm)
    req = Requests.from_records(run.requests)
    steps = Steps.from_records(run.steps, req)
    traces = {g: sense(r, "instant-100ms", seed=100 + k) for k, (g, r) in enumerate(run.runs.items())}
    return run, req, steps, traces


def test_a_stages_readings_are_weighted_with_its_waits(stage_pair, monkeypatch):
    run, req, steps, traces = stage_pair
    seen: list[bool] = []
    orig = fit._part_time_weights

    def spy(*a, **kw):
        seen.append(kw.get("waits") is not None)
        return orig(*a, **kw)

    monkeypatch.setattr(fit, "_part_time_weights", spy)
    res = attribute(traces, req, steps)
    assert seen and all(seen)  # every stage fitted with its waits' terms: their power in the weights
    for g, d in res.devices.items():
        assert np.any(d.model.wait_coef > 0), g
    # the books still close per device
    for g, d in res.devices.items():
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-6)
