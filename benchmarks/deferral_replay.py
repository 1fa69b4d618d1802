#!/usr/bin/env python3
"""Replay 2023: how much does deadline-bound, carbon-aware deferral save against running at once?

Usage (from the repository root)::

    python benchmarks/deferral_replay.py [--data DIR] [--out benchmarks/results/deferral_replay.md]

``DIR`` (default ``../shared/data`` next to the repository) holds ``intensity_hourly/``
(Electricity Maps 2023 hourly for DE, FR, GB, US-CAL-CISO, ODbL; NESO GB half-hourly actuals
and the API's own forecasts, CC BY 4.0).

The workload: one short batch job (minutes; 1 kWh) arrives every hour of 2023 (at the middle of
the hour's first period: :30 for hourly series, :15 for half-hourly), with a deadline D = 1 h, 6 h or 24 h after it arrives. wattspan's scheduler
(:func:`wattspan.deferral.choose_start`, the function the :class:`DeferralQueue` uses) picks the
period with the lowest *forecast* intensity among "now" and each later period that starts
before the deadline; the job is then scored at the *actual* intensity of the period it ran in.
Saving = actual at arrival - actual where it ran, in gCO2e per kWh deferred (and in %).

Forecasts (the scheduler never sees the actual it is scored on, except for ``oracle``):

* ``oracle``: the actual series itself (perfect foresight; the upper bound);
* ``NESO-error``: the actual times (1 + the NESO GB forecast's relative error at the same
  half-hour of 2023): a forecast as wrong, in relative terms, as a real published one;
* ``persistence``: the value 24 h earlier (what a scheduler with no forecast service knows);
* for ``GB (NESO)``: the NESO API's own published forecast against NESO's actuals.

Electricity Maps series use the ``lifecycle`` factor (wattspan's default). Jobs whose deadline
runs past the end of the series are not counted.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wattspan.deferral import choose_start  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "deferral_replay.md"
ZONES = ("DE", "FR", "GB", "US-CAL-CISO")
DEADLINES_H = (1, 6, 24)


def _read(path: Path, factor: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    ts, vs = [], []
    with path.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if factor and r["emission_factor_type"] != factor:
                continue
            ts.append(datetime.fromisoformat(r["datetime_utc"].replace("Z", "+00:00")).timestamp())
            vs.append(float(r["carbon_intensity_gco2e_per_kwh"]))
    return np.asarray(ts), np.asarray(vs)


def _regular(ts: np.ndarray, vs: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """On a regular grid from the first to the last time; gaps are NaN."""
    grid = np.arange(ts[0], ts[-1] + step / 2, step)
    out = np.full(len(grid), np.nan)
    out[np.round((ts - ts[0]) / step).astype(int)] = vs
    return grid, out


def replay(actual: np.ndarray, forecast: np.ndarray, period_s: float, deadline_h: float) -> dict:
    """Jobs at the middle of each period; the scheduler sees ``forecast``, is scored on ``actual``."""
    n_wait = int(math.floor(deadline_h * 3600 / period_s))  # later periods starting before the deadline
    # arrivals: the middle of every hour (every 2nd half-hour for half-hourly series)
    stride = max(1, int(round(3600 / period_s)))
    now_v, ran_v = [], []
    for i in range(0, len(actual) - n_wait, stride):
        a = actual[i:i + n_wait + 1]
        f = forecast[i:i + n_wait + 1]
        if np.isnan(a).any() or np.isnan(f).any():
            continue
        k = choose_start(f, n_wait, 1)
        now_v.append(a[0])
        ran_v.append(a[k])
    now_v, ran_v = np.asarray(now_v), np.asarray(ran_v)
    saved = now_v - ran_v
    return {"jobs": len(now_v), "at_once": float(now_v.mean()), "ran": float(ran_v.mean()),
            "saved_g_per_kwh": float(saved.mean()), "saved_pct": float(saved.mean() / now_v.mean() * 100),
            "worse_share": float((saved < 0).mean())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    sys.path.insert(0, str(REPO))
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, DEFAULT_OUT.name)  # --record writes the file the README quotes; else printed only
    a = ap.parse_args(argv)
    d = a.data / "intensity_hourly"
    if not d.is_dir():
        print(f"no intensity_hourly/ in {a.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # NESO: actual and forecast on one half-hour grid; relative forecast error per half-hour
    ta, va = _read(d / "neso_carbon_intensity_api_GB_2023_halfhourly.csv")
    tf, vf = _read(d / "forecast" / "neso_carbon_intensity_api_GB_2023_halfhourly_forecast.csv")
    lo, hi = max(ta[0], tf[0]), min(ta[-1], tf[-1])
    grid = np.arange(lo, hi + 900, 1800.0)
    A = np.full(len(grid), np.nan)
    F = np.full(len(grid), np.nan)
    ia, if_ = np.round((ta - lo) / 1800).astype(int), np.round((tf - lo) / 1800).astype(int)
    ok_a, ok_f = (ia >= 0) & (ia < len(grid)), (if_ >= 0) & (if_ < len(grid))
    A[ia[ok_a]], F[if_[ok_f]] = va[ok_a], vf[ok_f]
    rel_err = (F - A) / A  # NaN where either is missing
    mae = float(np.nanmean(np.abs(F - A)))
    rel_mae = float(np.nanmean(np.abs(rel_err)))
    # hourly relative error (mean of the two half-hours), keyed by hour-of-year
    with warnings.catch_warnings():  # hours where NESO has neither half-hour (the October gap) stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        pairs = np.vstack([rel_err[::2][: len(rel_err[1::2])], rel_err[1::2]])
        err_hour = {int(t // 3600): e for t, e in zip(grid[::2], np.nanmean(pairs, axis=0))}

    rows = []
    for z in ZONES:
        ts, vs = _read(d / f"electricitymaps_{z}_2023_hourly.csv", "lifecycle")
        g, act = _regular(ts, vs, 3600.0)
        e = np.array([err_hour.get(int(t // 3600), np.nan) for t in g])
        noisy = act * (1 + e)
        persist = np.concatenate([np.full(24, np.nan), act[:-24]])
        for dl in DEADLINES_H:
            rows.append((z, dl, {"oracle": replay(act, act, 3600, dl), "NESO-error": replay(act, noisy, 3600, dl),
                                 "persistence": replay(act, persist, 3600, dl)}))
    persist_gb = np.concatenate([np.full(48, np.nan), A[:-48]])
    for dl in DEADLINES_H:
        rows.append(("GB (NESO)", dl, {"oracle": replay(A, A, 1800, dl), "NESO-error": replay(A, F, 1800, dl),
                                       "persistence": replay(A, persist_gb, 1800, dl)}))
    took = time.perf_counter() - t0

    def cell(r):
        return f"{r['saved_g_per_kwh']:.1f} ({r['saved_pct']:.1f}%)"

    lines = [
        "# Carbon-aware deferral replayed over 2023",
        "",
        "Command: `python benchmarks/deferral_replay.py` (data: `../shared/data/intensity_hourly/`).",
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, Python {platform.python_version()}, numpy {np.__version__}, {took:.1f} s "
        "(timing does not matter here; the machine was shared).",
        "",
        "One short 1 kWh batch job arrives every hour of 2023 (mid-period: :30 hourly, :15 half-hourly) with a deadline D after arrival; the scheduler "
        "(`wattspan.deferral.choose_start`) runs it in the period with the lowest *forecast* intensity before the deadline; "
        "it is scored at the *actual* intensity of that period. Saved = gCO2e per kWh deferred against running at once "
        "(percentage of the at-once figure). Electricity Maps zones: lifecycle factors, hourly; GB (NESO): CO2 only, half-hourly.",
        "",
        "Forecasts: **oracle** = the actual series (upper bound); **NESO-error** = for the four Electricity Maps zones the actual "
        "times (1 + the NESO GB forecast's relative error at that hour of 2023), for GB (NESO) the API's own published forecast; "
        "**persistence** = the value 24 h earlier. "
        f"NESO forecast vs actual, 2023: MAE {mae:.1f} gCO2/kWh, mean relative error {rel_mae * 100:.1f}%.",
        "",
        "| zone | deadline | jobs | at once, gCO2e/kWh | saved: oracle | saved: NESO-error forecast | saved: persistence | worse than at once (NESO-error) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for z, dl, r in rows:
        lines.append(f"| {z} | {dl} h | {r['oracle']['jobs']} | {r['oracle']['at_once']:.1f} | {cell(r['oracle'])} | {cell(r['NESO-error'])} | "
                     f"{cell(r['persistence'])} | {r['NESO-error']['worse_share'] * 100:.0f}% |")
    lines += ["", "Data: Electricity Maps (electricitymaps.com), hourly carbon intensity data 2023, ODbL; Carbon Intensity API, "
              "National Energy System Operator (NESO), carbonintensity.org.uk, CC BY 4.0.", ""]
    print("\n".join(lines))
    write_results(a, DEFAULT_OUT.name, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
