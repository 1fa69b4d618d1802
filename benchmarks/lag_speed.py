"""CPU seconds the batch fit's electrical-lag search costs: each case with the search on (the default)
and off, and the lag chosen.

    python benchmarks/lag_speed.py [--batch-requests 1000000] [--duration 60]

Cases: the batch-fit case of ``attribution_speed.py`` (1,000,000 requests, 500,000 steps, 360,000
readings at 10 ms, idle given) and one 60 s simulated server (``wattspan.simulate``, 4 ms lag) read
by ``ideal-1ms`` and by ``average-20ms``. CPU: ``time.process_time`` of one call, best of ``--repeat``,
OMP_NUM_THREADS=1; "lag search": the CPU inside ``_choose_lag`` during the call with the search on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.attribution_speed import make  # noqa: E402
from wattspan import Requests, Steps, attribute  # noqa: E402
from wattspan.attribution import fit as _fit  # noqa: E402
from wattspan.simulate import LAWS, sense, simulate_server  # noqa: E402

_ON = _fit._LAG_READING_NS
_inner = _fit._choose_lag
_spent = [0.0]


def _timed(*args, **kw):
    c0 = time.process_time()
    try:
        return _inner(*args, **kw)
    finally:
        _spent[0] += time.process_time() - c0


_fit._choose_lag = _timed


def cpu(fn, repeat):
    best, lag_s, out = float("inf"), 0.0, None
    for _ in range(repeat):
        _spent[0] = 0.0
        c0 = time.process_time()
        out = fn()
        c = time.process_time() - c0
        if c < best:
            best, lag_s = c, _spent[0]
    return best, lag_s, out


def cases(a):
    trace, req, steps = make(a.batch_requests, a.batch_samples, steps_per_req=2)
    yield f"batch-fit, {len(req):,} requests, {len(steps):,} steps, {len(trace):,} readings at 10 ms", \
        lambda: attribute([trace], req, steps, idle_w=90.0)
    run = simulate_server(seed=0, duration_s=a.duration, power_model=LAWS["saturating"])
    sreq = Requests.from_records(run.requests)
    ssteps = Steps.from_records(run.steps, sreq)
    for sensor in ("ideal-1ms", "average-20ms"):
        tr = sense(run, sensor, seed=100)
        yield f"simulated {a.duration:g} s, `{sensor}`, {len(sreq):,} requests, {len(ssteps):,} steps, {len(tr):,} readings", \
            (lambda tr=tr: attribute([tr], sreq, ssteps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-requests", type=int, default=1_000_000)
    ap.add_argument("--batch-samples", type=int, default=360_000)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print("| case | CPU s, lag search off | CPU s, on | of which the lag search | lag chosen ms |")
    print("|---|---:|---:|---:|---:|")
    for name, fn in cases(a):
        _fit._LAG_READING_NS = -1
        off, _, _ = cpu(fn, a.repeat)
        _fit._LAG_READING_NS = _ON
        on, lag_s, res = cpu(fn, a.repeat)
        taus = [d.model.lag_tau_s * 1e3 for d in res.devices.values() if d.model is not None]
        print(f"| {name} | {off:.3f} | {on:.3f} | {lag_s:.3f} | {', '.join(f'{t:.3g}' for t in taus)} |", flush=True)


if __name__ == "__main__":
    main()
