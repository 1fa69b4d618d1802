"""An energy counter whose refresh is locked to the reads: the fit's stale-reading search, and the board's lag given.

    python benchmarks/counter_phase.py [--seeds 3] [--duration 30] [--stale-ms 10,30,50,65,90] [--laws ...] [--record]

The ``counter-100ms`` preset reads a cumulative energy counter every 100 ms whose own refresh
drifts against the reads (``energy_refresh_jitter_ns``), so each reading is stale by a different
amount. On a real GPU the counter may refresh on the same 100 ms cadence as the poller, so every
reading is stale by the same amount. Here the counter column of a ``counter-100ms`` trace (jitter
off) is rebuilt on its own 100 ms refresh grid, placed so that each read sees a value that is
``--stale-ms`` old (1 % noise per refresh, 1 mJ resolution, as the preset). Per law of
``wattspan.simulate.LAWS`` and staleness, over ``benchmarks/accuracy.py``'s scenarios (seed
``s`` runs ``SCENARIOS[s % len(SCENARIOS)]``): the p95 and median per-request error and how
often the truth lies in the 90 % band, (a) as the fit finds the reading's shift and the board's
lag itself, (b) with the scenario's true lag given (``attribute(..., board_lag_s=tau_s)``,
``wattspan attribute --board-lag-ms``). The drifting preset is the baseline row.
``--record`` writes ``benchmarks/results/counter_phase.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import _err, scenario_run  # noqa: E402

from benchmarks._common import add_output_args, progress, write_results  # noqa: E402
from wattspan import attribute  # noqa: E402
from wattspan.simulate import LAWS, PRESETS, sense  # noqa: E402

MS = 1_000_000
PERIOD_NS = 100 * MS
BASE = "counter-100ms"


def locked_trace(run, seed: int, stale_ms: float):
    """``counter-100ms`` read as the preset does, its counter refreshing every 100 ms locked to the
    reads so that each reading is ``stale_ms`` old (returns the trace and each reading's staleness, ns)."""
    spec = dataclasses.replace(PRESETS[BASE], energy_refresh_jitter_ns=0)
    tr = sense(run, spec, seed=100 + seed)
    g0, g1 = int(run.start_ns), int(run.end_ns)
    nominal0 = int(np.min(tr.t_ns - np.arange(tr.t_ns.shape[0], dtype=np.int64) * PERIOD_NS))
    phi = (nominal0 - g0 - int(stale_ms * MS)) % PERIOD_NS
    q = g0 + phi + PERIOD_NS * np.arange(0, (g1 - g0) // PERIOD_NS + 2, dtype=np.int64)
    q = np.concatenate([[g0], q[(q < g1) & (q > g0)]])
    rng = np.random.default_rng(7 + seed)
    inc = np.diff(run.energy_j(np.full(q.shape[0], g0), q))
    inc = inc * np.maximum(0.0, 1.0 + 0.01 * rng.standard_normal(inc.shape[0]))
    c = float(rng.uniform(1e5, 1e6)) + np.concatenate([[0.0], np.cumsum(inc)])
    c = np.floor(c / 1e-3) * 1e-3
    k = np.searchsorted(q, tr.t_ns, side="right") - 1
    return dataclasses.replace(tr, energy_j=c[k]), tr.t_ns - q[k]


def rows(seeds: int, duration_s: float, stale_ms, laws=None, seed_offset: int = 0) -> list[dict]:
    """One row per (law, counter, lag given or not): p95 / median error, band coverage, mean staleness."""
    laws = laws or list(LAWS)
    cells: dict = {}
    for law in laws:
        for seed in range(seed_offset, seed_offset + seeds):
            sc, run, req, steps, truth = scenario_run(law, seed, duration_s)
            variants: list = [("drifting (preset)", None)] + [(f"locked, {s:g} ms stale", s) for s in stale_ms]
            for name, s in variants:
                if s is None:
                    tr, st = sense(run, BASE, seed=100 + seed), None
                else:
                    tr, st = locked_trace(run, seed, s)
                for given in (False, True):
                    res = attribute([tr], req, steps, board_lag_s=float(sc["tau_s"]) if given else None)
                    c = cells.setdefault((law, name, given), {"err": [], "inside": [], "stale": []})
                    c["err"].append(_err(res.energy_j, truth))
                    c["inside"].append((truth >= res.energy_j_low) & (truth <= res.energy_j_high))
                    if st is not None:
                        c["stale"].append(float(np.mean(st)) / MS)
            progress(f"{law} seed {seed} done")
    out = []
    for (law, name, given), c in cells.items():
        e, i = np.concatenate(c["err"]), np.concatenate(c["inside"])
        out.append({"law": law, "counter": name, "lag_given": given, "p95": float(np.quantile(e, 0.95)),
                    "median": float(np.median(e)), "band": float(i.mean()), "n": int(e.shape[0]),
                    "stale_ms": float(np.mean(c["stale"])) if c["stale"] else float("nan")})
    return out


def table(rs: list[dict]) -> list[str]:
    lines = ["| law | counter (refresh) | lag | p95 error | median error | 90 % band coverage | requests |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        lag = "given (true tau)" if r["lag_given"] else "fitted"
        lines.append(f"| {r['law']} | {r['counter']} | {lag} | {r['p95'] * 100:.2f} % | {r['median'] * 100:.2f} % | "
                     f"{r['band'] * 100:.1f} % | {r['n']} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--stale-ms", default="10,30,50,65,90", help="comma-separated staleness of the locked counter's readings")
    ap.add_argument("--laws", default=",".join(LAWS))
    add_output_args(ap, "counter_phase.md")
    a = ap.parse_args()
    stale = [float(x) for x in a.stale_ms.split(",") if x]
    laws = [x for x in a.laws.split(",") if x]
    rs = rows(a.seeds, a.duration, stale, laws, a.seed_offset)
    cmd = (f"python benchmarks/counter_phase.py --seeds {a.seeds} --seed-offset {a.seed_offset} --duration {a.duration:g} "
           f"--stale-ms {a.stale_ms} --laws {a.laws}")
    lines = ["# A 100 ms energy counter whose refresh is locked to the reads", "",
             f"Command: `{cmd}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.", "",
             "Per-request relative error against the simulator's truth, pooled over the seeds; 'lag fitted': the fit "
             "searches the readings' shift and the board's lag itself; 'given': `attribute(..., board_lag_s=tau_s)` "
             "with the scenario's true lag (`wattspan attribute --board-lag-ms`).", ""] + table(rs) + [""]
    print("\n".join(lines))
    write_results(a, "counter_phase.md", "\n".join(lines))


if __name__ == "__main__":
    main()
