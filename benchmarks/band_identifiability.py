"""Can a 90 % band be calibrated from the files alone? One set of files, two worlds.

    python benchmarks/band_identifiability.py [--seeds 6] [--duration 40] [--record]

World A is a scenario of ``benchmarks/accuracy.py``: a power law of ``wattspan.simulate`` with its
per-step scatter (``step_jitter_rel``, 3 %: a step draws a few per cent more or less than its
composition says), read by a sensor. World B is the same run with no per-step scatter: every
step draws exactly what the law says (like the independent simulator's laws), and the sensor's
error is whatever is left between what it reported and that power. The two worlds share every
file ``wattspan attribute`` reads (trace CSV, requests, batches): the same bytes. So wattspan,
or any method, gives the same estimate and the same band in both; only the truth differs.

World B's sensor is a plausible one where each step is seen by at most one reading (instant
and part-time power read 100 ms apart, a counter's 100 ms deltas, 1 s averages): its error is
white from reading to reading (the table's lag-1 autocorrelation) and a few per cent, about
what the sensor presets already add. On such a sensor a reading's scatter about the model is
the same whether the steps or the sensor made it, and nothing in the files tells the two
apart; but a step's own scatter lands in its requests' energy and a sensor's noise does not
(a reconciliation window's total is measured). A band that is right in one world is too wide
or too narrow in the other.

Per law x sensor, pooled over the seeds: each world's coverage of wattspan's band; the
factors ``k`` on its half-widths that would put each world's coverage in 85-95 % (the
issue's target), and whether one ``k`` does both. Where the two ranges do not meet, no
rescaling of the band can be calibrated in both worlds; another band shape would have to
know which world it is in, which the files do not say.

Then what real boards show (the shared data folder's ``traces/``, an external meter beside
nvidia-smi): the sensor's white noise about the meter on a steady load, and one kernel's
pulse-to-pulse energy scatter. Prints; ``--record`` writes
``benchmarks/results/band_identifiability.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import SCENARIOS  # noqa: E402
from wattspan import Requests, Steps, attribute  # noqa: E402
from wattspan.simulate import LAWS, PRESETS, sense, simulate_server  # noqa: E402

#: sensors on which each step is seen by at most one reading (so world B's sensor error is white)
SENSORS = ("instant-100ms", "counter-100ms", "average-1s", "average-1s-counter", "average-20ms")
COVER = (0.85, 0.95)
TRACES = ROOT.parent / "shared" / "data" / "traces"


def worlds(law: str, seed: int, duration_s: float):
    """Scenario ``seed`` of ``benchmarks/accuracy.py`` under ``law``: ``(run A, run B)``, B the
    same schedule and the same random draws with no per-step scatter."""
    sc = SCENARIOS[seed % len(SCENARIOS)]
    pm = dataclasses.replace(LAWS[law], between_steps_w=sc["between_steps_w"], tau_s=sc["tau_s"])
    kw = dict(seed=seed, duration_s=duration_s, bursty=sc["bursty"], rate_per_s=sc["rate_per_s"],
              idle_drift_w=sc["idle_drift_w"])
    a = simulate_server(power_model=pm, **kw)
    b = simulate_server(power_model=dataclasses.replace(pm, step_jitter_rel=0.0), **kw)
    if [s["start_ns"] for s in a.steps] != [s["start_ns"] for s in b.steps]:
        raise RuntimeError("the two worlds' schedules differ: the simulator's random draws moved")
    return a, b


def b_sensor_error(a, b, sensor: str, seed: int) -> tuple[float, float]:
    """World B's sensor error on the files' readings: ``(relative sd, lag-1 autocorrelation)`` of
    (what was reported - what B's noiseless sensor would have reported) / reported, over every
    reading."""
    spec = PRESETS[sensor]
    clean = dataclasses.replace(spec, noise_rel=0.0, energy_noise_rel=0.0)
    got, ref = sense(a, spec, seed=seed), sense(b, clean, seed=seed)
    if got.power_w is not None:
        x, y = got.power_w, ref.power_w
    else:
        x, y = np.diff(got.energy_j), np.diff(ref.energy_j)
    ok = x > 0
    e = np.where(ok, (x - y) / np.where(ok, x, 1.0), 0.0)
    d = e[ok] - e[ok].mean()
    ac = float(np.sum(d[1:] * d[:-1]) / np.sum(d * d)) if len(d) > 2 and np.any(d) else float("nan")
    eb = e[ok]
    return float(eb.std()), ac


def cell(law: str, sensor: str, seeds: int, duration_s: float) -> dict:
    ra, rb, sd, ac, p95a, p95b = [], [], [], [], [], []
    for seed in range(seeds):
        a, b = worlds(law, seed, duration_s)
        req = Requests.from_records(a.requests)
        res = attribute([sense(a, sensor, seed=100 + seed)], req, Steps.from_records(a.steps, req))
        ta = np.array([a.truth[i]["energy_j"] for i in req.ids])
        tb = np.array([b.truth[i]["energy_j"] for i in req.ids])
        half = np.maximum(res.energy_j_high - res.energy_j, 1e-12)
        ra.append(np.abs(res.energy_j - ta) / half)
        rb.append(np.abs(res.energy_j - tb) / half)
        p95a.append(np.abs(res.energy_j - ta) / ta)
        p95b.append(np.abs(res.energy_j - tb) / tb)
        s, c = b_sensor_error(a, b, sensor, 100 + seed)
        sd.append(s)
        ac.append(c)
    ra, rb = np.concatenate(ra), np.concatenate(rb)
    ka, kb = np.quantile(ra, COVER), np.quantile(rb, COVER)  # k puts coverage in range iff q85 <= k <= q95
    return {"law": law, "sensor": sensor, "n": len(ra), "cover_a": float((ra <= 1).mean()), "cover_b": float((rb <= 1).mean()),
            "k_a": ka, "k_b": kb, "meet": bool(max(ka[0], kb[0]) <= min(ka[1], kb[1])),
            "p95_a": float(np.quantile(np.concatenate(p95a), 0.95)), "p95_b": float(np.quantile(np.concatenate(p95b), 0.95)),
            "b_sd": float(np.mean(sd)), "b_ac": float(np.mean(ac))}


def _nvsmi(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """nvidia-smi CSV: (column names, UTC epoch s, values); the file's clock is UK summer time."""
    lines = path.read_text().splitlines()
    head = [h.strip() for h in lines[0].split(",")]
    rows = [ln.split(",") for ln in lines[1:] if ln.strip()]
    t = np.array([_dt.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=_dt.timezone.utc).timestamp() - 3600
                  for r in rows])
    v = np.array([[float(x) if x.strip() not in ("[N/A]", "N/A", "") else np.nan for x in r[5:]] for r in rows])
    return head[5:], t, v


def _meter(prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pmd = np.genfromtxt(TRACES / f"{prefix}_PMD_data.csv", delimiter=",", skip_header=1)
    marks = np.unique(np.genfromtxt(TRACES / f"{prefix}_timestamps.csv", skip_header=1)) / 1e6
    return pmd[:, 0] / 1e3, pmd[:, 3], marks


def real_boards() -> list[dict]:
    """Per board: each power field's white noise about the external meter (sd of reading / the
    meter's mean over the 100 ms before it, on the load step's plateau, from 2 s after it starts)
    and its offset; and the A100's pulse-to-pulse scatter of one kernel's dynamic energy."""
    out = []
    for board in ("A100", "A5000", "K40m"):
        prefix = f"GPU_Power_Benchmark_Transient_Response_{board}_TR"
        if not (TRACES / f"{prefix}_PMD_data.csv").exists():
            continue
        t, p, marks = _meter(prefix)
        on, off = marks[0], marks[1]
        cols, tt, v = _nvsmi(TRACES / f"{prefix}_gpudata.csv")
        m = (tt > on + 2.0) & (tt < off - 0.2)
        cum = np.concatenate(([0.0], np.cumsum(p)))
        i0, i1 = np.searchsorted(t, tt[m] - 0.1), np.searchsorted(t, tt[m])
        ref = (cum[i1] - cum[i0]) / np.maximum(i1 - i0, 1)
        plateau = float(p[(t > on + 2.0) & (t < off - 0.2)].mean())
        for k, name in enumerate(cols):
            x = v[m, k]
            if np.isnan(x).all():
                continue
            out.append({"board": board, "field": name, "readings": int(m.sum()), "noise": float(np.nanstd(x / ref - 1.0)),
                        "offset": float(np.nanmean(x) / plateau - 1.0)})
    if (TRACES / "GPU_Power_Benchmark_5050_A100_PMD_data.csv").exists():
        t, p, marks = _meter("GPU_Power_Benchmark_5050_A100")
        on, off = marks[0:-1:2], marks[1::2]
        n = min(len(on), len(off))
        idle = float(np.median(p[t < on[0] - 0.05]))
        dyn = []
        for a, b in zip(on[:n], off[:n]):
            w = (t >= a) & (t < b + 0.010)  # the pulse and the 10 ms its fall takes
            dyn.append(float(np.trapezoid(p[w], t[w])) - idle * (b + 0.010 - a))
        d = np.array(dyn)
        c = d - d.mean()
        out.append({"board": "A100", "field": "pulse dynamic energy (meter)", "readings": n, "noise": float(d.std() / d.mean()),
                    "offset": float(np.sum(c[1:] * c[:-1]) / np.sum(c * c))})
    return out


def main() -> None:
    from benchmarks._common import add_output_args, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--laws", default=",".join(LAWS))
    ap.add_argument("--sensors", default=",".join(SENSORS))
    add_output_args(ap, "band_identifiability.md")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rows = [cell(law, s, a.seeds, a.duration) for law in a.laws.split(",") for s in a.sensors.split(",")]
    boards = real_boards()
    took = time.perf_counter() - t0
    pct = lambda x: f"{x * 100:.1f} %"  # noqa: E731
    meet = sum(r["meet"] for r in rows)
    lines = ["# One set of files, two worlds: what a band cannot know", "",
             f"Command: `python benchmarks/band_identifiability.py --seeds {a.seeds} --duration {a.duration:g}` "
             f"({took:.0f} s on a shared 2-core CPU).", "",
             "World A: a scenario of `benchmarks/accuracy.py` (its law, its 3 % per-step scatter). World B: the same run, every",
             "step drawing exactly what its law says, the sensor's error being what is left between what it reported and that",
             "power. Both worlds have the same trace, requests and batches, byte for byte, so the same estimate and the same",
             "band; only the truth differs. `k`: the factors on the band's half-widths that put a world's coverage in 85-95 %",
             "(its 85th to 95th percentile of |error| / half-width). B's sensor error: relative sd and lag-1 autocorrelation",
             "over every reading (white where each step is seen by one reading; the 20 ms averages see a step twice where it",
             "crosses a reading's edge).", "",
             f"{meet} of {len(rows)} cells have one `k` that calibrates both worlds.", "",
             "| law | sensor | requests | coverage A | coverage B | `k` for A | `k` for B | one `k` for both | p95 error A / B | B's sensor error (sd, lag-1) |",
             "|---|---|---:|---:|---:|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['law']} | `{r['sensor']}` | {r['n']:,} | {pct(r['cover_a'])} | {pct(r['cover_b'])} | "
                     f"{r['k_a'][0]:.2f}-{r['k_a'][1]:.2f} | {r['k_b'][0]:.2f}-{r['k_b'][1]:.2f} | {'yes' if r['meet'] else 'no'} | "
                     f"{pct(r['p95_a'])} / {pct(r['p95_b'])} | {pct(r['b_sd'])}, {r['b_ac']:+.2f} |")
    if boards:
        lines += ["", "## What real boards show", "",
                  "nvidia-smi beside an external meter (JimZeyuYang/GPU_Power_Benchmark, MIT; the shared data folder's `traces/`):",
                  "each power field's white noise about the meter's mean over the 100 ms before each reading, on the ~6 s load",
                  "step's plateau from 2 s in, and its offset from the meter (a calibration error attribution cannot see); last, the",
                  "A100's pulse-to-pulse scatter of one kernel's dynamic energy (76 identical 52 ms pulses, the meter's), with its",
                  "lag-1 autocorrelation in the offset column (a slow drift, not white).", "",
                  "| board | field | readings or pulses | white noise (relative sd) | offset from the meter |", "|---|---|---:|---:|---:|"]
        for b in boards:
            off = f"{b['offset']:+.2f} (lag-1)" if b["field"].startswith("pulse") else f"{b['offset'] * 100:+.2f} %"
            lines.append(f"| {b['board']} | `{b['field']}` | {b['readings']} | {b['noise'] * 100:.2f} % | {off} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    write_results(a, "band_identifiability.md", text)


if __name__ == "__main__":
    main()
