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
Budgets come from ``wattspan.budgets.budget_status`` where that module exists.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import time
from importlib import resources
from pathlib import Path

__all__ = ["create_app", "data", "cli_main"]

log = logging.getLogger("wattspan.dashboard")

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_TOP = 8  # series per chart; the rest are summed into "(other)"
_BUCKETS = 60
_COOKIE = "wattspan_token"
_MAX_WINDOW_S = 366 * 86400.0
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "LICENSES.md": "text/plain"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


def data(db: str | os.PathLike, window_s: float = 3600.0, *, now: float | None = None, metrics_url: str | None = None) -> dict:
    """Everything the page shows, for records with ``recorded_at`` in ``[now - window_s, now]``.

    Energies in J (``energy_j`` accelerator, ``host_j`` host), carbon in g,
    ``j_per_token`` = (accelerator + host J) / (prompt + output tokens).
    """
    from ._ledger_db import _reading, aggregate

    now = time.time() if now is None else float(now)
    since = now - window_s
    out: dict = {"now": now, "window_s": window_s, "since": since, "ledger": Path(db).name}
    bucket = window_s / _BUCKETS
    with _reading(db) as conn:
        if conn is None:
            rows = None
        else:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
            w, a = " WHERE recorded_at >= ? AND recorded_at <= ?", [since, now]
            rows = conn.execute(
                "SELECT COUNT(*), TOTAL(energy_j), TOTAL(host_j), TOTAL(co2e_g), TOTAL(prompt_tokens), TOTAL(output_tokens), "
                "TOTAL(simulated), TOTAL(coverage < 0.9), MAX(recorded_at), TOTAL(embodied_g) FROM requests" + w, a).fetchone()
            groups = {}
            for by in ("route", "model", "tenant"):
                toks = conn.execute(f"SELECT {by}, TOTAL(prompt_tokens) + TOTAL(output_tokens), TOTAL(output_tokens) "
                                    f"FROM requests{w} GROUP BY {by}", a).fetchall()
                series = conn.execute(f"SELECT CAST((recorded_at - ?) / ? AS INTEGER) AS k, {by}, TOTAL(energy_j) + TOTAL(host_j), "
                                      f"TOTAL(co2e_g) FROM requests{w} GROUP BY k, {by}", [since, bucket, *a]).fetchall()
                groups[by] = (toks, series)
            methods = dict(conn.execute(f"SELECT method, COUNT(*) FROM requests{w} GROUP BY method", a).fetchall())
            sensors = [{"device": d, "sensor": s, "simulated": bool(m), "requests": n} for d, s, m, n in conn.execute(
                f"SELECT device, sensor, MAX(simulated), COUNT(*) FROM requests{w} GROUP BY device, sensor", a).fetchall()]
            flags = dict(conn.execute(f"SELECT quality, COUNT(*) FROM requests{w} GROUP BY quality", a).fetchall()) if "quality" in cols else {}
            band = conn.execute(f"SELECT TOTAL(energy_j_low), TOTAL(energy_j_high) FROM requests{w}", a).fetchone() \
                if {"energy_j_low", "energy_j_high"} <= cols else None
    if rows is None:
        rows = (0, 0.0, 0.0, 0.0, 0, 0, 0, 0, None, 0.0)
        groups = {by: ([], []) for by in ("route", "model", "tenant")}
        methods, sensors, flags, band = {}, [], {}, None
    n, acc, host, co2, pt, ot, sim, lowcov, last, emb = rows
    toks = pt + ot
    out["totals"] = {"requests": int(n), "energy_j": acc, "host_j": host, "total_j": acc + host, "co2e_g": co2,
                     "embodied_g": emb, "prompt_tokens": int(pt), "output_tokens": int(ot),
                     "j_per_token": (acc + host) / toks if toks else None,
                     "j_per_output_token": (acc + host) / ot if ot else None,
                     "last_record_at": last}
    out["by"], out["series"] = {}, {"bucket_s": bucket, "t": [since + (k + 0.5) * bucket for k in range(_BUCKETS)]}
    for by in ("route", "model", "tenant"):
        agg = aggregate(db, by, since=since, until=math.nextafter(now, math.inf)) if n else []
        tk = {k: (t, o) for k, t, o in groups[by][0]}
        out["by"][by] = [{"name": r[by] or "(none)", "requests": r["requests"], "energy_j": r["energy_j"], "host_j": r["host_j"],
                          "total_j": r["energy_j"] + r["host_j"], "co2e_g": r["co2e_g"], "j_per_request": (r["energy_j"] + r["host_j"]) / r["requests"],
                          "j_per_token": (r["energy_j"] + r["host_j"]) / tk[r[by]][0] if tk.get(r[by], (0, 0))[0] else None,
                          "simulated": r["simulated"], "methods": r["methods"]} for r in agg]
        top = [r["name"] for r in out["by"][by][:_TOP]]
        ser = {name: {"total_j": [0.0] * _BUCKETS, "co2e_g": [0.0] * _BUCKETS} for name in top}
        for k, key, e, c in groups[by][1]:
            name = key or "(none)"
            if name not in ser:
                name = "(other)"
                ser.setdefault(name, {"total_j": [0.0] * _BUCKETS, "co2e_g": [0.0] * _BUCKETS})
            k = min(max(int(k), 0), _BUCKETS - 1)
            ser[name]["total_j"][k] += e
            ser[name]["co2e_g"][k] += c
        out["series"][by] = ser
    out["quality"] = {"simulated_requests": int(sim), "low_coverage_requests": int(lowcov), "methods": methods,
                      "sensors": sensors, "flags": {str(k or "ok"): v for k, v in flags.items()},
                      "band_j": None if band is None else [band[0] + host, band[1] + host]}
    out["unattributed"] = _unattributed(metrics_url)
    out["budgets"] = _budgets(db)
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
    un, hw, power = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("}") if rest else ("", "", line.split()[-1])
        name = name.split()[0]
        try:
            v = float(value.split()[0]) if value.strip() else float(line.split()[-1])
        except (ValueError, IndexError):
            continue
        dev = "?"
        for part in labels.split(","):
            k, _, val = part.partition("=")
            if k.strip() == "hw_id":
                dev = val.strip().strip('"')
        if name == "wattspan_unattributed_energy_joules_total":
            un[dev] = un.get(dev, 0.0) + v
        elif name == "hw_energy_joules_total":
            hw[dev] = hw.get(dev, 0.0) + v
        elif name == "hw_power_watts":
            power[dev] = v
    if not un and not hw:
        return {"available": False, "note": f"{metrics_url} has no wattspan device metrics yet"}
    return {"available": True, "source": metrics_url, "unattributed_j": un, "measured_j": hw, "power_w": power,
            "note": "since the server started (counters of its exporter)"}


def _budgets(db) -> dict:
    """Budget burn from ``wattspan.budgets.budget_status`` (rows: name, used, limit, unit, fraction), if present."""
    try:
        from . import budgets  # type: ignore[attr-defined]
    except ImportError:
        return {"available": False, "rows": [], "note": "no budgets configured"}
    try:
        fn = getattr(budgets, "budget_status")
        try:
            rows = fn(db=db)
        except TypeError:
            rows = fn()
        rows = [dict(r) if not isinstance(r, dict) else r for r in (rows or [])]
    except Exception as exc:
        log.warning("budget status failed: %s", exc)
        return {"available": False, "rows": [], "note": f"budgets could not be read: {exc}"}
    if not rows:
        return {"available": False, "rows": [], "note": "no budgets configured"}
    return {"available": True, "rows": json.loads(json.dumps(rows, default=str))}


# ------------------------------------------------------------------ the app


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _plotly_js() -> Path:
    import plotly

    p = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not p.is_file():
        raise RuntimeError("the installed plotly has no package_data/plotly.min.js: pip install 'wattspan[dashboard]'")
    return p


def create_app(db: str | os.PathLike, *, token: str | None = None, window_s: float = 3600.0, refresh_s: float = 2.0,
               metrics_url: str | None = None):
    """The dashboard as an ASGI app (Starlette)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    if not (0.2 <= refresh_s <= 3600):
        raise ValueError("refresh_s must be between 0.2 and 3600 seconds")
    db = Path(db)
    plotly_js = _plotly_js()
    page = _static("dashboard.html").decode("utf-8")
    page = page.replace("{{REFRESH_MS}}", str(int(refresh_s * 1000))).replace("{{WINDOW_S}}", str(float(window_s)))
    headers = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
               "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                          "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"}
    want = token.encode() if token else None

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
            if not allowed(request):
                return PlainTextResponse("a token is required: open the page as /?token=...", status_code=401, headers=headers)
            return await fn(request)

        return endpoint

    async def index(request: Request):
        resp = Response(page, media_type="text/html; charset=utf-8", headers=headers)
        if want is not None:  # the page's own requests (scripts, API) carry it from here on
            resp.set_cookie(_COOKIE, token, httponly=True, samesite="strict", path="/")
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
            body = await run_in_threadpool(data, db, w, metrics_url=metrics_url)
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
    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no wattspan ledger at {args.db} (start a metered server with a ledger, or `wattspan demo`)")
    app = create_app(args.db, token=token, window_s=parse_window(args.window), refresh_s=float(args.refresh_s),
                     metrics_url=getattr(args, "metrics_url", None))
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
