"""Idle gaps (nothing in flight, no step) must not scale the requests of a window reaching over them."""

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy import _err, scenario_run  # noqa: E402
from wattspan import attribute  # noqa: E402
from wattspan.attribution.reconcile import _idle_cuts  # noqa: E402
from wattspan.simulate import sense  # noqa: E402


def test_idle_cuts_close_long_gaps_only():
    s, e = np.array([10, 100], dtype=np.int64), np.array([20, 200], dtype=np.int64)
    cuts = _idle_cuts(s, e, 0, 1000, 2, 30)
    # 20..100 (80) and 200..1000 (800) are long; 0..10 is short; the period's own ends get no edge
    assert cuts.tolist() == [22, 98, 202]
    assert _idle_cuts(s[:0], e[:0], 0, 1000, 2, 30).size == 0


def _with_tail(tr, run, tail_s, hole):
    t = tr.t_ns
    dt = int(np.median(np.diff(t)))
    tt = t[-1] + dt * np.arange(1, int(tail_s * 1e9 / dt) + 1)
    if hole:
        tt = tt[-1:]
    idle = float(run.true_power_w[-50:].min()) + 2.0  # the idle drifted 2 W up after the run
    return dataclasses.replace(tr, t_ns=np.concatenate([t, tt]), power_w=np.concatenate([tr.power_w, np.full(len(tt), idle)]))


def test_an_hour_of_idle_or_a_hole_after_the_run_leaves_the_requests_alone():
    _, run, req, steps, truth = scenario_run("saturating", 0, 20)
    tr = sense(run, "average-1s", seed=100)
    base = np.quantile(_err(attribute([tr], req, steps).energy_j, truth), 0.95)
    for hole in (False, True):
        res = attribute([_with_tail(tr, run, 3600, hole)], req, steps)
        p95 = np.quantile(_err(res.energy_j, truth), 0.95)
        assert p95 < max(2 * base, 0.06), (hole, p95, base)  # before: 7 % (idle readings), 2,600 % (a hole)
        d = next(iter(res.devices.values()))
        assert abs(res.energy_j.sum() + d.unattributed_j - d.measured_j) < 1e-6 * d.measured_j  # the books still close
