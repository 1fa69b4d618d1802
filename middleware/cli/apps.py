"""The command-line options of ``wattspan run``, ``wattspan audit`` and ``wattspan dashboard``.

:mod:`wattspan.cli` registers them with two calls; the work is in :mod:`wattspan.run`,
:mod:`wattspan.audit` and :mod:`wattspan.dashboard`.
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "dispatch"]


def add_arguments(sub: Any, carbon_options: Callable[[argparse.ArgumentParser], None]) -> None:
    r = sub.add_parser("run", help="meter any command from start to end (a training job, a batch job) and store it in the ledger",
                       description="Meter COMMAND from start to end with NVML, RAPL or the labelled CPU estimate; "
                                   "mark phases from the job with `with wattspan.phase('epoch 3'):`.")
    r.add_argument("--db", type=Path, default=Path("wattspan.sqlite"), help="ledger file (default ./wattspan.sqlite)")
    r.add_argument("--interval-s", type=float, default=0.1, help="sampling interval in seconds (default 0.1)")
    r.add_argument("--label", default="", help="a name for the run, shown in the report")
    r.add_argument("--json", type=Path, default=None, help="also write the run's summary as JSON here")
    carbon_options(r)
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command to run, after --")

    a = sub.add_parser("audit", help="a one-page carbon report (Markdown, HTML or PDF) of a run, a period of a ledger, or attribute's output",
                       description="Without --since/--until/--records: the newest run in the ledger (or the whole ledger if it holds no run).")
    a.add_argument("--db", type=Path, default=Path("wattspan.sqlite"), help="ledger file (default ./wattspan.sqlite)")
    a.add_argument("--run", default=None, help="a run id (or a unique prefix of one), or 'last'")
    a.add_argument("--since", default=None, help="serving records from this long ago (30m, 1h, 7d) or this time (ISO 8601, unix s)")
    a.add_argument("--until", default=None, help="serving records up to this time (same forms as --since; default now)")
    a.add_argument("--records", type=Path, default=None, help="`wattspan attribute --out` JSONL instead of a ledger")
    a.add_argument("--summary", type=Path, default=None, help="`wattspan attribute --summary` JSON that goes with --records")
    a.add_argument("--out", type=Path, default=None, help="write here; the suffix (.md, .html, .pdf) picks the format (default: Markdown on stdout)")
    a.add_argument("--format", choices=["md", "html", "pdf"], default=None, help="override the format the suffix of --out implies")
    a.add_argument("--title", default=None, help="the report's title")
    g = a.add_argument_group("carbon (default: what the run recorded; for a ledger: world average, PUE 1)")
    g.add_argument("--region", default=None, help="grid region: aws:us-east-1, gcp:europe-west1, FR, ...")
    g.add_argument("--intensity", type=float, default=None, help="location-based grid intensity, gCO2e/kWh (overrides --region's table value)")
    g.add_argument("--intensity-source", default=None, help="where --intensity comes from (printed in the report)")
    g.add_argument("--pue", type=float, default=None, help="power usage effectiveness")
    g.add_argument("--market-intensity", type=float, default=None, help="market-based intensity, gCO2e/kWh (contracts, certificates); reported beside, never in the SCI")
    g.add_argument("--market-source", default=None, help="where --market-intensity comes from")
    g.add_argument("--embodied-kg", type=float, default=None, help="embodied kgCO2e per device")
    g.add_argument("--lifetime-years", type=float, default=4.0, help="device lifetime for the embodied share (default 4)")
    g.add_argument("--utilisation", type=float, default=1.0, help="fraction of its lifetime the device works (default 1)")
    g.add_argument("--lca-boundary", default=None, help="what the embodied figure covers (default: as stated by its source; say e.g. 'cradle-to-gate, GPU share of an 8-GPU server')")
    g.add_argument("--boundary", choices=["provider", "consumer"], default="provider",
                   help="SCI for AI boundary: provider (you run the servers: default) or consumer (you call a model someone else runs)")
    e = a.add_argument_group("an 'equivalent to' line: printed only with all three")
    e.add_argument("--equivalent-g", type=float, default=None, help="grams CO2e per unit of the comparison")
    e.add_argument("--equivalent-unit", default=None, help="what one unit is, e.g. 'km driven by an average petrol car'")
    e.add_argument("--equivalent-source", default=None, help="the source of the factor (publication, year, table)")

    d = sub.add_parser("dashboard", help="a live web page of the ledger: energy and CO2e per endpoint, model and tenant",
                       description="Serves a small page on 127.0.0.1 (a --token is required to bind anywhere else).")
    d.add_argument("--db", type=Path, default=Path("wattspan.sqlite"), help="ledger file (default ./wattspan.sqlite)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else needs --token)")
    d.add_argument("--port", type=int, default=8787, help="port (default 8787; 0: a free one)")
    d.add_argument("--token", default=None, help="a shared secret the page and API require (env WATTSPAN_TOKEN)")
    d.add_argument("--window", default="1h", help="how far back the page looks (default 1h)")
    d.add_argument("--refresh-s", type=float, default=2.0, help="how often the page refreshes, seconds (default 2)")
    d.add_argument("--metrics-url", default=None, help="the server's Prometheus exporter (http://127.0.0.1:9464/metrics): shows unattributed energy")
    d.add_argument("--budgets", type=Path, default=None, help="a budget file (JSON or TOML, as for `wattspan proxy --budgets`): shows each budget's burn (env WATTSPAN_BUDGETS)")


def dispatch(args: argparse.Namespace, carbon_model_from_args: Callable[[argparse.Namespace], Any],
             usage_error: type[Exception], need: Callable[..., Any]) -> int:
    try:
        if args.command == "run":
            from ..run import cli_main

            try:
                carbon = carbon_model_from_args(args)
            except ValueError as exc:
                raise usage_error(str(exc)) from None
            return cli_main(args, carbon)
        if args.command == "audit":
            need("jinja2", "markdown_it", "matplotlib", extra="audit")
            from ..audit import cli_main as audit_main

            try:
                return audit_main(args)
            except (TypeError, OverflowError) as exc:  # values wattspan's writer never stores (a text time, 1e300)
                raise usage_error(f"cannot read the ledger: a record holds a value no ledger writer stores ({exc}); "
                                  "was it written by wattspan?") from None
        if args.command == "dashboard":
            need("starlette", "uvicorn", "plotly", extra="dashboard")
            from ..dashboard import cli_main as dashboard_main

            return dashboard_main(args)
    except (ValueError, FileNotFoundError) as exc:
        raise usage_error(str(exc)) from None
    except sqlite3.Error as exc:  # a damaged ledger, or one missing its tables
        raise usage_error(f"cannot read the ledger: {exc}") from None
    raise usage_error(f"unknown command {args.command!r}")
