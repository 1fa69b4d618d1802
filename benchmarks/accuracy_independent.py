"""Per-request accuracy through ``wattspan attribute`` on a simulator that shares nothing with wattspan's own.

    python benchmarks/accuracy_independent.py [--seeds 4] [--duration 40] [--record]

For every power law x sensor of ``benchmarks/independent_sim.py`` (which imports nothing
from wattspan) and ``--seeds`` scenarios, writes the run's files, runs the documented
command on them in a fresh process, as a user would::

    python -m wattspan.cli attribute --trace trace.csv --requests requests.jsonl \\
        --batches batches.jsonl [--power-kind average --power-window-s W] --out out.jsonl

and scores each request's ``energy_j`` against the simulator's truth: the error
``|attributed - true| / true``, its median and 95th percentile per cell (law x sensor, all
seeds' requests pooled), and the share of requests whose truth lies inside
``[energy_j_low, energy_j_high]`` (the 90 % band). ``benchmarks/accuracy.py`` is the
benchmark the fit was developed on; this one is the check it was not tuned to: where the
two disagree, the difference is what wattspan's own simulator shares with the fit.
``--record`` writes ``benchmarks/results/accuracy_independent.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.independent_sim import LAWS, POWER_ARGS, SENSORS, simulate  # noqa: E402

#: the issue's targets (p95 per cell): a 1 ms sensor, every coarser one; the median; the band's coverage
TARGET_FINE, TARGET_COARSE, TARGET_MEDIAN, COVER = 0.02, 0.06, 0.015, (0.85, 0.95)


def score(d: Path) -> dict:
    truth = json.loads((d / "truth.json").read_text())
    got = {}
    with open(d / "out.jsonl") as f:
        for line in f:
            r = json.loads(line)
            got[r["id"]] = r
    ids = sorted(truth)
    missing = [i for i in ids if i not in got]
    ids = [i for i in ids if i in got]
    t = np.array([truth[i]["energy_j"] for i in ids])
    a = np.array([got[i]["energy_j"] for i in ids])
    lo = np.array([got[i].get("energy_j_low", np.nan) for i in ids])
    hi = np.array([got[i].get("energy_j_high", np.nan) for i in ids])
    td = np.array([truth[i]["dynamic_j"] for i in ids])
    ad = np.array([got[i]["dynamic_j"] for i in ids])
    return {"err": np.abs(a - t) / t, "covered": (t >= lo) & (t <= hi), "missing": len(missing),
            "dyn_ratio": float(ad.sum() / td.sum()) if td.sum() > 0 else float("nan"),
            "quality": sorted({got[i].get("quality", "") for i in ids})}


def run_one(law: str, sensor: str, seed: int, duration: float, tmp: Path, truth: str = "causal") -> dict:
    d = tmp / f"{law}-{sensor}-{seed}"
    sc = simulate(d, law=law, sensor=sensor, seed=seed, duration_s=duration, truth=truth)
    cmd = [sys.executable, "-m", "wattspan.cli", "attribute", "--trace", str(d / "trace.csv"), "--requests",
           str(d / "requests.jsonl"), "--batches", str(d / "batches.jsonl"), *POWER_ARGS[sensor], "--out", str(d / "out.jsonl"), "--summary", str(d / "summary.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    devices = json.loads((d / "summary.json").read_text())["devices"].values()
    return {**score(d), "scenario": sc, "band_parts": [dv.get("band_parts") or {} for dv in devices]}


def main() -> None:
    from benchmarks._common import add_output_args, band_made_of, progress, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--seed-offset", type=int, default=1, help="first seed (the record uses 1..--seeds)")
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--laws", default=",".join(LAWS))
    ap.add_argument("--sensors", default=",".join(SENSORS))
    ap.add_argument("--truth", choices=("windowed", "causal"), default="causal",
                    help="the simulator's truth: the README's convention (causal: a lagged step's tail is its own) or the one "
                         "wattspan had before (windowed: the tail is whatever runs next)")
    add_output_args(ap, "accuracy_independent.md")
    a = ap.parse_args()
    laws, sensors = a.laws.split(","), a.sensors.split(",")
    seeds = range(a.seed_offset, a.seed_offset + a.seeds)
    t0 = time.monotonic()
    cells: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for law in laws:
            for sensor in sensors:
                for seed in seeds:
                    r = run_one(law, sensor, seed, a.duration, Path(tmp), a.truth)
                    cells.setdefault((law, sensor), []).append(r)
                    progress(f"{law} {sensor} seed {seed}: p95 {np.percentile(r['err'], 95) * 100:.1f} %, "
                             f"band covers {r['covered'].mean() * 100:.0f} %")
    took = time.monotonic() - t0

    def pct(x: float) -> str:
        return f"{x * 100:.1f} %"

    rows, worst = [], {}
    for (law, sensor), rs in cells.items():
        err = np.concatenate([r["err"] for r in rs])
        cov = np.concatenate([r["covered"] for r in rs])
        per_seed = [float(np.percentile(r["err"], 95)) for r in rs]
        p95, med, c = float(np.percentile(err, 95)), float(np.median(err)), float(cov.mean())
        rows.append(f"| {law} | `{sensor}` | {len(err):,} | {pct(med)} | {pct(p95)} | {pct(min(per_seed))} - {pct(max(per_seed))} | "
                    f"{c * 100:.0f} % | {min(r['dyn_ratio'] for r in rs):.3f} - {max(r['dyn_ratio'] for r in rs):.3f} | "
                    f"{', '.join(sorted({q for r in rs for q in r['quality']}))} | {band_made_of(p for r in rs for p in r['band_parts'])} |")
        w = worst.setdefault(sensor, {"p95": (0.0, ""), "med": 0.0, "cov": [1.0, 0.0]})
        if p95 > w["p95"][0]:
            w["p95"] = (p95, law)
        w["med"] = max(w["med"], med)
        w["cov"] = [min(w["cov"][0], c), max(w["cov"][1], c)]
    cell_cov = [float(np.concatenate([r["covered"] for r in rs]).mean()) for rs in cells.values()]
    in_band = sum(COVER[0] <= c <= COVER[1] for c in cell_cov)
    pooled = float(np.concatenate([r["covered"] for rs in cells.values() for r in rs]).mean())
    lines = [
        "# Per-request accuracy on an independent simulator",
        "",
        f"Command: `python benchmarks/accuracy_independent.py --seeds {a.seeds} --duration {a.duration:g}"
        f"{f' --seed-offset {a.seed_offset}' if a.seed_offset != 1 else ''}{' --truth windowed' if a.truth == 'windowed' else ''}` "
        f"({took:.0f} s; {platform.machine()}, Python {platform.python_version()}).",
        "",
        "`benchmarks/independent_sim.py` imports nothing from wattspan: its own scheduler, power laws (`roofline`,",
        "`fixedstep`, `sqrt`), electrical lag (0/3/6 ms), idle drift (0/3/6 W), host-gap power and sensors (see its",
        "docstring). Each run's files go through `python -m wattspan.cli attribute` in a fresh process, as a user",
        "runs it; a request's error is `|energy_j - true| / true`; band coverage: the share of requests whose true energy",
        "lies in `[energy_j_low, energy_j_high]` (a 90 % band). Seeds "
        f"{seeds.start}-{seeds.stop - 1}: each draws a scenario (lag, drift, gap power, arrival rate).",
        *(["", "**Truth: windowed** (`--truth windowed`), not the README's convention: a step's energy is what the board",
            "draws inside its window, so a lagged step's tail is the next step's or the wait's; wattspan attributes by the",
            "README's causal convention (a step's energy is all it makes the board draw, its tail included), so where there",
            "is a lag it is scored against a truth it does not follow."]
          if a.truth == "windowed" else []),
        "",
        "## Worst cell per sensor",
        "",
        "| sensor | worst law (p95) | worst p95 | target | worst median | band coverage, lowest / highest cell |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for sensor in sensors:
        w = worst[sensor]
        target = TARGET_FINE if sensor == "inst1" else TARGET_COARSE
        lines.append(f"| `{sensor}` | {w['p95'][1]} | {pct(w['p95'][0])} | {pct(target)} | {pct(w['med'])} | "
                     f"{w['cov'][0] * 100:.0f} % / {w['cov'][1] * 100:.0f} % |")
    lines += [
        "",
        f"{in_band} of {len(cells)} cells have the band covering 85-95 % of requests "
        f"({sum(c < COVER[0] for c in cell_cov)} below: too narrow; {sum(c > COVER[1] for c in cell_cov)} above: wider than it needs "
        f"to be); over every cell, {pooled * 100:.1f} % of requests lie inside their band.",
        "",
        "## Every cell",
        "",
        "`band made of`: the two sources holding most of a request's band variance (its `band_parts` in the `--summary`",
        "JSON, averaged over the seeds): `coefficients` (the step model's bootstrap), `families` (the close runner-up",
        "families' split), `persistent` (a misfit over a lifetime), `white` (the steps' scatter, the sensor's through",
        "its windows), `groups` (held-out runs of readings as long as the request), `lag`, `idle` (the README's band).",
        "",
        "| law | sensor | requests | median | p95 | p95 per seed | band coverage | dynamic J attributed / true | quality | band made of |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    write_results(a, "accuracy_independent.md" if a.truth == "causal" else "accuracy_independent_windowed.md", text)


if __name__ == "__main__":
    main()
