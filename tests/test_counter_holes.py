"""A hole in an energy counter's reads (a paused sampler, a lost connection): the counter holds every
joule across it, drawn all along it. Its change point was placed midway between the last read before
and the first after, squeezing the hole's energy into its first half: every request's error grew."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import scenario_run  # noqa: E402
from wattspan import attribute  # noqa: E402
from wattspan.attribution.energy import counter_knots  # noqa: E402
from wattspan.simulate import sense  # noqa: E402


def test_a_hole_in_a_counters_reads_costs_little_accuracy():
    _, run, req, steps, truth = scenario_run("saturating", 0, 40)
    tr = sense(run, "energy-counter", seed=100)  # refreshed every 50 ms, read every 10 ms

    def p95(trace):
        return float(np.quantile(np.abs(attribute([trace], req, steps).energy_j - truth) / truth, 0.95))

    t = tr.t_ns
    mid = t[len(t) // 2]
    keep = (t < mid) | (t > mid + 5_000_000_000)  # 5 s of reads lost mid-run
    holed = dataclasses.replace(tr, t_ns=t[keep], power_w=tr.power_w[keep], energy_j=tr.energy_j[keep])
    base, with_hole = p95(tr), p95(holed)
    assert with_hole < base + 0.03, (base, with_hole)  # was 3.1 % -> 71 %


def test_the_knot_after_a_hole_spans_it():
    # reads every 10 ms, a refresh every 50 ms, then 2 s of no reads: the rise across the hole starts where it does
    t = np.arange(0, 1_000_000_000, 10_000_000, dtype=np.int64)
    t = np.concatenate([t, 3_000_000_000 + t])
    e = (t // 50_000_000).astype(np.float64)  # 1 J a refresh
    tk, ek = counter_knots(t, e)
    i = int(np.searchsorted(tk, 1_000_000_000))  # the first knot after the hole
    assert tk[i] > 2_900_000_000  # near the hole's far end (the midpoint would be ~2.0e9)
    assert np.all(np.diff(tk) > 0) and ek[i] == e[t >= 3_000_000_000][0]
