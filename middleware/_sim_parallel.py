"""Ground truth for multi-GPU engines: tensor and pipeline parallelism (simulated).

:func:`simulate_parallel` schedules one continuous-batching engine with
:func:`wattspan.simulate.simulate_server` and plays its steps on ``tp x pp`` GPUs:

* **tensor parallel** (``tp``): every GPU of a stage runs every step of the stage over the
  step's whole time, each with its own idle baseline, its own power law scale (boards
  differ by a few per cent) and its own noise;
* **pipeline parallel** (``pp``): a step's time is cut into ``pp`` consecutive stage
  slices (stage ``s`` runs ``[start + s d / pp, start + (s+1) d / pp)``), each stage doing
  ``1/pp`` of the step's work; between its slices a stage GPU waits at host-gap power.
  This is the simple, non-overlapped pipeline of one engine step (vLLM's virtual engines
  overlap micro-batches; the books work the same way per stage).

Each GPU's truth follows wattspan's conventions on that GPU (its own steps, the requests
in flight), and a request's truth is the sum over GPUs. ``steps`` are reported two ways:
``steps`` names each stage's own slice on the stage's GPUs (stage timing known), and
``group_steps`` names the whole step on all GPUs (stage timing unknown). Everything here
is simulated: nothing is a measurement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .sources.power_model import PowerModel
from .simulate import SimulatedRun, _cum_at, _first_order, _make_run, simulate_server

__all__ = ["ParallelRun", "simulate_parallel", "write_files"]

_S = 1_000_000_000


@dataclass(frozen=True, eq=False)
class ParallelRun:
    """``runs``: one :class:`SimulatedRun` per GPU (its true power, its own truth, its steps);
    ``requests`` (``gpu`` = the whole group), ``steps`` (per stage slice, on the stage's GPUs),
    ``group_steps`` (whole steps on the whole group) as rows of wattspan's files; ``truth``
    per request summed over GPUs."""

    tp: int
    pp: int
    gpus: list[str]
    runs: dict[str, SimulatedRun]
    requests: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    group_steps: list[dict[str, Any]]
    truth: dict[str, dict[str, float]]
    total_j: float
    truth_unattributed_j: float


def _features(base: SimulatedRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefill tokens, decode tokens and context tokens of each step of ``base``."""
    prompt = {r["id"]: r["prompt_tokens"] for r in base.requests}
    n = len(base.steps)
    pre, dec, ctx = np.zeros(n), np.zeros(n), np.zeros(n)
    done: dict[str, int] = {}
    for s, st in enumerate(base.steps):
        for rid, tok in st["requests"].items():
            k = done.get(rid, 0)
            if k < prompt[rid]:
                pre[s] += tok
            else:
                dec[s] += tok
                ctx[s] += k
            done[rid] = k + tok
    return pre, dec, ctx


def _play(gpu: str, base: SimulatedRun, s_start: np.ndarray, s_end: np.ndarray, s_pre: np.ndarray, s_dec: np.ndarray,
          s_ctx: np.ndarray, step_rows: list[dict[str, Any]], pm: PowerModel, idle_w: float, idle_drift_w: float,
          rng: np.random.Generator) -> SimulatedRun:
    """One GPU's true power for the given steps, and its truth by the conventions."""
    grid_ns = base.grid_ns
    cell_t = base.true_t_ns
    t0, g_end = base.start_ns, base.end_ns
    arrival = np.array([r["start_ns"] for r in base.requests], dtype=np.int64)
    end = np.array([r["end_ns"] for r in base.requests], dtype=np.int64)
    cell_mid = cell_t + grid_ns // 2
    bounds = np.unique(np.concatenate([[t0, g_end], s_start, s_end, arrival, end]))
    seg_start = bounds[:-1]
    in_flight = np.searchsorted(np.sort(arrival), seg_start, side="right") - np.searchsorted(np.sort(end), seg_start, side="right")
    s_idx = np.searchsorted(s_start, seg_start, side="right") - 1
    in_step = (s_idx >= 0) & (seg_start < s_end[np.maximum(s_idx, 0)])
    step_w = pm.step_dynamic_w(duration_s=(s_end - s_start) * 1e-9, prefill_tokens=s_pre, decode_tokens=s_dec,
                               context_tokens=s_ctx, idle_w=idle_w + idle_drift_w)
    step_w = np.clip(step_w * (1.0 + pm.step_jitter_rel * rng.standard_normal(step_w.shape[0])), 0.0, pm.cap_w - idle_w - idle_drift_w)
    target = np.where(in_flight > 0, pm.between_steps_w, 0.0)
    target[in_step] = step_w[s_idx[in_step]]
    seg_of_cell = np.searchsorted(bounds, cell_mid, side="right") - 1
    dyn = _first_order(bounds, target, pm.tau_s, cell_mid, seg_of_cell)
    theta = _first_order(bounds, target / (pm.cap_w - idle_w - idle_drift_w), pm.thermal_tau_s, cell_mid, seg_of_cell)
    idle = idle_w + idle_drift_w * theta
    power = np.maximum(idle + dyn + pm.noise_w * rng.standard_normal(cell_t.shape[0]), 0.0)
    requests = [dict(r, gpu=gpu) for r in base.requests]
    run = _make_run(gpu, grid_ns, cell_t, power, idle, requests, step_rows)

    c_tot, c_idle = _cum_at(run, bounds)
    e_seg, idle_seg = np.diff(c_tot), np.diff(c_idle)
    safe = np.maximum(in_flight, 1)
    idle_share = np.where(in_flight > 0, idle_seg / safe, 0.0)
    gap_share = np.where((in_flight > 0) & ~in_step, (e_seg - idle_seg) / safe, 0.0)
    k0, k1 = np.searchsorted(bounds, arrival), np.searchsorted(bounds, end)
    cs_i, cs_g = np.concatenate([[0.0], np.cumsum(idle_share)]), np.concatenate([[0.0], np.cumsum(gap_share)])
    r_idle, r_dyn = cs_i[k1] - cs_i[k0], cs_g[k1] - cs_g[k0]
    ids = [r["id"] for r in base.requests]
    index = {rid: i for i, rid in enumerate(ids)}
    f_step = np.array([s for s, st in enumerate(step_rows) for _ in st["requests"]], dtype=np.int64)
    f_req = np.array([index[rid] for st in step_rows for rid in st["requests"]], dtype=np.int64)
    f_tok = np.array([t for st in step_rows for t in st["requests"].values()], dtype=np.float64)
    if f_step.size:
        step_dyn = run.energy_j(s_start, s_end, dynamic=True)
        step_tok = np.bincount(f_step, weights=f_tok, minlength=s_start.shape[0])
        r_dyn = r_dyn + np.bincount(f_req, weights=step_dyn[f_step] * f_tok / step_tok[f_step], minlength=len(ids))
    truth = {ids[i]: {"energy_j": float(r_dyn[i] + r_idle[i]), "dynamic_j": float(r_dyn[i]), "idle_j": float(r_idle[i])}
             for i in range(len(ids))}
    object.__setattr__(run, "truth", truth)
    object.__setattr__(run, "truth_unattributed_j", float(e_seg[in_flight == 0].sum()))
    return run


def simulate_parallel(*, tp: int = 4, pp: int = 1, seed: int = 0, idle_w: float = 90.0, idle_drift_w: float = 6.0,
                      power_model: PowerModel | None = None, board_spread: float = 0.05, **server: Any) -> ParallelRun:
    """Simulate one engine on ``tp * pp`` GPUs named ``gpu0..``, stage ``s`` on
    ``gpu{s*tp}..gpu{s*tp+tp-1}``. ``server``: the arguments of :func:`simulate_server`
    (``duration_s``, ``rate_per_s``, ``bursty``, ``timing``...) for the engine's schedule.
    ``board_spread``: GPUs' power laws differ by up to this fraction (and their idle by
    up to ``idle_w * board_spread``). Deterministic given ``seed``."""
    if tp < 1 or pp < 1 or tp * pp > 64:
        raise ValueError(f"tp and pp must be >= 1 with tp * pp <= 64, got {tp!r}, {pp!r}")
    pm = power_model or PowerModel()
    base = simulate_server(seed=seed, idle_w=idle_w, idle_drift_w=idle_drift_w, power_model=pm, **server)
    rng = np.random.default_rng([seed, tp, pp])
    gpus = [f"gpu{k}" for k in range(tp * pp)]
    group = ",".join(gpus)
    s_start = np.array([s["start_ns"] for s in base.steps], dtype=np.int64)
    s_end = np.array([s["end_ns"] for s in base.steps], dtype=np.int64)
    pre, dec, ctx = _features(base)
    runs: dict[str, SimulatedRun] = {}
    steps: list[dict[str, Any]] = []
    for stage in range(pp):
        a = s_start + (s_end - s_start) * stage // pp
        b = s_start + (s_end - s_start) * (stage + 1) // pp
        keep = b > a
        a, b = a[keep], b[keep]
        stage_gpus = gpus[stage * tp:(stage + 1) * tp]
        rows = [{"start_ns": int(x), "end_ns": int(y), "gpu": ",".join(stage_gpus), "requests": st["requests"]}
                for x, y, st in zip(a.tolist(), b.tolist(), (s for s, k in zip(base.steps, keep.tolist()) if k))]
        steps.extend(rows)
        for g in stage_gpus:
            scale = 1.0 + board_spread * (2 * rng.random() - 1)
            law = dataclasses.replace(pm, active_w=pm.active_w * scale, compute_w=pm.compute_w * scale, memory_w=pm.memory_w * scale)
            idle_g = idle_w * (1.0 + board_spread * (2 * rng.random() - 1))
            runs[g] = _play(g, base, a, b, pre[keep] / pp, dec[keep] / pp, ctx[keep] / pp, rows, law, idle_g, idle_drift_w, rng)
    steps.sort(key=lambda r: r["start_ns"])
    requests = [dict(r, gpu=group) for r in base.requests]
    group_steps = [dict(s, gpu=group) for s in base.steps]
    truth = {r["id"]: {k: float(sum(run.truth[r["id"]][k] for run in runs.values())) for k in ("energy_j", "dynamic_j", "idle_j")}
             for r in base.requests}
    return ParallelRun(tp=tp, pp=pp, gpus=gpus, runs=runs, requests=requests, steps=steps, group_steps=group_steps, truth=truth,
                       total_j=float(sum(r.total_j for r in runs.values())),
                       truth_unattributed_j=float(sum(r.truth_unattributed_j for r in runs.values())))


def write_files(run: ParallelRun, sensor: str, directory: str | Path, *, seed: int = 10) -> dict[str, Path]:
    """Write ``trace.csv`` (every GPU's readings through ``sensor``, GPU ``k`` with seed ``seed + k``),
    ``requests.jsonl`` (``"gpu"``: the group as a list), ``batches.jsonl`` (each stage's steps on its
    GPUs, ``"gpu": "gpu0,gpu1,..."``) and ``truth.jsonl`` (as :func:`wattspan.simulate.write_files`)."""
    import json

    from .simulate import sense

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (g, r) in enumerate(run.runs.items()):
        tr = sense(r, sensor, seed=seed + k)
        p = tr.power_w if tr.power_w is not None else np.full(len(tr), np.nan)
        e = tr.energy_j if tr.energy_j is not None else np.full(len(tr), np.nan)
        for t, pw, ej in zip(tr.t_ns.tolist(), p.tolist(), e.tolist()):
            rows.append((t, g, "" if pw != pw else f"{pw:.3f}", "" if ej != ej else f"{ej:.4f}"))
    rows.sort()
    paths = {k: out / f for k, f in (("trace", "trace.csv"), ("requests", "requests.jsonl"),
                                      ("batches", "batches.jsonl"), ("truth", "truth.jsonl"))}
    paths["trace"].write_text("time_ns,gpu,power_w,energy_j\n" + "".join(f"{t},{g},{p},{e}\n" for t, g, p, e in rows))
    paths["requests"].write_text("".join(json.dumps(dict(r, gpu=run.gpus)) + "\n" for r in run.requests))
    paths["batches"].write_text("".join(json.dumps(s, separators=(",", ":")) + "\n" for s in run.steps))
    truth = [{"id": k, **v} for k, v in run.truth.items()]
    truth.append({"id": None, "unattributed_j": run.truth_unattributed_j, "total_j": run.total_j})
    paths["truth"].write_text("".join(json.dumps(t) + "\n" for t in truth))
    return paths
