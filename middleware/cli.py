"""The ``wattspan`` command line.

Every option can also come from an environment variable ``WATTSPAN_<OPTION>``
(``--region`` from ``WATTSPAN_REGION``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _apply_env_defaults(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    """Let ``WATTSPAN_<DEST>`` set the default of the options of the subcommand being run
    (the first word of ``argv`` that names one), and of no other; a value the option's
    type refuses ends in a usage error naming the variable, the value and the option."""
    words = sys.argv[1:] if argv is None else list(argv)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((w for w in words if w in action.choices), None)
            if chosen is not None:
                _apply_env_defaults(action.choices[chosen], [])
        elif action.option_strings and action.dest != "help":
            env = "WATTSPAN_" + action.dest.upper()
            if env in os.environ and action.nargs in (None, "?") and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._AppendAction)):
                raw = os.environ[env]
                try:
                    action.default = action.type(raw) if callable(action.type) else raw
                except (TypeError, ValueError, argparse.ArgumentTypeError):
                    what = getattr(action.type, "__name__", "a valid value")
                    parser.error(f"{env}={raw!r} is not valid for {action.option_strings[-1]} (expects {what})")
                if action.choices is not None and action.default not in action.choices:
                    parser.error(f"{env}={raw!r} is not valid for {action.option_strings[-1]} (choose from {', '.join(map(str, action.choices))})")
                action.required = False


def _carbon_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("carbon")
    g.add_argument("--region", default="world", help="grid region: aws:us-east-1, gcp:europe-west1, azure:westeurope, FR, ... (default: world)")
    g.add_argument("--intensity", type=float, default=None, help="grid intensity in gCO2e/kWh (overrides --region's table value)")
    g.add_argument("--pue", type=float, default=None, help="power usage effectiveness (default: the provider's published fleet value, else 1.0)")
    g.add_argument("--embodied-kg", type=float, default=None, help="embodied kgCO2e per device (enables the embodied share)")
    g.add_argument("--lifetime-years", type=float, default=4.0, help="device lifetime for the embodied share (default 4)")
    g.add_argument("--utilisation", type=float, default=1.0, help="fraction of its lifetime the device serves (default 1)")
    g.add_argument("--carbon-price", type=float, default=0.0, help="internal carbon price per tonne CO2e (default 0)")
    g.add_argument("--intensity-provider", default="auto", help="hourly intensity: auto (the 2023 hourly profile for DE, FR, GB, US-CAL-CISO, else the yearly table), table, profile, electricitymaps, watttime, gb-carbon-intensity")
    g.add_argument("--market-g-per-kwh", type=float, default=0.0, help="market-based gCO2e/kWh (your contract's or supplier's), reported beside the location-based figure")
    g.add_argument("--marginal-provider", default=None, help="a provider of marginal intensity reported beside (watttime)")


def carbon_model_from_args(args):
    from .carbon import CarbonModel, Embodied

    embodied = None
    if args.embodied_kg is not None:
        embodied = Embodied(kgco2e_per_device=float(args.embodied_kg), lifetime_years=float(args.lifetime_years), utilisation=float(args.utilisation))
    pue = None if args.pue is None else float(args.pue)
    model = CarbonModel.for_region(args.region, pue=pue, embodied=embodied, carbon_price_per_tonne=float(args.carbon_price))
    if args.intensity is not None:
        from dataclasses import replace

        model = replace(model, intensity_g_per_kwh=float(args.intensity), intensity_source="given on the command line")
    # hourly intensity (issue 11); a fixed --intensity is one value at every hour
    return model.with_hourly("table" if args.intensity is not None else args.intensity_provider,
                             market_g_per_kwh=float(args.market_g_per_kwh), marginal_provider=args.marginal_provider)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattspan", description="Per-request energy and CO2e for AI inference servers.")
    p.add_argument("--version", action="version", version=f"wattspan {_version()}")
    p.add_argument("--log-level", default=None, help="wattspan's log level: DEBUG, INFO, WARNING (default), ERROR")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("attribute", help="apportion a recorded power trace to requests (offline, reproducible)")
    a.add_argument("--trace", required=True, type=Path, help="CSV: time_ns,gpu,power_w[,energy_j]")
    a.add_argument("--requests", required=True, type=Path, help="JSONL: id,start_ns,end_ns,gpu[,route,model,tenant,prompt_tokens,output_tokens]")
    a.add_argument("--batches", type=Path, default=None, help="JSONL: start_ns,end_ns,gpu,requests{id:tokens} (enables batch-fit)")
    a.add_argument("--out", type=Path, default=None, help="write one JSON line per request here (default: stdout)")
    a.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here")
    a.add_argument("--idle", default="estimate", help="idle baseline in watts, or 'estimate' (default)")
    a.add_argument("--power-kind", choices=["instant", "average"], default="instant", help="what power_w is: an instant reading (default) or an average over --power-window-s")
    a.add_argument("--power-window-s", type=float, default=1.0, help="averaging window of power_w when --power-kind average (default 1.0 s)")
    _carbon_options(a)

    d = sub.add_parser("demo", help="serve a real model on the CPU, meter it, drive a short load, print per-endpoint energy and CO2e")
    d.add_argument("--embeddings", type=int, default=48, help="embedding requests to send (default 48)")
    d.add_argument("--completions", type=int, default=24, help="streaming completion requests to send (default 24)")
    d.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    d.add_argument("--region", default="world", help="grid region for CO2e (default: world)")
    d.add_argument("--db", type=Path, default=Path("wattspan.sqlite"), help="ledger file (default ./wattspan.sqlite)")
    d.add_argument("--serve", action="store_true", help="keep serving after the load (Ctrl-C to stop)")
    d.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    d.add_argument("--seed", type=int, default=0, help="seed of the load: the same seed sends the same requests (default 0)")
    d.add_argument("--repeat", type=int, default=3, help="send the same load this many times and show the spread per endpoint (default 3)")

    r = sub.add_parser("report", help="per-endpoint and per-tenant energy and CO2e from the ledger")
    r.add_argument("--db", type=Path, default=Path("wattspan.sqlite"), help="ledger file (default ./wattspan.sqlite)")
    r.add_argument("--by", default="route", help="route (default), tenant, model, device, http_method or run_id")
    r.add_argument("--format", default="table", choices=["table", "csv", "json"])
    r.add_argument("--since-s", type=float, default=None, help="only the last N seconds")
    r.add_argument("--budgets", type=Path, default=None, help="also show these carbon budgets: spent, limit, KPIs, when they run out (budget file, JSON or TOML)")
    r.add_argument("--id", default=None, help="one request's final figures, by its id (the x-wattspan-request-id header)")

    x = sub.add_parser("proxy", help="a metering proxy in front of an OpenAI-compatible server (vllm serve, ...)")
    x.add_argument("--upstream", default=None, help="the server to forward /v1/* to, e.g. http://127.0.0.1:8000 (with --route: where models no route names go)")
    x.add_argument("--route", dest="routes", action="append", default=None, metavar="MODEL=URL[@DEVICES]",
                   help="several upstreams behind one proxy: requests naming MODEL go to URL and are metered on DEVICES "
                        "(e.g. llama-70b=http://127.0.0.1:8000@gpu0+gpu1+gpu2+gpu3; default: --device); repeatable")
    x.add_argument("--host", default="127.0.0.1")
    x.add_argument("--port", type=int, default=8080)
    x.add_argument("--device", default="gpu0", help="the accelerator the upstream serves on (default gpu0), or its device group, e.g. gpu0,gpu1,gpu2,gpu3 for tensor parallel 4")
    x.add_argument("--timeout-s", type=float, default=600.0)
    x.add_argument("--max-body-bytes", type=int, default=8 << 20)
    x.add_argument("--steps-listen", default=None, help="host:port or unix:/path where the vLLM hook in the upstream sends its batch steps")
    x.add_argument("--no-include-usage", action="store_true", help="do not ask a streaming upstream for usage (for servers that reject stream_options)")
    x.add_argument("--budgets", type=Path, default=None, help="enforce the carbon budgets in this file (JSON or TOML): observe, warn, reject (429), defer")
    x.add_argument("--db", type=Path, default=None, help="append every request's final record to this ledger file, for `wattspan report` (default: none)")
    x.add_argument("--request-id-header", default="x-wattspan-request-id", help="response header returning wattspan's request id (default x-wattspan-request-id; 'none' for none)")
    x.add_argument("--tenant-header", default="x-tenant-id", help="request header naming the tenant (default x-tenant-id)")
    x.add_argument("--no-tenant-from-key", action="store_true", help="without a tenant header, do not label the request by a hash of its API key")
    x.add_argument("--model-header", default="x-model", help="request header naming the model when the body names none (default x-model)")
    x.add_argument("--no-usage-energy", action="store_true", help="do not add the provisional energy_j / co2e_g to responses' usage")
    x.add_argument("--no-records-endpoint", action="store_true", help="do not serve GET /wattspan/requests/{id}")
    x.add_argument("--defer-path", dest="defer_paths", action="append", default=None, metavar="PATH",
                   help="queue POSTs to PATH that carry x-wattspan-deadline-s for the cleanest hour before it (repeatable; zone: --region)")
    x.add_argument("--region", default="world", help="grid region the deferral queue plans for (default: world)")

    from .run_cli import add_arguments as _add_run_audit_dashboard

    _add_run_audit_dashboard(sub, _carbon_options)
    b = sub.add_parser("bench", help="on demand or in batches? energy and CO2e per call, projected to a million calls")
    from .bench import add_bench_arguments

    add_bench_arguments(b)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    _apply_env_defaults(parser, argv)
    args = parser.parse_args(argv)
    from ._logging import setup_logging

    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "attribute":
            return _cmd_attribute(args)
        if args.command == "demo":
            _need("fastapi", "uvicorn", "httpx", "torch", "tqdm", extra="demo")
            from .demo.run import run_demo

            for name in ("embeddings", "completions", "concurrency", "repeat"):
                if int(getattr(args, name)) < 0 or int(getattr(args, name)) > 100_000:
                    raise _UsageError(f"--{name} must be between 0 and 100000")
            return run_demo(embeds=int(args.embeddings), completions=int(args.completions), concurrency=max(1, int(args.concurrency)), region=args.region, db=args.db, serve=args.serve, port=int(args.port), seed=int(args.seed), repeat=max(1, int(args.repeat)))
        if args.command == "bench":
            _need("httpx", "tqdm", "matplotlib", extra="bench")
            from .bench import run_bench

            return run_bench(args)
        if args.command == "proxy":
            _need("httpx", "uvicorn", "starlette", extra="serve")
            from wattspan.integrations.openai_proxy import run_proxy

            rid_header = None if str(args.request_id_header).strip().lower() in ("", "none", "off") else args.request_id_header
            from .errors import InputError

            options = dict(
                device=args.device, timeout_s=float(args.timeout_s), max_body_bytes=int(args.max_body_bytes),
                include_usage=not args.no_include_usage, steps_listen=args.steps_listen, ledger=args.db,
                request_id_header=rid_header, tenant=args.tenant_header, tenant_from_key=not args.no_tenant_from_key,
                model_header=args.model_header, usage_energy=not args.no_usage_energy, records_endpoint=not args.no_records_endpoint,
            )
            if args.upstream is None and not args.routes:
                raise _UsageError("proxy needs --upstream URL, or one --route MODEL=URL[@DEVICES] per upstream")
            if args.routes:
                from wattspan.integrations.openai_proxy import parse_route

                try:
                    parsed = [parse_route(r) for r in args.routes]
                except ValueError as exc:
                    raise _UsageError(str(exc)) from None
                if len({m for m, _, _ in parsed}) != len(parsed):
                    raise _UsageError("--route: each model may be routed once")
                options["routes"] = {m: (u, d) for m, u, d in parsed}
            try:
                run_proxy(args.upstream, host=args.host, port=int(args.port), wrap=_budget_wrapper(args), **options)
            except (ValueError, InputError) as exc:
                raise _UsageError(str(exc)) from None
            return 0
        if args.command in ("run", "audit", "dashboard"):
            from .run_cli import dispatch

            return dispatch(args, carbon_model_from_args, _UsageError, _need)
        if args.command == "report":
            if args.id is not None:
                return _cmd_report_id(args)
            from ._report import run_report

            rc = run_report(args.db, by=args.by, fmt=args.format, since_s=args.since_s)
            if getattr(args, "budgets", None) is not None and rc == 0:
                return _report_budgets(args)
            return rc
    except _UsageError as exc:
        print(f"wattspan: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


class _UsageError(Exception):
    pass


def _report_budgets(args) -> int:
    """``wattspan report --budgets FILE``: each budget's spend, KPIs and burn (issue 11)."""
    from .budgets import BudgetConfig, BudgetConfigError, budget_status, format_status, load_budgets

    try:
        cfg = load_budgets(args.budgets)
    except BudgetConfigError as exc:
        raise _UsageError(str(exc)) from None
    if cfg.source == "ledger":  # the report's --db is the ledger to read
        cfg = BudgetConfig(cfg.budgets, "ledger", str(args.db), cfg.prometheus_url, cfg.refresh_s)
    st = budget_status(cfg)
    if args.format == "json":
        print(json.dumps({"budgets": [s.to_dict() for s in st]}, indent=2))
    else:
        sys.stdout.write("\ncarbon budgets (" + cfg.source + ")\n" + format_status(st))
    return 0


def _budget_wrapper(args):
    """``wattspan proxy --budgets FILE`` / ``--defer-path PATH``: wrap the metering proxy in a
    BudgetMiddleware and/or a DeferralMiddleware (one queue for both); None when neither is asked."""
    budgets, paths = getattr(args, "budgets", None), getattr(args, "defer_paths", None)
    if budgets is None and not paths:
        return None
    from .budgets import BudgetConfigError, BudgetMiddleware
    from .deferral import DeferralMiddleware, DeferralQueue

    def wrap(app):
        try:
            queue = DeferralQueue(zone=args.region)
            if paths:
                app = DeferralMiddleware(app, queue=queue, paths=tuple(paths))
            if budgets is not None:
                app = BudgetMiddleware(app, budgets=budgets, deferral=queue)
            return app
        except (BudgetConfigError, ValueError) as exc:
            raise _UsageError(str(exc)) from None

    return wrap


def _version() -> str:
    from . import __version__

    return __version__


def _cmd_report_id(args) -> int:
    """``wattspan report --id ID``: one request's final record from the ledger."""
    from ._ledger_db import find
    from .errors import InputError

    try:
        rec = find(args.db, args.id)
    except (FileNotFoundError, InputError) as exc:
        raise _UsageError(str(exc)) from None
    if rec is None:
        print(f"wattspan: no request {args.id!r} in {args.db} (not final yet? records reach the ledger a second or so after the response)", file=sys.stderr)
        return 1
    rec["duration_s"] = (rec["end_ns"] - rec["start_ns"]) / 1e9
    rec["trace_id"], rec["span_id"] = f"{rec['trace_id']:032x}", f"{rec['span_id']:016x}"
    if args.format == "json":
        print(json.dumps(rec, indent=2))
    elif args.format == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=list(rec))
        w.writeheader()
        w.writerow(rec)
    else:
        flag = "  [SIMULATED power: no sensor]" if rec["simulated"] else ""
        print(f"request {rec['id']}: {rec['energy_j']:.4g} J, {rec['co2e_g']:.4g} gCO2e{flag}")
        for k in ("dynamic_j", "idle_j", "host_j", "embodied_g", "device_s", "duration_s", "method", "sensor", "coverage",
                  "device", "route", "model", "tenant", "status_code", "prompt_tokens", "output_tokens", "run_id"):
            v = rec[k]
            print(f"  {k:<14}{v:.6g}" if isinstance(v, float) else f"  {k:<14}{v}")
    return 0


def _need(*modules: str, extra: str) -> None:
    """Optional parts print the exact install line when their dependencies are missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise _UsageError(f"this command needs {', '.join(missing)}: pip install 'wattspan[{extra}]'")


def _cmd_attribute(args) -> int:
    from . import _io
    from ._samples import SampleKind
    from .attribution import attribute
    from .errors import InputError
    from .sources.replay import read_trace_csv

    try:
        idle = None if str(args.idle).strip().lower() == "estimate" else float(args.idle)
        if idle is not None and (not math.isfinite(idle) or idle < 0):
            raise ValueError
    except ValueError:
        raise _UsageError(f"--idle must be a number of watts >= 0 or 'estimate', got {args.idle!r}") from None
    try:
        carbon = carbon_model_from_args(args)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    try:
        traces = read_trace_csv(args.trace)
        if args.power_kind == "average":
            window = float(args.power_window_s)
            if not (math.isfinite(window) and window > 0):
                raise _UsageError("--power-window-s must be > 0")
            for tr in traces.values():
                tr.power_kind = SampleKind.AVERAGE
                tr.window_ns = int(window * 1e9)
        requests, rows = _io.read_requests_jsonl(args.requests)
        steps = _io.read_batches_jsonl(args.batches, requests) if args.batches else None
    except InputError as exc:
        raise _UsageError(str(exc)) from None

    import numpy as np

    result = attribute(traces, requests, steps, idle_w=idle)
    records = result.records()
    from .carbon import wall_times

    per = carbon.per_request(result.energy_j, result.device_s, wall_times(result.requests.start_ns, result.requests.end_ns))
    co2e_op, emb = per.operational_g, per.embodied_g
    priced = carbon.carbon_price_per_tonne > 0
    e_j = np.asarray(result.energy_j, dtype=float)
    per_j = np.divide(co2e_op, e_j, out=np.zeros(len(e_j)), where=e_j > 0)  # the hour's g/J for each request
    co2e_lo = per_j * result.energy_j_low if result.energy_j_low is not None else co2e_op
    co2e_hi = per_j * result.energy_j_high if result.energy_j_high is not None else co2e_op
    for rec, row, op, e, lo, hi, cf in zip(records, rows, co2e_op, emb, co2e_lo, co2e_hi, per.fields()):
        rec["co2e_g"] = float(op + e)
        rec["co2e_g_low"] = float(lo + e)
        rec["co2e_g_high"] = float(hi + e)
        rec["embodied_g"] = float(e)
        rec.update(cf)
        if priced:  # the internal carbon price turns grams into money
            rec[f"carbon_cost_{carbon.currency.lower()}"] = float(carbon.cost(op + e))
        for key in ("prompt_tokens", "output_tokens"):
            if key in row:
                rec[key] = row[key]

    summary = summarize(result, records, carbon)
    lines = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines, encoding="utf-8")
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print_summary(summary, file=sys.stderr if args.out is None else sys.stdout)
    return 0


def summarize(result, records: list[dict], carbon) -> dict:
    """Totals, per device and per route, with the carbon model's provenance."""
    routes: dict[str, dict] = {}
    for r in records:
        k = r.get("route") or "(none)"
        d = routes.setdefault(k, {"requests": 0, "energy_j": 0.0, "co2e_g": 0.0})
        d["requests"] += 1
        d["energy_j"] += r["energy_j"]
        d["co2e_g"] += r["co2e_g"]
        # 90 % bands: half-widths added in quadrature (requests' errors taken as independent;
        # inside one reconciliation window they are anti-correlated, so this is conservative)
        if "energy_j_low" in r:
            d["_h2"] = d.get("_h2", 0.0) + ((r["energy_j_high"] - r["energy_j_low"]) / 2) ** 2
            d["_c2"] = d.get("_c2", 0.0) + ((r.get("co2e_g_high", r["co2e_g"]) - r.get("co2e_g_low", r["co2e_g"])) / 2) ** 2
    for d in routes.values():
        if "_h2" in d:
            h, c = math.sqrt(d.pop("_h2")), math.sqrt(d.pop("_c2"))
            d["energy_j_low"], d["energy_j_high"] = max(d["energy_j"] - h, 0.0), d["energy_j"] + h
            d["co2e_g_low"], d["co2e_g_high"] = max(d["co2e_g"] - c, 0.0), d["co2e_g"] + c
        d["energy_j_per_1k"] = d["energy_j"] / d["requests"] * 1000
        d["co2e_g_per_1k"] = d["co2e_g"] / d["requests"] * 1000
        if carbon.carbon_price_per_tonne > 0:
            d[f"carbon_cost_{carbon.currency.lower()}_per_1k"] = float(carbon.cost(d["co2e_g_per_1k"]))
    measured = result.measured_j
    un = result.unattributed_j
    return {
        "measured_j": measured,
        "attributed_j": result.attributed_j,
        "unattributed_j": un,
        "unattributed_co2e_g": float(carbon.operational_g(un)),
        "requests": len(records),
        "simulated": any(d.simulated for d in result.devices.values()),
        "carbon": {
            "region": carbon.region,
            "intensity_g_per_kwh": carbon.intensity_g_per_kwh,
            "intensity_source": carbon.intensity_source,
            "pue": carbon.pue,
            "carbon_price_per_tonne": carbon.carbon_price_per_tonne,
            "currency": carbon.currency,
            "embodied": None if carbon.embodied is None else vars(carbon.embodied) if hasattr(carbon.embodied, "__dict__") else str(carbon.embodied),
        },
        "devices": {k: v.as_dict() for k, v in result.devices.items()},
        "routes": routes,
        "intensity": _intensity_summary(records),
    }


def _intensity_summary(records: list[dict]) -> dict:
    """Which intensities the records used: providers, zones, hours, basis; market and marginal totals."""
    e = sum(r["energy_j"] for r in records) or 1.0
    return {
        "providers": sorted({r.get("intensity_provider", "") for r in records}),
        "zones": sorted({r.get("intensity_zone", "") for r in records}),
        "hours": len({r.get("intensity_hour", "") for r in records}),
        "basis": sorted({r.get("intensity_basis", "") for r in records}),
        "energy_weighted_g_per_kwh": sum(r["energy_j"] * r.get("intensity_g_per_kwh", 0.0) for r in records) / e,
        "market_g_per_kwh": max((r.get("market_g_per_kwh", 0.0) for r in records), default=0.0),
        "co2e_market_g": sum(r.get("co2e_market_g", 0.0) for r in records),
        "co2e_marginal_g": sum(r.get("co2e_marginal_g", 0.0) for r in records),
    }


def print_summary(summary: dict, file=sys.stdout) -> None:
    w = file.write
    c = summary["carbon"]
    flag = "  [SIMULATED power: no sensor]" if summary["simulated"] else ""
    w(f"measured {summary['measured_j']:.1f} J = attributed {summary['attributed_j']:.1f} J + unattributed {summary['unattributed_j']:.1f} J{flag}\n")
    w(f"carbon: {c['intensity_g_per_kwh']:.0f} gCO2e/kWh ({c['region']}; {c['intensity_source']}), PUE {c['pue']:.2f}\n")
    i = summary.get("intensity")
    if i and i["hours"]:
        w(f"per request: {i['energy_weighted_g_per_kwh']:.0f} gCO2e/kWh energy-weighted over {i['hours']} hour(s) from {', '.join(i['providers'])} ({', '.join(i['zones'])}), basis {', '.join(i['basis'])}")
        w(f"; market-based {i['co2e_market_g']:.4g} g at {i['market_g_per_kwh']:g} g/kWh\n" if i["market_g_per_kwh"] else "\n")
    for dev, d in summary["devices"].items():
        m = d.get("model")
        fit = f", fit r2 {m['r2']:.2f} over {m['rows']} readings" if m else ""
        if m and m.get("family"):
            fit += (f"\n  step model {m['family']} (held-out error {m['cv_error'] * 100:.1f} %, r2 {m['cv_r2']:.2f}: {m['why']});"
                    f" window {d.get('window_s', float('nan')):.3g} s; quality {d.get('quality') or '-'}")
        w(f"{dev}: {d['method']} via {d['sensor']}, idle {d['idle_w']:.1f} W ({d['idle_source']}){fit}\n")
    w(f"{'route':<28}{'requests':>9}{'energy J':>12}{'J/1k req':>12}{'gCO2e':>10}{'g/1k req':>10}\n")
    for route, d in sorted(summary["routes"].items()):
        w(f"{route[:27]:<28}{d['requests']:>9}{d['energy_j']:>12.2f}{d['energy_j_per_1k']:>12.1f}{d['co2e_g']:>10.4f}{d['co2e_g_per_1k']:>10.3f}\n")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
