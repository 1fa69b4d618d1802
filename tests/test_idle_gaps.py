"""Idle gaps (nothing in flight, no step) must not scale the requests of a window reaching over them."""

import dataclasses
import sys
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy import _err, scenario_run  # noqa: E402
from wattspan import attribute  # noqa: E402
from wattspan.attribution.inputs import Requests, Steps  # noqa: E402
from wattspan.attribution.reconcile import _idle_cuts, _idle_gaps, _reconcile_edges  # noqa: E402
from wattspan.simulate import sense  # noqa: E402


def test_idle_cuts_close_long_gaps_only():
    s, e = np.array([10, 100], dtype=np.int64), np.array([20, 200], dtype=np.int64)
    cuts = _idle_cuts(s, e, 0, 1000, 2, 30)
    # 20..100 (80) and 200..1000 (800) are long; 0..10 is short; the period's own ends get no edge
    assert cuts.tolist() == [22, 98, 202]
    assert _idle_cuts(s[:0], e[:0], 0, 1000, 2, 30).size == 0


def test_no_window_edge_is_made_inside_an_idle_gap():
    s, e = np.array([10, 100], dtype=np.int64), np.array([20, 200], dtype=np.int64)
    gaps = _idle_gaps(s, e, 0, 1000, 2, 30)
    assert [g.tolist() for g in gaps] == [[22, 202], [98, 1000]]  # the trailing gap runs to the period's end
    edges = _reconcile_edges(None, None, 0, 1000, 5e-9, gaps)  # type: ignore[arg-type]
    assert edges[0] == 0 and edges[-1] == 1000 and np.all(np.diff(edges) > 0)
    inside = ((edges > 22) & (edges < 98)) | (edges > 202) & (edges < 1000)
    assert not inside.any()
    assert set(range(5, 21, 5)) <= set(edges.tolist()) and {100, 150, 200} <= set(edges.tolist())
    # without gaps: the plain tiling
    assert _reconcile_edges(None, None, 0, 20, 5e-9).tolist() == [0, 5, 10, 15, 20]  # type: ignore[arg-type]


def _shifted(recs, off, prefix):
    out = []
    for r in recs:
        r = dict(r, start_ns=r["start_ns"] + off, end_ns=r["end_ns"] + off)
        if "id" in r:
            r["id"] = prefix + r["id"]
        if "requests" in r:
            r["requests"] = {prefix + k: v for k, v in r["requests"].items()}
        out.append(r)
    return out


def test_a_1ms_trace_with_an_hour_long_hole_between_two_runs_stays_small():
    # two busy stretches an hour apart, read every millisecond, nothing read in between: the
    # reconciliation windows (a few ms each) once tiled the hole too, 1.7 GB for an hour (a day:
    # 40 GB and the process killed)
    _, run1, _, _, t1 = scenario_run("saturating", 1, 10)
    _, run2, _, _, t2 = scenario_run("saturating", 2, 10)
    tr1, tr2 = sense(run1, "ideal-1ms", seed=1), sense(run2, "ideal-1ms", seed=2)
    off = int(tr1.t_ns[-1]) + 3600 * 10**9
    req = Requests.from_records(run1.requests + _shifted(run2.requests, off, "b-"))
    steps = Steps.from_records(run1.steps + _shifted(run2.steps, off, "b-"), req)
    tr = dataclasses.replace(tr1, t_ns=np.concatenate([tr1.t_ns, tr2.t_ns + off]),
                             power_w=np.concatenate([tr1.power_w, tr2.power_w]), energy_j=None)
    tracemalloc.start()
    try:
        res = attribute([tr], req, steps)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 400 * 2**20, peak / 2**20  # MiB; the two stretches alone need ~60
    truth = np.concatenate([t1, t2])
    assert np.quantile(_err(res.energy_j, truth), 0.95) < 0.03


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
