"""The ``wattspan`` command line.

Every option can also come from an environment variable ``WATTSPAN_<OPTION>``
(``--region`` from ``WATTSPAN_REGION``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from .common import UsageError, carbon_model_from_args, carbon_options, need

__all__ = ["main"]


def _apply_env_defaults(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                        used: list[tuple[str, str, str, list[str]]] | None = None) -> list[tuple[str, str, str, list[str]]]:
    """Let ``WATTSPAN_<DEST>`` set the default of the options of the subcommand being run
    (the first word of ``argv`` that names one), and of no other; a value the option's
    type refuses ends in a usage error naming the variable, the value and the option.
    Returns ``(dest, variable, value, option strings)`` of each default a variable set."""
    used = [] if used is None else used
    words = sys.argv[1:] if argv is None else list(argv)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = next((w for w in words if w in action.choices), None)
            if chosen is not None:
                _apply_env_defaults(action.choices[chosen], [], used)
        elif action.option_strings and action.dest != "help":
            env = "WATTSPAN_" + action.dest.upper()
            if env in os.environ and action.nargs in (None, "?") and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._AppendAction)):
                raw = os.environ[env]
                used.append((action.dest, env, raw, list(action.option_strings)))
                try:
                    action.default = action.type(raw) if callable(action.type) else raw
                except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                    what = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else getattr(action.type, "__name__", "a valid value")
                    parser.error(f"{env}={raw!r} is not valid for {action.option_strings[-1]} (expects {what})")
                if action.choices is not None and action.default not in action.choices:
                    parser.error(f"{env}={raw!r} is not valid for {action.option_strings[-1]} (choose from {', '.join(map(str, action.choices))})")
                action.required = False
    return used


def _board_lag_ms(raw: str) -> float | dict[str, float] | None:
    """``--board-lag-ms`` / ``WATTSPAN_BOARD_LAG_MS``: in seconds, one value or per device."""
    from ..settings import parse_board_lag_ms

    try:
        return parse_board_lag_ms(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattspan", description="Per-request energy and CO2e for AI inference servers.")
    p.add_argument("--version", action="version", version=f"wattspan {_version()}")
    p.add_argument("--log-level", default=None, help="wattspan's log level: DEBUG, INFO, WARNING (default), ERROR")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("attribute", help="apportion a recorded power trace to requests (offline, reproducible)")
    a.add_argument("--trace", required=True, type=Path, help="CSV: time_ns,gpu,power_w[,energy_j]")
    a.add_argument("--requests", required=True, type=Path, help="JSONL: id,start_ns,end_ns,gpu[,route,model,tenant,prompt_tokens,output_tokens]")
    a.add_argument("--batches", type=Path, default=None, help="JSONL: start_ns,end_ns,gpu,requests{id:tokens} (enables batch-fit)")
    a.add_argument("--out", type=Path, default=None, help="write one JSON line per request here (default, or -: stdout)")
    a.add_argument("--summary", type=Path, default=None, help="also write the summary as JSON here")
    a.add_argument("--idle", default="estimate", help="idle baseline in watts, or 'estimate' (default)")
    a.add_argument("--power-kind", choices=["instant", "average"], default="instant", help="what power_w is: an instant reading (default) or an average over --power-window-s")
    a.add_argument("--power-window-s", type=float, default=None, help="averaging window of power_w with --power-kind average (default 1.0 s)")
    a.add_argument("--board-lag-ms", default=None, type=_board_lag_ms,
                   help="the boards' electrical lag in ms (power trails the work), measured once on fine readings (one value, or gpu0=4,gpu1=4; 0: none): "
                        "the step model is fitted through it instead of searching one (default: searched where readings are 50 ms apart or closer)")
    carbon_options(a)

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
    x.add_argument("--graceful-s", type=float, default=30.0,
                   help="at SIGTERM, seconds requests in flight may finish before they are cut and the records drained (default 30)")
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

    from .apps import add_arguments as _add_run_audit_dashboard

    _add_run_audit_dashboard(sub, carbon_options)
    b = sub.add_parser("bench", help="on demand or in batches? energy and CO2e per call, projected to a million calls")
    from ..bench import add_bench_arguments

    add_bench_arguments(b)
    return p


#: the largest demo --seed: its requests' seeds (seed * 100003 + index) stay within int64
_MAX_SEED = 2**40


def _port_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now (a server already there would answer the demo's load)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(argv)
        sys.stdout.flush()  # here, not at the exit, where a closed pipe is an 'Exception ignored' traceback
        return rc
    except KeyboardInterrupt:  # Ctrl-C in a long attribute or report: one line, the shell's status for SIGINT
        print("wattspan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`wattspan report --format json | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        except (OSError, ValueError):
            pass
        return 1


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    from_env = _apply_env_defaults(parser, argv)
    args = parser.parse_args(argv)
    words = sys.argv[1:] if argv is None else list(argv)
    given = {w.split("=", 1)[0] for w in words if w.startswith("-")}
    from_env = [u for u in from_env if not given & set(u[3])]  # a flag wins over its variable
    from ..logs import setup_logging

    setup_logging(args.log_level)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "attribute":
            from .attribute import cmd_attribute

            return cmd_attribute(args)
        if args.command == "demo":
            need("fastapi", "uvicorn", "httpx", "torch", "tqdm", extra="demo")
            from ..demo.run import run_demo

            for name in ("embeddings", "completions", "concurrency", "repeat"):
                lo = 1 if name in ("concurrency", "repeat") else 0
                if not lo <= int(getattr(args, name)) <= 100_000:
                    raise UsageError(f"--{name} must be between {lo} and 100000, got {getattr(args, name)}")
            if not 0 <= int(args.port) <= 65535:
                raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
            if not 0 <= int(args.seed) <= _MAX_SEED:  # each request's seed is seed * 100003 + its index, in int64
                raise UsageError(f"--seed must be between 0 and {_MAX_SEED}, got {args.seed}")
            _check_db(args.db)  # a folder, /dev/null, a damaged file: it would run, failing every write
            from ..carbon import CarbonModel
            from ..settings import SettingsError, get_settings

            try:
                get_settings()  # WATTSPAN_PUE and the rest, as the demo's meter reads them
            except SettingsError as exc:
                raise UsageError(str(exc)) from None
            try:
                CarbonModel.for_region(args.region)
            except ValueError as exc:
                raise UsageError(f"--region: {exc}") from None
            if int(args.port) and not _port_free(int(args.port)):
                raise UsageError(f"--port {args.port}: in use on 127.0.0.1; choose another, or 0 for a free one")
            return run_demo(embeds=int(args.embeddings), completions=int(args.completions), concurrency=int(args.concurrency), region=args.region, db=args.db, serve=args.serve, port=int(args.port), seed=int(args.seed), repeat=int(args.repeat))
        if args.command == "bench":
            need("httpx", "tqdm", "matplotlib", extra="bench")
            from ..bench import run_bench

            return run_bench(args)
        if args.command == "proxy":
            need("httpx", "uvicorn", "starlette", extra="serve")
            from wattspan.integrations.openai_proxy import run_proxy

            rid_header = None if str(args.request_id_header).strip().lower() in ("", "none", "off") else args.request_id_header
            from ..errors import InputError

            options = dict(
                device=args.device, timeout_s=float(args.timeout_s), max_body_bytes=int(args.max_body_bytes),
                include_usage=not args.no_include_usage, steps_listen=args.steps_listen, ledger=args.db,
                request_id_header=rid_header, tenant=args.tenant_header, tenant_from_key=not args.no_tenant_from_key,
                model_header=args.model_header, usage_energy=not args.no_usage_energy, records_endpoint=not args.no_records_endpoint,
            )
            if args.upstream is None and not args.routes:
                raise UsageError("proxy needs --upstream URL, or one --route MODEL=URL[@DEVICES] per upstream")
            if str(args.tenant_header).strip().lower() in ("authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"):
                raise UsageError(f"--tenant-header {args.tenant_header} carries a credential, which would be stored as the "
                                 "tenant: name a tenant header (x-tenant-id); requests without one are labelled by a keyed "
                                 "pseudonym of their API key")
            if not (math.isfinite(args.graceful_s) and 0 <= args.graceful_s <= 3600):
                raise UsageError(f"--graceful-s must be 0..3600 seconds, got {args.graceful_s!r}")
            if not str(args.host).strip():  # uvicorn listens on every interface for "": say 0.0.0.0 if that is meant
                raise UsageError("--host is empty: give an address (127.0.0.1, the default; 0.0.0.0 for every interface)")
            if not 0 <= int(args.port) <= 65535:  # uvicorn took 99999 as 34463 (the port modulo 65536)
                raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
            _check_device("--device", args.device)
            _check_db(args.db)  # it would serve, failing every write, records held in memory
            if args.routes:
                from wattspan.integrations.openai_proxy import parse_route

                try:
                    parsed = [parse_route(r) for r in args.routes]
                except ValueError as exc:
                    raise UsageError(str(exc)) from None
                if len({m for m, _, _ in parsed}) != len(parsed):
                    raise UsageError("--route: each model may be routed once")
                for m, _, d in parsed:
                    if d is not None:
                        _check_device(f"--route {m}", d)
                options["routes"] = {m: (u, d) for m, u, d in parsed}
            try:
                run_proxy(args.upstream, host=args.host, port=int(args.port), wrap=_budget_wrapper(args),
                          graceful_s=float(args.graceful_s), **options)
            except (ValueError, InputError, OSError) as exc:  # OSError: a --steps-listen socket it cannot open
                raise UsageError(str(exc)) from None
            return 0
        if args.command in ("run", "audit", "dashboard"):
            from .apps import dispatch

            return dispatch(args, carbon_model_from_args, UsageError, need)
        if args.command == "report":
            if args.id is not None:
                from .report import cmd_report_id

                return cmd_report_id(args)
            from .report import run_report

            if getattr(args, "budgets", None) is None:
                return run_report(args.db, by=args.by, fmt=args.format, since_s=args.since_s)
            from .budgets import load_report_budgets, report_budgets

            cfg = load_report_budgets(args)
            if args.format == "json":  # one document, the rows and the budgets
                import io

                buf = io.StringIO()
                rc = run_report(args.db, by=args.by, fmt=args.format, since_s=args.since_s, out=buf)
                return rc or report_budgets(args, cfg, buf.getvalue())
            rc = run_report(args.db, by=args.by, fmt=args.format, since_s=args.since_s)
            return rc or report_budgets(args, cfg)
    except UsageError as exc:
        print(f"wattspan: error: {exc}{_env_note(str(exc), from_env)}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")  # in a variable's name: its value is not echoed


def _env_note(message: str, from_env: list[tuple[str, str, str, list[str]]]) -> str:
    """`` (from WATTSPAN_X='v')`` for each variable whose option a refusal names (by its flag or its
    name: ``--pue``, ``pue``), so a value nobody typed is traced to where it came from."""
    import re

    # a secret is named, never shown (its length is the only hint): a refused token lands in logs and terminals
    def shown(env: str, raw: str) -> str:
        return "*" * len(raw) if any(k in env for k in _SECRET_WORDS) else raw

    hits = [f"{env}={shown(env, raw)!r}" for dest, env, raw, opts in from_env
            if any(o in message for o in opts) or re.search(rf"(?<![\w-]){re.escape(dest)}(?![A-Za-z0-9-])", message)]
    return f" (from {', '.join(hits)})" if hits else ""


def _check_db(db: Path | None) -> None:
    """A usage error for a ``--db`` ledger that cannot be written: a folder, not a regular file, in a
    missing folder, damaged, foreign or newer (see :func:`wattspan.export.ledger.check_ledger`)."""
    if db is None:
        return
    from .._paths import writable_file
    from ..errors import InputError
    from ..export.ledger import check_ledger

    try:
        writable_file(db, "--db")
        check_ledger(db)
    except (ValueError, InputError) as exc:
        raise UsageError(str(exc)) from None


def _check_device(option: str, device: str) -> None:
    """A device or group as ``WATTSPAN_DEVICE`` takes it (``gpu0``, ``0``, ``gpu0,gpu1``, ``gpu0+gpu1``): another
    (empty, ``a/b``) meters nothing, so the proxy would serve with every record at 0 J."""
    from ..devices import group_key
    from ..settings import DEVICES_PATTERN

    if not DEVICES_PATTERN.fullmatch(group_key(device)):
        raise UsageError(f"{option} {device!r}: a device name of 1..64 characters [A-Za-z0-9_.:-] (gpu0, or 0), "
                         "or a group of up to 64 joined by commas or '+' (gpu0,gpu1)")


def _budget_wrapper(args: argparse.Namespace) -> Any:
    from .budgets import budget_wrapper

    return budget_wrapper(args)


def _version() -> str:
    from .. import __version__

    return __version__


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
