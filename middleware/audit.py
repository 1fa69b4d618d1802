"""``wattspan audit``: a one-page carbon report of a run, a period of a ledger, or attribute's output.

Every derived line shows its inputs and its arithmetic (``facility = IT x PUE =
90.8 J x 1.10 = 99.9 J``), so a reader can check it with a calculator; every
factor names its source. The report is Markdown (``templates/audit.md.j2``,
Jinja2), turned into HTML with markdown-it-py and into PDF with fpdf2 (the
``audit`` extra); charts are PNGs drawn with matplotlib.

The SCI figure follows the Green Software Foundation's Software Carbon Intensity
specification (ISO/IEC 21031:2024): ``SCI = ((E x I) + M) per R`` with E the
energy in kWh (here: IT energy x PUE), I the *location-based* intensity
(the specification does not allow market-based figures), M the embodied
emissions, R the functional unit. Its AI extension (GSF "SCI for AI") counts per
token and asks which boundary was measured: ``provider`` (the operator of the
servers) or ``consumer`` (a caller's share of a service someone else runs).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .records import printable

__all__ = ["Basis", "build_report", "carbon_for", "from_attribute", "from_ledger", "from_run", "parse_time", "render_html",
           "render_markdown", "render_pdf", "write"]

_J_PER_KWH = 3.6e6
_TEMPLATE = "audit.md.j2"

#: What each kind of sensor's figures can be trusted to, with the source of the claim.
SENSOR_NOTES = {
    "nvml": "NVIDIA NVML: the total-energy counter (Volta and newer) integrates the board's own power sensor; "
            "NVIDIA documents power readings as accurate to within +/-5% of the draw (NVML API reference, "
            "nvmlDeviceGetPowerUsage). Measured.",
    "rapl": "Intel/AMD RAPL energy counters (powercap sysfs): the package's own energy estimate, validated "
            "against wall power within a few per cent on recent CPUs. Measured by the CPU, not a wall meter.",
    "cpu-estimate": "NOT a measurement: CPU power modelled from /proc/stat utilisation with the Cloud Carbon "
                    "Footprint coefficients (0.74 W idle to 3.5 W full load per vCPU, average cloud vCPU). "
                    "It counts the whole host, every process on it; no error band can be given for a model.",
    "simulated": "NOT a measurement: wattspan's simulated GPU, synthesised from the batch steps it is told about.",
    "trace": "a recorded power trace replayed: as good as the sensor that recorded it (see the trace's own provenance).",
}


def _sensor_kind(sensor: str) -> str:
    s = (sensor or "").lower()
    for k in ("cpu-estimate", "simulated", "nvml", "rapl", "trace"):
        if s.startswith(k) or k in s:
            return k
    return "other"


# ------------------------------------------------------------------------------ inputs


@dataclass
class Basis:
    """What the report rests on, whatever the input: energies in J, times in unix s."""

    kind: str  # run | ledger | attribute
    subject: str
    start: float | None = None
    end: float | None = None
    accelerator_j: float = 0.0
    host_j: float = 0.0
    unattributed_j: float | None = None
    unattributed_note: str = ""
    device_s: float = 0.0  # device time the embodied share is charged for
    recorded_embodied_g: float | None = None
    recorded_co2e_g: float | None = None
    recorded_carbon: dict | None = None
    requests: int | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    hours: float | None = None  # the run's duration, for per-hour units
    groups: list = field(default_factory=list)  # [(title, key, [ {name, count, energy_j, co2e_g, ...} ])]
    devices: list = field(default_factory=list)  # [{id, role, sensor, simulated, energy_j, coverage}]
    methods: list = field(default_factory=list)
    coverage_min: float | None = None
    coverage_mean: float | None = None
    band_j: tuple | None = None  # (low, high) IT energy, from the records' own bounds
    band_g: tuple | None = None
    quality_flags: dict = field(default_factory=dict)
    timeline: dict = field(default_factory=dict)  # label -> (t[], power_w[])
    timeline_note: str = ""
    phases: list = field(default_factory=list)  # [(name, start, end)]
    command: str = ""
    versions: dict = field(default_factory=dict)
    git_commit: str = ""
    notes: list = field(default_factory=list)
    simulated: bool = False
    estimated: bool = False


_LAST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_time(text: str | None, *, now: float | None = None) -> float | None:
    """``30m``/``1h``/``7d``/``90s`` ago, an ISO 8601 time (UTC unless it says), or unix seconds."""
    if text is None:
        return None
    now = time.time() if now is None else now
    s = str(text).strip()

    def inside(t: float) -> float:  # a time the reports can print (datetime's years 1970..9999)
        if not 0 <= t <= _LAST_TIME:
            raise ValueError(f"the time {text!r} is outside 1970-01-01..9999-12-31")
        return t

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)", s.lower())
    if m:
        mult = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return inside(now - float(m.group(1)) * mult)
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if math.isfinite(v) and v > 1e8:
        return inside(v)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: give 30m, 1h, 7d, an ISO 8601 time (2026-05-01T12:00Z) or unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return inside(dt.timestamp())


def from_run(db: str | os.PathLike, run_id: str = "last") -> Basis:
    from .export.ledger.runs import get_run, run_trace

    s = get_run(db, run_id)
    if s is None:
        raise ValueError(f"no run {run_id!r} in {db} (record one with `wattspan run --db {db} -- COMMAND`)")
    b = Basis(kind="run", subject=f"run {s['run_id'][:12]}" + (f" ({s['label']})" if s.get("label") else ""),
              start=s["started_at"], end=s["ended_at"], accelerator_j=s["accelerator_j"], host_j=s["host_j"],
              unattributed_j=None, unattributed_note="a run is charged all the energy its devices used while it ran",
              device_s=s.get("embodied_device_s", s["duration_s"]), recorded_embodied_g=s["embodied_g"],
              recorded_co2e_g=s["co2e_g"], recorded_carbon=s["carbon"], hours=s["duration_s"] / 3600.0,
              command=s["command_line"], versions=s.get("versions", {}), git_commit=s.get("git_commit", ""))
    b.notes.append(f"exit code {s['exit_code']}; ran in {s.get('cwd', '')}; sampled every {s['sample_interval_s']:g} s")
    for dev, d in s["devices"].items():
        b.devices.append({"id": dev, "role": d["role"], "sensor": d["sensor"], "simulated": d["simulated"],
                          "energy_j": d["energy_j"], "coverage": d["coverage"], "readings": d["readings"]})
    covs = [d["coverage"] for d in s["devices"].values()]
    b.coverage_min = min(covs) if covs else None
    b.coverage_mean = sum(covs) / len(covs) if covs else None
    b.methods = ["whole-device energy over the run (energy-counter differences, or the trapezoid rule of power)"]
    if s.get("job_cpu_s") is not None and s.get("host_busy_cpu_s"):
        share = s["job_cpu_s"] / s["host_busy_cpu_s"] if s["host_busy_cpu_s"] > 0 else float("nan")
        b.notes.append(f"the job used {s['job_cpu_s']:.1f} CPU-s of the host's {s['host_busy_cpu_s']:.1f} busy CPU-s "
                       f"({share:.1%}); host energy is the whole host's, other processes included")
        if s["host_j"] > 0 and 0 < share < 0.95:
            b.notes.append(f"on a shared host, the job's CPU-time share of host energy would be {share:.1%} x "
                           f"{s['host_j']:.4g} J = {share * s['host_j']:.4g} J (an allocation, not a measurement; "
                           "not used in the lines above)")
    # phases: grouped by name (epochs repeat "evaluate")
    rows: dict[str, dict] = {}
    for p in s["phases"]:
        r = rows.setdefault(p["name"], {"name": p["name"], "count": 0, "energy_j": 0.0, "co2e_g": 0.0, "duration_s": 0.0, "pm_j": 0.0})
        r["count"] += 1
        r["energy_j"] += p["energy_j"]
        r["co2e_g"] += p["co2e_g"]
        r["duration_s"] += p["duration_s"]
        r["pm_j"] += p.get("boundary_uncertainty_j", 0.0)
        b.phases.append((p["name"], p["start_at"], p["end_at"]))
    if rows:
        in_phases = sum(r["energy_j"] for r in rows.values())
        b.groups.append(("Energy by phase", "phase", sorted(rows.values(), key=lambda r: -r["energy_j"])))
        b.notes.append(f"phases hold {in_phases:.4g} J of the run's {s['energy_j']:.4g} J; the rest is start-up "
                       "(interpreter, imports) and time between phases")
    # the trace: power of each device = energy difference / time difference
    trace = run_trace(db, s["run_id"])
    for dev, (ts, es) in trace.items():
        if len(ts) >= 2:
            import numpy as np

            t, e = np.asarray(ts), np.asarray(es)
            dt = np.diff(t)
            ok = dt > 0
            p = np.diff(e)[ok] / dt[ok]
            tm = (t[1:][ok] + t[:-1][ok]) / 2
            b.timeline[dev] = (tm.tolist(), p.tolist())
    b.timeline_note = "each device's power = energy difference / time difference between stored readings"
    b.simulated = any(d["simulated"] and _sensor_kind(d["sensor"]) == "simulated" for d in b.devices)
    b.estimated = any(d["simulated"] for d in b.devices)
    return b


_HAS_BAND = "(energy_j_high > 0 OR energy_j = 0)"  # a record carrying a 90 % band


def _ledger_rows(db, since, until):
    """Totals, per-bucket energy and quality from the ledger, in SQL (bounded memory)."""
    from .export.ledger.schema import _reading, _where, excluded, valid_sql

    where0, args = _where(since, until, None)
    with _reading(db) as conn:
        if conn is None:
            return None
        cols = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        ok = valid_sql(cols)  # a row with a value no writer stores: counted, left out of every figure
        bad = excluded(db, since=since, until=until)
        where = f"{where0} AND {ok}" if where0 else f" WHERE {ok}"
        band = all(c in cols for c in ("energy_j_low", "energy_j_high"))
        gband = all(c in cols for c in ("co2e_g_low", "co2e_g_high"))
        q = ("SELECT COUNT(*), TOTAL(energy_j), TOTAL(host_j), TOTAL(device_s), TOTAL(co2e_g), TOTAL(embodied_g), "
             "TOTAL(prompt_tokens), TOTAL(output_tokens), MIN(recorded_at), MAX(recorded_at), MIN(coverage), AVG(coverage), "
             "MAX(simulated), TOTAL(dynamic_j), TOTAL(idle_j)"
             # a record with no band (RequestRecord's default 0..0, an older file's added columns) is no band of
             # 0 J: it counts at its own value, and how many there are is said beside the band
             + (", TOTAL(CASE WHEN " + _HAS_BAND + " THEN energy_j_low ELSE energy_j END), "
                "TOTAL(CASE WHEN " + _HAS_BAND + " THEN energy_j_high ELSE energy_j END), "
                "TOTAL(NOT (" + _HAS_BAND + "))" if band else "")
             + (", TOTAL(CASE WHEN " + _HAS_BAND + " THEN co2e_g_low ELSE co2e_g END), "
                "TOTAL(CASE WHEN " + _HAS_BAND + " THEN co2e_g_high ELSE co2e_g END)" if gband else "")
             + f" FROM requests{where}")
        tot = conn.execute(q, args).fetchone()
        sensors = conn.execute(f"SELECT device, sensor, MAX(simulated), COUNT(*), TOTAL(energy_j), MIN(coverage) "
                               f"FROM requests{where} GROUP BY device, sensor ORDER BY device", args).fetchall()
        methods = conn.execute(f"SELECT method, COUNT(*) FROM requests{where} GROUP BY method ORDER BY COUNT(*) DESC", args).fetchall()
        quality = []
        if "quality" in cols:
            quality = conn.execute(f"SELECT quality, COUNT(*) FROM requests{where} GROUP BY quality ORDER BY COUNT(*) DESC", args).fetchall()
        span = (tot[9] or 0) - (tot[8] or 0)
        bucket = max(1.0, span / 120.0)
        t0 = tot[8] or 0.0
        buckets = conn.execute(f"SELECT CAST((recorded_at - ?) / ? AS INTEGER) AS k, TOTAL(energy_j), TOTAL(host_j) "
                               f"FROM requests{where} GROUP BY k ORDER BY k", [t0, bucket, *args]).fetchall()
    return tot, band, gband, sensors, methods, quality, (t0, bucket, buckets), bad


def _ledger_intensity(db, since, until) -> dict | None:
    """The intensity the records themselves used (each at the hour it ran), energy-weighted, with its
    provenance; the PUE they imply. None for a ledger whose records carry no intensity."""
    from .export.ledger.schema import _reading, _where, valid_sql

    where, args = _where(since, until, None)
    with _reading(db) as conn:
        cols = set() if conn is None else {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
        if conn is None or "intensity_g_per_kwh" not in cols:
            return None
        # the rows that recorded an intensity (a provider named: 0 g/kWh is a figure, a clean hour or --intensity 0);
        # a row from before the intensity columns has 0 and no provider
        has = "IFNULL(intensity_provider, '') != ''" if "intensity_provider" in cols else "intensity_g_per_kwh > 0"
        sel = " AND ".join(x for x in (where.replace(" WHERE ", "", 1), has, valid_sql(cols)) if x)
        row = conn.execute(
            "SELECT TOTAL((energy_j + host_j) * intensity_g_per_kwh), TOTAL(energy_j + host_j), TOTAL(co2e_g - embodied_g), "
            "MIN(intensity_g_per_kwh), MAX(intensity_g_per_kwh), MIN(intensity_hour), MAX(intensity_hour), "
            "GROUP_CONCAT(DISTINCT intensity_provider), GROUP_CONCAT(DISTINCT intensity_zone), GROUP_CONCAT(DISTINCT intensity_basis), "
            f"COUNT(*) FROM requests WHERE {sel}", args).fetchone()
    ei, e, op, lo, hi, h0, h1, providers, zones, bases, n = row
    if not n or e <= 0 or ei < 0:
        return None
    weighted = ei / e  # gCO2e/kWh, energy-weighted over the records' own hours
    return {"region": zones or "", "intensity_g_per_kwh": weighted, "pue": round(op * 3.6e6 / ei, 3) if op > 0 and ei > 0 else 1.0,
            "intensity_source": (f"the records' own intensity at the hour each ran ({bases or 'location'}-based; provider "
                                 f"{providers}; zone {zones}; hours {h0} to {h1}; {lo:.4g}-{hi:.4g} gCO2e/kWh), "
                                 f"energy-weighted over {n} requests")}


def from_ledger(db: str | os.PathLike, since: float | None = None, until: float | None = None) -> Basis:
    from .export.ledger.schema import aggregate

    got = _ledger_rows(db, since, until)
    if got is None or got[0][0] == 0:
        when = "" if since is None else f" since {_utc(since)}"
        if got is not None and got[-1]:
            raise ValueError(f"the ledger {db} holds no request{when} wattspan could sum: its {got[-1]} record(s) hold values no "
                             "wattspan writer stores (an infinity, a value past 2**63, a negative energy, text in a number column); was the file edited?")
        raise ValueError(f"the ledger {db} holds no request{when} (is this the server's --db? widen --since?)")
    tot, band, gband, sensors, methods, quality, (t0, bucket, buckets), bad = got
    n, acc, host, dev_s, co2, emb, pt, ot, first, last, cmin, cmean, sim, dyn, idle = tot[:15]
    rest = list(tot[15:])
    start = since if since is not None else first
    end = until if until is not None else max(last, time.time() if since is not None else last)
    b = Basis(kind="ledger", subject=f"serving ledger {Path(db).name}", start=start, end=end, accelerator_j=acc,
              host_j=host, device_s=dev_s, recorded_embodied_g=emb, recorded_co2e_g=co2, requests=n,
              prompt_tokens=int(pt), output_tokens=int(ot), coverage_min=cmin, coverage_mean=cmean,
              unattributed_note="the ledger holds requests only: device energy between requests (idle, unattributed) "
                                "is not in it; see wattspan_unattributed_energy in the metrics")
    if band:
        lo, hi, no_band = rest[0], rest[1], int(rest[2])
        rest = rest[3:]
        if no_band < n:
            b.band_j = (lo + host, hi + host)
        else:  # (and no CO2e band either)
            gband = False
        if 0 < no_band < n:
            b.notes.append(f"{no_band} of {n} records carry no 90 % band (written without one, or by an older wattspan): "
                           "the band counts each of them at its own value")
    if gband:
        b.band_g = (rest[0], rest[1])
    b.notes.append(f"{n} requests recorded {_utc(first)} to {_utc(last)}; dynamic {dyn:.4g} J + idle share {idle:.4g} J of accelerator energy")
    if bad:
        b.notes.append(f"{bad} record(s) left out of every figure: they hold a value no wattspan writer stores (an infinity, a value past 2**63, "
                       "a negative energy or token count, text in a number column); the file was edited or written by another tool")
    b.recorded_carbon = _ledger_intensity(db, since, until)  # --region overrides it
    for dev, sensor, s, cnt, e, cm in sensors:
        b.devices.append({"id": dev, "role": "accelerator", "sensor": sensor, "simulated": bool(s), "energy_j": e,
                          "coverage": cm, "readings": None, "requests": cnt})
    b.methods = [f"{m or '(none)'}: {c} requests" for m, c in methods]
    b.quality_flags = {str(q or "ok"): c for q, c in quality}
    if bad:
        b.quality_flags["left out (invalid values)"] = bad
    for by, title in (("route", "Energy by endpoint"), ("model", "Energy by model"), ("tenant", "Energy by tenant")):
        rows = aggregate(db, by, since=since, until=until)
        if rows and not (len(rows) == 1 and not rows[0][by] and by != "route"):
            b.groups.append((title, by, [{"name": r[by] or "(none)", "count": r["requests"], "energy_j": r["energy_j"] + r["host_j"],
                                          "co2e_g": r["co2e_g"], "per_1k_j": (r["energy_j"] + r["host_j"]) / r["requests"] * 1000}
                                         for r in rows]))
    if buckets:
        ts = [t0 + (k + 0.5) * bucket for k, _, _ in buckets]
        b.timeline["requests (accelerator)"] = (ts, [e / bucket for _, e, _ in buckets])
        if any(h for _, _, h in buckets):
            b.timeline["requests (host)"] = (ts, [h / bucket for _, _, h in buckets])
        b.timeline_note = f"energy attributed to requests per {bucket:.0f} s, by the time each was recorded, / {bucket:.0f} s"
    b.simulated = bool(sim) and any(_sensor_kind(d["sensor"]) == "simulated" for d in b.devices)
    b.estimated = bool(sim)
    return b


#: the numbers of an attribute record the audit adds up (each finite and >= 0 where present)
#: the largest value a record's number may hold: a thousand times a year of a 100 kW rack, in J (and
#: a sum of a billion such records stays inside float's range)
_MAX_RECORD_VALUE = 1e15
_RECORD_NUMBERS = ("energy_j", "host_j", "device_s", "embodied_g", "co2e_g", "coverage", "prompt_tokens", "output_tokens",
                   "energy_j_low", "energy_j_high", "co2e_g_low", "co2e_g_high")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def from_attribute(records: str | os.PathLike, summary: str | os.PathLike | None = None) -> Basis:
    from .errors import InputError

    recs = []
    try:
        fh = open(records, encoding="utf-8-sig")  # a BOM, as attribute's own readers take it
    except OSError as exc:
        raise InputError(records, 0, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        i = 0
        try:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InputError(records, i, f"not JSON ({exc.msg}); give `wattspan attribute --out` output") from None
                    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of thousands of digits
                        why = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long to read"
                        raise InputError(records, i, f"not a record ({why}); give `wattspan attribute --out` output") from None
        except (UnicodeDecodeError, OSError) as exc:
            raise InputError(records, i + 1, f"cannot be read as UTF-8 text ({exc}); give `wattspan attribute --out` output") from None
    if not recs:
        raise InputError(records, 0, "holds no records")
    for i, r in enumerate(recs, 1):
        if not isinstance(r, dict) or "energy_j" not in r:
            raise InputError(records, i, "has no energy_j: give `wattspan attribute --out` output")
        for key in _RECORD_NUMBERS:
            v = r.get(key, 0.0)
            if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= _MAX_RECORD_VALUE:
                raise InputError(records, i, f"{key} must be a finite number from 0 to {_MAX_RECORD_VALUE:g}, got {str(v)[:40]!r}: "
                                             "give `wattspan attribute --out` output")
        for key in ("prompt_tokens", "output_tokens"):
            v = r.get(key)
            if v is not None and float(v) != int(v):
                raise InputError(records, i, f"{key} must be a whole number of tokens, got {v!r}")
        for lo, mid, hi in (("energy_j_low", "energy_j", "energy_j_high"), ("co2e_g_low", "co2e_g", "co2e_g_high")):
            if lo in r and hi in r and mid in r and not (float(r[lo]) <= float(r[mid]) * (1 + 1e-9) + 1e-12
                                                         and float(r[mid]) <= float(r[hi]) * (1 + 1e-9) + 1e-12):
                raise InputError(records, i, f"its band is not around its value ({lo} {r[lo]!r}, {mid} {r[mid]!r}, {hi} {r[hi]!r})")
    s = None
    if summary:
        try:
            s = json.loads(Path(summary).read_text("utf-8-sig"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise InputError(summary, 0, f"cannot be read as JSON ({getattr(exc, 'strerror', None) or exc}); give `wattspan attribute --summary` output") from None
        if not isinstance(s, dict):
            raise InputError(summary, 0, "is not a JSON object: give `wattspan attribute --summary` output")
    acc = sum(float(r["energy_j"]) for r in recs)
    b = Basis(kind="attribute", subject=f"wattspan attribute output {Path(records).name}", accelerator_j=acc,
              host_j=sum(float(r.get("host_j", 0.0)) for r in recs), device_s=sum(float(r.get("device_s", 0.0)) for r in recs),
              recorded_embodied_g=sum(float(r.get("embodied_g", 0.0)) for r in recs) if any("embodied_g" in r for r in recs) else None,
              recorded_co2e_g=sum(float(r.get("co2e_g", 0.0)) for r in recs) if any("co2e_g" in r for r in recs) else None,
              requests=len(recs), command=f"wattspan attribute ... --out {Path(records).name}")
    host = b.host_j or 0.0
    if all("energy_j_low" in r and "energy_j_high" in r for r in recs):  # each record's 90 % band, summed as the ledger's are
        b.band_j = (sum(float(r["energy_j_low"]) for r in recs) + host, sum(float(r["energy_j_high"]) for r in recs) + host)
        if all("co2e_g_low" in r and "co2e_g_high" in r for r in recs):
            b.band_g = (sum(float(r["co2e_g_low"]) for r in recs), sum(float(r["co2e_g_high"]) for r in recs))
    toks = [r for r in recs if "prompt_tokens" in r or "output_tokens" in r]
    if toks:
        b.prompt_tokens = sum(int(r.get("prompt_tokens", 0)) for r in recs)
        b.output_tokens = sum(int(r.get("output_tokens", 0)) for r in recs)
    covs = [float(r.get("coverage", 1.0)) for r in recs]
    b.coverage_min, b.coverage_mean = min(covs), sum(covs) / len(covs)
    methods: dict[str, int] = {}
    for r in recs:
        methods[r.get("method", "")] = methods.get(r.get("method", ""), 0) + 1
    b.methods = [f"{m or '(none)'}: {c} requests" for m, c in sorted(methods.items(), key=lambda x: -x[1])]
    devs: dict[str, dict] = {}
    for r in recs:
        d = devs.setdefault(str(r.get("device", r.get("gpu", ""))), {"id": str(r.get("device", r.get("gpu", ""))), "role": "accelerator",
                                                                       "sensor": r.get("sensor", ""), "simulated": bool(r.get("simulated")),
                                                                       "energy_j": 0.0, "coverage": 1.0, "readings": None})
        d["energy_j"] += float(r["energy_j"])
        d["coverage"] = min(d["coverage"], float(r.get("coverage", 1.0)))
    b.devices = list(devs.values())
    if s:
        try:
            b.unattributed_j = float(s.get("unattributed_j", 0.0))
            if not (math.isfinite(b.unattributed_j) and 0 <= b.unattributed_j <= _MAX_RECORD_VALUE):
                raise ValueError(f"unattributed_j must be a finite number from 0 to {_MAX_RECORD_VALUE:g} J, got {s.get('unattributed_j')!r}")
            measured, attributed = s.get("measured_j"), s.get("attributed_j")
            if (_is_number(measured) and _is_number(attributed)
                    and abs(float(measured) - float(attributed) - b.unattributed_j) > 1e-6 * max(abs(float(measured)), 1.0)):
                raise ValueError(f"its measured_j {measured!r} is not its attributed_j {attributed!r} + unattributed_j {b.unattributed_j:.6g}")
            b.unattributed_note = (f"measured {s.get('measured_j', 0.0):.4g} J on the devices, {s.get('attributed_j', 0.0):.4g} J "
                                   "charged to requests; the rest (idle with nothing in flight) is in no request")
            b.recorded_carbon = s.get("carbon")
            c = b.recorded_carbon
            if c is not None and not (isinstance(c, dict) and _is_number(c.get("intensity_g_per_kwh")) and _is_number(c.get("pue", 1.0))):
                raise TypeError("its carbon needs numbers intensity_g_per_kwh and pue")
            hourly = s.get("intensity") if isinstance(s.get("intensity"), dict) else {}
            ew_raw, providers = hourly.get("energy_weighted_g_per_kwh"), [str(p) for p in hourly.get("providers") or () if p != "table"]
            ew = float(ew_raw) if isinstance(ew_raw, (int, float)) and not isinstance(ew_raw, bool) else math.nan
            if c is not None and providers and math.isfinite(ew) and 0 <= ew <= 5000:
                # the records were priced hour by hour: the report applies their energy-weighted intensity
                b.recorded_carbon = dict(c, intensity_g_per_kwh=ew, hourly_weighted=True,
                                         intensity_source=f"hourly ({', '.join(providers)}; zones {', '.join(map(str, hourly.get('zones') or ()))}), "
                                                          f"energy-weighted over the records' hours; yearly value: {c.get('intensity_source', '')}")
            for k, d in (s.get("devices") or {}).items():
                for dd in b.devices:
                    if dd["id"] == k:
                        dd["method_detail"] = f"{d.get('method', '')}, idle {d.get('idle_w', 0):.1f} W ({d.get('idle_source', '')})"
                if d.get("t0_ns") is not None:
                    b.notes.append(f"device {k}: trace {(d['t1_ns'] - d['t0_ns']) / 1e9:.1f} s on the trace's own clock")
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # fields of the wrong type
            raise InputError(summary or "", 0, f"is not `wattspan attribute --summary` output ({type(exc).__name__}: {exc})") from None
        want_n, want_j = s.get("requests"), s.get("attributed_j")
        if (_is_number(want_n) and int(want_n) != len(recs)) or (
                _is_number(want_j) and abs(float(want_j) - acc) > 1e-6 * max(abs(float(want_j)), abs(acc), 1.0)):
            # not the summary of these records (a cut file, another run's): its unattributed
            # energy and carbon would be set beside energy it did not measure
            raise InputError(summary or "", 0, f"is the summary of {want_n} requests and {float(want_j or 0.0):.6g} J attributed; "
                             f"the records hold {len(recs)} requests and {acc:.6g} J: give the --summary of the same "
                             "`wattspan attribute` run")
    else:
        b.unattributed_note = "not known: give --summary (attribute's --summary JSON) for the unattributed energy"
    for key, title in (("route", "Energy by endpoint"), ("model", "Energy by model"), ("tenant", "Energy by tenant")):
        rows: dict[str, dict] = {}
        for r in recs:
            if key not in r:
                continue
            g = rows.setdefault(str(r[key]), {"name": str(r[key]), "count": 0, "energy_j": 0.0, "co2e_g": 0.0})
            g["count"] += 1
            g["energy_j"] += float(r["energy_j"]) + float(r.get("host_j", 0.0))
            g["co2e_g"] += float(r.get("co2e_g", 0.0))
        for g in rows.values():
            g["per_1k_j"] = g["energy_j"] / g["count"] * 1000
        if rows:
            b.groups.append((title, key, sorted(rows.values(), key=lambda g: -g["energy_j"])))
    b.timeline_note = "attribute's output has no wall-clock timeline"
    b.estimated = any(d["simulated"] for d in b.devices)
    b.simulated = b.estimated and any(_sensor_kind(d["sensor"]) == "simulated" for d in b.devices)
    return b


# ------------------------------------------------------------------------------ the numbers


def _utc(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def g(x: float | None, digits: int = 4) -> str:
    """A number to ``digits`` significant figures, without an exponent for everyday sizes."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-4 <= a < 1e9:
        d = max(0, digits - 1 - int(math.floor(math.log10(a))))
        return f"{x:,.{d}f}"
    return f"{x:.{digits - 1}e}"


def _version() -> str:
    from . import __version__

    return __version__


def carbon_for(basis: Basis, *, region=None, intensity=None, intensity_source=None, pue=None, embodied_kg=None,
               lifetime_years=4.0, utilisation=1.0, lca_boundary=None) -> dict:
    """The carbon factors the report applies, each with its source."""
    from .carbon import CarbonModel, Embodied, grid_intensity

    rec = basis.recorded_carbon or {}
    if region is not None or not rec:
        model = CarbonModel.for_region(region or "world")
        gi = grid_intensity(region or "world")
        out: dict[str, Any] = {"region": model.region, "intensity": model.intensity_g_per_kwh, "intensity_source": model.intensity_source,
               "intensity_year": gi.year, "pue": model.pue,
               "pue_source": "the cloud provider's published fleet average" if model.pue != 1.0 else "none given: 1.0 (no facility overhead assumed)"}
        if region is None:
            out["intensity_source"] += "; no --region given: the world average"
    else:
        out = {"region": rec.get("region", ""), "intensity": rec["intensity_g_per_kwh"], "intensity_source": rec.get("intensity_source", ""),
               "intensity_year": None, "pue": rec.get("pue", 1.0), "hourly": basis.kind == "ledger" or bool(rec.get("hourly_weighted")) or bool(rec.get("hourly")),
               "pue_source": {"run": "as recorded with the run", "ledger": "implied by the records' own operational CO2e"}.get(basis.kind, "as recorded with the input")}
    out.setdefault("hourly", False)
    if intensity is not None:
        out["hourly"] = False
        out["intensity"] = float(intensity)
        out["intensity_source"] = intensity_source or "given on the command line"
    if pue is not None:
        out["pue"], out["pue_source"] = float(pue), "given on the command line"
    CarbonModel(intensity_g_per_kwh=out["intensity"], pue=out["pue"])  # validates the ranges with a clear message
    if embodied_kg is not None:
        e = Embodied(kgco2e_per_device=float(embodied_kg), lifetime_years=float(lifetime_years), utilisation=float(utilisation))
        out["embodied_g_per_s"] = e.g_per_device_s
        out["embodied_how"] = (f"{g(e.kgco2e_per_device)} kgCO2e per device over {g(e.lifetime_years)} years x "
                               f"utilisation {g(e.utilisation)} = {g(e.g_per_device_s * 3600)} gCO2e per device-hour")
        out["embodied_g"] = e.g_per_device_s * basis.device_s
    elif basis.recorded_embodied_g:
        out["embodied_g_per_s"] = None
        emb = (rec.get("embodied") or {}) if isinstance(rec.get("embodied"), dict) else {}
        how = (f"{g(emb['kgco2e_per_device'])} kgCO2e per device over {g(emb['lifetime_years'])} years x utilisation "
               f"{g(emb['utilisation'])}" if "kgco2e_per_device" in emb else "as recorded with each request")
        out["embodied_how"] = how
        out["embodied_g"] = basis.recorded_embodied_g
    else:
        out["embodied_g_per_s"] = None
        out["embodied_how"] = "not included: no embodied figure given (--embodied-kg)"
        out["embodied_g"] = 0.0
    out["lca_boundary"] = lca_boundary or ("as its source states (for wattspan's A100 figure: a modelled share of an "
                                           "8-GPU server's manufacturing, cradle to gate, Chien et al., HotCarbon '23)"
                                           if out["embodied_g"] else "none: embodied emissions not counted")
    return out


def build_report(basis: Basis, carbon: dict, *, market_intensity=None, market_source=None, boundary="provider",
                 equivalent=None, title=None, audit_command="") -> dict:
    """Every figure of the report, with the arithmetic that makes it."""
    it = basis.accelerator_j + basis.host_j
    pue, i_loc = carbon["pue"], carbon["intensity"]
    fac = it * pue
    kwh = fac / _J_PER_KWH
    op = kwh * i_loc
    emb = carbon["embodied_g"]
    total = op + emb
    r = {"title": title or f"Carbon report: {basis.subject}", "basis": basis, "carbon": carbon, "g": g, "utc": _utc,
         "it_j": it, "facility_j": fac, "facility_kwh": kwh, "operational_g": op, "embodied_g": emb, "total_g": total,
         "boundary": boundary, "generated": _utc(time.time()), "audit_command": audit_command, "version": _version()}
    r["with_unattributed_j"] = it + basis.unattributed_j if basis.unattributed_j and it > 0 else None
    r["hours"] = None if basis.start is None or basis.end is None else (basis.end - basis.start) / 3600.0
    r["market"] = None
    if market_intensity is not None:
        r["market"] = {"intensity": float(market_intensity), "source": market_source or "given on the command line (no source named)",
                       "operational_g": kwh * float(market_intensity)}
    # functional units
    units = []
    if basis.requests:
        units.append(("1k requests", basis.requests / 1000.0))
    toks = (basis.prompt_tokens or 0) + (basis.output_tokens or 0)
    if toks:
        units.append(("1k tokens (prompt + output)", toks / 1000.0))
    if basis.output_tokens:
        units.append(("1k output tokens", basis.output_tokens / 1000.0))
    if basis.kind == "run" and basis.hours:
        units.append(("training hour", basis.hours))
        units.append(("run", 1.0))
    r["units"] = [{"unit": u, "count": c, "energy_j": fac / c, "co2e_g": total / c, "sci": total / c} for u, c in units if c > 0]
    r["sci_token"] = next((u for u in r["units"] if u["unit"].startswith("1k tokens")), None)
    r["recorded_delta"] = None
    if basis.recorded_co2e_g is not None and basis.recorded_co2e_g > 0:
        d = (total - basis.recorded_co2e_g) / basis.recorded_co2e_g
        r["recorded_delta"] = 0.0 if abs(d) < 5e-4 else d  # a rounding's -0.0 % reads as a difference
    r["equivalent"] = None
    if equivalent and all(v not in (None, "") for v in equivalent):
        f, unit, src = equivalent
        if not (f > 0 and math.isfinite(f)):
            raise ValueError("--equivalent-g must be > 0 grams CO2e per unit")
        r["equivalent"] = {"factor_g": f, "unit": unit, "source": src, "value": total / f}
    sensors = []
    for d in basis.devices:
        k = _sensor_kind(d["sensor"])
        sensors.append({**d, "kind": k, "note": SENSOR_NOTES.get(k, "see the sensor string")})
    r["sensor_kinds"] = sorted({s["kind"] for s in sensors})
    r["sensors"] = sensors
    return r


# ------------------------------------------------------------------------------ charts


def charts(report: dict) -> dict[str, bytes]:
    """PNG bytes: ``power`` (power over time, phases shaded) and ``energy`` (by phase or endpoint)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    b: Basis = report["basis"]
    out = {}
    if b.timeline:
        fig, ax = plt.subplots(figsize=(7.2, 2.3), dpi=110)
        for label, (ts, ps) in b.timeline.items():
            # datetimes go through matplotlib's date converter; its stubs accept only numbers here
            ax.plot([datetime.fromtimestamp(t, timezone.utc) for t in ts], ps, lw=1.0, label=label)  # type: ignore[arg-type]
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        names = sorted({n for n, _, _ in b.phases})
        for name, s, e in b.phases:
            c = colours[(names.index(name) + 3) % len(colours)]
            ax.axvspan(datetime.fromtimestamp(s, timezone.utc), datetime.fromtimestamp(e, timezone.utc),  # type: ignore[arg-type]
                       color=c, alpha=0.18, lw=0)
        from matplotlib.patches import Patch

        handles, _ = ax.get_legend_handles_labels()
        handles += [Patch(color=colours[(names.index(n) + 3) % len(colours)], alpha=0.3, label=f"phase: {n}") for n in names[:8]]
        ax.set_ylabel("power, W")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_xlabel("time, UTC")
        ax.legend(handles=handles, fontsize=6, loc="lower right", ncol=2, framealpha=0.8)
        ax.grid(alpha=0.3)
        top = max((max(ps) for _, ps in b.timeline.values() if ps), default=1.0)
        ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
        fig.tight_layout()
        out["power"] = _png(fig)
        plt.close(fig)
    if b.groups:
        title, key, rows = b.groups[0]
        rows = rows[:12]
        fig, ax = plt.subplots(figsize=(7.2, 1.3 + 0.2 * len(rows)), dpi=110)
        ax.barh([str(x["name"])[:40] for x in rows][::-1], [x["energy_j"] for x in rows][::-1], color="#4c72b0")
        ax.set_xlabel("energy, J (accelerator + host, before PUE)")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out["energy"] = _png(fig)
        plt.close(fig)
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------ rendering


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#!])")


def _cell(value) -> str:
    """Text from the ledger or a command line, safe inside a Markdown table cell (no links, no markup)."""
    s = printable(" ".join(str(value).split()))  # an escape sequence: a terminal that shows the file would obey it
    return _MD_SPECIAL.sub(r"\\\1", s).replace("|", "/")


def render_markdown(report: dict, chart_src: dict[str, str]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("wattspan", "templates"), autoescape=False,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["cell"] = _cell
    return env.get_template(_TEMPLATE).render(r=report, charts=chart_src)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:12px;line-height:1.35;
max-width:980px;margin:1.2em auto;padding:0 1em;color:#1b1b1b}
h1{font-size:19px;margin:.2em 0 .4em}h2{font-size:14px;margin:1em 0 .3em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.3em 0}td,th{border:1px solid #ccd;padding:2px 6px;vertical-align:top}
th{background:#eef1f7;text-align:left}td:nth-child(n+2){font-variant-numeric:tabular-nums}
img{max-width:100%}code{font-size:11px;background:#f3f3f3;padding:0 2px}blockquote{margin:.4em 0;padding:.2em .8em;
border-left:4px solid #c33;background:#fff3f3}
@media print{body{margin:0;font-size:10px}h2{break-after:avoid}img{max-height:230px}}
"""


def render_html(markdown: str, title: str) -> str:
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    esc = title.replace("&", "&amp;").replace("<", "&lt;")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc}</title>'
            f'<meta name="generator" content="wattspan audit"><style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n')


def render_pdf(markdown: str, title: str, images: dict[str, str]) -> bytes:
    """A PDF of the same Markdown, through its HTML, with fpdf2 (latin-1 core fonts)."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    # fpdf2 takes no inline tags inside a table cell: keep their text
    html = re.sub(r"<t([dh])([^>]*)>(.*?)</t\1>", lambda m: f"<t{m.group(1)}{m.group(2)}>" + re.sub(r"</?(strong|em|code)>", "", m.group(3)) + f"</t{m.group(1)}>", html, flags=re.S)
    html = _pdf_layout(html)
    html = html.encode("latin-1", "replace").decode("latin-1")
    pdf = FPDF(format="A4")
    pdf.set_margins(12, 10, 12)
    pdf.set_auto_page_break(True, margin=10)
    pdf.set_title(title.encode("latin-1", "replace").decode("latin-1"))
    pdf.set_creator("wattspan audit")
    pdf.add_page()
    pdf.set_font("Helvetica", size=7.5)
    styles = {"h1": FontFace(size_pt=13, emphasis="BOLD"), "h2": FontFace(size_pt=9.5, emphasis="BOLD"),
              "code": FontFace(family="Courier", size_pt=7)}
    pdf.write_html(html, image_map=lambda src: images.get(src, src), tag_styles=styles, table_line_separators=True)
    return bytes(pdf.output())


_WIDTHS = {3: (24, 20, 56), 4: (40, 15, 20, 25), 5: (34, 12, 18, 18, 18), 6: (26, 10, 14, 14, 18, 18)}


def _pdf_layout(html: str) -> str:
    """Column widths and image sizes fpdf2 cannot infer: tables span the page, charts its width."""
    def table(m):
        t = m.group(0)
        n = len(re.findall(r"<th[ >]", t.split("</tr>", 1)[0]))
        widths = _WIDTHS.get(n)
        if n == 6 and "Sensor" in t:
            widths = (14, 10, 42, 12, 10, 12)
        if widths:
            it = iter(widths)
            head, rest = t.split("</tr>", 1)
            head = re.sub(r"<th(?=[ >])", lambda _: f'<th width="{next(it, 10)}%"', head)
            t = head + "</tr>" + rest
        return t.replace("<table>", '<table width="100%">', 1)

    html = re.sub(r"<table>.*?</table>", table, html, flags=re.S)
    return re.sub(r'<img src="([^"]+)" alt="([^"]*)"\s*/?>', r'<img src="\1" width="520">', html)


def write(report: dict, out: Path | None, fmt: str) -> list[Path]:
    """Write the report in ``fmt`` (md, html, pdf) to ``out`` (None: Markdown on stdout); returns the files written."""
    pngs = charts(report)
    written: list[Path] = []
    if out is None:
        sys.stdout.write(render_markdown(report, {}))
        return written
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    if fmt == "md":
        src = {}
        for name, data in pngs.items():
            p = Path(f"{stem}-{name}.png")
            p.write_bytes(data)
            written.append(p)
            src[name] = p.name
        out.write_text(render_markdown(report, src), encoding="utf-8")
    elif fmt == "html":
        src = {n: "data:image/png;base64," + base64.b64encode(d).decode() for n, d in pngs.items()}
        out.write_text(render_html(render_markdown(report, src), report["title"]), encoding="utf-8")
    elif fmt == "pdf":
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            src, images = {}, {}
            for name, data in pngs.items():
                p = Path(td) / f"{name}.png"
                p.write_bytes(data)
                src[name] = f"chart-{name}"
                images[f"chart-{name}"] = str(p)
            out.write_bytes(render_pdf(render_markdown(report, src), report["title"], images))
    else:
        raise ValueError(f"unknown format {fmt!r}: md, html or pdf")
    written.insert(0, out)
    return written


def cli_main(args) -> int:
    """``wattspan audit`` (called by :mod:`wattspan.cli`)."""
    fmt = args.format or (args.out.suffix.lower().lstrip(".") if args.out is not None else "md")
    fmt = {"markdown": "md", "htm": "html"}.get(fmt, fmt)
    if fmt not in ("md", "html", "pdf"):
        raise ValueError(f"cannot tell the format from {args.out}: use a .md, .html or .pdf name, or --format")
    if fmt != "md" and args.out is None:
        raise ValueError(f"--format {fmt} needs --out FILE")
    if fmt == "pdf":
        import importlib.util

        if importlib.util.find_spec("fpdf") is None:
            raise ValueError("a PDF needs fpdf2: pip install 'wattspan[audit]' (or write .html and print it)")
    if args.out is not None:  # before the work: a path it cannot write is one line, not a traceback after it
        from ._paths import writable_file

        writable_file(args.out, "--out", f"audit.{fmt}")
    mi = args.market_intensity
    if mi is not None and not (math.isfinite(mi) and 0 <= mi <= 2500):
        raise ValueError(f"--market-intensity must be gCO2e/kWh from 0 to 2500, got {mi!r}")
    if args.records is not None:
        basis = from_attribute(args.records, args.summary)
    elif args.since is not None or args.until is not None:
        if args.run:
            raise ValueError("give either --run or --since/--until, not both")
        since, until = parse_time(args.since), parse_time(args.until)
        if since is not None and until is not None and since >= until:
            raise ValueError(f"--since {args.since} is not before --until {args.until}: the period is empty")
        basis = from_ledger(args.db, since, until)
    else:
        from .export.ledger.runs import list_runs

        if args.run or list_runs(args.db):
            try:
                basis = from_run(args.db, args.run or "last")
            except (KeyError, TypeError, IndexError) as exc:  # an edited summary, or another version's
                raise ValueError(f"the run in {args.db} is damaged: its summary lacks or mangles {exc} "
                                 "(was it edited, or written by another wattspan?)") from None
        else:
            basis = from_ledger(args.db)
    carbon = carbon_for(basis, region=args.region, intensity=args.intensity, intensity_source=args.intensity_source,
                        pue=args.pue, embodied_kg=args.embodied_kg, lifetime_years=args.lifetime_years,
                        utilisation=args.utilisation, lca_boundary=args.lca_boundary)
    market, market_source = args.market_intensity, args.market_source
    recorded_market = (basis.recorded_carbon or {}).get("market_g_per_kwh") if basis.kind == "run" else None
    if market is None and recorded_market:  # the factor `wattspan run --market-g-per-kwh` recorded with the run
        market, market_source = float(recorded_market), market_source or "as recorded with the run (--market-g-per-kwh)"
    report = build_report(basis, carbon, market_intensity=market, market_source=market_source,
                          boundary=args.boundary, title=args.title,
                          equivalent=(args.equivalent_g, args.equivalent_unit, args.equivalent_source),
                          audit_command="wattspan audit " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["audit"] else "wattspan audit")
    try:
        paths = write(report, args.out, fmt)
    except OSError as exc:  # a disk full (/dev/full), a folder in the way of a chart file
        raise ValueError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0
