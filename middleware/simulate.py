"""Ground truth for wattspan: a simulated continuous-batching inference server, its true
power, what each request truly cost, and what realistic sensors would have reported.

``simulate_server()`` runs a vLLM-like scheduler (decode tokens for running requests plus
chunked prefill for new ones, within a token budget per step) over Poisson arrivals,
turns each step's composition into power with a :class:`PowerModel` (nonlinear, lagged,
noisy) on a fine time grid, and computes each request's true energy by wattspan's
conventions:

* dynamic power is true power minus the idle baseline ``P_idle(t)`` (which drifts slowly
  with temperature);
* a batch step's dynamic energy is what it makes the board draw: its modelled power over its
  ``[start, end)`` (the electrical lag moves part of it later in time, the tail after the
  step included, not to another step), split among the requests in that step in proportion
  to their tokens in it (prefill chunk size, or 1 per decode token);
* the power held outside any step, while requests are in flight (a host gap), is shared
  equally by them; idle power at each instant is shared equally by the requests in flight;
* the rest (idle while nothing is in flight, the true power's white noise) is unattributed;

so ``sum(request energy) + unattributed == total`` exactly.

``sense()`` then reads that power the way a real sensor would (part-time "instant" power,
Hopper's 1 s average, an energy counter that refreshes every ~50 ms...), and
``write_files()`` writes the trace, requests, batch steps and truth in wattspan's file
formats. Everything is simulated: nothing here is a measurement.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .sources.power_model import LAWS, PowerModel
from .samples import DeviceTrace, SampleKind

__all__ = [
    "LAWS",
    "PRESETS",
    "PowerModel",
    "SensorSpec",
    "SimulatedRun",
    "StepTiming",
    "sense",
    "run_from_power",
    "simulate_server",
    "write_files",
]

_MS = 1_000_000  # ns per ms
_S = 1_000_000_000  # ns per s


@dataclass(frozen=True)
class StepTiming:
    """How long a batch step takes, and the host time around steps (H100, 8B model, bf16).

    A step lasts ``base_ms + prefill_token_ms * prefill_tokens + decode_seq_ms * decode_seqs
    + context_token_ms * context_tokens`` milliseconds, times ``1 + N(0, jitter_rel)``:

    ``base_ms`` (8 ms): reading 16 GB of weights at ~3.35 TB/s is 4.8 ms, plus launch and
    sampling overhead. ``prefill_token_ms`` (0.035 ms): ~28k prefill tokens/s (2 x 8e9 FLOP
    a token at ~45 % of 989 TFLOP/s). ``decode_seq_ms`` (0.06 ms): per-sequence overhead of
    a decode step. ``context_token_ms`` (4e-5 ms): 128 KiB of KV cache read per context token
    at ~3.35 TB/s. So a decode step of 32 sequences at ~800 tokens of context takes ~11 ms,
    64 sequences at ~2000 tokens ~17 ms, a 4096-token prefill step ~150 ms.

    ``host_gap_ms`` (median 0.5 ms, clipped to 0.2..2 ms, lognormal sigma 0.6): CPU time
    between steps (scheduling, sampling, detokenising). ``response_ms`` (0.5..3 ms,
    uniform): from a request's last token to the end of its response.
    """

    base_ms: float = 8.0
    prefill_token_ms: float = 0.035
    decode_seq_ms: float = 0.06
    context_token_ms: float = 4e-5
    jitter_rel: float = 0.02
    host_gap_median_ms: float = 0.5
    host_gap_min_ms: float = 0.2
    host_gap_max_ms: float = 2.0
    response_min_ms: float = 0.5
    response_max_ms: float = 3.0

    def __post_init__(self) -> None:
        if not self.base_ms > 0:
            raise ValueError(f"StepTiming.base_ms must be > 0, got {self.base_ms!r}")
        for name in ("prefill_token_ms", "decode_seq_ms", "context_token_ms", "jitter_rel"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"StepTiming.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 < self.host_gap_min_ms <= self.host_gap_median_ms <= self.host_gap_max_ms:
            raise ValueError("StepTiming host gaps need 0 < host_gap_min_ms <= host_gap_median_ms <= host_gap_max_ms")
        if not 0 <= self.response_min_ms <= self.response_max_ms:
            raise ValueError("StepTiming needs 0 <= response_min_ms <= response_max_ms")


@dataclass(frozen=True, eq=False)
class SimulatedRun:
    """One simulated serving run and its ground truth.

    ``true_t_ns`` (int64) are the starts of grid cells of ``grid_ns`` (0.1 ms); the true
    power is ``true_power_w[i]`` watts over the whole cell ``[true_t_ns[i], true_t_ns[i] +
    grid_ns)`` (piecewise constant, so integrals over any window are exact), and
    ``idle_w[i]`` the idle baseline there. ``requests`` and ``steps`` are rows exactly as in
    wattspan's ``requests.jsonl`` and ``batches.jsonl``. ``truth`` maps request id to
    ``{"energy_j", "dynamic_j", "idle_j"}`` (joules, by the conventions in the module
    docstring); ``truth_unattributed_j`` is the energy no request caused (idle while nothing
    was in flight) and ``total_j`` the energy over the whole grid, so
    ``sum(energy_j) + truth_unattributed_j == total_j``.
    """

    gpu: str
    grid_ns: int
    true_t_ns: np.ndarray
    true_power_w: np.ndarray
    idle_w: np.ndarray
    requests: list[dict[str, Any]]  # as in requests.jsonl
    steps: list[dict[str, Any]]  # as in batches.jsonl
    truth: dict[str, dict[str, float]]
    truth_unattributed_j: float
    total_j: float
    _cum_j: np.ndarray = field(repr=False)
    _cum_idle_j: np.ndarray = field(repr=False)
    #: the dynamic energy of the waits (requests in flight, no step running: the power held there), J
    truth_wait_j: float = 0.0

    @property
    def start_ns(self) -> int:
        """Start of the grid (ns)."""
        return int(self.true_t_ns[0])

    @property
    def end_ns(self) -> int:
        """End of the grid (ns, exclusive)."""
        return int(self.true_t_ns[-1]) + self.grid_ns

    def energy_j(self, start_ns: ArrayLike, end_ns: ArrayLike, *, dynamic: bool = False) -> np.ndarray:
        """Exact true energy (J) over ``[start_ns, end_ns)``, vectorised over arrays of windows;
        ``dynamic=True`` subtracts the idle baseline. Windows are clipped to the grid."""
        a = _cum_at(self, np.asarray(start_ns, dtype=np.int64))
        b = _cum_at(self, np.asarray(end_ns, dtype=np.int64))
        e: np.ndarray = b[0] - a[0]
        return e - (b[1] - a[1]) if dynamic else e


def _cum_at(run: SimulatedRun, t_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (total, idle) energy in J from the grid start to each ``t_ns`` (exact)."""
    t = np.clip(t_ns, run.start_ns, run.end_ns) - run.start_ns
    n = run.true_power_w.shape[0]
    j = np.minimum(t // run.grid_ns, n - 1)
    frac_s = (t - j * run.grid_ns) * 1e-9
    return run._cum_j[j] + frac_s * run.true_power_w[j], run._cum_idle_j[j] + frac_s * run.idle_w[j]


def _make_run(gpu: str, grid_ns: int, cell_t: np.ndarray, power: np.ndarray, idle: np.ndarray,
              requests: list[dict[str, Any]], steps: list[dict[str, Any]]) -> SimulatedRun:
    dt_s = grid_ns * 1e-9
    cum = np.concatenate([[0.0], np.cumsum(power) * dt_s])
    cum_idle = np.concatenate([[0.0], np.cumsum(idle) * dt_s])
    total = float(cum[-1])
    return SimulatedRun(gpu=gpu, grid_ns=grid_ns, true_t_ns=cell_t, true_power_w=power, idle_w=idle, requests=requests,
                        steps=steps, truth={}, truth_unattributed_j=total, total_j=total, _cum_j=cum, _cum_idle_j=cum_idle)


def run_from_power(
    power_w: np.ndarray,
    *,
    grid_ns: int = 100_000,
    start_ns: int = 10**12,
    idle_w: float | np.ndarray = 0.0,
    gpu: str = "0",
) -> SimulatedRun:
    """A :class:`SimulatedRun` of a given true power signal (W per ``grid_ns`` cell) with no
    requests (everything unattributed): for reading arbitrary signals with :func:`sense`."""
    power = np.asarray(power_w, dtype=np.float64)
    if power.ndim != 1 or power.shape[0] < 2 or not np.all(np.isfinite(power)) or np.any(power < 0):
        raise ValueError("run_from_power: power_w must be a 1-D array of at least 2 finite watts >= 0")
    if grid_ns < 1:
        raise ValueError(f"grid_ns must be >= 1, got {grid_ns!r}")
    idle = np.broadcast_to(np.asarray(idle_w, dtype=np.float64), power.shape).copy()
    cell_t = start_ns + grid_ns * np.arange(power.shape[0], dtype=np.int64)
    return _make_run(gpu, grid_ns, cell_t, power, idle, [], [])


# --------------------------------------------------------------------------- workload

def _token_counts(rng: np.random.Generator, n: int, params: tuple[float, float], lo: int, hi: int, what: str) -> np.ndarray:
    if len(params) != 2 or not params[0] > 0 or not params[1] >= 0:
        raise ValueError(f"{what} must be (median_tokens > 0, sigma >= 0) of a lognormal, got {params!r}")
    x = rng.lognormal(math.log(params[0]), params[1], size=n)
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def _arrivals(rng: np.random.Generator, duration_s: float, rate_per_s: float, bursty: bool) -> np.ndarray:
    """Arrival times in seconds from 0, Poisson; ``bursty`` alternates ON (mean 3 s) and OFF
    (mean 5 s, no arrivals) periods, with the ON rate raised so the mean rate is unchanged."""
    if not bursty:
        n = rng.poisson(rate_per_s * duration_s)
        return np.sort(rng.uniform(0.0, duration_s, size=n))
    on_mean, off_mean = 3.0, 5.0
    on_rate = rate_per_s * (on_mean + off_mean) / on_mean
    out, t, on = [], 0.0, True
    while t < duration_s:
        length = rng.exponential(on_mean if on else off_mean)
        if on:
            end = min(t + length, duration_s)
            out.append(rng.uniform(t, end, size=rng.poisson(on_rate * (end - t))))
        t += length
        on = not on
    return np.sort(np.concatenate(out)) if out else np.zeros(0)


def _schedule(
    rng: np.random.Generator,
    arrival_ns: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    *,
    max_batch_tokens: int,
    max_batch_size: int,
    timing: StepTiming,
) -> tuple[np.ndarray, tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Run the continuous-batching scheduler. Returns request end times and per-step arrays."""
    n = arrival_ns.shape[0]
    prompt_l = prompt.tolist()
    output_l = output.tolist()
    arrival_l = arrival_ns.tolist()
    prefilled = [0] * n
    generated = [0] * n
    end_ns = [0] * n
    gap_mu = math.log(timing.host_gap_median_ms)

    def host_gap() -> int:
        g = min(max(rng.lognormal(gap_mu, 0.6), timing.host_gap_min_ms), timing.host_gap_max_ms)
        return int(g * _MS)

    st_start: list[int] = []
    st_end: list[int] = []
    st_prefill: list[int] = []
    st_decode: list[int] = []
    st_ctx: list[int] = []
    flat_step: list[int] = []
    flat_req: list[int] = []
    flat_tok: list[int] = []
    running: list[int] = []
    waiting: list[int] = []
    nxt = 0
    t = arrival_l[0] + host_gap() if n else 0
    while True:
        while nxt < n and arrival_l[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        if not running and not waiting:
            if nxt >= n:
                break
            t = arrival_l[nxt] + host_gap()
            continue
        while waiting and len(running) < max_batch_size:
            running.append(waiting.pop(0))
        budget = max_batch_tokens
        sid = len(st_start)
        n_prefill = n_decode = ctx = 0
        chunks = []
        for r in running:
            if budget <= 0:
                break
            left = prompt_l[r] - prefilled[r]
            c = min(left, budget) if left > 0 else 1
            budget -= c
            chunks.append((r, c, left > 0))
            if left > 0:
                n_prefill += c
            else:
                n_decode += 1
            ctx += prefilled[r] + generated[r] + c
        dur_ms = (timing.base_ms + timing.prefill_token_ms * n_prefill + timing.decode_seq_ms * n_decode
                  + timing.context_token_ms * ctx) * max(0.5, 1.0 + timing.jitter_rel * rng.standard_normal())
        t_end = t + int(dur_ms * _MS)
        st_start.append(t)
        st_end.append(t_end)
        st_prefill.append(n_prefill)
        st_decode.append(n_decode)
        st_ctx.append(ctx)
        finished = []
        for r, c, is_prefill in chunks:
            flat_step.append(sid)
            flat_req.append(r)
            flat_tok.append(c)
            if is_prefill:
                prefilled[r] += c
                if prefilled[r] == prompt_l[r]:
                    generated[r] = 1  # the last prefill chunk yields the first token
            else:
                generated[r] += 1
            if prefilled[r] == prompt_l[r] and generated[r] >= output_l[r]:
                end_ns[r] = t_end + int(rng.uniform(timing.response_min_ms, timing.response_max_ms) * _MS)
                finished.append(r)
        if finished:
            done = set(finished)
            running = [r for r in running if r not in done]
        t = t_end + host_gap()
    steps = (np.array(st_start, dtype=np.int64), np.array(st_end, dtype=np.int64), np.array(st_prefill, dtype=np.float64),
             np.array(st_decode, dtype=np.float64), np.array(st_ctx, dtype=np.float64))
    flat = (np.array(flat_step, dtype=np.int64), np.array(flat_req, dtype=np.int64), np.array(flat_tok, dtype=np.int64))
    return np.array(end_ns, dtype=np.int64), steps, flat


# --------------------------------------------------------------------------- power + truth

def _first_order(bounds: np.ndarray, target: np.ndarray, tau_s: float, cell_mid: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Exact first-order response (time constant ``tau_s``) to a piecewise-constant ``target``
    (value ``target[k]`` over ``[bounds[k], bounds[k+1])``), evaluated at ``cell_mid``."""
    alpha = np.exp(-np.diff(bounds) * 1e-9 / tau_s).tolist()
    tl = target.tolist()
    p0 = [0.0] * len(tl)
    p = 0.0
    for k, (tk, ak) in enumerate(zip(tl, alpha)):
        p0[k] = p
        p = tk + (p - tk) * ak
    p0a = np.array(p0)
    out: np.ndarray = target[seg] + (p0a[seg] - target[seg]) * np.exp(-(cell_mid - bounds[seg]) * 1e-9 / tau_s)
    return out


def simulate_server(
    *,
    seed: int = 0,
    duration_s: float = 60.0,
    rate_per_s: float = 8.0,
    gpu: str = "0",
    idle_w: float = 90.0,
    idle_drift_w: float = 6.0,
    max_batch_tokens: int = 4096,
    max_batch_size: int = 64,
    prompt_tokens: tuple[float, float] = (512.0, 1.0),
    output_tokens: tuple[float, float] = (128.0, 0.9),
    power_model: PowerModel | None = None,
    timing: StepTiming | None = None,
    bursty: bool = False,
    grid_ns: int = 100_000,
    model: str = "sim-llama-8b",
) -> SimulatedRun:
    """Simulate ``duration_s`` seconds of arrivals at a continuous-batching server on one GPU.

    Requests arrive Poisson at ``rate_per_s`` (``bursty``: ON/OFF periods of mean 3 s / 5 s
    with the same mean rate) from 1 s after the grid start; the server then drains, and the
    grid ends 1 s after the last response. Prompt and output lengths are lognormal
    ``(median_tokens, sigma)``, clipped to 4..16384 and 1..4096 tokens. Each step holds one
    decode token per running request plus chunked prefill for the others, within
    ``max_batch_tokens`` tokens and ``max_batch_size`` sequences; ``timing`` sets step
    durations (:class:`StepTiming`), ``power_model`` their power (:class:`PowerModel`).
    The idle baseline is ``idle_w`` plus up to ``idle_drift_w`` watts that follow the load
    with the power model's thermal time constant (reached after sustained full power).
    Timestamps are int ns starting at 10**12 (a monotonic clock ~17 min after boot); the
    true power lives on a ``grid_ns`` grid (0.1 ms). Deterministic given ``seed``.
    Requests get ids ``req-00000``..., route ``/v1/completions``, tenants ``t0``..``t3``.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0 requests/s, got {rate_per_s!r}")
    if not idle_w > 0 or not idle_drift_w >= 0:
        raise ValueError(f"idle_w must be > 0 and idle_drift_w >= 0, got {idle_w!r}, {idle_drift_w!r}")
    if max_batch_tokens < 1 or max_batch_size < 1:
        raise ValueError("max_batch_tokens and max_batch_size must be >= 1")
    if grid_ns < 2 or grid_ns % 2:
        raise ValueError(f"grid_ns must be an even number of ns >= 2, got {grid_ns!r}")
    pm = power_model or PowerModel()
    tm = timing or StepTiming()
    if idle_w + idle_drift_w >= pm.cap_w:
        raise ValueError(f"idle_w + idle_drift_w ({idle_w + idle_drift_w} W) must stay below PowerModel.cap_w ({pm.cap_w} W)")
    rng = np.random.default_rng(seed)
    t0 = 10**12

    arr_s = _arrivals(rng, duration_s, rate_per_s, bursty)
    n = arr_s.shape[0]
    arrival_ns = t0 + _S + np.rint(arr_s * _S).astype(np.int64)
    prompt = _token_counts(rng, n, prompt_tokens, 4, 16384, "prompt_tokens")
    output = _token_counts(rng, n, output_tokens, 1, 4096, "output_tokens")
    end_ns, (s_start, s_end, s_pre, s_dec, s_ctx), (f_step, f_req, f_tok) = _schedule(
        rng, arrival_ns, prompt, output, max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size, timing=tm)

    last = int(end_ns.max()) if n else t0 + _S + int(duration_s * _S)
    n_cells = -(-(last + _S - t0) // grid_ns)
    g_end = t0 + n_cells * grid_ns
    cell_t = t0 + grid_ns * np.arange(n_cells, dtype=np.int64)
    cell_mid = cell_t + grid_ns // 2

    # Segments between all events; in each, the in-flight set and the running step are constant.
    bounds = np.unique(np.concatenate([[t0, g_end], s_start, s_end, arrival_ns, end_ns]))
    seg_start = bounds[:-1]
    starts_sorted = np.sort(arrival_ns)
    ends_sorted = np.sort(end_ns)
    in_flight = (np.searchsorted(starts_sorted, seg_start, side="right")
                 - np.searchsorted(ends_sorted, seg_start, side="right"))
    s_idx = np.searchsorted(s_start, seg_start, side="right") - 1
    in_step = (s_idx >= 0) & (seg_start < s_end[np.maximum(s_idx, 0)]) if s_start.size else np.zeros(seg_start.shape, bool)

    step_w = pm.step_dynamic_w(duration_s=(s_end - s_start) * 1e-9, prefill_tokens=s_pre, decode_tokens=s_dec,
                               context_tokens=s_ctx, idle_w=idle_w + idle_drift_w) if s_start.size else np.zeros(0)
    step_w = np.clip(step_w * (1.0 + pm.step_jitter_rel * rng.standard_normal(step_w.shape[0])), 0.0, pm.cap_w - idle_w - idle_drift_w)
    target = np.where(in_flight > 0, pm.between_steps_w, 0.0)
    target[in_step] = step_w[s_idx[in_step]]

    seg_of_cell = np.searchsorted(bounds, cell_mid, side="right") - 1
    dyn = _first_order(bounds, target, pm.tau_s, cell_mid, seg_of_cell)
    full = pm.cap_w - idle_w - idle_drift_w
    theta = _first_order(bounds, target / full, pm.thermal_tau_s, cell_mid, seg_of_cell)
    idle = idle_w + idle_drift_w * theta
    power = idle + dyn + pm.noise_w * rng.standard_normal(n_cells)
    np.maximum(power, 0.0, out=power)


    requests = [
        {"id": f"req-{i:05d}", "start_ns": int(arrival_ns[i]), "end_ns": int(end_ns[i]), "gpu": gpu,
         "prompt_tokens": int(prompt[i]), "output_tokens": int(output[i]), "route": "/v1/completions",
         "model": model, "tenant": f"t{i % 4}"}
        for i in range(n)
    ]
    ids = [r["id"] for r in requests]
    steps: list[dict[str, Any]] = [{"start_ns": int(a), "end_ns": int(b), "gpu": gpu, "requests": {}} for a, b in zip(s_start.tolist(), s_end.tolist())]
    for s, r, k in zip(f_step.tolist(), f_req.tolist(), f_tok.tolist()):
        steps[s]["requests"][ids[r]] = k

    run = _make_run(gpu, grid_ns, cell_t, power, idle, requests, steps)

    # ---- truth by the conventions (causal: a step's or a wait's dynamic energy is what it makes
    #      the board draw, its power over its own time; the lag only moves when that is drawn)
    _, c_idle = _cum_at(run, bounds)
    idle_seg = np.diff(c_idle)
    safe_n = np.maximum(in_flight, 1)
    idle_share = np.where(in_flight > 0, idle_seg / safe_n, 0.0)
    gap_j = np.where((in_flight > 0) & ~in_step, target * (np.diff(bounds) * 1e-9), 0.0)  # the power held in each wait
    gap_share = gap_j / safe_n
    k0 = np.searchsorted(bounds, arrival_ns)
    k1 = np.searchsorted(bounds, end_ns)
    cs_idle = np.concatenate([[0.0], np.cumsum(idle_share)])
    cs_gap = np.concatenate([[0.0], np.cumsum(gap_share)])
    r_idle = cs_idle[k1] - cs_idle[k0]
    r_dyn = cs_gap[k1] - cs_gap[k0]
    if f_step.size:
        step_dyn = step_w * ((s_end - s_start) * 1e-9)
        step_tok = np.bincount(f_step, weights=f_tok, minlength=s_start.shape[0])
        r_dyn = r_dyn + np.bincount(f_req, weights=step_dyn[f_step] * f_tok / step_tok[f_step], minlength=n)
    truth = {ids[i]: {"energy_j": float(r_dyn[i] + r_idle[i]), "dynamic_j": float(r_dyn[i]), "idle_j": float(r_idle[i])}
             for i in range(n)}
    # the rest of what the board drew: idle while nothing is in flight, and the true power's noise
    unattributed = run.total_j - float(r_dyn.sum() + r_idle.sum())
    object.__setattr__(run, "truth", truth)
    object.__setattr__(run, "truth_unattributed_j", unattributed)
    object.__setattr__(run, "truth_wait_j", float(gap_j.sum()))
    return run


# --------------------------------------------------------------------------- sensors

_POWER_MODES = ("instant", "part-time", "average", "none")


@dataclass(frozen=True)
class SensorSpec:
    """How a simulated sensor reads the true power.

    ``period_ns``: how often wattspan reads it. ``power``: what the power column holds:
    ``"instant"`` (true power at the read), ``"part-time"`` (a value refreshed every
    ``refresh_ns`` that averages only a ``coverage_ns`` sub-window, at a random position,
    of the preceding refresh period: A100/H100 ``power.draw.instant`` covers ~25 ms of each
    100 ms, Yang et al., SC'24 "Part-time Power Measurements"), ``"average"`` (mean over the
    ``window_ns`` ending at the read: Hopper's ``nvmlDeviceGetPowerUsage``, 1 s) or ``"none"``.
    ``energy``: also read a cumulative counter (J) that refreshes every ``energy_refresh_ns``
    +- ``energy_refresh_jitter_ns`` (uniform), integrates the full true power (offset by an
    arbitrary start value), with relative noise ``energy_noise_rel`` on each increment,
    floored to ``energy_quantum_j``. ``noise_rel``: gaussian relative noise on each power
    value (drawn per refresh, so repeated reads of one refresh are equal). ``jitter_ns``:
    mean lateness of each read (exponential, capped at a quarter period); the timestamp is
    the actual read time.
    """

    name: str
    period_ns: int
    power: str = "instant"
    refresh_ns: int = 0
    coverage_ns: int = 0
    window_ns: int = 0
    energy: bool = False
    energy_refresh_ns: int = 50 * _MS
    energy_refresh_jitter_ns: int = 5 * _MS
    energy_quantum_j: float = 1e-3
    energy_noise_rel: float = 0.01
    noise_rel: float = 0.015
    jitter_ns: int = 300_000

    def __post_init__(self) -> None:
        if self.power not in _POWER_MODES:
            raise ValueError(f"SensorSpec.power must be one of {_POWER_MODES}, got {self.power!r}")
        if self.power == "none" and not self.energy:
            raise ValueError(f"SensorSpec {self.name!r} reads neither power nor energy; set power or energy=True")
        if self.period_ns <= 0:
            raise ValueError(f"SensorSpec.period_ns must be > 0, got {self.period_ns!r}")
        if self.power == "part-time" and not 0 < self.coverage_ns <= self.refresh_ns:
            raise ValueError("SensorSpec part-time power needs 0 < coverage_ns <= refresh_ns")
        if self.power == "average" and self.window_ns <= 0:
            raise ValueError("SensorSpec average power needs window_ns > 0")
        if self.energy and not (0 <= self.energy_refresh_jitter_ns < self.energy_refresh_ns and self.energy_quantum_j >= 0):
            raise ValueError("SensorSpec energy needs 0 <= energy_refresh_jitter_ns < energy_refresh_ns and energy_quantum_j >= 0")
        if min(self.noise_rel, self.energy_noise_rel, self.jitter_ns) < 0:
            raise ValueError("SensorSpec noise_rel, energy_noise_rel and jitter_ns must be >= 0")


_PART_TIME: dict[str, Any] = dict(power="part-time", refresh_ns=100 * _MS, coverage_ns=25 * _MS)

PRESETS: dict[str, SensorSpec] = {
    s.name: s
    for s in (
        # Exact reference: the true power every 1 ms, no noise, no lateness.
        SensorSpec("ideal-1ms", 1 * _MS, noise_rel=0.0, jitter_ns=0),
        # A100/H100 "instant" power read every 100 ms: each value averages a random 25 ms of the 100 ms.
        SensorSpec("instant-100ms", 100 * _MS, **_PART_TIME),
        # The same field polled every 20 ms: it refreshes every 100 ms, so reads repeat values.
        SensorSpec("nvml-poll-20ms", 20 * _MS, **_PART_TIME),
        # nvmlDeviceGetPowerUsage on Hopper: average over 1 s, polled every 100 ms, 1 % noise.
        SensorSpec("hopper-1s-average", 100 * _MS, power="average", window_ns=1 * _S, noise_rel=0.01),
        # A cumulative energy counter refreshed every 50 +- 5 ms, read every 10 ms, 1 mJ steps,
        # with the part-time instant power read alongside.
        SensorSpec("energy-counter", 10 * _MS, energy=True, **_PART_TIME),
        # What wattspan would read on an H100/H200 polling NVML every 20 ms: the total-energy counter
        # (assumed to refresh every 100 +- 10 ms, 1 mJ) and the part-time instant power.
        SensorSpec("hopper-nvml", 20 * _MS, energy=True, energy_refresh_ns=100 * _MS,
                   energy_refresh_jitter_ns=10 * _MS, **_PART_TIME),
        # A power reading averaged over the 20 ms before each read, read every 20 ms, 2 % noise.
        SensorSpec("average-20ms", 20 * _MS, power="average", window_ns=20 * _MS, noise_rel=0.02),
        # An energy counter refreshed every 100 +- 10 ms and read every 100 ms, with part-time power beside it.
        SensorSpec("counter-100ms", 100 * _MS, energy=True, energy_refresh_ns=100 * _MS,
                   energy_refresh_jitter_ns=10 * _MS, **_PART_TIME),
        # A 1 s average power read once a second (no counter): the coarsest sensor here.
        SensorSpec("average-1s", 1 * _S, power="average", window_ns=1 * _S, noise_rel=0.01),
        # A 1 s average power and an energy counter (refreshed every 100 ms), both read once a second.
        SensorSpec("average-1s-counter", 1 * _S, power="average", window_ns=1 * _S, noise_rel=0.01, energy=True,
                   energy_refresh_ns=100 * _MS, energy_refresh_jitter_ns=10 * _MS),
    )
}


def _mean_power(run: SimulatedRun, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = run.energy_j(a, b) / ((b - a) * 1e-9)
    return out


def sense(run: SimulatedRun, sensor: str | SensorSpec, *, seed: int = 0) -> DeviceTrace:
    """What ``sensor`` (a :data:`PRESETS` name or a :class:`SensorSpec`) reports for ``run``.

    Returns a :class:`~wattspan.DeviceTrace` for ``run.gpu`` with ``simulated=True``,
    ``sensor="simulated:<name>"`` and ``power_kind``/``window_ns`` set from the spec (INSTANT
    for instant and part-time power, AVERAGE with the window for averaged power). Reads start
    once the sensor has a full period/window of history and stop before the grid ends.
    Deterministic given ``seed``.
    """
    if isinstance(sensor, str):
        try:
            spec = PRESETS[sensor]
        except KeyError:
            raise ValueError(f"unknown sensor preset {sensor!r}; choose one of {sorted(PRESETS)} or pass a SensorSpec") from None
    elif isinstance(sensor, SensorSpec):
        spec = sensor
    else:
        raise TypeError(f"sensor must be a preset name or a SensorSpec, got {type(sensor).__name__}")
    rng = np.random.default_rng(seed)
    g0, g1 = run.start_ns, run.end_ns
    first = g0 + spec.period_ns
    refresh_t: np.ndarray | None = None
    refresh_v: np.ndarray | None = None
    if spec.power == "part-time":
        refresh_t = g0 + spec.refresh_ns + int(rng.integers(0, spec.refresh_ns)) + spec.refresh_ns * np.arange(
            max(0, (g1 - g0) // spec.refresh_ns), dtype=np.int64)
        refresh_t = refresh_t[refresh_t < g1]
        win0 = refresh_t - spec.refresh_ns + rng.integers(0, spec.refresh_ns - spec.coverage_ns + 1, size=refresh_t.shape[0])
        refresh_v = _mean_power(run, win0, win0 + spec.coverage_ns) * (1.0 + spec.noise_rel * rng.standard_normal(refresh_t.shape[0]))
        first = max(first, int(refresh_t[0]) if refresh_t.size else g1)
    elif spec.power == "average":
        first = max(first, g0 + spec.window_ns)
    nominal = np.arange(first, g1 - spec.period_ns, spec.period_ns, dtype=np.int64)
    if nominal.size == 0:
        raise ValueError(f"run of {(g1 - g0) / 1e9:.3f} s is too short for sensor {spec.name!r}")
    late = np.minimum(rng.exponential(spec.jitter_ns, size=nominal.shape[0]) if spec.jitter_ns else 0.0, spec.period_ns / 4)
    t = nominal + np.asarray(late).astype(np.int64)

    power = None
    if spec.power == "instant":
        power = run.true_power_w[(t - g0) // run.grid_ns] * (1.0 + spec.noise_rel * rng.standard_normal(t.shape[0]))
    elif spec.power == "part-time":
        assert refresh_t is not None and refresh_v is not None  # made above for a part-time sensor
        power = refresh_v[np.searchsorted(refresh_t, t, side="right") - 1]
    elif spec.power == "average":
        power = _mean_power(run, t - spec.window_ns, t) * (1.0 + spec.noise_rel * rng.standard_normal(t.shape[0]))

    energy = None
    if spec.energy:
        m = (g1 - g0) // (spec.energy_refresh_ns - spec.energy_refresh_jitter_ns) + 2
        q = g0 + np.cumsum(spec.energy_refresh_ns + rng.integers(-spec.energy_refresh_jitter_ns, spec.energy_refresh_jitter_ns + 1, size=m))
        q = np.concatenate([[g0], q[q < g1]])
        inc = np.diff(run.energy_j(np.full(q.shape[0], g0), q))
        inc = inc * np.maximum(0.0, 1.0 + spec.energy_noise_rel * rng.standard_normal(inc.shape[0]))
        counter = float(rng.uniform(1e5, 1e6)) + np.concatenate([[0.0], np.cumsum(inc)])
        if spec.energy_quantum_j > 0:
            counter = np.floor(counter / spec.energy_quantum_j) * spec.energy_quantum_j
        energy = counter[np.searchsorted(q, t, side="right") - 1]

    return DeviceTrace(
        device=run.gpu, t_ns=t, power_w=power, energy_j=energy,
        power_kind=SampleKind.AVERAGE if spec.power == "average" else SampleKind.INSTANT,
        window_ns=spec.window_ns if spec.power == "average" else 0,
        sensor=f"simulated:{spec.name}", simulated=True,
    )


# --------------------------------------------------------------------------- files

def write_files(run: SimulatedRun, trace: DeviceTrace, directory: str | Path) -> dict[str, Path]:
    """Write ``trace.csv`` (``time_ns,gpu,power_w[,energy_j]``; an empty cell where a column
    was not read), ``requests.jsonl``, ``batches.jsonl`` and ``truth.jsonl`` (one row per
    request ``{"id", "energy_j", "dynamic_j", "idle_j"}``, then one row
    ``{"id": null, "unattributed_j", "total_j", "start_ns", "end_ns"}``) into ``directory``
    (created if missing). Returns ``{"trace", "requests", "batches", "truth"}`` -> path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("trace", "trace.csv"), ("requests", "requests.jsonl"),
                                      ("batches", "batches.jsonl"), ("truth", "truth.jsonl"))}
    cols = ["time_ns", "gpu"]
    data = [trace.t_ns.astype(str), np.full(len(trace), trace.device)]
    for name, arr in (("power_w", trace.power_w), ("energy_j", trace.energy_j)):
        if arr is not None:
            cols.append(name)
            data.append(np.where(np.isnan(arr), "", np.char.mod("%.6f", arr)))
    rows = [",".join(r) for r in zip(*data)]
    paths["trace"].write_text(",".join(cols) + "\n" + "\n".join(rows) + "\n")
    _write_jsonl(paths["requests"], run.requests)
    _write_jsonl(paths["batches"], run.steps)
    truth_rows = [{"id": k, **v} for k, v in run.truth.items()]
    truth_rows.append({"id": None, "unattributed_j": run.truth_unattributed_j, "total_j": run.total_j,
                       "start_ns": run.start_ns, "end_ns": run.end_ns})
    _write_jsonl(paths["truth"], truth_rows)
    return paths


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
