"""Intensity providers: the offline profile, a recorded file, and the three live APIs against
thin loopback fakes of their documented responses (auth failures, 429, timeouts, bad bodies)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from wattspan.carbon import CarbonModel
from wattspan.carbon.intensity import (
    LBS_PER_MWH_TO_G_PER_KWH, ElectricityMapsProvider, FileProvider, GbCarbonIntensityProvider, ProfileProvider,
    ProviderConfigError, WattTimeProvider, hourly_from_env, provider_from_name,
)

from .intensity_fakes import EM_TOKEN, WT_PASS, WT_TOKEN, WT_USER, Fake

JUL_14_09 = 1689325200.0  # 2023-07-14T09:00Z
JAN_01_12 = 1672574400.0  # 2023-01-01T12:00Z


# ----------------------------------------------------------------------------- offline

def test_profile_has_the_daily_shape_of_each_zone():
    p = ProfileProvider()
    # California's solar dip: midday PST (20:00 UTC) well below the evening peak (03:00 UTC)
    ca_noon = np.mean([p.at("US-CAL-CISO", JUL_14_09 + (20 - 9 + 24 * d) * 3600).g_per_kwh for d in range(1)])
    ca_eve = p.at("US-CAL-CISO", JUL_14_09 + (27 - 9) * 3600).g_per_kwh
    assert ca_noon < 0.8 * ca_eve
    v = p.at("FRA", JUL_14_09 + 1234)
    assert (v.provider, v.zone, v.hour, v.basis, v.fallback) == ("profile", "FR", "2023-07-14T09:00Z", "location", False)
    assert "ODbL" in v.source and "lifecycle" in v.signal
    assert ProfileProvider("direct").at("DE", JUL_14_09).g_per_kwh < p.at("DE", JUL_14_09).g_per_kwh
    # the profile's yearly mean is the data's mean (DE lifecycle 2023: 395.1 g, SOURCES.md)
    de = [p.at("DE", JAN_01_12 + h * 3600).g_per_kwh for h in range(8760)]
    assert np.mean(de) == pytest.approx(395.1, abs=4)  # month-hour means weighted by days, not hours


def test_profile_uses_the_yearly_table_elsewhere_and_refuses_unknown_zones():
    v = ProfileProvider().at("aws:us-east-1", JUL_14_09)
    assert v.provider == "table" and v.signal.startswith("yearly-") and v.g_per_kwh > 0
    with pytest.raises(ProviderConfigError, match="atlantis"):
        ProfileProvider().check_zone("atlantis")
    with pytest.raises(ValueError, match="unknown intensity provider"):
        provider_from_name("electricitymapz", "FR")


def test_file_provider_reads_a_recorded_series_and_flags_gaps(tmp_path):
    f = tmp_path / "gb.csv"
    f.write_text("datetime_utc,zone,carbon_intensity_gco2e_per_kwh,emission_factor_type\n"
                 "2023-01-01T00:00:00Z,GB,72,direct\n2023-01-01T00:30:00Z,GB,80,direct\n")
    p = FileProvider(f, factor="direct")
    assert p.at("GB", 1672531200 + 2000).g_per_kwh == 80 and p.at("GB", 1672531200).period_s == 1800
    gap = p.at("GB", JUL_14_09)
    assert gap.fallback and gap.provider == "profile" and "not in gb.csv" in gap.signal
    f.write_text("datetime_utc,zone,carbon_intensity_gco2e_per_kwh,emission_factor_type\nyesterday,GB,72,direct\n")
    with pytest.raises(ProviderConfigError, match="gb.csv:2"):
        FileProvider(f, factor="direct")


# ----------------------------------------------------------------------------- Electricity Maps

@pytest.fixture
def em(monkeypatch):
    monkeypatch.setenv("ELECTRICITYMAPS_API_TOKEN", EM_TOKEN)
    with Fake("em") as fake:
        yield fake


def test_electricitymaps_latest_history_forecast_and_cache(em):
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=1.0)
    now = time.time()
    v = p.at("DE", now)
    assert (v.g_per_kwh, v.provider, v.zone, v.basis, v.fallback) == (123.0, "electricitymaps", "DE", "location", False)
    assert v.start_s == pytest.approx(now // 3600 * 3600) and "lifecycle" in v.signal
    assert p.at("DE", now).g_per_kwh == 123.0 and em.hits == 1  # cached
    h = p.at("DE", now - 5 * 3600)
    assert h.g_per_kwh == pytest.approx(123.0 + 19) and "/history" in em.paths[-1]
    fc = p.forecast("DE", now + 3600, now + 6 * 3600)
    assert len(fc) in (5, 6) and all("forecast" in x.signal for x in fc) and "/forecast" in em.paths[-1]
    assert em.hits == 3  # one forecast fetch filled the cache for every hour
    old = p.at("DE", now - 3 * 86400)
    assert old.fallback and old.provider == "profile" and "24 h" in old.signal


def test_a_forecast_past_the_providers_horizon_asks_once_not_once_an_hour(em):
    # a 7-day deferral asked the API once per hour past its 24 h forecast (146 calls, 7.8 s before the 202)
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=1.0)
    now = time.time()
    fc = p.forecast("DE", now, now + 7 * 86400)
    assert len(fc) >= 7 * 24
    live = [v for v in fc if not v.fallback]
    assert live and all(v.fallback for v in fc[len(live):])  # the provider's hours, then the offline profile's
    assert em.hits <= 3, em.paths


def test_electricitymaps_auth_failure_falls_back_and_never_logs_the_key(em, caplog, monkeypatch):
    monkeypatch.setenv("ELECTRICITYMAPS_API_TOKEN", "wrong-token-xyz")
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=1.0)
    with caplog.at_level(logging.DEBUG, logger="wattspan.carbon.intensity"):
        v = p.at("DE", time.time())
    assert v.fallback and v.provider == "profile" and v.zone == "DE"
    assert p.failures == {"auth": 1}
    assert "ELECTRICITYMAPS_API_TOKEN" in caplog.text and "wrong-token-xyz" not in caplog.text
    assert "wrong-token-xyz" not in repr(p) and EM_TOKEN not in repr(p)
    # backing off: the next lookup does not hit the server
    hits = em.hits
    assert p.at("DE", time.time()).fallback and em.hits == hits


@pytest.mark.parametrize(("mode", "kind"), [("ratelimit", "rate-limited"), ("malformed", "malformed"), ("slow", "timeout"), ("html", "http")])
def test_electricitymaps_failures_are_counted_by_kind(em, mode, kind):
    em.mode = mode
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=0.3, backoff_s=0.0)
    v = p.at("FR", time.time())
    assert v.fallback and v.zone == "FR" and p.failures == {kind: 1}
    if mode == "ratelimit":  # Retry-After is honoured: no new request before it passes
        hits = em.hits
        p.at("FR", time.time())
        assert em.hits == hits
    em.mode = "ok"


def test_background_mode_never_waits_on_a_slow_api_and_says_what_answered(em):
    """The live meter's mode: a cache miss answers at once (offline, or the last known value), flagged and
    counted, while one fetch runs in a background thread; the API's value is used once it has arrived."""
    em.mode = "hold"  # the fake answers no request until the gate opens
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=20.0, background=True)
    now = time.time()
    first = p.at("DE", now)
    assert not em.gate.is_set()  # so at() returned without the API's answer
    assert first.fallback and first.provider == "profile" and "fetch under way" in first.signal
    assert p.at("DE", now).fallback and p.misses == {"offline": 2} and p.background_fetches == 1  # one fetch in flight
    em.gate.set()
    assert p.settle(20)
    live = p.at("DE", now)
    assert (live.g_per_kwh, live.provider, live.fallback) == (123.0, "electricitymaps", False) and p.failures == {}
    # expired: the last known value answers, flagged with its hour, while the refresh runs
    em.gate.clear()
    em.value = 150.0
    p.ttl_s = 0.0
    stale = p.at("DE", now)
    assert not em.gate.is_set()
    assert (stale.g_per_kwh, stale.provider, stale.fallback) == (123.0, "electricitymaps", True)
    assert "last known value" in stale.signal and live.hour in stale.signal and p.misses["stale"] == 1
    em.gate.set()
    assert p.settle(20)
    p.ttl_s = 900.0
    assert p.at("DE", now).g_per_kwh == 150.0


def test_a_background_fetch_that_lands_at_once_is_served_fresh_not_counted_stale(em):
    # a fast API can answer before the lookup that started the fetch looks again (CI saw it):
    # the value is then fresh, not "the last known value", and no miss is counted against it
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=5.0, ttl_s=900.0, background=True)
    spawn = p._spawn

    def spawn_and_land(*a):
        spawn(*a)
        assert p.settle(10)

    p._spawn = spawn_and_land
    now = time.time()
    v = p.at("DE", now)
    assert (v.g_per_kwh, v.provider, v.fallback) == (123.0, "electricitymaps", False) and p.misses == {}


def test_background_mode_refreshes_ahead_of_expiry(em):
    p = ElectricityMapsProvider(base_url=em.url, timeout_s=5.0, ttl_s=900.0, background=True)
    now = time.time()
    p.at("DE", now)
    assert p.settle(10) and p.at("DE", now).g_per_kwh == 123.0 and em.hits == 1
    with p._lock:  # the cached value is 85 % through its ttl
        p._cache = {k: (t - 0.85 * 900.0, v) for k, (t, v) in p._cache.items()}
    em.value = 130.0
    v = p.at("DE", now)
    assert (v.g_per_kwh, v.fallback) == (123.0, False)  # still valid: served, not waited on
    assert p.settle(10) and em.hits == 2 and p.at("DE", now).g_per_kwh == 130.0 and "stale" not in p.misses


def test_the_live_meters_providers_are_in_background_mode(monkeypatch):
    monkeypatch.setenv("ELECTRICITYMAPS_API_TOKEN", EM_TOKEN)
    m = hourly_from_env(CarbonModel.for_region("DE"), env={"WATTSPAN_INTENSITY_PROVIDER": "electricitymaps"})
    assert isinstance(m.hourly, ElectricityMapsProvider) and m.hourly.background
    assert not ElectricityMapsProvider().background  # a batch job (wattspan attribute) waits for the API


def test_electricitymaps_missing_key_is_a_clear_error_at_start(monkeypatch):
    monkeypatch.delenv("ELECTRICITYMAPS_API_TOKEN", raising=False)
    with pytest.raises(ProviderConfigError, match=r"\$ELECTRICITYMAPS_API_TOKEN"):
        ElectricityMapsProvider()
    with pytest.raises(ProviderConfigError, match="ELECTRICITYMAPS_API_TOKEN"):
        hourly_from_env(CarbonModel.for_region("FR"), env={"WATTSPAN_INTENSITY_PROVIDER": "electricitymaps"})


# ----------------------------------------------------------------------------- WattTime

@pytest.fixture
def wt(monkeypatch):
    monkeypatch.setenv("WATTTIME_USERNAME", WT_USER)
    monkeypatch.setenv("WATTTIME_PASSWORD", WT_PASS)
    with Fake("wt") as fake:
        fake.value = 1000.0  # lbs/MWh
        yield fake


def test_watttime_logs_in_and_converts_lbs_per_mwh(wt):
    p = WattTimeProvider(base_url=wt.url, timeout_s=1.0, fallback_zone="US-CAL-CISO")
    now = time.time()
    v = p.at("CAISO_NORTH", now)
    assert v.basis == "marginal" and v.provider == "watttime" and v.zone == "CAISO_NORTH"
    assert v.g_per_kwh == pytest.approx(1000.0 * LBS_PER_MWH_TO_G_PER_KWH, rel=0.01)  # 453.6 g/kWh
    assert p.logins == 1 and wt.paths[0] == "/login"
    past = p.at("CAISO_NORTH", now - 86400)
    assert past.g_per_kwh == pytest.approx(453.59237) and "/v3/historical" in wt.paths[-1]
    assert WT_PASS not in repr(p) and WT_TOKEN not in repr(p)


def test_watttime_renews_an_expired_token_once(wt):
    p = WattTimeProvider(base_url=wt.url, timeout_s=1.0, ttl_s=0.0)
    p.at("CAISO_NORTH", time.time())
    wt.mode = "auth"  # every bearer call now 401s: one re-login, one retry, then fallback
    v = p.at("CAISO_NORTH", time.time())
    assert v.fallback and p.logins == 2 and p.failures == {"auth": 1}
    assert v.provider == "table" and v.zone == "world"  # no offline marginal: the average, flagged


def test_watttime_bad_password(wt, monkeypatch):
    monkeypatch.setenv("WATTTIME_PASSWORD", "nope")
    p = WattTimeProvider(base_url=wt.url, timeout_s=1.0)
    assert p.at("CAISO_NORTH", time.time()).fallback and p.failures == {"auth": 1} and p.logins == 0


# ----------------------------------------------------------------------------- GB Carbon Intensity

@pytest.fixture
def gb():
    with Fake("gb") as fake:
        fake.value = 150
        yield fake


def test_gb_national_and_regional_by_postcode(gb):
    p = GbCarbonIntensityProvider(base_url=gb.url, timeout_s=1.0)
    now = time.time()
    v = p.at("GB", now)
    assert (v.g_per_kwh, v.signal, v.period_s, v.provider) == (150, "actual", 1800.0, "gb-carbon-intensity")
    r = p.at("RG10 9XX", now)
    assert (r.g_per_kwh, r.signal, r.zone) == (135, "forecast", "RG10 9XX")  # regional: forecast only
    assert gb.paths[-1] == "/regional/postcode/RG10"
    fc = p.forecast("GB", now + 1800, now + 6 * 3600)
    assert len(fc) >= 10 and all(x.signal == "forecast" for x in fc) and "fw48h" in gb.paths[-1]
    rf = p.forecast("RG10", now + 1800, now + 3 * 3600)
    assert all(not x.fallback for x in rf) and "/fw48h/postcode/RG10" in gb.paths[-1]
    with pytest.raises(ProviderConfigError, match="postcode"):
        p.at("not a postcode!", now)


def test_gb_malformed_falls_back_to_gb_direct_profile(gb):
    gb.mode = "malformed"
    p = GbCarbonIntensityProvider(base_url=gb.url, timeout_s=1.0)
    v = p.at("GB", time.time())
    assert v.fallback and v.zone == "GB" and "direct" in v.signal and p.failures == {"malformed": 1}


# ----------------------------------------------------------------------------- per request

def test_per_request_uses_each_hours_intensity_with_one_lookup_per_half_hour():
    class Counting(ProfileProvider):
        calls = 0

        def at(self, zone, t_s):
            Counting.calls += 1
            return super().at(zone, t_s)

    m = CarbonModel.for_region("DE", pue=1.2).with_hourly("profile", market_g_per_kwh=50.0)
    m = type(m)(**{**m.__dict__, "hourly": Counting()})
    wall = np.array([JAN_01_12 + 10, JAN_01_12 + 20, JAN_01_12 + 7200, JAN_01_12 + 7300])
    e = np.full(4, 3.6e6)  # 1 kWh each
    c = m.per_request(e, np.ones(4), wall)
    assert Counting.calls == 2
    p = ProfileProvider()
    want = [p.at("DE", t).g_per_kwh for t in wall]
    assert c.operational_g == pytest.approx(np.array(want) * 1.2)
    f = c.fields()
    assert f[0]["intensity_hour"] == "2023-01-01T12:00Z" and f[2]["intensity_hour"] == "2023-01-01T14:00Z"
    assert f[0]["co2e_market_g"] == pytest.approx(50 * 1.2) and f[0]["intensity_basis"] == "location"
    # without a clock, the yearly value and no hour
    y = m.per_request(e, np.ones(4), None)
    assert y.fields()[0]["intensity_provider"] == "table" and y.fields()[0]["intensity_hour"] == ""
    assert y.operational_g == pytest.approx(np.full(4, m.intensity_g_per_kwh * 1.2))


def test_live_meter_config_from_the_environment(monkeypatch, wt):
    base = CarbonModel.for_region("FR")
    m = hourly_from_env(base, env={"WATTSPAN_MARKET_G_PER_KWH": "25"})
    assert isinstance(m.hourly, ProfileProvider) and m.zone == "FR" and m.market_g_per_kwh == 25.0
    assert hourly_from_env(CarbonModel.for_region("aws:us-east-1"), env={}).hourly is None  # no profile: yearly table
    with pytest.raises(ProviderConfigError, match="WATTSPAN_MARKET_G_PER_KWH"):
        hourly_from_env(base, env={"WATTSPAN_MARKET_G_PER_KWH": "lots"})
    with pytest.raises(ProviderConfigError, match="unknown intensity provider"):
        hourly_from_env(base, env={"WATTSPAN_INTENSITY_PROVIDER": "ember"})
    m = hourly_from_env(base, env={"WATTSPAN_MARGINAL_PROVIDER": "watttime", "WATTSPAN_MARGINAL_ZONE": "CAISO_NORTH",
                                   "WATTTIME_USERNAME": WT_USER, "WATTTIME_PASSWORD": WT_PASS})
    assert isinstance(m.marginal, WattTimeProvider) and m.marginal_zone == "CAISO_NORTH" and m.zone == "FR"
    m = type(m)(**{**m.__dict__, "marginal": WattTimeProvider(base_url=wt.url, timeout_s=1.0)})
    c = m.per_request(np.array([3.6e6]), np.array([0.0]), np.array([time.time()]))
    f = c.fields()[0]
    assert f["marginal_g_per_kwh"] == pytest.approx(453.6, rel=0.01) and f["co2e_marginal_g"] == pytest.approx(453.6, rel=0.01)
    assert f["intensity_provider"] == "profile" and f["intensity_basis"] == "location"


def test_a_live_zone_the_offline_data_lacks_falls_back_to_the_region(em):
    em.mode = "html"
    p, zone = provider_from_name("electricitymaps", "aws:us-east-1", env={"WATTSPAN_INTENSITY_ZONE": "US-MIDA-PJM"})
    assert zone == "US-MIDA-PJM"
    p._base = em.url  # the fake, not the real host
    v = p.at(zone, time.time())
    assert v.fallback and v.zone == "aws:us-east-1" and v.provider == "table"
    m = CarbonModel.for_region("aws:us-east-1").with_hourly("table")
    m = type(m)(**{**m.__dict__, "hourly": p, "zone": zone})
    f = m.per_request(np.array([1.0]), np.array([0.0]), np.array([time.time()])).fields()[0]
    assert f["intensity_provider"] == "electricitymaps:fallback-table" and f["intensity_zone"] == "aws:us-east-1"


def test_a_redirect_is_not_followed_with_the_key(monkeypatch):
    # urllib sends a request's headers on to a redirect's target: the key must not go there
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    seen = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(dict(self.headers))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    target = f"http://127.0.0.1:{other.server_address[1]}/steal"

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("location", target)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    api = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (other, api)]
    for t in threads:
        t.start()
    try:
        monkeypatch.setenv("ELECTRICITYMAPS_API_TOKEN", EM_TOKEN)
        p = ElectricityMapsProvider(base_url=f"http://127.0.0.1:{api.server_address[1]}", timeout_s=2.0)
        v = p.at("DE", time.time())
        assert v.fallback and p.failures == {"http": 1}
        assert seen == []  # the redirect's target never heard from us
    finally:
        for s in (other, api):
            s.shutdown()
            s.server_close()
