"""``wattspan run -- <command>``: meter any process from start to end.

The power sources are the meter's: NVML for each GPU that answers, RAPL for the
CPU package and DRAM where readable, otherwise the labelled CPU estimate (a
model from utilisation, never a measurement; every output says so). The
simulated GPU of ``wattspan demo`` is not used here: it synthesises power from
request activity, and a job has none.

The command runs as a child process with its own stdin/stdout/stderr; Ctrl-C and
SIGTERM are passed on to it. One sampler thread polls the sources the whole
time; the runner folds the readings into each device's cumulative energy (exact
at every reading: energy-counter differences, or the trapezoid rule of power
where there is no counter) once a second, so memory stays bounded however long
the job runs (the knots are thinned, never the energy). Phase markers the job
sets with :class:`wattspan.phase` arrive through a file named in
``WATTSPAN_RUN_PHASES``; each phase gets the energy between its begin and end.

When the job ends, the summary and the trace go to the ledger (tables ``runs``
and ``run_trace``, see :mod:`wattspan.export.ledger.runs`) and a short result is printed.
``wattspan audit`` turns a run into a one-page report.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .logs import get_logger
from .phases import ENV as PHASES_ENV
from .phases import read_phases

__all__ = ["measure", "run_sources", "print_result"]

log = get_logger(__name__)

_MAX_KNOTS = 200_000  # per device in memory; thinned by half when exceeded
_STORED_KNOTS = 4000  # per device in the ledger
_TICK_S = 1.0


def run_sources() -> list:
    """NVML GPUs (unless ``WATTSPAN_SIMULATE=1``), RAPL, else the labelled CPU estimate."""
    from .defaults import measured_sources
    from .sources import SourceUnavailable

    found = measured_sources()
    if not any(getattr(s, "name", "") == "rapl" for s in found):
        from .sources.cpu_estimate import CpuEstimateSource

        try:
            found.append(CpuEstimateSource())
        except SourceUnavailable as exc:
            log.warning("no host power source at all (%s)", exc)
    if not found:
        raise RuntimeError("no power source can run here: no NVML GPU, no readable RAPL, no /proc/stat")
    return found


class _Cumulative:
    """One device's cumulative energy (J) at its readings' times (monotonic ns), bounded."""

    __slots__ = ("t", "e", "_last_t", "_last_p", "_last_counter", "_total", "readings")

    def __init__(self) -> None:
        self.t: list[np.ndarray] = []
        self.e: list[np.ndarray] = []
        self._last_t: int | None = None
        self._last_p = float("nan")
        self._last_counter = float("nan")
        self._total = 0.0
        self.readings = 0

    def add(self, t: np.ndarray, p: np.ndarray | None, e: np.ndarray | None) -> None:
        if t.shape[0] == 0:
            return
        self.readings += int(t.shape[0])
        if e is not None and np.isfinite(e).any():
            ok = np.isfinite(e)
            t, e = t[ok], e[ok]
            prev = self._last_counter if np.isfinite(self._last_counter) else e[0]
            d = np.diff(np.concatenate(([prev], e)))
            cum = self._total + np.cumsum(np.clip(d, 0.0, None))  # counters are unwrapped; a reset adds nothing
            self._last_counter = float(e[-1])
        else:
            assert p is not None, "a trace without energy readings has power readings"
            ok = np.isfinite(p)
            t, p = t[ok], p[ok]
            if t.shape[0] == 0:
                return
            tt = np.concatenate(([self._last_t if self._last_t is not None else t[0]], t))
            pp = np.concatenate(([self._last_p if np.isfinite(self._last_p) else p[0]], p))
            step = np.diff(tt).astype(np.float64) * 1e-9 * (pp[1:] + pp[:-1]) * 0.5
            cum = self._total + np.cumsum(step)
            self._last_p = float(p[-1])
        self._last_t, self._total = int(t[-1]), float(cum[-1])
        self.t.append(t.astype(np.int64))
        self.e.append(cum)
        if sum(a.shape[0] for a in self.t) > _MAX_KNOTS:  # thin: keep every other knot (energy stays exact at each)
            tt, ee = self.arrays()
            keep = np.zeros(tt.shape[0], bool)
            keep[::2] = True
            keep[-1] = True
            self.t, self.e = [tt[keep]], [ee[keep]]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.t:
            return np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(self.t), np.concatenate(self.e)


def _energy_between(t: np.ndarray, e: np.ndarray, a: int, b: int) -> float:
    """Energy (J) between monotonic times a and b, interpolating the cumulative curve."""
    if t.shape[0] < 2 or b <= a:
        return 0.0
    tf = t.astype(np.float64)
    ea, eb = np.interp([float(a), float(b)], tf, e)
    return float(max(0.0, eb - ea))


def _coverage(t: np.ndarray, a: int, b: int) -> float:
    if t.shape[0] < 2 or b <= a:
        return 0.0
    return float(max(0, min(b, int(t[-1])) - max(a, int(t[0]))) / (b - a))


def _host_busy_cpu_s() -> float | None:
    try:
        with open("/proc/stat", "rb") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("wattspan", "numpy", "nvidia-ml-py", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _git_commit(cwd: str) -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, timeout=5).stdout.strip()
            return r.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return ""


# what `wattspan run` passes on to its job (a terminal's signals only when they did not reach the job already)
_FORWARDED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))
_TTY_SIGNALS = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def _in_foreground_group() -> bool:
    """Whether this process is in its terminal's foreground process group, so a terminal's signal
    reached the job (which shares the group) too."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except (OSError, AttributeError):
            continue
    return False


def measure(argv: list[str], *, carbon, db: str | os.PathLike | None = None, sources=None,
            interval_s: float = 0.1, label: str = "", run_id: str | None = None) -> dict:
    """Run ``argv`` to completion, metering it; return the summary (and store it in ``db``).

    The summary (units in the names): ``run_id``, ``label``, ``command``, ``cwd``,
    ``started_at``/``ended_at`` (unix s), ``duration_s``, ``exit_code``, ``devices``
    (per device: ``name, kind, sensor, simulated, energy_j, mean_power_w, readings,
    coverage``), ``accelerator_j``, ``host_j``, ``energy_j`` (IT energy: both),
    ``facility_j`` (x PUE), ``operational_g``, ``embodied_g``, ``co2e_g``,
    ``carbon`` (the model and its sources), ``phases`` (each: ``name, start_at, end_at,
    duration_s, energy_j, accelerator_j, host_j, co2e_g``), ``job_cpu_s``,
    ``host_busy_cpu_s``, ``sample_interval_s``, ``versions``, ``git_commit``.
    """
    from .sampler import Sampler

    if not argv:
        raise ValueError("wattspan run needs a command: wattspan run -- python train.py")
    if db is not None:  # a ledger that cannot be written is refused before the job runs, not after it
        from ._paths import writable_file

        writable_file(db, "--db")
    if db is not None:  # a damaged, foreign or too-new file is refused before the job runs, not after
        from .export.ledger.schema import check_ledger

        check_ledger(db)
    srcs = run_sources() if sources is None else list(sources)
    sampler = Sampler(srcs, interval_s=interval_s)
    devices = {d.id: d for d in sampler.devices()}
    cums = {d: _Cumulative() for d in devices}
    cursor = dict.fromkeys(devices, -(2**63))

    def ingest() -> None:
        for dev, c in cums.items():
            tr = sampler.trace(dev, since_ns=cursor[dev] + 1)
            if len(tr):
                c.add(tr.t_ns, tr.power_w, tr.energy_j)
                cursor[dev] = int(tr.t_ns[-1])

    run_id = run_id or uuid.uuid4().hex
    fd, phase_file = tempfile.mkstemp(prefix="wattspan-phases-", suffix=".tsv")
    os.close(fd)
    env = dict(os.environ, **{PHASES_ENV: phase_file, "WATTSPAN_RUN_ID": run_id})
    sampler.start()
    deadline = time.monotonic() + 3.0  # a first reading of every device before the job starts
    while time.monotonic() < deadline and any(sampler.latest_ns(d) is None for d in devices):
        time.sleep(0.01)
    busy0 = _host_busy_cpu_s()
    wall0, mono0 = time.time(), time.monotonic_ns()
    try:
        child = subprocess.Popen(argv, env=env)
    except OSError as exc:
        sampler.close()
        os.unlink(phase_file)
        raise ValueError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
    forwarded = {}

    def forward(signum, _frame):
        # Ctrl-C, Ctrl-\ and a hang-up reach the terminal's whole foreground group, the job with us:
        # sending them on would deliver them twice (a second Ctrl-C stops most jobs' clean shutdown)
        if signum in _TTY_SIGNALS and _in_foreground_group():
            return
        try:
            child.send_signal(signum)
        except OSError:
            pass

    for sig in _FORWARDED:
        try:
            forwarded[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread
            pass
    # A thread waits for the child and notes the moment it ends, so the run ends when the job
    # does (not at the next tick of the ingest loop, up to a second later); the loop folds in
    # the readings once a tick meanwhile.
    ended: dict = {}

    def reap() -> None:
        try:
            _, st, ru = os.wait4(child.pid, 0)
            ended.update(status=st, usage=ru)
        except ChildProcessError:  # reaped elsewhere: no status
            ended.update(status=0, usage=None)
        ended["mono"], ended["wall"] = time.monotonic_ns(), time.time()

    waiter = threading.Thread(target=reap, name="wattspan-run-wait", daemon=True)
    waiter.start()
    try:
        while waiter.is_alive():
            waiter.join(min(_TICK_S, 0.05 if time.monotonic_ns() - mono0 < 2e9 else _TICK_S))
            ingest()
    finally:
        for sig, old in forwarded.items():
            signal.signal(sig, old)
    status, usage = ended["status"], ended["usage"]
    child.returncode = os.waitstatus_to_exitcode(status)
    mono1, wall1 = ended["mono"], ended["wall"]
    busy1 = _host_busy_cpu_s()
    time.sleep(min(1.0, 2 * interval_s))  # one more reading after the end
    sampler.close()
    try:
        sampler.poll_now()
    except RuntimeError:
        pass
    ingest()
    phases = read_phases(phase_file, mono1)
    try:
        os.unlink(phase_file)
    except OSError:
        pass

    def to_wall(t_ns):
        return wall0 + (np.asarray(t_ns, dtype=np.float64) - mono0) / 1e9

    summary_devices, trace = {}, {}
    acc = host = 0.0
    duration_s = (mono1 - mono0) / 1e9
    for dev, info in devices.items():
        t, e = cums[dev].arrays()
        ej = _energy_between(t, e, mono0, mono1)
        is_acc = info.kind == "gpu"
        acc, host = (acc + ej, host) if is_acc else (acc, host + ej)
        summary_devices[dev] = {
            "name": info.name, "kind": info.kind, "role": "accelerator" if is_acc else "host",
            "sensor": info.sensor, "simulated": bool(info.simulated), "energy_j": ej,
            "mean_power_w": ej / duration_s if duration_s > 0 else 0.0,
            "readings": cums[dev].readings, "coverage": _coverage(t, mono0, mono1),
        }
        # the stored trace: inside the run, thinned to at most _STORED_KNOTS, energy from the run's start
        inside = (t >= mono0) & (t <= mono1)
        ti, ei = t[inside], e[inside]
        if ti.shape[0] > _STORED_KNOTS:
            idx = np.unique(np.linspace(0, ti.shape[0] - 1, _STORED_KNOTS).round().astype(int))
            ti, ei = ti[idx], ei[idx]
        e0 = float(np.interp(float(mono0), t.astype(np.float64), e)) if t.shape[0] else 0.0
        ts = np.concatenate(([mono0], ti, [mono1])) if t.shape[0] >= 2 else ti
        es = np.concatenate(([0.0], ei - e0, [_energy_between(t, e, mono0, mono1)])) if t.shape[0] >= 2 else ei
        trace[dev] = (to_wall(ts).tolist(), es.tolist())

    n_acc = sum(1 for i in devices.values() if i.kind == "gpu")
    embodied_devices = n_acc or 1
    it_j = acc + host

    def energy_in(a: int, b: int) -> float:
        return sum(_energy_between(*cums[dev].arrays(), a, b) for dev in devices)

    def carbon_of(a: int, b: int):
        """The carbon of the energy used between monotonic a and b, each half-hour at its own hour's
        intensity (the hourly provider's, else the yearly value)."""
        w0, w1 = float(to_wall(a)), float(to_wall(b))
        edges = [w0, *np.arange(np.floor(w0 / 1800.0) * 1800.0 + 1800.0, w1, 1800.0).tolist(), w1]
        mono_edges = [a, *(int(mono0 + (x - wall0) * 1e9) for x in edges[1:-1]), b]  # the ends exact
        ej = np.array([energy_in(x, y) for x, y in zip(mono_edges[:-1], mono_edges[1:])])
        mids = np.array([(x + y) / 2 for x, y in zip(edges[:-1], edges[1:])])
        return carbon.per_request(ej, np.zeros_like(ej), wall_s=mids), ej

    run_c, run_ej = carbon_of(mono0, mono1)
    op_g = float(np.sum(run_c.operational_g))
    emb_g = float(carbon.embodied_g(duration_s * embodied_devices))
    # the energy-weighted mean intensity over the run's half-hours (so kWh x intensity = operational)
    intensity = float(np.average(run_c.intensity_g_per_kwh, weights=run_ej)) if run_ej.sum() > 0 else float(run_c.intensity_g_per_kwh[0])
    source = carbon.intensity_source
    if carbon.hourly is not None:
        who = ", ".join(sorted({str(p.get("provider", "")) for p in run_c.provenance()}))
        source = f"hourly ({who}, zone {carbon.zone}), energy-weighted over the run's half-hours; yearly value: {carbon.intensity_source}"
    phase_rows = []
    for name, b, en in phases:
        pa = ph = 0.0
        for dev, info in devices.items():
            t, e = cums[dev].arrays()
            ej = _energy_between(t, e, max(b, mono0), min(en, mono1))
            if info.kind == "gpu":
                pa += ej
            else:
                ph += ej
        dur = (en - b) / 1e9
        phase_rows.append({"name": name, "start_at": float(to_wall(b)), "end_at": float(to_wall(en)), "duration_s": dur,
                           "energy_j": pa + ph, "accelerator_j": pa, "host_j": ph,
                           # each boundary is placed between two readings: up to one interval of the mean power either way
                           "boundary_uncertainty_j": 2 * float(interval_s) * (pa + ph) / dur if dur > 0 else 0.0,
                           "co2e_g": float(np.sum(carbon_of(max(b, mono0), min(en, mono1))[0].operational_g))
                                     + float(carbon.embodied_g(dur * embodied_devices))})
    emb = carbon.embodied
    summary = {
        "kind": "run", "run_id": run_id, "label": label, "command": list(argv), "command_line": shlex.join(argv),
        "cwd": os.getcwd(), "started_at": wall0, "ended_at": wall1, "duration_s": duration_s,
        "exit_code": int(child.returncode), "devices": summary_devices,
        "accelerator_j": acc, "host_j": host, "energy_j": it_j, "facility_j": it_j * carbon.pue,
        "operational_g": op_g, "embodied_g": emb_g, "co2e_g": op_g + emb_g,
        "embodied_device_s": duration_s * embodied_devices,
        # beside the location-based figure, never in it: a contract's factor, and the marginal intensity
        "market_g": float(np.sum(run_c.market_g)) if carbon.market_g_per_kwh > 0 else None,
        "marginal_g": float(np.sum(run_c.marginal_g)) if carbon.marginal is not None else None,
        "carbon_cost": float(carbon.cost(op_g + emb_g)) if carbon.carbon_price_per_tonne > 0 else None,
        "carbon": {
            # the energy-weighted mean over the run's half-hours (the yearly value without an hourly provider)
            "region": carbon.region, "intensity_g_per_kwh": intensity, "yearly_intensity_g_per_kwh": carbon.intensity_g_per_kwh,
            "intensity_source": source, "pue": carbon.pue,
            "hourly": [{**p, "g_per_kwh": float(i), "energy_j": float(e)} for p, i, e in
                       zip(run_c.provenance(), run_c.intensity_g_per_kwh, run_ej)] if carbon.hourly is not None else None,
            "market_g_per_kwh": carbon.market_g_per_kwh or None,
            "carbon_price_per_tonne": carbon.carbon_price_per_tonne or None, "currency": carbon.currency,
            "embodied": None if emb is None else {"kgco2e_per_device": emb.kgco2e_per_device, "lifetime_years": emb.lifetime_years,
                                                  "utilisation": emb.utilisation, "g_per_device_s": emb.g_per_device_s},
        },
        "phases": phase_rows,
        "job_cpu_s": (usage.ru_utime + usage.ru_stime) if usage is not None else None,
        "host_busy_cpu_s": (busy1 - busy0) if busy0 is not None and busy1 is not None else None,
        "host_cpus": os.cpu_count(),
        "sample_interval_s": float(interval_s),
        "sampler": {k: v for k, v in sampler.health().items() if k in ("polls", "overruns", "poll_errors", "source_errors")},
        "versions": _versions(), "git_commit": _git_commit(os.getcwd()),
    }
    if db is not None:
        from .export.ledger.runs import write_run

        try:
            write_run(db, summary, trace)
            summary["ledger"] = str(db)
        except Exception as exc:  # the job ran; do not lose its result for a disk problem
            log.error("could not store the run in %s (%s); the summary is printed only", db, exc)
            summary["ledger_error"] = str(exc)
    return summary


def print_result(summary: dict, file=sys.stdout) -> None:
    """The short result ``wattspan run`` prints when the job ends."""
    w = file.write
    c = summary["carbon"]
    w(f"\nwattspan run {summary['run_id'][:12]}: {summary['command_line']}\n")
    w(f"  exit code {summary['exit_code']}, {summary['duration_s']:.1f} s\n")
    for dev, d in summary["devices"].items():
        flag = "  <- ESTIMATED, not a measurement" if d["simulated"] else ""
        w(f"  {dev:<14} {d['role']:<11} {d['energy_j']:>10.1f} J  mean {d['mean_power_w']:.1f} W  ({d['sensor']}){flag}\n")
    w(f"  IT energy {summary['energy_j']:.1f} J (accelerator {summary['accelerator_j']:.1f} J + host {summary['host_j']:.1f} J); "
      f"x PUE {c['pue']:.2f} = facility {summary['facility_j']:.1f} J\n")
    hourly = " (hourly: " + ", ".join(sorted({str(h.get("provider", "")) for h in c["hourly"]})) + ")" if c.get("hourly") else ""
    w(f"  CO2e {summary['co2e_g']:.4f} g (operational {summary['operational_g']:.4f} g at {c['intensity_g_per_kwh']:.0f} gCO2e/kWh{hourly}, "
      f"{c['region']}; embodied {summary['embodied_g']:.4f} g)\n")
    if summary.get("market_g") is not None:
        w(f"  market-based {summary['market_g']:.4f} g at {c['market_g_per_kwh']:g} gCO2e/kWh (beside the figure above, not in it)\n")
    if summary.get("marginal_g") is not None:
        w(f"  marginal {summary['marginal_g']:.4f} g (beside, not in the figure above)\n")
    if summary.get("carbon_cost") is not None:
        w(f"  carbon cost {summary['carbon_cost']:.6f} {c['currency']} at {c['carbon_price_per_tonne']:g} {c['currency']}/tCO2e\n")
    for p in summary["phases"]:
        w(f"  phase {p['name'][:30]:<30} {p['duration_s']:>7.1f} s {p['energy_j']:>10.1f} J  {p['co2e_g']:.4f} g\n")
    if summary.get("ledger"):
        w(f"  stored in {summary['ledger']} (`wattspan audit --db {summary['ledger']}` for the report)\n")


def cli_main(args, carbon) -> int:
    """``wattspan run`` (called by :mod:`wattspan.cli`); returns the job's exit code."""
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError("give the command after --: wattspan run -- python train.py")
    if not (0.005 <= float(args.interval_s) <= 10):
        raise ValueError("--interval-s must be between 0.005 and 10 seconds")
    if args.json is not None:
        from ._paths import writable_file

        writable_file(args.json, "--json")
    summary = measure(argv, carbon=carbon, db=args.db, interval_s=float(args.interval_s), label=args.label or "")
    json_error = None
    if args.json is not None:  # first: a closed stderr must not lose it
        try:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:  # the job has run: say where its result is, not a traceback
            kept = f"the run is in {summary['ledger']}" if summary.get("ledger") else "the summary is printed below only"
            json_error = f"--json {args.json}: cannot write: {exc.strerror or exc} ({kept})"
    try:
        print_result(summary, file=sys.stderr)
    except OSError:  # stderr closed or a broken pipe (`2>&1 | head`): the job's exit code still comes back
        pass
    if json_error is not None:
        raise ValueError(json_error)
    code = summary["exit_code"]
    return code if code >= 0 else 128 - code
