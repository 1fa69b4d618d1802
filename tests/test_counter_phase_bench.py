"""benchmarks/counter_phase.py runs, tiny: a counter locked to the reads, fitted and with the board's lag given."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import counter_phase  # noqa: E402


def test_counter_phase_rows_and_table():
    rs = counter_phase.rows(1, 8.0, [10.0, 65.0], laws=["saturating"])
    keys = {(r["counter"], r["lag_given"]) for r in rs}
    assert keys == {(c, g) for c in ("drifting (preset)", "locked, 10 ms stale", "locked, 65 ms stale") for g in (False, True)}
    for r in rs:
        assert r["n"] > 0 and math.isfinite(r["p95"]) and math.isfinite(r["median"]) and 0.0 <= r["median"] <= r["p95"]
        assert 0.0 <= r["band"] <= 1.0
    locked = [r for r in rs if r["counter"].startswith("locked")]
    assert all(abs(r["stale_ms"] - float(r["counter"].split()[1])) < 5.0 for r in locked)  # the staleness asked for
    given = next(r for r in rs if r["counter"] == "locked, 65 ms stale" and r["lag_given"])
    assert given["p95"] < 0.5
    lines = counter_phase.table(rs)
    assert lines[0].startswith("| law |") and len(lines) == 2 + len(rs)
    assert any("given (true tau)" in ln for ln in lines)
