"""The real A100 PCIe recording: loaders, wattspan example files, and how wrong naive integration is.

The recording (JimZeyuYang/GPU_Power_Benchmark, MIT; see ``SOURCES.md`` beside the data)
switches a synthetic CUDA load on and off as a square wave (~52 ms on, ~52 ms off) while
``nvidia-smi`` polls ``power.draw.instant`` every ~13 ms and an external ElmorLabs PMD meter
samples the card's total power (PCIe slot + cables) every ~0.2 ms.

    python benchmarks/a100.py --data ../shared/data --out examples/a100

loads the 5050 recording, writes ``examples/a100/`` in wattspan's file formats (one
"request" per ON pulse) and prints how far naive integration of the nvidia-smi readings over
each pulse is from the metered pulse energy. "Pulse energy" is the external meter's total
energy (idle included) over the pulse's ``[on, off)`` interval: the integral of the
linearly interpolated PMD ``total_p_w`` samples. Naive integration is the same integral of
the linearly interpolated ``power.draw.instant`` readings.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattspan import DeviceTrace, SampleKind

__all__ = ["A100Run", "RECORDINGS", "STEP_RECORDINGS", "REFRESH_RECORDINGS", "Recording", "load_a100", "load_recording",
           "naive_pulse_errors", "piecewise_linear_energy_j", "refresh_period_ms", "write_a100_example"]

#: File-name prefixes of the recordings that have nvidia-smi data, meter data and load timing.
RECORDINGS = {
    "5050": "GPU_Power_Benchmark_5050_A100_",
    "transient": "GPU_Power_Benchmark_Transient_Response_A100_TR_",
}
#: Step-response recordings of other GPUs beside the same external meter: one ~6 s load step.
STEP_RECORDINGS = {
    "A100 PCIe": "GPU_Power_Benchmark_Transient_Response_A100_TR_",
    "RTX A5000": "GPU_Power_Benchmark_Transient_Response_A5000_TR_",
    "Tesla K40m": "GPU_Power_Benchmark_Transient_Response_K40m_TR_",
}
#: nvidia-smi recordings without a meter, made to show how often the reported power changes.
REFRESH_RECORDINGS = {
    "A100 PCIe": "GPU_Power_Benchmark_pwr_update_freq_A100_gpudata.csv",
    "Tesla V100": "GPU_Power_Benchmark_pwr_update_freq_V100_gpudata.csv",
}
_UTC_OFFSET_NS = 3600 * 10**9  # gpudata.csv is UK summer time (UTC+01:00)
_POWER_COLUMNS = ("power.draw [W]", "power.draw.average [W]", "power.draw.instant [W]")


def piecewise_linear_energy_j(t_ns: np.ndarray, power_w: np.ndarray, start_ns, end_ns) -> np.ndarray:
    """Exact integral (J) of the linear interpolation of samples ``(t_ns, power_w)`` over
    ``[start_ns, end_ns)``, vectorised over arrays of windows. Windows must lie inside
    ``[t_ns[0], t_ns[-1]]``."""
    t = np.asarray(t_ns, dtype=np.int64)
    p = np.asarray(power_w, dtype=np.float64)
    a = np.asarray(start_ns, dtype=np.int64)
    b = np.asarray(end_ns, dtype=np.int64)
    if t.shape[0] < 2:
        raise ValueError("need at least two samples to integrate")
    if np.any(a < t[0]) or np.any(b > t[-1]) or np.any(b < a):
        raise ValueError(f"windows must satisfy {t[0]} <= start_ns <= end_ns <= {t[-1]} (the samples' span)")
    dt_s = np.diff(t) * 1e-9
    cum = np.concatenate([[0.0], np.cumsum((p[1:] + p[:-1]) * 0.5 * dt_s)])
    slope = np.diff(p) / dt_s

    def at(x: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(t, x, side="right") - 1, 0, t.shape[0] - 2)
        tau = (x - t[i]) * 1e-9
        return cum[i] + p[i] * tau + 0.5 * slope[i] * tau * tau

    return at(b) - at(a)


@dataclass(frozen=True, eq=False)
class A100Run:
    """One A100 recording, every timestamp in Unix epoch ns (UTC).

    ``nvsmi``: nvidia-smi's ``power.draw.instant`` as an INSTANT :class:`DeviceTrace` of
    device ``"0"`` (sensor ``"nvidia-smi:power.draw.instant"``); ``nvsmi_power_draw_w`` the
    ``power.draw`` column at the same times. ``meter_t_ns``/``meter_power_w``: the PMD's
    total card power (W). ``pulses``: int64 array (n, 2) of load ON/OFF times.
    """

    nvsmi: DeviceTrace
    nvsmi_power_draw_w: np.ndarray
    meter_t_ns: np.ndarray
    meter_power_w: np.ndarray
    pulses: np.ndarray

    def meter_energy_j(self, start_ns, end_ns) -> np.ndarray:
        """Exact integral (J) of the meter's linearly interpolated power over ``[start_ns, end_ns)``
        (arrays of windows allowed)."""
        return piecewise_linear_energy_j(self.meter_t_ns, self.meter_power_w, start_ns, end_ns)


def _traces_dir(data_dir: str | Path) -> Path:
    d = Path(data_dir)
    if (d / "traces").is_dir():
        d = d / "traces"
    if not d.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such directory; pass the data folder that holds traces/ (e.g. ../shared/data)")
    return d


def _read_gpudata(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    try:
        ci, cd = header.index("power.draw.instant [W]"), header.index("power.draw [W]")
    except ValueError:
        raise ValueError(f"{path}: expected columns 'power.draw [W]' and 'power.draw.instant [W]', got {header}") from None
    rows = [[c.strip() for c in line.split(",")] for line in lines[1:] if line.strip()]
    stamps = np.array([r[0].replace("/", "-").replace(" ", "T") for r in rows], dtype="datetime64[ns]")
    t_ns = stamps.astype(np.int64) - _UTC_OFFSET_NS
    return t_ns, np.array([float(r[ci]) for r in rows]), np.array([float(r[cd]) for r in rows])


def _read_pmd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    if header[0] != "timestamp_unix_ms" or "total_p_w" not in header:
        raise ValueError(f"{path}: expected columns timestamp_unix_ms,...,total_p_w, got {header}")
    ci = header.index("total_p_w")
    t, p = [], []
    for line in lines[1:]:
        cells = line.split(",")
        ms, _, frac = cells[0].partition(".")
        t.append(int(ms) * 1_000_000 + int((frac + "000000")[:6]))
        p.append(float(cells[ci]))
    return np.array(t, dtype=np.int64), np.array(p)


def _read_pulses(path: Path) -> np.ndarray:
    stamps = np.loadtxt(path, skiprows=1, dtype=np.int64, ndmin=1)
    distinct = stamps[np.concatenate([[True], np.diff(stamps) != 0])]
    n = (distinct.shape[0] - 1) // 2  # the last distinct value only marks the end of the run
    return (distinct[: 2 * n].reshape(n, 2) * 1000).astype(np.int64)


def load_a100(data_dir: str | Path, recording: str = "5050") -> A100Run:
    """Load an A100 recording (``"5050"`` square wave or ``"transient"`` step) from ``data_dir``
    (the shared data folder, or its ``traces/`` folder)."""
    if recording not in RECORDINGS:
        raise ValueError(f"unknown recording {recording!r}; choose one of {sorted(RECORDINGS)}")
    d = _traces_dir(data_dir)
    prefix = RECORDINGS[recording]
    t_ns, instant_w, draw_w = _read_gpudata(d / f"{prefix}gpudata.csv")
    meter_t, meter_p = _read_pmd(d / f"{prefix}PMD_data.csv")
    pulses = _read_pulses(d / f"{prefix}timestamps.csv")
    trace = DeviceTrace(device="0", t_ns=t_ns, power_w=instant_w, power_kind=SampleKind.INSTANT,
                        sensor="nvidia-smi:power.draw.instant", simulated=False)
    return A100Run(nvsmi=trace, nvsmi_power_draw_w=draw_w, meter_t_ns=meter_t, meter_power_w=meter_p, pulses=pulses)


@dataclass(frozen=True, eq=False)
class Recording:
    """One recording of any GPU: every nvidia-smi power column as its own trace (keyed by the
    column name without `` [W]``), the meter (may be empty), and the load ON/OFF times."""

    gpu: str
    traces: dict
    meter_t_ns: np.ndarray
    meter_power_w: np.ndarray
    pulses: np.ndarray

    def meter_energy_j(self, start_ns, end_ns) -> np.ndarray:
        return piecewise_linear_energy_j(self.meter_t_ns, self.meter_power_w, start_ns, end_ns)


def _read_power_columns(path: Path) -> tuple[np.ndarray, dict]:
    lines = path.read_text().splitlines()
    header = [h.strip() for h in lines[0].split(",")]
    cols = {h: header.index(h) for h in _POWER_COLUMNS if h in header}
    if not cols:
        raise ValueError(f"{path}: no power column among {_POWER_COLUMNS}; got {header}")
    rows = [[c.strip() for c in line.split(",")] for line in lines[1:] if line.strip()]
    stamps = np.array([r[0].replace("/", "-").replace(" ", "T") for r in rows], dtype="datetime64[ns]")
    t_ns = stamps.astype(np.int64) - _UTC_OFFSET_NS
    return t_ns, {h.replace(" [W]", ""): np.array([float(r[i]) for r in rows]) for h, i in cols.items()}


def _strictly_increasing(t: np.ndarray, *cols):
    keep = np.concatenate(([True], np.diff(t) > 0))
    return (t[keep], *(c[keep] for c in cols))


def load_recording(data_dir: str | Path, gpu: str) -> Recording:
    """A step-response recording of :data:`STEP_RECORDINGS` (``"RTX A5000"``...), every power
    column as a trace: ``power.draw.average`` as an AVERAGE trace over 1 s (NVIDIA: the
    one-second average), the others as INSTANT traces."""
    if gpu not in STEP_RECORDINGS:
        raise ValueError(f"unknown recording {gpu!r}; choose one of {sorted(STEP_RECORDINGS)}")
    d = _traces_dir(data_dir)
    prefix = STEP_RECORDINGS[gpu]
    t_ns, cols = _read_power_columns(d / f"{prefix}gpudata.csv")
    traces = {}
    for name, p in cols.items():
        t, v = _strictly_increasing(t_ns, p)
        avg = name.endswith(".average")
        traces[name] = DeviceTrace(device="0", t_ns=t, power_w=v, power_kind=SampleKind.AVERAGE if avg else SampleKind.INSTANT,
                                   window_ns=10**9 if avg else 0, sensor=f"nvidia-smi:{name}", simulated=False)
    meter_t, meter_p = _read_pmd(d / f"{prefix}PMD_data.csv")
    return Recording(gpu, traces, meter_t, meter_p, _read_pulses(d / f"{prefix}timestamps.csv"))


def refresh_period_ms(data_dir: str | Path, gpu: str) -> dict:
    """How often each power column of a :data:`REFRESH_RECORDINGS` file actually changes:
    ``{column: {"poll_ms", "change_ms"}}`` (median interval between polls, and between
    changes of the reported value)."""
    t_ns, cols = _read_power_columns(_traces_dir(data_dir) / REFRESH_RECORDINGS[gpu])
    out = {}
    for name, p in cols.items():
        ch = np.flatnonzero(np.diff(p) != 0) + 1
        out[name] = {"poll_ms": float(np.median(np.diff(t_ns))) / 1e6,
                     "change_ms": float(np.median(np.diff(t_ns[ch]))) / 1e6 if len(ch) > 2 else float("nan")}
    return out


def naive_pulse_errors(run: A100Run) -> np.ndarray:
    """Relative error of naive nvidia-smi integration against the metered energy, per ON pulse."""
    a, b = run.pulses[:, 0], run.pulses[:, 1]
    naive = piecewise_linear_energy_j(run.nvsmi.t_ns, run.nvsmi.power_w, a, b)
    return naive / run.meter_energy_j(a, b) - 1.0


def write_a100_example(data_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the 5050 recording in wattspan's formats into ``out_dir``: ``trace.csv``
    (nvidia-smi instant readings), ``requests.jsonl`` and ``batches.jsonl`` (one request and
    one step per ON pulse, ids ``pulse-NNN``), ``meter.jsonl`` (per pulse: the metered energy
    in J over ``[start_ns, end_ns)``, idle included). Returns name -> path."""
    run = load_a100(data_dir, "5050")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"{k}.{ext}" for k, ext in (("trace", "csv"), ("requests", "jsonl"), ("batches", "jsonl"), ("meter", "jsonl"))}
    tr = run.nvsmi
    paths["trace"].write_text("time_ns,gpu,power_w\n" + "".join(f"{t},{tr.device},{p:.2f}\n" for t, p in zip(tr.t_ns.tolist(), tr.power_w.tolist())))
    energy = run.meter_energy_j(run.pulses[:, 0], run.pulses[:, 1])
    req, bat, met = [], [], []
    for i, ((a, b), e) in enumerate(zip(run.pulses.tolist(), energy.tolist())):
        rid = f"pulse-{i:03d}"
        req.append({"id": rid, "start_ns": a, "end_ns": b, "gpu": tr.device, "prompt_tokens": 0, "output_tokens": 1,
                    "route": "/square-wave", "model": "a100-square-wave", "tenant": ""})
        bat.append({"start_ns": a, "end_ns": b, "gpu": tr.device, "requests": {rid: 1}})
        met.append({"id": rid, "start_ns": a, "end_ns": b, "energy_j": round(e, 6), "mean_power_w": round(e / ((b - a) * 1e-9), 3)})
    for key, rows in (("requests", req), ("batches", bat), ("meter", met)):
        paths[key].write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the shared data folder holding traces/ (e.g. ../shared/data)")
    ap.add_argument("--out", default=None, help="write wattspan example files here (e.g. examples/a100)")
    args = ap.parse_args(argv)
    run = load_a100(args.data)
    err = naive_pulse_errors(run)
    a, b = run.pulses[0, 0], run.pulses[-1, 1]
    print(f"A100 5050: {len(run.nvsmi)} nvidia-smi readings, {run.meter_t_ns.shape[0]} meter samples, {len(run.pulses)} ON pulses")
    meter_mean = float(run.meter_energy_j(a, b)) / ((b - a) * 1e-9)
    smi_mean = float(piecewise_linear_energy_j(run.nvsmi.t_ns, run.nvsmi.power_w, a, b)) / ((b - a) * 1e-9)
    print(f"load window mean power: meter {meter_mean:.2f} W, nvidia-smi instant {smi_mean:.2f} W")
    print("naive integration of power.draw.instant over each ON pulse vs metered pulse energy (total, idle included):")
    print(f"  |error| median {np.median(np.abs(err)) * 100:.1f} %, p95 {np.percentile(np.abs(err), 95) * 100:.1f} %, "
          f"max {np.abs(err).max() * 100:.1f} %; signed mean {err.mean() * 100:+.1f} %")
    if args.out:
        paths = write_a100_example(args.data, args.out)
        size = sum(p.stat().st_size for p in paths.values())
        print(f"wrote {', '.join(str(p) for p in paths.values())} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
