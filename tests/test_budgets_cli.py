"""Budgets at the proxy and in the command line: `wattspan proxy --budgets`, `wattspan report --budgets`."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import httpx

from wattspan.budgets import BudgetMiddleware, LedgerSpend, parse_budgets
from wattspan.integrations.openai_proxy import create_proxy
from wattspan.export.ledger import Ledger

from .conftest import serve
from .test_budgets import _rec, _until
from .test_openai_proxy import make_upstream


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ})


def test_the_proxy_enforces_a_budget_with_the_real_ledger(tmp_path, live_meter):
    db = tmp_path / "l.sqlite"
    led = Ledger(db)
    live_meter.add_sink(led)
    cfg = parse_budgets({"ledger": str(db), "refresh_s": 0.1, "budget": [
        {"name": "acme", "match": {"tenant": "acme", "route": "/v1/chat"}, "limit_gco2e": 1e-7, "period": "month", "action": "reject"}]})
    up = make_upstream()
    try:
        with serve(up) as up_url:
            app = BudgetMiddleware(create_proxy(up_url, meter=live_meter), budgets=cfg)
            with serve(app) as url, httpx.Client(base_url=url, timeout=10) as c:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                assert c.post("/v1/chat/completions", json=body, headers={"x-tenant-id": "acme"}).status_code == 200
                _until(lambda: app.state.statuses["acme"].state == "over")
                r = c.post("/v1/chat/completions", json=body, headers={"x-tenant-id": "acme"})
                assert r.status_code == 429 and r.json()["error"]["code"] == "carbon_budget_exceeded" and "retry-after" in r.headers
                assert c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers={"x-tenant-id": "acme"}).status_code == 200
                assert c.get("/healthz").status_code == 200
            app.close()
    finally:
        led.close()


def test_report_shows_budgets_kpis_and_burn(tmp_path):
    db = tmp_path / "l.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i, "acme", 0.5) for i in range(10)])
    b = tmp_path / "budgets.json"
    b.write_text(json.dumps({"budget": [{"name": "acme-day", "match": {"tenant": "acme"}, "limit_gco2e": 4, "period": "day", "action": "reject"}]}))
    p = _cli("report", "--db", db, "--budgets", b)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("acme-day"))
    assert "tenant=acme" in line and "125%" in line and "500" in line and "reject" in line
    p = _cli("report", "--db", db, "--budgets", b, "--format", "json")
    doc = json.loads(p.stdout)  # one document: the report's rows and the budgets
    st = doc["budgets"][0]
    assert st["state"] == "over" and st["spent"] == 5.0 and st["kpis"]["j_per_output_token"] == 10.0
    assert doc["by"] == "route" and sum(r["requests"] for r in doc["rows"]) == 10
    # CSV has no place for budgets: refused before anything is printed
    p = _cli("report", "--db", db, "--budgets", b, "--format", "csv")
    assert p.returncode == 2 and p.stdout == "" and "--format json" in p.stderr
    # a bad budget file is refused before the report prints
    b.write_text("{")
    p = _cli("report", "--db", db, "--budgets", b)
    assert p.returncode == 2 and p.stdout == "", p.stdout


def test_bad_budget_file_or_provider_is_a_clear_error_at_start(tmp_path):
    b = tmp_path / "budgets.json"
    b.write_text(json.dumps({"budget": [{"name": "nope", "limit_gco2e": 4}]}))
    p = _cli("proxy", "--upstream", "http://127.0.0.1:9", "--port", "0", "--budgets", b)
    assert p.returncode == 2 and "'nope': has no period" in p.stderr and "Traceback" not in p.stderr
    p = _cli("report", "--db", tmp_path / "x.sqlite", "--budgets", tmp_path / "missing.json")
    assert p.returncode == 2
    p = _cli("attribute", "--trace", "examples/a100/trace.csv", "--requests", "examples/a100/requests.jsonl", "--region", "FR",
             "--intensity-provider", "electricitymaps", cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2 and "ELECTRICITYMAPS_API_TOKEN" in p.stderr and "Traceback" not in p.stderr
    p = _cli("attribute", "--trace", "examples/a100/trace.csv", "--requests", "examples/a100/requests.jsonl", "--region", "FR",
             "--intensity-provider", "profile", "--marginal-provider", "watttime", cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2 and "WATTTIME_USERNAME" in p.stderr


def test_the_proxy_defers_marked_requests_and_meters_them_when_they_run(live_meter):
    from wattspan.deferral import DeferralMiddleware, DeferralQueue

    up = make_upstream()
    with serve(up) as up_url:
        q = DeferralQueue(zone="world", poll_s=0.05)
        app = DeferralMiddleware(create_proxy(up_url, meter=live_meter), queue=q, paths=("/v1/chat/completions",))
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as c:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
            now = c.post("/v1/chat/completions", json=body)
            assert now.status_code == 200  # no deadline header: served at once
            r = c.post("/v1/chat/completions", json=body, headers={"x-wattspan-deadline-s": "7200", "x-tenant-id": "acme"})
            assert r.status_code == 202 and r.headers["location"] == r.json()["status_url"]
            done = _until(lambda: (lambda d: d if d["status"] == "done" else None)(c.get(r.json()["status_url"]).json()))
            later = json.loads(done["response"]["body"])
            assert done["response"]["status"] == 200 and later["choices"] == now.json()["choices"] and later["id"] != now.json()["id"]
            assert live_meter.flush(10)
            tenants = [x.tenant for x in live_meter.records]
            assert tenants.count("acme") == 1  # the deferred run was metered, with its tenant


def test_proxy_deferral_with_an_unknown_region_fails_at_start():
    p = _cli("proxy", "--upstream", "http://127.0.0.1:9", "--port", "0", "--defer-path", "/v1/batch", "--region", "atlantis")
    assert p.returncode == 2 and "atlantis" in p.stderr and "Traceback" not in p.stderr


def test_proxy_budgets_gate_on_the_tenant_header_the_proxy_bills(tmp_path):
    # `wattspan proxy --tenant-header x-team --budgets F`: the gate read x-tenant-id, so a budget
    # over its limit for the team the ledger billed never answered 429
    import argparse

    from wattspan.cli.budgets import budget_wrapper

    b = tmp_path / "b.toml"
    b.write_text(f'ledger = "{(tmp_path / "l.sqlite").as_posix()}"\n[[budget]]\nname = "a"\nmatch = {{ tenant = "team-a" }}\n'
                 'limit_gco2e = 1.0\nperiod = "day"\naction = "reject"\n')

    async def inner(scope, receive, send):  # pragma: no cover - never called
        pass

    for header, want in (("X-Team", b"x-team"), (None, b"x-tenant-id")):
        args = argparse.Namespace(budgets=str(b), defer_paths=None, region="FR", db=None, tenant_header=header)
        app = budget_wrapper(args)(inner)
        try:
            assert app.tenant == want
        finally:
            app.close()


@contextlib.contextmanager
def _gated_proxy(tmp_path, live_meter, match: str, **proxy_options):
    """`wattspan proxy --budgets F` as the command line builds it (budget_wrapper) with one reject budget `g`
    on ``match`` (TOML), spent at its first request, over a real ledger: yields (the proxy, the gate, a client)."""
    import argparse

    from wattspan.cli.budgets import budget_wrapper

    db = tmp_path / "l.sqlite"
    led = Ledger(db)
    live_meter.add_sink(led)
    try:
        with serve(make_upstream()) as up_url:
            proxy = create_proxy(up_url, meter=live_meter, **proxy_options)
            b = tmp_path / "b.toml"
            b.write_text(f'ledger = "{db.as_posix()}"\nrefresh_s = 0.1\n[[budget]]\nname = "g"\nmatch = {{ {match} }}\n'
                         'limit_gco2e = 1e-7\nperiod = "month"\naction = "reject"\n')
            args = argparse.Namespace(budgets=str(b), defer_paths=None, region="FR", db=None, tenant_header=None, model_header="x-model")
            app = budget_wrapper(args)(proxy)
            try:
                with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
                    yield proxy, app, client
            finally:
                app.close()
    finally:
        led.close()


def test_proxy_budgets_gate_api_key_tenants_by_the_pseudonym_the_ledger_bills(tmp_path, live_meter):
    # `wattspan proxy --budgets F` with callers told apart by API key: the ledger bills `key-<hex>`, and the
    # gate compared the raw tenant header (absent), so a budget on a key's tenant never answered 429
    from wattspan.integrations.openai_proxy import _tenant_label

    label = _tenant_label(b"x-tenant-id", True, b"p" * 32)({"headers": [(b"authorization", b"Bearer sk-spender-1")]})
    with _gated_proxy(tmp_path, live_meter, f'tenant = "{label}"', pseudonym_key=b"p" * 32) as (proxy, app, c):
        assert proxy.tenant_of({"headers": [(b"authorization", b"Bearer sk-spender-1")]}) == label
        spender, other = {"authorization": "Bearer sk-spender-1"}, {"authorization": "Bearer sk-other-2"}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        assert c.post("/v1/chat/completions", json=body, headers=spender).status_code == 200
        _until(lambda: app.state.statuses["g"].state == "over")
        assert c.post("/v1/chat/completions", json=body, headers=spender).status_code == 429
        assert c.post("/v1/chat/completions", json=body, headers=other).status_code == 200
        # a header posing as the pseudonym is another tenant (header:key-...): not gated as the key
        assert c.post("/v1/chat/completions", json=body, headers={"x-tenant-id": label}).status_code == 200
        # and the spender's key cannot lift its budget by naming another tenant in the header
        r = c.post("/v1/chat/completions", json=body, headers={**spender, "x-tenant-id": "someone-else"})
        assert r.status_code == 429 and r.json()["error"]["budget"] == "g"
        assert proxy.tenants_of({"headers": [(b"authorization", b"Bearer sk-spender-1"), (b"x-tenant-id", b"t")]}) == ("t", label)
        # nor by sending a junk key header before the real Authorization (the upstream authenticates on the latter)
        junk = [("x-api-key", "junk-1"), ("authorization", "Bearer sk-spender-1")]
        assert proxy.tenant_of({"headers": [(k.encode(), v.encode()) for k, v in junk]}) == label
        assert c.post("/v1/chat/completions", json=body, headers=junk).status_code == 429


def test_a_budget_on_a_tenant_no_record_can_carry_is_refused():
    import pytest

    from wattspan.budgets import BudgetConfigError

    with pytest.raises(BudgetConfigError, match="recorded as 'teama'"):
        parse_budgets({"budget": [{"name": "x", "match": {"tenant": "team a"}, "limit_kwh": 1, "period": "day"}]})
    assert parse_budgets({"budget": [{"name": "x", "match": {"tenant": "team-a:eu.1"}, "limit_kwh": 1, "period": "day"}]})


def test_proxy_budgets_gate_on_the_model_the_body_names(tmp_path, live_meter):
    # the proxy bills the model its JSON body names; the gate read only x-model, so a budget on a
    # model served behind the proxy never answered 429 to a client that sent no such header
    with _gated_proxy(tmp_path, live_meter, 'model = "big-model"') as (proxy, app, c):
        def ask(model, **kw):
            return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, **kw)

        assert ask("big-model").status_code == 200
        _until(lambda: app.state.statuses["g"].state == "over")
        r = ask("big-model")
        assert r.status_code == 429 and r.json()["error"]["budget"] == "g"
        # a large body (an image, say) is read for its model too: the proxy bills it up to its own bound
        big = c.post("/v1/chat/completions", json={"model": "big-model", "pad": "x" * (3 << 20), "messages": []})
        assert big.status_code == 429
        ok = ask("small-model")
        assert ok.status_code == 200 and ok.json()["model"] == "small-model"  # the body still reached the upstream whole
        # a body in pieces is read whole for its model, then replayed to the upstream
        data = json.dumps({"model": "small-model", "messages": [{"role": "user", "content": "x" * 3000}]}).encode()
        parts = c.post("/v1/chat/completions", content=iter([data[:1000], data[1000:]]), headers={"content-type": "application/json"})
        assert parts.status_code == 200 and parts.json()["model"] == "small-model"


def test_proxy_ledger_budgets_are_spent_by_the_proxys_own_db(tmp_path):
    # a budget file with no `ledger` read a wattspan.sqlite beside itself, a file no proxy wrote:
    # report said "exceeded" on --db while the proxy let every request through, spent 0
    import argparse

    from wattspan.cli.budgets import budget_wrapper
    from wattspan.cli.common import UsageError

    db = tmp_path / "data" / "l.sqlite"
    db.parent.mkdir()
    with Ledger(db) as led:
        led.write([_rec(i, "acme", 0.5) for i in range(10)])
    b = tmp_path / "budgets.json"
    b.write_text(json.dumps({"budget": [{"name": "acme", "match": {"tenant": "acme"}, "limit_gco2e": 4, "period": "day",
                                         "action": "reject"}]}))

    async def inner(scope, receive, send):  # pragma: no cover - never called
        pass

    args = argparse.Namespace(budgets=str(b), defer_paths=None, region="FR", db=str(db), tenant_header=None)
    app = budget_wrapper(args)(inner)
    try:
        assert app.config.ledger == str(db)
        assert LedgerSpend(app.config.ledger).spent(app.config.budgets[0], 0.0, 4e9).co2e_g == 5.0
    finally:
        app.close()
    # without --db the proxy writes no record a ledger budget could be spent by: refused at start
    try:
        budget_wrapper(argparse.Namespace(budgets=str(b), defer_paths=None, region="FR", db=None, tenant_header=None))
    except UsageError as exc:
        assert "--db" in str(exc)
    else:
        raise AssertionError("a ledger budget without --db was accepted")
    p = _cli("proxy", "--upstream", "http://127.0.0.1:9", "--port", "0", "--budgets", b)
    assert p.returncode == 2 and "--db" in p.stderr and "Traceback" not in p.stderr


def test_budget_spend_leaves_out_the_rows_every_other_figure_leaves_out(tmp_path):
    import sqlite3

    db = tmp_path / "l.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i, "acme", 1.0) for i in range(10)])
    b = tmp_path / "budgets.json"
    b.write_text(json.dumps({"budget": [{"name": "acme", "match": {"tenant": "acme"}, "limit_gco2e": 5, "period": "year",
                                         "action": "reject"}]}))
    for bad in (float("inf"), -1e6):  # an edited row: inf made the spend inf (and JSON a traceback), -1e6 lifted the budget
        with contextlib.closing(sqlite3.connect(db)) as c:
            c.execute("UPDATE requests SET co2e_g = ? WHERE id = 'acme0'", (bad,))
            c.commit()
        p = _cli("report", "--db", db, "--budgets", b, "--format", "json")
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)["budgets"][0]
        assert st["spent"] == 9.0 and st["state"] == "over", st
