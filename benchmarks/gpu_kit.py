"""GPU validation kit: run once on a machine with an NVIDIA GPU and commit what it writes.

    python benchmarks/gpu_kit.py [--out benchmarks/results/gpu] [--seconds 6] [--sizes 2048,4096] [--duty 0.25,0.5,0.75]

It needs the NVIDIA driver and ``nvidia-ml-py``; the load needs ``torch`` with CUDA (without
it the kit still probes, records an idle trace and measures the sampler). In order:

1. **Probe** every NVML path wattspan uses (``nvmlDeviceGetTotalEnergyConsumption``, the
   ``NVML_FI_DEV_POWER_INSTANT`` field, the driver's ``nvmlDeviceGetSamples`` buffer,
   ``nvmlDeviceGetPowerUsage``), what :class:`wattspan.sources.NvmlSource` chose, and each
   call's latency (``probes.json``).
2. **Record raw traces** of every path, polled as fast as they answer, while a controlled load
   runs: a CUDA matmul square wave (torch) at several duty cycles and matrix sizes, each ON
   phase a known step (``raw/<path>.csv``: ``time_ns,value``; ``load_steps.jsonl``).
3. **Cross-check** the paths: mean power of each against the energy counter over the run,
   how often each value changes, and each path's lag behind the load's edges (``crosscheck.json``).
4. **Sampler cost**: ``NvmlSource.poll()`` wall time per call (``crosscheck.json``).
5. **Live meter end to end**: a :class:`wattspan.Meter` on the GPU while the load reports each
   ON phase as a batch step of one request per phase: its records (``meter_records.jsonl``),
   and the same run in ``wattspan attribute``'s formats (``trace.csv``, ``requests.jsonl``,
   ``batches.jsonl``) with the energy counter's whole-run total as a check (``summary.md``).

Everything is written under ``--out``. Nothing here runs in CI on a machine without a GPU;
``tests/test_gpu_kit.py`` runs it against the thin NVML fake.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import numpy as np
from wattspan.meter import RecordCallback

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("energy", "field-instant", "samples", "usage")


# --------------------------------------------------------------------------- NVML paths


def _read_path(pynvml, h, path: str, state: dict):
    """One read of ``path``: a list of (time_ns, value) rows (value: J for energy, W else)."""
    if path == "energy":
        return [(time.time_ns(), pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0)]
    if path == "field-instant":
        v = pynvml.nvmlDeviceGetFieldValues(h, [(pynvml.NVML_FI_DEV_POWER_INSTANT, 0)])[0]
        if v.nvmlReturn != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(v.nvmlReturn)
        return [(int(v.timestamp) * 1000, v.value.uiVal / 1000.0)]
    if path == "samples":
        try:
            _, samples = pynvml.nvmlDeviceGetSamples(h, pynvml.NVML_TOTAL_POWER_SAMPLES, state.get("last_us", 0))
        except pynvml.NVMLError as exc:
            if exc.value == pynvml.NVML_ERROR_NOT_FOUND:
                return []
            raise
        rows = [(int(s.timeStamp) * 1000, s.sampleValue.uiVal / 1000.0) for s in samples]
        if rows:
            state["last_us"] = max(int(s.timeStamp) for s in samples)
        return rows
    if path == "usage":
        return [(time.time_ns(), pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0)]
    raise ValueError(path)


def probe(pynvml, h, calls: int = 200) -> dict:
    """Each path: ``ok`` or why not, and its median call latency in microseconds."""
    out = {}
    for path in PATHS:
        state: dict = {}
        try:
            _read_path(pynvml, h, path, state)
        except Exception as exc:  # noqa: BLE001 - the kit reports every failure
            out[path] = {"status": f"{type(exc).__name__}: {exc}"}
            continue
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            try:
                _read_path(pynvml, h, path, state)
            except Exception:  # noqa: BLE001
                pass
            lat.append(time.perf_counter_ns() - t0)
        out[path] = {"status": "ok", "latency_us_median": float(np.median(lat)) / 1e3, "latency_us_p99": float(np.quantile(lat, 0.99)) / 1e3}
    return out


class Recorder(threading.Thread):
    """Polls every working path in a loop (``interval_s`` apart) into per-path row lists."""

    def __init__(self, pynvml, h, paths, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.pynvml, self.h, self.paths, self.interval_s = pynvml, h, list(paths), interval_s
        self.rows = {p: [] for p in self.paths}
        self.errors = {p: 0 for p in self.paths}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        state = {p: {} for p in self.paths}
        while not self._stop_evt.is_set():
            for p in self.paths:
                try:
                    self.rows[p].extend(_read_path(self.pynvml, self.h, p, state[p]))
                except Exception:  # noqa: BLE001
                    self.errors[p] += 1
            self._stop_evt.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5.0)


# --------------------------------------------------------------------------- load


def torch_load():
    """A function ``(size, on_s) -> None`` running matmuls for ``on_s`` seconds on CUDA, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cache: dict = {}

    def run(size: int, on_s: float) -> None:
        if size not in cache:
            cache[size] = (torch.randn(size, size, device="cuda", dtype=torch.float16),
                           torch.randn(size, size, device="cuda", dtype=torch.float16))
        a, b = cache[size]
        end = time.perf_counter() + on_s
        while time.perf_counter() < end:
            for _ in range(4):
                a @ b
            torch.cuda.synchronize()

    return run


def sleep_load(size: int, on_s: float) -> None:
    """No GPU work (for the fake and for machines without torch): the timing only."""
    time.sleep(on_s)


def square_wave(load, sizes, duties, seconds: float, period_s: float, on_step) -> list[dict]:
    """Run ``load`` as a square wave, each (size, duty) for ``seconds``; ``on_step(start_ns, end_ns, label)``
    is told each ON phase (monotonic ns). Returns the phases as dicts."""
    out = []
    k = 0
    for size in sizes:
        for duty in duties:
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                a_mono, a_wall = time.monotonic_ns(), time.time_ns()
                load(size, period_s * duty)
                b_mono, b_wall = time.monotonic_ns(), time.time_ns()
                label = f"step-{k:05d}"
                on_step(a_mono, b_mono, label)
                out.append({"id": label, "size": size, "duty": duty, "start_ns": a_mono, "end_ns": b_mono,
                            "start_wall_ns": a_wall, "end_wall_ns": b_wall})
                k += 1
                time.sleep(max(0.0, period_s * (1 - duty)))
            time.sleep(0.5)  # a gap between settings
    return out


# --------------------------------------------------------------------------- analysis


def crosscheck(rows: dict, steps: list[dict]) -> dict:
    """Per path: mean power over the run against the energy counter's, how often its value
    changes (ms), and its lag (ms) behind the load's ON edges (where there are edges)."""
    out: dict = {}
    e = np.array(rows.get("energy", []), dtype=np.float64).reshape(-1, 2)
    ref_w = None
    if len(e) > 2 and e[-1, 0] > e[0, 0]:
        ref_w = (e[-1, 1] - e[0, 1]) / ((e[-1, 0] - e[0, 0]) * 1e-9)
        out["energy"] = {"mean_w": ref_w}
    edges = np.array([s["start_wall_ns"] for s in steps], dtype=np.float64)
    for path in ("field-instant", "samples", "usage"):
        r = np.array(rows.get(path, []), dtype=np.float64).reshape(-1, 2)
        if len(r) < 3:
            continue
        r = r[np.argsort(r[:, 0], kind="stable")]
        d: dict = {"readings": int(len(r)), "mean_w": float(r[:, 1].mean())}
        if ref_w:
            d["vs_energy_counter"] = float(r[:, 1].mean() / ref_w - 1)
        ch = np.flatnonzero(np.diff(r[:, 1]) != 0) + 1
        if len(ch) > 2:
            d["value_changes_every_ms"] = float(np.median(np.diff(r[ch, 0]))) / 1e6
        if len(edges) >= 3 and np.ptp(r[:, 1]) > 0:
            # lag: the shift of the load's square wave that best matches the readings
            lo, hi = r[0, 0], r[-1, 0]
            ons = np.array([[s["start_wall_ns"], s["end_wall_ns"]] for s in steps], dtype=np.float64)

            def wave(t):
                k = np.searchsorted(ons[:, 0], t, side="right") - 1
                return np.where((k >= 0) & (t < ons[np.maximum(k, 0), 1]), 1.0, 0.0)

            lags = np.arange(0, 300, 2) * 1e6
            score = [np.corrcoef(wave(r[:, 0] - lag), r[:, 1])[0, 1] if np.std(wave(r[:, 0] - lag)) > 0 else -1 for lag in lags]
            d["lag_ms"] = float(lags[int(np.nanargmax(score))] / 1e6)
            d["lag_corr"] = float(np.nanmax(score))
            del lo, hi
        out[path] = d
    return out


def sampler_cost(source, polls: int = 500) -> dict:
    t = []
    for _ in range(polls):
        t0 = time.perf_counter_ns()
        source.poll()
        t.append(time.perf_counter_ns() - t0)
    return {"poll_us_median": float(np.median(t)) / 1e3, "poll_us_p99": float(np.quantile(t, 0.99)) / 1e3, "polls": polls}


# --------------------------------------------------------------------------- main


def run_kit(out: Path, *, seconds: float = 6.0, sizes=(2048, 4096), duties=(0.25, 0.5, 0.75), period_s: float = 0.1,
            load=None, index: int = 0) -> dict:
    """Run the whole kit on GPU ``index``; returns the summary dict (also written to ``out``)."""
    import pynvml

    from wattspan import Meter
    from wattspan.sources.nvml import NvmlSource

    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        probes = probe(pynvml, h)
        src = NvmlSource(indices=[index])
        info = src.devices()[0]
        summary: dict = {"gpu": str(name), "host": platform.node(), "python": platform.python_version(),
                         "nvml_source": {"sensor": info.sensor, "power_kind": str(info.power_kind.value),
                                         "window_ns": info.window_ns, "probes": info.extra.get("probes")},
                         "probes": probes}
        if load is None:
            load = torch_load()
            summary["load"] = "torch matmul square wave" if load is not None else "none (no torch with CUDA): timing only"
            load = load or sleep_load
        else:
            summary["load"] = getattr(load, "__name__", "given")
        summary["sampler"] = sampler_cost(src)
        src.close()

        ok_paths = [p for p, v in probes.items() if v.get("status") == "ok"]
        rec = Recorder(pynvml, h, ok_paths)
        records: list = []
        meter = Meter(sources=[NvmlSource(indices=[index])], sinks=[RecordCallback(records.append)], period_s=0.25, autostart=True)
        meter.wait_ready(30.0)
        dev = meter.sampler.devices()[0].id

        def on_step(a, b, label):
            meter.begin(label, dev, a)
            meter.record_step(a, b, dev, {label: 1})
            meter.end(label, dev, b, {"route": "/gpu-kit", "model": "matmul-square-wave"})

        rec.start()
        t0 = time.monotonic_ns()
        steps = square_wave(load, sizes, duties, seconds, period_s, on_step)
        t1 = time.monotonic_ns()
        time.sleep(0.5)
        rec.stop()
        meter.flush(30.0)
        trace = meter.sampler.trace(dev, since_ns=t0 - 10**9)
        stats = meter.stats()
        meter.close()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass

    for p, rows in rec.rows.items():
        (out / "raw" / f"{p}.csv").write_text("time_ns,value\n" + "".join(f"{t},{v:.6f}\n" for t, v in rows))
    (out / "load_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (out / "meter_records.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    # the same run in `wattspan attribute`'s formats
    cols = ["time_ns", "gpu", "power_w"] + (["energy_j"] if trace.energy_j is not None else [])
    lines = []
    for i in range(len(trace)):
        cells = [str(int(trace.t_ns[i])), "0", "" if trace.power_w is None or np.isnan(trace.power_w[i]) else f"{trace.power_w[i]:.3f}"]
        if trace.energy_j is not None:
            cells.append("" if np.isnan(trace.energy_j[i]) else f"{trace.energy_j[i]:.6f}")
        lines.append(",".join(cells))
    (out / "trace.csv").write_text(",".join(cols) + "\n" + "\n".join(lines) + "\n")
    (out / "requests.jsonl").write_text("".join(json.dumps({"id": s["id"], "start_ns": s["start_ns"], "end_ns": s["end_ns"], "gpu": "0",
                                                           "route": "/gpu-kit"}) + "\n" for s in steps))
    (out / "batches.jsonl").write_text("".join(json.dumps({"start_ns": s["start_ns"], "end_ns": s["end_ns"], "gpu": "0",
                                                          "requests": {s["id"]: 1}}) + "\n" for s in steps))
    summary["crosscheck"] = crosscheck(rec.rows, steps)
    summary["read_errors"] = rec.errors
    summary["run_s"] = (t1 - t0) / 1e9
    summary["steps"] = len(steps)
    summary["meter"] = {"records": len(records), "attributed_j": float(sum(r.energy_j for r in records)),
                        "unattributed_j": float(stats.get("unattributed_j", float("nan"))) if isinstance(stats, dict) else None,
                        "quality": sorted({r.quality for r in records})}
    e = np.array(rec.rows.get("energy", []), dtype=np.float64).reshape(-1, 2)
    if len(e) > 1:
        summary["energy_counter_j"] = float(e[-1, 1] - e[0, 1])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    md = [f"# GPU validation kit: {summary['gpu']}", "",
          f"Command: `python benchmarks/gpu_kit.py --seconds {seconds:g}` on {summary['host']}; load: {summary['load']}.", "",
          "| NVML path | status | call latency median us |", "|---|---|---:|"]
    for p, v in probes.items():
        md.append(f"| {p} | {v['status']} | {v.get('latency_us_median', float('nan')):.1f} |")
    md += ["", f"NvmlSource chose `{info.sensor}`; `poll()` costs {summary['sampler']['poll_us_median']:.1f} us (median).", "",
           "| path | readings | mean W | vs energy counter | value changes every ms | lag behind load ms |", "|---|---:|---:|---:|---:|---:|"]
    for p, v in summary["crosscheck"].items():
        if p == "energy":
            continue
        md.append(f"| {p} | {v['readings']} | {v['mean_w']:.1f} | {v.get('vs_energy_counter', float('nan')) * 100:+.1f} % | "
                  f"{v.get('value_changes_every_ms', float('nan')):.0f} | {v.get('lag_ms', float('nan')):.0f} |")
    md += ["", f"Live meter: {len(records)} records of {len(steps)} load steps, {summary['meter']['attributed_j']:.1f} J attributed;"
               f" energy counter over the run: {summary.get('energy_counter_j', float('nan')):.1f} J.",
           "Re-run the attribution offline: `wattspan attribute --trace trace.csv --requests requests.jsonl --batches batches.jsonl`."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per (size, duty) setting")
    ap.add_argument("--sizes", default="2048,4096", help="matmul sizes, comma-separated")
    ap.add_argument("--duty", default="0.25,0.5,0.75", help="duty cycles of the 100 ms square wave")
    ap.add_argument("--index", type=int, default=0, help="NVML index of the GPU")
    a = ap.parse_args(argv)
    s = run_kit(a.out, seconds=a.seconds, sizes=[int(x) for x in a.sizes.split(",")],
                duties=[float(x) for x in a.duty.split(",")], index=a.index)
    print((a.out / "summary.md").read_text())
    return 0 if s["steps"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
