"""The offline grid-intensity table: gCO2e per kWh by region (sources in ``data/GRID_SOURCES.md``)."""

from __future__ import annotations

import calendar
import csv
import difflib
import email.message
import functools
import io
import urllib.request
from dataclasses import dataclass
from importlib import resources
from typing import IO

__all__ = ["GridIntensity", "grid_intensity"]

_KINDS_WITH_PREFIX = ("gcp", "aws", "azure")


@dataclass(frozen=True)
class GridIntensity:
    """One zone's grid carbon intensity in gCO2e per kWh, the year it describes, and its
    provenance. ``maps_to`` names the row the value was borrowed from, with caveats."""

    zone: str
    gco2e_per_kwh: float
    year: int
    source: str
    licence: str
    name: str = ""
    maps_to: str = ""


@dataclass(frozen=True)
class _Table:
    rows: dict[str, GridIntensity]  # lower-case zone -> row
    keys: dict[str, str]  # lower-case bare cloud id or country name -> lower-case zone
    ambiguous: dict[str, tuple[str, ...]]  # bare id -> the zones it could mean
    shown: dict[str, str]  # every lower-case lookup key -> how to show it in a hint


def _parse_table(text: str) -> _Table:
    rows: dict[str, GridIntensity] = {}
    keys: dict[str, str] = {}
    shown: dict[str, str] = {}
    bare: dict[str, list[str]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        zone = r["zone"].lower()
        rows[zone] = GridIntensity(r["zone"], float(r["gco2e_per_kwh"]), int(r["year"]),
                                   r["source"], r["licence"], r["name"], r["maps_to"])
        shown[zone] = r["zone"]
        if r["kind"] in _KINDS_WITH_PREFIX:
            bare.setdefault(zone.split(":", 1)[1], []).append(zone)
        elif not r["maps_to"]:  # a country name leads to the alpha-3 row, not the alias
            keys[r["name"].lower()], shown[r["name"].lower()] = zone, r["name"]
    ambiguous = {b: tuple(rows[z].zone for z in zs) for b, zs in bare.items() if len(zs) > 1}
    keys.update({b: zs[0] for b, zs in bare.items() if len(zs) == 1})
    shown.update({b: b for b in bare})
    return _Table(rows, keys, ambiguous, shown)


@functools.cache
def _table() -> _Table:
    t = _parse_table(resources.files("wattspan").joinpath("data/grid_intensity.csv").read_text("utf-8"))
    for zone, row in _profile_years().items():  # zones only the hourly profiles have (US-CAL-CISO, GB-NESO)
        if zone.lower() not in t.rows:
            t.rows[zone.lower()], t.shown[zone.lower()] = row, zone
    t.keys.setdefault("caiso", "us-cal-ciso")
    return t


_PROFILE_SOURCES = {"electricitymaps-2023": ("Electricity Maps, hourly carbon intensity 2023 (yearly mean of the hourly data)", "ODbL-1.0"),
                    "neso-2023": ("NESO Carbon Intensity API, half-hourly actuals 2023 (yearly mean)", "CC-BY-4.0")}
_PROFILE_NAMES = {"US-CAL-CISO": "California ISO (CAISO)", "GB-NESO": "Great Britain (NESO)"}


def _profile_years() -> dict[str, GridIntensity]:
    """A yearly row for each zone of ``data/intensity_profiles.csv``: the mean over every hour
    of 2023 of its (month, hour-of-day) means (each weighted by its month's days), in the table's factor (lifecycle, where
    the profile has it; NESO publishes direct emissions only, which ``maps_to`` says)."""
    text = resources.files("wattspan").joinpath("data/intensity_profiles.csv").read_text("utf-8")
    acc: dict[tuple[str, str, str], list[float]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        a = acc.setdefault((r["zone"], r["factor"], r["source"]), [0.0, 0.0])
        days = calendar.monthrange(2023, int(r["month"]))[1]  # every hour of the year counts once
        a[0] += float(r["gco2e_per_kwh"]) * days
        a[1] += days
    out: dict[str, GridIntensity] = {}
    for (zone, factor, src), (num, den) in sorted(acc.items()):
        if den <= 0 or (zone in out and factor != "lifecycle"):
            continue
        source, licence = _PROFILE_SOURCES.get(src, (src, ""))
        out[zone] = GridIntensity(zone, round(num / den, 2), 2023, source, licence, _PROFILE_NAMES.get(zone, zone),
                                  "" if factor == "lifecycle" else "direct (operational) emissions only")
    return out


def _quoted(region: str, limit: int = 60) -> str:
    """``region`` as an error message shows it: repr, cut to ``limit`` characters."""
    q = repr(region)
    return q if len(q) <= limit else q[: limit - 1] + "…"


def grid_intensity(region: str) -> GridIntensity:
    """Look up the offline table.

    ``region`` may be ``aws:us-east-1``, ``gcp:europe-west1``, ``azure:westeurope``, a bare
    cloud region id when only one provider uses it (``us-central1``, ``eu-west-1``), an ISO
    3166-1 alpha-2 or alpha-3 code (``FR``, ``FRA``), a country name (any case), or
    ``world``. Raises ValueError naming close matches when nothing fits.
    """
    if not isinstance(region, str) or not region.strip():
        raise ValueError(f"region must be a non-empty string such as 'aws:us-east-1' or 'FR', got {_quoted(region)}")
    t, key = _table(), region.strip().lower()
    if key in t.rows:
        return t.rows[key]
    if key in t.ambiguous:
        raise ValueError(f"region {_quoted(region)} is ambiguous; say which one: {', '.join(t.ambiguous[key])}")
    if key in t.keys:
        return t.rows[t.keys[key]]
    close = [t.shown[m] for m in difflib.get_close_matches(key, list(t.shown), n=5, cutoff=0.6)] if len(key) <= 100 else []
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown region {_quoted(region)}{hint}. Use 'aws:<region>', 'gcp:<region>', "
                     "'azure:<region>', an ISO country code ('FR' or 'FRA'), a country name or 'world'")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failed fetch, never followed: urllib would send the request's
    headers (an API key) on to wherever it points."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> urllib.request.Request | None:
        return None
