"""Records lost when a metered uvicorn server is stopped under load: SIGTERM, SIGINT, kill -9.

    python benchmarks/durability.py [--trials 3] [--seconds 3]

Each trial starts ``tests/durability_app.py`` (the zero-argument middleware, the
ledger from ``WATTSPAN_LEDGER``, the simulated source) under uvicorn, drives 50
concurrent loopback clients, sends the signal after ``--seconds`` while the load
runs, and compares the request ids the clients were answered with against the
ledger. For kill -9 it also reports how long before the kill the oldest lost
request was answered (the window kill -9 can lose). Writes
``benchmarks/results/durability.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_durability import CLIENTS, _ids, _load, _start  # noqa: E402


def trial(sig: int, seconds: float) -> tuple[int, int, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.chmod(tmp, 0o700)
        ledger = tmp / "ledger.sqlite"
        proc, port = _start(tmp, ledger)
        try:
            answered = _load(port, proc, stop_after_s=seconds, sig=sig)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        at = answered.pop("__signal_at__")
        lost = set(answered) - set(_ids(ledger))
        window = max((at - answered[r] for r in lost), default=0.0)
        return len(answered), len(lost), window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, "durability.md")
    args = ap.parse_args()
    rows = []
    for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGINT", signal.SIGINT), ("kill -9", signal.SIGKILL)):
        for t in range(args.trials):
            n, lost, window = trial(sig, args.seconds)
            rows.append((name, t + 1, n, lost, window))
            print(f"{name:8} trial {t + 1}: {n} answered, {lost} not in the ledger, oldest lost answered {window:.2f} s before the signal", flush=True)
    lines = [
        "# Records lost when a metered server is stopped under load",
        "",
        f"Command: `python benchmarks/durability.py --trials {args.trials} --seconds {args.seconds:g}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; shared with other jobs while it ran.",
        f"Setup: uvicorn (1 worker), `EnergyMiddleware()` from `WATTSPAN_*`, the ledger, the simulated source, {CLIENTS} concurrent loopback clients; the signal is sent {args.seconds:g} s into the load.",
        "",
        "| signal | trial | requests answered | not in the ledger | oldest lost, answered before the signal (s) |",
        "|---|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} | {e:.2f} |" for a, b, c, d, e in rows],
        "",
    ]
    write_results(args, "durability.md", "\n".join(lines))


if __name__ == "__main__":
    main()
