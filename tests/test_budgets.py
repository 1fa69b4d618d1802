"""Carbon budgets: the config's errors, KPIs and burn from a real ledger, and warn / reject /
defer acting at the limit in a real uvicorn server metered by EnergyMiddleware."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, Meter, RequestRecord
from wattspan.budgets import (
    Budget, BudgetConfigError, BudgetMiddleware, LedgerSpend, Spend, budget_status, format_status, load_budgets,
    parse_budgets, status_of,
)
from wattspan.carbon import CarbonModel
from wattspan.deferral import DeferralQueue
from wattspan.export.ledger import Ledger, query
from wattspan.sources.replay import ReplaySource

from .conftest import constant_trace, serve


def _write(tmp_path, doc, name="budgets.json"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return p


@pytest.mark.parametrize(("doc", "message"), [
    ({"budget": [{"name": "a", "limit_gco2e": 1}]}, "has no period"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "week"}]}, "period must be one of day, month, year"),
    ({"budget": [{"name": "a", "period": "day"}]}, "exactly one of limit_gco2e or limit_kwh"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "limit_kwh": 1, "period": "day"}]}, "exactly one of"),
    ({"budget": [{"name": "a", "limit_gco2e": -1, "period": "day"}]}, "limit_gco2e must be a number"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "day", "action": "block"}]}, "action must be one of"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "day", "match": {"team": "x"}}]}, "match takes"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "day", "limt": 3}]}, "unknown key(s) limt"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "day"}, {"name": "a", "limit_gco2e": 1, "period": "day"}]}, "used twice"),
    ({"source": "prometheus", "budget": [{"name": "a", "limit_gco2e": 1, "period": "day"}]}, "needs prometheus_url"),
    ({"budget": []}, "no budgets"),
    ("{not json", "not valid JSON"),
    # found by a probe: each was a traceback, or silently something else
    ('{"budget": [{"name": "a", "limit_gco2e": 1' + "0" * 400 + ', "period": "day"}]}', "an integer of 401 digits"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"budget": [{"name": "a", "limit_gco2e": 1, "period": "day", "action": "reject", "action": "observe"}]}',
     "the key 'action' is given twice"),  # the last key won: a rejecting budget only observed
    ({"budget": [{"name": "team\r\nSet-Cookie: x=1", "limit_gco2e": 1, "period": "day"}]}, "printable characters"),
    ({"budget": [{"name": "a", "limit_gco2e": 1, "period": "day", "match": {"route": "v1/chat"}}]}, "starts with '/'"),  # matched nothing
])
def test_bad_budget_files_get_a_clear_error(tmp_path, doc, message):
    with pytest.raises(BudgetConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_budgets(_write(tmp_path, doc))


def test_toml_budgets_and_a_missing_file(tmp_path):
    p = _write(tmp_path, '[[budget]]\nname = "t"\nmatch = { tenant = "acme" }\nlimit_kwh = 2.5\nperiod = "month"\naction = "warn"\n', "b.toml")
    cfg = load_budgets(p)
    assert cfg.budgets[0] == Budget("t", 2.5, "kwh", "month", "warn", {"tenant": "acme"}, 0.8)
    assert cfg.ledger == str(tmp_path / "wattspan.sqlite")  # relative to the budget file
    with pytest.raises(BudgetConfigError, match="cannot read budget file"):
        load_budgets(tmp_path / "nope.json")


@pytest.mark.parametrize("name", ["b.toml", "b.json"])
def test_a_budget_file_with_a_byte_order_mark_is_read(tmp_path, name):
    # Windows editors start UTF-8 files with U+FEFF: TOML refused it ("invalid statement"), JSON too
    doc = ('[[budget]]\nname = "t"\nlimit_kwh = 2.5\nperiod = "month"\n' if name.endswith(".toml")
           else json.dumps({"budget": [{"name": "t", "limit_kwh": 2.5, "period": "month"}]}))
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + doc.encode())
    assert load_budgets(p).budgets[0].name == "t"


def test_periods_are_utc_calendar_periods():
    t = 1709251200.0 + 3600 * 5  # 2024-03-01T05:00Z (2024 is a leap year)
    assert Budget("d", 1, "gco2e", "day").bounds(t) == (1709251200.0, 1709251200.0 + 86400)
    s, e = Budget("m", 1, "gco2e", "month").bounds(t - 86400)  # in February
    assert (e - s) / 86400 == 29
    s, e = Budget("y", 1, "gco2e", "year").bounds(t)
    assert (e - s) / 86400 == 366


def test_burn_rate_forecasts_when_the_budget_runs_out():
    b = Budget("d", 100.0, "gco2e", "day")
    day = 1709251200.0
    s = status_of(b, Spend(co2e_g=25.0, requests=50, prompt_tokens=1000, output_tokens=4000, accelerator_j=8000.0), day + 6 * 3600, "test")
    assert s.burn["rate_per_hour"] == pytest.approx(25 / 6)
    assert s.burn["projected_at_period_end"] == pytest.approx(100.0)
    assert s.burn["exhausts_at_s"] is None  # exactly at the limit at midnight: not within the period
    s = status_of(b, Spend(co2e_g=50.0), day + 6 * 3600, "test")
    assert s.burn["exhausts_at_s"] == pytest.approx(day + 12 * 3600) and s.burn["exhausts_at"] == "2024-03-01T12:00:00Z"
    s = status_of(b, Spend(co2e_g=25.0, requests=50, prompt_tokens=1000, output_tokens=4000, accelerator_j=8000.0), day + 6 * 3600, "test")
    assert s.kpis["co2e_g_per_1k_requests"] == pytest.approx(500.0)
    assert s.kpis["co2e_g_per_1k_tokens"] == pytest.approx(5.0)
    assert s.kpis["j_per_output_token"] == pytest.approx(2.0)
    assert status_of(b, Spend(co2e_g=85.0), day + 6 * 3600, "t").state == "warn"
    assert status_of(b, Spend(co2e_g=100.0), day + 6 * 3600, "t").state == "over"


def _rec(i, tenant, g, route="/v1/chat", out=10, j=100.0):
    return RequestRecord(id=f"{tenant}{i}", device="gpu0", start_ns=1, end_ns=2, energy_j=j, dynamic_j=j, idle_j=0.0,
                         device_s=0.1, co2e_g=g, route=route, tenant=tenant, prompt_tokens=5, output_tokens=out, model="m1")


def test_ledger_spend_per_owner_and_kpis(tmp_path):
    db = tmp_path / "l.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i, "acme", 0.5) for i in range(10)] + [_rec(i, "globex", 2.0, route="/v1/embeddings") for i in range(4)])
    cfg = parse_budgets({"ledger": str(db), "budget": [
        {"name": "acme", "match": {"tenant": "acme"}, "limit_gco2e": 10, "period": "day"},
        {"name": "emb", "match": {"route": "/v1/emb"}, "limit_kwh": 1e-3, "period": "month"},
        {"name": "all", "limit_gco2e": 100, "period": "year"}]})
    st = {s.name: s for s in budget_status(cfg)}
    assert st["acme"].spent == pytest.approx(5.0) and st["acme"].requests == 10 and st["acme"].state == "ok"
    assert st["acme"].kpis["co2e_g_per_1k_requests"] == pytest.approx(500.0)
    assert st["acme"].kpis["co2e_g_per_1k_tokens"] == pytest.approx(5.0 / 150 * 1000)
    assert st["acme"].kpis["j_per_output_token"] == pytest.approx(10.0)
    assert st["emb"].spent == pytest.approx(400 / 3.6e6) and st["emb"].requests == 4
    assert st["all"].spent == pytest.approx(13.0)
    text = format_status(list(st.values()))
    assert "acme" in text and "tenant=acme" in text and "50%" in text
    assert "5 g" in text and "10 g" in text  # each figure with its unit, apart
    # an exceeded budget says so (not "runs out <now>"), and a limit near zero gives no 300-digit percentage
    over = parse_budgets({"ledger": str(db), "budget": [
        {"name": "tiny", "match": {"tenant": "acme"}, "limit_gco2e": 1e-300, "period": "day"}]})
    row = format_status(budget_status(over)).splitlines()[1]
    assert row.rstrip().endswith("exceeded") and ">9999%" in row and len(row) < 200, row
    # a missing ledger is no spend, a broken source is an error in the status, not an exception
    class Broken(LedgerSpend):
        def spent(self, *a):
            raise OSError("disk gone")

    bad = budget_status(cfg, source=Broken(db))
    assert all(s.error.startswith("OSError") and s.spent == 0 for s in bad)


# ----------------------------------------------------------------------------- a real server

async def chat(request):
    body = await request.body()
    await asyncio.sleep(0.05)
    return JSONResponse({"ok": True, "echo": body.decode() or None})


def _server(tmp_path, budgets: list, queue=None):
    db = tmp_path / "ledger.sqlite"
    led = Ledger(db)
    meter = Meter(sources=[ReplaySource([constant_trace(300.0)], loop=True)], idle_w=40.0,
                  carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[led], period_s=0.05, lag_s=0.05)
    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
    cfg = parse_budgets({"ledger": str(db), "refresh_s": 0.1, "budget": budgets})
    mw = BudgetMiddleware(EnergyMiddleware(app, meter=meter), budgets=cfg, deferral=queue)
    return mw, meter, led, db


def _until(cond, timeout=15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_warn_then_reject_at_the_limit_in_a_real_server(tmp_path, caplog):
    # 300 W for ~50 ms at 400 g/kWh: ~1.7 mg a request; limits of a few requests' worth
    mw, meter, led, db = _server(tmp_path, [
        {"name": "acme-day", "match": {"tenant": "acme"}, "limit_gco2e": 0.006, "period": "day", "action": "reject", "warn_at": 0.3},
        {"name": "globex-day", "match": {"tenant": "globex"}, "limit_gco2e": 0.004, "period": "day", "action": "warn"}])
    try:
        with serve(mw) as url, httpx.Client(base_url=url, timeout=10) as c:
            codes = []
            saw_warn_header = False

            def send_until_429():
                r = c.post("/v1/chat", headers={"x-tenant-id": "acme"}, content=b"{}")
                codes.append(r.status_code)
                nonlocal saw_warn_header
                saw_warn_header |= "x-wattspan-budget" in r.headers and r.status_code == 200
                if r.status_code == 429:
                    return r
                time.sleep(0.1)  # let the record reach the ledger and the refresh see it
                return None

            r = _until(send_until_429, timeout=30)
            assert codes[0] == 200 and codes[-1] == 429 and saw_warn_header
            err = r.json()["error"]
            assert err["type"] == "carbon_budget_exceeded" and err["budget"] == "acme-day" and err["spent"] >= 0.006
            assert 0 < int(r.headers["retry-after"]) <= 86400 and "acme-day; state=over" in r.headers["x-wattspan-budget"]
            # the ledger is the source of truth: what it holds is what the budget counted
            spent = sum(x["co2e_g"] for x in query(db) if x["tenant"] == "acme")
            assert spent >= 0.006 and err["spent"] == pytest.approx(spent, rel=0.5)
            # other tenants go on; globex warns (header + log line) but is served over its limit
            ok = c.post("/v1/chat", headers={"x-tenant-id": "other"}, content=b"{}")
            assert ok.status_code == 200 and "x-wattspan-budget" not in ok.headers

            def globex_over():
                g = c.post("/v1/chat", headers={"x-tenant-id": "globex"}, content=b"{}")
                assert g.status_code == 200
                time.sleep(0.1)
                return g if "state=over" in g.headers.get("x-wattspan-budget", "") else None

            with caplog.at_level("WARNING", logger="wattspan.budgets"):
                _until(globex_over, timeout=30)
            assert "carbon budget 'globex-day'" in caplog.text
            st = c.get("/wattspan/budgets").json()
            by = {b["name"]: b for b in st["budgets"]}
            assert by["acme-day"]["state"] == "over" and by["acme-day"]["burn"]["exhausts_at"]
            assert st["counts"]["reject"] >= 1 and st["counts"]["warn"] >= 1
    finally:
        mw.close()
        meter.close()
        led.close()


def test_the_servers_shutdown_stops_the_budget_refresh_thread(tmp_path):
    mw, meter, led, db = _server(tmp_path, [
        {"name": "acme-day", "match": {"tenant": "acme"}, "limit_gco2e": 1.0, "period": "day", "action": "warn"}])
    try:
        with serve(mw, lifespan="on") as url:
            assert httpx.post(f"{url}/v1/chat", headers={"x-tenant-id": "acme"}, content=b"{}").status_code == 200
            thread = mw.state._thread
            assert thread is not None and thread.is_alive()
        thread.join(10)
        assert not thread.is_alive(), "the refresh thread outlived the server"
    finally:
        mw.close()
        meter.close()
        led.close()


class _NowIsCleanest:
    """A forecast where now is the cleanest hour (so a deferred job runs at once)."""

    name = "test-forecast"

    def forecast(self, zone, start_s, end_s):
        from wattspan.carbon.intensity import IntensityValue

        n = max(1, int((end_s - start_s) // 3600) + 1)
        return [IntensityValue(100.0 + 10 * i, self.name, zone, start_s + 3600 * i) for i in range(n)]


def test_defer_queues_deferrable_requests_and_runs_them_metered(tmp_path):
    q = DeferralQueue(_NowIsCleanest(), zone="GB", max_concurrency=1, poll_s=0.05)
    mw, meter, led, db = _server(tmp_path, [
        {"name": "batch", "match": {"tenant": "batch"}, "limit_gco2e": 1e-9, "period": "day", "action": "defer"}], queue=q)
    try:
        with serve(mw) as url, httpx.Client(base_url=url, timeout=10) as c:
            first = c.post("/v1/chat", headers={"x-tenant-id": "batch"}, content=b"{}")
            assert first.status_code == 200  # nothing spent yet
            _until(lambda: mw.state.statuses.get("batch") and mw.state.statuses["batch"].state == "over")
            # not deferrable: rejected, with the hint
            r = c.post("/v1/chat", headers={"x-tenant-id": "batch"}, content=b"{}")
            assert r.status_code == 429 and "x-wattspan-deferrable" in r.json()["error"]["message"]
            r = c.post("/v1/chat", headers={"x-tenant-id": "batch", "x-wattspan-deferrable": "1", "x-wattspan-deadline-s": "21600"},
                       content=b'{"prompt": "later"}')
            assert r.status_code == 202, r.text
            job = r.json()
            assert job["status_url"].startswith("/wattspan/jobs/") and "cleanest" in job["reason"]
            assert job["decision"]["provider"] == "test-forecast" and job["decision"]["zone"] == "GB"
            done = _until(lambda: (lambda d: d if d["status"] == "done" else None)(c.get(job["status_url"]).json()))
            assert done["response"]["status"] == 200 and json.loads(done["response"]["body"])["echo"] == '{"prompt": "later"}'
            assert done["decision"]["started_s"] is not None
            # the deferred run went through EnergyMiddleware: its record is in the ledger
            _until(lambda: len([x for x in query(db) if x["tenant"] == "batch"]) >= 2)
            assert c.get("/wattspan/jobs/nope").status_code == 404
            bad = c.post("/v1/chat", headers={"x-tenant-id": "batch", "x-wattspan-deferrable": "1", "x-wattspan-deadline-s": "soon"}, content=b"{}")
            assert bad.status_code == 400
    finally:
        mw.close()
        meter.close()
        led.close()


def test_a_budget_file_that_is_not_utf8_gets_a_clear_error(tmp_path):
    p = tmp_path / "budgets.json"
    p.write_bytes('{"budget": [{"name": "équipe", "limit_gco2e": 1, "period": "day"}]}'.encode("latin-1"))
    with pytest.raises(BudgetConfigError, match="not UTF-8 text"):
        load_budgets(p)


def test_a_budgeted_tenant_keeps_its_label_past_the_middlewares_tenant_cap(tmp_path):
    # EnergyMiddleware records the 3rd distinct tenant on as "other" (max_tenants=2): a budget on a tenant that
    # first came after the cap never saw its spend, so it never answered 429
    db = tmp_path / "ledger.sqlite"
    led = Ledger(db)
    meter = Meter(sources=[ReplaySource([constant_trace(300.0)], loop=True)], idle_w=40.0,
                  carbon=CarbonModel(intensity_g_per_kwh=400.0), sinks=[led], period_s=0.05, lag_s=0.05)
    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
    cfg = parse_budgets({"ledger": str(db), "refresh_s": 0.1, "budget": [
        {"name": "late", "match": {"tenant": "late-comer"}, "limit_gco2e": 1e-9, "period": "day", "action": "reject"}]})
    energy = EnergyMiddleware(app, meter=meter, max_tenants=2)
    mw = BudgetMiddleware(energy, budgets=cfg)
    try:
        with serve(mw) as url, httpx.Client(base_url=url, timeout=10) as c:
            for t in ("a", "b", "c", "late-comer"):
                assert c.post("/v1/chat", headers={"x-tenant-id": t}, content=b"{}").status_code == 200
            _until(lambda: mw.state.statuses["late"].state == "over")
            assert c.post("/v1/chat", headers={"x-tenant-id": "late-comer"}, content=b"{}").status_code == 429
        meter.flush(5)
        tenants = sorted(r["tenant"] for r in query(db))
        assert tenants.count("late-comer") == 1 and "other" in tenants and "c" not in tenants
    finally:
        mw.close()
        meter.close()
        led.close()


@pytest.mark.parametrize("doc, says", [
    ({"source": "prometheus", "prometheus_url": "http://[::1"}, "prometheus_url"),
    ({"source": "prometheus", "prometheus_url": "http://prom:99999"}, "prometheus_url"),
    ({"source": "prometheus", "prometheus_url": "http://prom:port"}, "prometheus_url"),
    ({"match": {"route": "/\ud800"}}, "printable"),
    ({"match": {"route": "/v1\x1b[31m"}}, "printable"),
    ({"match": {"route": "/v1\nforged"}}, "printable"),
])
def test_hostile_budget_files_are_one_clear_error(doc, says):
    # a traceback from urlsplit, a port no socket has, a route no record carries that then broke the report's table
    budget = {"name": "b", "limit_gco2e": 1, "period": "day", **({"match": doc.pop("match")} if "match" in doc else {})}
    with pytest.raises(BudgetConfigError, match=says):
        parse_budgets({**doc, "budget": [budget]})
