"""wattspan.carbon: the offline grid table, PUE defaults, the J -> gCO2e arithmetic,
embodied carbon, and the live HTTP provider against a real server on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from wattspan.carbon import grid
from wattspan.carbon import model as carbon
from wattspan.carbon import (
    EMBODIED_A100_SERVER_SHARE,
    CarbonModel,
    Embodied,
    GridIntensity,
    HttpJsonProvider,
    IntensityProvider,
    StaticProvider,
    default_pue,
    grid_intensity,
)

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "middleware" / "data" / "grid_intensity.csv"
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "grid_intensity_by_country.csv").is_file(),
                                  reason="public source data (../shared/data) not present")


def _committed_rows() -> list[dict[str, str]]:
    with TABLE.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


ROWS = _committed_rows()
BY_ZONE = {r["zone"]: r for r in ROWS}


# --- the table -------------------------------------------------------------------------

def test_every_committed_row_is_what_grid_intensity_returns():
    for r in ROWS:
        gi = grid_intensity(r["zone"])
        assert (gi.zone, gi.year, gi.source, gi.licence, gi.name, gi.maps_to) == (
            r["zone"], int(r["year"]), r["source"], r["licence"], r["name"], r["maps_to"])
        assert gi.gco2e_per_kwh == float(r["gco2e_per_kwh"])


def test_table_shape_and_kinds():
    assert list(ROWS[0]) == ["zone", "kind", "name", "year", "gco2e_per_kwh", "source", "licence", "maps_to"]
    assert {r["kind"] for r in ROWS} == {"country", "aggregate", "gcp", "aws", "azure"}
    assert len({r["zone"].lower() for r in ROWS}) == len(ROWS)
    for r in ROWS:
        value = float(r["gco2e_per_kwh"])
        assert 0 <= value < 2500 and 2015 <= int(r["year"]) <= 2024, r
        assert r["licence"] in ("CC-BY-4.0", "Apache-2.0")


def test_each_country_has_exactly_one_alpha2_alias_with_its_values():
    alpha3 = {r["zone"]: r for r in ROWS if r["kind"] == "country" and not r["maps_to"]}
    aliases = [r for r in ROWS if r["kind"] == "country" and r["maps_to"]]
    targets = [a["maps_to"].split(" ")[0] for a in aliases]
    assert sorted(targets) == sorted(alpha3)
    for a, target in zip(aliases, targets):
        assert len(a["zone"]) == 2 and len(target) == 3 and "alpha-2 alias" in a["maps_to"]
        t = alpha3[target]
        assert (a["name"], a["year"], a["gco2e_per_kwh"]) == (t["name"], t["year"], t["gco2e_per_kwh"])


def _expected_country_values() -> dict[str, tuple[int, str, str]]:
    """code -> (year, value, name), choosing 2024 or the latest earlier year (2025 is partial)."""
    years: dict[str, dict[int, tuple[str, str]]] = defaultdict(dict)
    with (SHARED / "grid_intensity_by_country.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            years[r["iso_code"]][int(r["year"])] = (r["carbon_intensity_gco2e_per_kwh"], r["country"])
    out = {}
    for code, ys in years.items():
        year = 2024 if 2024 in ys else max((y for y in ys if y < 2025), default=max(ys))
        out[code] = (year, *ys[year])
    return out


@needs_shared
def test_countries_and_aggregates_match_the_shared_source_file():
    expected = _expected_country_values()
    by_name = {r["name"]: r for r in ROWS if r["kind"] in ("country", "aggregate") and not r["maps_to"]}
    assert len(by_name) == len(expected)
    for code, (year, value, name) in expected.items():
        row = by_name[name]
        if not code.startswith("OWID_"):
            assert row["zone"] == code
        assert (int(row["year"]), float(row["gco2e_per_kwh"])) == (year, float(value)), code
    assert grid_intensity("world").gco2e_per_kwh == float(expected["OWID_WRL"][1])
    assert grid_intensity("XK").gco2e_per_kwh == float(expected["OWID_KOS"][1])


@needs_shared
def test_gcp_regions_match_the_shared_source_file():
    with (SHARED / "gcp_region_carbon_2024.csv").open(newline="", encoding="utf-8") as f:
        source = list(csv.DictReader(f))
    col = next(c for c in source[0] if "carbon intensity" in c.lower())
    assert len(source) == sum(r["kind"] == "gcp" for r in ROWS)
    for s in source:
        gi = grid_intensity(f"gcp:{s['Google Cloud Region']}")
        assert (gi.gco2e_per_kwh, gi.year, gi.name) == (float(s[col]), 2024, s["Location"])


@needs_shared
def test_rebuilding_the_table_reproduces_the_committed_csv_byte_for_byte(tmp_path):
    out = tmp_path / "grid.csv"
    subprocess.run([sys.executable, str(REPO / "tools" / "build_grid_table.py"), str(SHARED), "--out", str(out)],
                   check=True, capture_output=True, timeout=60)
    assert out.read_bytes() == TABLE.read_bytes()


# --- lookups ------------------------------------------------------------------------------

@pytest.mark.parametrize("query, zone", [
    ("aws:us-east-1", "aws:us-east-1"), ("AWS:US-EAST-1", "aws:us-east-1"), ("eu-west-1", "aws:eu-west-1"),
    ("gcp:europe-west1", "gcp:europe-west1"), ("us-central1", "gcp:us-central1"),
    ("azure:westeurope", "azure:westeurope"), ("westeurope", "azure:westeurope"),
    ("FR", "FR"), ("fra", "FRA"), ("France", "FRA"), ("  united kingdom ", "GBR"), ("WORLD", "world"),
    ("Europe", "europe"), ("XK", "XK"),
])
def test_aliases_resolve(query, zone):
    assert grid_intensity(query).zone == zone


def test_alpha2_alpha3_and_name_agree():
    for a2, a3, name in [("FR", "FRA", "france"), ("US", "USA", "United States"), ("DE", "DEU", "germany")]:
        values = {grid_intensity(q).gco2e_per_kwh for q in (a2, a3, name)}
        assert values == {float(BY_ZONE[a3]["gco2e_per_kwh"])}


@pytest.mark.parametrize("query, hint", [
    ("frnace", "France"), ("aws:us-est-1", "aws:us-east-1"), ("untied kingdom", "United Kingdom"),
])
def test_unknown_region_names_close_matches(query, hint):
    with pytest.raises(ValueError, match="unknown region") as err:
        grid_intensity(query)
    assert hint in str(err.value)


@pytest.mark.parametrize("bad", ["", "   ", None, 42])
def test_empty_or_non_string_region_is_rejected(bad):
    with pytest.raises(ValueError, match="non-empty string"):
        grid_intensity(bad)


def test_a_bare_id_two_providers_share_is_ambiguous(monkeypatch):
    head = "zone,kind,name,year,gco2e_per_kwh,source,licence,maps_to\n"
    table = grid._parse_table(head + "gcp:r-1,gcp,A,2024,10,s,l,\naws:r-1,aws,B,2024,20,s,l,\n")
    monkeypatch.setattr(grid, "_table", lambda: table)
    with pytest.raises(ValueError, match="ambiguous.*gcp:r-1.*aws:r-1"):
        grid_intensity("r-1")
    assert grid_intensity("aws:r-1").gco2e_per_kwh == 20.0


def test_committed_table_has_no_ambiguous_bare_ids():
    assert grid._table().ambiguous == {}


REQUIRED_AWS = """us-east-1 us-east-2 us-west-1 us-west-2 ca-central-1 ca-west-1 sa-east-1 eu-west-1 eu-west-2
eu-west-3 eu-central-1 eu-central-2 eu-north-1 eu-south-1 eu-south-2 af-south-1 me-south-1 me-central-1
il-central-1 ap-east-1 ap-south-1 ap-south-2 ap-southeast-1 ap-southeast-2 ap-southeast-3 ap-southeast-4
ap-southeast-5 ap-northeast-1 ap-northeast-2 ap-northeast-3 mx-central-1""".split()
REQUIRED_AZURE = """eastus eastus2 westus westus2 westus3 centralus northcentralus southcentralus canadacentral
canadaeast brazilsouth northeurope westeurope uksouth ukwest francecentral germanywestcentral swedencentral
switzerlandnorth norwayeast italynorth polandcentral spaincentral uaenorth qatarcentral southafricanorth
centralindia southindia japaneast japanwest koreacentral southeastasia eastasia australiaeast
australiasoutheast""".split()


def test_required_aws_and_azure_regions_are_listed():
    assert {f"aws:{r}" for r in REQUIRED_AWS} <= set(BY_ZONE)
    assert {f"azure:{r}" for r in REQUIRED_AZURE} <= set(BY_ZONE)


@pytest.mark.parametrize("zone, iso3", [
    ("aws:us-east-1", "USA"), ("aws:eu-west-1", "IRL"), ("aws:eu-central-1", "DEU"), ("aws:ap-east-1", "HKG"),
    ("aws:me-south-1", "BHR"), ("azure:westeurope", "NLD"), ("azure:northeurope", "IRL"),
    ("azure:eastasia", "HKG"), ("azure:southeastasia", "SGP"), ("azure:uaenorth", "ARE"),
])
def test_known_cloud_regions_map_to_the_right_country(zone, iso3):
    assert grid_intensity(zone).maps_to.startswith(f"{iso3} (")


def test_aws_and_azure_rows_copy_their_country_row():
    mapped = [r for r in ROWS if r["kind"] in ("aws", "azure")]
    assert mapped
    for r in mapped:
        iso3 = r["maps_to"].split(" ")[0]
        country = BY_ZONE[iso3]
        assert country["kind"] == "country" and not country["maps_to"]
        assert "country average used" in r["maps_to"]
        assert (r["year"], r["gco2e_per_kwh"], r["source"], r["licence"]) == (
            country["year"], country["gco2e_per_kwh"], country["source"], country["licence"])


# --- PUE and the conversion -----------------------------------------------------------------

def test_provider_pue_defaults_and_sources():
    assert default_pue("aws").value == 1.15 and "AWS" in default_pue("aws").source
    assert default_pue("GCP").value == 1.10 and "Google" in default_pue("gcp").source
    assert default_pue("azure").value == 1.18 and "Microsoft" in default_pue("azure").source
    for other in ("on-prem", "hetzner", ""):
        assert default_pue(other).value == 1.0
        assert default_pue(other).source == "no facility overhead assumed; set pue"


@pytest.mark.parametrize("region, provider", [
    ("aws:us-east-1", "aws"), ("us-central1", "gcp"), ("azure:westeurope", "azure"), ("FR", "on-prem"),
])
def test_for_region_uses_the_providers_pue_and_table_value(region, provider):
    m = CarbonModel.for_region(region)
    gi = grid_intensity(region)
    assert m.pue == default_pue(provider).value
    assert (m.intensity_g_per_kwh, m.region) == (gi.gco2e_per_kwh, gi.zone)
    assert gi.source in m.intensity_source and str(gi.year) in m.intensity_source
    assert CarbonModel.for_region(region, pue=1.3).pue == 1.3


def test_operational_arithmetic():
    m = CarbonModel(intensity_g_per_kwh=400.0, pue=1.1)
    assert m.operational_g(3.6e6) == pytest.approx(440.0)
    assert isinstance(m.operational_g(3.6e6), float)
    energy = np.array([[0.0, 1.8e6], [3.6e6, 7.2e6]])
    got = m.operational_g(energy)
    assert got.shape == energy.shape
    np.testing.assert_allclose(got, energy / 3.6e6 * 1.1 * 400.0)
    assert m.operational_g([]).shape == (0,)


def test_embodied_maths():
    e = Embodied(kgco2e_per_device=200.0, lifetime_years=5.0, utilisation=0.5)
    lifetime_s = 5.0 * 365.25 * 86400.0
    assert e.g_per_device_s == pytest.approx(200_000.0 / (lifetime_s * 0.5))
    assert Embodied(200.0, 5.0, 1.0).g_per_device_s == pytest.approx(e.g_per_device_s / 2)
    m = CarbonModel(intensity_g_per_kwh=300.0, pue=1.2, embodied=e)
    device_s = np.array([1.0, 10.0, 3600.0])
    energy_j = np.array([100.0, 1e3, 1e6])
    np.testing.assert_allclose(m.embodied_g(device_s), device_s * e.g_per_device_s)
    np.testing.assert_allclose(m.total_g(energy_j, device_s), m.operational_g(energy_j) + m.embodied_g(device_s))
    # Over a whole life at full use, the embodied grams add up to the device's kg * 1000.
    assert CarbonModel(0.0, embodied=Embodied(200.0, 5.0)).embodied_g(lifetime_s) == pytest.approx(200_000.0)
    assert CarbonModel(300.0).embodied_g(3600.0) == 0.0


def test_documented_a100_default_is_the_cited_figure():
    assert EMBODIED_A100_SERVER_SHARE.kgco2e_per_device == 318.0
    assert "HotCarbon '23" in Path(carbon.__file__).read_text(encoding="utf-8")
    assert EMBODIED_A100_SERVER_SHARE.g_per_device_s == pytest.approx(318e3 / (4 * 365.25 * 86400))


def test_cost():
    m = CarbonModel(intensity_g_per_kwh=100.0, carbon_price_per_tonne=80.0, currency="EUR")
    assert m.cost(1e6) == pytest.approx(80.0)
    np.testing.assert_allclose(m.cost(np.array([0.0, 5e5])), [0.0, 40.0])
    assert CarbonModel(100.0).cost(1e6) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(intensity_g_per_kwh=-1.0), "intensity_g_per_kwh"),
    (dict(intensity_g_per_kwh=float("nan")), "intensity_g_per_kwh"),
    (dict(intensity_g_per_kwh=1e6), "intensity_g_per_kwh"),
    (dict(intensity_g_per_kwh="400"), "intensity_g_per_kwh"),
    (dict(intensity_g_per_kwh=400.0, pue=0.9), "pue"),
    (dict(intensity_g_per_kwh=400.0, pue=float("inf")), "pue"),
    (dict(intensity_g_per_kwh=400.0, carbon_price_per_tonne=-5.0), "carbon_price_per_tonne"),
    (dict(intensity_g_per_kwh=400.0, currency=""), "currency"),
])
def test_bad_model_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CarbonModel(**kwargs)


def test_embodied_must_be_an_embodied():
    with pytest.raises(TypeError, match="embodied"):
        CarbonModel(400.0, embodied=318.0)


@pytest.mark.parametrize("args, match", [
    ((-1.0,), "kgco2e_per_device"), ((0.0,), "kgco2e_per_device"), ((318.0, 0.0), "lifetime_years"),
    ((318.0, 4.0, 0.0), "utilisation"), ((318.0, 4.0, 1.5), "utilisation"), ((float("nan"),), "kgco2e"),
])
def test_bad_embodied(args, match):
    with pytest.raises(ValueError, match=match):
        Embodied(*args)


@pytest.mark.parametrize("energy, match", [
    (float("nan"), "NaN"), (np.array([1.0, np.inf]), "NaN or infinity"), (-1.0, "negative"),
    (np.array([1.0, -2.0]), "negative"), (1e18, "check the unit"), ("lots", "number"),
])
def test_bad_energy(energy, match):
    with pytest.raises(ValueError, match=match):
        CarbonModel(400.0).operational_g(energy)


def test_bad_device_time_and_shapes():
    m = CarbonModel(400.0, embodied=Embodied(100.0))
    with pytest.raises(ValueError, match="device_s.*check the unit"):
        m.embodied_g(3.6e12)  # an hour in nanoseconds
    with pytest.raises(ValueError, match="same shape"):
        m.total_g(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="co2e_g.*negative"):
        m.cost(-1.0)


# --- providers ------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        srv.hits.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = self.path.split("?")[0].split("/")[1]
        if route == "slow":
            time.sleep(1.5)
        if route == "redirect":  # to another path of this server: a follower would send the key there
            self.send_response(302)
            self.send_header("Location", "/ok/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route == "error" or (route == "flaky" and srv.failing):
            self.send_error(500)
            return
        bodies = {"malformed": b"{not json", "missing": b'{"data": []}',
                  "text": b'{"data": [{"intensity": "high"}]}', "absurd": b'{"data": [{"intensity": 1e9}]}',
                  "negative": b'{"data": [{"intensity": -3}]}', "deep": b"[" * 100_000,
                  "bigint": b'{"data": [{"intensity": 1' + b"0" * 400 + b"}]}"}
        body = bodies.get(route, json.dumps({"data": [{"intensity": srv.value}]}).encode())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.hits, srv.value, srv.failing = [], 123.5, False
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _url(srv, route: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/{route}/{{zone}}"


@pytest.fixture
def dead_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/{{zone}}"  # nothing listens there now


def test_providers_satisfy_the_protocol():
    assert isinstance(StaticProvider(), IntensityProvider)
    assert StaticProvider().current("FR") == grid_intensity("FR")
    assert isinstance(HttpJsonProvider("http://127.0.0.1:9/{zone}", value_path="v"), IntensityProvider)


def test_live_value_headers_and_cache(server):
    p = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity", headers={"X-Api-Key": "k-123"})
    gi = p.current("aws:us-east-1")
    assert isinstance(gi, GridIntensity)
    assert (gi.zone, gi.gco2e_per_kwh, p.failures) == ("aws:us-east-1", 123.5, 0)
    assert gi.source.startswith("live: http://127.0.0.1:")
    path, headers = server.hits[0]
    assert path == "/ok/aws%3Aus-east-1" and headers["x-api-key"] == "k-123"
    server.value = 99.0
    assert p.current("aws:us-east-1").gco2e_per_kwh == 123.5  # cached
    assert len(server.hits) == 1
    assert p.current("FR").gco2e_per_kwh == 99.0  # another zone, another request
    assert len(server.hits) == 2


def test_a_redirect_is_a_failure_and_the_key_is_not_sent_on(server):
    p = HttpJsonProvider(_url(server, "redirect"), value_path="data.0.intensity", headers={"X-Api-Key": "k-123"})
    gi = p.current("FR")
    assert gi.source == "offline-fallback" and p.failures == 1
    assert [path for path, _ in server.hits] == ["/redirect/FR"]  # the redirect's target never asked


def test_ttl_expiry_refetches(server):
    p = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity", ttl_s=0.2)
    assert p.current("FR").gco2e_per_kwh == 123.5
    server.value = 50.0
    time.sleep(0.3)
    assert p.current("FR").gco2e_per_kwh == 50.0
    assert len(server.hits) == 2
    p0 = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity", ttl_s=0)
    p0.current("FR"), p0.current("FR")
    assert len(server.hits) == 4


def test_for_region_with_a_live_provider(server):
    p = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity")
    m = CarbonModel.for_region("aws:eu-west-1", provider=p)
    assert (m.intensity_g_per_kwh, m.pue) == (123.5, default_pue("aws").value)
    assert m.intensity_source.startswith("live:")


def _assert_fallback(gi: GridIntensity, zone: str) -> None:
    offline = grid_intensity(zone)
    assert gi.source == "offline-fallback"
    assert (gi.zone, gi.gco2e_per_kwh, gi.year, gi.licence) == (
        offline.zone, offline.gco2e_per_kwh, offline.year, offline.licence)


def test_dead_server_falls_back_without_raising(dead_url):
    p = HttpJsonProvider(dead_url, value_path="v", timeout_s=1.0)
    t0 = time.monotonic()
    _assert_fallback(p.current("azure:westeurope"), "azure:westeurope")
    assert time.monotonic() - t0 < 1.5
    assert p.failures == 1
    p.current("azure:westeurope")  # the fallback is cached for ttl_s: no second attempt
    assert p.failures == 1


@pytest.mark.parametrize("route", ["malformed", "missing", "text", "absurd", "negative", "deep", "bigint", "error"])
def test_bad_replies_fall_back(server, route):
    p = HttpJsonProvider(_url(server, route), value_path="data.0.intensity")
    _assert_fallback(p.current("gcp:us-central1"), "gcp:us-central1")
    assert p.failures == 1 and len(server.hits) == 1


def test_slow_server_times_out_and_falls_back(server):
    p = HttpJsonProvider(_url(server, "slow"), value_path="data.0.intensity", timeout_s=0.2)
    t0 = time.monotonic()
    _assert_fallback(p.current("FR"), "FR")
    assert time.monotonic() - t0 < 1.2 and p.failures == 1


def test_logs_once_per_outage_and_never_the_key(server, caplog):
    caplog.set_level(logging.DEBUG, logger="wattspan.carbon")
    secret = "s3cr3t-api-key"
    url = _url(server, "flaky") + f"?token={secret}"
    p = HttpJsonProvider(url, value_path="data.0.intensity", ttl_s=0, headers={"auth-token": secret})
    server.failing = True
    for _ in range(3):
        assert p.current("DE").source == "offline-fallback"
    server.failing = False
    assert p.current("DE").gco2e_per_kwh == 123.5
    server.failing = True
    p.current("DE")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert p.failures == 4 and len(warnings) == 2
    assert "HTTPError" in warnings[0].getMessage() and "/flaky/{zone}" in warnings[0].getMessage()
    assert secret not in caplog.text and secret not in repr(p)
    assert all(h.get("auth-token") == secret for _, h in server.hits)


def test_unknown_zone_needs_a_fallback_region(server):
    p = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity")
    with pytest.raises(ValueError, match="unknown region"):
        p.current("US-NY-NYIS")  # a zone a live provider knows and the offline table does not
    assert server.hits == []
    q = HttpJsonProvider(_url(server, "ok"), value_path="data.0.intensity", fallback_region="USA")
    assert q.current("US-NY-NYIS").gco2e_per_kwh == 123.5


def test_unknown_zone_with_fallback_region_on_a_dead_server(dead_url):
    p = HttpJsonProvider(dead_url, value_path="v", fallback_region="world")
    _assert_fallback(p.current("US-CAL-CISO"), "world")


@pytest.mark.parametrize("url, kwargs, match", [
    ("http://127.0.0.1/intensity", {}, "url_template"),
    ("file:///etc/{zone}", {}, "url_template"),
    ("http://127.0.0.1/{zone}", dict(value_path=""), "value_path"),
    ("http://127.0.0.1/{zone}", dict(ttl_s=-1), "ttl_s"),
    ("http://127.0.0.1/{zone}", dict(timeout_s=0), "timeout_s"),
    ("http://127.0.0.1/{zone}", dict(fallback_region="atlantis"), "unknown region"),
])
def test_bad_provider_configuration(url, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HttpJsonProvider(url, **{"value_path": "v", **kwargs})

