"""A board's electrical lag given to the fit (``attribute(..., board_lag_s=...)``): pipeline stages on coarse readings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan._sim_parallel import simulate_parallel
from wattspan.simulate import LAWS, sense

TAU = 0.004  # the simulated boards' electrical lag (s)


@pytest.fixture(scope="module")
def overlapped():
    """vLLM's pipeline (stage 0 runs micro-batch k+1 while stage 1 runs k), read by a 100 ms counter."""
    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=30.0, tau_s=TAU)
    run = simulate_parallel(tp=1, pp=2, seed=0, duration_s=15, rate_per_s=8.0, power_model=pm,
                            overlap=True, stage_weights=(0.45, 0.55))
    req = Requests.from_records(run.requests)
    steps = Steps.from_records(run.steps, req)
    traces = {g: sense(r, "counter-100ms", seed=7 + k) for k, (g, r) in enumerate(run.runs.items())}
    return run, req, steps, traces


def _p95(res, run):
    truth = np.array([run.truth[i]["energy_j"] for i in res.requests.ids])
    return float(np.quantile(np.abs(res.energy_j - truth) / truth, 0.95))


def test_a_given_lag_is_fitted_through_where_the_readings_cannot_choose_one(overlapped):
    run, req, steps, traces = overlapped
    own = attribute(traces, req, steps)
    given = attribute(traces, req, steps, board_lag_s=TAU)
    for g, d in given.devices.items():
        assert own.devices[g].model.lag_tau_s == 0  # readings 100 ms apart: no lag searched
        m = d.model
        assert m.lag_tau_s == TAU and "lag (given)" in m.why
        assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)
        if m.wait_coef.any():
            # through the lag the J-per-wait term (each slice's tail) is the lag's; the power held
            # in a wait is no more than the steps' own duration term
            assert m.wait_coef[1] == 0 and m.wait_coef[0] <= m.full_coef[0] + 1e-9
    # a slice's tail is the slice's own whichever window it is drawn in (the conventions): the readings
    # need no lag to bill it, and the given one (deconvolving the windows through it) costs little
    assert _p95(own, run) < 0.06 and _p95(given, run) < 1.3 * _p95(own, run), (_p95(given, run), _p95(own, run))
    assert given.dynamic_j.sum() / sum(t["dynamic_j"] for t in run.truth.values()) == pytest.approx(1.0, abs=0.02)


def test_a_lag_per_device_and_none(overlapped):
    run, req, steps, traces = overlapped
    res = attribute(traces, req, steps, board_lag_s={"gpu0": TAU, "gpu1": 0.0})
    assert res.devices["gpu0"].model.lag_tau_s == TAU
    assert res.devices["gpu1"].model.lag_tau_s == 0  # 0: no lag, and none searched
    alone = attribute(traces, req, steps, board_lag_s={"gpu0": TAU})  # a device the mapping lacks: as without it
    assert alone.devices["gpu1"].model.lag_tau_s == 0
    assert alone.devices["gpu0"].model.lag_tau_s == TAU
    np.testing.assert_allclose(alone.parts["energy_j"][alone.parts["device"] == "gpu1"],
                               attribute(traces, req, steps).parts["energy_j"][alone.parts["device"] == "gpu1"])


@pytest.mark.parametrize("bad", [-0.001, float("nan"), 2.0, "4ms"])
def test_a_bad_lag_is_refused(overlapped, bad):
    run, req, steps, traces = overlapped
    with pytest.raises(ValueError, match="board_lag_s"):
        attribute(traces, req, steps, board_lag_s=bad)
    with pytest.raises(ValueError, match="board_lag_s"):
        attribute(traces, req, steps, board_lag_s={"gpu0": bad})


def _cli(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_the_command_line_takes_the_lag_in_ms(tmp_path, overlapped):
    import json

    from wattspan._sim_parallel import write_files

    run = overlapped[0]
    f = write_files(run, "counter-100ms", tmp_path)
    base = ("attribute", "--trace", f["trace"], "--requests", f["requests"], "--batches", f["batches"], "--out", tmp_path / "out.jsonl")
    p = _cli(*base, "--summary", tmp_path / "s.json", "--board-lag-ms", "4")
    assert p.returncode == 0, p.stderr
    devs = json.loads((tmp_path / "s.json").read_text())["devices"]
    assert {g: d["model"]["lag_tau_s"] for g, d in devs.items()} == {"gpu0": pytest.approx(TAU), "gpu1": pytest.approx(TAU)}
    assert "4 ms electrical lag (given)" in p.stderr + p.stdout
    p = _cli(*base, "--summary", tmp_path / "s2.json", "--board-lag-ms", "gpu0=4, gpu1=0")
    assert p.returncode == 0, p.stderr
    devs = json.loads((tmp_path / "s2.json").read_text())["devices"]
    assert devs["gpu0"]["model"]["lag_tau_s"] == pytest.approx(TAU) and devs["gpu1"]["model"]["lag_tau_s"] == 0
    for bad in ("-1", "4ms", "gpu0=", "=4", "5000"):
        p = _cli(*base, "--board-lag-ms", bad)
        assert p.returncode == 2 and "--board-lag-ms" in p.stderr, (bad, p.stderr)
    # or from WATTSPAN_BOARD_LAG_MS (the flag wins); a bad value names the variable
    p = _cli(*base, "--summary", tmp_path / "s3.json", env={"WATTSPAN_BOARD_LAG_MS": "gpu0=4"})
    assert p.returncode == 0, p.stderr
    devs = json.loads((tmp_path / "s3.json").read_text())["devices"]
    assert devs["gpu0"]["model"]["lag_tau_s"] == pytest.approx(TAU) and devs["gpu1"]["model"]["lag_tau_s"] == 0
    p = _cli(*base, "--board-lag-ms", "4ms", env={"WATTSPAN_BOARD_LAG_MS": "4"})
    assert p.returncode == 2 and "argument --board-lag-ms" in p.stderr and "WATTSPAN" not in p.stderr
    p = _cli(*base, env={"WATTSPAN_BOARD_LAG_MS": "4ms"})
    assert p.returncode == 2 and "WATTSPAN_BOARD_LAG_MS='4ms' is not valid for --board-lag-ms" in p.stderr, p.stderr
    assert "milliseconds from 0 to 1000" in p.stderr and "Traceback" not in p.stderr
    # the old spelling is gone (it read as the live meter's lag_s, another lag)
    p = _cli(*base, "--lag-ms", "4")
    assert p.returncode == 2 and "--lag-ms" in p.stderr


def test_a_given_model_keeps_its_own_lag(overlapped):
    run, req, steps, traces = overlapped
    fitted = attribute(traces, req, steps, board_lag_s=TAU)
    models = {g: d.model for g, d in fitted.devices.items()}
    again = attribute(traces, req, steps, models=models, board_lag_s=2 * TAU)
    assert all(again.devices[g].model.lag_tau_s == TAU for g in models)
    np.testing.assert_allclose(again.energy_j, attribute(traces, req, steps, models=models).energy_j)


@pytest.mark.parametrize("sensor", ["instant-100ms", "hopper-nvml"])
def test_the_refits_keep_a_given_lags_constraints_on_the_waits(sensor):
    """Part-time readings are refitted with weights (instant-100ms) and a counter's part-time power readings
    are stacked beside its deltas (hopper-nvml): both refits keep what the given lag took out of the waits'
    terms (no J per wait: the lag places each slice's tail; the W held in a wait no more than the steps'),
    as the first fit through the lag does. Before, they refitted the waits' terms freely (gpu0 of this run
    got 1.2 J per wait back on instant-100ms readings)."""
    pm = dataclasses.replace(LAWS["saturating"], between_steps_w=30.0, tau_s=TAU)
    run = simulate_parallel(tp=1, pp=2, seed=0, duration_s=30, rate_per_s=8.0, power_model=pm)
    req = Requests.from_records(run.requests)
    steps = Steps.from_records(run.steps, req)
    traces = {g: sense(r, sensor, seed=100 + k) for k, (g, r) in enumerate(run.runs.items())}
    res = attribute(traces, req, steps, board_lag_s=TAU)
    waits = 0
    for d in res.devices.values():
        m = d.model
        assert m.lag_tau_s == TAU
        if "waits'" in m.why:  # (through a given lag: "the waits' W while waiting", the J per wait left out)
            waits += 1
            assert m.wait_coef[1] == 0, m.wait_coef
            assert m.wait_coef[0] <= m.full_coef[0] + 1e-9, (m.wait_coef, m.full_coef)
    assert waits  # a pipeline stage gets the waits' terms: the check above is not vacuous
