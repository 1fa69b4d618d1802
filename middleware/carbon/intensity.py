"""Grid carbon intensity at a given hour: one small protocol, an offline profile, three live APIs.

Every value is an :class:`IntensityValue` that carries its provenance: the provider, the zone,
the start of the period it describes (UTC), the basis (``location``: an average of the grid's
mix; ``marginal``: the emissions of the plant that answers extra load), the signal and whether
it is a fallback. Units: gCO2e per kWh (WattTime's lbs/MWh are converted on arrival).

Providers (all implement :class:`HourlyIntensityProvider`):

* :class:`ProfileProvider`: offline. For DE, FR, GB and US-CAL-CISO, the mean of each (month,
  hour of day UTC) cell of Electricity Maps' 2023 hourly series (``data/intensity_profiles.csv``,
  ODbL; see ``data/INTENSITY_SOURCES.md``); for any other zone, the yearly row of the offline
  table (:func:`wattspan.carbon.grid_intensity`), the same at every hour.
* :class:`FileProvider`: a recorded hourly series in a CSV
  (``datetime_utc,zone,carbon_intensity_gco2e_per_kwh,emission_factor_type``): history, offline.
* :class:`ElectricityMapsProvider`: Electricity Maps API v3 (``auth-token`` header):
  ``/v3/carbon-intensity/latest``, ``/history`` (last 24 h), ``/forecast``.
* :class:`WattTimeProvider`: WattTime API v3: ``/login`` with HTTP basic auth for a bearer
  token, then ``/v3/forecast`` and ``/v3/historical``, signal ``co2_moer`` (marginal).
* :class:`GbCarbonIntensityProvider`: the GB Carbon Intensity API (NESO; no key): national
  ``/intensity`` or regional by outward postcode.

A live provider caches each period it has seen, gives up on a request after ``timeout_s``,
backs off after a failure (longer after HTTP 429, honouring ``Retry-After``), and answers from
its offline ``fallback`` (a :class:`ProfileProvider`) meanwhile, with ``fallback=True`` and the
reason in ``signal``. Keys come only from the environment and are never logged or shown.
By default a cache miss blocks for up to ``timeout_s`` (right for a batch job such as
``wattspan attribute``). With ``background=True`` (what :func:`hourly_from_env`, the live
meter's default, sets) a lookup never waits on the network: a miss starts one fetch in a
background thread and is answered at once by the last value known for the zone (within an
hour) or else the offline fallback, flagged ``fallback=True`` with the reason in ``signal``
and counted in ``misses``; a cached value is refreshed in the background before it expires.
"""

from __future__ import annotations

import base64
import csv
import functools
import http.client
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..logs import LogOnce, get_logger

__all__ = [
    "IntensityValue", "HourlyIntensityProvider", "ProfileProvider", "FileProvider",
    "ElectricityMapsProvider", "WattTimeProvider", "GbCarbonIntensityProvider",
    "ProviderConfigError", "profile_zone", "provider_from_name", "LBS_PER_MWH_TO_G_PER_KWH",
]

log = get_logger(__name__)

#: 1 lb = 453.59237 g; per MWh -> per kWh divides by 1000.
LBS_PER_MWH_TO_G_PER_KWH = 0.45359237
_MAX_INTENSITY = 2500.0  # gCO2e/kWh
_MAX_BODY_BYTES = 4 << 20
_HOUR_S = 3600.0
_REFRESH_AHEAD = 0.8  # background mode: refetch a cached value once it is this far into its ttl
_MAX_BACKGROUND = 4  # background mode: fetches in flight at once, per provider
PROVIDERS = ("auto", "table", "profile", "electricitymaps", "watttime", "gb-carbon-intensity")


class ProviderConfigError(ValueError):
    """A provider cannot start: an unknown zone, a missing key, a bad option."""


@dataclass(frozen=True, slots=True)
class IntensityValue:
    """One grid intensity, in gCO2e/kWh, for the period starting at ``start_s`` (unix s, UTC).

    ``provider``: who said it (``electricitymaps``, ``watttime``, ``gb-carbon-intensity``,
    ``profile``, ``table``, ``file``). ``basis``: ``location`` or ``marginal``. ``signal``:
    what the number is (``lifecycle``, ``direct``, ``co2_moer``, ``actual``, ``forecast``,
    ``month-hour-mean-2023``, ``yearly``; a fallback says why). ``period_s``: the period's length.
    """

    g_per_kwh: float
    provider: str
    zone: str
    start_s: float
    basis: str = "location"
    signal: str = ""
    period_s: float = _HOUR_S
    fallback: bool = False
    source: str = ""

    @property
    def hour(self) -> str:
        """The period's start as ``YYYY-MM-DDTHH:MMZ``."""
        return datetime.fromtimestamp(self.start_s, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


@runtime_checkable
class HourlyIntensityProvider(Protocol):
    """Says a zone's intensity at a time, and forecasts it."""

    name: str

    def at(self, zone: str, t_s: float) -> IntensityValue: ...

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]: ...


def _hour_floor(t_s: float) -> float:
    return math.floor(t_s / _HOUR_S) * _HOUR_S


def _check_value(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} is {type(v).__name__}, not a number")
    if not (math.isfinite(v) and 0 <= v <= _MAX_INTENSITY):
        raise ValueError(f"implausible intensity {v!r} gCO2e/kWh in {what}")
    return float(v)


def _parse_time(s: object) -> float:
    if not isinstance(s, str) or not s:
        raise ValueError(f"bad timestamp {s!r}")
    text = s.strip().replace("Z", "+00:00")
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- offline

_PROFILE_ALIASES = {"de": "DE", "deu": "DE", "fr": "FR", "fra": "FR", "gb": "GB", "gbr": "GB", "uk": "GB",
                    "us-cal-ciso": "US-CAL-CISO", "caiso": "US-CAL-CISO", "gb-neso": "GB-NESO"}
_EM_CREDIT = "Electricity Maps (electricitymaps.com), hourly carbon intensity data 2023, ODbL"
_NESO_CREDIT = "Carbon Intensity API, National Energy System Operator (NESO), carbonintensity.org.uk, CC BY 4.0"


@functools.cache
def _profiles() -> dict[tuple[str, str], list[float]]:
    """(zone, factor) -> 12 x 24 values, index (month - 1) * 24 + hour."""
    text = resources.files("wattspan").joinpath("data/intensity_profiles.csv").read_text("utf-8")
    out: dict[tuple[str, str], list[float]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        cells = out.setdefault((r["zone"], r["factor"]), [math.nan] * 288)
        cells[(int(r["month"]) - 1) * 24 + int(r["hour_utc"])] = float(r["gco2e_per_kwh"])
    return out


def profile_zone(region: str) -> str | None:
    """The profile zone a region name means, or None: ``FR``, ``FRA``, ``france`` and a cloud region
    the yearly table prices at France's country average (``aws:eu-west-3``) all mean ``FR``. A cloud
    region with its own published figure (Google's) keeps it: no profile."""
    key = str(region).strip().lower()
    if key in _PROFILE_ALIASES:
        return _PROFILE_ALIASES[key]
    from .grid import grid_intensity

    try:
        gi = grid_intensity(str(region))
    except (ValueError, TypeError):
        return None
    if gi.zone.lower() in _PROFILE_ALIASES:
        return _PROFILE_ALIASES[gi.zone.lower()]
    country = gi.maps_to.split(" ", 1)[0].lower() if gi.maps_to and "country average" in gi.maps_to else ""
    return _PROFILE_ALIASES.get(country)


class ProfileProvider:
    """Offline: the 2023 (month, hour-of-day) mean for DE, FR, GB, US-CAL-CISO (and ``GB-NESO``);
    the yearly table row for any other zone. ``factor``: ``lifecycle`` (default, as Electricity
    Maps' API and the yearly table) or ``direct`` (operational only)."""

    name = "profile"

    def __init__(self, factor: str = "lifecycle") -> None:
        if factor not in ("lifecycle", "direct"):
            raise ProviderConfigError(f"factor must be 'lifecycle' or 'direct', got {factor!r}")
        self.factor = factor

    def __repr__(self) -> str:
        return f"ProfileProvider(factor={self.factor!r})"

    def check_zone(self, zone: str) -> str:
        """The zone as it will be reported; ProviderConfigError when nothing knows it."""
        pz = profile_zone(zone)
        if pz is not None:
            return pz
        from .grid import grid_intensity

        try:
            return grid_intensity(zone).zone
        except ValueError as exc:
            raise ProviderConfigError(str(exc)) from None

    def at(self, zone: str, t_s: float) -> IntensityValue:
        pz = profile_zone(zone)
        start = _hour_floor(t_s)
        if pz is not None:
            factor = "direct" if pz == "GB-NESO" else self.factor
            cells = _profiles()[(pz, factor)]
            dt = datetime.fromtimestamp(start, timezone.utc)
            credit = _NESO_CREDIT if pz == "GB-NESO" else _EM_CREDIT
            return IntensityValue(cells[(dt.month - 1) * 24 + dt.hour], "profile", pz, start, "location",
                                  f"month-hour-mean-2023 ({factor})", _HOUR_S, False, credit)
        from .grid import grid_intensity

        try:
            gi = grid_intensity(zone)
        except ValueError as exc:
            raise ProviderConfigError(str(exc)) from None
        return IntensityValue(gi.gco2e_per_kwh, "table", gi.zone, start, "location", f"yearly-{gi.year}",
                              _HOUR_S, False, f"{gi.source} ({gi.licence})")

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]:
        t = _hour_floor(start_s)
        out: list[IntensityValue] = []
        while t < end_s and len(out) < 24 * 400:
            out.append(self.at(zone, t))
            t += _HOUR_S
        return out


class FileProvider:
    """A recorded series (hourly or half-hourly) from a CSV in wattspan's shared format:
    ``datetime_utc,zone,carbon_intensity_gco2e_per_kwh[,emission_factor_type]``. Hours outside
    the file are answered by ``fallback`` (default :class:`ProfileProvider`), flagged."""

    name = "file"

    def __init__(self, path: str | os.PathLike[str], *, factor: str = "lifecycle", fallback: ProfileProvider | None = None) -> None:
        self.path = Path(path)
        self.fallback = fallback or ProfileProvider(factor if factor in ("lifecycle", "direct") else "lifecycle")
        series: dict[str, dict[float, float]] = {}
        periods: dict[str, float] = {}
        try:
            with self.path.open(newline="", encoding="utf-8") as fh:
                for n, r in enumerate(csv.DictReader(fh), start=2):
                    kind = r.get("emission_factor_type") or factor
                    if kind != factor:
                        continue
                    try:
                        t = _parse_time(r["datetime_utc"])
                        v = _check_value(float(r["carbon_intensity_gco2e_per_kwh"]), f"{self.path.name}:{n}")
                    except (KeyError, ValueError, TypeError) as exc:
                        raise ProviderConfigError(f"{self.path}:{n}: {exc}") from None
                    series.setdefault(r["zone"].upper(), {})[t] = v
        except OSError as exc:
            raise ProviderConfigError(f"cannot read intensity file {self.path}: {exc}") from None
        if not series:
            raise ProviderConfigError(f"{self.path}: no rows of factor {factor!r}")
        for z, s in series.items():
            ts = sorted(s)
            periods[z] = min((b - a for a, b in zip(ts, ts[1:])), default=_HOUR_S) or _HOUR_S
        self._series, self._periods, self.factor = series, periods, factor

    def zones(self) -> list[str]:
        return sorted(self._series)

    def at(self, zone: str, t_s: float) -> IntensityValue:
        z = zone.upper()
        s = self._series.get(z)
        if s is not None:
            p = self._periods[z]
            start = math.floor(t_s / p) * p
            v = s.get(start)
            if v is not None:
                return IntensityValue(v, "file", z, start, "location", self.factor, p, False, self.path.name)
        fb = self.fallback.at(zone, t_s)
        return replace(fb, fallback=True, signal=f"{fb.signal}; not in {self.path.name}")

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]:
        z = zone.upper()
        p = self._periods.get(z, _HOUR_S)
        t = math.floor(start_s / p) * p
        out: list[IntensityValue] = []
        while t < end_s and len(out) < 100_000:
            out.append(self.at(zone, t))
            t += p
        return out


# ----------------------------------------------------------------------------- live

class _HttpError(Exception):
    def __init__(self, status: int, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after_s = status, retry_after_s


_FETCH_ERRORS = (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError,
                 ArithmeticError, RecursionError, _HttpError)


class _Live:
    """Caching, timeout, backoff and fallback shared by the live providers."""

    name = "live"
    basis = "location"
    key_hint = ""  # where the credentials come from, shown when they are refused

    def __init__(self, base_url: str, *, timeout_s: float, ttl_s: float, backoff_s: float,
                 fallback: ProfileProvider | None, background: bool = False) -> None:
        parts = urllib.parse.urlsplit(str(base_url))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ProviderConfigError(f"base_url must be an http(s) URL, got {base_url!r}")
        for n, v in (("timeout_s", timeout_s), ("ttl_s", ttl_s), ("backoff_s", backoff_s)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ProviderConfigError(f"{n} must be a number of seconds >= 0, got {v!r}")
        if timeout_s <= 0:
            raise ProviderConfigError("timeout_s must be > 0")
        self._base = str(base_url).rstrip("/")
        self._where = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
        self.timeout_s, self.ttl_s, self.backoff_s = float(timeout_s), float(ttl_s), float(backoff_s)
        self.fallback = fallback or ProfileProvider()
        # redirects are not followed: urllib would send the key headers on to wherever one points
        from . import grid as _carbon  # its no-redirect handler (one copy)

        self._opener = urllib.request.build_opener(_carbon._NoRedirect)
        self._cache: dict[tuple[str, float], tuple[float, IntensityValue]] = {}
        #: per zone, when a fetch answered and the end (unix s) of the last period it covered: a time past it
        #: is not fetched again within ttl_s (a 7-day deferral had asked once per hour past a 24 h forecast)
        self._horizon: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._once = LogOnce(log)  # one warning per outage
        #: failures by kind: ``auth``, ``rate-limited``, ``timeout``, ``http``, ``malformed``, ``network``
        self.failures: dict[str, int] = {}
        self.requests = 0
        #: background mode (see the module doc): never wait on the network in :meth:`at`
        self.background = bool(background)
        #: background mode: lookups answered while their fetch ran, by what answered them:
        #: ``stale`` (the last value known for the zone), ``offline`` (the offline fallback)
        self.misses: dict[str, int] = {}
        self.background_fetches = 0
        self._pending: set[tuple[str, float]] = set()
        self._idle = threading.Condition(self._lock)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, timeout_s={self.timeout_s:g}, key=<from env, redacted>)"

    # -- HTTP
    def _get(self, path: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> Any:
        """The reply's JSON (any shape: each provider's parser checks it)."""
        url = self._base + path + (("?" + urllib.parse.urlencode(params)) if params else "")
        req = urllib.request.Request(url, headers={"Accept": "application/json", **(headers or {})})
        self.requests += 1
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                body = resp.read(_MAX_BODY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            retry = exc.headers.get("Retry-After") if exc.headers else None
            try:
                retry_s = float(retry) if retry is not None else None
            except ValueError:
                retry_s = None
            exc.close()
            raise _HttpError(exc.code, retry_s) from None
        if len(body) > _MAX_BODY_BYTES:
            raise ValueError(f"reply larger than {_MAX_BODY_BYTES} bytes")
        return json.loads(body)

    # -- cache
    def _cached(self, zone: str, start: float) -> IntensityValue | None:
        with self._lock:
            hit = self._cache.get((zone, start))
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def _store(self, values: list[IntensityValue]) -> None:
        now = time.monotonic()
        with self._lock:
            for v in values:
                self._cache[(v.zone, v.start_s)] = (now, v)
            if len(self._cache) > 20_000:  # bounded: drop the oldest entries
                for k in sorted(self._cache, key=lambda k: self._cache[k][0])[: len(self._cache) - 10_000]:
                    del self._cache[k]
        self._once.forget()  # the next failure starts a new outage: warn again

    def _failed(self, zone: str, exc: BaseException) -> None:
        if isinstance(exc, _HttpError):
            kind = "auth" if exc.status in (401, 403) else "rate-limited" if exc.status == 429 else "http"
        elif isinstance(exc, (TimeoutError,)) or "timed out" in str(exc):
            kind = "timeout"
        elif isinstance(exc, (OSError, http.client.HTTPException)):
            kind = "network"
        else:
            kind = "malformed"
        wait = self.backoff_s
        if isinstance(exc, _HttpError) and exc.status == 429:
            wait = max(wait, min(exc.retry_after_s or 60.0, 3600.0))
        with self._lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            self._down_until = time.monotonic() + wait
        hint = f" (check {self.key_hint})" if kind == "auth" and self.key_hint else ""
        self._once.warning("outage", "%s intensity for %r from %s failed: %s%s%s; using the offline profile for %.0f s",
                           self.name, zone, self._where, kind, f" ({type(exc).__name__}: {exc})" if kind != "auth" else "",
                           hint, wait, then=logging.DEBUG)

    def _fallback(self, zone: str, t_s: float, why: str) -> IntensityValue:
        v = self.fallback.at(self._fallback_zone(zone), t_s)
        return replace(v, fallback=True, signal=f"{v.signal}; fallback: {why}")

    #: the offline zone for a live zone the offline data does not know (set by provider_from_name
    #: to the region, which was checked at start)
    fallback_zone: str | None = None

    def _fallback_zone(self, zone: str) -> str:
        if profile_zone(zone) is not None or self.fallback_zone is None:
            return zone
        return self.fallback_zone

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def at(self, zone: str, t_s: float) -> IntensityValue:
        raise NotImplementedError  # each provider's own

    def _lookup(self, zone: str, t_s: float, fetch: Callable[[], list[IntensityValue]]) -> IntensityValue:
        start = self._period_start(t_s)
        if self.background:
            return self._lookup_nowait(zone, t_s, start, fetch)
        hit = self._cached(zone, start)
        if hit is not None:
            return hit
        if self._down():
            return self._fallback(zone, t_s, f"{self.name} unavailable")
        h = self._horizon.get(zone)
        if h is not None and t_s >= h[1] and time.monotonic() - h[0] < self.ttl_s:
            return self._fallback(zone, t_s, f"{self.name} has no value for {_iso(t_s)} (past its forecast)")
        try:
            values = fetch()
        except _FETCH_ERRORS as exc:
            self._failed(zone, exc)
            return self._fallback(zone, t_s, f"{self.name} failed")
        self._store(values)
        best = self._pick(values, t_s)
        if best is None:
            ends = [v.start_s + v.period_s for v in values]
            if not ends or t_s >= max(ends):  # past what it has: later times are past it too, until ttl_s
                with self._lock:
                    if len(self._horizon) > 1000:
                        self._horizon.clear()
                    self._horizon[zone] = (time.monotonic(), max(ends) if ends else t_s)
            return self._fallback(zone, t_s, f"{self.name} has no value for {_iso(t_s)}")
        return best

    # -- background mode
    def _lookup_nowait(self, zone: str, t_s: float, start: float,
                       fetch: Callable[[], list[IntensityValue]]) -> IntensityValue:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get((zone, start))
        if hit is not None and now - hit[0] < self.ttl_s:
            if now - hit[0] >= self.ttl_s * _REFRESH_AHEAD and not self._down():
                self._spawn(zone, start, fetch)  # ahead of expiry: the next lookups still hit
            return hit[1]
        if self._down():
            return self._fallback(zone, t_s, f"{self.name} unavailable")
        last = self._last_known(zone, t_s)  # before the fetch starts: it may land before we look again
        self._spawn(zone, start, fetch)
        with self._lock:
            hit = self._cache.get((zone, start))
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]  # the fetch already answered (a fast API): a fresh value, not a miss
        if last is not None:
            with self._lock:
                self.misses["stale"] = self.misses.get("stale", 0) + 1
            return replace(last, fallback=True, signal=f"{last.signal}; last known value ({last.hour}), "
                                                       f"{self.name} fetch under way".lstrip("; "))
        with self._lock:
            self.misses["offline"] = self.misses.get("offline", 0) + 1
        return self._fallback(zone, t_s, f"{self.name} fetch under way")

    def _last_known(self, zone: str, t_s: float) -> IntensityValue | None:
        """The cached value for ``zone`` (even expired) whose period is nearest before ``t_s``, within an hour."""
        best: IntensityValue | None = None
        with self._lock:
            for (z, st), (_, v) in self._cache.items():
                if z == zone and t_s - _HOUR_S <= st <= t_s and (best is None or st > best.start_s):
                    best = v
        return best

    def _spawn(self, zone: str, start: float, fetch: Callable[[], list[IntensityValue]]) -> None:
        """Fetch in a daemon thread, once per (zone, period) at a time and at most a few at once."""
        key = (zone, start)
        with self._lock:
            if key in self._pending or len(self._pending) >= _MAX_BACKGROUND:
                return
            self._pending.add(key)
            self.background_fetches += 1

        def run() -> None:
            try:
                values = fetch()
            except _FETCH_ERRORS as exc:
                self._failed(zone, exc)
            except Exception as exc:  # never let a provider's bug kill the thread silently
                log.debug("%s background intensity fetch failed", self.name, exc_info=True)
                self._failed(zone, exc)
            else:
                self._store(values)
            finally:
                with self._lock:
                    self._pending.discard(key)
                    self._idle.notify_all()

        try:
            threading.Thread(target=run, name=f"wattspan-intensity-{self.name}", daemon=True).start()
        except RuntimeError:  # no thread to be had (interpreter shutting down): the next lookup tries again
            with self._lock:
                self._pending.discard(key)

    def settle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no background fetch is in flight (tests, shutdown); True if none is."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _period_start(self, t_s: float) -> float:
        return _hour_floor(t_s)

    @staticmethod
    def _pick(values: list[IntensityValue], t_s: float) -> IntensityValue | None:
        inside = [v for v in values if v.start_s <= t_s < v.start_s + v.period_s]
        return inside[-1] if inside else None


class ElectricityMapsProvider(_Live):
    """Electricity Maps API v3. The token is read from ``$ELECTRICITYMAPS_API_TOKEN`` (or the
    variable named by ``token_env``) and sent as the ``auth-token`` header. ``at(zone, t)``
    uses ``/latest`` for the current hour, ``/history`` for the last 24 h, ``/forecast`` for
    later hours; older hours come from the offline profile (flagged)."""

    name = "electricitymaps"

    def __init__(self, *, token_env: str = "ELECTRICITYMAPS_API_TOKEN", base_url: str = "https://api.electricitymap.org",
                 emission_factor: str = "lifecycle", timeout_s: float = 3.0, ttl_s: float = 900.0,
                 backoff_s: float = 60.0, fallback: ProfileProvider | None = None, background: bool = False) -> None:
        super().__init__(base_url, timeout_s=timeout_s, ttl_s=ttl_s, backoff_s=backoff_s, background=background,
                         fallback=fallback or ProfileProvider(emission_factor if emission_factor in ("lifecycle", "direct") else "lifecycle"))
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise ProviderConfigError(f"Electricity Maps needs an API token in ${token_env}")
        if emission_factor not in ("lifecycle", "direct"):
            raise ProviderConfigError(f"emission_factor must be 'lifecycle' or 'direct', got {emission_factor!r}")
        self.__headers = {"auth-token": token}
        self.factor, self.key_hint = emission_factor, f"${token_env}"

    def _parse(self, zone: str, entries: object, signal: str) -> list[IntensityValue]:
        if not isinstance(entries, list):
            raise ValueError("expected a list of entries")
        out: list[IntensityValue] = []
        for e in entries:
            if not isinstance(e, dict) or e.get("carbonIntensity") is None:
                continue
            v = _check_value(e["carbonIntensity"], "carbonIntensity")
            out.append(IntensityValue(v, self.name, str(e.get("zone", zone)), _hour_floor(_parse_time(e["datetime"])),
                                      "location", f"{e.get('emissionFactorType', self.factor)} {signal}".strip(),
                                      _HOUR_S, False, "Electricity Maps API v3"))
        return out

    def _params(self, zone: str) -> dict[str, str]:
        return {"zone": zone, "emissionFactorType": self.factor}

    def latest(self, zone: str) -> list[IntensityValue]:
        body = self._get("/v3/carbon-intensity/latest", self._params(zone), self.__headers)
        return self._parse(zone, [body], "")

    def history(self, zone: str) -> list[IntensityValue]:
        body = self._get("/v3/carbon-intensity/history", self._params(zone), self.__headers)
        return self._parse(zone, body["history"], "")

    def _forecast(self, zone: str) -> list[IntensityValue]:
        body = self._get("/v3/carbon-intensity/forecast", self._params(zone), self.__headers)
        return self._parse(zone, body["forecast"], "forecast")

    def at(self, zone: str, t_s: float) -> IntensityValue:
        now = time.time()
        if t_s >= _hour_floor(now) + _HOUR_S:
            return self._lookup(zone, t_s, lambda: self._forecast(zone))
        if t_s >= _hour_floor(now):
            return self._lookup(zone, t_s, lambda: self.latest(zone))
        if t_s >= now - 24 * _HOUR_S:
            return self._lookup(zone, t_s, lambda: self.history(zone))
        return self._fallback(zone, t_s, "older than the API's 24 h history")

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]:
        return _series(self, zone, start_s, end_s, _HOUR_S)


class WattTimeProvider(_Live):
    """WattTime API v3, marginal (``co2_moer``). Username and password come from
    ``$WATTTIME_USERNAME`` / ``$WATTTIME_PASSWORD``; ``/login`` (HTTP basic auth) returns a
    bearer token, renewed on a 401 or after ``token_ttl_s`` (WattTime's last 30 min). Values in
    lbs CO2/MWh are converted to gCO2/kWh (x 0.45359237). Zones are WattTime regions
    (``CAISO_NORTH``). The offline fallback is an average (``location``) figure for
    ``fallback_zone``: there is no offline marginal table."""

    name = "watttime"
    basis = "marginal"

    def __init__(self, *, user_env: str = "WATTTIME_USERNAME", password_env: str = "WATTTIME_PASSWORD",
                 base_url: str = "https://api.watttime.org", timeout_s: float = 3.0, ttl_s: float = 900.0,
                 backoff_s: float = 60.0, token_ttl_s: float = 1500.0, fallback_zone: str = "world",
                 fallback: ProfileProvider | None = None, background: bool = False) -> None:
        super().__init__(base_url, timeout_s=timeout_s, ttl_s=ttl_s, backoff_s=backoff_s, fallback=fallback,
                         background=background)
        user, pw = os.environ.get(user_env, ""), os.environ.get(password_env, "")
        if not user or not pw:
            raise ProviderConfigError(f"WattTime needs ${user_env} and ${password_env}")
        self.__basic = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        self.__token: str | None = None
        self.__token_at = 0.0
        self.token_ttl_s = float(token_ttl_s)
        self.fallback_zone = self.fallback.check_zone(fallback_zone)
        self.key_hint = f"${user_env} / ${password_env}"
        self.logins = 0

    def _fallback_zone(self, zone: str) -> str:
        fz = self.fallback_zone  # set from the region at start
        return zone if fz is None else fz

    def _login(self) -> str:
        body = self._get("/login", None, {"Authorization": self.__basic})
        token = body["token"] if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ValueError("login reply has no token")
        self.logins += 1
        self.__token, self.__token_at = token, time.monotonic()
        return token

    def _authed(self, path: str, params: dict[str, str]) -> Any:
        if self.__token is None or time.monotonic() - self.__token_at > self.token_ttl_s:
            self._login()
        try:
            return self._get(path, params, {"Authorization": f"Bearer {self.__token}"})
        except _HttpError as exc:
            if exc.status != 401:
                raise
            self._login()  # expired: one new token, one retry
            return self._get(path, params, {"Authorization": f"Bearer {self.__token}"})

    def _parse(self, zone: str, body: Any, signal: str) -> list[IntensityValue]:
        data, meta = body["data"], body.get("meta", {})
        units = str(meta.get("units", "lbs_co2_per_mwh"))
        factor = LBS_PER_MWH_TO_G_PER_KWH if units.startswith("lbs") else 1.0 if units in ("g_co2_per_kwh", "kg_co2_per_mwh") else None
        if factor is None:
            raise ValueError(f"unknown units {units!r}")
        period = float(meta.get("data_point_period_seconds", 300) or 300)
        out: list[IntensityValue] = []
        for p in data:
            v = _check_value(float(p["value"]) * factor, "value")
            out.append(IntensityValue(v, self.name, str(meta.get("region", zone)), _parse_time(p["point_time"]),
                                      "marginal", f"co2_moer {signal}".strip(), period, False, "WattTime API v3"))
        return out

    def _period_start(self, t_s: float) -> float:
        return math.floor(t_s / 300.0) * 300.0

    def at(self, zone: str, t_s: float) -> IntensityValue:
        now = time.time()
        if t_s >= now - 300:
            return self._lookup(zone, t_s, lambda: self._parse(zone, self._authed(
                "/v3/forecast", {"region": zone, "signal_type": "co2_moer"}), "forecast"))
        start = math.floor(t_s / _HOUR_S) * _HOUR_S
        return self._lookup(zone, t_s, lambda: self._parse(zone, self._authed(
            "/v3/historical", {"region": zone, "signal_type": "co2_moer", "start": _iso(start),
                               "end": _iso(start + _HOUR_S)}), ""))

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]:
        return _series(self, zone, start_s, end_s, _HOUR_S)


class GbCarbonIntensityProvider(_Live):
    """The GB Carbon Intensity API (NESO; no key). Zone ``GB`` is national; any other zone is an
    outward postcode (``RG10``) for the regional series. Half-hourly periods; ``actual`` where
    the API has one, else ``forecast``. gCO2/kWh, operational CO2 only (NESO's method)."""

    name = "gb-carbon-intensity"

    def __init__(self, *, base_url: str = "https://api.carbonintensity.org.uk", timeout_s: float = 3.0,
                 ttl_s: float = 900.0, backoff_s: float = 60.0, fallback: ProfileProvider | None = None,
                 background: bool = False) -> None:
        super().__init__(base_url, timeout_s=timeout_s, ttl_s=ttl_s, backoff_s=backoff_s, background=background,
                         fallback=fallback or ProfileProvider("direct"))

    def _fallback_zone(self, zone: str) -> str:
        return "GB"

    def _period_start(self, t_s: float) -> float:
        return math.floor(t_s / 1800.0) * 1800.0

    @staticmethod
    def _postcode(zone: str) -> str | None:
        z = zone.strip().upper()
        if z in ("GB", "GB-NESO", "UK"):
            return None
        out = z.split()[0] if z.split() else ""
        if not re.fullmatch(r"[A-Z]{1,2}[0-9][A-Z0-9]?", out):
            raise ProviderConfigError(f"GB Carbon Intensity zone must be 'GB' or an outward postcode such as 'RG10', got {zone!r}")
        return out

    def _parse(self, zone: str, periods: object) -> list[IntensityValue]:
        if not isinstance(periods, list):
            raise ValueError("expected a list of periods")
        out: list[IntensityValue] = []
        for p in periods:
            i = p["intensity"]
            actual = i.get("actual")
            v, sig = (actual, "actual") if actual is not None else (i["forecast"], "forecast")
            out.append(IntensityValue(_check_value(v, "intensity"), self.name, zone.upper(), _parse_time(p["from"]),
                                      "location", sig, 1800.0, False, _NESO_CREDIT))
        return out

    def _fetch(self, zone: str, t_s: float, ahead: bool) -> list[IntensityValue]:
        pc = self._postcode(zone)
        start = self._period_start(t_s)
        frm = datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        if pc is None:
            if ahead:
                return self._parse(zone, self._get(f"/intensity/{frm}/fw48h")["data"])
            to = datetime.fromtimestamp(start + 1800, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
            return self._parse(zone, self._get(f"/intensity/{frm}/{to}")["data"])
        if ahead:
            body = self._get(f"/regional/intensity/{frm}/fw48h/postcode/{pc}")["data"]
            return self._parse(zone, body["data"])  # this one's "data" is an object
        body = self._get(f"/regional/postcode/{pc}")["data"]
        return self._parse(zone, body[0]["data"])

    def at(self, zone: str, t_s: float) -> IntensityValue:
        self._postcode(zone)
        now = time.time()
        pc = self._postcode(zone)
        if pc is not None and t_s < self._period_start(now):
            return self._fallback(zone, t_s, "past regional periods are not fetched")
        return self._lookup(zone.upper(), t_s, lambda: self._fetch(zone, t_s, t_s >= self._period_start(now) + 1800))

    def forecast(self, zone: str, start_s: float, end_s: float) -> list[IntensityValue]:
        return _series(self, zone, start_s, end_s, 1800.0)


def _series(p: _Live, zone: str, start_s: float, end_s: float, step: float) -> list[IntensityValue]:
    """``at`` for each period in [start, end): one fetch fills the cache for the rest."""
    out: list[IntensityValue] = []
    t = math.floor(start_s / step) * step
    while t < end_s and len(out) < 10_000:
        out.append(p.at(zone, max(t, start_s)))
        t += step
    return out


def provider_from_name(name: str, region: str, *, env: Mapping[str, str] | None = None) -> tuple[HourlyIntensityProvider | None, str]:
    """``(provider, zone)`` for a ``--intensity-provider`` name; ``(None, region)`` for ``table``.

    ``auto``: the offline profile when ``region`` has one (DE, FR, GB, US-CAL-CISO), else the
    yearly table. ``WATTSPAN_INTENSITY_ZONE`` names the provider's own zone when it differs from
    the region (a WattTime region, a GB postcode, an Electricity Maps zone id). Raises
    ProviderConfigError for unknown names, zones or missing keys.
    """
    env = os.environ if env is None else env
    name = (name or "auto").strip().lower()
    zone = (env.get("WATTSPAN_INTENSITY_ZONE") or "").strip() or region
    if name not in PROVIDERS:
        raise ProviderConfigError(f"unknown intensity provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if name == "table":
        return None, region
    if name == "auto":
        pz = profile_zone(region)
        return (ProfileProvider(), pz) if pz else (None, region)
    if name == "profile":
        p = ProfileProvider()
        return p, p.check_zone(zone)
    if name == "electricitymaps":
        em = ElectricityMapsProvider()
        em.fallback_zone = ProfileProvider().check_zone(region)
        return em, zone
    if name == "watttime":
        return WattTimeProvider(fallback_zone=region), zone
    gb = GbCarbonIntensityProvider()
    gb._postcode(zone if zone.lower() not in ("gbr", "united kingdom") else "GB")
    return gb, zone


def hourly_from_env(model: Any, env: Mapping[str, str] | None = None) -> Any:  # a CarbonModel (model imports this module)
    """``model`` with the hourly intensity the environment asks for (the live meter's default):

    * ``WATTSPAN_INTENSITY_PROVIDER``: ``auto`` (default), ``table``, ``profile``,
      ``electricitymaps``, ``watttime``, ``gb-carbon-intensity``;
    * ``WATTSPAN_INTENSITY_ZONE``: the provider's zone when it is not the region;
    * ``WATTSPAN_MARKET_G_PER_KWH``: a market-based factor reported beside (gCO2e/kWh);
    * ``WATTSPAN_MARGINAL_PROVIDER``: e.g. ``watttime``, reported beside;
      ``WATTSPAN_MARGINAL_ZONE``: its zone (a WattTime region such as ``CAISO_NORTH``).

    Live providers are put in background mode: the meter's pass never waits on an API.

    Raises ProviderConfigError (a ValueError) naming the variable on bad values.
    """
    env = os.environ if env is None else env
    raw = env.get("WATTSPAN_MARKET_G_PER_KWH", "").strip()
    try:
        market = float(raw) if raw else 0.0
        if not (math.isfinite(market) and 0 <= market <= _MAX_INTENSITY):
            raise ValueError
    except ValueError:
        raise ProviderConfigError(f"WATTSPAN_MARKET_G_PER_KWH must be gCO2e/kWh in [0, {_MAX_INTENSITY:g}], got {raw!r}") from None
    out = model.with_hourly(env.get("WATTSPAN_INTENSITY_PROVIDER", "auto"), market_g_per_kwh=market,
                            marginal_provider=env.get("WATTSPAN_MARGINAL_PROVIDER") or None, env=env)
    for p in (out.hourly, out.marginal):  # the live meter converts on its own thread: never wait on the network
        if isinstance(p, _Live):
            p.background = True
    return out
