"""Conservation: per-request shares scaled so that requests + unattributed = measured, over reconciliation windows."""

from __future__ import annotations

import math

import numpy as np

from ..samples import DeviceTrace
from .energy import _CumEnergy, _typical_interval, power_points
from .inputs import _NS

def _reconcile_edges(cum: _CumEnergy, trace: DeviceTrace, a: int, b: int, reconcile_s: float | None) -> np.ndarray:
    """Window edges for reconciliation, always starting at ``a`` and ending at ``b``.

    ``reconcile_s`` is normally chosen by held-out readings (see ``_batch_fit``);
    the fallbacks below (a counter every 0.5 s or 5 updates, a true instant
    sensor every 8 readings, a part-time or averaged reading every 30 s) only
    serve a caller that passes ``None`` directly.
    """
    if reconcile_s is None:
        if cum.source == "energy-counter":
            reconcile_s = max(0.5, 5 * _typical_interval(cum.t) * _NS)
        else:
            t, _, span = power_points(trace)
            reconcile_s = 30.0 if span else max(8 * _typical_interval(t) * _NS, 1e-3)
    step = int(reconcile_s * 1e9)
    inner = np.arange(a + step, b, step, dtype=np.int64)
    return np.concatenate(([a], inner, [b])).astype(np.int64)


def _conserve(measured: float, dyn: np.ndarray, idle_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Never bill requests more than was measured: when the shares add up to more
    (a configured idle baseline above the readings, a fit that over-reaches), scale
    them down in proportion, so requests + unattributed = measured with
    unattributed >= 0."""
    total = float(dyn.sum() + idle_share.sum())
    cap = measured if math.isfinite(measured) and measured > 0 else 0.0
    if total <= cap:
        return dyn, idle_share
    k = cap / total if total > 0 else 0.0
    return dyn * k, idle_share * k
