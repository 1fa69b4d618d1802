"""The bench report: ``report.json`` (every number), ``report.md`` and ``report.html`` (one
page each, the same content, built from the same blocks) and PNG charts (matplotlib, Agg)."""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path

import numpy as np

__all__ = ["write_report", "render_markdown", "render_html", "build_blocks", "fmt_sig"]

CHARTS = {"energy": "energy.png", "projection": "projection.png", "sensitivity": "sensitivity.png", "deployment": "deployment.png"}
_SIM_BANNER = ("POWER IS SIMULATED: no power sensor was read on this machine. Every joule and gram below comes from "
               "wattspan's labelled simulated GPU, driven by the real batch steps of the demo server. The numbers show "
               "the method and how the modes compare on this workload; they are not measurements of real hardware.")


def fmt_sig(v, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, thousands separators for large values; '-' for None/NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    v = float(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits - 1:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def _ms(v) -> str:
    return "-" if v is None else fmt_sig(v * 1000.0)


def _pct(v) -> str:
    return "-" if v is None else f"{100.0 * v:.1f} %"


def _grams(g: float) -> str:
    """Grams, or kilograms / tonnes when large."""
    if g is None or not math.isfinite(g):
        return "-"
    if g >= 1e6:
        return f"{fmt_sig(g / 1e6)} t"
    if g >= 1e3:
        return f"{fmt_sig(g / 1e3)} kg"
    return f"{fmt_sig(g)} g"


# --------------------------------------------------------------------------------- blocks

def _embodied(rep: dict) -> str:
    """How the figures count the hardware's embodied carbon: included, or left out (``--no-embodied``)."""
    g = (rep.get("assumptions") or {}).get("embodied_g_per_device_s") or 0.0
    return "embodied included" if g > 0 else "embodied left out"


def build_blocks(rep: dict) -> list[tuple]:
    """The report as blocks: ``("h1"|"h2"|"p"|"banner"|"code", text)``, ``("list", [str])``,
    ``("table", headers, rows)``, ``("img", file, alt)``."""
    b: list[tuple] = []
    cfg = rep["config"]
    a = rep["assumptions"]
    calls = a["calls"]
    b.append(("h1", "wattspan bench: on demand or in batches?"))
    if rep["simulated"]:
        b.append(("banner", _SIM_BANNER))
    b.append(("p", f"Command: `{rep['command']}`"))
    tgt = rep["target"]
    b.append(("p", f"Target: {tgt['description']}. Workload: {cfg['requests']} {cfg['workload'][:-1]} requests per phase "
                   f"(seed {cfg['seed']}"
                   + (f", {cfg['max_tokens']} tokens each" if cfg["workload"] == "completions" else "")
                   + "), the same requests in every phase. Energy per request comes from wattspan's own records "
                     "(the ledger), matched to each response's `x-wattspan-request-id`."))

    v = rep.get("verdict") or {}
    if v:
        b.append(("h2", "Answer"))
        items = []
        phases = {p["name"]: p for p in rep["phases"]}
        basis_txt = {"dynamic": "counting only the energy above idle",
                     "attributed": "counting the idle power while requests are in flight",
                     "amortised": "amortising all idle time of the run over its requests"}[v["basis"]]
        items.append(f"Lowest footprint ({basis_txt}): **{phases[v['lowest']]['label']}**, "
                     f"{_grams(v['lowest_total_g'])} CO2e per {calls:,} calls in {v['region']}.")
        for c in v.get("comparisons", []):
            if c["energy_ratio"] is None:
                continue
            od, bt = phases[c["on_demand"]], phases[c["batch"]]
            items.append(f"{od['label']}: {fmt_sig(c['energy_ratio'])}x the energy per call of {bt['label']}, "
                         f"{fmt_sig(c['co2e_ratio'])}x the CO2e.")
        sens = rep["sensitivity"]
        if sens.get("summary"):
            parts = [f"{phases[name]['label']}: batch lower in {_pct(s['batch_wins'])} of the range, on demand lower in "
                     f"{_pct(s['on_demand_wins'])}, too close to call in {_pct(s['too_close'])}"
                     for name, s in sens["summary"].items()]
            ii, pp = sens["intensities_g_per_kwh"], sens["pues"]
            items.append(f"Across grid intensity {ii[0]:g}-{ii[-1]:g} g/kWh and PUE {pp[0]:.2f}-{pp[-1]:.2f} "
                         f"({_embodied(rep)}): " + "; ".join(parts) + ".")
        b.append(("list", items))

    # ---- measured
    b.append(("h2", "Measured, per phase"))
    hdr = ["phase", "calls ok", "wall s", "rate target / achieved", "throughput req/s", "latency p50 / p95 ms",
           "TTFT p50 / p95 ms", "utilisation"]
    rows = []
    for p in rep["phases"]:
        c, r = p["client"], p["records"] or {}
        rate = "-" if c["target_rate"] is None else f"{fmt_sig(c['target_rate'])} / {fmt_sig(c['achieved_rate'])}"
        if c.get("saturated"):
            rate += " (generator late)"
        rows.append([p["label"], f"{c['calls_ok']}/{c['calls']}", fmt_sig(c["wall_s"]), rate, fmt_sig(c["throughput_rps"]),
                     f"{_ms(c['latency_p50_s'])} / {_ms(c['latency_p95_s'])}",
                     f"{_ms(c['ttft_p50_s'])} / {_ms(c['ttft_p95_s'])}", _pct(r.get("utilisation"))])
    b.append(("table", hdr, rows))
    b.append(("p", "Batch latency is the turnaround of a whole batch. Utilisation: share of the phase's wall time with at "
                   "least one request in flight, from the records."))

    hdr = ["phase", "dynamic J/call", "+ idle in flight J/call", "+ all idle amortised J/call", "device-s/call",
           "idle W", "host J/call", "band (p95)"]
    rows = []
    for p in rep["phases"]:
        if not p["per_request"]:
            rows.append([p["label"], "no records", "", "", "", "", "", ""])
            continue
        pr = p["per_request"]
        rows.append([p["label"], fmt_sig(pr["dynamic"]["energy_j"]), fmt_sig(pr["attributed"]["energy_j"]),
                     fmt_sig(pr["amortised"]["energy_j"]), fmt_sig(pr["attributed"]["device_s"]),
                     fmt_sig(p["records"]["idle_w"]), fmt_sig(pr["host_j"]), f"+-{_pct(p['error_band'])}"])
    b.append(("table", hdr, rows))
    b.append(("p", "Energy of the accelerator"
                   + (" plus the host's attributed energy" if a["include_host"] else
                      " (the host's estimated CPU energy is shown apart and left out; `--include-host` adds it)")
                   + "; this comparison's CO2e prices that energy (wattspan's own records, spans and ledger price "
                     "accelerator + host energy, the host kept apart in `host_j`)"
                   + ". Three ways of counting idle: *dynamic* is only what the requests added above the idle "
                     "baseline; *+ idle in flight* is what wattspan bills (each request's share of idle power while it "
                     "runs); *+ all idle amortised* also spreads the idle energy of the gaps with nothing in flight "
                     "(idle W x idle seconds) over the phase's calls: what a device dedicated to this load costs. "
                     "On-demand serving at low load pays for that idle time. *idle W* is the idle power the records "
                     "imply (their idle J over their busy seconds); in a phase with no idle gaps the meter cannot "
                     "observe idle and fits it, so there the split between dynamic and idle is less certain than "
                     "their sum."))
    b.append(("img", CHARTS["energy"], "energy per call and latency per phase"))

    # ---- projection
    b.append(("h2", f"Projected to {calls:,} calls"))
    emb = ("no embodied share" if a["embodied_kg"] is None else
           f"embodied {fmt_sig(a['embodied_kg'])} kgCO2e per device over {fmt_sig(a['lifetime_years'])} years = "
           f"{fmt_sig(a['embodied_g_per_device_s'] * 3600)} g per device-hour ({a['embodied_source']})")
    b.append(("p", f"gCO2e = energy x calls / 3.6e6 J/kWh x PUE x grid intensity + device-seconds x calls x embodied "
                   f"g/device-s; {emb}. Device-seconds per call: for *dynamic only* and *+ idle in flight*, the records' "
                   "device-seconds; for *+ all idle amortised*, the phase's wall seconds (a device dedicated to this load "
                   "is occupied all along, busy or idle), over its calls. Ranges are the measurement band of the "
                   "operational part."))
    hdr = ["region", "g/kWh", "PUE", "phase", "kWh (amortised)", "dynamic only", "+ idle in flight",
           "+ all idle amortised", "per 1k calls (amortised)", "embodied share"]
    rows = []
    proj = rep["projection"]
    for reg in a["regions"]:
        for p in rep["phases"]:
            sel = {r["basis"]: r for r in proj if r["region"] == reg["label"] and r["phase"] == p["name"]}
            if not sel:
                continue
            am = sel["amortised"]
            rows.append([reg["label"], fmt_sig(reg["intensity_g_per_kwh"]), fmt_sig(reg["pue"]), p["label"],
                         fmt_sig(am["facility_kwh"]), _grams(sel["dynamic"]["total_g"]),
                         _grams(sel["attributed"]["total_g"]),
                         f"{_grams(am['total_g'])} ({_grams(am['low_g'])}-{_grams(am['high_g'])})",
                         _grams(am["per_1k_g"]), _pct(am["embodied_share"])])
    b.append(("table", hdr, rows))
    b.append(("p", "Regions: " + "; ".join(f"{r['label']}: {fmt_sig(r['intensity_g_per_kwh'])} g/kWh ({r['source']}), "
                                         f"PUE {fmt_sig(r['pue'])} ({r['pue_source']})" for r in a["regions"]) + "."))
    b.append(("img", CHARTS["projection"], "gCO2e per calls against grid intensity"))

    # ---- each mode in its own region and hours (--deploy)
    dep = rep.get("deployment")
    if dep and dep.get("rows"):
        b.append(("h2", "Each mode in its own region and hours"))
        b.append(("p", f"gCO2e per {calls:,} calls ({dep['basis']} basis, {_embodied(rep)}) with each mode deployed where "
                       "and when `--deploy MODE=REGION[@HOURS]` says. Hours are UTC; `cleanest:N` takes the N cleanest hours "
                       "of the day month by month from the region's 2023 hourly profile; a region without a profile has "
                       "one value at every hour."))
        hdr = ["deployment", "phase", "g/kWh (those hours)", "PUE", f"gCO2e per {calls:,} calls", "per 1k calls"]
        rows = [[r["deploy"], r["label"], fmt_sig(r["intensity_g_per_kwh"]), fmt_sig(r["pue"]),
                 f"{_grams(r['total_g'])} ({_grams(r['low_g'])}-{_grams(r['high_g'])})", _grams(r["per_1k_g"])]
                for r in dep["rows"]]
        b.append(("table", hdr, rows))
        best = dep["best"]
        b.append(("p", f"Lowest: {best['label']} deployed as {best['deploy']}, {_grams(best['total_g'])} per {calls:,} calls. "
                       "Sources: " + "; ".join(f"{d['mode']}={d['region']}@{d['hours']}: {d['source']}, PUE {fmt_sig(d['pue'])} "
                                               f"({d['pue_source']})" for d in dep["deployments"]) + "."))
        b.append(("img", CHARTS["deployment"], "gCO2e per calls against how many of the cleanest hours each deployment runs in"))

    if dep and dep.get("unmatched"):
        b.append(("p", "No measured phase for " + ", ".join(f"`--deploy {u}`" for u in dep["unmatched"])
                       + ": its mode's phases did not run or measured nothing, so it has no figure here."))

    # ---- sensitivity
    sens = rep["sensitivity"]
    b.append(("h2", "Sensitivity: which mode wins where"))
    if sens.get("winner"):
        b.append(("p", f"gCO2e per {calls:,} calls ({sens['basis']} basis, {_embodied(rep)}) over grid intensity "
                       f"{sens['intensities_g_per_kwh'][0]:g}-{sens['intensities_g_per_kwh'][-1]:g} g/kWh "
                       f"and PUE {sens['pues'][0]:.2f}-{sens['pues'][-1]:.2f}, each on-demand phase against "
                       f"{next(p['label'] for p in rep['phases'] if p['name'] == sens['batch_phase'])}. Colour: how much "
                       "more (red) or less (blue) on demand emits than batch; hatched: the two measurement bands overlap "
                       "(too close to call); markers: the chosen regions."))
        b.append(("img", CHARTS["sensitivity"], "which mode emits less across grid intensity and PUE"))
        hdr = ["on-demand phase", "batch wins", "on demand wins", "too close", "on-demand/batch ratio (min-max)"]
        rows = [[next(p["label"] for p in rep["phases"] if p["name"] == k), _pct(s["batch_wins"]),
                 _pct(s["on_demand_wins"]), _pct(s["too_close"]), f"{fmt_sig(s['ratio_min'])}-{fmt_sig(s['ratio_max'])}"]
                for k, s in sens["summary"].items()]
        b.append(("table", hdr, rows))
    else:
        b.append(("p", "Needs a batch phase and an on-demand phase with records; the grid is in report.json."))

    # ---- uncertainty
    q = rep["quality"]
    b.append(("h2", "Uncertainty"))
    b.append(("p", f"{q['records']} records ({q['simulated_records']} simulated, {q['missing_records']} requests without a "
                   f"record); methods: {_counts(q['methods'])}; sensors: {_counts(q['sensors'])}; coverage min "
                   f"{fmt_sig(q['coverage_min'])}, mean {fmt_sig(q['coverage_mean'])}."))
    b.append(("p", "Each record's band is the 95th-percentile per-request error of its method on its kind of sensor, from "
                   "`benchmarks/results/accuracy.md`, plus the share of its lifetime the power trace missed "
                   "(1 - coverage); a phase's band is the energy-weighted mean. Mapping (sensor -> accuracy row): "
                   + "; ".join(f"`{s}` -> {row}" for s, row in q["accuracy_rows"].items())
                   + ". A record without a trace (`no-trace`) gets +-100 %. For simulated power the band covers the "
                     "attribution only: how far a real device differs is not known."))
    hdr = ["accuracy row", "batch-fit p95", "time-share p95"]
    b.append(("table", hdr, [[k, _pct(v["batch-fit"]), _pct(v["time-share"])] for k, v in q["error_bands"].items()]))

    # ---- load generator and setup
    b.append(("h2", "Load generator"))
    b.append(("p", "One httpx.AsyncClient on one asyncio loop, in its own process (the server runs in another). It "
                   "manages a few hundred requests per second (about 300/s closed-loop on a 2-core machine against a trivial "
                   "server); the table's achieved rate against the target and the "
                   "send lag show when it falls behind. For more load, start `wattspan bench --url URL --load-only "
                   "--out DIR_i --seed i` on several machines (with `--start-at` a shared unix time), then build one "
                   "report with `wattspan bench --merge DIR_1/load.json DIR_2/load.json --db LEDGER`."))
    lag = [[p["label"], fmt_sig(p["client"]["target_rate"]), fmt_sig(p["client"]["scheduled_rate"]),
            fmt_sig(p["client"]["achieved_rate"]), _ms(p["client"]["send_lag_p50_s"]), _ms(p["client"]["send_lag_p95_s"])]
           for p in rep["phases"] if p["mode"] == "open"]
    if lag:
        b.append(("table", ["open-loop phase", "target req/s", "this Poisson draw req/s", "sent req/s",
                            "send lag p50 ms", "send lag p95 ms"], lag))
    b.append(("h2", "Setup"))
    t = rep["timings_s"]
    b.append(("list", [f"Phases, in this order: {'; '.join(p['label'] for p in rep['phases'])}.",
                       f"Seeds: workload {rep['seeds']['workload']}; Poisson arrivals "
                       + (", ".join(f"{k} {v}" for k, v in rep["seeds"]["arrivals"].items()) or "none") + ".",
                       f"Timings: {', '.join(f'{k} {fmt_sig(v)} s' for k, v in t.items())}.",
                       "Versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()) + ".",
                       f"Machine: {rep['machine']['platform']}, {rep['machine']['cpus']} CPUs.",
                       "Every number, the exact configuration and each request's row: `report.json`."]))
    return b


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            out.append(f"# {blk[1]}")
        elif kind == "h2":
            out.append(f"## {blk[1]}")
        elif kind == "p":
            out.append(blk[1])
        elif kind == "banner":
            out.append(f"> **{blk[1]}**")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            hdr, rows = blk[1], blk[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in hdr) + " |", "|" + "---|" * len(hdr)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        elif kind == "code":
            out.append(f"```\n{blk[1]}\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(s: str) -> str:
    """Escape, then the two inline marks the blocks use: `code` and **bold**, *italic*."""
    import re

    s = html.escape(str(s), quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", s)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .6em;"
        "text-align:left}th{background:#f3f3f3}.banner{background:#fff3cd;border:2px solid #d39e00;padding:1em;"
        "font-weight:bold}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")


def render_html(blocks: list[tuple], title: str = "wattspan bench") -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline_html(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "banner":
            out.append(f"<p class='banner'>{_inline_html(blk[1])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            hdr, rows = blk[1], blk[2]
            out.append("<table><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in hdr) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows)
                       + "</table>")
        elif kind == "img":
            out.append(f"<p><img src='{html.escape(blk[1])}' alt='{html.escape(blk[2])}'></p>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------- charts

def _charts(rep: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    phases = [p for p in rep["phases"] if p["per_request"]]
    sim = " (SIMULATED power)" if rep["simulated"] else ""
    if not phases:
        return made
    labels = [p["label"].replace(", ", ",\n") for p in phases]
    x = np.arange(len(phases))

    # 1. energy per call (stacked by idle basis) and latency
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    dyn = np.array([p["per_request"]["dynamic"]["energy_j"] for p in phases])
    att = np.array([p["per_request"]["attributed"]["energy_j"] for p in phases])
    am = np.array([p["per_request"]["amortised"]["energy_j"] for p in phases])
    band = np.array([p["error_band"] for p in phases])
    ax.bar(x, dyn, color="#4c72b0", label="dynamic (above idle)")
    ax.bar(x, att - dyn, bottom=dyn, color="#dd8452", label="idle while in flight")
    ax.bar(x, am - att, bottom=att, color="#c7c7c7", hatch="//", label="idle gaps, amortised")
    ax.errorbar(x, am, yerr=am * band, fmt="none", ecolor="k", capsize=4, lw=1)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("J per call")
    ax.set_title("Accelerator energy per call" + sim, fontsize=10)
    ax.legend(fontsize=8)
    p50 = [1000 * (p["client"]["latency_p50_s"] or 0) for p in phases]
    p95 = [1000 * (p["client"]["latency_p95_s"] or 0) for p in phases]
    t50 = [1000 * (p["client"]["ttft_p50_s"] or 0) for p in phases]
    w = 0.27
    ax2.bar(x - w, t50, w, color="#55a868", label="TTFT p50")
    ax2.bar(x, p50, w, color="#4c72b0", label="latency p50")
    ax2.bar(x + w, p95, w, color="#8172b3", label="latency p95")
    ax2.set_yscale("log")
    ax2.set_xticks(x, labels, fontsize=8)
    ax2.set_ylabel("ms (batch: whole-batch turnaround)")
    ax2.set_title("Latency", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / CHARTS["energy"], dpi=90)
    plt.close(fig)
    made.append(CHARTS["energy"])

    # 2. projection: gCO2e per N calls against intensity, PUE range as a band
    sens = rep["sensitivity"]
    ii = np.array(sens["intensities_g_per_kwh"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    regs = rep["assumptions"]["regions"]
    # the line uses the table's PUE (the first region's), so the line and the table agree; each
    # region's own table figure is a marker on it or beside it
    line_pue = float(regs[0]["pue"]) if regs else 1.0
    calls_n = rep["assumptions"]["calls"]
    g_s = float(rep["assumptions"].get("embodied_g_per_device_s") or 0.0)
    rows_by = {(r["phase"], r["region"]): r for r in rep.get("projection", []) if r["basis"] == sens["basis"]}
    for k, p in enumerate(phases):
        g = np.array(sens["grams"][p["name"]])
        col = f"C{k}"
        pr = p["per_request"][sens["basis"]]
        line = pr["energy_j"] * calls_n / 3.6e6 * line_pue * ii + pr["device_s"] * calls_n * g_s
        ax.plot(ii, line / 1e3, color=col, label=p["label"])
        ax.fill_between(ii, g[0] / 1e3, g[-1] / 1e3, color=col, alpha=0.15)
        for reg in regs:
            r = rows_by.get((p["name"], reg["label"]))
            if r is not None:
                ax.plot(reg["intensity_g_per_kwh"], r["total_g"] / 1e3, "o", color=col, ms=4)
    for reg in regs:
        ax.axvline(reg["intensity_g_per_kwh"], color="0.6", lw=0.8, ls=":")
        ax.text(reg["intensity_g_per_kwh"], ax.get_ylim()[1] * 0.98, reg["label"], rotation=90, va="top", ha="right",
                fontsize=7, color="0.4")
    ax.set_xlabel("grid intensity, gCO2e/kWh")
    ax.set_ylabel(f"kgCO2e per {rep['assumptions']['calls']:,} calls")
    ax.set_title(f"{sens['basis']} basis, embodied incl.; line: PUE {line_pue:.2f} as in the table, dots: the table; "
                 f"band: PUE {sens['pues'][0]:.1f}-{sens['pues'][-1]:.1f}{sim}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / CHARTS["projection"], dpi=90)
    plt.close(fig)
    made.append(CHARTS["projection"])

    # 3. sensitivity: which mode wins where
    if sens.get("winner"):
        from matplotlib.colors import Normalize

        names = list(sens["winner"])
        pp = np.array(sens["pues"])
        b = np.array(sens["grams"][sens["batch_phase"]])
        fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names) + 1.2, 4.1), squeeze=False)
        # colour: log2 of on-demand grams over batch grams (0: equal; +1: on demand emits twice as much)
        logr = [np.log2(np.maximum(np.array(sens["grams"][n]), 1e-300) / np.maximum(b, 1e-300)) for n in names]
        lim = max(np.log2(1.25), float(max(np.abs(r).max() for r in logr)))
        norm = Normalize(-lim, lim)
        label_of = {p["name"]: p["label"] for p in rep["phases"]}
        for ax, n, lr in zip(axes[0], names, logr):
            win = np.array(sens["winner"][n])
            m = ax.pcolormesh(ii, pp, lr, cmap="RdBu_r", norm=norm, shading="nearest")
            if (win == 0).any():
                ax.contourf(ii, pp, (win == 0).astype(float), levels=[0.5, 1.5], colors="none", hatches=["xxx"])
            if lr.min() < 0 < lr.max():
                ax.contour(ii, pp, lr, levels=[0.0], colors="k", linewidths=1)
            for reg in rep["assumptions"]["regions"]:
                if ii[0] <= reg["intensity_g_per_kwh"] <= ii[-1] and pp[0] <= reg["pue"] <= pp[-1]:
                    ax.plot(reg["intensity_g_per_kwh"], reg["pue"], "k^", ms=5)
                    ax.annotate(reg["label"], (reg["intensity_g_per_kwh"], reg["pue"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
            share = sens["summary"][n]
            ax.set_title(f"{label_of[n]}\nbatch wins {100 * share['batch_wins']:.0f} %, on demand "
                         f"{100 * share['on_demand_wins']:.0f} %, too close {100 * share['too_close']:.0f} %", fontsize=8)
            ax.set_xlabel("grid intensity, gCO2e/kWh", fontsize=8)
            ax.set_ylabel("PUE", fontsize=8)
            ax.tick_params(labelsize=7)
        cb = fig.colorbar(m, ax=axes[0].tolist(), shrink=0.9)
        ticks = [t for t in (-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3) if abs(t) <= lim]
        cb.set_ticks(ticks)
        cb.set_ticklabels([f"{2 ** t:.2g}x" for t in ticks])
        cb.ax.tick_params(labelsize=7)
        cb.set_label("on-demand gCO2e / batch gCO2e (red: batch emits less)", fontsize=8)
        fig.suptitle(f"Which mode emits less per {rep['assumptions']['calls']:,} calls ({sens['basis']} basis, embodied "
                     f"included){sim}; hatched: too close to call", fontsize=9, y=1.04)
        fig.savefig(out / CHARTS["sensitivity"], dpi=90, bbox_inches="tight")
        plt.close(fig)
        made.append(CHARTS["sensitivity"])
    dep = rep.get("deployment")
    if dep and dep.get("curves"):
        fig, ax = plt.subplots(figsize=(8, 4.2))
        n = np.arange(1, 25)
        for k, c in enumerate(dep["curves"]):
            ax.plot(n, np.array(c["total_g_by_cleanest_hours"]) / 1e3, color=f"C{k}", label=f"{c['label']}: {c['deploy'].split('@')[0]}")
        for k, r in enumerate(dep["rows"]):
            ax.axhline(r["total_g"] / 1e3, color=f"C{k}", lw=0.7, ls=":")
        ax.set_xlabel("runs in the N cleanest hours of the day (24 = around the clock)")
        ax.set_ylabel(f"kgCO2e per {rep['assumptions']['calls']:,} calls")
        ax.set_title(f"{dep['basis']} basis, {_embodied(rep)}; dotted: each deployment as given{sim}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / CHARTS["deployment"], dpi=90)
        plt.close(fig)
        made.append(CHARTS["deployment"])
    return made


def write_report(rep: dict, out: Path) -> dict[str, Path]:
    """Write ``report.json``, the charts, ``report.md`` and ``report.html`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    charts = _charts(rep, out)
    rep["charts"] = charts
    timings = rep.get("timings_s")
    if isinstance(timings, dict):  # the charts' own time, counted in the total
        timings["charts"] = time.monotonic() - t0
        if "total" in timings:
            timings["total"] += timings["charts"]
    blocks = [blk for blk in build_blocks(rep) if blk[0] != "img" or blk[1] in charts]
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(dumps_json(rep) + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(render_html(blocks), encoding="utf-8")
    for c in charts:
        paths[c] = out / c
    return paths


def dumps_json(rep: dict) -> str:
    """``rep`` as indented JSON with each innermost list on one line (tables stay readable and small)."""
    import re

    text = json.dumps(rep, indent=1, allow_nan=False, default=_json_default)
    # JSON strings hold no raw newlines, so collapsing newline+indent inside a bracket pair is safe
    return re.sub(r"\[([^\[\]{}]*)\]", lambda m: "[" + re.sub(r"\n\s*", "", m.group(1)) + "]"
                  if "\n" in m.group(1) else m.group(0), text)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
