"""``wattspan dashboard``: a small live web page over the ledger.

Energy and CO2e over time per endpoint, model and tenant, joules per token,
unattributed energy, budget burn and the quality flags, refreshed every few
seconds while the server writes. Starlette serves it (uvicorn), the page draws
with plotly.js, served from the installed ``plotly`` package (MIT licence; the
``dashboard`` extra), so it works with no network.

Off unless started; bound to 127.0.0.1 unless told otherwise; any other bind
needs a token, and with a token every route (page, scripts, API) requires it
(``Authorization: Bearer <token>`` or ``?token=``). The ledger is opened
read-only, from the threadpool, never on the event loop.

Unattributed energy (device energy with no request in flight) is not in the
ledger, which holds requests: ``--metrics-url`` points the page at the
server's Prometheus exporter (``wattspan_unattributed_energy_joules_total``).
Budgets: the burn of a budget file (``--budgets`` or ``WATTSPAN_BUDGETS``) from ``wattspan.budgets.budget_status``.
"""

from __future__ import annotations

import errno
import hmac
import ipaddress
import json
import math
import os
import re
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .export.ledger import valid_sql
from .records import json_safe
from .logs import LogOnce, get_logger

__all__ = ["DataCache", "create_app", "data", "cli_main"]

log = get_logger(__name__)
_ONCE = LogOnce(log)  # a count of left-out records, logged once per ledger and count

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_TOP = 8  # series per chart; the rest are summed into "(other)"
_BUCKETS = 60
_COOKIE = "wattspan_token"
_MAX_WINDOW_S = 366 * 86400.0
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "LICENSES.md": "text/plain"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, without its port) names this machine's loopback:
    ``localhost`` in any case, with or without the root's trailing dot, a name under it (RFC 6761
    keeps ``*.localhost`` loopback), 127/8, ``::1``, or 127/8 written as an IPv4-mapped IPv6 address."""
    h = host.lower()
    h = h[:-1] if h.endswith(".") else h
    if h in _LOOPBACK or h.endswith(".localhost"):
        return True
    try:
        a = ipaddress.ip_address(h)
    except ValueError:
        return False
    mapped = getattr(a, "ipv4_mapped", None)
    return a.is_loopback or (mapped is not None and mapped.is_loopback)


def parse_window(text: str | float) -> float:
    """``15m``, ``1h``, ``7d`` or seconds -> seconds (1 s to a year)."""
    s = str(text).strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        v = float(s[:-1]) * mult[s[-1]] if s and s[-1] in mult else float(s)
    except ValueError:
        raise ValueError(f"cannot read the window {text!r}: give 15m, 1h, 7d or seconds") from None
    if not (math.isfinite(v) and 1 <= v <= _MAX_WINDOW_S):
        raise ValueError(f"the window must be between 1 s and a year, got {text!r}")
    return v


# ------------------------------------------------------------------ the data the page shows


_KEYS = ("route", "model", "tenant", "method", "device", "sensor", "simulated")
_COMPLETE_AFTER_S = 30.0  # a bucket this long past its end is taken as complete (its records committed)
_REBUILD_S = 300.0  # and the cache is rebuilt from the file this often all the same


_SUMS = ("energy_j", "host_j", "co2e_g", "embodied_g", "prompt_tokens", "output_tokens")  # the scan's sums, in its order


def _scan(conn, cols: set, lo: float, hi: float, bucket_s: float) -> list[tuple]:
    """One pass over ``lo <= recorded_at < hi``: sums per (absolute bucket, route, model, tenant, method,
    device, sensor, simulated[, quality]) over the records :func:`wattspan.export.ledger.valid_sql`
    passes (a value no writer stores: left out, not summed), and the count of those it does not."""
    extra = ", quality" if "quality" in cols else ", ''"
    band = (", TOTAL(CASE WHEN ok THEN energy_j_low END), TOTAL(CASE WHEN ok THEN energy_j_high END)"
            if {"energy_j_low", "energy_j_high"} <= cols else ", NULL, NULL")
    sums = ", ".join(f"TOTAL(CASE WHEN ok THEN {c} END)" for c in _SUMS)
    sql = (f"SELECT CAST(recorded_at / ? AS INTEGER), {', '.join(_KEYS)}{extra}, TOTAL(ok), {sums}, "
           f"TOTAL(ok AND coverage < 0.9), MAX(recorded_at){band}, TOTAL(NOT ok) "
           f"FROM s GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9")
    # MATERIALIZED: evaluated once a row (a flattened subquery repeats the check at every use of ``ok``: 6x slower)
    need = ["recorded_at", *_KEYS, *_SUMS, "coverage"]
    need += [c for c in ("quality", "energy_j_low", "energy_j_high") if c in cols]
    cte = (f"WITH s AS MATERIALIZED (SELECT {', '.join(need)}, {valid_sql(cols)} AS ok FROM requests "
           f"WHERE recorded_at >= ? AND recorded_at < ?) ")
    return conn.execute(cte + sql, (lo, hi, bucket_s)).fetchall()


class DataCache:
    """Sums of the complete buckets of one window, so that a refresh reads only the newest records.

    Buckets are aligned to multiples of ``window_s / 60`` on the wall clock; one that ended more than
    30 s ago is kept, and everything is re-read from the file every 5 minutes (a record committed late,
    after a disk problem, is counted then).
    """

    def __init__(self) -> None:
        self.key: tuple[str, float, frozenset[str]] | None = None
        self.rows: dict[int, list[tuple[Any, ...]]] = {}
        self.complete_k: int | None = None  # buckets < this are held
        self.built = -math.inf
        self.lock = threading.Lock()


def data(db: str | os.PathLike, window_s: float = 3600.0, *, now: float | None = None, metrics_url: str | None = None, budgets: str | os.PathLike | None = None,
         cache: DataCache | None = None) -> dict:
    """Everything the page shows, for the last ``window_s`` (60 buckets of ``window_s / 60``, aligned on the clock;
    the oldest may start up to one bucket earlier).

    Energies in J (``energy_j`` accelerator, ``host_j`` host, ``total_j`` both), carbon in g,
    ``j_per_token`` = total J / (prompt + output tokens). ``cache`` (a :class:`DataCache`) makes a refresh
    read only the newest records.
    """
    from .export.ledger.schema import _reading

    now = time.time() if now is None else float(now)
    bucket = window_s / _BUCKETS
    k_now = int(now // bucket)
    k0 = k_now - _BUCKETS + 1
    since = k0 * bucket
    with _reading(db) as conn:
        if conn is None:
            rows = []
        else:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
            if cache is None:
                rows = _scan(conn, cols, since, now + 1e-6, bucket)
            else:
                with cache.lock:
                    # the file's identity: a ledger replaced under the same path (mv, restore) is another set of sums
                    st = os.stat(db)
                    rows = _cached_rows(conn, cols, cache, (str(db), st.st_dev, st.st_ino), bucket, k0, now)
    return _summarise(rows, db=db, now=now, window_s=window_s, since=since, k0=k0, bucket=bucket, metrics_url=metrics_url, budgets=budgets)


def _cached_rows(conn, cols: set, cache: DataCache, db: Any, bucket: float, k0: int, now: float) -> list[tuple]:
    """The held sums of complete buckets, topped up, plus a fresh read of the rest."""
    complete_k = max(k0, int((now - _COMPLETE_AFTER_S) // bucket))
    key = (db, bucket, frozenset(cols))
    held = cache.complete_k
    if cache.key != key or time.monotonic() - cache.built > _REBUILD_S or held is None:
        cache.key, cache.rows, cache.built = key, {}, time.monotonic()
        held = cache.complete_k = k0
    start_k = max(held, k0)
    if complete_k > start_k:
        for r in _scan(conn, cols, start_k * bucket, complete_k * bucket, bucket):
            cache.rows.setdefault(int(r[0]), []).append(r)
    held = cache.complete_k = max(held, complete_k)
    for k in [k for k in cache.rows if k < k0]:
        del cache.rows[k]
    live_from = max(held, k0) * bucket
    return [r for k in sorted(cache.rows) for r in cache.rows[k]] + _scan(conn, cols, live_from, now + 1e-6, bucket)


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port: ``[::1]:8080`` -> ``::1``."""
    h = header.strip()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _summarise(rows, *, db, now, window_s, since, k0, bucket, metrics_url, budgets=None) -> dict:
    zero = {"requests": 0, "energy_j": 0.0, "host_j": 0.0, "co2e_g": 0.0, "tokens": 0, "simulated": False, "methods": set()}
    tot: dict[str, Any] = {"n": 0, "acc": 0.0, "host": 0.0, "co2": 0.0, "emb": 0.0, "pt": 0, "ot": 0, "sim": 0, "low": 0, "last": None, "lo": 0.0, "hi": 0.0}
    by: dict[str, dict[str, dict[str, Any]]] = {b: {} for b in ("route", "model", "tenant")}
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {b: {} for b in by}
    methods: dict[str, int] = {}
    sensors: dict[tuple[str, str], tuple[bool, int]] = {}
    flags: dict[str, int] = {}
    has_band = False
    excluded = 0
    for (k, route, model, tenant, method, device, sensor, sim, quality, n, e, h, c, emb, pt, ot, low, last, lo, hi, bad) in rows:
        excluded += int(bad)
        if not n:  # every record of the group left out (see valid_sql)
            continue
        n = int(n)
        tot["n"] += n
        tot["acc"] += e
        tot["host"] += h
        tot["co2"] += c
        tot["emb"] += emb
        tot["pt"] += pt
        tot["ot"] += ot
        tot["sim"] += n if sim else 0
        tot["low"] += low
        tot["last"] = last if tot["last"] is None else max(tot["last"], last)
        if lo is not None:
            has_band = True
            tot["lo"] += lo
            tot["hi"] += hi
        methods[method] = methods.get(method, 0) + n
        sk = (device, sensor)
        sensors[sk] = (sensors.get(sk, (False, 0))[0] or bool(sim), sensors.get(sk, (False, 0))[1] + n)
        if quality != "" or flags:
            flags[str(quality or "ok")] = flags.get(str(quality or "ok"), 0) + n
        i = min(max(int(k) - k0, 0), _BUCKETS - 1)
        for b, name in (("route", route), ("model", model), ("tenant", tenant)):
            g = by[b].get(name)
            if g is None:
                g = by[b][name] = {**zero, "methods": set()}
            g["requests"] += n
            g["energy_j"] += e
            g["host_j"] += h
            g["co2e_g"] += c
            g["tokens"] += pt + ot
            g["simulated"] = g["simulated"] or bool(sim)
            g["methods"].add(method)
            s = series[b].setdefault(name, ([0.0] * _BUCKETS, [0.0] * _BUCKETS))
            s[0][i] += e + h
            s[1][i] += c
    n, acc, host = tot["n"], tot["acc"], tot["host"]
    toks = tot["pt"] + tot["ot"]
    out: dict = {"now": now, "window_s": window_s, "since": since, "ledger": Path(db).name}
    out["totals"] = {"requests": int(n), "energy_j": acc, "host_j": host, "total_j": acc + host, "co2e_g": tot["co2"],
                     "embodied_g": tot["emb"], "prompt_tokens": int(tot["pt"]), "output_tokens": int(tot["ot"]),
                     "j_per_token": (acc + host) / toks if toks else None,
                     "j_per_output_token": (acc + host) / tot["ot"] if tot["ot"] else None,
                     "last_record_at": tot["last"]}
    out["by"] = {}
    out["series"] = {"bucket_s": bucket, "t": [(k0 + i + 0.5) * bucket for i in range(_BUCKETS)]}
    for b, groups in by.items():
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1]["energy_j"], str(kv[0])))
        out["by"][b] = [{"name": name or "(none)", "requests": g["requests"], "energy_j": g["energy_j"], "host_j": g["host_j"],
                         "total_j": g["energy_j"] + g["host_j"], "co2e_g": g["co2e_g"],
                         "j_per_request": (g["energy_j"] + g["host_j"]) / g["requests"],
                         "j_per_token": (g["energy_j"] + g["host_j"]) / g["tokens"] if g["tokens"] else None,
                         "simulated": g["simulated"], "methods": sorted(m for m in g["methods"] if m)} for name, g in ranked]
        top = [name for name, _ in ranked[:_TOP]]
        ser: dict[str, dict[str, list[float]]] = {}
        for name, (e, c) in series[b].items():
            label = (name or "(none)") if name in top else "(other)"
            if label in ser:
                ser[label] = {"total_j": [x + y for x, y in zip(ser[label]["total_j"], e)], "co2e_g": [x + y for x, y in zip(ser[label]["co2e_g"], c)]}
            else:
                ser[label] = {"total_j": list(e), "co2e_g": list(c)}
        out["series"][b] = ser
    out["quality"] = {"simulated_requests": int(tot["sim"]), "low_coverage_requests": int(tot["low"]), "methods": methods,
                      "sensors": [{"device": d, "sensor": s, "simulated": sim, "requests": k} for (d, s), (sim, k) in sorted(sensors.items())],
                      "flags": flags, "band_j": [tot["lo"] + host, tot["hi"] + host] if has_band else None,
                      "excluded_records": excluded}
    if excluded:  # once per new count, not on every refresh
        _ONCE.warning((str(db), excluded), "wattspan dashboard: %d record(s) of %s with a value no writer stores (non-finite, "
                      "negative or text) left out of the sums", excluded, Path(db).name)
    out["unattributed"] = _unattributed(metrics_url)
    out["budgets"] = _budgets(db, budgets)
    return out


def _unattributed(metrics_url: str | None) -> dict:
    if not metrics_url:
        return {"available": False, "note": "not in the ledger (it holds requests); start the dashboard with "
                                            "--metrics-url http://127.0.0.1:PORT/metrics (the server's Prometheus exporter)"}
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as r:  # noqa: S310 - a URL the operator gave
            text = r.read(4 << 20).decode("utf-8", "replace")
    except Exception as exc:  # a dead exporter is shown, not raised
        return {"available": False, "note": f"could not read {metrics_url}: {exc}"}
    un: dict[str, float] = {}
    hw: dict[str, float] = {}
    power: dict[str, float] = {}
    samples, skipped = parse_exposition(text)
    for name, labels, v in samples:
        dev = labels.get("hw_id", "?")
        if name == "wattspan_unattributed_energy_joules_total":
            un[dev] = un.get(dev, 0.0) + v
        elif name == "hw_energy_joules_total":
            hw[dev] = hw.get(dev, 0.0) + v
        elif name == "hw_power_watts":
            power[dev] = v
    if skipped:
        log.warning("wattspan dashboard: %d malformed line(s) in %s skipped", skipped, metrics_url)
    if not un and not hw:
        return {"available": False, "note": f"{metrics_url} has no wattspan device metrics yet"}
    return {"available": True, "source": metrics_url, "unattributed_j": un, "measured_j": hw, "power_w": power,
            "skipped_lines": skipped, "note": "since the server started (counters of its exporter)"}


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\\n]|\\.)*)"\s*')
_LABEL_END = re.compile(r"\s*\}")
_ESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], value)


def parse_exposition(text: str) -> tuple[list[tuple[str, dict[str, str], float]], int]:
    """The samples of a Prometheus (or OpenMetrics) text exposition: ``([(name, labels, value)], skipped)``.

    Label values may hold any character, escaped as the format says (``\\\\``, ``\\"``,
    ``\\n``): commas, braces and equals signs inside quotes are part of the value. A line that
    is not a sample (a comment, ``# EOF``, a blank) is passed over; a malformed one is counted in
    ``skipped`` and left out, never guessed at.
    """
    out: list[tuple[str, dict[str, str], float]] = []
    skipped = 0
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _METRIC_NAME.match(stripped)
        if m is None:
            skipped += 1
            continue
        name, pos = m.group(), m.end()
        labels: dict[str, str] = {}
        ok = True
        if stripped.startswith("{", pos):
            pos += 1
            while True:
                end = _LABEL_END.match(stripped, pos)
                if end is not None:
                    pos = end.end()
                    break
                pair = _LABEL_PAIR.match(stripped, pos)
                if pair is None:
                    ok = False
                    break
                labels[pair[1]] = _unescape(pair[2])
                pos = pair.end()
                if stripped.startswith(",", pos):
                    pos += 1
                elif _LABEL_END.match(stripped, pos) is None:
                    ok = False
                    break
        rest = stripped[pos:].partition(" # ")[0].split()  # value [timestamp] [# an OpenMetrics exemplar]
        if not ok or not rest or not stripped[pos:pos + 1].isspace() or len(rest) > 2:
            skipped += 1
            continue
        try:
            value = float(rest[0])  # also NaN, +Inf, -Inf
        except ValueError:
            skipped += 1
            continue
        out.append((name, labels, value))
    return out, skipped


_BUDGET_FILES: dict[str, tuple[tuple[int, ...], Any]] = {}  # path -> (its stat stamp, config or the error message it gave)


def _load_budgets_cached(path):
    """:func:`wattspan.budgets.load_budgets`, parsed again only when the file changes (its
    mtime, size, inode or ctime): the page refreshes every few seconds. A broken file is logged once per
    version of it, not on every refresh."""
    from .budgets import load_budgets

    key = str(path)
    st = os.stat(key)
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)  # ctime: a copy that kept the old mtime (cp -p)
    hit = _BUDGET_FILES.get(key)
    if hit is None or hit[0] != stamp:
        try:
            hit = (stamp, load_budgets(path))
        except Exception as exc:
            log.warning("budget file %s could not be read: %s", Path(key).name, exc)
            hit = (stamp, str(exc))  # the message only: a cached exception re-raised grows its traceback each time
        if len(_BUDGET_FILES) >= 16:
            _BUDGET_FILES.clear()
        _BUDGET_FILES[key] = hit
    if isinstance(hit[1], str):
        raise ValueError(hit[1])
    return hit[1]


_BUDGET_STATUS: dict[tuple[str, str], tuple[float, list]] = {}  # (ledger, budget config) -> (held until (monotonic s), rows)
_BUDGET_HOLD_S = 30.0


def _budgets(db, path) -> dict:
    """Budget burn from :func:`wattspan.budgets.budget_status` for the budget file ``path``
    (spent against this ledger when the file's source is the ledger)."""
    if not path:
        return {"available": False, "rows": [], "note": "no budgets configured (--budgets FILE or WATTSPAN_BUDGETS)"}
    from .budgets import BudgetConfig, budget_status

    try:
        cfg = _load_budgets_cached(path)
    except Exception as exc:  # logged once per version of the file
        return {"available": False, "rows": [], "note": f"budgets could not be read: {exc}"}
    try:
        if cfg.source == "ledger":
            cfg = BudgetConfig(cfg.budgets, "ledger", str(db), cfg.prometheus_url, cfg.refresh_s)
        # each budget's spend is a scan of its whole period (a year's budget: every record of the year): held
        # for at least 30 s, the file's refresh_s, and ten times what the last scan took, so a page refreshed
        # every 2 s does not keep a core busy (10 yearly budgets over 2M records: 3.1 s a scan)
        key = (str(db), repr(cfg))  # the file as parsed: another version of it is scanned afresh
        held = _BUDGET_STATUS.get(key)
        now = time.monotonic()
        if held is not None and now < held[0]:
            rows = held[1]
        else:
            rows = [s.to_dict() for s in budget_status(cfg)]
            took = time.monotonic() - now
            if len(_BUDGET_STATUS) >= 16:
                _BUDGET_STATUS.clear()
            _BUDGET_STATUS[key] = (time.monotonic() + max(_BUDGET_HOLD_S, cfg.refresh_s, 10.0 * took), rows)
    except Exception as exc:  # a broken file must not take the page down
        log.warning("budget status failed: %s", exc)
        return {"available": False, "rows": [], "note": f"budgets could not be read: {exc}"}
    if not rows:
        return {"available": False, "rows": [], "note": "no budgets in the file"}
    return {"available": True, "rows": json.loads(json.dumps(rows, default=str))}


# ------------------------------------------------------------------ the app


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()


def _plotly_js() -> Path:
    import plotly

    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not p.is_file():
        raise RuntimeError("the installed plotly has no package_data/plotly.min.js: pip install 'wattspan[dashboard]'")
    return p


def create_app(db: str | os.PathLike, *, token: str | None = None, window_s: float = 3600.0, refresh_s: float = 2.0,
               metrics_url: str | None = None, budgets: str | os.PathLike | None = None):
    """The dashboard as an ASGI app (Starlette). ``budgets``: a budget file whose burn the page shows."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    if not (0.2 <= refresh_s <= 3600):
        raise ValueError("refresh_s must be between 0.2 and 3600 seconds")
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        # it travels in a cookie and an Authorization header, both ASCII: another token could never be matched
        raise ValueError("--token must be printable ASCII without spaces")
    db = Path(db)
    plotly_js = _plotly_js()
    page = _static("dashboard.html").decode("utf-8")
    page = page.replace("{{REFRESH_MS}}", str(int(refresh_s * 1000))).replace("{{WINDOW_S}}", str(float(window_s)))
    headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
               "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                          "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"}
    want = token.encode() if token else None
    caches: dict[float, DataCache] = {}  # per window: sums of complete buckets (see DataCache)

    def allowed(request: Request) -> bool:
        if want is None:
            return True
        got = request.query_params.get("token", "") or request.cookies.get(_COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            got = auth[7:].strip()
        return hmac.compare_digest(got.encode(), want)

    def guard(fn):
        async def endpoint(request: Request):
            if want is None and not is_loopback(_host_name(request.headers.get("host", ""))):
                # no token: only this machine may read the page. A page elsewhere can point a name
                # it controls at 127.0.0.1 (DNS rebinding); its requests then carry that name.
                return PlainTextResponse("this dashboard answers to localhost only (start it with --token to serve other names)",
                                         status_code=421, headers=headers)
            if not allowed(request):
                return PlainTextResponse("a token is required: open the page as /?token=...", status_code=401, headers=headers)
            return await fn(request)

        return endpoint

    async def index(request: Request):
        resp = Response(page, media_type="text/html; charset=utf-8", headers=headers)
        if want is not None:  # the page's own requests (scripts, API) carry it from here on
            resp.set_cookie(_COOKIE, token or "", httponly=True, samesite="strict", path="/")
        return resp

    async def static(request: Request):
        name = request.path_params["name"]
        if name == "plotly.min.js":
            return FileResponse(plotly_js, media_type="text/javascript", headers={**headers, "Cache-Control": "max-age=86400"})
        if name not in _STATIC:
            return PlainTextResponse("not found", status_code=404, headers=headers)
        return Response(_static(name), media_type=_STATIC[name], headers=headers)

    async def api(request: Request):
        try:
            w = parse_window(request.query_params.get("window", window_s))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400, headers=headers)
        try:
            # at most 16 windows' sums are held: a window already held keeps its cache past the 16th
            cache = caches.get(w) or (caches.setdefault(w, DataCache()) if len(caches) < 16 else DataCache())
            body = json_safe(await run_in_threadpool(data, db, w, metrics_url=metrics_url, budgets=budgets, cache=cache))
        except FileNotFoundError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404, headers=headers)
        except Exception as exc:  # a broken or foreign file: say so on the page
            log.warning("dashboard: cannot read %s: %s", db, exc)
            return JSONResponse({"error": f"cannot read the ledger: {exc}"}, status_code=500, headers=headers)
        return JSONResponse(body, headers=headers)

    async def healthz(request: Request):
        return PlainTextResponse("ok", headers=headers)

    return Starlette(routes=[
        Route("/", guard(index)), Route("/api/data", guard(api)), Route("/static/{name}", guard(static)),
        Route("/healthz", healthz),
    ])


def _check_bind(host: str, port: int) -> None:
    """A clear error now for an address the server could not listen on (a port in use, an address
    not on this machine), where uvicorn would log its own error and exit 3."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.strerror or exc})") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as exc:
            why = "in use (another dashboard or server?)" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ValueError(f"cannot listen on {host}:{port}: {why}; give another --port") from None


def cli_main(args) -> int:
    """``wattspan dashboard`` (called by :mod:`wattspan.cli`)."""
    import uvicorn

    token = args.token or os.environ.get("WATTSPAN_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise ValueError(f"binding to {args.host} exposes the ledger beyond this machine: give --token SECRET "
                         "(or WATTSPAN_TOKEN), or keep the default --host 127.0.0.1")
    if token is not None and len(token) < 12:
        raise ValueError("--token must be at least 12 characters")
    if not (0 <= int(args.port) <= 65535):
        raise ValueError("--port must be between 0 and 65535")
    _check_bind(args.host, int(args.port))
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no wattspan ledger at {args.db} (start a metered server with a ledger, or `wattspan demo`)")
    budgets = getattr(args, "budgets", None) or os.environ.get("WATTSPAN_BUDGETS") or None
    if budgets is not None:  # a bad budget file stops the command at start, as everywhere else (then it is read per change)
        from .budgets import BudgetConfigError, load_budgets

        try:
            load_budgets(budgets)
        except BudgetConfigError as exc:
            raise ValueError(str(exc)) from None
    app = create_app(args.db, token=token, window_s=parse_window(args.window), refresh_s=float(args.refresh_s),
                     metrics_url=getattr(args, "metrics_url", None), budgets=budgets)
    config = uvicorn.Config(app, host=args.host, port=int(args.port), log_level="warning", server_header=False)
    server = uvicorn.Server(config)
    shown = f"[{args.host}]" if ":" in args.host else args.host

    async def announce():
        import asyncio

        while not server.started:
            await asyncio.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        print(f"wattspan dashboard: http://{shown}:{port}/" + ("?token=..." if token else "") + f" (ledger {args.db}; Ctrl-C to stop)", flush=True)

    import asyncio

    async def main():
        t = asyncio.ensure_future(announce())
        await server.serve()
        t.cancel()

    asyncio.run(main())
    return 0
