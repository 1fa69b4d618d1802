"""Loaders for the real A100 recording (skipped where the shared data is absent) and the example files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from wattspan import SampleKind

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_spec = importlib.util.spec_from_file_location("a100_bench", ROOT / "benchmarks" / "a100.py")
a100 = sys.modules.setdefault("a100_bench", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(a100)

needs_data = pytest.mark.skipif(not (DATA / "traces").is_dir(), reason="the shared A100 recording (../shared/data) is absent")


def test_piecewise_linear_integral_is_exact():
    t = np.array([0, 1_000_000_000, 3_000_000_000], dtype=np.int64)
    p = np.array([10.0, 30.0, 30.0])
    # a ramp 10 -> 30 W over 1 s, then flat 30 W
    e = a100.piecewise_linear_energy_j(t, p, np.array([0, 500_000_000, 0]), np.array([1_000_000_000, 2_000_000_000, 3_000_000_000]))
    assert np.allclose(e, [20.0, 0.5 * (20.0 + 30.0) * 0.5 + 30.0, 80.0])
    with pytest.raises(ValueError, match="span"):
        a100.piecewise_linear_energy_j(t, p, 0, 4_000_000_000)


@pytest.fixture(scope="module")
def run():
    return a100.load_a100(DATA)


@needs_data
class TestRecording:
    def test_parses_every_row(self, run):
        tr = run.nvsmi
        assert len(tr) == 965 and tr.power_kind == SampleKind.INSTANT and not tr.simulated
        assert tr.sensor == "nvidia-smi:power.draw.instant" and run.nvsmi_power_draw_w.shape == (965,)
        assert run.meter_t_ns.shape == run.meter_power_w.shape == (47735,)
        assert np.all(np.diff(run.meter_t_ns) > 0)
        assert 0.19 < np.median(np.diff(run.meter_t_ns)) / 1e6 < 0.22  # ~4.9 kHz
        assert 12 <= np.median(np.diff(tr.t_ns)) / 1e6 <= 15

    def test_pulses(self, run):
        assert run.pulses.shape == (76, 2)
        on = (run.pulses[:, 1] - run.pulses[:, 0]) / 1e6
        off = (run.pulses[1:, 0] - run.pulses[:-1, 1]) / 1e6
        assert np.allclose(on, 52.2, atol=2) and np.allclose(off, 52.1, atol=2)

    def test_clocks_are_aligned(self, run):
        """nvidia-smi's local UK summer time, the meter's epoch ms and the pulses' epoch us agree."""
        tr = run.nvsmi
        assert tr.t_ns[0] < run.pulses[0, 0] and run.pulses[-1, 1] < tr.t_ns[-1]
        assert run.meter_t_ns[0] < run.pulses[0, 0] and run.pulses[-1, 1] < run.meter_t_ns[-1]
        a, b = run.pulses[0, 0], run.pulses[-1, 1]
        meter_w = float(run.meter_energy_j(a, b)) / ((b - a) / 1e9)
        smi_w = float(a100.piecewise_linear_energy_j(tr.t_ns, tr.power_w, a, b)) / ((b - a) / 1e9)
        assert smi_w == pytest.approx(meter_w, rel=0.02)
        # the meter sees the square wave: ~191 W on, ~65 W off
        on_w = run.meter_energy_j(run.pulses[:, 0], run.pulses[:, 1]) / ((run.pulses[:, 1] - run.pulses[:, 0]) / 1e9)
        off_w = run.meter_energy_j(run.pulses[:-1, 1], run.pulses[1:, 0]) / ((run.pulses[1:, 0] - run.pulses[:-1, 1]) / 1e9)
        assert np.median(on_w) > 2 * np.median(off_w)

    def test_meter_energy_is_the_trapezoid_and_additive(self, run):
        t, p = run.meter_t_ns, run.meter_power_w
        assert float(run.meter_energy_j(t[0], t[-1])) == pytest.approx(np.trapezoid(p, (t - t[0]) / 1e9), rel=1e-12)
        a, c = t[10] + 12_345, t[-10] - 6_789
        b = (a + c) // 2
        assert float(run.meter_energy_j(a, c)) == pytest.approx(float(run.meter_energy_j(a, b) + run.meter_energy_j(b, c)), rel=1e-12)

    def test_naive_nvidia_smi_integration_misses_pulses(self, run):
        err = np.abs(a100.naive_pulse_errors(run))
        assert err.shape == (76,) and np.median(err) > 0.1

    def test_transient_recording_loads(self):
        tr = a100.load_a100(DATA, "transient")
        assert tr.pulses.shape == (1, 2) and len(tr.nvsmi) == 1245

    def test_unknown_recording(self):
        with pytest.raises(ValueError, match="5050"):
            a100.load_a100(DATA, "nope")

    def test_example_files(self, tmp_path):
        paths = a100.write_a100_example(DATA, tmp_path)
        assert sum(p.stat().st_size for p in paths.values()) < 300_000
        reqs = [json.loads(x) for x in paths["requests"].read_text().splitlines()]
        steps = [json.loads(x) for x in paths["batches"].read_text().splitlines()]
        meter = [json.loads(x) for x in paths["meter"].read_text().splitlines()]
        assert len(reqs) == len(steps) == len(meter) == 76
        assert [r["id"] for r in reqs] == [m["id"] for m in meter] == [next(iter(s["requests"])) for s in steps]
        assert all(r["route"] == "/square-wave" and s["requests"][r["id"]] == 1 for r, s in zip(reqs, steps))
        assert paths["trace"].read_text().splitlines()[0] == "time_ns,gpu,power_w"
        committed = ROOT / "examples" / "a100"
        if committed.is_dir():  # the committed copy is what the generator writes today
            for p in paths.values():
                assert (committed / p.name).read_bytes() == p.read_bytes(), f"regenerate examples/a100/{p.name}"
