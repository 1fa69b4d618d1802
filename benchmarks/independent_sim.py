"""A second continuous-batching simulator, written apart from ``wattspan.simulate``.

    python benchmarks/independent_sim.py OUTDIR --law sqrt --sensor avg20 --seed 1

``benchmarks/accuracy.py`` checks attribution on ``wattspan.simulate``, whose power laws
were written beside the fit and share its ideas of what a step costs. This one imports
nothing from wattspan and shares no code with it: its own scheduler, its own power laws,
its own electrical lag and sensors. What it has in common with wattspan is only the file
formats (``wattspan attribute``'s trace CSV, requests JSONL and batches JSONL, as the
README documents them) and the convention that defines a request's true energy (the
README's): a batch step's dynamic energy, all it makes the board draw (its power over its
own time: the electrical lag moves when it is drawn, not whose it is), is split among the
requests in it by their tokens in it; the power drawn outside any step while requests are
in flight, and the idle baseline at every instant, are split equally among the requests in
flight. ``--truth windowed`` scores the convention wattspan had before: a step's energy is
what the board draws inside its window, so a lagged step's tail is the next step's or the
wait's.

Scheduler: Poisson arrivals; prompts and outputs lognormal; each step decodes one token
for every running request and fills the rest of a 1,024-token budget with prefill chunks
(first come, first served; at most 48 running); a step lasts
``6 ms + 0.03 ms x prefill tokens + 0.05 ms x decoding requests + 3e-5 ms x context
tokens``, +-3 % jitter; host gaps of 0.2-2.5 ms between steps.

Power laws (``LAWS``), the dynamic power a step draws over its duration, capped at 420 W:

* ``roofline``: 320 W x compute utilisation + 140 W x memory-bandwidth utilisation, each
  saturating at 1 (tokens x FLOP against the step's time; weights + KV cache read);
* ``fixedstep``: the step's *energy* is a fixed 0.35 J plus 0.9 mJ per prefill token, 4 mJ
  per decoding request and 2 uJ per context token, spread evenly over the step;
* ``sqrt``: 40 W + 18 W x sqrt(prefill tokens + 4 x decoding requests): power grows with
  the square root of the work in the step.

Each scenario (drawn from the seed): an electrical first-order lag of 0, 3 or 6 ms on the
dynamic power; the idle baseline (65-80 W) drifting by 0, 3 or 6 W (a sine of 20-60 s
period); 0-30 W drawn between steps while requests are in flight; 3-7 arrivals per second.

Sensors (``SENSORS``): ``inst1`` the true power every 1 ms; ``avg20`` 20 ms averages with 2 %
noise; ``counter100`` an energy counter refreshed every 90-110 ms (1 mJ steps) read every
100 ms, with the 100 ms average power beside it; ``avg1s`` 1 s averages (1 % noise) with a
counter read each second; ``inst100`` every 100 ms the average of a random 25 ms of the
last 100 ms (1 % noise).

Writes ``trace.csv``, ``requests.jsonl``, ``batches.jsonl``, ``truth.json`` (per request:
``energy_j``, ``dynamic_j``, ``idle_j``) and ``scenario.json`` into OUTDIR. Everything here
is simulated.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

LAWS = ("roofline", "fixedstep", "sqrt")
SENSORS = ("inst1", "avg20", "counter100", "avg1s", "inst100")
#: how ``wattspan attribute`` is told what each sensor's ``power_w`` is
POWER_ARGS = {
    "inst1": [],
    "avg20": ["--power-kind", "average", "--power-window-s", "0.02"],
    "counter100": ["--power-kind", "average", "--power-window-s", "0.1"],
    "avg1s": ["--power-kind", "average", "--power-window-s", "1"],
    "inst100": [],
}
GRID_S = 1e-4  # the simulation's time step (s)
CAP_W = 420.0
T0_NS = 10**12  # the files' clock starts here


def _schedule(rng: np.random.Generator, duration_s: float, rate: float):
    arr = np.cumsum(rng.exponential(1 / rate, int(rate * duration_s * 2) + 10)) + 0.5
    arr = arr[arr < duration_s - 8]
    n = len(arr)
    prompt = np.clip(rng.lognormal(math.log(350), 0.9, n), 16, 3000).astype(int)
    output = np.clip(rng.lognormal(math.log(100), 0.8, n), 4, 500).astype(int)
    pre_left, out_left, ctx = prompt.copy(), output.copy(), np.zeros(n, dtype=int)
    start, end = np.full(n, np.nan), np.full(n, np.nan)
    waiting, running = list(range(n)), []
    steps = []  # (start_s, end_s, {request: tokens}, prefill tokens, decoding requests, context tokens)
    t = 0.0
    while waiting or running:
        ready = [i for i in waiting if arr[i] <= t]
        if not running and not ready:
            t = max(t, min(arr[i] for i in waiting))
            continue
        comp: dict[int, int] = {}
        budget = 1024
        for i in running:
            if pre_left[i] == 0:
                comp[i] = 1
                budget -= 1
        for i in running + ready:
            if budget <= 0:
                break
            if i in comp or pre_left[i] == 0:
                continue
            if i in ready:
                if len(running) >= 48:
                    continue
                running.append(i)
                waiting.remove(i)
                start[i] = arr[i]
            c = int(min(pre_left[i], budget))
            comp[i] = c
            budget -= c
        npre = sum(c for i, c in comp.items() if pre_left[i] > 0)
        ndec = sum(1 for i in comp if pre_left[i] == 0)
        nctx = int(sum(ctx[i] for i in comp))
        d = (6.0 + 0.03 * npre + 0.05 * ndec + 3e-5 * nctx) * 1e-3 * (1 + rng.normal(0, 0.03))
        steps.append((t, t + d, dict(comp), npre, ndec, nctx))
        t += d
        for i, c in comp.items():
            if pre_left[i] > 0:
                pre_left[i] -= c
                ctx[i] += c
                if pre_left[i] == 0:  # the first token comes with the last chunk
                    out_left[i] -= 1
                    ctx[i] += 1
            else:
                out_left[i] -= 1
                ctx[i] += 1
            if pre_left[i] == 0 and out_left[i] <= 0:
                end[i] = t + rng.uniform(0.5e-3, 2e-3)
                running.remove(i)
        t += float(np.clip(rng.lognormal(math.log(0.7e-3), 0.5), 0.2e-3, 2.5e-3))
    return start, end, prompt, output, steps


def _step_power(law: str, d: float, npre: int, ndec: int, nctx: int) -> float:
    if law == "roofline":
        compute = min(1.0, (npre + ndec) * 2.2e-5 / d)
        memory = min(1.0, (16e9 + 1.3e5 * nctx) / d / 3.3e12)
        p = 320.0 * compute + 140.0 * memory
    elif law == "fixedstep":
        p = (0.35 + 0.0009 * npre + 0.004 * ndec + 2e-6 * nctx) / d
    elif law == "sqrt":
        p = 40.0 + 18.0 * math.sqrt(npre + 4 * ndec)
    else:
        raise ValueError(f"unknown law {law!r}; known: {', '.join(LAWS)}")
    return min(p, CAP_W)


def simulate(out: str | Path, *, law: str, sensor: str, seed: int, duration_s: float = 40.0, truth: str = "causal") -> dict:
    """Simulate one run and write its files into ``out``; returns the scenario. ``truth``: ``causal``
    (the README's convention: a step's energy is all it makes the board draw, its tail included: the
    target power's integral, which a first-order lag keeps) or ``windowed`` (what the board draws
    inside the step's window, so a lagged step's tail is the next step's or the wait's)."""
    if truth not in ("windowed", "causal"):
        raise ValueError(f"truth must be windowed or causal, got {truth!r}")
    if sensor not in SENSORS:
        raise ValueError(f"unknown sensor {sensor!r}; known: {', '.join(SENSORS)}")
    rng = np.random.default_rng(seed)
    sc = {"law": law, "sensor": sensor, "seed": seed, "truth": truth, "lag_ms": float(rng.choice([0.0, 3.0, 6.0])),
          "idle_w": float(rng.uniform(65, 80)), "drift_w": float(rng.choice([0.0, 3.0, 6.0])),
          "drift_period_s": float(rng.uniform(20, 60)), "gap_w": float(rng.uniform(0, 30)), "rate_per_s": float(rng.uniform(3, 7))}
    start, end, prompt, output, steps = _schedule(rng, duration_s, sc["rate_per_s"])
    done = ~np.isnan(end)
    T = float(max(end[done].max(), steps[-1][1])) + 1.0
    g = np.arange(0.0, T, GRID_S)
    m = len(g)
    cell = lambda s: min(m, int(round(s / GRID_S)))  # noqa: E731
    idle = sc["idle_w"] + sc["drift_w"] * np.sin(2 * math.pi * g / sc["drift_period_s"] + rng.uniform(0, 2 * math.pi))
    target = np.zeros(m)
    busy = np.zeros(m, dtype=bool)
    for a, b, _comp, npre, ndec, nctx in steps:
        ia, ib = cell(a), cell(b)
        target[ia:ib] = _step_power(law, b - a, npre, ndec, nctx)
        busy[ia:ib] = True
    inflight = np.zeros(m + 1, dtype=np.int64)
    for i in np.flatnonzero(done):
        inflight[cell(start[i])] += 1
        inflight[cell(end[i])] -= 1
    inflight = np.cumsum(inflight)[:m]
    target[~busy & (inflight > 0)] = sc["gap_w"]
    if sc["lag_ms"] > 0:  # first order: dP/dt = (target - P) / tau, exact for a piecewise-constant target
        k = math.exp(-GRID_S / (sc["lag_ms"] * 1e-3))
        dyn = np.empty(m)
        y = 0.0
        for j in range(m):
            y = target[j] + (y - target[j]) * k
            dyn[j] = y
    else:
        dyn = target
    power = idle + dyn
    cum = np.concatenate(([0.0], np.cumsum(power) * GRID_S))

    # the truth, by the convention in the module docstring
    n = len(start)
    dyn_j, idle_j = np.zeros(n), np.zeros(n)
    drawn = dyn if truth == "windowed" else target  # causal: each step's and wait's own power, before the lag
    cum_dyn = np.concatenate(([0.0], np.cumsum(drawn) * GRID_S))
    for a, b, comp, *_ in steps:
        e = cum_dyn[cell(b)] - cum_dyn[cell(a)]
        tot = sum(comp.values())
        for i, c in comp.items():
            dyn_j[i] += e * c / tot
    share = np.where(inflight > 0, 1.0 / np.maximum(inflight, 1), 0.0)
    c_idle = np.concatenate(([0.0], np.cumsum(idle * share) * GRID_S))
    c_gap = np.concatenate(([0.0], np.cumsum(np.where(busy, 0.0, drawn) * share) * GRID_S))
    for i in np.flatnonzero(done):
        a, b = cell(start[i]), cell(end[i])
        idle_j[i] = c_idle[b] - c_idle[a]
        dyn_j[i] += c_gap[b] - c_gap[a]

    def avg(t0: float, t1: float) -> float:
        a, b = cell(t0), cell(t1)
        return float((cum[b] - cum[a]) / (max(b - a, 1) * GRID_S))

    rows: list[tuple[float, float, float | None]] = []
    if sensor == "inst1":
        rows = [(t, float(power[cell(t)]), None) for t in np.arange(0.001, T - 0.001, 0.001)]
    elif sensor == "avg20":
        rows = [(t, avg(t - 0.02, t) * (1 + rng.normal(0, 0.02)), None) for t in np.arange(0.02, T, 0.02)]
    elif sensor == "counter100":
        refresh = np.cumsum(rng.uniform(0.09, 0.11, int(T / 0.09) + 2))
        for t in np.arange(0.1, T, 0.1):
            k = np.searchsorted(refresh, t, side="right")
            last = refresh[k - 1] if k else 0.0
            rows.append((t, avg(t - 0.1, t), math.floor(cum[cell(last)] * 1000) / 1000))
    elif sensor == "avg1s":
        rows = [(t, avg(t - 1.0, t) * (1 + rng.normal(0, 0.01)), math.floor(cum[cell(t)] * 1000) / 1000)
                for t in np.arange(1.0, T, 1.0)]
    elif sensor == "inst100":
        for t in np.arange(0.1, T, 0.1):
            w0 = t - 0.1 + rng.uniform(0, 0.075)
            rows.append((t, avg(w0, w0 + 0.025) * (1 + rng.normal(0, 0.01)), None))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counter = rows[0][2] is not None
    with open(out / "trace.csv", "w") as f:
        f.write("time_ns,gpu,power_w" + (",energy_j" if counter else "") + "\n")
        for t, p, e in rows:
            f.write(f"{T0_NS + int(round(t * 1e9))},gpu0,{p:.3f}" + (f",{e:.3f}" if counter else "") + "\n")
    with open(out / "requests.jsonl", "w") as f:
        for i in np.flatnonzero(done):
            f.write(json.dumps({"id": f"r{i}", "start_ns": T0_NS + int(round(start[i] * 1e9)),
                                "end_ns": T0_NS + int(round(end[i] * 1e9)), "gpu": "gpu0",
                                "prompt_tokens": int(prompt[i]), "output_tokens": int(output[i])}) + "\n")
    with open(out / "batches.jsonl", "w") as f:
        for a, b, comp, *_ in steps:
            f.write(json.dumps({"start_ns": T0_NS + int(round(a * 1e9)), "end_ns": T0_NS + int(round(b * 1e9)), "gpu": "gpu0",
                                "requests": {f"r{i}": int(c) for i, c in comp.items()}}) + "\n")
    truth = {f"r{i}": {"energy_j": float(dyn_j[i] + idle_j[i]), "dynamic_j": float(dyn_j[i]), "idle_j": float(idle_j[i])}
             for i in np.flatnonzero(done)}
    (out / "truth.json").write_text(json.dumps(truth))
    sc.update(requests=int(done.sum()), steps=len(steps), measured_j=float(cum[-1]))
    (out / "scenario.json").write_text(json.dumps(sc))
    return sc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--law", choices=LAWS, default="sqrt")
    ap.add_argument("--sensor", choices=SENSORS, default="avg20")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals (plus the drain)")
    ap.add_argument("--truth", choices=("windowed", "causal"), default="causal", help="how a lagged step's tail counts (see simulate)")
    a = ap.parse_args()
    print(json.dumps(simulate(a.out, law=a.law, sensor=a.sensor, seed=a.seed, duration_s=a.duration, truth=a.truth)))


if __name__ == "__main__":
    main()
