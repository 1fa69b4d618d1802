"""Ground truth for multi-GPU engines: tensor and pipeline parallelism (simulated).

:func:`simulate_parallel` schedules one continuous-batching engine with
:func:`wattspan.simulate.simulate_server` and plays its steps on ``tp x pp`` GPUs:

* **tensor parallel** (``tp``): every GPU of a stage runs every step of the stage over the
  step's whole time, each with its own idle baseline, its own power law scale (boards
  differ by a few per cent) and its own noise;
* **pipeline parallel** (``pp``): a step's time is cut into ``pp`` consecutive stage
  slices (stage ``s`` runs ``[start + s d / pp, start + (s+1) d / pp)``), each stage doing
  ``1/pp`` of the step's work; between its slices a stage GPU waits at host-gap power.
  This is the simple, non-overlapped pipeline of one engine step. ``stage_weights`` makes
  the stages unbalanced (stage ``s`` does that share of the step's work, over that share of
  its time: the first stage also embeds, the last runs the LM head and sampling);
* **overlapped pipeline** (``overlap=True``, as vLLM's pipeline parallelism runs): the
  requests are split over ``pp`` virtual engines (request ``i`` on engine ``i % pp``) and
  each step of the one-GPU schedule into one micro-batch per engine. An engine hands its
  next micro-batch over as soon as its previous one has left the last stage and the
  micro-batch's requests have arrived; each stage runs one micro-batch at a time, in order,
  so stage 0 runs micro-batch ``k + 1`` while stage 1 runs ``k``. A stage's time for a
  micro-batch is its weight times the micro-batch's share of the step's tokens times the
  step's one-GPU duration (its share of the work at the one GPU's speed), its power the
  step's. A request ends as long after its last micro-batch as it did after its last step.

Each GPU's truth follows wattspan's conventions on that GPU (a slice's dynamic energy is
its power over its own time, the tail its electrical lag draws later included; the power a
GPU holds while it waits during another stage's slice is that slice's, by its tokens; a wait
no other stage's slice covers is shared by time; the idle baseline by the requests in
flight), and a request's truth
is the sum over GPUs. ``steps`` are reported two ways:
``steps`` names each stage's own slice on the stage's GPUs (stage timing known), and
``group_steps`` names the whole step on all GPUs (stage timing unknown: from when the
engine could hand it over, or the previous step came back, to when it came back; what the
vLLM hook reports with a group given). ``engine_steps`` is what the engine core sees of
each (micro-)batch: ``(handed over, came back, tokens)``. Everything here is simulated:
nothing is a measurement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
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
    per request summed over GPUs; ``engine_steps``: ``(submit_ns, done_ns, requests)`` of each
    (micro-)batch as the engine core sees it (the vLLM hook's input)."""

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
    engine_steps: list[tuple[int, int, dict[str, float]]] = dataclasses.field(default_factory=list)
    overlap: bool = False
    stage_weights: tuple[float, ...] = ()


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


def _play(gpu: str, base: SimulatedRun, base_requests: list[dict[str, Any]], s_start: np.ndarray, s_end: np.ndarray, s_pre: np.ndarray, s_dec: np.ndarray,
          s_ctx: np.ndarray, step_rows: list[dict[str, Any]], pm: PowerModel, idle_w: float, idle_drift_w: float,
          rng: np.random.Generator, others: Sequence[tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]] = ()) -> SimulatedRun:
    """One GPU's true power for the given steps, and its truth by the conventions. ``others``: the
    other stages' slices ``(starts, ends, rows)``: what this GPU draws while it waits during one
    of them is that slice's (its micro-batch is why the pipeline is busy), split by its tokens."""
    grid_ns = base.grid_ns
    cell_t = base.true_t_ns
    t0, g_end = base.start_ns, base.end_ns
    arrival = np.array([r["start_ns"] for r in base_requests], dtype=np.int64)
    end = np.array([r["end_ns"] for r in base_requests], dtype=np.int64)
    cell_mid = cell_t + grid_ns // 2
    bounds = np.unique(np.concatenate([[t0, g_end], s_start, s_end, arrival, end, *(x for o in others for x in o[:2])]))
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
    requests = [dict(r, gpu=gpu) for r in base_requests]
    run = _make_run(gpu, grid_ns, cell_t, power, idle, requests, step_rows)

    # causal: a slice's or a wait's dynamic energy is its power over its own time (the lag moves
    # when it is drawn, not whose it is)
    _, c_idle = _cum_at(run, bounds)
    idle_seg = np.diff(c_idle)
    safe = np.maximum(in_flight, 1)
    idle_share = np.where(in_flight > 0, idle_seg / safe, 0.0)
    waiting = (in_flight > 0) & ~in_step
    gap_j = np.where(waiting, target * (np.diff(bounds) * 1e-9), 0.0)
    # a wait during another stage's slice is that slice's: each covering stage gets an equal part
    cover = []
    for o_start, o_end, _ in others:
        j = np.searchsorted(o_start, seg_start, side="right") - 1
        cover.append(np.where((j >= 0) & (seg_start < o_end[np.maximum(j, 0)]) & waiting, j, -1))
    n_cov = np.sum([c >= 0 for c in cover], axis=0) if cover else np.zeros(len(seg_start))
    gap_share = np.where(waiting & (n_cov == 0), gap_j / safe, 0.0)
    k0, k1 = np.searchsorted(bounds, arrival), np.searchsorted(bounds, end)
    cs_i, cs_g = np.concatenate([[0.0], np.cumsum(idle_share)]), np.concatenate([[0.0], np.cumsum(gap_share)])
    r_idle, r_dyn = cs_i[k1] - cs_i[k0], cs_g[k1] - cs_g[k0]
    ids = [r["id"] for r in base_requests]
    index = {rid: i for i, rid in enumerate(ids)}
    for (o_start, _, o_rows), c in zip(others, cover):
        on = c >= 0
        w_slice = np.bincount(c[on], weights=gap_j[on] / n_cov[on], minlength=len(o_start))
        for k in np.flatnonzero(w_slice):
            toks = o_rows[k]["requests"]
            total = float(sum(toks.values()))
            if total <= 0:
                continue
            for rid, tok in toks.items():
                r_dyn[index[rid]] += w_slice[k] * tok / total
    f_step = np.array([s for s, st in enumerate(step_rows) for _ in st["requests"]], dtype=np.int64)
    f_req = np.array([index[rid] for st in step_rows for rid in st["requests"]], dtype=np.int64)
    f_tok = np.array([t for st in step_rows for t in st["requests"].values()], dtype=np.float64)
    if f_step.size:
        step_dyn = step_w * ((s_end - s_start) * 1e-9)
        step_tok = np.bincount(f_step, weights=f_tok, minlength=s_start.shape[0])
        r_dyn = r_dyn + np.bincount(f_req, weights=step_dyn[f_step] * f_tok / step_tok[f_step], minlength=len(ids))
    truth = {ids[i]: {"energy_j": float(r_dyn[i] + r_idle[i]), "dynamic_j": float(r_dyn[i]), "idle_j": float(r_idle[i])}
             for i in range(len(ids))}
    object.__setattr__(run, "truth", truth)
    object.__setattr__(run, "truth_unattributed_j", run.total_j - float(r_dyn.sum() + r_idle.sum()))
    object.__setattr__(run, "truth_wait_j", float(gap_j.sum()))
    return run


def _entry_features(base: SimulatedRun) -> list[dict[str, tuple[float, float, float]]]:
    """Per step, each request's (prefill, decode, context) tokens in it (the parts of :func:`_features`)."""
    prompt = {r["id"]: r["prompt_tokens"] for r in base.requests}
    done: dict[str, int] = {}
    out = []
    for st in base.steps:
        row = {}
        for rid, tok in st["requests"].items():
            k = done.get(rid, 0)
            row[rid] = (float(tok), 0.0, 0.0) if k < prompt[rid] else (0.0, float(tok), float(k))
            done[rid] = k + tok
        out.append(row)
    return out


def _overlapped(base: SimulatedRun, weights: np.ndarray) -> tuple[list[list[tuple[int, int, int, dict[str, float]]]], list[tuple[int, int, int, dict[str, float]]]]:
    """The overlapped pipeline's schedule (see the module docstring).

    Returns, per stage, ``(start_ns, end_ns, base step, tokens)`` of each micro-batch it ran,
    and per micro-batch ``(submit_ns, done_ns, base step, tokens)`` in the order it was handed over."""
    pp = len(weights)
    engine_of = {r["id"]: i % pp for i, r in enumerate(base.requests)}
    arrival = {r["id"]: r["start_ns"] for r in base.requests}
    free = [-(1 << 62)] * pp
    left = [-(1 << 62)] * pp  # when each virtual engine's last micro-batch left the last stage
    stages: list[list[tuple[int, int, int, dict[str, float]]]] = [[] for _ in range(pp)]
    micro: list[tuple[int, int, int, dict[str, float]]] = []
    for k, st in enumerate(base.steps):
        total = float(sum(st["requests"].values()))
        d = st["end_ns"] - st["start_ns"]
        if total <= 0 or d <= 0:
            continue
        parts: dict[int, dict[str, float]] = {}
        for rid, tok in st["requests"].items():
            parts.setdefault(engine_of[rid], {})[rid] = tok
        for v in sorted(parts):
            toks = parts[v]
            share = sum(toks.values()) / total
            submit = max(left[v], max(arrival[rid] for rid in toks))
            t = submit
            for s in range(pp):
                a = max(t, free[s])
                b = a + max(int(round(weights[s] * share * d)), 1)
                stages[s].append((a, b, k, toks))
                free[s] = t = b
            left[v] = t
            micro.append((submit, t, k, toks))
    return stages, micro


def simulate_parallel(*, tp: int = 4, pp: int = 1, seed: int = 0, idle_w: float = 90.0, idle_drift_w: float = 6.0,
                      power_model: PowerModel | None = None, board_spread: float = 0.05, overlap: bool = False,
                      stage_weights: Sequence[float] | None = None, **server: Any) -> ParallelRun:
    """Simulate one engine on ``tp * pp`` GPUs named ``gpu0..``, stage ``s`` on
    ``gpu{s*tp}..gpu{s*tp+tp-1}``. ``server``: the arguments of :func:`simulate_server`
    (``duration_s``, ``rate_per_s``, ``bursty``, ``timing``...) for the engine's schedule.
    ``board_spread``: GPUs' power laws differ by up to this fraction (and their idle by
    up to ``idle_w * board_spread``). ``overlap``: micro-batches overlap across stages (vLLM's
    pipeline parallelism); ``stage_weights``: each stage's share of a step's work (default:
    balanced). Deterministic given ``seed``."""
    if tp < 1 or pp < 1 or tp * pp > 64:
        raise ValueError(f"tp and pp must be >= 1 with tp * pp <= 64, got {tp!r}, {pp!r}")
    if stage_weights is not None and (len(stage_weights) != pp or not all(w > 0 for w in stage_weights)):
        raise ValueError(f"stage_weights must be {pp} positive numbers, got {stage_weights!r}")
    pm = power_model or PowerModel()
    base = simulate_server(seed=seed, idle_w=idle_w, idle_drift_w=idle_drift_w, power_model=pm, **server)
    rng = np.random.default_rng([seed, tp, pp])
    gpus = [f"gpu{k}" for k in range(tp * pp)]
    group = ",".join(gpus)
    s_start = np.array([s["start_ns"] for s in base.steps], dtype=np.int64)
    s_end = np.array([s["end_ns"] for s in base.steps], dtype=np.int64)
    pre, dec, ctx = _features(base)
    weights = np.full(pp, 1.0 / pp) if stage_weights is None else np.asarray(stage_weights, dtype=np.float64) / float(sum(stage_weights))
    base_requests = base.requests
    # per stage: step windows, features, step rows
    plan: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]] = []
    engine_steps: list[tuple[int, int, dict[str, float]]] = []
    if overlap and pp > 1:
        stages, micro = _overlapped(base, weights)
        ef = _entry_features(base)
        for stage, mbs in enumerate(stages):
            stage_gpus = ",".join(gpus[stage * tp:(stage + 1) * tp])
            a = np.array([m[0] for m in mbs], dtype=np.int64)
            b = np.array([m[1] for m in mbs], dtype=np.int64)
            f = np.zeros((len(mbs), 3))
            rows = []
            for n, (x, y, k, toks) in enumerate(mbs):
                # the step's token rate: the micro-batch's features per token at the step's tokens per
                # second, over the stage's time
                frac = (y - x) / max(int(s_end[k] - s_start[k]), 1)
                per_tok = np.sum([ef[k][rid] for rid in toks], axis=0) / sum(toks.values())
                f[n] = per_tok * sum(base.steps[k]["requests"].values()) * frac
                rows.append({"start_ns": int(x), "end_ns": int(y), "gpu": stage_gpus, "requests": toks})
            plan.append((a, b, f[:, 0], f[:, 1], f[:, 2], rows))
        # a request ends as long after its last micro-batch as it did after its last step
        last_step: dict[str, int] = {}
        for st in base.steps:
            for rid in st["requests"]:
                last_step[rid] = st["end_ns"]
        last_mb: dict[str, int] = {}
        for sub, done, _, toks in micro:
            for rid in toks:
                last_mb[rid] = max(last_mb.get(rid, 0), done)
        base_requests = [dict(r, end_ns=int(r["end_ns"] + last_mb[r["id"]] - last_step[r["id"]])) if r["id"] in last_mb else r
                         for r in base.requests]
        if base_requests and max(r["end_ns"] for r in base_requests) > base.end_ns:
            raise RuntimeError("the overlapped pipeline fell behind the simulated period")
        engine_steps = [(sub, done, toks) for sub, done, _, toks in micro]
    else:
        cum = np.concatenate(([0.0], np.cumsum(weights)))
        for stage in range(pp):
            if stage_weights is None:
                a = s_start + (s_end - s_start) * stage // pp
                b = s_start + (s_end - s_start) * (stage + 1) // pp
            else:
                a = s_start + np.round((s_end - s_start) * cum[stage]).astype(np.int64)
                b = s_start + np.round((s_end - s_start) * cum[stage + 1]).astype(np.int64)
            keep = b > a
            a, b = a[keep], b[keep]
            stage_gpus = ",".join(gpus[stage * tp:(stage + 1) * tp])
            rows = [{"start_ns": int(x), "end_ns": int(y), "gpu": stage_gpus, "requests": st["requests"]}
                    for x, y, st in zip(a.tolist(), b.tolist(), (s for s, k in zip(base.steps, keep.tolist()) if k))]
            w = weights[stage]
            plan.append((a, b, pre[keep] * w, dec[keep] * w, ctx[keep] * w, rows))
        engine_steps = [(int(s["start_ns"]), int(s["end_ns"]), s["requests"]) for s in base.steps]
    runs: dict[str, SimulatedRun] = {}
    steps: list[dict[str, Any]] = []
    for stage, (a, b, f_pre, f_dec, f_ctx, rows) in enumerate(plan):
        steps.extend(rows)
        others = [(o[0], o[1], o[5]) for k, o in enumerate(plan) if k != stage]
        for g in gpus[stage * tp:(stage + 1) * tp]:
            scale = 1.0 + board_spread * (2 * rng.random() - 1)
            law = dataclasses.replace(pm, active_w=pm.active_w * scale, compute_w=pm.compute_w * scale, memory_w=pm.memory_w * scale)
            idle_g = idle_w * (1.0 + board_spread * (2 * rng.random() - 1))
            runs[g] = _play(g, base, base_requests, a, b, f_pre, f_dec, f_ctx, rows, law, idle_g, idle_drift_w, rng, others)
    steps.sort(key=lambda r: r["start_ns"])
    requests = [dict(r, gpu=group) for r in base_requests]
    # whole steps on the group, as the hook reports them with a group given: from when the step
    # was handed over (or the one before came back, if later) to when it came back
    group_steps, prev = [], -(1 << 62)
    for sub, done, toks in engine_steps:
        a0 = max(sub, prev)
        if done > a0:
            group_steps.append({"start_ns": int(a0), "end_ns": int(done), "gpu": group, "requests": toks})
            prev = done
    truth = {r["id"]: {k: float(sum(run.truth[r["id"]][k] for run in runs.values())) for k in ("energy_j", "dynamic_j", "idle_j")}
             for r in base_requests}
    return ParallelRun(tp=tp, pp=pp, gpus=gpus, runs=runs, requests=requests, steps=steps, group_steps=group_steps, truth=truth,
                       total_j=float(sum(r.total_j for r in runs.values())),
                       truth_unattributed_j=float(sum(r.truth_unattributed_j for r in runs.values())),
                       engine_steps=engine_steps, overlap=bool(overlap and pp > 1), stage_weights=tuple(float(w) for w in weights))


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
