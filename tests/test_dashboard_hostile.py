"""`wattspan dashboard` against a tampered ledger, a rebinding page and a budget file that changes:
a value no writer stores is counted and left out of the sums (never an inf total or a 500), a page
that points its own name at 127.0.0.1 gets nothing without a token, and the budget file is parsed
again only when it changes."""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3

import httpx
import pytest

from wattspan import RequestRecord
from wattspan import dashboard
from wattspan.dashboard import create_app, data
from wattspan.export.ledger import Ledger

from .conftest import serve


def _rec(i: int) -> RequestRecord:
    return RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=2.0, dynamic_j=1.5, idle_j=0.5,
                         device_s=0.1, co2e_g=0.001, method="batch-fit", sensor="nvml:energy-counter", coverage=1.0,
                         route="/v1/chat", model="m", tenant=f"t{i % 2}", prompt_tokens=10, output_tokens=5, host_j=0.25)


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "w.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i) for i in range(10)])
        assert led.flush()
    return db


def _tamper(db, sql: str, *args) -> None:
    con = sqlite3.connect(db)
    con.execute(sql, args)
    con.commit()
    con.close()


@pytest.mark.parametrize("column, value", [("energy_j", math.inf), ("energy_j", -5.0), ("co2e_g", "lots"),
                                           ("host_j", -math.inf), ("prompt_tokens", -3), ("energy_j", b"\x00\x01")])
def test_a_value_no_writer_stores_is_counted_and_left_out(ledger, column, value, caplog):
    _tamper(ledger, f"UPDATE requests SET {column} = ? WHERE id = 'r0'", value)
    dashboard._ONCE.forget()
    with caplog.at_level(logging.WARNING, logger="wattspan"):
        d = data(ledger, 3600)
    json.dumps(d, allow_nan=False)  # valid JSON: no inf, no NaN
    t = d["totals"]
    assert t["requests"] == 9 and d["quality"]["excluded_records"] == 1
    assert t["total_j"] == pytest.approx(9 * 2.25) and t["co2e_g"] == pytest.approx(9 * 0.001)
    assert sum(r["requests"] for r in d["by"]["tenant"]) == 9
    assert "left out of the sums" in caplog.text
    caplog.clear()
    data(ledger, 3600)  # the same count is not logged again on every refresh
    assert "left out" not in caplog.text


def test_a_clean_ledger_excludes_nothing(ledger):
    d = data(ledger, 3600)
    assert d["quality"]["excluded_records"] == 0 and d["totals"]["requests"] == 10


def test_values_whose_sum_passes_floats_range_are_left_out_not_a_500(ledger):
    # each 1.7e308 J is finite and >= 0, two summed are not: they are left out and counted
    # (past 2**63, no meter's value); the page's JSON stays valid and sums the rest
    _tamper(ledger, "UPDATE requests SET energy_j = 1.7e308 WHERE rowid <= 2")
    with serve(create_app(ledger)) as url:
        r = httpx.get(url + "/api/data", params={"window": "1h"})
    assert r.status_code == 200
    d = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert d["totals"]["requests"] == 8 and d["quality"]["excluded_records"] == 2
    assert d["totals"]["total_j"] == pytest.approx(8 * 2.25)


def test_without_a_token_only_loopback_names_are_served(ledger):
    with serve(create_app(ledger)) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1", f"LOCALHOST:{port}", "localhost.",
                     f"app.localhost:{port}", f"[::ffff:127.0.0.1]:{port}", "127.8.9.1"):
            assert httpx.get(url + "/api/data", headers={"host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "evil.example", f"[2001:db8::1]:{port}", "", "127.0.0.1.evil.example",
                     "localhost.evil.example", "localhost..", f"[::ffff:10.0.0.1]:{port}", "evillocalhost"):
            r = httpx.get(url + "/api/data", headers={"host": host})
            assert r.status_code == 421 and "localhost only" in r.text, host
            assert httpx.get(url + "/", headers={"host": host}).status_code == 421
        assert httpx.get(url + "/healthz", headers={"host": "evil.example"}).status_code == 200


def test_with_a_token_any_name_is_served_to_its_holder(ledger):
    with serve(create_app(ledger, token="s3cret-token-value")) as url:
        h = {"host": "dash.example.org", "authorization": "Bearer s3cret-token-value"}
        assert httpx.get(url + "/api/data", headers=h).status_code == 200
        assert httpx.get(url + "/api/data", headers={"host": "dash.example.org"}).status_code == 401


def test_the_budget_file_is_parsed_again_only_when_it_changes(ledger, tmp_path, monkeypatch, caplog):
    from wattspan import budgets as budgets_mod

    f = tmp_path / "budgets.json"
    f.write_text(json.dumps({"budget": [{"name": "t0 daily", "match": {"tenant": "t0"}, "limit_gco2e": 1.0, "period": "day"}]}))
    calls = []
    real = budgets_mod.load_budgets
    monkeypatch.setattr(budgets_mod, "load_budgets", lambda p: calls.append(p) or real(p))
    dashboard._BUDGET_FILES.clear()
    for _ in range(3):
        b = data(ledger, 3600, budgets=f)["budgets"]
        assert b["available"] and b["rows"][0]["spent"] == pytest.approx(0.005)
    assert len(calls) == 1
    # a changed file (new size) is read again; a broken one is a note, logged once
    f.write_text("{ not json")
    os.utime(f, ns=(1, 1))
    with caplog.at_level(logging.WARNING, logger="wattspan"):
        for _ in range(3):
            b = data(ledger, 3600, budgets=f)["budgets"]
            assert not b["available"] and "could not be read" in b["note"]
    assert len(calls) == 2 and caplog.text.count("could not be read") == 1
    # a copy that keeps the old mtime and size (cp -p, rsync -t) is read again too
    f.write_text(json.dumps({"budget": [{"name": "t0 daily", "match": {"tenant": "t0"}, "limit_gco2e": 9.0, "period": "day"}]}))
    st = f.stat()
    f2 = tmp_path / "other.json"
    f2.write_text(f.read_text().replace("9.0", "1.0"))
    os.replace(f2, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data(ledger, 3600, budgets=f)["budgets"]["rows"][0]["limit"] == 1.0


def test_a_broken_budget_file_read_again_and_again_holds_no_memory(ledger, tmp_path):
    # a cached exception raised again grew its traceback (and the frames it keeps) on every refresh
    import gc

    f = tmp_path / "b.json"
    f.write_text("{ not json")
    dashboard._BUDGET_FILES.clear()
    data(ledger, 3600, budgets=f)
    gc.collect()
    before = len(gc.get_objects())
    for _ in range(30):
        data(ledger, 3600, budgets=f)
    gc.collect()
    assert len(gc.get_objects()) - before < 300


def test_a_token_that_no_header_can_carry_is_refused_at_start(ledger):
    # a non-ASCII token was accepted, then ?token= answered 500 (the cookie) and Bearer never matched
    for bad in ("pässwörd-long-enough", "has a space in it", "tab\tinside-token"):
        with pytest.raises(ValueError, match="printable ASCII"):
            create_app(ledger, token=bad)


def test_a_ledger_replaced_under_its_path_is_read_afresh(ledger, tmp_path):
    # the cache was keyed by the path: after `mv new old` the page summed both files' records for minutes
    import time

    _tamper(ledger, "UPDATE requests SET recorded_at = ?", time.time() - 600)  # complete buckets: the ones a cache holds
    app_data = lambda cache: data(ledger, 3600.0, cache=cache)  # noqa: E731
    cache = dashboard.DataCache()
    before = app_data(cache)
    new = tmp_path / "new.sqlite"
    with Ledger(new) as led:
        led.write([_rec(100)])
        assert led.flush()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(str(ledger) + suffix):
            os.remove(str(ledger) + suffix)
    os.replace(new, ledger)
    after = app_data(cache)
    assert json.dumps(before) != json.dumps(after)
    fresh = data(ledger, 3600.0)
    after.pop("now"), fresh.pop("now")
    assert after == fresh, "a held cache gave other sums than a fresh read"



def test_a_refused_token_from_the_environment_is_named_not_shown(ledger):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", str(ledger)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "WATTSPAN_TOKEN": "hunter2"})
    assert p.returncode == 2 and "WATTSPAN_TOKEN='*******'" in p.stderr and "hunter2" not in p.stderr, p.stderr


def test_a_bad_budget_file_stops_the_dashboard_at_start(ledger, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "b.json"
    bad.write_text("{")
    for extra, env in (((("--budgets", str(tmp_path / "missing.json"))), {}), ((), {"WATTSPAN_BUDGETS": str(bad)})):
        p = subprocess.run([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", str(ledger), "--port", "0", *extra],
                           capture_output=True, text=True, timeout=60, env={**os.environ, **env})
        assert p.returncode == 2 and ("budget file" in p.stderr or "not valid JSON" in p.stderr), p.stderr
        assert "Traceback" not in p.stderr


def test_the_budgets_burn_is_scanned_at_most_every_30_s(ledger, tmp_path, monkeypatch):
    # each refresh (every 2 s) scanned every budget's whole period: 10 yearly budgets on 2M records kept a core busy
    import wattspan.budgets as budgets_mod

    calls = []
    real = budgets_mod.budget_status
    monkeypatch.setattr(budgets_mod, "budget_status", lambda cfg: calls.append(1) or real(cfg))
    monkeypatch.setattr(dashboard, "_BUDGET_STATUS", {})
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"budget": [{"name": "y", "limit_gco2e": 1, "period": "year"}]}))
    first = dashboard._budgets(ledger, str(b))
    assert first["available"] and dashboard._budgets(ledger, str(b)) == first and len(calls) == 1
    b.write_text(json.dumps({"budget": [{"name": "y", "limit_gco2e": 2, "period": "year"}]}))
    os.utime(b, (1, 1))  # another version of the file: scanned afresh
    assert dashboard._budgets(ledger, str(b))["rows"][0]["limit"] == 2 and len(calls) == 2


def test_a_port_in_use_is_one_clear_line_at_start(ledger):
    # before: uvicorn's own "[Errno 98] error while attempting to bind" log line, and exit 3
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", str(ledger), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: in use" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
