"""Step-model selection: families chosen by blocked time cross-validation, windows by held-out readings."""

from __future__ import annotations

import numpy as np
import pytest

from wattspan import Requests, Steps, attribute
from wattspan.sources.power_model import LAWS, PowerModel
from wattspan.attribution.family import BASIS, FAMILIES, KNEES, basis, correlation_lag, nnls_gram, select_family, select_window
from wattspan.simulate import sense, simulate_server


def test_basis_holds_energy_power_and_saturating_terms():
    x4 = np.array([[0.01, 100.0, 0.0, 0.0], [0.02, 0.0, 32.0, 25.6]])
    X, rates = basis(x4)
    assert X.shape == (2, len(BASIS))
    np.testing.assert_allclose(X[:, :4], x4)
    np.testing.assert_allclose(X[:, 4:7], x4[:, 1:4] * x4[:, :1])
    assert rates[1] == pytest.approx(4 * rates[0])
    assert np.all((X[:, 7:9] > 0) & (X[:, 7:9] <= x4[:, :1]))


def test_knees_are_a_concave_monotone_function_of_weighted_work():
    # the knees' terms are duration x min(prefill + w x decode, k): power that rises with the step's
    # work and bends at each knee; the weight counts a decoding request as w prefill tokens
    x4 = np.array([[0.01, 0.0, n, 0.0] for n in (1.0, 2.0, 4.0, 8.0, 16.0)] + [[0.02, p, 0.0, 0.0] for p in (50.0, 400.0, 2000.0)])
    X, rates = basis(x4, weight=4.0)
    assert rates[2] == 4.0 and len(rates) == 3 + len(KNEES)
    knees = np.array(rates[3:])
    assert np.all(np.diff(knees) > 0)
    work = x4[:, 1] + 4.0 * x4[:, 2]
    np.testing.assert_allclose(X[:, list(KNEES)], np.minimum(work[:, None], knees[None, :]) * x4[:, :1])
    # a heavier weight moves the decode steps' work up the knees; the same parameters give the same basis
    X16, r16 = basis(x4, weight=16.0)
    assert not np.allclose(X16[:5, list(KNEES)] / X16[:5, :1], X[:5, list(KNEES)] / X[:5, :1])
    np.testing.assert_allclose(basis(x4, rates)[0], X)
    # a model's parameters from before the knees (two throughputs) leave the knees' terms at 0
    assert not np.any(basis(x4, rates[:2])[0][:, list(KNEES)])


def test_knee_families_fit_a_square_root_power_law_better():
    # power = 40 W + 18 W x sqrt(work): concave in the step's work; the knees follow it
    rng = np.random.default_rng(3)
    n = 600
    dec = rng.integers(1, 40, n).astype(float)
    pre = np.where(rng.random(n) < 0.2, rng.integers(16, 1500, n), 0).astype(float)
    d = 0.006 + 3e-5 * pre + 5e-5 * dec
    x4 = np.column_stack((d, pre, dec, dec * 0.3))
    e = (40 + 18 * np.sqrt(pre + 4 * dec)) * d
    X, _ = basis(x4, weight=4.0)
    A, y = X, e * (1 + rng.normal(0, 0.002, n))  # a fine sensor: one reading per step
    sel = select_family(A, y)
    assert sel is not None and "knees" in sel.family
    assert sel.candidates[sel.family] < 0.8 * min(v for k, v in sel.candidates.items() if "knees" not in k)


def test_nnls_gram_clips_negative_coefficients():
    rng = np.random.default_rng(0)
    A = rng.random((200, 3))
    y = A @ np.array([2.0, -1.0, 0.5])
    x = nnls_gram(A.T @ A, A.T @ y)
    assert np.all(x >= 0) and x[1] == 0.0


@pytest.mark.parametrize(("truth", "family"), [((0, 1, 2, 3), "energy"), ((0, 4, 5, 6), "power")])
def test_select_family_finds_the_generating_family(truth, family):
    rng = np.random.default_rng(1)
    A = rng.random((400, len(BASIS)))
    coef = np.zeros(len(BASIS))
    coef[list(truth)] = rng.uniform(1, 2, len(truth))
    y = A @ coef + rng.normal(0, 0.01, 400)
    sel = select_family(A, y)
    assert sel.family == family
    assert sel.cv_error < 0.01 and sel.cv_r2 > 0.99
    assert set(sel.candidates) == set(FAMILIES) and "held-out" in sel.why


def test_families_the_readings_cannot_tell_apart_are_blended():
    # two terms that move together (a step's prefill and its duration, say): each family with one
    # of them fits the readings about as well, and neither alone has the right split; their
    # blend does, and predicts held-out readings far better than either. A family clearly worse
    # (over 5 % of the best held-out error) takes no part.
    rng = np.random.default_rng(7)
    n = 400
    base = rng.uniform(1, 2, n)
    A = np.column_stack((base * (1 + rng.normal(0, 0.05, n)), base * (1 + rng.normal(0, 0.05, n)), rng.uniform(1, 2, n)))
    truth = np.array([1.0, 1.0, 0.0])
    sel = select_family(A, A @ truth, families={"a": (0,), "b": (1,), "c": (2,)})
    s = sel.candidates
    assert set(sel.blend) == {"a", "b"} and sum(sel.blend.values()) == pytest.approx(1.0)
    assert s["c"] > 1.05 * min(s["a"], s["b"])
    # weights by held-out likelihood over the k = 10 blocks: (best / its error)^k
    assert sel.blend["a"] / sel.blend["b"] == pytest.approx((s["b"] / s["a"]) ** 10, rel=1e-9)
    np.testing.assert_allclose(sel.coef, sel.blend["a"] * sel.fits["a"] + sel.blend["b"] * sel.fits["b"])
    assert np.linalg.norm(sel.coef - truth) < 0.05 * min(np.linalg.norm(sel.fits[f] - truth) for f in "ab")
    assert sel.cv_error < 0.2 * min(s["a"], s["b"])  # the blend's own held-out error, on the same folds
    assert np.abs(sel.boot.mean(0) - sel.coef).max() < 0.05  # the band's bootstrap is about the blend
    assert "blended with the 1 other family" in sel.why


def test_a_family_the_readings_single_out_is_not_blended():
    rng = np.random.default_rng(1)
    A = rng.random((400, len(BASIS)))
    coef = np.zeros(len(BASIS))
    coef[[0, 4, 5, 6]] = rng.uniform(1, 2, 4)
    sel = select_family(A, A @ coef + rng.normal(0, 0.01, 400), families={f: FAMILIES[f] for f in ("energy", "power")})
    assert sel.family == "power" and sel.blend is None and "blended" not in sel.why


def test_select_family_refuses_too_few_rows():
    assert select_family(np.ones((5, len(BASIS))), np.ones(5)) is None


def test_window_short_for_clean_readings_long_for_noisy_ones():
    rng = np.random.default_rng(2)
    n = 2000
    t = np.arange(n, dtype=np.int64) * 10_000_000
    p = rng.uniform(1, 2, n)
    drift = 1 + 0.3 * np.sin(np.arange(n) / 50)  # the model is off by a slowly varying factor
    lengths = 10_000_000 * 2 ** np.arange(10)
    L_clean, _, _ = select_window(t, p * drift, p, 0, int(t[-1]) + 1, lengths)
    L_noisy, _, _ = select_window(t, p * (1 + 0.8 * rng.standard_normal(n)), p, 0, int(t[-1]) + 1, lengths)
    assert L_clean < 200_000_000 < L_noisy


def test_correlation_lag():
    rng = np.random.default_rng(3)
    white = rng.standard_normal(5000)
    assert correlation_lag(white) <= 1
    smooth = np.convolve(white, np.ones(50) / 50, mode="same")
    assert 20 < correlation_lag(smooth) < 60


def test_laws_are_distinct_and_valid():
    kw = dict(duration_s=np.array([0.011, 0.15]), prefill_tokens=np.array([0, 4096]), decode_tokens=np.array([32, 0]),
              context_tokens=np.array([25600, 4096]), idle_w=90.0)
    w = {name: pm.step_dynamic_w(**kw) for name, pm in LAWS.items()}
    for v in w.values():
        assert np.all((v > 100) & (v < 600))
    assert LAWS["capped"].step_dynamic_w(**kw).max() <= 400 - 90
    # energy-linear: doubling a step's duration at the same tokens lowers its power; power-linear: it does not
    long = dict(kw, duration_s=kw["duration_s"] * 2)
    assert np.all(LAWS["energy-linear"].step_dynamic_w(**long) < w["energy-linear"])
    np.testing.assert_allclose(LAWS["power-linear"].step_dynamic_w(**long), w["power-linear"])
    with pytest.raises(ValueError, match="law"):
        PowerModel(law="quadratic")


@pytest.mark.parametrize(("law", "family"), [("energy-linear", "energy"), ("power-linear", "power")])
def test_attribution_picks_the_law_it_sees(law, family):
    run = simulate_server(seed=2, duration_s=15.0, power_model=LAWS[law])
    req = Requests.from_records(run.requests)
    steps = Steps.from_records(run.steps, req)
    res = attribute([sense(run, "ideal-1ms", seed=1)], req, steps)
    m = res.devices["gpu0"].model
    assert m.family == family and m.cv_r2 > 0.7
    truth = np.array([run.truth[i]["energy_j"] for i in req.ids])
    assert np.quantile(np.abs(res.energy_j - truth) / truth, 0.95) < 0.02


@pytest.mark.parametrize("seed", range(3))
def test_nnls_from_a_guessed_set_is_nnls_gram_whatever_the_guess(seed):
    """The folds' and resamples' warm start: with the full fit's kept set, a wrong set or none,
    the answer is nnls_gram's own."""
    from wattspan.attribution.family import _nnls_from

    rng = np.random.default_rng(seed)
    for _ in range(200):
        n = int(rng.integers(2, 8))
        A = rng.normal(size=(40, n))
        y = A @ (rng.normal(size=n)) + rng.normal(scale=0.3, size=40)
        G, c = A.T @ A + 1e-9 * np.eye(n), A.T @ y
        want = nnls_gram(G, c)
        kept = np.flatnonzero(want > 0)
        wrong = np.flatnonzero(want <= 0)
        for guess in (kept, wrong, np.arange(n), np.zeros(0, dtype=np.int64)):
            np.testing.assert_allclose(_nnls_from(G, c, guess), want, rtol=1e-9, atol=1e-12)
