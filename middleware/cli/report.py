"""``wattspan report``: what the ledger says requests cost, per endpoint and per tenant."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..export.ledger import GROUP_BY, aggregate, excluded
from ..errors import InputError
from ..records import json_safe, printable
from .common import UsageError

__all__ = ["FORMATS", "cmd_report_id", "run_report"]

FORMATS = ("table", "csv", "json")
BANNER = "SIMULATED power (no sensor): these figures come from wattspan's simulated source, not a measurement"
# (aggregate key, table header with its unit, significant digits); CSV/JSON use the keys,
# whose suffixes are the units: _j joules, _g grams CO2e, _per_1k per 1000 requests, _s seconds.
# energy_j (and its columns) are the accelerator's; host_j the host's, apart; gCO2e prices both.
HOST_RULE = ("energy J, dynamic J, idle J: the accelerator's; host J: the host's share, kept apart (0 where no host "
             "sensor was metered); gCO2e prices accelerator + host energy (x PUE x grid intensity) + embodied")
_TABLE = (
    ("requests", "requests", 0),
    ("energy_j", "energy J", 4),
    ("dynamic_j", "dynamic J", 4),
    ("idle_j", "idle J", 4),
    ("host_j", "host J", 4),
    ("energy_j_per_1k", "accel J / 1k req", 4),
    ("total_j_per_1k", "accel+host J / 1k req", 4),
    ("co2e_g", "gCO2e", 3),
    ("co2e_g_per_1k", "gCO2e / 1k req", 3),
    ("mean_duration_s", "mean latency s", 3),
)


def run_report(db: Path, *, by: str = "route", fmt: str = "table", since_s: float | None = None,
               out: TextIO | None = None) -> int:
    """Print the ledger at ``db`` grouped by ``by``; return an exit status (0 ok, 2 bad input).

    ``fmt="table"``: aligned tables for people (by ``by``; with ``by="route"`` also by
    tenant). ``"csv"`` / ``"json"``: the aggregate rows for ``by``, full precision.
    ``since_s``: only records from the last ``since_s`` seconds. ``out``: default stdout;
    problems and, for csv/json, the simulated-power warning go to stderr.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr
    if by not in GROUP_BY:
        print(f"wattspan report: cannot group by {by!r}; choose one of {', '.join(GROUP_BY)}", file=err)
        return 2
    if fmt not in FORMATS:
        print(f"wattspan report: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", file=err)
        return 2
    if since_s is not None and not (isinstance(since_s, (int, float)) and math.isfinite(since_s) and since_s > 0):
        print(f"wattspan report: --since-s must be a number of seconds > 0, got {since_s!r}", file=err)
        return 2
    since = None if since_s is None else time.time() - since_s
    try:
        tables = [(b, aggregate(db, b, since=since)) for b in ((by, "tenant") if by == "route" and fmt == "table" else (by,))]
        left_out = excluded(db, since=since)
    except FileNotFoundError as exc:
        print(f"wattspan report: {exc}", file=err)
        return 2
    except (InputError, sqlite3.Error) as exc:
        print(f"wattspan report: cannot read {db}: {exc}", file=err)
        return 2
    except (TypeError, ValueError, OverflowError) as exc:  # values wattspan's writer never stores (+inf and -inf summed)
        print(f"wattspan report: cannot read {db}: a record holds a value no ledger writer stores ({exc}); was it written by wattspan?", file=err)
        return 2

    if left_out:
        print(f"wattspan report: {left_out} record(s) of {db} hold a value no wattspan writer stores (an infinity, a value past 2**63, a negative "
              "energy or token count, text in a number column): left out of every figure below; was the file edited?", file=err)
    try:
        _render(db, by, fmt, since_s, tables, out)
    except (TypeError, ValueError) as exc:  # a value of the wrong type, which wattspan's writer never stores
        print(f"wattspan report: cannot read {db}: a record holds a value of the wrong type ({exc}); was it written by wattspan?", file=err)
        return 2
    return 0


def _render(db: Path, by: str, fmt: str, since_s: float | None, tables: list[tuple[str, list[dict[str, Any]]]], out: TextIO) -> None:
    err = sys.stderr
    rows = tables[0][1]
    simulated = any(r["simulated"] for r in rows)
    if fmt == "json":
        json.dump(json_safe(rows), out, indent=2, allow_nan=False)  # a sum past float's range is null: JSON has no Infinity
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow([by, *(k for k, _, _ in _TABLE), "simulated", "methods"])
        for r in rows:
            w.writerow([r[by], *(r[k] for k, _, _ in _TABLE), str(r["simulated"]).lower(), ";".join(r["methods"])])
    else:
        _print_tables(db, tables, since_s, simulated, out)
    if simulated and fmt != "table":
        print(f"wattspan report: {BANNER}", file=err)


def _print_tables(db: Path, tables: list[tuple[str, list[dict[str, Any]]]], since_s: float | None, simulated: bool, out: TextIO) -> None:
    rows = tables[0][1]
    n = sum(r["requests"] for r in rows)
    window = "" if since_s is None else f" in the last {since_s:g} s"
    if simulated:
        bar = "!" * (len(BANNER) + 4)
        out.write(f"{bar}\n! {BANNER} !\n{bar}\n")
    if not n:
        out.write(f"ledger {db}: no requests recorded{window}\n")
        return
    energy, co2e = sum(r["energy_j"] for r in rows), sum(r["co2e_g"] for r in rows)
    host = sum(r["host_j"] or 0.0 for r in rows)
    total = energy + host  # what co2e prices: the same rule as every record's
    out.write(f"ledger {db}: {n} requests{window}, accelerator {_num(energy, 4)} J + host {_num(host, 4)} J = "
              f"{_num(total, 4)} J ({_num(total / 3600, 4)} Wh), {_num(co2e, 3)} gCO2e\n")
    for by, rows in tables:
        header = [by, *(h for _, h, _ in _TABLE), "method"]
        cols = [[printable(r[by]) or "(none)" for r in rows], *(_column([r[k] for r in rows], d) for k, _, d in _TABLE),
                [printable(",".join(r["methods"])) + (" SIMULATED" if r["simulated"] else "") for r in rows]]
        body = list(zip(*cols))
        widths = [max(len(c) for c in col) for col in zip(header, *body)]
        out.write(f"\nby {by}\n")
        for line in (header, *body):
            cells = [c.ljust(w) if i in (0, len(line) - 1) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
            out.write("  ".join(cells).rstrip() + "\n")
    out.write(f"\n{HOST_RULE}\n")


def _decimals(x: float, sig: int) -> int:
    """Decimals that show ``x`` to ``sig`` significant digits (0 for integers, at most 9)."""
    if sig == 0 or x == 0 or not math.isfinite(x):
        return 0
    return max(0, min(9, sig - 1 - math.floor(math.log10(abs(x)))))


def _num(x: float, sig: int) -> str:
    return f"{x:,.{_decimals(x, sig)}f}"


def _column(values: list[Any], sig: int) -> list[str]:
    """One column, every cell with the decimals its largest value needs for ``sig`` digits."""
    d = _decimals(max((abs(v) for v in values), default=0.0), sig)
    return [f"{v:,.{d}f}" for v in values]


def cmd_report_id(args: argparse.Namespace) -> int:
    """``wattspan report --id ID``: one request's final record from the ledger."""
    from ..export.ledger import find
    from ..errors import InputError

    import sqlite3

    try:
        rec = find(args.db, args.id)
    except (FileNotFoundError, InputError) as exc:
        raise UsageError(str(exc)) from None
    except sqlite3.Error as exc:  # a damaged file, or one missing the ledger's tables
        raise UsageError(f"cannot read {args.db}: {exc}") from None
    except (TypeError, ValueError) as exc:  # a value of the wrong type (its trace id), which wattspan's writer never stores
        raise UsageError(f"{args.db}: the record of {args.id!r} holds a value of the wrong type ({exc}); was it written by wattspan?") from None
    if rec is None:
        print(f"wattspan: no request {args.id!r} in {args.db} (not final yet? records reach the ledger a second or so after the response)", file=sys.stderr)
        return 1
    try:
        _print_record(rec, args.format)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{args.db}: the record of {args.id!r} holds a value of the wrong type ({exc}); was it written by wattspan?") from None
    return 0


def _print_record(rec: dict[str, Any], fmt: str) -> None:
    rec["duration_s"] = (rec["end_ns"] - rec["start_ns"]) / 1e9
    rec["trace_id"], rec["span_id"] = f"{rec['trace_id']:032x}", f"{rec['span_id']:016x}"
    if fmt == "json":  # JSON has no Infinity or NaN: such a value (from an edited file) is null
        print(json.dumps(json_safe(rec), indent=2, allow_nan=False))
    elif fmt == "csv":  # as the report's own CSV: \n line ends, lower-case booleans
        w = csv.DictWriter(sys.stdout, fieldnames=list(rec), lineterminator="\n")
        w.writeheader()
        w.writerow({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in rec.items()})
    else:  # every text as a terminal may show it: a control character in a label is escaped, never obeyed
        flag = "  [SIMULATED power: no sensor]" if rec["simulated"] else ""
        host = rec.get("host_j") or 0.0
        total = f"{rec['energy_j'] + host:.4g} J (accelerator {rec['energy_j']:.4g} J + host {host:.4g} J)" if host else f"{rec['energy_j']:.4g} J"
        print(f"request {printable(rec['id'])}: {total}, {rec['co2e_g']:.4g} gCO2e{flag}")
        for k in ("dynamic_j", "idle_j", "host_j", "embodied_g", "device_s", "duration_s", "method", "sensor", "coverage",
                  "device", "route", "model", "tenant", "status_code", "prompt_tokens", "output_tokens", "run_id"):
            v = rec[k]
            print(f"  {k:<14}{v:.6g}" if isinstance(v, float) else f"  {k:<14}{printable(v)}")
