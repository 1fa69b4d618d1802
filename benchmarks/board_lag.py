"""The electrical lag of real GPU boards, from external-meter recordings (the input of ``attribute(..., board_lag_s=...)``).

    python benchmarks/board_lag.py [--data ../shared/data] [--record]

A board's power follows its load with a lag: the fit models it as a first-order time constant
(``StepModel.lag_tau_s``) where readings are 50 ms apart or closer, and takes it as given
(``attribute(..., board_lag_s=...)``, ``wattspan attribute --board-lag-ms``) where they are coarser. It is a
property of the board, so it is measured once, on fine readings of one such GPU under a load
with known steps. Here: the GPU_Power_Benchmark recordings in the shared data (an ElmorLabs PMD
meter on the PCIe slot and cables, a reading every ~0.205 ms; ``SOURCES.md``), a square-wave
matmul load on an A100 PCIe (76 pulses of ~52 ms) and a 6 s load step on an A100 PCIe, an RTX
A5000 and a K40m. Per board: the 10-90 % rise and fall time of the meter's power over each load
edge (a first-order lag rises 10-90 % in 2.2 time constants), and for the pulsed A100 the lag the
fit itself finds on the meter's readings with the pulses as batch steps (``examples/a100``'s
steps), as a user would run it (``wattspan attribute --trace meter.csv ... --summary s.json``,
the summary's ``lag_tau_s``); 0 where it finds none (its search starts at 0.25 ms). Last, which part of
the time before it an A100 ``power.draw.instant`` value covers (:func:`instant_window`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = (("A100 PCIe", "5050_A100", "76 pulses of ~52 ms"), ("A100 PCIe", "Transient_Response_A100_TR", "one 6 s step"),
              ("RTX A5000", "Transient_Response_A5000_TR", "one 6 s step"), ("K40m", "Transient_Response_K40m_TR", "one 6 s step"))


def _edges_10_90(t: np.ndarray, p: np.ndarray, edges: np.ndarray) -> list[float]:
    """Per load edge (ms), the time from the meter's last reading under 10 % of the step to its first over 90 %."""
    out = []
    for e in edges:
        before = p[(t >= e - 20) & (t < e - 2)]
        after = p[(t >= e + 10) & (t < e + 30)]
        if not len(before) or not len(after) or abs(after.mean() - before.mean()) < 5:
            continue
        w = (t >= e - 5) & (t < e + 10)
        tt, x = t[w], (p[w] - before.mean()) / (after.mean() - before.mean())
        hi = np.flatnonzero(x >= 0.9)
        lo = np.flatnonzero(x[: hi[0]] < 0.1) if len(hi) else np.zeros(0, dtype=np.int64)
        if len(lo):
            out.append(float(tt[hi[0]] - tt[lo[-1]]))
    return out


def fit_lag(data: Path) -> float:
    """The lag (s) the fit finds on the pulsed A100's meter readings, the pulses as batch steps."""
    from wattspan import DeviceTrace, attribute
    from wattspan.attribution.jsonl import read_batches_jsonl, read_requests_jsonl
    from wattspan.samples import SampleKind

    d = np.genfromtxt(data / "traces" / "GPU_Power_Benchmark_5050_A100_PMD_data.csv", delimiter=",", names=True)
    trace = DeviceTrace(device="gpu0", t_ns=(d["timestamp_unix_ms"] * 1e6).astype(np.int64), power_w=d["total_p_w"].astype(float),
                        power_kind=SampleKind.INSTANT, sensor="PMD")
    req, _ = read_requests_jsonl(ROOT / "examples" / "a100" / "requests.jsonl")
    steps = read_batches_jsonl(ROOT / "examples" / "a100" / "batches.jsonl", req)
    m = attribute({"gpu0": trace}, req, steps).devices["gpu0"].model
    return float(m.lag_tau_s) if m is not None else 0.0


def instant_window(data: Path) -> list[tuple[str, float]]:
    """Which part of the time before it an A100 ``power.draw.instant`` value covers: each fresh value of the pulsed
    A100's nvidia-smi trace (``examples/a100``, polled every ~13 ms) against the meter's mean power over a window
    before the read that first saw it. ``(window, rms W)`` (the readings' spread about the meter's means, their common
    offset removed: the meter sits at the board's inputs), for the 25 ms and the 100 ms before the read and the best
    window and place over a grid (10-100 ms long, ending 20 ms before to 60 ms after the read: the two clocks' alignment
    is the recording's own)."""
    from wattspan.sources.replay import read_trace_csv

    tr = next(iter(read_trace_csv(ROOT / "examples" / "a100" / "trace.csv").values()))
    assert tr.power_w is not None
    t, v = tr.t_ns / 1e6, tr.power_w
    d = np.genfromtxt(data / "traces" / "GPU_Power_Benchmark_5050_A100_PMD_data.csv", delimiter=",", names=True)
    pt, pp = d["timestamp_unix_ms"], d["total_p_w"]
    cum = np.concatenate(([0.0], np.cumsum(pp[:-1] * np.diff(pt))))
    fresh = np.concatenate(([True], np.diff(v) != 0))
    tc, vc = t[fresh], v[fresh]
    keep = (tc > pt[0] + 300) & (tc < pt[-1] - 10)
    tc, vc = tc[keep], vc[keep]

    def rms(w: float, end: float) -> float:
        m = (np.interp(tc - end, pt, cum) - np.interp(tc - end - w, pt, cum)) / w
        r = vc - m
        return float(np.sqrt(np.mean((r - r.mean()) ** 2)))

    best = min((rms(w, e), w, e) for w in (10, 15, 20, 25, 30, 40, 50, 75, 100) for e in np.arange(-60, 21, 1.0))
    return [(f"the 25 ms before the read ({len(tc)} values)", rms(25, 0)), ("the 100 ms before the read (how the fit takes it)", rms(100, 0)),
            (f"best: {best[1]:g} ms ending {-best[2]:+g} ms from the read", best[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder (holds traces/)")
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import add_output_args, write_results

    add_output_args(ap, "board_lag.md")
    a = ap.parse_args()
    rows = []
    for board, name, load in RECORDINGS:
        d = np.genfromtxt(a.data / "traces" / f"GPU_Power_Benchmark_{name}_PMD_data.csv", delimiter=",", names=True)
        marks = np.unique(np.genfromtxt(a.data / "traces" / f"GPU_Power_Benchmark_{name}_timestamps.csv", delimiter=",", skip_header=1)) / 1e3
        marks = marks[:-1]  # the last mark ends the run
        t, p = d["timestamp_unix_ms"], d["total_p_w"]
        up, down = _edges_10_90(t, p, marks[0::2]), _edges_10_90(t, p, marks[1::2])
        rows.append((board, load, float(np.median(np.diff(t))), up, down))
    lag = fit_lag(a.data)
    windows = instant_window(a.data)
    f = lambda v: f"{np.median(v):.2f} ms ({len(v)})" if v else "-"  # noqa: E731
    lines = ["# The electrical lag of real GPU boards (external meter)", "",
             "Command: `python benchmarks/board_lag.py` (the shared GPU_Power_Benchmark recordings: an ElmorLabs PMD meter",
             "on the PCIe slot and cables). Median 10-90 % rise and fall time of the board's power over the load's edges",
             "(edges measured); a first-order lag of time constant tau takes 2.2 tau. A time of one meter interval is as fast as",
             "the meter can show: the lag is under that.", "",
             "| board | load | meter reading every | 10-90 % rise (edges) | 10-90 % fall (edges) |", "|---|---|---:|---:|---:|"]
    for board, load, dt, up, down in rows:
        lines.append(f"| {board} | {load} | {dt:.3f} ms | {f(up)} | {f(down)} |")
    lines += ["", f"The fit's own lag on the pulsed A100's meter readings, the pulses as batch steps: {lag * 1e3:.2g} ms"
              + (" (none found: its search starts at 0.25 ms)." if lag == 0 else "."), "",
              "So these boards follow a load within a fraction of a millisecond at their power inputs: give them",
              "`board_lag_s=0.00025` (`--board-lag-ms 0.25`) or 0, not the simulator's 2 to 8 ms.", "",
              "## What an A100 `power.draw.instant` value covers", "",
              "Each fresh value of the pulsed A100's nvidia-smi trace (`examples/a100`, read every ~13 ms, a new value every",
              "~100 ms) against the meter's mean power over a window before the read that first saw it: the readings' rms",
              "spread about those means (their common offset removed). A value covering a random 25 ms of its 100 ms would",
              "match no fixed window; these match the last few tens of ms before they were read.", "",
              "| window | rms W |", "|---|---:|"]
    lines += [f"| {w} | {r:.1f} |" for w, r in windows]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(a, "board_lag.md", text)


if __name__ == "__main__":
    main()
