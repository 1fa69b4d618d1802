"""``wattspan attribute`` on a long run: wall time and peak memory against a bare JSONL round trip.

    python benchmarks/cli_scale.py [--requests 200000] [--steps] [--old CHECKOUT] [--out FILE]

Writes a trace CSV (10 ms readings), a requests JSONL (``--requests`` requests, 1,000 a second, each
of 1-500 ms, with route and token counts) and, with ``--steps``, a batches JSONL (25 ms steps one after
another, each holding every request in flight, ~250)
into a temporary folder, then runs, each in its own process, alternating, best of ``--rounds``:

* ``baseline``: the floor of any JSONL-in, JSONL-out tool: ``json.loads`` of every request line and
  ``json.dumps`` of a record of as many fields as wattspan writes, line by line, no attribution;
* ``wattspan attribute`` of this checkout (``python -m wattspan.cli``);
* with ``--old``, the same command from another checkout's ``middleware/`` (before a change).

Peak memory is each process's maximum resident set (``os.wait4``'s ``ru_maxrss``), its interpreter
and imports included. Prints a markdown table; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_BASELINE = r"""
import json, sys
src, dst = sys.argv[1], sys.argv[2]
fields = ["energy_j", "dynamic_j", "idle_j", "device_s", "coverage", "energy_j_low", "energy_j_high", "co2e_g",
          "co2e_g_low", "co2e_g_high", "embodied_g", "intensity_g_per_kwh", "market_g_per_kwh", "co2e_market_g",
          "marginal_g_per_kwh", "co2e_marginal_g"]
with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
    for line in f:
        row = json.loads(line)
        rec = {"id": row["id"], "device": "gpu0", "method": "batch-fit", "sensor": "trace", "simulated": False,
               "quality": "good", "route": row.get("route", ""), "intensity_provider": "table", "intensity_zone": "world",
               "intensity_hour": "", "intensity_basis": "location"}
        rec.update((k, 0.123456789 * len(k)) for k in fields)
        g.write(json.dumps(rec, separators=(",", ":")) + "\n")
"""


def make(folder: Path, n: int, steps: bool, seed: int = 1) -> tuple[Path, Path, Path | None]:
    """Trace, requests and (with ``steps``) batches files for ``n`` requests over ``n / 1000`` seconds."""
    rng = random.Random(seed)
    span_ns = max(n // 1000, 10) * 1_000_000_000
    t = folder / "trace.csv"
    with t.open("w") as f:
        f.write("time_ns,gpu,power_w\n")
        f.writelines(f"{i * 10_000_000},0,{150 + 150 * rng.random():.1f}\n" for i in range(span_ns // 10_000_000 + 1))
    r = folder / "requests.jsonl"
    b = folder / "batches.jsonl" if steps else None
    lives = []
    with r.open("w") as f:
        for k in range(n):
            s = rng.randrange(0, span_ns - 600_000_000)
            e = s + rng.randrange(1_000_000, 500_000_000)
            lives.append((s, e))
            f.write(json.dumps({"id": f"req-{k}", "start_ns": s, "end_ns": e, "gpu": 0, "route": "/v1/chat",
                                "prompt_tokens": 12, "output_tokens": 30}) + "\n")
    if b is not None:  # continuous batching: 25 ms steps one after another, each holding every request in flight
        order = sorted(range(n), key=lambda k: lives[k][0])
        alive: dict[int, bool] = {}  # request -> prefilled yet
        nxt = 0
        with b.open("w") as f:
            for s in range(0, span_ns, 25_000_000):
                e = s + 25_000_000
                while nxt < n and lives[order[nxt]][0] < e:
                    alive[order[nxt]] = False
                    nxt += 1
                for k in [k for k in alive if lives[k][1] <= s]:
                    del alive[k]
                if alive:
                    f.write(json.dumps({"start_ns": s, "end_ns": e, "gpu": 0,
                                        "requests": {f"req-{k}": 1 if done else 12 for k, done in alive.items()}}) + "\n")
                    for k in alive:
                        alive[k] = True
    return t, r, b


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak resident MiB of one process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({p.returncode}): {err[-2000:]}")
    return wall, ru.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--steps", action="store_true", help="also a batches file (25 ms steps, each holding every request in "
                                                         "flight: prefill 12 tokens, then 1 a step): batch-fit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--old", type=Path, default=None, help="another checkout to run beside (its middleware/)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t, r, b = make(d, a.requests, a.steps)
        args = ["attribute", "--trace", str(t), "--requests", str(r), *(["--batches", str(b)] if b else []),
                "--out", str(d / "out.jsonl"), "--summary", str(d / "summary.json")]
        sides: dict[str, tuple[list[str], dict[str, str] | None]] = {
            "baseline (JSONL round trip)": ([sys.executable, "-c", _BASELINE, str(r), str(d / "base.jsonl")], None),
            "wattspan attribute": ([sys.executable, "-m", "wattspan.cli", *args], None),
        }
        if a.old is not None:
            shim = d / "old"
            shim.mkdir()
            (shim / "wattspan").symlink_to((a.old / "middleware").resolve())
            env = dict(os.environ, PYTHONPATH=str(shim))
            sides["wattspan attribute, --old checkout"] = ([sys.executable, "-m", "wattspan.cli", *args], env)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(a.rounds):
            for name, (cmd, env) in sides.items():
                w, m = run(cmd, env)
                bw, bm = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(w, bw), min(m, bm))
    bw, bm = best["baseline (JSONL round trip)"]
    cmdline = "python benchmarks/cli_scale.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{cmdline}` ({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}); "
        f"best of {a.rounds}, each side in its own process, alternating.",
        "",
        f"{a.requests:,} requests{' in 25 ms continuous-batching steps (batch-fit)' if a.steps else ' (time-share)'}, "
        f"{a.requests // 1000} s of 10 ms readings.",
        "",
        "| side | wall s | requests/s | x baseline wall | peak RSS MiB | x baseline RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (w, m) in best.items():
        lines.append(f"| {name} | {w:.2f} | {a.requests / w:,.0f} | {w / bw:.1f}x | {m:,.0f} | {m / bm:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
