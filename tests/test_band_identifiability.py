"""The two-worlds check behind the README's "What a band cannot know" (benchmarks/band_identifiability.py):
one set of files, a step scatter in one world and a sensor's noise in the other, and the band's
half-widths needing different factors in each."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.band_identifiability import b_sensor_error, cell, worlds  # noqa: E402
from wattspan.simulate import sense  # noqa: E402


def test_the_two_worlds_share_every_file():
    a, b = worlds("energy-linear", 0, 10.0)
    assert a.requests == b.requests and a.steps == b.steps  # the requests and batches files
    ids = [r["id"] for r in a.requests]
    # the worlds differ only in the truth: the steps' scatter moved energy between requests
    ta, tb = (np.array([w.truth[i]["dynamic_j"] for i in ids]) for w in (a, b))
    assert np.max(np.abs(ta / tb - 1.0)) > 0.005
    # the trace is one file: world B's sensor error is what was reported less B's own power
    sd, ac = b_sensor_error(a, b, "instant-100ms", 100)
    assert 0.005 < sd < 0.05 and abs(ac) < 0.2  # a few per cent, white: a sensor like the presets
    tr = sense(a, "instant-100ms", seed=100)
    assert tr.simulated and tr.power_w is not None


def test_no_one_factor_calibrates_both_worlds_on_20ms_averages():
    r = cell("energy-linear", "average-20ms", 2, 15.0)
    assert r["cover_b"] > r["cover_a"]  # the same bands cover the scatter-free truth more often
    assert not r["meet"], r  # and the factors that calibrate each world do not overlap
    assert r["k_b"][1] < r["k_a"][0]
