"""``wattspan report --budgets`` and the budget / deferral wrapper of ``wattspan proxy``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from .common import UsageError

__all__ = ["budget_wrapper", "report_budgets"]


def load_report_budgets(args: argparse.Namespace) -> Any:
    """The budget file of ``wattspan report --budgets FILE``, read before the report prints (a bad
    file is a usage error, not a report followed by one)."""
    from ..budgets import BudgetConfig, BudgetConfigError, load_budgets

    if args.format == "csv":
        raise UsageError("--budgets with --format csv: budgets are not rows of the report; use --format json "
                         "(one document: the rows and the budgets) or the table")
    try:
        cfg = load_budgets(args.budgets)
    except BudgetConfigError as exc:
        raise UsageError(str(exc)) from None
    if cfg.source == "ledger":  # the report's --db is the ledger to read
        cfg = BudgetConfig(cfg.budgets, "ledger", str(args.db), cfg.prometheus_url, cfg.refresh_s)
    return cfg


def report_budgets(args: argparse.Namespace, cfg: Any, rows_json: str | None = None) -> int:
    """``wattspan report --budgets FILE``: each budget's spend, KPIs and burn (issue 11). With
    ``--format json`` one document: ``{"by", "rows", "budgets"}`` (``rows_json``: the report's rows)."""
    from ..budgets import budget_status, format_status

    st = budget_status(cfg)
    if args.format == "json":
        rows = json.loads(rows_json) if rows_json else []
        from ..records import json_safe

        print(json.dumps({"by": args.by, "rows": rows, "budgets": json_safe([s.to_dict() for s in st])}, indent=2, allow_nan=False))
    else:
        sys.stdout.write("\ncarbon budgets (" + cfg.source + ")\n" + format_status(st))
    return 0


def budget_wrapper(args: argparse.Namespace) -> Callable[[Any], Any] | None:
    """``wattspan proxy --budgets FILE`` / ``--defer-path PATH``: wrap the metering proxy in a
    BudgetMiddleware and/or a DeferralMiddleware (one queue for both); None when neither is asked."""
    budgets, paths = getattr(args, "budgets", None), getattr(args, "defer_paths", None)
    if budgets is None and not paths:
        return None
    from ..budgets import BudgetConfigError, BudgetMiddleware, load_budgets
    from ..deferral import DeferralMiddleware, DeferralQueue, store_beside

    if budgets is not None:
        try:
            cfg = load_budgets(budgets)
        except BudgetConfigError as exc:
            raise UsageError(str(exc)) from None
        if cfg.source == "ledger" and not cfg.ledger_given:
            # the records the proxy writes are the ones its budgets are spent by (as report and dashboard
            # read --db); the default, a wattspan.sqlite beside the budget file, would be read as empty
            db = getattr(args, "db", None)
            if db is None:
                raise UsageError(f"--budgets {budgets}: a budget of source \"ledger\" is spent by the records in a ledger, and "
                                 "the proxy writes none without --db: add --db PATH (or name the ledger in the budget file, "
                                 "or use source = \"prometheus\")")
            cfg = dataclasses.replace(cfg, ledger=str(db))
        budgets = cfg

    def wrap(app: Any) -> Any:
        try:
            queue = DeferralQueue(zone=args.region, store=store_beside(getattr(args, "db", None)))  # resumed after a restart
            # the gate reads the tenant as the proxy labels it: its tenant header, else its API key's pseudonym
            # (every tenant it answers for: a header cannot lift a budget on the request's API key)
            tenant_of = getattr(app, "tenants_of", None) or getattr(app, "tenant_of", None)
            limit = getattr(app, "max_body_bytes", None)  # the largest body the proxy reads for its model
            if paths:
                app = DeferralMiddleware(app, queue=queue, paths=tuple(paths))
            if budgets is not None:
                header = getattr(args, "tenant_header", None)
                tenant = tenant_of if callable(tenant_of) else (header.lower() if header else None)
                # and the model where the proxy does: the body's "model", else --model-header
                model = getattr(args, "model_header", None)
                options: dict[str, Any] = {}
                if tenant:
                    options["tenant"] = tenant
                if model:
                    options["model"] = model.lower()
                if isinstance(limit, int):
                    options["max_body_bytes"] = limit
                app = BudgetMiddleware(app, budgets=budgets, deferral=queue, model_from_body=callable(tenant_of), **options)
            return app
        except (BudgetConfigError, ValueError) as exc:
            raise UsageError(str(exc)) from None

    return wrap
