"""What :func:`wattspan.attribute` returns: :class:`Attribution`, per device :class:`DeviceSummary`, and the fitted :class:`StepModel`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..devices import members
from .family import BASIS
from .inputs import Requests

__all__ = ["Attribution", "DeviceSummary", "StepModel", "device_parts"]


@dataclass(frozen=True)
class StepModel:
    """Fitted dynamic energy of a batch step: ``coef . basis`` joules.

    ``coef`` is over :data:`wattspan.attribution.family.BASIS` (its first four entries
    follow :data:`FEATURES`: W, J/token, J/token, J/ktoken; then W/token,
    W/token, W/ktoken, W, W, W/token for each of the four knees, J per step); a four-entry ``coef`` is read as :data:`FEATURES`
    alone. ``family`` is the candidate family that won the blocked time
    cross-validation, ``cv_error`` its held-out RMS error relative to the
    readings' RMS, ``cv_r2`` its held-out r2, ``why`` why it won and
    ``candidates`` every family's held-out error. ``r2`` is the in-sample
    coefficient of determination over the sensor readings it used (``rows``).
    ``rates`` are the throughputs (tokens/s) of the saturating terms, then the knees' decode
    weight (prefill tokens per decoding request) and their work (tokens). ``lag_tau_s``: the
    electrical lag (first-order time constant, s) the readings were fitted through, 0 when
    none was chosen: a step's power rises and decays over it, so part of each step's
    energy is drawn in the next step or wait, and the readings are deconvolved through it
    to give that tail back to its step (see :class:`wattspan.attribution.fit._Lagged`).
    ``blend``: where families the held-out readings could not tell apart (within 5 % of the
    best error) were blended into ``coef``, each one's weight (``cv_error`` and ``cv_r2`` are then
    the blend's own, scored on the same folds); ``None`` when ``family`` alone was fitted.
    """

    coef: np.ndarray
    r2: float
    rows: int
    family: str = "energy"
    cv_error: float = math.nan
    cv_r2: float = math.nan
    why: str = ""
    candidates: dict[str, float] | None = None
    rates: tuple[float, ...] | None = None
    lag_tau_s: float = 0.0
    blend: dict[str, float] | None = None

    @property
    def wait_coef(self) -> np.ndarray:
        """The wait terms' coefficients (W, J per wait; zeros when the model has none)."""
        c = np.asarray(self.coef, dtype=np.float64)
        return c[len(BASIS):len(BASIS) + 2] if len(c) >= len(BASIS) + 2 else np.zeros(2)

    @property
    def full_coef(self) -> np.ndarray:
        c = np.asarray(self.coef, dtype=np.float64)
        if len(c) >= len(BASIS):
            return c[: len(BASIS)]
        return np.concatenate((c, np.zeros(len(BASIS) - len(c))))

    def predict(self, features: np.ndarray) -> np.ndarray:
        out: np.ndarray = features[:, : len(self.coef)] @ self.coef[: features.shape[1]]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "features": list(BASIS),
            "coef": self.full_coef.tolist(),
            "wait_coef": dict(zip(("wait_w", "j_per_wait"), self.wait_coef.tolist())),
            "r2": self.r2,
            "cv_error": self.cv_error,
            "cv_r2": self.cv_r2,
            "why": self.why,
            "candidates": dict(self.candidates or {}),
            "rows": self.rows,
            "lag_tau_s": self.lag_tau_s,
            "blend": dict(self.blend) if self.blend else None,
        }


@dataclass(frozen=True)
class DeviceSummary:
    device: str
    sensor: str
    simulated: bool
    method: str
    t0_ns: int
    t1_ns: int
    measured_j: float
    attributed_j: float
    unattributed_j: float
    idle_j: float
    idle_w: float  # mean idle baseline over the period
    idle_source: str  # configured | idle-periods | low-quantile
    steps: int = 0
    model: StepModel | None = None
    windows: int = 0
    scale_p5: float = math.nan  # spread of the per-window reconciliation scale
    scale_p95: float = math.nan
    window_s: float = math.nan  # reconciliation window chosen by held-out readings
    window_why: str = ""
    shift_s: float = 0.0  # how much earlier the trace was read to line it up with the steps: stale readings or its clock
    # offset from the server's (negative: later; chosen like the window)
    band_rel: float = math.nan  # 90 % relative error of one held-out reading's dynamic energy
    quality: str = ""  # good | coarse | misfit (batch-fit only)
    noise: dict[str, Any] | None = None  # the held-out error model behind the bands (see _noise_model)
    #: what the bands are made of: each source's share of a request's band variance, averaged over the
    #: batch-fit requests (wattspan.attribution.fit.BAND_PARTS; the shares sum to 1)
    band_parts: dict[str, float] | None = None
    wait_j: float = 0.0  # fitted dynamic energy while waiting between the device's steps (the other stages' steps', else by time)

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "model"}
        if self.model is not None:
            d["model"] = self.model.as_dict()
        return d


@dataclass(frozen=True)
class Attribution:
    """Per-request results (arrays aligned with the input :class:`Requests`) and per-device totals."""

    requests: Requests
    energy_j: np.ndarray
    dynamic_j: np.ndarray
    idle_j: np.ndarray
    device_s: np.ndarray
    coverage: np.ndarray
    method: np.ndarray  # object array of str
    devices: dict[str, DeviceSummary] = field(default_factory=dict)
    energy_j_low: np.ndarray | None = None  # 90 % band on energy_j (J)
    energy_j_high: np.ndarray | None = None
    quality: np.ndarray | None = None  # object array: good | coarse | misfit
    #: requests on device groups: each (request, member device)'s part, columnar
    #: (``request`` index, ``device``, ``energy_j``, ``dynamic_j``, ``idle_j``, ``device_s``); see wattspan.attribution.groups
    parts: dict[str, np.ndarray] | None = None

    @property
    def measured_j(self) -> float:
        return float(sum(d.measured_j for d in self.devices.values()))

    @property
    def unattributed_j(self) -> float:
        return float(sum(d.unattributed_j for d in self.devices.values()))

    @property
    def attributed_j(self) -> float:
        return float(self.energy_j.sum())

    def records(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """One dict per request: ``id, device, energy_j, dynamic_j, idle_j, device_s, method, sensor, coverage,
        energy_j_low, energy_j_high, quality`` (plus ``route, model, tenant`` where given). ``start``/``stop``:
        only those requests' (in request order), for writing a long run a slice at a time."""
        r = self.requests
        out = []
        n = len(r)
        stop = n if stop is None else min(stop, n)
        start = max(0, min(start, stop))

        per_dev = device_parts(self.parts, n)
        for i in range(start, stop):
            d = self.devices.get(r.device[i]) or self.devices.get(members(r.device[i])[0])
            rec = {
                "id": r.ids[i],
                "device": r.device[i],
                "energy_j": float(self.energy_j[i]),
                "dynamic_j": float(self.dynamic_j[i]),
                "idle_j": float(self.idle_j[i]),
                "device_s": float(self.device_s[i]),
                "method": self.method[i],
                "sensor": d.sensor if d else "none",
                "simulated": bool(d.simulated) if d else False,
                "coverage": float(self.coverage[i]),
            }
            if self.energy_j_low is not None and self.energy_j_high is not None:
                rec["energy_j_low"] = float(self.energy_j_low[i])
                rec["energy_j_high"] = float(self.energy_j_high[i])
            if self.quality is not None:
                rec["quality"] = self.quality[i]
            if per_dev is not None and len(per_dev[i]) > 1:
                rec["devices"] = per_dev[i]  # a device group: each member's joules
            for key in ("route", "model", "tenant"):
                col = getattr(r, key)
                if col is not None:
                    rec[key] = col[i]
            out.append(rec)
        return out


def device_parts(parts: dict[str, np.ndarray] | None, n: int) -> list[dict[str, float]] | None:
    """``parts`` as one ``{device: energy_j}`` per request (for records)."""
    if parts is None:
        return None
    out: list[dict[str, float]] = [{} for _ in range(n)]
    for i, d, e in zip(parts["request"].tolist(), parts["device"].tolist(), parts["energy_j"].tolist()):
        out[i][d] = out[i].get(d, 0.0) + e
    return out
