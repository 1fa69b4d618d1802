"""What ran when: :class:`Requests` (each request's device and lifetime) and :class:`Steps` (batch steps and their requests' tokens)."""

from __future__ import annotations

import math
from itertools import chain, repeat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..devices import device_key
from ..samples import COUNTER_MAX_W, DeviceTrace, counter_leap

__all__ = ["FEATURES", "BatchStep", "Requests", "Steps", "TraceError", "check_trace"]


#: The step features the batch-fit model uses; a step's dynamic energy is their
#: non-negative combination. Units: seconds, tokens, tokens, thousands of tokens.
FEATURES = ("duration_s", "prefill_tokens", "decode_tokens", "decode_context_ktokens")

_NS = 1e-9


# --------------------------------------------------------------------------- inputs


class TraceError(ValueError):
    """A power trace that cannot be attributed (negative or infinite readings, a counter that goes
    back, no reading at all); the message names the device and the problem."""


def check_trace(trace: DeviceTrace) -> None:
    """Raise :class:`TraceError` unless ``trace`` can be attributed: power readings are watts >= 0
    (NaN: not read), the energy counter finite and never decreasing, and at least one power reading
    or two counter readings. Readings the sensor could not give (NaN) are left to the engine.

    A clean trace costs a min and a max per column (and one comparison pass for the counter)."""
    dev = trace.device
    p, e = trace.power_w, trace.energy_j
    n_power = n_energy = 0
    if p is not None and len(p):
        lo, hi = float(p.min()), float(p.max())  # NaN anywhere makes both NaN
        if lo >= 0.0 and hi < math.inf:
            n_power = len(p)
        else:
            fin = np.isfinite(p)
            n_power = int(np.count_nonzero(fin))
            bad = np.flatnonzero(np.isinf(p))
            if bad.size:
                i = int(bad[0])
                raise TraceError(f"trace {dev!r}: power_w is {p[i]:g} at t_ns={int(trace.t_ns[i])}: power readings must be finite watts")
            neg = np.flatnonzero(p < 0)
            if neg.size:
                i = int(neg[0])
                raise TraceError(f"trace {dev!r}: power_w is negative ({p[i]:g} W at t_ns={int(trace.t_ns[i])}, {neg.size} such "
                                 "readings): power readings must be watts >= 0")
    if e is not None and len(e):
        lo, hi = float(e.min()), float(e.max())
        if -math.inf < lo and hi < math.inf:  # no NaN, no inf: every row read
            n_energy = len(e)
            idx = None
            back = e[1:] < e[:-1]
        else:
            bad = np.flatnonzero(np.isinf(e))
            if bad.size:
                i = int(bad[0])
                raise TraceError(f"trace {dev!r}: energy_j is {e[i]:g} at t_ns={int(trace.t_ns[i])}: counter readings must be finite joules")
            idx = np.flatnonzero(np.isfinite(e))
            n_energy = int(idx.size)
            back = e[idx[1:]] < e[idx[:-1]]
        if back.any():
            k = int(np.argmax(back))
            i, j = (k, k + 1) if idx is None else (int(idx[k]), int(idx[k + 1]))
            raise TraceError(f"trace {dev!r}: energy_j goes back from {e[i]:g} J to {e[j]:g} J at t_ns={int(trace.t_ns[j])}: "
                             "it must be a cumulative counter (unwrapped, never reset)")
        tf, ef = (trace.t_ns, e) if idx is None else (trace.t_ns[idx], e[idx])
        leap = counter_leap(tf, ef)
        if leap is not None:
            k, rise, dt_s = leap
            raise TraceError(f"trace {dev!r}: energy_j rises by {rise:g} J in {dt_s:.3g} s to t_ns={int(tf[k + 1])}, more than "
                             f"{COUNTER_MAX_W:g} W could draw: a unit error (mJ for J?) or a glitch")
    if n_power == 0 and n_energy < 2:
        what = "no power_w readings" if p is None else f"all {len(p)} power_w readings NaN"
        raise TraceError(f"trace {dev!r} has {what} and {n_energy} energy_j counter readings: nothing to attribute "
                         "(one finite power reading or two counter readings are needed)")


class BatchStep(NamedTuple):
    """One batch step as the meter gets it: ``[start_ns, end_ns)`` on ``device`` (a name or a
    group ``"gpu0,gpu1"``), ``tokens[request_id]`` tokens for each request in it."""

    start_ns: int
    end_ns: int
    device: str
    tokens: Mapping[str, float]


@dataclass(frozen=True)
class Requests:
    """Request lifetimes, columnar. ``start_ns``/``end_ns`` on the trace's clock."""

    ids: np.ndarray  # object array of str
    start_ns: np.ndarray  # int64
    end_ns: np.ndarray  # int64
    device: np.ndarray  # object array of str
    weight: np.ndarray  # float64, time-share weight (default 1)
    route: np.ndarray | None = None
    model: np.ndarray | None = None
    tenant: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        for name in ("start_ns", "end_ns", "device", "weight"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Requests.{name} has {len(getattr(self, name))} rows for {n} ids")
        if n and np.any(self.end_ns < self.start_ns):
            bad = int(np.argmax(self.end_ns < self.start_ns))
            raise ValueError(f"request {self.ids[bad]!r} ends before it starts")
        if n and (not np.all(np.isfinite(self.weight)) or np.any(self.weight < 0)):
            raise ValueError("request weights must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(cls, rows: Iterable[Mapping[str, Any]]) -> "Requests":
        """Build from dicts with ``id, start_ns, end_ns, gpu`` (or ``device``) and
        optional ``weight, route, model, tenant``."""
        rows = list(rows)
        ids = np.array([str(r["id"]) for r in rows], dtype=object)
        dev = np.array([device_key(r.get("device", r.get("gpu", "0"))) for r in rows], dtype=object)

        def col(key: str) -> np.ndarray | None:
            if not any(key in r for r in rows):
                return None
            return np.array([str(r.get(key) or "") for r in rows], dtype=object)

        return cls(
            ids=ids,
            start_ns=np.array([int(r["start_ns"]) for r in rows], dtype=np.int64),
            end_ns=np.array([int(r["end_ns"]) for r in rows], dtype=np.int64),
            device=dev,
            weight=np.array([float(r.get("weight", 1.0)) for r in rows], dtype=np.float64),
            route=col("route"),
            model=col("model"),
            tenant=col("tenant"),
        )


@dataclass(frozen=True)
class Steps:
    """Batch steps, columnar, with their (request, tokens) entries in CSR form.

    ``entry_step[i]`` is the step of entry ``i``, ``entry_request[i]`` an index
    into the :class:`Requests` it was built against, ``entry_tokens[i]`` the
    tokens that request processed in that step.
    """

    start_ns: np.ndarray
    end_ns: np.ndarray
    device: np.ndarray
    entry_step: np.ndarray
    entry_request: np.ndarray
    entry_tokens: np.ndarray

    def __post_init__(self) -> None:
        if len(self.start_ns) and np.any(self.end_ns <= self.start_ns):
            bad = int(np.argmax(self.end_ns <= self.start_ns))
            raise ValueError(f"batch step {bad} does not end after it starts")
        if len(self.entry_tokens) and (not np.all(np.isfinite(self.entry_tokens)) or np.any(self.entry_tokens < 0)):
            raise ValueError("batch step token counts must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.start_ns)

    @classmethod
    def from_records(cls, rows: Iterable[Mapping[str, Any]], requests: Requests) -> "Steps":
        """Build from dicts ``{start_ns, end_ns, gpu, requests: {id: tokens}}``.

        Raises ``KeyError`` naming the first request id not in ``requests``.
        """
        index = {rid: i for i, rid in enumerate(requests.ids)}
        starts, ends, devs, e_step, e_req, e_tok = [], [], [], [], [], []
        for s, r in enumerate(rows):
            starts.append(int(r["start_ns"]))
            ends.append(int(r["end_ns"]))
            devs.append(device_key(r.get("device", r.get("gpu", "0"))))
            for rid, tok in r["requests"].items():
                try:
                    e_req.append(index[str(rid)])
                except KeyError:
                    raise KeyError(f"batch step {s} names unknown request {rid!r}") from None
                e_step.append(s)
                e_tok.append(float(tok))
        return cls(
            start_ns=np.array(starts, dtype=np.int64),
            end_ns=np.array(ends, dtype=np.int64),
            device=np.array(devs, dtype=object),
            entry_step=np.array(e_step, dtype=np.int64),
            entry_request=np.array(e_req, dtype=np.int64),
            entry_tokens=np.array(e_tok, dtype=np.float64),
        )

    @classmethod
    def from_batches(cls, batches: Iterable[BatchStep], requests: Requests, device: str, *, elsewhere: bool = False) -> "Steps | None":
        """The steps of ``batches`` that ran on ``device`` (a group's step runs on each member),
        built straight into columns; entries naming a request not in ``requests`` are left out,
        and a step left with none is dropped. None when no step remains. ``elsewhere``: the
        steps that ran on other devices instead (a pipeline's other stages, for ``attribute``'s
        ``wait_owners``), each named ``device``: the device whose waits they own."""
        index = {rid: i for i, rid in enumerate(requests.ids.tolist())}
        rows = [b for b in batches if (b[2] == device or ("," in b[2] and device in b[2].split(","))) != elsewhere]
        if not rows:
            return None
        # flattened at C speed (a live meter's refit: a million entries a minute at a thousand in flight,
        # where a loop per entry held the GIL for a second): ids and counts through chain, ids to rows by map
        counts = np.fromiter((len(b[3]) for b in rows), dtype=np.int64, count=len(rows))
        total = int(counts.sum())
        req = np.fromiter(map(index.get, chain.from_iterable(b[3] for b in rows), repeat(-1)), dtype=np.int64, count=total)
        tok = np.fromiter(chain.from_iterable(b[3].values() for b in rows), dtype=np.float64, count=total)
        step = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
        keep = req >= 0
        if not keep.all():
            req, tok, step = req[keep], tok[keep], step[keep]
        has = np.zeros(len(rows), dtype=bool)
        has[step] = True
        if not has.any():
            return None
        renum = np.cumsum(has) - 1  # the kept steps, numbered in order
        starts = np.fromiter((b[0] for b in rows), dtype=np.int64, count=len(rows))[has]
        ends = np.fromiter((b[1] for b in rows), dtype=np.int64, count=len(rows))[has]
        return cls(
            start_ns=starts,
            end_ns=ends,
            device=np.full(len(starts), device, dtype=object),
            entry_step=renum[step],
            entry_request=req,
            entry_tokens=tok,
        )


def check_board_lag(board_lag_s: Any) -> Any:
    """``board_lag_s`` (a board's electrical lag, s: one value or per device) checked, a mapping's
    devices as device keys; ``ValueError`` naming it unless every value is seconds from 0 to 1."""
    if board_lag_s is None:
        return None
    for v in (board_lag_s.values() if isinstance(board_lag_s, Mapping) else (board_lag_s,)):
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1):
            raise ValueError(f"board_lag_s must be seconds from 0 to 1 (one value, or per device), got {v!r}")
    if isinstance(board_lag_s, Mapping):
        return {device_key(k): float(v) for k, v in board_lag_s.items()}
    return board_lag_s
