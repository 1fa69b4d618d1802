"""Device groups: a request or a batch step that runs on several devices at once.

A tensor-parallel engine runs every step on all its GPUs; a pipeline-parallel one runs
each stage of a step on the stage's GPUs; a data-parallel replica is its own group. A
group is named by its members joined with commas (``"gpu0,gpu1,gpu2,gpu3"``, the
canonical form), written in the offline files as a list (``"gpu": ["gpu0", "gpu1"]``)
or as that string; a single device stays what it was (``"gpu0"`` or ``0``).

Attribution of groups (:func:`attribute_grouped`) expands every grouped request into one
request per member device and every grouped step into one step per member (the same
tokens: each member ran its share of the same step), runs the single-device
attribution on each member's own trace, and sums the members' parts per request.
So each device's books close on their own (requests + unattributed = measured, per
device) and the total is their sum; the per-device parts are kept in
``Attribution.parts`` for spans and metrics (``hw.id`` per device).

Pipeline stages: a step reported on the whole group is apportioned on every member
over the step's whole ``[start, end)``. Where the stages' own timings are known, report
one step per stage on the stage's devices instead (the vLLM hook does where vLLM exposes
them); otherwise the stage's energy in the step is placed by the whole step's timing,
which the reconciliation windows (tens of ms to seconds, longer than a step) make good
in total and only approximate inside a window.

A stage's waits: while one stage runs a (micro-)batch the others wait with their clocks
up, and that energy is the batch's. So each step is also handed, as an owner of waits, to
the devices its requests run on that it does not (``wait_owners``): a device's energy while
it waits during such a step goes to that step's requests by its tokens; a wait no step
covers (a lone GPU's host gap, a pipeline with nothing in its other stages) is shared by
time. In a pipeline that does not overlap, stage 0 waits in step k only while stage 1
runs step k, so the whole step on the group bills the same requests by the same tokens as
the stages' slices with their waits: the split needs no estimate of the power held in a
wait, which a stage's coarse readings cannot tell from its slices' (its waits are as long
as the other stage's slices).

What stays approximate on a stage, with its timing known: in an overlapped pipeline
consecutive slices on a stage belong to different micro-batches, so the electrical lag
moves part of one slice's energy into the next (another micro-batch's requests, by the
conventions). The fit models that lag where the readings can show it (50 ms apart or
closer; ``StepModel.lag_tau_s``); a coarser sensor cannot, and gets it as an input: the
board's lag measured once on fine readings (``attribute(..., board_lag_s=...)``, per member
device or one value; through it the waits' held power is bounded by the steps' and their
J-per-wait term left to the lag), or a model fitted on fine readings of the same GPU
(``models=``). Both pass through here to each member's fit unchanged.
``benchmarks/results/accuracy_parallel.md`` measures them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..devices import SEP, group_key, is_group, members

if TYPE_CHECKING:
    from ..samples import DeviceTrace
    from .inputs import Requests, Steps
    from .results import Attribution

__all__ = ["SEP", "any_group", "attribute_grouped", "group_key", "is_group", "members"]


def any_group(requests: Requests, steps: Steps | None) -> bool:
    """Whether any request or step names a group (the fast path checks this)."""
    for arr in (requests.device, steps.device if steps is not None else None):
        if arr is None or not len(arr):
            continue
        first = arr[0]
        if bool(np.all(arr == first)):  # one device named throughout: one look, not a set of millions
            if SEP in str(first):
                return True
            continue
        if any(SEP in d for d in set(arr.tolist())):
            return True
    return False


_QUALITY = {"good": 0, "coarse": 1, "misfit": 2}


def attribute_grouped(
    attribute: Callable[..., Attribution], traces: Mapping[str, DeviceTrace], requests: Requests,
    steps: Steps | None = None, **kw: Any,
) -> Attribution:
    """:func:`wattspan.attribution.attribute` over device groups (see the module docstring).

    ``attribute`` is the single-device function (passed in: this module sits below it)."""
    from .inputs import Requests, Steps
    from .results import Attribution

    n = len(requests)
    req_members = [members(d) for d in requests.device.tolist()]
    # (request, device) pairs: each request on each member of its group, and on each
    # device a step naming it ran on (a step's group may be wider than the request's)
    pair: dict[tuple[int, str], int] = {}
    orig: list[int] = []
    pdev: list[str] = []

    def row(i: int, d: str) -> int:
        k = pair.get((i, d))
        if k is None:
            k = pair[(i, d)] = len(orig)
            orig.append(i)
            pdev.append(d)
        return k

    for i, ms in enumerate(req_members):
        for d in ms:
            row(i, d)
    s_start: list[int] = []
    s_end: list[int] = []
    s_dev: list[str] = []
    e_step: list[int] = []
    e_req: list[int] = []
    e_tok: list[float] = []
    w_start: list[int] = []
    w_end: list[int] = []
    w_dev: list[str] = []
    w_step: list[int] = []
    w_req: list[int] = []
    w_tok: list[float] = []
    if steps is not None and len(steps):
        # entries grouped by step (CSR), expanded once per member device
        order = np.argsort(steps.entry_step, kind="stable")
        es, er, et = steps.entry_step[order], steps.entry_request[order], steps.entry_tokens[order]
        cuts = np.searchsorted(es, np.arange(len(steps) + 1))
        er_l, et_l = er.tolist(), et.tolist()
        starts, ends = steps.start_ns.tolist(), steps.end_ns.tolist()
        # the steps with an entry whose request names other devices than the step (a pipeline
        # stage's): only those can own waits elsewhere (a tensor-parallel step names its whole group)
        codes: dict[str, int] = {}
        r_code = np.array([codes.setdefault(k, len(codes)) for k in requests.device.tolist()], dtype=np.int64)
        s_code = np.array([codes.setdefault(k, len(codes)) for k in steps.device.tolist()], dtype=np.int64)
        other = np.zeros(len(steps), dtype=bool)
        other[steps.entry_step[r_code[steps.entry_request] != s_code[steps.entry_step]]] = True
        other_l = other.tolist()
        for s, d_key in enumerate(steps.device.tolist()):
            lo, hi = int(cuts[s]), int(cuts[s + 1])
            ms = members(d_key)
            for d in ms:
                k = len(s_start)
                s_start.append(starts[s])
                s_end.append(ends[s])
                s_dev.append(d)
                for j in range(lo, hi):
                    e_step.append(k)
                    e_req.append(row(er_l[j], d))
                    e_tok.append(et_l[j])
            if not other_l[s]:
                continue
            # the same step as an owner of the waits on its requests' other devices (a
            # pipeline's other stages wait while this one runs it)
            shadow: dict[str, list[int]] = {}
            for j in range(lo, hi):
                for d in req_members[er_l[j]]:
                    if d not in ms:
                        shadow.setdefault(d, []).append(j)
            for d, js in shadow.items():
                k = len(w_start)
                w_start.append(starts[s])
                w_end.append(ends[s])
                w_dev.append(d)
                for j in js:
                    w_step.append(k)
                    w_req.append(pair[(er_l[j], d)])
                    w_tok.append(et_l[j])
    orig_a = np.array(orig, dtype=np.int64)
    col: Callable[[np.ndarray | None], np.ndarray | None] = lambda c: None if c is None else c[orig_a]  # noqa: E731
    ids = requests.ids[orig_a]
    ex_req = Requests(ids=ids, start_ns=requests.start_ns[orig_a], end_ns=requests.end_ns[orig_a],
                      device=np.array(pdev, dtype=object), weight=requests.weight[orig_a],
                      route=col(requests.route), model=col(requests.model), tenant=col(requests.tenant))
    ex_steps = None
    if s_start:
        ex_steps = Steps(start_ns=np.array(s_start, dtype=np.int64), end_ns=np.array(s_end, dtype=np.int64),
                         device=np.array(s_dev, dtype=object), entry_step=np.array(e_step, dtype=np.int64),
                         entry_request=np.array(e_req, dtype=np.int64), entry_tokens=np.array(e_tok, dtype=np.float64))
    if w_start:
        kw["wait_owners"] = Steps(start_ns=np.array(w_start, dtype=np.int64), end_ns=np.array(w_end, dtype=np.int64),
                                  device=np.array(w_dev, dtype=object), entry_step=np.array(w_step, dtype=np.int64),
                                  entry_request=np.array(w_req, dtype=np.int64), entry_tokens=np.array(w_tok, dtype=np.float64))
    # the members that run another device's steps as their own (a group's whole steps): their
    # readings do not line up with those steps' times on any clock (a pipeline stage draws in its
    # slice of each), so no clock offset is searched there
    kw["shared_steps"] = {d for d_key in set(steps.device.tolist()) if is_group(d_key) for d in members(d_key)} \
        if steps is not None and len(steps) else set()
    res = attribute(traces, ex_req, ex_steps, **kw)

    def fold(x: np.ndarray) -> np.ndarray:
        return np.bincount(orig_a, weights=x, minlength=n)

    energy, dynamic, idle, dev_s = fold(res.energy_j), fold(res.dynamic_j), fold(res.idle_j), fold(res.device_s)
    # a member the traces lack gives no energy and coverage 0: the group's coverage is its lowest member's
    coverage = np.ones(n)
    np.minimum.at(coverage, orig_a, res.coverage)
    # the group's errors are correlated (the same steps on every member): the bands add
    low = fold(res.energy_j_low) if res.energy_j_low is not None else None
    high = fold(res.energy_j_high) if res.energy_j_high is not None else None
    method = np.full(n, "no-trace", dtype=object)
    quality = np.full(n, "good", dtype=object) if res.quality is not None else None
    for k, i in enumerate(orig):
        m = res.method[k]
        if m == "batch-fit" or method[i] == "no-trace":
            method[i] = m
        if quality is not None and res.quality is not None and _QUALITY.get(res.quality[k], 2) > _QUALITY.get(quality[i], 0):
            quality[i] = res.quality[k]
    parts = {"request": orig_a, "device": ex_req.device, "energy_j": res.energy_j, "dynamic_j": res.dynamic_j,
             "idle_j": res.idle_j, "device_s": res.device_s}
    out = Attribution(requests, energy, dynamic, idle, dev_s, coverage, method, res.devices, low, high, quality)
    return dataclasses.replace(out, parts=parts)
