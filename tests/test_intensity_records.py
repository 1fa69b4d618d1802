"""Each record says which intensity it used; the ledger keeps it, and older ledger files still open."""

from __future__ import annotations

import sqlite3

import pytest

from wattspan import RequestRecord
from wattspan.export.ledger.schema import _ADDED, _FIELDS
from wattspan.export.ledger import Ledger, query
from wattspan.export.otel import record_attributes
from wattspan.meter import RecordCallback

OLD = [(n, t) for n, t in _FIELDS if n not in _ADDED]  # the schema-1 columns as first shipped


def _rec(i: int, **kw) -> RequestRecord:
    base = dict(id=f"r{i}", device="gpu0", start_ns=1, end_ns=2, energy_j=3.6e6, dynamic_j=3e6, idle_j=6e5,
                device_s=1.0, co2e_g=40.0, route="/v1/chat", tenant="team-a")
    return RequestRecord(**{**base, **kw})


def test_an_older_ledger_file_opens_reads_and_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE requests (" + ", ".join(f"{n} {t} NOT NULL" for n, t in OLD) + ", recorded_at REAL NOT NULL, run_id TEXT NOT NULL)")
    vals = {"TEXT": "'x'", "INTEGER": "0", "REAL": "1.5"}
    conn.execute(f"INSERT INTO requests VALUES ({', '.join(vals[t] if n not in ('trace_id', 'span_id') else repr('0') for n, t in OLD)}, 100.0, 'old-run')")
    conn.execute("PRAGMA application_id=1463899219")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    old = query(path)  # read-only, before any upgrade: new columns read as defaults
    assert len(old) == 1 and old[0]["intensity_provider"] == "" and old[0]["intensity_g_per_kwh"] == 0
    from wattspan.export.ledger.schema import find

    one = find(path, "x")  # `wattspan report --id` on the same file, read-only too
    assert one is not None and one["run_id"] == "old-run" and one["intensity_provider"] == ""
    rec = _rec(1, intensity_g_per_kwh=40.0, intensity_provider="profile", intensity_zone="FR",
               intensity_hour="2023-07-14T09:00Z", intensity_basis="location", market_g_per_kwh=20.0, co2e_market_g=20.0)
    with Ledger(path) as led:
        led.write([rec])
    rows = query(path)
    assert [r["id"] for r in rows] == ["x", "r1"]
    assert (rows[1]["intensity_zone"], rows[1]["intensity_hour"], rows[1]["co2e_market_g"]) == ("FR", "2023-07-14T09:00Z", 20.0)
    assert RequestRecord(**{k: rows[1][k] for k in RequestRecord.__dataclass_fields__}) == rec


def test_span_attributes_name_the_intensity_and_the_market_figure():
    a = record_attributes(_rec(1, intensity_g_per_kwh=40.0, intensity_provider="electricitymaps", intensity_zone="DE",
                               intensity_hour="2026-12-01T21:00Z", intensity_basis="location", market_g_per_kwh=20.0, co2e_market_g=20.0))
    assert a["wattspan.intensity.provider"] == "electricitymaps" and a["wattspan.intensity.hour"] == "2026-12-01T21:00Z"
    assert a["wattspan.intensity.basis"] == "location" and a["wattspan.co2e.market_g"] == pytest.approx(20.0)
    assert "wattspan.co2e.marginal_g" not in a
    assert "wattspan.intensity.provider" not in record_attributes(_rec(2))


def test_the_live_meter_converts_each_request_at_the_hour_it_ran():
    import time as _time
    from datetime import datetime, timezone

    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from wattspan import EnergyMiddleware, Meter
    from wattspan.carbon import CarbonModel
    from wattspan.carbon.intensity import ProfileProvider
    from wattspan.sources.replay import ReplaySource

    from .conftest import constant_trace, serve

    async def work(request):
        return PlainTextResponse("ok")

    got = []
    carbon = CarbonModel.for_region("GB").with_hourly("profile", market_g_per_kwh=10.0)
    meter = Meter(sources=[ReplaySource([constant_trace(200.0)], loop=True)], idle_w=40.0, carbon=carbon,
                  sinks=[RecordCallback(got.append)], period_s=0.05, lag_s=0.05)
    try:
        with serve(EnergyMiddleware(Starlette(routes=[Route("/w", work)]), meter=meter)) as url:
            assert httpx.get(url + "/w").status_code == 200
            assert meter.flush(10)
    finally:
        meter.close()
    (r,) = got
    now = _time.time()
    assert (r.intensity_provider, r.intensity_zone, r.intensity_basis) == ("profile", "GB", "location")
    assert r.intensity_hour == datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:00Z") or now % 3600 < 5
    assert r.intensity_g_per_kwh == ProfileProvider().at("GB", now).g_per_kwh or now % 3600 < 5
    assert r.co2e_g == pytest.approx((r.energy_j + r.host_j) / 3.6e6 * carbon.pue * r.intensity_g_per_kwh)
    assert r.co2e_market_g == pytest.approx((r.energy_j + r.host_j) / 3.6e6 * carbon.pue * 10.0)
