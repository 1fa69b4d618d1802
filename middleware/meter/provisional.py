"""A request's provisional energy, known the moment its response ends.

The meter's figure for a request is final only once the power sensor has
covered the request's whole lifetime (a fraction of a second to a few seconds
after it ends): too late for the response itself. :class:`Provisional` gives a
figure at the response's end from what is already known:

* ``step-model``: the batch steps the request ran (reported by the engine hook
  through :meth:`wattspan.Meter.record_step`) priced with the step-energy model
  the meter last fitted on this device (:class:`wattspan.StepModel`, dynamic
  joules from step duration, prefill tokens, decode tokens and decode context;
  the meter fits the first one as soon as the sensor covers 20 batch steps, see
  :mod:`wattspan.meter.core`).
  Each step's predicted energy is split among its requests by their tokens, as
  ``batch-fit`` does; the idle baseline is shared equally by the requests of
  each step. Steps still on their way when the response ends (the last few
  decode steps) are accounted for by scaling the request's decode share to the
  ``completion_tokens`` the server reported. A request whose steps began before
  the device had a model is priced by its steps only if that model has no
  saturating terms (those need the model's throughputs for each step);
  otherwise, as with no model:
* ``recent-rate``: no steps, or no fitted model yet: the device's recent final
  records' joules per token (prompt + output, exponentially weighted) times
  this request's tokens.
* ``none``: neither is known yet (the first requests after a start).

The final figure, reconciled with the sensor, is the request's
:class:`~wattspan.RequestRecord`; the provisional one differs from it by what
the model and the rate miss (a few per cent on a steady load, more on a cold or
changing one). Nothing here is slow: a dict lookup and a dot product per request,
a few microseconds per step on the thread that reports steps. Memory is bounded
(``max_requests`` tallies; the oldest are dropped first).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..records import RequestRecord
    from ..attribution import StepModel
    from .core import Meter
    from .sinks import DeviceFigures

__all__ = ["Provisional", "attach", "usage_energy"]

_EWMA = 0.1  # weight of the newest record in the recent J/token rate
#: a record whose joules per token lie further than this factor from the recent rate does not move it (a usage
#: count a server got wrong by orders of magnitude); batch size moves a real rate by tens of times at most
_RATE_SPAN = 1000.0
_RATE_RESTART = 5  # outliers in a row after which the rate starts again from the newest record
_NB = 14  # terms of the step basis (wattspan.attribution.family.BASIS)
_KNEES = 4  # its knee terms (9-12): they need the model's decode weight and knees, as
_SAT = (7, 8, 9, 10, 11, 12)  # the saturating terms need its throughputs, when the step is seen
_UNPRICED = 6 + 2 * _NB  # tally slot: steps seen before the device had a model


def _saturates(model: StepModel) -> bool:
    coef = model.full_coef
    return any(len(coef) > j and coef[j] != 0 for j in _SAT)


class Provisional:
    """Provisional per-request energy from batch steps and the meter's step model.

    Attach it to a meter with :func:`attach`; ask it with :meth:`estimate` when a
    response ends.
    """

    __slots__ = ("meter", "max_requests", "_tally", "_rate", "_outlier_run", "_lock", "stats")

    def __init__(self, meter: Meter, *, max_requests: int = 100_000) -> None:
        self.meter = meter
        self.max_requests = int(max_requests)
        # request id -> [context tokens so far, steps, prefill tokens, decode tokens,
        #                prefill-phase share of the step basis (14: wattspan.attribution.family.BASIS),
        #                decode-phase share (14), idle s pre, idle s dec,
        #                steps seen before the device had a model (their saturating terms are 0)]
        self._tally: dict[str, list[float]] = {}
        self._rate: dict[str, float] = {}  # device -> recent J per token
        self._lock = threading.Lock()
        self._outlier_run: dict[str, int] = {}  # per device: records in a row outside the rate's span
        self.stats = {"steps": 0, "estimates": 0, "step-model": 0, "recent-rate": 0, "none": 0, "evicted": 0, "rate_outliers": 0}

    def open(self, request_id: str) -> None:
        """Start tallying the steps of a request (call it when the request arrives)."""
        tally = self._tally
        with self._lock:
            tally[request_id] = [0.0, 0, 0.0, 0.0] + [0.0] * (2 * _NB + 3)
            while len(tally) > self.max_requests:
                del tally[next(iter(tally))]
                self.stats["evicted"] += 1

    def forget(self, request_id: str) -> None:
        """Drop the request's step tally (it ended without an estimate: an error, a disconnect)."""
        with self._lock:
            self._tally.pop(request_id, None)

    # -- the thread that reports steps ---------------------------------------------------
    def observe_step(self, start_ns: int, end_ns: int, device: str, tokens: Mapping[str, float]) -> None:
        """A batch step (as :meth:`wattspan.Meter.record_step` gets it)."""
        try:
            items = [(k, float(v)) for k, v in tokens.items() if v and v > 0]
        except (AttributeError, TypeError, ValueError):
            return
        if not items or end_ns <= start_ns:
            return
        tally = self._tally
        dur = (end_ns - start_ns) * 1e-9
        total = 0.0
        pre = dec = ctxk = 0.0
        rows: list[tuple[str, float, list[float]]] = []
        for rid, n in items:
            total += n
            t = tally.get(rid)  # None: not a request being served here (or already answered)
            if t is not None:
                rows.append((rid, n, t))
            if n <= 1.0:
                dec += n
                ctxk += ((t[0] if t is not None else 0.0) + n) / 1000.0
            else:
                pre += n
        if not rows:
            return
        idle_each = dur / len(items)
        # the step's basis (as wattspan.attribution.family.basis makes it); the saturating terms take the
        # throughputs of the device's fitted model (a group's: its first member's), the knees its decode
        # weight and knees' work, 0 before there is one
        model = getattr(self.meter, "_models", {}).get(device.split(",", 1)[0])
        rates = getattr(model, "rates", None)
        knees = (0.0,) * _KNEES
        if rates:
            r = (pre + dec) / dur
            sat = (-math.expm1(-r / rates[0]) * dur, -math.expm1(-r / rates[1]) * dur)
            if len(rates) >= 3 + _KNEES:
                work = pre + rates[2] * dec
                knees = tuple(min(work, k) * dur for k in rates[3:3 + _KNEES])
        else:
            sat = (0.0, 0.0)
        feats = (dur, pre, dec, ctxk, pre * dur, dec * dur, ctxk * dur, *sat, *knees, 1.0)  # 1.0: the step itself
        unpriced = 0 if rates else 1
        with self._lock:
            for rid, n, t in rows:
                t[_UNPRICED] += unpriced
                w = n / total
                base = 4 if n > 1.0 else 4 + _NB  # which phase's share vector
                for j, f in enumerate(feats):
                    t[base + j] += f * w
                t[4 + 2 * _NB if n > 1.0 else 5 + 2 * _NB] += idle_each
                t[0] += n
                t[1] += 1
                if n > 1.0:
                    t[2] += n
                else:
                    t[3] += n
            self.stats["steps"] += 1

    # -- the meter's thread: final records keep the recent rate current ------------------
    def on_device(self, figures: DeviceFigures) -> None:
        """RecordSink: per-device figures are not used."""

    def on_records(self, records: Sequence[RequestRecord]) -> None:
        """RecordSink: the final records update each device's recent joules per token."""
        self.observe_records(records)

    def observe_records(self, records: Iterable[RequestRecord]) -> None:
        rate = self._rate
        for r in records:
            tok = r.prompt_tokens + r.output_tokens
            if tok > 0 and r.energy_j > 0 and math.isfinite(r.energy_j):
                x = r.energy_j / tok
                old = rate.get(r.device)
                if old is not None and not old / _RATE_SPAN <= x <= old * _RATE_SPAN:
                    self.stats["rate_outliers"] += 1
                    run = self._outlier_run[r.device] = self._outlier_run.get(r.device, 0) + 1
                    if run < _RATE_RESTART:
                        continue
                    old = None  # as many in a row: the rate itself was the outlier (its first record); start again
                self._outlier_run[r.device] = 0
                rate[r.device] = x if old is None else old + _EWMA * (x - old)

    # -- the event loop, when a response ends --------------------------------------------
    def estimate(self, request_id: str, device: str, prompt_tokens: int | None, output_tokens: int | None) -> dict[str, Any]:
        """``{"energy_j", "co2e_g", "method", "steps"}`` for the request (energy None if unknown).

        Forgets the request's step tally: call it once, when the response ends.
        """
        self.stats["estimates"] += 1
        with self._lock:
            t = self._tally.pop(request_id, None)
        meter = self.meter
        energy = None
        device_s = 0.0
        method = "none"
        steps = 0
        # a device group ran every step on each member: each member's model prices its own part
        on = device.split(",") if "," in device else (device,)
        fitted = getattr(meter, "_models", {})
        models = [fitted.get(d) for d in on]
        if t is not None and all(m is not None for m in models) and not (t[_UNPRICED] and any(m is not None and _saturates(m) for m in models)):
            steps = int(t[1])
            pre_share = t[4 : 4 + _NB]
            dec_share = t[4 + _NB : 4 + 2 * _NB]
            idle_pre, idle_dec = t[4 + 2 * _NB], t[5 + 2 * _NB]
            # the decode steps still on their way: scale the decode phase to the tokens the server reported
            # (the first output token comes from the prefill step)
            scale = 1.0
            if output_tokens and t[3] > 0:
                scale = max(1.0, (output_tokens - 1) / t[3])
            dyn = 0.0
            for m in models:
                assert m is not None  # all fitted: checked above
                coef = m.full_coef
                dyn += sum(c * x for c, x in zip(coef, pre_share)) + scale * sum(c * x for c, x in zip(coef, dec_share))
            idles = getattr(meter, "_idle", {})
            idle_w = sum(float((meter.idle_w if meter.idle_w is not None else idles.get(d, 0.0)) or 0.0) for d in on)
            life_s = idle_pre + scale * idle_dec
            device_s = life_s * len(on)  # device-seconds: each member for the request's share of time
            energy = max(0.0, float(dyn)) + idle_w * life_s
            method = "step-model"
        else:
            rate = self._rate.get(device)
            tok = (prompt_tokens or 0) + (output_tokens or 0)
            if rate is not None and tok > 0:
                energy = rate * tok
                method = "recent-rate"
            if t is not None:
                steps = int(t[1])
        self.stats[method] += 1
        co2e = None
        if energy is not None:
            co2e = _co2e(meter, energy, device_s)
        return {"energy_j": energy, "co2e_g": co2e, "method": method, "steps": steps}


def _co2e(meter: Meter, energy_j: float, device_s: float) -> float | None:
    carbon = getattr(meter, "carbon", None)
    if carbon is None:
        return None
    try:
        g = float(carbon.operational_g(energy_j))
        if device_s > 0:
            g += float(carbon.embodied_g(device_s))
        return g
    except Exception:  # a carbon model that cannot price a scalar: energy only
        return None


_attach_lock = threading.Lock()


def attach(meter: Meter) -> Provisional:
    """The meter's :class:`Provisional` (made and connected on first call)."""
    with _attach_lock:
        p = getattr(meter, "provisional", None)
        if isinstance(p, Provisional):
            return p
        p = Provisional(meter)
        meter.step_observers.append(p.observe_step)
        meter.add_sink(p)
        meter.provisional = p
        return p


def usage_energy(prompt_tokens: int | None = None, completion_tokens: int | None = None) -> dict[str, Any]:
    """The fields to add to an OpenAI-style ``usage`` for the request being served.

    Call it from an endpoint behind :class:`~wattspan.EnergyMiddleware` when the
    response's usage is known (its last chunk): ``usage.update(usage_energy(p, c))``.
    Returns ``{"energy_j", "co2e_g", "energy_details": {"provisional": True, "method",
    "request_id"}}`` (energy ``None`` while nothing is known), or ``{}`` outside a
    metered request. The first call connects the estimate to the meter; requests that
    began before it are priced by the recent rate, later ones by their steps.
    """
    from .context import _current

    w = _current.get()
    if w is None:
        return {}
    try:
        p = attach(w.mw.meter)
        est = p.estimate(w.id, w.device, prompt_tokens, completion_tokens)
    except Exception:  # a courtesy figure: never fail the response for it
        from ..logs import get_logger

        get_logger(__name__).exception("provisional energy estimate failed")
        est = {"energy_j": None, "co2e_g": None, "method": "none"}

    def sig(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else float(f"{x:.6g}")

    return {
        "energy_j": sig(est["energy_j"]),
        "co2e_g": sig(est["co2e_g"]),
        "energy_details": {"provisional": True, "method": est["method"], "request_id": w.id},
    }
