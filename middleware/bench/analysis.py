"""From a bench's client results and wattspan's records to every number of the report.

:func:`analyse` is deterministic given its inputs (no I/O, no clock): the runner feeds
it what the load generator saw and what the ledger holds; the report renders its
result, and ``report.json`` is that result.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .load import PhaseResult
from .projection import (
    BASES,
    ERROR_BANDS,
    ModeMeasure,
    Region,
    accuracy_row,
    error_band,
    measure,
    per_request,
    project,
    sensitivity_grid,
    winner_grid,
)

__all__ = ["Assumptions", "analyse", "DEFAULT_INTENSITIES", "DEFAULT_PUES"]

DEFAULT_INTENSITIES = tuple(float(x) for x in np.arange(20.0, 900.0 + 1e-9, 20.0))  # 45 values, gCO2e/kWh
DEFAULT_PUES = tuple(round(float(x), 2) for x in np.arange(1.0, 1.6 + 1e-9, 0.02))  # 31 values


@dataclass(frozen=True)
class Assumptions:
    """How measured energy becomes a projection.

    ``embodied_kg``/``lifetime_years``: embodied carbon of the serving device (None: no
    embodied share); ``basis``: the idle basis of the verdict and the sensitivity chart.
    """

    calls: int = 1_000_000
    regions: tuple[Region, ...] = ()
    embodied_kg: float | None = 318.0
    lifetime_years: float = 4.0
    embodied_source: str = ""
    include_host: bool = False
    basis: str = "amortised"
    intensities: tuple[float, ...] = DEFAULT_INTENSITIES
    pues: tuple[float, ...] = DEFAULT_PUES

    @property
    def g_per_device_s(self) -> float:
        if self.embodied_kg is None:
            return 0.0
        from ..carbon import Embodied

        return Embodied(kgco2e_per_device=float(self.embodied_kg), lifetime_years=float(self.lifetime_years)).g_per_device_s


def _pct(x: Sequence[float], q: float) -> float | None:
    a = np.asarray([v for v in x if v is not None and math.isfinite(v)], dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else None


def _client_stats(ph: PhaseResult) -> dict:
    res = ph.results
    ok = [r for r in res if r.ok]
    calls = sum(r.items for r in res)
    ok_calls = sum(r.items_ok for r in res)
    sent = np.array([r.sent_s for r in res], dtype=np.float64)
    done = np.array([r.sent_s + (r.latency_s if math.isfinite(r.latency_s) else 0.0) for r in res])
    wall = float(done.max() - sent.min()) if res else 0.0
    out: dict[str, Any] = {
        "calls": calls, "calls_ok": ok_calls, "http_requests": len(res), "http_ok": len(ok),
        "errors": dict(Counter(r.error for r in res if r.error)),
        "wall_s": wall,
        "throughput_rps": ok_calls / wall if wall > 0 else None,
        "latency_p50_s": _pct([r.latency_s for r in ok], 50), "latency_p95_s": _pct([r.latency_s for r in ok], 95),
        "ttft_p50_s": _pct([r.ttft_s for r in ok], 50), "ttft_p95_s": _pct([r.ttft_s for r in ok], 95),
        "target_rate": None, "scheduled_rate": None, "achieved_rate": None,
        "send_lag_p50_s": None, "send_lag_p95_s": None, "saturated": False,
    }
    if ph.spec.mode == "open" and len(res) > 1:
        sched = np.array([r.scheduled_s for r in res])
        order = np.argsort(sched, kind="stable")
        sched, s_sent = sched[order], sent[order]
        lag = s_sent - sched
        out["target_rate"] = float(ph.target_rate)
        out["scheduled_rate"] = (len(res) - 1) / float(sched[-1] - sched[0]) if sched[-1] > sched[0] else None
        span = float(s_sent.max() - s_sent.min())
        out["achieved_rate"] = (len(res) - 1) / span if span > 0 else None
        out["send_lag_p50_s"], out["send_lag_p95_s"] = _pct(lag, 50), _pct(lag, 95)
        # late by more than a tenth of the mean gap (and 2 ms): the generator could not keep up
        out["saturated"] = bool(out["send_lag_p95_s"] > max(0.002, 0.1 / float(ph.target_rate)))
    return out


def _phase_records(ph: PhaseResult, records: Mapping[str, dict]) -> tuple[list[dict], list[int], int]:
    recs, items, missing = [], [], 0
    for r in ph.results:
        rec = records.get(r.rid) if r.rid else None
        if rec is None:
            missing += 1 if r.rid else 0
            continue
        recs.append(rec)
        items.append(max(1, int(r.items)))
    return recs, items, missing


def _measure(recs: list[dict], items: list[int]) -> ModeMeasure:
    col = lambda k: [r[k] for r in recs]  # noqa: E731
    return measure(start_ns=col("start_ns"), end_ns=col("end_ns"), energy_j=col("energy_j"), dynamic_j=col("dynamic_j"),
                   idle_j=col("idle_j"), host_j=col("host_j"), device_s=col("device_s"), items=items,
                   prompt_tokens=col("prompt_tokens"), output_tokens=col("output_tokens"))


def analyse(phases: Sequence[PhaseResult], records: Mapping[str, dict], a: Assumptions) -> dict:
    """Every number of a bench report (see the module docstring).

    ``records``: ledger records by request id (``wattspan.export.ledger.query`` rows); requests
    whose id has no record are counted as ``missing`` and left out of the energy figures.
    """
    if a.basis not in BASES:
        raise ValueError(f"basis must be one of {', '.join(BASES)}, got {a.basis!r}")
    g_s = a.g_per_device_s
    out_phases = []
    all_recs: list[dict] = []
    for ph in phases:
        recs, items, missing = _phase_records(ph, records)
        all_recs += recs
        entry: dict[str, Any] = {"name": ph.spec.name, "label": ph.spec.label, "mode": ph.spec.mode, "value": ph.spec.value,
                 "client": _client_stats(ph), "missing_records": missing}
        if recs:
            m = _measure(recs, items)
            band = error_band([r["method"] for r in recs], [r["sensor"] for r in recs],
                              [r["coverage"] for r in recs], [r["energy_j"] for r in recs])
            entry["records"] = {**asdict(m), "idle_w": m.idle_w, "gap_s": m.gap_s,
                                "unattributed_idle_j": m.unattributed_idle_j, "utilisation": m.utilisation,
                                "simulated": any(bool(r["simulated"]) for r in recs)}
            entry["per_request"] = {b: asdict(per_request(m, b, include_host=a.include_host)) for b in BASES}
            entry["per_request"]["host_j"] = m.host_j / m.requests
            entry["error_band"] = band
            c = entry["client"]
            entry["output_tokens_per_s"] = m.output_tokens / c["wall_s"] if c["wall_s"] else None
        else:
            entry["records"] = None
            entry["per_request"] = None
            entry["error_band"] = None
        out_phases.append(entry)

    measured = [p for p in out_phases if p["records"]]
    rows = []
    for p in measured:
        for reg in a.regions:
            for b in BASES:
                pr = p["per_request"][b]
                proj = project(energy_j_per_request=pr["energy_j"], device_s_per_request=pr["device_s"], calls=a.calls,
                               intensity_g_per_kwh=reg.intensity_g_per_kwh, pue=reg.pue, embodied_g_per_device_s=g_s)
                band = p["error_band"]
                rows.append({"phase": p["name"], "region": reg.label, "basis": b, **asdict(proj),
                             "per_request_g": proj.per_request_g, "per_1k_g": proj.per_1k_g,
                             "embodied_share": proj.embodied_share,
                             "low_g": proj.operational_g * (1 - band) + proj.embodied_g,
                             "high_g": proj.operational_g * (1 + band) + proj.embodied_g})

    sens = _sensitivity(measured, a, g_s)
    quality: dict[str, Any] = {
        "records": len(all_recs),
        "missing_records": sum(p["missing_records"] for p in out_phases),
        "simulated_records": sum(bool(r["simulated"]) for r in all_recs),
        "sensors": dict(Counter(r["sensor"] for r in all_recs)),
        "methods": dict(Counter(r["method"] for r in all_recs)),
        "coverage_min": min((float(r["coverage"]) for r in all_recs), default=None),
        "coverage_mean": float(np.mean([r["coverage"] for r in all_recs])) if all_recs else None,
        "accuracy_rows": {s: accuracy_row(s) for s in sorted({r["sensor"] for r in all_recs})},
        "error_bands": {k: dict(v) for k, v in ERROR_BANDS.items()},
    }
    return {
        "simulated": quality["simulated_records"] > 0,
        "assumptions": {"calls": a.calls, "regions": [asdict(r) for r in a.regions], "embodied_kg": a.embodied_kg,
                        "lifetime_years": a.lifetime_years, "embodied_g_per_device_s": g_s,
                        "embodied_source": a.embodied_source, "include_host": a.include_host, "basis": a.basis},
        "phases": out_phases,
        "projection": rows,
        "sensitivity": sens,
        "quality": quality,
        "verdict": _verdict(measured, rows, a),
        "requests": _request_table(phases, records),
    }


def _sensitivity(measured: list[dict], a: Assumptions, g_s: float) -> dict:
    grams = {}
    for p in measured:
        pr = p["per_request"][a.basis]
        grams[p["name"]] = sensitivity_grid(energy_j_per_request=pr["energy_j"], device_s_per_request=pr["device_s"],
                                            intensities_g_per_kwh=a.intensities, pues=a.pues,
                                            embodied_g_per_device_s=g_s, calls=a.calls)
    batch = next((p for p in measured if p["mode"] == "batch"), None)
    winners, summary = {}, {}
    if batch is not None:
        b = grams[batch["name"]]
        for p in measured:
            if p["mode"] == "batch":
                continue
            w = winner_grid(grams[p["name"]], b, rel_err_a=p["error_band"], rel_err_b=batch["error_band"])
            winners[p["name"]] = w.tolist()
            n = w.size
            summary[p["name"]] = {"on_demand_wins": float((w == -1).sum() / n), "batch_wins": float((w == 1).sum() / n),
                                  "too_close": float((w == 0).sum() / n),
                                  "ratio_min": float((grams[p["name"]] / b).min()),
                                  "ratio_max": float((grams[p["name"]] / b).max())}
    return {"basis": a.basis, "calls": a.calls, "intensities_g_per_kwh": list(a.intensities), "pues": list(a.pues),
            "grams": {k: v.tolist() for k, v in grams.items()}, "batch_phase": batch["name"] if batch else None,
            "winner": winners, "summary": summary,
            "winner_codes": {"-1": "on demand emits less", "0": "too close to call (bands overlap)",
                             "1": "batch emits less"}}


def _verdict(measured: list[dict], rows: list[dict], a: Assumptions) -> dict:
    if not measured or not a.regions:
        return {}
    reg = a.regions[0].label
    per = {r["phase"]: r for r in rows if r["region"] == reg and r["basis"] == a.basis}
    best = min(per.values(), key=lambda r: r["total_g"])
    batch = next((p["name"] for p in measured if p["mode"] == "batch"), None)
    comparisons = []
    if batch is not None:
        for p in measured:
            if p["mode"] != "batch":
                comparisons.append({"on_demand": p["name"], "batch": batch,
                                    "energy_ratio": per[p["name"]]["energy_j_per_request"] / per[batch]["energy_j_per_request"]
                                    if per[batch]["energy_j_per_request"] > 0 else None,
                                    "co2e_ratio": per[p["name"]]["total_g"] / per[batch]["total_g"]
                                    if per[batch]["total_g"] > 0 else None})
    return {"region": reg, "basis": a.basis, "calls": a.calls, "lowest": best["phase"], "lowest_total_g": best["total_g"],
            "per_phase_total_g": {k: v["total_g"] for k, v in per.items()}, "comparisons": comparisons}


_REQ_COLUMNS = ("phase", "index", "rid", "status", "ok", "items", "sent_s", "latency_s", "ttft_s",
                "energy_j", "dynamic_j", "idle_j", "host_j", "device_s", "method", "coverage")


def _round(v):
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    return v


def _request_table(phases: Sequence[PhaseResult], records: Mapping[str, dict]) -> dict:
    rows = []
    for ph in phases:
        for r in ph.results:
            rec = records.get(r.rid) or {}
            rows.append([_round(v) for v in (ph.spec.name, r.index, r.rid, r.status, r.ok, r.items, r.sent_s, r.latency_s,
                                             r.ttft_s, rec.get("energy_j"), rec.get("dynamic_j"), rec.get("idle_j"),
                                             rec.get("host_j"), rec.get("device_s"), rec.get("method"), rec.get("coverage"))])
    return {"columns": list(_REQ_COLUMNS), "rows": rows,
            "note": "one row per HTTP request; a batch row's energy is the whole batch's (items calls)"}
