"""The ground-truth simulator: scheduler, power, truth by wattspan's conventions, sensors, files."""

from __future__ import annotations

import csv
import json
import time
from collections import defaultdict

import numpy as np
import pytest

from wattspan import SampleKind
from wattspan.simulate import (
    PRESETS,
    PowerModel,
    SensorSpec,
    StepTiming,
    run_from_power,
    sense,
    simulate_server,
    write_files,
)

_MS = 1_000_000


@pytest.fixture(scope="module")
def run():
    return simulate_server(seed=3, duration_s=20.0)


@pytest.fixture(scope="module")
def sparse_run():
    return simulate_server(seed=4, duration_s=20.0, rate_per_s=0.5)


def reference_truth(run):
    """The conventions, written out the slow way: segment by segment, request by request."""
    reqs, steps = run.requests, run.steps
    bounds = sorted({run.start_ns, run.end_ns} | {r["start_ns"] for r in reqs} | {r["end_ns"] for r in reqs}
                    | {s["start_ns"] for s in steps} | {s["end_ns"] for s in steps})
    dyn, idle = defaultdict(float), defaultdict(float)
    unattributed = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        total = float(run.energy_j(a, b))
        d = float(run.energy_j(a, b, dynamic=True))
        live = [r["id"] for r in reqs if r["start_ns"] <= a < r["end_ns"]]
        if not live:
            unattributed += total
            continue
        for i in live:
            idle[i] += (total - d) / len(live)
        step = next((s for s in steps if s["start_ns"] <= a < s["end_ns"]), None)
        if step is None:
            for i in live:
                dyn[i] += d / len(live)
        else:
            tokens = sum(step["requests"].values())
            for i, k in step["requests"].items():
                dyn[i] += d * k / tokens
    return dyn, idle, unattributed


class TestTruth:
    def test_conservation(self, run, sparse_run):
        """Request energies plus unattributed energy add up to the total energy."""
        for r in (run, sparse_run):
            s = sum(v["energy_j"] for v in r.truth.values())
            assert abs(s + r.truth_unattributed_j - r.total_j) <= 1e-9 * r.total_j
            assert r.total_j == pytest.approx(float(r.energy_j(r.start_ns, r.end_ns)), rel=1e-12)
            for v in r.truth.values():
                assert v["energy_j"] == pytest.approx(v["dynamic_j"] + v["idle_j"], rel=1e-12)
        # sparse traffic leaves idle stretches, whose energy nobody owns
        assert sparse_run.truth_unattributed_j > 0.05 * sparse_run.total_j

    @pytest.mark.parametrize("kw", [dict(seed=5, rate_per_s=6.0), dict(seed=6, rate_per_s=10.0, max_batch_tokens=512)])
    def test_matches_conventions_computed_independently(self, kw):
        """Per-step token split, equal time-sharing and idle shares agree with a direct computation.
        A step's energy is what it makes the board draw (causal): the lag moves when, not whose, so
        the truth is the same for any lag, and on a board without one (nor noise) it is what the
        power integrates to inside each step's window (to the 0.1 ms grid's resolution)."""
        lagged = simulate_server(duration_s=2.5, power_model=PowerModel(tau_s=0.008), **kw)
        r = simulate_server(duration_s=2.5, power_model=PowerModel(tau_s=1e-9, noise_w=0.0), **kw)
        assert len(r.requests) >= 5 and len(r.steps) >= 50
        assert lagged.truth == r.truth
        assert not np.array_equal(lagged.true_power_w, r.true_power_w)
        dyn, idle, unattributed = reference_truth(r)
        tol = 1e-9 * r.total_j
        for rid, v in r.truth.items():
            assert abs(v["dynamic_j"] - dyn[rid]) <= 0.01 * dyn[rid]
            assert abs(v["idle_j"] - idle[rid]) <= tol
        assert abs(r.truth_unattributed_j - unattributed) <= 1e-3 * r.total_j

    def test_step_energy_split_by_tokens(self, run):
        """Inside one step, two requests' dynamic shares are in the ratio of their tokens."""
        multi = next(s for s in run.steps if len(set(s["requests"].values())) > 1)
        e = float(run.energy_j(multi["start_ns"], multi["end_ns"], dynamic=True))
        total = sum(multi["requests"].values())
        shares = {i: e * k / total for i, k in multi["requests"].items()}
        assert sum(shares.values()) == pytest.approx(e)
        (a, ka), (b, kb) = sorted(multi["requests"].items(), key=lambda x: x[1])[::len(multi["requests"]) - 1]
        assert ka != kb and shares[a] / shares[b] == pytest.approx(ka / kb)

    def test_energy_windows_are_additive(self, run):
        a, c = run.start_ns + 123_456, run.end_ns - 987_654
        b = (a + c) // 2 + 31
        assert float(run.energy_j(a, c)) == pytest.approx(float(run.energy_j(a, b) + run.energy_j(b, c)), rel=1e-12)
        assert np.all(run.energy_j(np.array([a, b]), np.array([b, c]), dynamic=True) < run.energy_j(np.array([a, b]), np.array([b, c])))


class TestScheduler:
    def test_rows_have_the_file_schema(self, run):
        assert all(set(r) == {"id", "start_ns", "end_ns", "gpu", "prompt_tokens", "output_tokens", "route", "model", "tenant"}
                   for r in run.requests)
        assert all(set(s) == {"start_ns", "end_ns", "gpu", "requests"} for s in run.steps)
        assert run.start_ns >= 10**12 and all(isinstance(r["start_ns"], int) for r in run.requests)

    @pytest.mark.parametrize("kw", [dict(), dict(max_batch_tokens=512, max_batch_size=8, rate_per_s=12.0)])
    def test_continuous_batching_invariants(self, kw):
        tm = StepTiming()
        r = simulate_server(seed=7, duration_s=10.0, **kw)
        mbt, mbs = kw.get("max_batch_tokens", 4096), kw.get("max_batch_size", 64)
        by_id = {q["id"]: q for q in r.requests}
        tokens, last_end, chunks = defaultdict(int), {}, defaultdict(list)
        prev_end = 0
        for s in r.steps:
            assert s["end_ns"] > s["start_ns"] >= prev_end + tm.host_gap_min_ms * _MS - 1
            prev_end = s["end_ns"]
            assert 0 < sum(s["requests"].values()) <= mbt and len(s["requests"]) <= mbs
            for i, k in s["requests"].items():
                q = by_id[i]
                assert q["start_ns"] <= s["start_ns"] and s["end_ns"] <= q["end_ns"]
                tokens[i] += k
                last_end[i] = s["end_ns"]
                chunks[i].append(k)
        for q in r.requests:
            # prefill chunks cover the prompt; its last chunk yields token 1, then 1 token per decode step
            assert tokens[q["id"]] == q["prompt_tokens"] + q["output_tokens"] - 1
            assert tm.response_min_ms * _MS - 1 <= q["end_ns"] - last_end[q["id"]] <= tm.response_max_ms * _MS + 1
        if mbt == 512:
            assert any(len([c for c in cs if c > 1]) > 1 for cs in chunks.values()), "long prompts should be prefilled in chunks"

    def test_step_durations_are_realistic(self, run):
        d = np.array([s["end_ns"] - s["start_ns"] for s in run.steps]) / 1e6
        decode = np.array([s["end_ns"] - s["start_ns"] for s in run.steps if set(s["requests"].values()) == {1}]) / 1e6
        assert 8 <= np.median(decode) <= 30 and d.max() > 2 * np.median(decode)

    def test_bursty_arrivals_cluster(self):
        """ON/OFF arrivals: inter-arrival times vary more than a Poisson process's (CV 1), same mean rate."""
        def arrivals(bursty):
            r = simulate_server(seed=8, duration_s=120.0, rate_per_s=2.0, bursty=bursty)
            return np.diff([q["start_ns"] for q in r.requests]) / 1e9
        plain, bursty = arrivals(False), arrivals(True)
        assert 0.85 < plain.std() / plain.mean() < 1.15 < 1.4 < bursty.std() / bursty.mean()
        assert 1 / bursty.mean() == pytest.approx(2.0, rel=0.35)

    def test_deterministic_by_seed(self):
        a, b, c = (simulate_server(seed=s, duration_s=5.0) for s in (11, 11, 12))
        assert np.array_equal(a.true_power_w, b.true_power_w) and a.truth == b.truth and a.steps == b.steps
        assert len(a.requests) != len(c.requests) or not np.array_equal(a.true_power_w[:1000], c.true_power_w[:1000]) \
            or a.truth != c.truth

    def test_fast_enough(self):
        t = time.perf_counter()
        r = simulate_server(duration_s=60.0, rate_per_s=8.0)
        assert time.perf_counter() - t < 5.0 and len(r.requests) > 300

    @pytest.mark.parametrize("kw, word", [(dict(rate_per_s=0), "rate_per_s"), (dict(duration_s=-1), "duration_s"),
                                          (dict(prompt_tokens=(0, 1)), "prompt_tokens"), (dict(idle_w=695.0), "cap_w")])
    def test_bad_input_is_named(self, kw, word):
        with pytest.raises(ValueError, match=word):
            simulate_server(**kw)


class TestPower:
    def test_power_lags_steps_with_first_order_response(self):
        pm = PowerModel(noise_w=0.0, step_jitter_rel=0.0)
        r = simulate_server(seed=1, duration_s=0.5, rate_per_s=4.0, prompt_tokens=(2000, 0.0), power_model=pm)
        s = r.steps[0]
        assert list(s["requests"].values()) == [2000]
        target = float(pm.step_dynamic_w(duration_s=(s["end_ns"] - s["start_ns"]) * 1e-9, prefill_tokens=2000,
                                         decode_tokens=0, context_tokens=2000, idle_w=96.0))

        def dyn_at(t):
            j = (t - r.start_ns) // r.grid_ns
            return r.true_power_w[j] - r.idle_w[j]
        assert dyn_at(s["start_ns"] + 100_000) < 0.2 * target  # barely moved yet
        tau_ns = int(pm.tau_s * 1e9)
        assert dyn_at(s["start_ns"] + tau_ns) == pytest.approx((1 - np.exp(-1)) * target, rel=0.05)
        assert dyn_at(s["start_ns"] + 6 * tau_ns) == pytest.approx(target, rel=0.01)
        assert dyn_at(s["end_ns"] + 2 * tau_ns) < 0.5 * target  # falls after the step too

    def test_power_is_nonlinear_in_composition(self):
        pm = PowerModel()
        one = pm.step_dynamic_w(duration_s=0.1, prefill_tokens=1000, decode_tokens=0)
        two = pm.step_dynamic_w(duration_s=0.1, prefill_tokens=2000, decode_tokens=0)
        more_ctx = pm.step_dynamic_w(duration_s=0.012, prefill_tokens=0, decode_tokens=32, context_tokens=64000)
        less_ctx = pm.step_dynamic_w(duration_s=0.012, prefill_tokens=0, decode_tokens=32, context_tokens=8000)
        assert one < two < 2 * one - pm.active_w and more_ctx > less_ctx
        assert pm.step_dynamic_w(duration_s=0.001, prefill_tokens=1e6, decode_tokens=0, idle_w=100) == pytest.approx(600.0)

    def test_idle_baseline_drifts_with_load(self, run):
        assert run.idle_w[0] == pytest.approx(90.0, abs=0.01)
        assert 90.5 < run.idle_w.max() <= 96.0
        assert np.max(np.abs(np.diff(run.idle_w))) < 1e-3  # slowly: under a milliwatt per 0.1 ms


class TestSensors:
    @pytest.mark.parametrize("name", sorted(PRESETS))
    def test_trace_is_labelled(self, run, name):
        tr = sense(run, name)
        spec = PRESETS[name]
        assert tr.simulated and tr.sensor == f"simulated:{name}" and tr.device == run.gpu
        assert tr.power_kind == (SampleKind.AVERAGE if spec.power == "average" else SampleKind.INSTANT)
        assert tr.window_ns == (spec.window_ns if spec.power == "average" else 0)
        assert (tr.energy_j is not None) == spec.energy and tr.power_w is not None
        assert run.start_ns < tr.t_ns[0] and tr.t_ns[-1] < run.end_ns
        assert np.median(np.diff(tr.t_ns)) == pytest.approx(spec.period_ns, rel=0.01)

    def test_ideal_is_exact(self, run):
        tr = sense(run, "ideal-1ms")
        assert np.all(np.diff(tr.t_ns) == _MS)
        assert np.array_equal(tr.power_w, run.true_power_w[(tr.t_ns - run.start_ns) // run.grid_ns])

    def test_reads_are_late_by_a_fraction_of_a_millisecond(self, run):
        tr = sense(run, SensorSpec("j", 10 * _MS, jitter_ns=300_000))
        late = (tr.t_ns - run.start_ns) % (10 * _MS)
        assert 0.2 * _MS < np.mean(late) < 0.4 * _MS and np.all(late <= 2.5 * _MS)

    def test_hopper_average_is_rolling_mean_within_noise(self, run):
        tr = sense(run, "hopper-1s-average", seed=2)
        rolling = run.energy_j(tr.t_ns - 10**9, tr.t_ns) / 1.0
        resid = tr.power_w / rolling - 1
        assert abs(resid.mean()) < 0.003 and 0.005 < resid.std() < 0.02
        # and it is not the instant power: it smooths steps away
        inst = run.true_power_w[(tr.t_ns - run.start_ns) // run.grid_ns]
        assert np.std(tr.power_w) < 0.7 * np.std(inst)

    @pytest.mark.parametrize("name, repeat", [("energy-counter", 0.8), ("hopper-nvml", 0.8)])
    def test_energy_counter_monotone_quantised_and_right(self, run, name, repeat):
        tr = sense(run, name, seed=1)
        e = tr.energy_j
        assert np.all(np.diff(e) >= 0)
        assert np.allclose(e * 1000, np.round(e * 1000), atol=1e-4)
        assert np.mean(np.diff(e) == 0) == pytest.approx(repeat, abs=0.06)
        true = float(run.energy_j(tr.t_ns[0], tr.t_ns[-1]))
        assert (e[-1] - e[0]) == pytest.approx(true, rel=0.005)

    def test_part_time_power_covers_a_quarter_of_the_time(self):
        """1 ms spikes land in the 25 ms sub-window of a 100 ms refresh a quarter of the time."""
        rng = np.random.default_rng(0)
        power = np.zeros(600_000)  # 60 s at 0.1 ms
        for start in np.arange(0, 600_000 - 200, 200) + rng.integers(0, 100, size=2999):
            power[start:start + 10] = 1000.0
        r = run_from_power(power)

        def seen_fraction(coverage_ns):
            spec = SensorSpec("t", 100 * _MS, power="part-time", refresh_ns=100 * _MS, coverage_ns=coverage_ns,
                              noise_rel=0.0, jitter_ns=0)
            tr = sense(r, spec)
            seen = tr.power_w.sum() * coverage_ns * 1e-9
            return seen / float(r.energy_j(tr.t_ns[0] - 100 * _MS, tr.t_ns[-1]))
        assert 0.2 < seen_fraction(25 * _MS) < 0.3
        assert seen_fraction(100 * _MS) == pytest.approx(1.0, abs=0.02)

    def test_polling_faster_than_refresh_repeats_values(self, run):
        tr = sense(run, "nvml-poll-20ms")
        assert np.mean(np.diff(tr.power_w) != 0) == pytest.approx(0.2, abs=0.04)

    def test_noise_level(self, run):
        inst = sense(run, SensorSpec("n", 10 * _MS, noise_rel=0.015, jitter_ns=0), seed=5)
        truth = run.true_power_w[(inst.t_ns - run.start_ns) // run.grid_ns]
        assert np.std(inst.power_w / truth - 1) == pytest.approx(0.015, rel=0.1)

    def test_deterministic_by_seed(self, run):
        a, b, c = sense(run, "hopper-nvml", seed=1), sense(run, "hopper-nvml", seed=1), sense(run, "hopper-nvml", seed=2)
        assert np.array_equal(a.t_ns, b.t_ns) and np.array_equal(a.energy_j, b.energy_j) and np.array_equal(a.power_w, b.power_w)
        assert not np.array_equal(a.power_w, c.power_w)

    def test_bad_sensor_names_the_presets(self, run):
        with pytest.raises(ValueError, match="hopper-1s-average"):
            sense(run, "hopper-2s")
        with pytest.raises(ValueError, match="coverage_ns"):
            SensorSpec("x", _MS, power="part-time", refresh_ns=10, coverage_ns=20)


class TestFiles:
    def test_write_files_round_trip(self, run, tmp_path):
        tr = sense(run, "energy-counter")
        paths = write_files(run, tr, tmp_path / "out")
        assert set(paths) == {"trace", "requests", "batches", "truth"}
        with paths["trace"].open() as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["time_ns", "gpu", "power_w", "energy_j"] and len(rows) == len(tr)
        assert np.array_equal([int(x["time_ns"]) for x in rows], tr.t_ns)
        assert np.allclose([float(x["energy_j"]) for x in rows], tr.energy_j, rtol=0, atol=1e-6)
        reqs = [json.loads(line) for line in paths["requests"].read_text().splitlines()]
        steps = [json.loads(line) for line in paths["batches"].read_text().splitlines()]
        assert reqs == run.requests and steps == run.steps
        truth = [json.loads(line) for line in paths["truth"].read_text().splitlines()]
        summary = truth.pop()
        assert summary["id"] is None and summary["total_j"] == pytest.approx(run.total_j)
        assert sum(t["energy_j"] for t in truth) + summary["unattributed_j"] == pytest.approx(summary["total_j"], rel=1e-9)

    def test_power_only_trace_has_three_columns(self, run, tmp_path):
        paths = write_files(run, sense(run, "hopper-1s-average"), tmp_path)
        assert paths["trace"].read_text().splitlines()[0] == "time_ns,gpu,power_w"
