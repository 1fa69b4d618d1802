"""From joules to grams of CO2e: grid intensity, facility overhead (PUE), embodied carbon.

Units are in the names: energy in joules (``_j``), carbon in grams of CO2e (``_g``),
device time in seconds (``_s``), intensity in gCO2e per kWh. The offline table
(``data/grid_intensity.csv``, see ``data/GRID_SOURCES.md``) holds yearly, location-based
averages per country, per Google Cloud region, and per AWS/Azure region (country
average). ``HttpJsonProvider`` plugs in a live source and falls back on that table.
``CarbonModel.with_hourly`` / ``per_request`` convert each request at the intensity of the hour
it ran, from an hourly provider (:mod:`wattspan.carbon.intensity`), and say which one it used.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike

from ..logs import LogOnce, get_logger

if TYPE_CHECKING:
    from .intensity import HourlyIntensityProvider

from .grid import GridIntensity, _NoRedirect, grid_intensity

__all__ = [
    "GridIntensity", "grid_intensity", "Pue", "default_pue", "Embodied", "EMBODIED_A100_SERVER_SHARE",
    "CarbonModel", "IntensityProvider", "StaticProvider", "HttpJsonProvider", "RequestCarbon",
]

log = get_logger(__name__)

_J_PER_KWH = 3.6e6
_S_PER_YEAR = 365.25 * 86400.0
_MAX_INTENSITY = 2500.0  # gCO2e/kWh; the dirtiest national grid in the table is ~1300
_MAX_PUE = 3.0
_MAX_ENERGY_J = 3.6e15  # 1 TWh: anything larger is a unit mistake
_MAX_DEVICE_S = 3.2e10  # ~1000 device-years: larger is likely nanoseconds passed as seconds
_MAX_CO2E_G = 1e13  # 10 Mt
_MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Pue:
    """A power usage effectiveness (facility energy / IT energy, >= 1) and its source."""

    value: float
    source: str


_DEFAULT_PUE = {
    "aws": Pue(1.15, "AWS global data-centre PUE 1.15 for 2024 (Amazon 2024 Sustainability Report)"),
    "gcp": Pue(1.10, "Google fleet-wide trailing twelve-month PUE 1.10 (Google 2024 Environmental "
                     "Report; ~1.09 reported for 2024)"),
    "azure": Pue(1.18, "Microsoft global datacenter fleet average PUE 1.18 (Microsoft, 2024 reporting; "
                       "newest designs 1.12)"),
}
_NO_PUE = Pue(1.0, "no facility overhead assumed; set pue")


def default_pue(provider: str) -> Pue:
    """The fleet-average PUE a provider publishes (``aws``, ``gcp``, ``azure``); 1.0 for
    ``on-prem`` or anything else, since no facility overhead is known."""
    return _DEFAULT_PUE.get(str(provider).strip().lower(), _NO_PUE)


def _check(name: str, value: float, lo: float, hi: float, unit: str, *, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in {unit}, got {value!r}")
    bad_lo = value <= lo if lo_open else value < lo
    if not math.isfinite(value) or bad_lo or value > hi:
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(f"{name} must be finite, {bound} and <= {hi:g} {unit}, got {value!r}")


@dataclass(frozen=True)
class Embodied:
    """Manufacturing carbon of one device, written off over the seconds it works.

    ``kgco2e_per_device``: embodied carbon of one device, or of its share of a server, in kg
    CO2e. ``lifetime_years``: the service life it is amortised over. ``utilisation``: the
    fraction of that life the device does attributed work, in (0, 1]; idle time is charged
    to the busy seconds, so a lower utilisation raises ``g_per_device_s``.
    """

    kgco2e_per_device: float
    lifetime_years: float = 4.0
    utilisation: float = 1.0

    def __post_init__(self) -> None:
        _check("kgco2e_per_device", self.kgco2e_per_device, 0.0, 1e6, "kg CO2e", lo_open=True)
        # a lifetime under ~4 days or a utilisation under 0.1 % is a typo, not a device: it would make the
        # per-second share absurd (1e-320 years gave infinite grams)
        _check("lifetime_years", self.lifetime_years, 0.01, 50.0, "years")
        _check("utilisation", self.utilisation, 0.001, 1.0, "(fraction)")

    @property
    def g_per_device_s(self) -> float:
        """Grams CO2e per second of device time: kg * 1000 / (lifetime_s * utilisation)."""
        return self.kgco2e_per_device * 1000.0 / (self.lifetime_years * _S_PER_YEAR * self.utilisation)


#: One A100's share (1/8 of an 8-GPU cloud instance, including its share of CPU, DRAM and
#: storage): 318 kgCO2 per GPU, from Chien et al., "Reducing the Carbon Impact of Generative
#: AI Inference (today and in 2035)", HotCarbon '23. A modelled estimate from public
#: hardware specifications, not a manufacturer's product carbon footprint. The 4-year
#: life is wattspan's default, not the paper's. Pass your own figure when you have one.
EMBODIED_A100_SERVER_SHARE = Embodied(kgco2e_per_device=318.0)


def _as_array(name: str, x: object, hi: float, unit: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an array of numbers in {unit}, got {type(x).__name__}") from None
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinity; pass finite values in {unit}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} contains a negative value ({a.min():g} {unit}); it must be >= 0")
    if a.size and a.max() > hi:
        raise ValueError(f"{name} contains {a.max():g} {unit}, above the plausible {hi:g} {unit}; check the unit")
    return a


def _out(a: np.ndarray) -> np.ndarray | float:
    return float(a) if a.ndim == 0 else a


@dataclass(frozen=True)
class CarbonModel:
    """Turns measured energy and device time into grams of CO2e, and grams into money.

    operational = energy_j / 3.6e6 * pue * intensity_g_per_kwh; embodied = device_s *
    ``embodied.g_per_device_s`` (0 when ``embodied`` is None). Methods take a float or a
    numpy array and return the same shape.
    """

    intensity_g_per_kwh: float
    pue: float = 1.0
    embodied: Embodied | None = None
    carbon_price_per_tonne: float = 0.0
    currency: str = "USD"
    region: str = ""
    intensity_source: str = ""
    #: an :class:`wattspan.carbon.intensity.HourlyIntensityProvider`: each request gets the intensity of
    #: the hour it ran (None: ``intensity_g_per_kwh`` at every hour)
    hourly: HourlyIntensityProvider | None = None
    #: the provider's zone (``FR``, a WattTime region, a GB postcode)
    zone: str = ""
    #: market-based factor (a contract's or supplier's gCO2e/kWh), reported beside the
    #: location-based figure; 0 = not given
    market_g_per_kwh: float = 0.0
    #: a provider of marginal intensity (WattTime), reported beside; None = not given
    marginal: HourlyIntensityProvider | None = None
    marginal_zone: str = ""

    def __post_init__(self) -> None:
        _check("market_g_per_kwh", self.market_g_per_kwh, 0.0, _MAX_INTENSITY, "gCO2e/kWh")
        if not isinstance(self.currency, str) or not self.currency.strip():
            raise ValueError(f"currency must be a non-empty code such as 'USD', got {self.currency!r}")
        _check("intensity_g_per_kwh", self.intensity_g_per_kwh, 0.0, _MAX_INTENSITY, "gCO2e/kWh")
        _check("pue", self.pue, 1.0, _MAX_PUE, "(facility energy / IT energy)")
        _check("carbon_price_per_tonne", self.carbon_price_per_tonne, 0.0, 1e5, f"{self.currency}/tCO2e")
        if self.embodied is not None and not isinstance(self.embodied, Embodied):
            raise TypeError(f"embodied must be an Embodied or None, got {type(self.embodied).__name__}")

    @classmethod
    def for_region(cls, region: str, *, pue: float | None = None, embodied: Embodied | None = None,
                   carbon_price_per_tonne: float = 0.0, currency: str = "USD",
                   provider: IntensityProvider | None = None) -> CarbonModel:
        """A model for ``region`` (see ``grid_intensity``). ``pue=None`` takes the region's
        cloud provider default (``default_pue``); regions without a provider prefix get 1.0.
        ``provider`` supplies the intensity (default: the offline table)."""
        gi = (provider or StaticProvider()).current(region)
        cloud = gi.zone.split(":", 1)[0] if ":" in gi.zone else "on-prem"
        note = f"; {gi.maps_to}" if gi.maps_to else ""
        return cls(intensity_g_per_kwh=gi.gco2e_per_kwh,
                   pue=default_pue(cloud).value if pue is None else pue,
                   embodied=embodied, carbon_price_per_tonne=carbon_price_per_tonne, currency=currency,
                   region=gi.zone, intensity_source=f"{gi.source}, {gi.year} ({gi.licence}){note}")

    def with_hourly(self, provider_name: str = "auto", *, market_g_per_kwh: float = 0.0,
                    marginal_provider: str | None = None, env: Mapping[str, str] | None = None) -> CarbonModel:
        """This model with an hourly provider for its region (see
        :func:`wattspan.carbon.intensity.provider_from_name`); raises ValueError on bad config."""
        from .intensity import provider_from_name

        hourly, zone = provider_from_name(provider_name, self.region, env=env)
        marginal, mzone = (None, "")
        if marginal_provider:  # its zone: $WATTSPAN_MARGINAL_ZONE (a WattTime region), else the region
            import os

            e = dict(os.environ if env is None else env)
            e["WATTSPAN_INTENSITY_ZONE"] = e.get("WATTSPAN_MARGINAL_ZONE", "")
            marginal, mzone = provider_from_name(marginal_provider, self.region, env=e)
        return replace(self, hourly=hourly, zone=zone if hourly is not None else self.region,
                       market_g_per_kwh=float(market_g_per_kwh), marginal=marginal, marginal_zone=mzone)

    def per_request(self, energy_j: ArrayLike, device_s: ArrayLike, wall_s: ArrayLike | None = None) -> RequestCarbon:
        """Carbon of a batch of requests, each at the intensity of the hour it ran.

        ``energy_j``, ``device_s``: arrays of one shape; ``wall_s``: each request's (mid) time in
        unix seconds, or None when unknown (then every request gets ``intensity_g_per_kwh``).
        One provider lookup per distinct half-hour of the batch, never one per request. A
        provider that fails here (it should fall back by itself) falls back to the yearly value.
        """
        e = np.atleast_1d(_as_array("energy_j", energy_j, _MAX_ENERGY_J, "J"))
        s = np.atleast_1d(_as_array("device_s", device_s, _MAX_DEVICE_S, "s"))
        n = e.size
        inten = np.full(n, float(self.intensity_g_per_kwh))
        marg = np.zeros(n)
        prov = {"provider": "table", "zone": self.region, "hour": "", "basis": "location"}
        groups: list[tuple[np.ndarray, dict[str, Any]]] = []
        if wall_s is not None and n:
            w = np.atleast_1d(np.asarray(wall_s, dtype=np.float64))
            keys = np.floor(w / 1800.0)
            uniq, inv = np.unique(keys, return_inverse=True)
            for g, key in enumerate(uniq):
                idx = np.flatnonzero(inv == g)
                t = float(key) * 1800.0 + 900.0
                p = dict(prov, hour=datetime.fromtimestamp(math.floor(t / 3600) * 3600, timezone.utc).strftime("%Y-%m-%dT%H:%MZ"))
                if self.hourly is not None:
                    try:
                        v = self.hourly.at(self.zone, t)
                        inten[idx] = v.g_per_kwh
                        who = f"{getattr(self.hourly, 'name', 'provider')}:fallback-{v.provider}" if v.fallback else v.provider
                        p = {"provider": who, "zone": v.zone,
                             "hour": v.hour, "basis": v.basis}
                    except Exception:
                        log.exception("hourly intensity lookup failed; using the yearly %g gCO2e/kWh", self.intensity_g_per_kwh)
                if self.marginal is not None:
                    try:
                        marg[idx] = self.marginal.at(self.marginal_zone, t).g_per_kwh
                    except Exception:
                        log.exception("marginal intensity lookup failed")
                groups.append((idx, p))
        else:
            groups.append((np.arange(n), prov))
        kwh = e / _J_PER_KWH * self.pue
        emb = s * (self.embodied.g_per_device_s if self.embodied else 0.0)
        return RequestCarbon(kwh * inten, emb, inten, kwh * self.market_g_per_kwh, marg, kwh * marg,
                             self.market_g_per_kwh, groups)

    def operational_g(self, energy_j: np.ndarray | float) -> np.ndarray | float:
        """Grams CO2e for ``energy_j`` joules measured at the device, grossed up by PUE."""
        e = _as_array("energy_j", energy_j, _MAX_ENERGY_J, "J")
        return _out(e / _J_PER_KWH * self.pue * self.intensity_g_per_kwh)

    def embodied_g(self, device_s: np.ndarray | float) -> np.ndarray | float:
        """Grams CO2e of manufacturing carbon for ``device_s`` seconds of device time."""
        s = _as_array("device_s", device_s, _MAX_DEVICE_S, "s")
        return _out(s * (self.embodied.g_per_device_s if self.embodied else 0.0))

    def total_g(self, energy_j: np.ndarray | float, device_s: np.ndarray | float) -> np.ndarray | float:
        """Operational plus embodied grams; ``energy_j`` and ``device_s`` must have one shape."""
        if np.shape(energy_j) != np.shape(device_s):
            raise ValueError(f"energy_j and device_s must have the same shape, got "
                             f"{np.shape(energy_j)} and {np.shape(device_s)}")
        return self.operational_g(energy_j) + self.embodied_g(device_s)

    def cost(self, co2e_g: np.ndarray | float) -> np.ndarray | float:
        """The carbon price of ``co2e_g`` grams, in ``currency``."""
        g = _as_array("co2e_g", co2e_g, _MAX_CO2E_G, "g")
        return _out(g / 1e6 * self.carbon_price_per_tonne)


def wall_times(start_ns: ArrayLike, end_ns: ArrayLike) -> np.ndarray | None:
    """Each request's mid-point in unix seconds, when ``start_ns``/``end_ns`` are on the unix
    clock (after 2001); None for other clocks (monotonic, simulated from 0): then no hour is
    known and the yearly value applies."""
    s, e = np.asarray(start_ns, dtype=np.float64), np.asarray(end_ns, dtype=np.float64)
    if not s.size:
        return None
    mid = (s + e) * 0.5e-9
    return mid if float(mid.min()) > 1e9 else None


@dataclass(frozen=True)
class RequestCarbon:
    """What :meth:`CarbonModel.per_request` found, per request (arrays) and per group of
    requests sharing a half-hour (``groups``: (indices, provenance dict))."""

    operational_g: np.ndarray
    embodied_g: np.ndarray
    intensity_g_per_kwh: np.ndarray
    market_g: np.ndarray
    marginal_g_per_kwh: np.ndarray
    marginal_g: np.ndarray
    market_g_per_kwh: float
    groups: list[tuple[np.ndarray, dict[str, Any]]]  # (request indices, their provenance)

    def provenance(self) -> list[dict[str, Any]]:
        """One dict per request: provider, zone, hour, basis."""
        out: list[dict[str, Any]] = [{}] * len(self.intensity_g_per_kwh)
        for idx, p in self.groups:
            for i in idx.tolist():
                out[i] = p
        return out

    def columns(self) -> list[list[Any]]:
        """The RequestRecord intensity fields (``fields()``'s keys, in that order), one list per
        field with a value per request: what the meter builds records from, without a dict each."""
        n = len(self.intensity_g_per_kwh)
        prov = self.provenance()
        return [self.intensity_g_per_kwh.tolist(), [p["provider"] for p in prov], [p["zone"] for p in prov],
                [p["hour"] for p in prov], [p["basis"] for p in prov], [float(self.market_g_per_kwh)] * n,
                np.asarray(self.market_g, dtype=np.float64).tolist(), np.asarray(self.marginal_g_per_kwh, dtype=np.float64).tolist(),
                np.asarray(self.marginal_g, dtype=np.float64).tolist()]

    def fields(self) -> list[dict[str, Any]]:
        """Per request, the RequestRecord fields that say which intensity it used."""
        prov = self.provenance()
        return [{"intensity_g_per_kwh": float(self.intensity_g_per_kwh[k]), "intensity_provider": p["provider"],
                 "intensity_zone": p["zone"], "intensity_hour": p["hour"], "intensity_basis": p["basis"],
                 "market_g_per_kwh": float(self.market_g_per_kwh), "co2e_market_g": float(self.market_g[k]),
                 "marginal_g_per_kwh": float(self.marginal_g_per_kwh[k]), "co2e_marginal_g": float(self.marginal_g[k])}
                for k, p in enumerate(prov)]


@runtime_checkable
class IntensityProvider(Protocol):
    """Anything that says a zone's grid intensity now."""

    def current(self, zone: str) -> GridIntensity: ...


class StaticProvider:
    """The offline table: ``current(zone)`` is ``grid_intensity(zone)``."""

    __slots__ = ()

    def current(self, zone: str) -> GridIntensity:
        return grid_intensity(zone)


# Everything a dead, slow or misbehaving server can provoke (ValueError covers bad JSON).
_FETCH_ERRORS = (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError,
                 ArithmeticError, RecursionError)


class HttpJsonProvider:
    """Live grid intensity from a JSON HTTP API, with the offline table as the fallback.

    ``url_template`` holds ``{zone}`` (URL-quoted on use), e.g.
    ``"https://api.example.org/intensity?zone={zone}"``; ``value_path`` is the dotted path
    to the gCO2e/kWh number in the reply (``"data.0.intensity"``). ``headers`` (an API key)
    are sent but never logged or shown. Results are reused for ``ttl_s`` seconds per zone.

    Any failure (refused, timeout, HTTP error, bad JSON, missing or implausible value)
    counts in ``failures``, logs one warning per outage (host and path only), and returns
    the offline row for the zone (or ``fallback_region``) with source ``"offline-fallback"``,
    cached for ``ttl_s`` too. ``current`` never raises for these; it raises ValueError,
    before any request, only for a zone with no offline row and no ``fallback_region``.
    A cache miss blocks for up to ``timeout_s``: call it off the event loop.
    """

    def __init__(self, url_template: str, *, value_path: str, ttl_s: float = 300.0,
                 timeout_s: float = 2.0, headers: dict[str, str] | None = None,
                 fallback_region: str | None = None) -> None:
        parts = urllib.parse.urlsplit(str(url_template))
        if "{zone}" not in str(url_template) or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url_template must be an http(s) URL containing '{{zone}}', got {url_template!r}")
        if not isinstance(value_path, str) or not value_path.strip("."):
            raise ValueError(f"value_path must be a dotted path such as 'data.0.intensity', got {value_path!r}")
        _check("ttl_s", ttl_s, 0.0, 1e7, "s")
        _check("timeout_s", timeout_s, 0.0, 600.0, "s", lo_open=True)
        self._template, self._path = str(url_template), value_path.strip(".").split(".")
        self._ttl_s, self._timeout_s = float(ttl_s), float(timeout_s)
        self._headers = {"Accept": "application/json", **dict(headers or {})}
        self._fallback = None if fallback_region is None else grid_intensity(fallback_region).zone
        self._where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"  # no userinfo, no query
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._cache: dict[str, tuple[float, GridIntensity]] = {}
        self._lock = threading.Lock()
        self._once = LogOnce(log)  # one warning per outage
        self.failures = 0

    def __repr__(self) -> str:
        return (f"HttpJsonProvider({self._where!r}, value_path={'.'.join(self._path)!r}, "
                f"ttl_s={self._ttl_s:g}, timeout_s={self._timeout_s:g}, headers=<redacted>)")

    def current(self, zone: str) -> GridIntensity:
        offline = grid_intensity(self._fallback or zone)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(zone)
            if hit is not None and now - hit[0] < self._ttl_s:
                return hit[1]
        try:
            value = self._fetch(zone)
        except _FETCH_ERRORS as exc:
            result = replace(offline, source="offline-fallback")
            self._failed(zone, exc)
        else:
            result = GridIntensity(zone, value, datetime.now(timezone.utc).year, f"live: {self._where}",
                                   "see the provider's terms", "" if self._fallback else offline.name)
            self._once.forget()  # the next failure starts a new outage: warn again
        with self._lock:
            self._cache[zone] = (now, result)
        return result

    def _fetch(self, zone: str) -> float:
        url = self._template.replace("{zone}", urllib.parse.quote(zone, safe=""))
        request = urllib.request.Request(url, headers=self._headers)
        with self._opener.open(request, timeout=self._timeout_s) as response:
            body = response.read(_MAX_BODY_BYTES + 1)
        if len(body) > _MAX_BODY_BYTES:
            raise ValueError(f"reply larger than {_MAX_BODY_BYTES} bytes")
        node = json.loads(body)
        for key in self._path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            raise ValueError(f"{'.'.join(self._path)} is {type(node).__name__}, not a number")
        if not (math.isfinite(node) and 0 <= node <= _MAX_INTENSITY):
            raise ValueError(f"implausible intensity {node!r} gCO2e/kWh")
        return float(node)

    def _failed(self, zone: str, exc: BaseException) -> None:
        with self._lock:
            self.failures += 1
        self._once.warning("outage", "live grid intensity for %r from %s failed (%s: %s); using the offline table "
                           "until it recovers", zone, self._where, type(exc).__name__, exc, then=logging.DEBUG)
