"""Carbon budgets per tenant, team, route or model, their KPIs and burn, and the middleware that
enforces them.

A budget file (JSON, or TOML on Python 3.11+) declares budgets::

    # budgets.toml
    source = "ledger"                 # or "prometheus" (a fleet shares one budget)
    ledger = "wattspan.sqlite"        # the ledger a "ledger" source reads
    prometheus_url = "http://127.0.0.1:9090"
    refresh_s = 5                     # how often spent budgets are re-read (a background thread)

    [[budget]]
    name = "team-a"
    match = { tenant = "team-a" }     # any of tenant, route (a path prefix), model; all must hold
    limit_gco2e = 500                 # or limit_kwh
    period = "day"                    # day | month | year (UTC calendar)
    action = "reject"                 # observe | warn | reject | defer
    warn_at = 0.8                     # the fraction from which responses carry the budget header

Units: grams CO2e (location-based, as ``co2e_g``: operational x PUE + embodied) or kWh of
metered energy (accelerator + host share, before PUE). Where the spent amount comes from:

* :class:`LedgerSpend` (one host): the ledger is the source of truth; it sums the period's
  records in SQL. Records reach the ledger a few seconds after a request ends.
* :class:`PrometheusSpend` (a fleet): PromQL over wattspan's own counters,
  ``sum(increase(wattspan_co2e_grams_total{...}[<since period start>]))`` plus the whole
  count of series born in the period (or
  ``wattspan_energy_joules_total`` / 3.6e6 for kWh: accelerator energy only), so every replica
  sees the fleet's spend with no new infrastructure.

KPIs per budget and period (ledger only; Prometheus has no token counts): gCO2e per 1000
requests, per 1000 tokens (prompt + output), J per output token. Burn: the period's mean rate
so far, the amount it projects at the period's end, and when the budget runs out at that rate.

:class:`BudgetMiddleware` is pure ASGI and composes with :class:`~wattspan.EnergyMiddleware`
(put it outside: ``BudgetMiddleware(EnergyMiddleware(app), budgets=...)``, i.e. add it last
with Starlette's ``add_middleware``). Per request it reads only cached state: nothing slow on
the event loop. At or over a budget's limit: ``observe`` counts; ``warn`` adds the
``x-wattspan-budget`` header and logs (once a minute per budget); ``reject`` answers HTTP 429
with a JSON error and ``Retry-After`` (seconds to the period's end); ``defer`` sends a
deferrable request (header ``x-wattspan-deferrable: 1``, optional ``x-wattspan-deadline-s``)
to a :class:`~wattspan.deferral.DeferralQueue` and answers 202 with the job's URL
(``/wattspan/jobs/<id>``); a request that cannot be deferred is rejected like ``reject``.
``GET /wattspan/budgets`` answers every budget's status as JSON.

Environment (read here): ``WATTSPAN_BUDGETS`` (the budget file the proxy and
:func:`budget_middleware_from_env` use).
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import json
import math
import os
import sqlite3
import threading
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .logs import LogOnce, get_logger
from .records import model_label, tenant_label
from .deferral import _header, _on_startup, send_json

if TYPE_CHECKING:
    from .asgi import ASGIApp, Message, Receive, Scope, Send
    from .deferral import DeferralQueue

__all__ = [
    "Budget", "BudgetConfig", "BudgetConfigError", "BudgetStatus", "LedgerSpend", "PrometheusSpend",
    "Spend", "BudgetMiddleware", "budget_status", "load_budgets",
]

log = get_logger(__name__)

PERIODS = ("day", "month", "year")
ACTIONS = ("observe", "warn", "reject", "defer")
_SEVERITY = {"observe": 0, "warn": 1, "defer": 2, "reject": 3}
_MATCH_KEYS = ("tenant", "route", "model")
_J_PER_KWH = 3.6e6


class BudgetConfigError(ValueError):
    """A budget file that cannot be used: says which file, which budget, what is wrong."""


@dataclass(frozen=True)
class Budget:
    name: str
    limit: float
    unit: str  # "gco2e" | "kwh"
    period: str
    action: str = "observe"
    match: dict[str, str] = field(default_factory=dict)
    warn_at: float = 0.8

    def matches(self, tenant: str, path: str, model: str) -> bool:
        m = self.match
        return ((not m.get("tenant") or m["tenant"] == tenant)
                and (not m.get("route") or path.startswith(m["route"]))
                and (not m.get("model") or m["model"] == model))

    def bounds(self, now: float) -> tuple[float, float]:
        """The UTC calendar period holding ``now``: (start, end) in unix seconds."""
        d = datetime.fromtimestamp(now, timezone.utc)
        if self.period == "day":
            s = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
            return s.timestamp(), s.timestamp() + 86400.0
        if self.period == "month":
            s = datetime(d.year, d.month, 1, tzinfo=timezone.utc)
            days = calendar.monthrange(d.year, d.month)[1]
            return s.timestamp(), s.timestamp() + days * 86400.0
        s = datetime(d.year, 1, 1, tzinfo=timezone.utc)
        return s.timestamp(), datetime(d.year + 1, 1, 1, tzinfo=timezone.utc).timestamp()

    @property
    def owner(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.match.items())) or "*"


@dataclass(frozen=True)
class BudgetConfig:
    budgets: tuple[Budget, ...]
    source: str = "ledger"
    ledger: str = "wattspan.sqlite"
    prometheus_url: str = ""
    refresh_s: float = 5.0
    #: whether the file named its ``ledger`` (else the default, beside the file: a command that
    #: writes or reads a ledger of its own, ``--db``, puts that one there)
    ledger_given: bool = False


def _num(where: str, key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, int) and not isinstance(v, bool) and not lo <= v <= hi:  # an int past float's range too
        raise BudgetConfigError(f"{where}: {key} must be a number in [{lo:g}, {hi:g}], got {_short(v)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (lo <= v <= hi):
        raise BudgetConfigError(f"{where}: {key} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def parse_budgets(doc: Any, where: str = "budgets") -> BudgetConfig:
    """Validate a parsed budget document; raises BudgetConfigError naming the problem."""
    if not isinstance(doc, dict):
        raise BudgetConfigError(f"{where}: expected a table/object at the top")
    unknown = set(doc) - {"source", "ledger", "prometheus_url", "refresh_s", "budget", "budgets"}
    if unknown:
        raise BudgetConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    raw = doc.get("budget", doc.get("budgets"))
    if not isinstance(raw, list) or not raw:
        raise BudgetConfigError(f"{where}: no budgets: add one or more [[budget]] tables (a 'budget' list)")
    source = doc.get("source", "ledger")
    if source not in ("ledger", "prometheus"):
        raise BudgetConfigError(f"{where}: source must be 'ledger' or 'prometheus', got {source!r}")
    prom = str(doc.get("prometheus_url", ""))
    if source == "prometheus":
        try:
            u = urllib.parse.urlsplit(prom)
            port_ok = u.port is None or 0 < u.port  # .port raises on a port out of range or not a number
        except ValueError:
            u, port_ok = None, False
        if u is None or not port_ok or u.scheme not in ("http", "https") or not u.hostname:
            raise BudgetConfigError(f"{where}: source = 'prometheus' needs prometheus_url = 'http://host:9090', "
                                    f"got {_short(prom)}")
    refresh = _num(where, "refresh_s", doc.get("refresh_s", 5.0), 0.05, 3600.0)
    out, names = [], set()
    for i, b in enumerate(raw, start=1):
        w = f"{where}: budget {i}"
        if not isinstance(b, dict):
            raise BudgetConfigError(f"{w}: expected a table")
        name = b.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BudgetConfigError(f"{w}: needs a name")
        if len(name) > 128 or not name.isprintable():  # it goes out in a response header and in reports
            raise BudgetConfigError(f"{w}: the name must be at most 128 printable characters (no line breaks or "
                                    f"control characters), got {_short(name)}")
        w = f"{where}: budget {name!r}"
        if name in names:
            raise BudgetConfigError(f"{w}: the name is used twice")
        names.add(name)
        bad = set(b) - {"name", "match", "limit_gco2e", "limit_kwh", "period", "action", "warn_at"}
        if bad:
            raise BudgetConfigError(f"{w}: unknown key(s) {', '.join(sorted(bad))}")
        if "period" not in b:
            raise BudgetConfigError(f"{w}: has no period; say period = \"day\", \"month\" or \"year\"")
        if b["period"] not in PERIODS:
            raise BudgetConfigError(f"{w}: period must be one of {', '.join(PERIODS)}, got {b['period']!r}")
        limits = [k for k in ("limit_gco2e", "limit_kwh") if k in b]
        if len(limits) != 1:
            raise BudgetConfigError(f"{w}: give exactly one of limit_gco2e or limit_kwh")
        limit = _num(w, limits[0], b[limits[0]], 0.0, 1e15)
        action = b.get("action", "observe")
        if action not in ACTIONS:
            raise BudgetConfigError(f"{w}: action must be one of {', '.join(ACTIONS)}, got {action!r}")
        match = b.get("match", {})
        if not isinstance(match, dict) or set(match) - set(_MATCH_KEYS) or not all(isinstance(v, str) for v in match.values()):
            raise BudgetConfigError(f"{w}: match takes string values for {', '.join(_MATCH_KEYS)}, got {match!r}")
        m = match.get("model")
        if m and model_label(m) != m:
            raise BudgetConfigError(f"{w}: no record carries the model {m!r}: the ledger keeps a model's printable "
                                    f"ASCII, at most 128 characters (this one is recorded as {model_label(m)!r})")
        r = match.get("route")
        if r and (len(r) > 1024 or not r.isprintable()):  # a line break, an escape, a lone surrogate: in no record
            raise BudgetConfigError(f"{w}: match route must be at most 1024 printable characters, got {_short(r)}")
        if r and not r.startswith("/"):
            raise BudgetConfigError(f"{w}: match route {r!r} is a path prefix and starts with '/' (e.g. '/v1/chat'); "
                                    "no request's route matches it")
        t = match.get("tenant")
        if t and tenant_label(t) != t:
            raise BudgetConfigError(f"{w}: no record carries the tenant {t!r}: the ledger keeps a tenant's characters "
                                    f"[A-Za-z0-9_.:-], at most 64 (this one is recorded as {tenant_label(t)!r}; behind `wattspan proxy`, "
                                    "as that, ':h' and a digest of the value)")
        out.append(Budget(name, limit, "gco2e" if limits[0] == "limit_gco2e" else "kwh", b["period"], action,
                          dict(match), _num(w, "warn_at", b.get("warn_at", 0.8), 0.0, 1.0)))
    return BudgetConfig(tuple(out), source, str(doc.get("ledger", "wattspan.sqlite")), prom, refresh, "ledger" in doc)


def _short(v: Any) -> str:
    r = repr(v) if not isinstance(v, int) or v.bit_length() < 200 else f"an integer of {len(str(v))} digits"
    return r if len(r) <= 80 else r[:77] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: ``{"action": "reject", "action": "observe"}`` would
    silently turn a rejecting budget into an observing one (TOML refuses it too)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} is given twice in one object")
        out[k] = v
    return out


def load_budgets(path: str | os.PathLike[str]) -> BudgetConfig:
    """Read a budget file (``.json``, or ``.toml`` on Python 3.11+)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors write one) is no key
    except OSError as exc:
        raise BudgetConfigError(f"cannot read budget file {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BudgetConfigError(f"{p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        if p.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib

                doc = tomllib.loads(text)
            else:
                raise BudgetConfigError(f"{p}: TOML needs Python 3.11+; write the budgets as JSON")
        else:
            doc = json.loads(text, object_pairs_hook=_unique_keys)
    except BudgetConfigError:
        raise
    except RecursionError:
        raise BudgetConfigError(f"{p}: nested too deeply to be a budget file") from None
    except ValueError as exc:
        raise BudgetConfigError(f"{p}: not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
    cfg = parse_budgets(doc, str(p))
    if cfg.source == "ledger" and not Path(cfg.ledger).is_absolute():
        cfg = dataclasses.replace(cfg, ledger=str(p.parent / cfg.ledger))
    return cfg


# ----------------------------------------------------------------------------- spend sources

@dataclass(frozen=True)
class Spend:
    co2e_g: float = 0.0
    energy_j: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    accelerator_j: float = 0.0


class LedgerSpend:
    """The period's spend from the ledger file (read-only, any process)."""

    name = "ledger"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def spent(self, budget: Budget, since: float, until: float) -> Spend:
        if not self.path.is_file():
            return Spend()
        terms = ["recorded_at >= ?", "recorded_at < ?"]
        args: list[float | str] = [since, until]
        m = budget.match
        if m.get("tenant"):
            terms.append("tenant = ?")
            args.append(m["tenant"])
        if m.get("model"):
            terms.append("model = ?")
            args.append(m["model"])
        if m.get("route"):
            terms.append("substr(route, 1, ?) = ?")
            args += [len(m["route"]), m["route"]]
        from .export.ledger.schema import _present, connect_ro, valid_sql

        conn = connect_ro(self.path, timeout=2.0)
        try:
            # the records every other figure sums (report, audit, dashboard): a row no meter makes (an
            # infinity, a negative energy: a hand-edited file) would make the spend inf, or lift the budget
            terms.append(valid_sql(_present(conn)))
            sql = ("SELECT COUNT(*), TOTAL(co2e_g), TOTAL(energy_j + host_j), TOTAL(prompt_tokens), TOTAL(output_tokens), "
                   f"TOTAL(energy_j) FROM requests WHERE {' AND '.join(terms)}")
            n, g, e, pt, ot, acc = conn.execute(sql, args).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return Spend()
            raise
        finally:
            conn.close()
        return Spend(float(g), float(e), int(n), int(pt), int(ot), float(acc))


class PrometheusSpend:
    """The fleet's spend from Prometheus: PromQL over wattspan's counters, summed over every
    replica it scrapes, over the period so far (at least ``min_window_s``): see :meth:`promql`."""

    name = "prometheus"
    _LABELS = {"tenant": "wattspan_tenant", "model": "gen_ai_request_model", "route": "http_route"}

    def __init__(self, url: str, *, timeout_s: float = 3.0, min_window_s: float = 60.0) -> None:
        self.url, self.timeout_s, self.min_window_s = url.rstrip("/"), float(timeout_s), float(min_window_s)

    def promql(self, budget: Budget, metric: str, window_s: float) -> str:
        sel = []
        for k, v in sorted(budget.match.items()):
            esc = v.replace("\\", "\\\\").replace('"', '\\"')
            sel.append(f'{self._LABELS[k]}=~"{_re_escape(esc)}.*"' if k == "route" else f'{self._LABELS[k]}="{esc}"')
        x, w = f"{metric}{{{','.join(sel)}}}", f"{max(int(window_s), int(self.min_window_s))}s"
        # series alive at the period's start: their increase since (resets handled); series
        # born in the period (a replica started since): their whole count, which
        # increase() alone would miss before their first scrape
        return (f"(sum(increase({x}[{w}]) and {x} offset {w}) or vector(0))"
                f" + (sum({x} unless {x} offset {w}) or vector(0))")

    def _query(self, q: str) -> float:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': q})}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise ValueError(f"Prometheus answered {body.get('status')}: {body.get('error', '')}")
        res = body["data"]["result"]
        return float(res[0]["value"][1]) if res else 0.0

    def spent(self, budget: Budget, since: float, until: float) -> Spend:
        window = max(1.0, min(until, time.time()) - since)
        g = self._query(self.promql(budget, "wattspan_co2e_grams_total", window))
        j = self._query(self.promql(budget, "wattspan_energy_joules_total", window))
        return Spend(co2e_g=g, energy_j=j, accelerator_j=j)


def _re_escape(s: str) -> str:
    return "".join("\\\\" + c if c in ".^$*+?()[]{}|" else c for c in s)


# ----------------------------------------------------------------------------- status

@dataclass(frozen=True)
class BudgetStatus:
    """One budget now. ``spent`` and ``limit`` in ``unit`` (gco2e or kwh); times unix s."""

    name: str
    owner: str
    unit: str
    period: str
    period_start_s: float
    period_end_s: float
    limit: float
    spent: float
    action: str
    state: str  # ok | warn | over
    requests: int
    kpis: dict[str, float | None]
    burn: dict[str, Any]
    source: str
    error: str = ""

    @property
    def fraction(self) -> float:
        return self.spent / self.limit if self.limit > 0 else math.inf if self.spent > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.fraction if math.isfinite(self.fraction) else None
        d["period_start"] = _iso(self.period_start_s)
        d["period_end"] = _iso(self.period_end_s)
        return d


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_of(budget: Budget, spend: Spend, now: float, source: str, error: str = "") -> BudgetStatus:
    start, end = budget.bounds(now)
    spent = spend.co2e_g if budget.unit == "gco2e" else spend.energy_j / _J_PER_KWH
    elapsed = max(1.0, now - start)
    rate = spent / elapsed  # per second, the period's mean so far
    projected = spent + rate * (end - now)
    if spent >= budget.limit:
        exhausts = now if budget.limit > 0 or spent > 0 else None
    elif rate > 0:
        t = now + (budget.limit - spent) / rate
        exhausts = t if t < end else None
    else:
        exhausts = None
    tokens = spend.prompt_tokens + spend.output_tokens
    kpis = {
        "co2e_g_per_1k_requests": spend.co2e_g / spend.requests * 1000 if spend.requests else None,
        "co2e_g_per_1k_tokens": spend.co2e_g / tokens * 1000 if tokens else None,
        "j_per_output_token": spend.accelerator_j / spend.output_tokens if spend.output_tokens else None,
        "co2e_g": spend.co2e_g, "energy_kwh": spend.energy_j / _J_PER_KWH,
    }
    burn = {"rate_per_hour": rate * 3600.0, "projected_at_period_end": projected,
            "exhausts_at": _iso(exhausts) if exhausts is not None else None,
            "exhausts_at_s": exhausts}
    state = "over" if spent >= budget.limit else "warn" if spent >= budget.warn_at * budget.limit else "ok"
    return BudgetStatus(budget.name, budget.owner, budget.unit, budget.period, start, end, budget.limit, spent,
                        budget.action, state, spend.requests, kpis, burn, source, error)


class SpendSource(Protocol):
    """Where a budget's spend comes from: :class:`LedgerSpend`, :class:`PrometheusSpend`, or your own."""

    def spent(self, budget: Budget, since: float, until: float) -> Spend: ...


def _source_for(cfg: BudgetConfig) -> SpendSource:
    return PrometheusSpend(cfg.prometheus_url) if cfg.source == "prometheus" else LedgerSpend(cfg.ledger)


def budget_status(config: BudgetConfig | str | os.PathLike[str], *, source: SpendSource | None = None,
                  now: float | None = None) -> list[BudgetStatus]:
    """Every budget's spent, limit, period, KPIs and burn forecast (the read API for
    dashboards and ``wattspan report --budgets``). A source that fails gives the status with
    ``error`` set and nothing spent, never an exception."""
    cfg = config if isinstance(config, BudgetConfig) else load_budgets(config)
    src = source or _source_for(cfg)
    now = time.time() if now is None else float(now)
    out: list[BudgetStatus] = []
    for b in cfg.budgets:
        start, _ = b.bounds(now)
        try:
            spend, err = src.spent(b, start, now + 1e-6), ""
        except Exception as exc:  # a dead Prometheus, a locked file: report, do not raise
            spend, err = Spend(), f"{type(exc).__name__}: {exc}"
        out.append(status_of(b, spend, now, getattr(src, "name", "custom"), err))
    return out


def format_status(statuses: list[BudgetStatus]) -> str:
    """A table for the terminal."""
    lines = [f"{'budget':<18}{'owner':<22}{'period':<7}{'spent':>14}{'limit':>14}{'used':>8}  {'action':<8}{'g/1k req':>10}{'g/1k tok':>10}{'J/out tok':>10}  runs out"]
    for s in statuses:
        k = s.kpis

        def f(v: float | None, fmt: str) -> str:
            return format(v, fmt) if v is not None else "-"

        unit = "g" if s.unit == "gco2e" else "kWh"
        pct = s.fraction * 100
        used = (f"{pct:.0f}%" if pct < 1e4 else ">9999%") if math.isfinite(pct) else "inf"  # a limit near 0: no 300-digit figure
        out = "exceeded" if s.state == "over" else s.burn["exhausts_at"] or "not this period"
        lines.append(f"{s.name[:17]:<18}{s.owner[:21]:<22}{s.period:<7}{f'{s.spent:.4g} {unit}':>14}{f'{s.limit:.4g} {unit}':>14}{used:>8}  "
                     f"{s.action:<8}{f(k['co2e_g_per_1k_requests'], '.4g'):>10}{f(k['co2e_g_per_1k_tokens'], '.4g'):>10}"
                     f"{f(k['j_per_output_token'], '.4g'):>10}  {out}"
                     + (f"  [source error: {s.error}]" if s.error else ""))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- enforcement

class _State:
    """The statuses, refreshed by a background thread; read without blocking per request."""

    def __init__(self, cfg: BudgetConfig, source: SpendSource) -> None:
        self.cfg, self.source = cfg, source
        self.statuses: dict[str, BudgetStatus] = {}
        self.lock = threading.Lock()
        self.refreshes = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        st = budget_status(self.cfg, source=self.source)
        with self.lock:
            self.statuses = {s.name: s for s in st}
            self.refreshes += 1
            self.errors += sum(1 for s in st if s.error)

    def start(self) -> None:
        with self.lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="wattspan-budgets", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:
                log.exception("budget refresh failed")
            self._stop.wait(self.cfg.refresh_s)

    def stop(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)


def _reserve_labels(app: Any, config: BudgetConfig) -> None:
    """The tenants and models the budgets name keep their own labels in the metering middleware
    below (found by its ``.app`` chain, or a proxy's ``.metered``): past its ``max_tenants`` a new
    tenant is recorded as ``other``, and a budget on it would never see its spend."""
    tenants = {b.match["tenant"] for b in config.budgets if b.match.get("tenant")}
    models = {b.match["model"] for b in config.budgets if b.match.get("model")}
    if not (tenants or models):
        return
    node, seen = app, 0
    while node is not None and seen < 32:
        for inner in (node, getattr(node, "metered", None)):
            reserve_t = getattr(getattr(inner, "tenants", None), "reserve", None)
            reserve_m = getattr(getattr(inner, "models", None), "reserve", None)
            if callable(reserve_t) and callable(reserve_m):
                reserve_t(tenants)
                reserve_m(models)
                return
        node, seen = getattr(node, "app", None), seen + 1


class BudgetMiddleware:
    """Enforces carbon budgets (see the module doc). ``budgets``: a path or a
    :class:`BudgetConfig`; ``source``: a spend source (default from the config);
    ``deferral``: a :class:`~wattspan.deferral.DeferralQueue` for ``defer`` budgets (default:
    one on the offline profile for ``WATTSPAN_REGION``); ``max_body_bytes``: the largest
    request body a deferred job keeps; ``status_path``: where the budgets' status is served
    (None: nowhere; it names budgets and their owners)."""

    def __init__(self, app: ASGIApp, *, budgets: BudgetConfig | str | os.PathLike[str], source: SpendSource | None = None,
                 tenant: str | Callable[[Scope], str | Sequence[str]] = "x-tenant-id", model: str = "x-model", model_from_body: bool = False,
                 deferral: DeferralQueue | None = None, max_body_bytes: int = 8 << 20, default_deadline_s: float = 86400.0,
                 status_path: str | None = "/wattspan/budgets") -> None:
        self.app = app
        self.config = budgets if isinstance(budgets, BudgetConfig) else load_budgets(budgets)
        _reserve_labels(app, self.config)
        self.state = _State(self.config, source or _source_for(self.config))
        #: the tenant as the metering middleware reads it (a header name, or its callable: the proxy's, which labels
        #: a request by its API key's pseudonym), cleaned as the ledger keeps it, so a budget matches what it bills.
        #: A callable may return several: the tenant billed, then others the request answers for (the proxy's
        #: ``tenants_of``: a header's tenant and the API key's pseudonym), a budget on any of them holding.
        self.tenant: bytes | Callable[[Scope], str | Sequence[str]] = tenant if callable(tenant) else tenant.lower().encode("latin-1")
        self.model = model.lower().encode("latin-1")
        #: the model as an OpenAI-style server reads it, from the JSON body's ``model`` (else the header): the proxy's
        #: way. A POST's body is read (up to ``max_body_bytes``, then replayed) only while a budget on a model is past ``ok``.
        self.model_from_body = bool(model_from_body)
        self.deferral = deferral
        if self.deferral is None and any(b.action == "defer" for b in self.config.budgets):
            from .deferral import DeferralQueue, _default_store

            self.deferral = DeferralQueue(zone=_settings_region(), store=_default_store())
        if self.deferral is not None:
            self.deferral.resume(app, "budgets")  # the deferred requests a previous run left
        self.max_body_bytes, self.default_deadline_s = int(max_body_bytes), float(default_deadline_s)
        self.status_path = status_path  # None: do not serve the budgets' status
        self.counts: dict[str, int] = {a: 0 for a in ACTIONS}
        self.errors = 0  # requests whose tenant could not be read (gated as having none)
        self._once = LogOnce(log, every_s=60.0)  # per budget: at most one warning a minute
        self._runner: asyncio.Task[None] | None = None
        self._refreshed = False  # the first refresh runs off the event loop, at startup or the first request
        _register_metrics(self)

    def _tenant(self, scope: Scope) -> tuple[str, ...]:
        """The request's tenant labels, as its record will carry them: the one it is billed as, then any
        other it answers for (a callable may return several: the proxy's header tenant and its API key's
        pseudonym). A callable that fails: no tenant, counted."""
        source = self.tenant
        if callable(source):
            try:
                raw = source(scope)
            except Exception:
                self.errors += 1
                self._once.warning("tenant", "wattspan budgets: the tenant callable failed; gating the request with no tenant")
                return ("",)
            if isinstance(raw, (tuple, list)):
                return tuple(tenant_label(str(x)) if x else "" for x in raw) or ("",)
            return (tenant_label(str(raw)) if raw else "",)
        return (tenant_label(_header(scope, source)),)

    async def _model(self, scope: Scope, receive: Receive) -> tuple[str, Receive]:
        """The request's model label as its record will carry it, and the ``receive`` to pass on
        (the body replayed, where it was read for the model: a POST, as the proxy reads it, up to
        ``max_body_bytes``, the proxy's own bound)."""
        if not (self.model_from_body and scope.get("method") == "POST"):
            return model_label(_header(scope, self.model)), receive
        taken: list[Message] = []
        size, complete = 0, False
        while size <= self.max_body_bytes:
            msg = await receive()
            taken.append(msg)
            if msg.get("type") != "http.request":
                break  # the client left: the app hears it next
            size += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                complete = True
                break
        pending = iter(taken)

        async def replay() -> Message:
            for m in pending:
                return m
            return await receive()

        if complete and size <= self.max_body_bytes:
            body = b"".join(m.get("body", b"") for m in taken)
            if body.lstrip()[:1] == b"{":
                try:  # a large body (images) is parsed off the event loop, as the proxy does
                    obj = json.loads(body) if size <= 1 << 20 else await asyncio.to_thread(json.loads, body)
                except (ValueError, RecursionError):
                    obj = None
                if isinstance(obj, dict) and isinstance(obj.get("model"), str) and obj["model"]:
                    return model_label(obj["model"][:128]), replay
        return model_label(_header(scope, self.model)), replay

    def _start_deferral(self) -> None:
        """Run the deferral queue (resumed requests included) from the server's startup, or its first request."""
        if self.deferral is not None and self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.deferral.run())

    async def _first_refresh(self) -> None:
        """The spend so far (a ledger scan, a PromQL query: up to its timeout), off the event loop."""
        if not self._refreshed:
            self._refreshed = True
            await asyncio.to_thread(self.state.refresh)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            async def recv() -> Message:  # at the server's shutdown, the refresh thread and the deferral runner stop
                m = await receive()
                if m.get("type") == "lifespan.startup":
                    await self._first_refresh()  # the first requests see the spend too
                elif m.get("type") == "lifespan.shutdown":
                    self.close()
                return m

            if self.deferral is not None:
                self.deferral.note_state(scope)
                await self.app(scope, recv, _on_startup(send, self._start_deferral))
            else:
                await self.app(scope, recv, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._refreshed:
            await self._first_refresh()
        if self.state._thread is None:
            self.state.start()
        path = scope.get("path", "")
        if path.startswith("/wattspan/"):
            if await self._own(path, scope, send):
                return
        if self.deferral is not None and self._runner is None:
            self.deferral.note_state(scope)
            self._start_deferral()
        tenants: tuple[str, ...] | None = None
        model: str | None = None
        with self.state.lock:
            statuses = self.state.statuses
        worst, hit = None, []
        for b in self.config.budgets:
            s = statuses.get(b.name)
            if s is None or s.state == "ok":  # a budget within its limit changes nothing
                continue
            m = b.match
            if m.get("route") and not path.startswith(m["route"]):
                continue
            if tenants is None and "tenant" in m:  # each label read once, and only when it can matter
                tenants = self._tenant(scope)
            if m.get("tenant") and m["tenant"] not in (tenants or ()):
                continue
            if model is None and "model" in m:  # the body last: only for a request the rest of the budget holds
                model, receive = await self._model(scope, receive)
            if not b.matches(m.get("tenant") or (tenants or ("",))[0], path, model or ""):
                continue
            hit.append(s)
            if s.state == "over" and (worst is None or _SEVERITY[b.action] > _SEVERITY[worst.action]):
                worst = s
        if worst is not None:
            self.counts[worst.action] += 1
        if worst is not None and worst.action == "reject":
            return await self._reject(send, worst)
        if worst is not None and worst.action == "defer":
            if _header(scope, b"x-wattspan-deferrable").strip().lower() in ("1", "true", "yes") and self.deferral is not None:
                return await self._defer(scope, receive, send, worst)
            return await self._reject(send, worst, hint=" Send x-wattspan-deferrable: 1 to queue it for a cleaner hour instead.")
        extra = [(b"x-wattspan-budget", _budget_header(s).encode()) for s in hit]
        for s in hit:
            if s.action == "warn" or (s.state == "over" and s.action == "observe"):
                self._log_warn(s)
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_header)

    def _log_warn(self, s: BudgetStatus) -> None:
        when = ("it is exceeded" if s.state == "over" else
                f"at this rate it runs out {s.burn['exhausts_at'] or 'after the period ends'}")
        self._once.warning(s.name, "carbon budget %r (%s) at %s: %.4g of %.4g %s this %s; %s",
                           s.name, s.owner, f"{s.fraction * 100:.0f}%" if s.fraction < 100 else "over 100x its limit",
                           s.spent, s.limit, s.unit, s.period, when)

    async def _reject(self, send: Send, s: BudgetStatus, hint: str = "") -> None:
        retry = max(1, int(math.ceil(s.period_end_s - time.time())))
        unit = "gCO2e" if s.unit == "gco2e" else "kWh"
        body = {"error": {"type": "carbon_budget_exceeded", "code": "carbon_budget_exceeded", "budget": s.name,
                          "owner": s.owner, "period": s.period, "spent": s.spent, "limit": s.limit, "unit": s.unit,
                          "resets_at": _iso(s.period_end_s),
                          "message": f"carbon budget {s.name!r} ({s.owner}) is spent: {s.spent:.4g} of {s.limit:.4g} {unit} "
                                     f"this {s.period}; it resets at {_iso(s.period_end_s)}.{hint}"}}
        await send_json(send, 429, body, [(b"retry-after", str(retry).encode()), (b"x-wattspan-budget", _budget_header(s).encode())])

    async def _defer(self, scope: Scope, receive: Receive, send: Send, s: BudgetStatus) -> None:
        from .deferral import defer_request

        assert self.deferral is not None  # made at start when a budget defers

        await defer_request(self.deferral, self.app, scope, receive, send, default_deadline_s=self.default_deadline_s,
                            max_body_bytes=self.max_body_bytes, extra={"budget": s.name}, origin="budgets",
                            extra_headers=[(b"x-wattspan-budget", _budget_header(s).encode())])

    async def _own(self, path: str, scope: Scope, send: Send) -> bool:
        if scope.get("method") != "GET":
            return False
        if self.status_path is not None and path == self.status_path:
            with self.state.lock:
                st = [s.to_dict() for s in self.state.statuses.values()]
            await send_json(send, 200, {"budgets": st, "counts": self.counts})
            return True
        if path.startswith("/wattspan/jobs") and self.deferral is not None:
            from .deferral import job_status

            await job_status(self.deferral, path, send)
            return True
        return False

    def close(self) -> None:
        """Stop the refresh thread (and the deferral runner); the server's lifespan shutdown calls it."""
        self.state.stop()
        if self._runner is not None:
            self._runner.cancel()


def _budget_header(s: BudgetStatus) -> str:
    return f"{s.name}; state={s.state}; spent={s.spent:.6g}; limit={s.limit:.6g}; unit={s.unit}; period={s.period}"


def _register_metrics(mw: BudgetMiddleware) -> None:
    """Budget gauges on the global OTel MeterProvider, when OpenTelemetry is installed:
    ``wattspan.budget.spent``, ``wattspan.budget.limit``, ``wattspan.budget.projected``
    (burn forecast at the period's end), ``wattspan.budget.used`` (fraction), attribute
    ``wattspan.budget`` (the budget's name; bounded by the config) and ``wattspan.budget.unit``."""
    try:
        from opentelemetry import metrics
        from opentelemetry.metrics import CallbackOptions, Observation
    except ImportError:
        return

    def obs(key: str) -> Callable[[CallbackOptions], list[Observation]]:
        def cb(_options: CallbackOptions) -> list[Observation]:
            with mw.state.lock:
                st = list(mw.state.statuses.values())
            out: list[Observation] = []
            for s in st:
                v = {"spent": s.spent, "limit": s.limit, "projected": s.burn["projected_at_period_end"],
                     "used": s.fraction if math.isfinite(s.fraction) else 0.0}[key]
                out.append(Observation(float(v), {"wattspan.budget": s.name, "wattspan.budget.unit": s.unit, "wattspan.budget.period": s.period}))
            return out

        return cb

    m = metrics.get_meter("wattspan.budgets")
    for key, desc in (("spent", "Spent this period (g CO2e or kWh, see wattspan.budget.unit)"),
                      ("limit", "The budget's limit this period"),
                      ("projected", "Spend projected at the period's end at the period's mean rate"),
                      ("used", "Fraction of the budget spent")):
        m.create_observable_gauge(f"wattspan.budget.{key}", callbacks=[obs(key)], unit="1", description=desc)


def budget_middleware_from_env(app: ASGIApp) -> ASGIApp:
    """``app`` wrapped in a BudgetMiddleware when ``$WATTSPAN_BUDGETS`` names a budget file."""
    path = os.environ.get("WATTSPAN_BUDGETS", "").strip()
    return BudgetMiddleware(app, budgets=path) if path else app


def _settings_region() -> str:
    """``WATTSPAN_REGION``, read and checked once with the other settings."""
    from .settings import get_settings

    return get_settings().region
