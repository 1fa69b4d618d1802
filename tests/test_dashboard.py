"""`wattspan dashboard`: the figures it serves are the ledger's, it refuses to be exposed
without a token, and a real headless Chromium shows the demo's traffic live. The Grafana
dashboard queries only metrics the exporter really emits."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from wattspan import RequestRecord
from wattspan.dashboard import create_app, data, parse_exposition, parse_window
from wattspan.export.ledger import Ledger, aggregate, query

from .backends import otel_prometheus, prometheus  # noqa: F401 - fixtures
from .backends import _unavailable
from .conftest import serve

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "examples" / "grafana" / "wattspan-dashboard.json"


def _rec(i: int, route: str, tenant: str, model: str = "m1") -> RequestRecord:
    return RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=1.0 + i % 5, dynamic_j=1.0,
                         idle_j=i % 5, device_s=0.1, co2e_g=0.0005 * (1 + i % 5), method="batch-fit", sensor="nvml:energy-counter",
                         coverage=0.5 if i == 3 else 1.0, simulated=i % 7 == 0, route=route, model=model, tenant=tenant,
                         prompt_tokens=20, output_tokens=i % 9, host_j=0.1)


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "w.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i, ("/v1/embeddings", "/v1/completions", "/v1/chat")[i % 3], f"team-{i % 4}", f"m{i % 2}") for i in range(30)])
        assert led.flush()
    return db


class TestData:
    def test_a_blob_label_another_writer_left_is_served_as_text(self, ledger):
        # the page's JSON failed (bytes are not JSON: a 500 on every refresh) for one such row
        import sqlite3

        con = sqlite3.connect(ledger)
        con.execute("UPDATE requests SET route = ?, tenant = ? WHERE id = 'r0'", (b"\xff/v1", b"t\x00"))
        con.commit()
        con.close()
        d = data(ledger, 3600)
        json.dumps(d)
        assert d["totals"]["requests"] == 30
        assert "\ufffd/v1" in json.dumps(d, ensure_ascii=False)

    def test_totals_tables_and_series_are_the_ledgers(self, ledger):
        d = data(ledger, 3600)
        rows = query(ledger)
        t = d["totals"]
        assert t["requests"] == 30
        assert t["total_j"] == pytest.approx(sum(r["energy_j"] + r["host_j"] for r in rows), rel=1e-12)
        assert t["co2e_g"] == pytest.approx(sum(r["co2e_g"] for r in rows), rel=1e-12)
        toks = sum(r["prompt_tokens"] + r["output_tokens"] for r in rows)
        assert t["j_per_token"] == pytest.approx(t["total_j"] / toks, rel=1e-12)
        for by in ("route", "model", "tenant"):
            want = {a[by]: a for a in aggregate(ledger, by)}
            got = {r["name"]: r for r in d["by"][by]}
            assert got.keys() == want.keys()
            for k, r in got.items():
                assert r["requests"] == want[k]["requests"]
                assert r["total_j"] == pytest.approx(want[k]["energy_j"] + want[k]["host_j"], rel=1e-12)
            # the series add up to the same totals
            assert sum(sum(s["total_j"]) for s in d["series"][by].values()) == pytest.approx(t["total_j"], rel=1e-9)
        q = d["quality"]
        assert q["simulated_requests"] == sum(r["simulated"] for r in rows) and q["low_coverage_requests"] == 1
        assert q["methods"] == {"batch-fit": 30}
        assert d["budgets"]["available"] is False and "no budgets configured" in d["budgets"]["note"]
        assert d["unattributed"]["available"] is False and "--metrics-url" in d["unattributed"]["note"]

    def test_a_window_excludes_older_records_and_an_empty_ledger_reads_as_zero(self, ledger, tmp_path):
        assert data(ledger, 60, now=time.time() + 3600)["totals"]["requests"] == 0
        empty = tmp_path / "e.sqlite"
        Ledger(empty).close()
        assert data(empty, 60)["totals"]["requests"] == 0
        assert parse_window("15m") == 900 and parse_window("2h") == 7200
        for bad in ("0", "forever", "-1h", "1000w"):
            with pytest.raises(ValueError):
                parse_window(bad)

    def test_budget_burn_is_the_ledgers_spend_against_the_budget_file(self, ledger, tmp_path):
        import json

        f = tmp_path / "budgets.json"
        f.write_text(json.dumps({"budget": [{"name": "team-1 daily", "match": {"tenant": "team-1"}, "limit_gco2e": 0.004, "period": "day"}]}))
        b = data(ledger, 3600, budgets=f)["budgets"]
        spent = sum(r["co2e_g"] for r in query(ledger) if r["tenant"] == "team-1")
        assert b["available"] is True and b["rows"][0]["name"] == "team-1 daily"
        assert b["rows"][0]["spent"] == pytest.approx(spent, rel=1e-9)
        assert b["rows"][0]["fraction"] == pytest.approx(spent / 0.004, rel=1e-9)
        f.write_text("{broken")
        assert "could not be read" in data(ledger, 3600, budgets=f)["budgets"]["note"]

    def test_unattributed_energy_from_the_real_exporter(self, ledger):
        prometheus_client = pytest.importorskip("prometheus_client")
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider

        from wattspan.export.otel import EnergyMetrics

        from .conftest import free_port

        reg = prometheus_client.CollectorRegistry()
        mp = MeterProvider(metric_readers=[PrometheusMetricReader(registry=reg)])
        EnergyMetrics(mp).observe_device("gpu0", 500.0, 120.0, unattributed_j_total=42.5)
        port = free_port()
        server, th = prometheus_client.start_http_server(port, addr="127.0.0.1", registry=reg)
        try:
            u = data(ledger, 3600, metrics_url=f"http://127.0.0.1:{port}/metrics")["unattributed"]
        finally:
            server.shutdown()
            server.server_close()
            th.join(5)
            mp.shutdown()
        assert u["available"] is True
        assert u["unattributed_j"] == {"gpu0": 42.5} and u["measured_j"] == {"gpu0": 500.0} and u["power_w"] == {"gpu0": 120.0}
        dead = data(ledger, 3600, metrics_url=f"http://127.0.0.1:{free_port()}/metrics")["unattributed"]
        assert dead["available"] is False and "could not read" in dead["note"]


HOSTILE = ['a,hw_id="evil"', 'x}', "back\\slash", "new\nline", ",", '"', "hw_id=gpu9,", "{}=,\\\""]


class TestExposition:
    """The dashboard reads the server's Prometheus exposition; a label value may hold any character."""

    def test_hostile_label_values_are_read_as_the_exporter_wrote_them(self, ledger, tmp_path):
        prometheus_client = pytest.importorskip("prometheus_client")
        from prometheus_client.parser import text_string_to_metric_families

        reg = prometheus_client.CollectorRegistry()
        c = prometheus_client.Counter("hw_energy_joules", "J", ["model", "hw_id"], registry=reg)
        g = prometheus_client.Gauge("hw_power_watts", "W", ["hw_id", "model"], registry=reg)
        for i, evil in enumerate(HOSTILE):
            c.labels(model=evil, hw_id=f"gpu{i}").inc(10.0 + i)
            g.labels(hw_id=f"gpu{i}", model=evil).set(100.0 + i)
        text = prometheus_client.generate_latest(reg).decode()
        samples, skipped = parse_exposition(text)
        reference = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
        assert skipped == 0 and sorted(samples, key=repr) == sorted(reference, key=repr)
        f = tmp_path / "metrics.txt"
        f.write_text(text)
        u = data(ledger, 3600, metrics_url=f.as_uri())["unattributed"]
        assert u["measured_j"] == {f"gpu{i}": 10.0 + i for i in range(len(HOSTILE))}
        assert u["power_w"] == {f"gpu{i}": 100.0 + i for i in range(len(HOSTILE))}

    def test_malformed_lines_are_counted_never_guessed(self):
        text = "\n".join([
            "# HELP hw_power_watts W", "# TYPE hw_power_watts gauge",
            'hw_power_watts{hw_id="gpu0",} 120 1700000000000',  # a trailing comma and a timestamp are allowed
            'hw_power_watts{hw_id="gpu1} 5',  # an unclosed quote
            'hw_power_watts{hw_id=gpu2} 5',  # an unquoted value
            'hw_power_watts{hw_id="gpu3"}5',  # no space before the value
            'hw_power_watts{hw_id="gpu4"} five',
            'wattspan_unattributed_energy_joules_total{hw_id="g\\"5\\\\"} 7 # {trace_id="x"} 1',  # an exemplar
            "# EOF",
        ])
        samples, skipped = parse_exposition(text)
        assert skipped == 4
        assert samples == [("hw_power_watts", {"hw_id": "gpu0"}, 120.0),
                           ("wattspan_unattributed_energy_joules_total", {"hw_id": 'g"5\\'}, 7.0)]


class TestServing:
    def test_a_token_guards_every_route(self, ledger):
        secret = "s3cret-token-for-tests"
        with serve(create_app(ledger, token=secret)) as url:
            for path in ("/", "/api/data", "/static/dashboard.js", "/static/plotly.min.js"):
                assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + "/api/data", headers={"authorization": "Bearer wrong"}).status_code == 401
            r = httpx.get(url + "/api/data", headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 200 and r.json()["totals"]["requests"] == 30
            with httpx.Client(base_url=url) as c:  # the page sets a cookie its own requests carry
                page = c.get("/", params={"token": secret})
                assert page.status_code == 200 and "wattspan" in page.text
                assert c.get("/static/plotly.min.js").status_code == 200
                assert c.get("/api/data").json()["totals"]["requests"] == 30
            assert httpx.get(url + "/healthz").status_code == 200

    def test_headers_static_files_and_bad_windows(self, ledger):
        with serve(create_app(ledger)) as url:
            r = httpx.get(url + "/")
            assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
            js = httpx.get(url + "/static/plotly.min.js")
            assert js.status_code == 200 and len(js.content) > 1_000_000 and js.headers["content-type"].startswith("text/javascript")
            assert httpx.get(url + "/static/LICENSES.md").text.count("MIT") >= 1
            assert httpx.get(url + "/static/../cli.py").status_code == 404
            assert httpx.get(url + "/api/data", params={"window": "nonsense"}).status_code == 400

    def test_a_public_bind_needs_a_token(self, ledger):
        p = subprocess.run([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", ledger, "--host", "0.0.0.0"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "--token" in p.stderr
        p = subprocess.run([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", ledger.parent / "none.sqlite"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "no wattspan ledger" in p.stderr


# ---------------------------------------------------------------------------- the browser


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        _unavailable("Chromium and chromedriver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _start_dashboard(db: Path, *extra: str):
    p = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "dashboard", "--db", str(db), "--port", "0", "--refresh-s", "0.5", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not m:
        p.kill()
        raise AssertionError(f"the dashboard did not start: {line!r} {p.stderr.read()}")
    return p, m.group(1)


def _shown(drv, element_id: str) -> tuple[float | None, str]:
    el = drv.find_element("id", element_id)
    v = el.get_attribute("data-value")
    return (float(v) if v else None), el.text


def _num(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


def _drive_load(url: str, n_embed: int, n_complete: int, done: threading.Event, errors: list) -> None:
    from wattspan.demo.run import _drive

    class Progress:
        def update(self, n):
            pass

    try:
        errors.extend(asyncio.run(_drive(url, n_embed, n_complete, 4, 1, Progress())))
    except Exception as exc:  # reported by the test
        errors.append(repr(exc))
    finally:
        done.set()


@pytest.mark.backend
def test_browser_shows_the_demos_traffic_live_and_matches_the_ledger(tmp_path):
    pytest.importorskip("torch")
    from wattspan.demo.run import Server, build

    drv = _browser()
    db = tmp_path / "demo.sqlite"
    app, meter, ledger = build(db=db)
    server = Server(app).start()
    dash, dash_url = _start_dashboard(db, "--window", "15m")
    shots = []
    try:
        # a first wave, so that the page has something to show, then load while it watches
        done, errors = threading.Event(), []
        _drive_load(server.url, 6, 2, done, errors)
        assert not errors, errors
        assert meter.flush(30) and ledger.flush(10)
        drv.get(dash_url)
        wait = _waiter(drv)
        wait(lambda d: (_shown(d, "t-requests")[0] or 0) >= 8)
        first = _shown(drv, "t-requests")[0]
        done.clear()
        th = threading.Thread(target=_drive_load, args=(server.url, 24, 10, done, errors), daemon=True)
        th.start()
        # live: the count grows while the load runs, and never runs ahead of the ledger
        wait(lambda d: (_shown(d, "t-requests")[0] or 0) > first, timeout=120)
        during = _shown(drv, "t-requests")[0]
        assert during <= len(query(db))
        th.join(300)
        assert done.is_set() and not errors, errors
        assert meter.flush(30) and ledger.flush(10)
        n = len(query(db))
        assert n == 42
        wait(lambda d: _shown(d, "t-requests")[0] == n, timeout=30)
        time.sleep(1.2)  # one more refresh: every panel drawn from the final state
        rows = query(db)
        total = sum(r["energy_j"] + r["host_j"] for r in rows)
        co2 = sum(r["co2e_g"] for r in rows)
        toks = sum(r["prompt_tokens"] + r["output_tokens"] for r in rows)
        v, text = _shown(drv, "t-energy")
        assert v == pytest.approx(total, rel=1e-9) and _num(text) == pytest.approx(total, rel=1e-3) and text.endswith(" J")
        v, text = _shown(drv, "t-co2e")
        assert v == pytest.approx(co2, rel=1e-9) and _num(text) == pytest.approx(co2, rel=1e-3)
        v, text = _shown(drv, "t-jpt")
        assert toks > 0 and v == pytest.approx(total / toks, rel=1e-9) and _num(text) == pytest.approx(total / toks, rel=1e-3)
        assert drv.find_element("id", "banner").is_displayed()  # simulated power, said so
        # the endpoint table: one row per route, figures as the ledger aggregates them
        want = {a["route"]: a for a in aggregate(db, "route")}
        seen = {r["name"]: r["cells"] for r in drv.execute_script(  # one read of the table (it is redrawn every refresh)
            "return [...document.querySelectorAll('#tbl-route tr[data-name]')].map(tr => ({name: tr.dataset.name, "
            "cells: Object.fromEntries([...tr.querySelectorAll('td[data-key]')].map(td => [td.dataset.key, [td.dataset.value, td.textContent]]))}))")}
        assert seen.keys() == want.keys() == {"/v1/embeddings", "/v1/completions"}
        for route, cells in seen.items():
            assert int(cells["requests"][1]) == want[route]["requests"]
            e = want[route]["energy_j"] + want[route]["host_j"]
            assert float(cells["total_j"][0]) == pytest.approx(e, rel=1e-9)
            assert _num(cells["total_j"][1]) == pytest.approx(e, rel=1e-3)
        # both charts drawn by plotly, with one bar trace per endpoint
        n_traces = drv.execute_script("return document.getElementById('chart-time').data.length")
        assert n_traces == 2
        share = drv.execute_script("return document.getElementById('chart-share').data[0].x")
        assert sorted(share) == pytest.approx(sorted(a["energy_j"] + a["host_j"] for a in want.values()), rel=1e-9)
        assert "no budgets configured" in drv.find_element("id", "budgets").text
        assert "simulated: 42 of 42" in drv.find_element("id", "quality").text
        logs = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"] if hasattr(drv, "get_log") else []
        assert not logs, logs
        shots.append(tmp_path / "dashboard.png")
        drv.save_screenshot(str(shots[-1]))
    finally:
        dash.terminate()
        dash.wait(10)
        server.stop()
        meter.close()
        ledger.close()
    # with a token: refused without it, shown with it
    tok = "a-long-enough-token"
    dash, dash_url = _start_dashboard(db, "--token", tok)
    try:
        drv.get(dash_url)
        assert "a token is required" in drv.find_element("tag name", "body").text
        drv.get(dash_url + "?token=" + tok)
        _waiter(drv)(lambda d: _shown(d, "t-requests")[0] == 42)
    finally:
        dash.terminate()
        dash.wait(10)
        drv.quit()
    out = os.environ.get("WATTSPAN_SCREENSHOT_DIR")
    if out:
        shutil.copy(shots[0], Path(out) / "dashboard.png")


def _waiter(drv):
    from selenium.webdriver.support.ui import WebDriverWait

    def wait(cond, timeout=60):
        WebDriverWait(drv, timeout, poll_frequency=0.1).until(cond)

    return wait


# ---------------------------------------------------------------------------- Grafana


def _emitted() -> dict[str, set[str]]:
    """Metric name -> label names, as the OTel Prometheus exporter writes wattspan's metrics."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    from wattspan.export.otel import EnergyMetrics

    reg = prometheus_client.CollectorRegistry()
    mp = MeterProvider(metric_readers=[PrometheusMetricReader(registry=reg)])
    m = EnergyMetrics(mp, health=lambda: {"poll_errors": {"nvml": 0}, "dropped_rows": {"gpu0": 0}, "last_poll_age_s": 0.1})
    m.observe(_rec(1, "/v1/x", "t", "m"))
    m.observe_device("gpu0", 10.0, 100.0, unattributed_j_total=1.0)
    out: dict[str, set[str]] = {}
    for fam in reg.collect():
        for s in fam.samples:
            out.setdefault(s.name, set()).update(k for k in s.labels)
    mp.shutdown()
    return out


def _exprs() -> list[str]:
    dash = json.loads(GRAFANA.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]] + \
        [v["definition"] for v in dash["templating"]["list"]]


LABELS = {"wattspan_tenant", "wattspan_simulated", "wattspan_source", "wattspan_status_class", "hw_id", "hw_type"}


def test_grafana_dashboard_queries_only_metrics_and_labels_the_exporter_emits():
    emitted = _emitted()
    dash = json.loads(GRAFANA.read_text())
    assert dash["__inputs"][0]["pluginId"] == "prometheus" and len(dash["panels"]) >= 10
    used = set()
    for expr in _exprs():
        for name, sel in re.findall(r"\b((?:wattspan|hw)_[a-z0-9_]+)(\{[^}]*\})?", expr):
            if name in LABELS:
                continue
            assert name in emitted, f"{name} in {expr!r} is not a metric the exporter emits"
            used.add(name)
            for label in re.findall(r"([a-z_]+)\s*=~?\s*\"", sel):
                assert label in emitted[name], f"label {label} is not on {name}"
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                assert label == "le" or any(label in labels for labels in emitted.values()), f"no metric has label {label}"
    for name in ("wattspan_energy_joules_total", "wattspan_co2e_grams_total", "hw_power_watts",
                 "wattspan_unattributed_energy_joules_total", "wattspan_request_energy_joules_bucket"):
        assert name in used


@pytest.mark.backend
def test_grafana_queries_return_data_from_a_real_prometheus(prometheus, otel_prometheus):  # noqa: F811
    from wattspan.export.otel import EnergyMetrics

    m = EnergyMetrics(otel_prometheus.meter_provider, health=lambda: {"poll_errors": {"nvml": 0}, "dropped_rows": {"gpu0": 0}, "last_poll_age_s": 0.1})
    for i in range(12):
        m.observe(_rec(i, ("/v1/a", "/v1/b")[i % 2], f"t{i % 3}", "m"))
    m.observe_device("gpu0", 100.0, 120.0, unattributed_j_total=5.0)

    def count_is(n):
        return lambda r: bool(r) and float(r[0]["value"][1]) == n

    # scraped once before the second wave, so that rate() and increase() have two points
    prometheus.wait_for("sum(wattspan_request_energy_joules_count)", count_is(12))
    for i in range(12, 20):
        m.observe(_rec(i, ("/v1/a", "/v1/b")[i % 2], f"t{i % 3}", "m"))
    m.observe_device("gpu0", 160.0, 120.0, unattributed_j_total=9.0)
    prometheus.wait_for("sum(wattspan_request_energy_joules_count)", count_is(20))
    subst = {"$__range": "1m", "$__rate_interval": "1m", "$route": ".*", "$tenant": ".*", "$model": ".*"}
    empty = []
    for expr in _exprs():
        if expr.startswith("label_values"):
            continue
        q = expr
        for k, v in subst.items():
            q = q.replace(k, v)
        res = prometheus.wait_for(q, lambda r: bool(r) and all(math.isfinite(float(x["value"][1])) for x in r), timeout_s=15) \
            if "simulated=\"true\"" not in q else prometheus.query(q)
        if not res:
            empty.append(expr)
    assert not empty, empty


def test_the_refresh_cache_gives_what_a_full_read_gives(ledger):
    from wattspan.dashboard import DataCache

    cache = DataCache()
    t = time.time()
    for dt in (0.0, 40.0, 100.0, 400.0):  # records live, then in complete buckets held by the cache
        a, b = data(ledger, 600, now=t + dt, cache=cache), data(ledger, 600, now=t + dt)
        assert a["totals"] == pytest.approx(b["totals"]) and a["totals"]["requests"] == 30
        assert a["by"] == b["by"] and a["series"] == b["series"]
    assert cache.rows  # the last two reads came from held buckets
    assert data(ledger, 600, now=t + 900, cache=cache)["totals"]["requests"] == 0  # and they leave with the window
