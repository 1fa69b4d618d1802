"""The live meter's refit builds its requests' spans and its steps' columns at C speed (a thousand
requests in flight name a million entries a minute; a loop per entry held the GIL for a second):
the same spans and columns as the loops they replace, in time order or not."""

from __future__ import annotations

import random

import numpy as np
import pytest

from wattspan.attribution import Requests, Steps
from wattspan.meter.core import _steps_spans


def _rows(seed: int, ordered: bool):
    rng = random.Random(seed)
    rows, t = [], 10**12
    for i in range(300):
        tok = {f"r{rng.randint(0, 400)}": rng.randint(0, 9) for _ in range(rng.randint(1, 40))}
        rows.append((t, t + rng.randint(1, 9) * 10**6, ["gpu0", "gpu1", "gpu0,gpu1"][i % 3], tok))
        t += 10**7
    if not ordered:
        rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("ordered", [True, False])
def test_spans_are_the_loops(ordered):
    rows = _rows(1, ordered)
    want: dict = {"r1": [5, 6], "elsewhere": [1, 2]}
    got = {k: list(v) for k, v in want.items()}
    for s, e, _, tok in rows:
        for k in tok:
            if k not in want:
                want[k] = [s, e]
            else:
                ab = want[k]
                ab[0], ab[1] = min(ab[0], s), max(ab[1], e)
    _steps_spans(rows, got)
    assert got == want


@pytest.mark.parametrize("elsewhere", [False, True])
def test_steps_from_batches_are_the_loops(elsewhere):
    rows = _rows(2, True) + [(1, 2, "gpu0", {"nobody": 3})]  # a step naming only an unknown request: dropped
    ids = [f"r{i}" for i in range(0, 400, 2)]  # half the requests known: the others' entries left out
    n = len(ids)
    req = Requests(np.array(ids, dtype=object), np.zeros(n, dtype=np.int64), np.full(n, 10**15, dtype=np.int64),
                   np.full(n, "gpu0", dtype=object), np.ones(n))
    index = {r: i for i, r in enumerate(ids)}
    step, rq, tk, st = [], [], [], []
    for s, e, d, tok in rows:
        if (d == "gpu0" or "gpu0" in d.split(",")) == elsewhere:
            continue
        ent = [(index[r], float(v)) for r, v in tok.items() if r in index]
        if ent:
            step += [len(st)] * len(ent)
            rq += [i for i, _ in ent]
            tk += [v for _, v in ent]
            st.append(s)
    got = Steps.from_batches(rows, req, "gpu0", elsewhere=elsewhere)
    assert got.entry_step.tolist() == step and got.entry_request.tolist() == rq and got.entry_tokens.tolist() == tk
    assert got.start_ns.tolist() == st
    assert Steps.from_batches([(1, 2, "gpu0", {"nobody": 1})], req, "gpu0") is None
