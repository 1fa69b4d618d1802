"""Each bench mode deployed in its own region and hours: ``--deploy MODE=REGION[@HOURS]``.

The seed question: serve on demand in region A around the clock, or batch in region B at its
cleanest hours? ``MODE`` is ``on-demand`` (the open and closed phases), ``batch``, or a phase
mode (``open``, ``closed``). ``HOURS`` (UTC) is ``all`` (default: around the clock),
``cleanest:N`` (the N cleanest hours of the day, chosen month by month from the region's
2023 hourly profile, as a scheduler with that profile would), or ``H1-H2`` (a window,
wrapping past midnight: ``22-06``).

Effective intensity: for DE, FR, GB and US-CAL-CISO (and their ISO codes), the mean of the
2023 (month, hour) profile cells the hours select, each month weighted by its days
(:mod:`wattspan.carbon.intensity`, Electricity Maps, ODbL); for any other region the yearly table
value, the same at every hour (the report says so). PUE: the provider's published value
(``default_pue``), 1.0 on-prem, or ``--pue``. Pure arithmetic, no I/O beyond the shipped
profile.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from .projection import project

__all__ = ["Deployment", "parse_deploy", "effective_intensity", "hours_curve", "deployment_report", "DEPLOY_MODES"]

DEPLOY_MODES = {"on-demand": ("open", "closed"), "batch": ("batch",), "open": ("open",), "closed": ("closed",)}
_DAYS_2023 = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.float64)


@dataclass(frozen=True)
class Deployment:
    mode: str
    region: str
    hours: str
    intensity_g_per_kwh: float
    pue: float
    source: str
    pue_source: str
    hourly: bool  # False: the region has no hourly profile; hours change nothing


def _cells(zone: str) -> np.ndarray | None:
    from ..carbon.intensity import _profiles, profile_zone

    pz = profile_zone(zone)
    if pz is None:
        return None
    return np.asarray(_profiles()[(pz, "direct" if pz == "GB-NESO" else "lifecycle")], dtype=np.float64).reshape(12, 24)


def _hour_mask(hours: str) -> np.ndarray | int:
    """A 24-bool mask for ``all`` / ``H1-H2``; an int N for ``cleanest:N``."""
    h = hours.strip().lower()
    if h in ("", "all", "24h", "around-the-clock"):
        return np.ones(24, dtype=bool)
    m = re.fullmatch(r"cleanest:(\d{1,2})", h)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= 24:
            raise ValueError(f"cleanest:N takes N from 1 to 24, got {n}")
        return n
    m = re.fullmatch(r"(\d{1,2})-(\d{1,2})", h)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if not (0 <= a <= 23 and 0 <= b <= 24) or a == b:
            raise ValueError(f"hours H1-H2 take UTC hours 0-23 (end up to 24, not equal to start), got {hours!r}")
        mask = np.zeros(24, dtype=bool)
        if a < b:
            mask[a:b] = True
        else:
            mask[a:] = True
            mask[:b] = True
        return mask
    raise ValueError(f"hours must be 'all', 'cleanest:N' or 'H1-H2' (UTC), got {hours!r}")


def effective_intensity(region: str, hours: str = "all") -> tuple[float, str, bool]:
    """(gCO2e/kWh, source, hourly?) of running in ``region`` during ``hours``."""
    from ..carbon import grid_intensity

    sel = _hour_mask(hours)
    cells = _cells(region)
    if cells is None:
        gi = grid_intensity(region)
        return gi.gco2e_per_kwh, f"{gi.source}, {gi.year} ({gi.licence}); no hourly profile: the same at every hour", False
    if isinstance(sel, int):
        per_month = np.sort(cells, axis=1)[:, :sel].mean(axis=1)
    else:
        per_month = cells[:, sel].mean(axis=1)
    v = float(per_month @ _DAYS_2023 / _DAYS_2023.sum())
    return v, "Electricity Maps 2023 hourly profile (month x hour-of-day means, lifecycle; ODbL)", True


def hours_curve(region: str) -> list[float]:
    """Effective intensity of the N cleanest hours of the day, N = 1..24 (the last is 'all')."""
    return [effective_intensity(region, f"cleanest:{n}")[0] for n in range(1, 25)]


def parse_deploy(spec: str, *, pue: float | None = None) -> Deployment:
    """``MODE=REGION[@HOURS]`` -> a :class:`Deployment`; ValueError says what is wrong."""
    from ..carbon import default_pue, grid_intensity
    from ..carbon.intensity import profile_zone

    m = re.fullmatch(r"\s*([a-z-]+)\s*=\s*([^@\s]+)\s*(?:@\s*(\S+))?\s*", str(spec))
    if not m:
        raise ValueError(f"--deploy takes MODE=REGION[@HOURS] (e.g. on-demand=FR, batch=DE@cleanest:6), got {spec!r}")
    mode, region, hours = m.group(1), m.group(2), m.group(3) or "all"
    if mode not in DEPLOY_MODES:
        raise ValueError(f"--deploy mode must be one of {', '.join(DEPLOY_MODES)}, got {mode!r}")
    zone = grid_intensity(region).zone  # the region as given, resolved (an unknown one raises with close matches)
    # the label and the facility overhead are the region's own (aws:eu-west-3, with AWS's PUE): the profile
    # zone (FR) only picks the hours
    label = zone if ":" in zone else (profile_zone(region) or zone)
    v, src, hourly = effective_intensity(region, hours)
    cloud = zone.split(":", 1)[0] if ":" in zone else "on-prem"
    dp = default_pue(cloud)
    return Deployment(mode, label, hours, v, dp.value if pue is None else float(pue), src,
                      dp.source if pue is None else "given (--pue)", hourly)


def deployment_report(rep: dict, deployments, *, basis: str, calls: int, g_per_device_s: float) -> dict:
    """Per deployment and matching measured phase: the projection at the deployment's
    intensity and PUE; and, per deployment, the hours curve (cleanest N = 1..24)."""
    rows, curves = [], []
    for d in deployments:
        phases = [p for p in rep["phases"] if p.get("per_request") and p["mode"] in DEPLOY_MODES[d.mode]]
        for p in phases:
            pr = p["per_request"][basis]
            proj = project(energy_j_per_request=pr["energy_j"], device_s_per_request=pr["device_s"], calls=calls,
                           intensity_g_per_kwh=d.intensity_g_per_kwh, pue=d.pue, embodied_g_per_device_s=g_per_device_s)
            band = p["error_band"] or 0.0
            rows.append({"deploy": f"{d.mode}={d.region}@{d.hours}", "phase": p["name"], "label": p["label"],
                         "region": d.region, "hours": d.hours, "intensity_g_per_kwh": d.intensity_g_per_kwh, "pue": d.pue,
                         "total_g": proj.total_g, "per_1k_g": proj.per_1k_g, "embodied_g": proj.embodied_g,
                         "low_g": proj.operational_g * (1 - band) + proj.embodied_g,
                         "high_g": proj.operational_g * (1 + band) + proj.embodied_g})
            curve = hours_curve(d.region) if d.hourly else [d.intensity_g_per_kwh] * 24
            grams = [project(energy_j_per_request=pr["energy_j"], device_s_per_request=pr["device_s"], calls=calls,
                             intensity_g_per_kwh=c, pue=d.pue, embodied_g_per_device_s=g_per_device_s).total_g for c in curve]
            curves.append({"deploy": rows[-1]["deploy"], "phase": p["name"], "label": p["label"],
                           "intensity_by_cleanest_hours": curve, "total_g_by_cleanest_hours": grams})
    best = min(rows, key=lambda r: r["total_g"]) if rows else None
    # a deployment no measured phase matches (its phase failed, or merged files hold none) is named, not dropped
    matched = {r["deploy"] for r in rows}
    unmatched = [k for k in (f"{d.mode}={d.region}@{d.hours}" for d in deployments) if k not in matched]
    return {"basis": basis, "calls": calls, "deployments": [asdict(d) for d in deployments], "rows": rows,
            "curves": curves, "best": best, "unmatched": unmatched}


