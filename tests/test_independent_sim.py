"""benchmarks/independent_sim.py's two truths: the README's causal convention (a lagged step's tail
counted as the step's own), and the windowed one wattspan had before, on the same run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.independent_sim import simulate  # noqa: E402


def _truth(d: Path) -> dict:
    return json.loads((d / "truth.json").read_text())


def test_a_lagged_tail_moves_between_requests_but_not_out_of_them(tmp_path):
    kw = dict(law="sqrt", sensor="avg1s", seed=2, duration_s=12.0)
    sw = simulate(tmp_path / "w", truth="windowed", **kw)
    sc = simulate(tmp_path / "c", **kw)
    assert sw["lag_ms"] == sc["lag_ms"] == 6.0 and sc["truth"] == "causal"
    # the same run, read by the same sensor: only the truth differs
    assert (tmp_path / "w" / "trace.csv").read_text() == (tmp_path / "c" / "trace.csv").read_text()
    w, c = _truth(tmp_path / "w"), _truth(tmp_path / "c")
    assert w.keys() == c.keys()
    for k in w:
        assert w[k]["idle_j"] == c[k]["idle_j"]
    dw = np.array([w[k]["dynamic_j"] for k in w])
    dc = np.array([c[k]["dynamic_j"] for k in w])
    # a first-order lag keeps each step's energy: in total the two truths differ only by the tails
    # that fall where nothing is in flight; request by request the tails move
    assert dc.sum() == pytest.approx(dw.sum(), rel=0.02)
    assert np.max(np.abs(dc - dw) / dw) > 0.01


def test_without_a_lag_the_two_truths_are_one(tmp_path):
    kw = dict(law="fixedstep", sensor="avg20", duration_s=10.0)
    seed = next(s for s in range(1, 60) if simulate(tmp_path / f"probe{s}", seed=s, truth="windowed", **kw)["lag_ms"] == 0.0)
    simulate(tmp_path / "c", seed=seed, **kw)
    assert _truth(tmp_path / f"probe{seed}") == _truth(tmp_path / "c")
    with pytest.raises(ValueError, match="truth"):
        simulate(tmp_path / "x", seed=seed, truth="both", **kw)
