"""The provisional estimate builds each step's basis by hand (per step, on the engine's thread): it must be
the row wattspan.attribution.family.basis makes for the same step and model parameters."""

from types import SimpleNamespace

import numpy as np
import pytest

from wattspan.attribution.family import BASIS, basis, basis_rates
from wattspan.meter.provisional import _NB, Provisional


def test_the_basis_has_the_width_provisional_tallies():
    assert _NB == len(BASIS)


@pytest.mark.parametrize("tokens", [{"a": 512.0}, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 300.0, "b": 1.0}])
def test_provisional_step_row_matches_family_basis(tokens):
    rng = np.random.default_rng(0)
    steps = np.column_stack([rng.uniform(0.005, 0.05, 200), rng.integers(0, 800, 200),
                             rng.integers(0, 40, 200), rng.uniform(0, 30, 200)]).astype(float)
    rates = basis_rates(steps, 4.0)
    assert len(rates) == 7  # throughputs, decode weight, four knees
    meter = SimpleNamespace(_models={"gpu0": SimpleNamespace(rates=rates)})
    prov = Provisional(meter)  # type: ignore[arg-type]
    for rid in tokens:
        prov.open(rid)
    start, end = 1_000_000_000, 1_020_000_000
    prov.observe_step(start, end, "gpu0", tokens)
    dur = (end - start) * 1e-9
    pre = sum(n for n in tokens.values() if n > 1.0)
    dec = sum(n for n in tokens.values() if n <= 1.0)
    ctxk = sum(n for n in tokens.values() if n <= 1.0) / 1000.0  # each decoding request's context (0) + its token
    row, _ = basis(np.array([[dur, pre, dec, ctxk]]), rates)
    total = sum(tokens.values())
    for rid, n in tokens.items():
        t = prov._tally[rid]
        base = 4 if n > 1.0 else 4 + _NB
        np.testing.assert_allclose(t[base:base + _NB], row[0] * (n / total), rtol=1e-12, atol=1e-15)
