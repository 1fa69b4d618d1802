"""The boards' electrical lag given to the live meter (``Meter(board_lag_s=...)``, ``WATTSPAN_BOARD_LAG_MS``):
its step models are fitted through it as offline ``attribute(..., board_lag_s=...)`` does. Not the meter's
``lag_s`` (how far behind the sensor's newest reading a pass stops)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from wattspan import Meter, Requests, Steps, attribute
from wattspan.carbon import CarbonModel
from wattspan.meter import RecordCallback
from wattspan.simulate import LAWS, sense, simulate_server

from .fakes.sampler import CutSampler

TAU = 0.004  # the simulated board's electrical lag (s)
IDLE_W = 90.0
S = 10**9


@pytest.fixture(scope="module")
def served():
    """30 s of a simulated server whose power trails each step by a 4 ms first-order lag, read by a
    100 ms energy counter (too coarse for the fit to choose a lag of its own)."""
    pm = dataclasses.replace(LAWS["saturating"], tau_s=TAU)
    run = simulate_server(seed=3, duration_s=30, rate_per_s=8.0, power_model=pm, idle_drift_w=0.0)
    trace = dataclasses.replace(sense(run, "counter-100ms", seed=1), device="gpu0")
    req = Requests.from_records([dict(r, gpu="gpu0") for r in run.requests])
    steps = Steps.from_records([dict(s, gpu="gpu0") for s in run.steps], req)
    return run, trace, req, steps


def _live(run, trace, first_s=20, **kw):
    """The run's requests and batch steps fed to a live meter, then its passes: the first over
    ``first_s`` (its step model fitted there, once: refit_s is out of reach), then one a second to the end."""
    shift = time.monotonic_ns() + 1000 * S - int(trace.t_ns[0])
    moved = dataclasses.replace(trace, t_ns=trace.t_ns + shift)
    sampler = CutSampler([moved], latest=int(moved.t_ns[0]))
    got = []
    m = Meter(sampler=sampler, autostart=False, idle_w=IDLE_W, lag_s=0.0, refit_s=1e5,
              carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[RecordCallback(got.append)], **kw)
    events = sorted([(r["start_ns"], 0, r) for r in run.requests] + [(s["start_ns"], 1, s) for s in run.steps]
                    + [(r["end_ns"], 2, r) for r in run.requests], key=lambda e: (e[0], e[1]))
    for _, kind, r in events:
        if kind == 0:
            m.begin(r["id"], "gpu0", r["start_ns"] + shift)
        elif kind == 1:
            m.record_step(r["start_ns"] + shift, r["end_ns"] + shift, "gpu0", r["requests"])
        else:
            m.end(r["id"], "gpu0", r["end_ns"] + shift)
    t0, t1 = int(moved.t_ns[0]), int(moved.t_ns[-1])
    k = first_s
    while sampler.latest["gpu0"] < t1:
        sampler.latest["gpu0"] = min(t0 + k * S, t1)
        m._pass()
        k += 1
    m.close(0)  # never started: nothing to wait for
    assert m.counters["step_model_fits"] == 1 and m.counters["pass_errors"] == 0
    return m, {r.id: r.energy_j for r in got}


def _median_rel(live, offline, ids):
    a = np.array([live[i] for i in ids])
    return float(np.median(np.abs(a - offline) / offline))


def test_the_live_meter_gives_what_offline_attribution_gives_with_the_lag(served):
    run, trace, req, steps = served
    ids = list(req.ids)
    offline = attribute({"gpu0": trace}, req, steps, idle_w=IDLE_W, board_lag_s=TAU).energy_j
    offline_none = attribute({"gpu0": trace}, req, steps, idle_w=IDLE_W).energy_j
    # one pass over the whole run: the meter's model fitted on the readings offline attribution fits on
    given, e_given = _live(run, trace, first_s=40, board_lag_s=TAU)
    own, e_own = _live(run, trace, first_s=40)
    assert given._models["gpu0"].lag_tau_s == TAU and own._models["gpu0"].lag_tau_s == 0
    # per request the same figures as offline, given the lag or not (0.05 % median apart: the meter
    # attributes from the first request's start, offline from the first reading). A step's tail is
    # its own whichever window it falls in, so on these coarse readings the lag moves little (its
    # deconvolution of the windows): the meter's fit carries it all the same (above)
    assert _median_rel(e_given, offline, ids) < 0.002 and _median_rel(e_own, offline_none, ids) < 0.002
    assert _median_rel(e_given, offline, ids) < _median_rel(e_given, offline_none, ids)


def test_the_live_meter_fits_through_the_given_lag_pass_by_pass(served):
    run, trace, req, steps = served
    own, e_own = _live(run, trace)
    given, e_given = _live(run, trace, board_lag_s=TAU)
    assert own._models["gpu0"].lag_tau_s == 0  # 100 ms readings: no lag of its own
    model = given._models["gpu0"]
    assert model.lag_tau_s == TAU and "lag (given)" in model.why
    assert len(e_given) == len(req) and given.board_lag_s == TAU
    # the lag moves energy between requests, not in or out of the books
    assert sum(e_given.values()) == pytest.approx(sum(e_own.values()), rel=0.01)
    assert max(abs(e_given[i] - e_own[i]) / e_own[i] for i in e_own) > 0.005


def test_a_lag_per_device_and_bad_lags_refused():
    m = Meter(sources=[], autostart=False, board_lag_s={"gpu0": TAU, 1: 0.0})
    assert m.board_lag_s == {"gpu0": TAU, "gpu1": 0.0}  # device names as everywhere else
    m.close(0)  # never started: nothing to wait for
    assert Meter(sources=[], autostart=False).board_lag_s is None
    for bad in (-0.001, math.nan, math.inf, 2.0, "4ms", True):
        with pytest.raises(ValueError, match="board_lag_s"):
            Meter(sources=[], autostart=False, board_lag_s=bad)
        with pytest.raises(ValueError, match="board_lag_s"):
            Meter(sources=[], autostart=False, board_lag_s={"gpu0": bad})


def test_the_default_meter_reads_the_lag_from_the_environment(monkeypatch):
    from wattspan.defaults import get_default_meter, set_default_meter
    from wattspan.settings import SettingsError

    monkeypatch.setenv("WATTSPAN_OTEL", "0")
    monkeypatch.setenv("WATTSPAN_PEERS", "0")
    for env, kw, want in (("gpu0=4, gpu1=0.25", {}, {"gpu0": 0.004, "gpu1": 0.00025}), ("4", {}, 0.004),
                          ("4", {"board_lag_s": 0.001}, 0.001)):  # an argument wins over the variable
        monkeypatch.setenv("WATTSPAN_BOARD_LAG_MS", env)
        set_default_meter(None)
        m = get_default_meter(sources=[], autostart=False, **kw)
        try:
            assert m.board_lag_s == want and m.lag_s is None  # the meter's own lag_s untouched
        finally:
            set_default_meter(None)
            m.close(0)
    monkeypatch.setenv("WATTSPAN_BOARD_LAG_MS", "4ms")
    with pytest.raises(SettingsError, match="WATTSPAN_BOARD_LAG_MS"):
        get_default_meter(sources=[], autostart=False)
    set_default_meter(None)
