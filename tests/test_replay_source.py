"""read_trace_csv's validation and ReplaySource's playback on the monotonic clock."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
from tests.fakes import A100_TRACE

from wattspan import DeviceTrace, InputError, SampleKind
from wattspan.sources.replay import ReplaySource, read_trace_csv

S = 1_000_000_000


def write(tmp_path, text: str, name="trace.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def a100_rows():
    with open(A100_TRACE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([int(r["time_ns"]) for r in rows]), np.array([float(r["power_w"]) for r in rows])


# --------------------------------------------------------------------------- reading


def test_reads_the_recorded_a100_trace():
    t, w = a100_rows()
    traces = read_trace_csv(A100_TRACE)
    assert list(traces) == ["gpu0"]
    tr = traces["gpu0"]
    assert isinstance(tr, DeviceTrace) and len(tr) == 200
    assert np.array_equal(tr.t_ns, t) and np.array_equal(tr.power_w, w)
    assert tr.energy_j is None and tr.power_kind == SampleKind.INSTANT
    assert tr.sensor == "trace:a100_power_instant.csv"


def test_interleaved_devices_energy_column_and_names(tmp_path):
    p = write(tmp_path, "time_ns,gpu,power_w,energy_j\n"
                        "100,0,50.5,10.0\n"
                        "100,gpu1,70,\n"
                        "150,cpu0-package,20,1.0\n"
                        "200, 0 ,60,15.5\n"       # " 0 " is device 0 too
                        "300,gpu1,75,3.25\n"
                        "300,cpu0-package,,2.0\n")  # a counter-only row
    tr = read_trace_csv(p)
    assert list(tr) == ["gpu0", "gpu1", "cpu0-package"]
    assert tr["gpu0"].t_ns.tolist() == [100, 200] and tr["gpu0"].power_w.tolist() == [50.5, 60.0]
    assert tr["gpu0"].energy_j.tolist() == [10.0, 15.5]
    assert np.isnan(tr["gpu1"].energy_j[0]) and tr["gpu1"].energy_j[1] == 3.25
    assert tr["cpu0-package"].power_w[0] == 20 and np.isnan(tr["cpu0-package"].power_w[1])


def test_average_power_kind_can_be_declared(tmp_path):
    p = write(tmp_path, "time_ns,gpu,power_w\n0,0,100\n1000000000,0,110\n")
    tr = read_trace_csv(p, power_kind=SampleKind.AVERAGE, window_ns=S)["gpu0"]
    assert tr.power_kind == SampleKind.AVERAGE and tr.window_ns == S


HEAD = "time_ns,gpu,power_w\n"


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("time_ns,gpu\n1,0\n", 1, "missing column 'power_w'"),
        ("time_ns,gpu,power_W\n1,0,5\n", 1, "missing column 'power_w'; unknown column 'power_W'"),
        ("time_ns,gpu,power_w,power_w\n1,0,5,5\n", 1, "column 'power_w' appears twice"),
        (HEAD + "1,0,5\n2,0,nan\n", 3, "power_w is NaN"),
        (HEAD + "1,0,5\n2,0,inf\n", 3, "power_w is inf"),
        (HEAD + "1,0,-3.5\n", 2, "power_w is negative (-3.5)"),
        (HEAD + "1,0,5\n2,0,5 W\n", 3, "power_w '5 W' is not a number"),
        (HEAD + "1,0,5\n2,0,9223372036854775808\n", 3, "power_w is 9.22337e+18, above the plausible 1e+06"),
        ("time_ns,gpu,power_w,energy_j\n1,0,5,1\n2,0,5,1e20\n", 3, "energy_j is 1e+20, above the plausible 1e+15"),
        (HEAD + "1,0,5\n2,0,\n", 3, "power_w is empty"),
        (HEAD + "1,0,5\n2.5,0,5\n", 3, "time_ns '2.5' is not an integer number of nanoseconds"),
        (HEAD + "1,0,5\n99999999999999999999,0,5\n", 3, "outside 0..2**63-1"),
        (HEAD + "-5,0,5\n", 2, "time_ns -5 is negative"),
        (HEAD + "1,0,5\n2,0\n", 3, "has 2 fields, the header has 3"),
        (HEAD + "1,0,5\n2,0,5,6\n", 3, "has 4 fields"),
        (HEAD + "1,,5\n", 2, "gpu is empty"),
        # gpu 1's rows interleave fine; gpu 0 goes back in time on line 5
        (HEAD + "10,0,5\n5,1,5\n20,0,5\n15,0,5\n", 5, "time_ns 15 for gpu0 is before the previous reading of that device (20 on line 4)"),
        (HEAD + "10,0,5\n10,1,5\n10,0,6\n", 4, "duplicate time_ns 10 for gpu0 (also on line 2)"),
        # a time no clock's nanoseconds reach from the first reading (attribution's time arithmetic would overflow)
        (HEAD + "1000,0,5\n2000,0,5\n9223372036854775807,0,5\n", 4, "time_ns 9223372036854775807 for gpu0: is 292 years after"),
        ("time_ns,gpu,power_w,energy_j\n1,0,5,1\n2,0,5,nan\n", 3, "energy_j is NaN (leave the cell empty"),
        ("time_ns,gpu,power_w,energy_j\n1,0,5,3\n2,0,5,\n3,0,5,2.5\n", 4, "energy_j 2.5 for gpu0 is less than the previous reading (3 on line 2)"),
        ("time_ns,gpu,power_w,energy_j\n1,0,5,3\n2,0,,\n", 3, "has neither power_w nor energy_j"),
        # a blank line is skipped but still counted
        (HEAD + "1,0,5\n\n3,0,nan\n", 4, "power_w is NaN"),
        ("", 0, "is empty"),
        ("\n\n", 0, "is empty"),
        (HEAD, 0, "has a header but no rows"),
    ],
)
def test_bad_traces_name_file_line_and_problem(tmp_path, text, line, message):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as exc:
        read_trace_csv(p)
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.line == line and err.path == str(p)
    assert message in str(err)
    assert str(err).startswith(f"{p}:{line}: " if line else f"{p}: ")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot open: No such file"):
        read_trace_csv(tmp_path / "nope.csv")


def test_a_million_rows_parse_in_seconds_and_errors_keep_their_line(tmp_path):
    n = 1_000_000
    t = 1_700_000_000_000_000_000 + np.arange(n // 4).repeat(4) * 10_000_000  # 4 GPUs, same instants
    gpu = np.tile(np.arange(4), n // 4)
    w = np.round(100 + 50 * np.sin(np.arange(n) / 1000), 2)
    body = "\n".join(f"{a},{b},{c}" for a, b, c in zip(t.tolist(), gpu.tolist(), w.tolist()))
    good = write(tmp_path, "time_ns,gpu,power_w\n" + body + "\n", "big.csv")
    t0 = time.perf_counter()
    traces = read_trace_csv(good)
    took = time.perf_counter() - t0
    assert list(traces) == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert sum(len(tr) for tr in traces.values()) == n
    assert traces["gpu3"].t_ns[-1] == t[-1]  # int64 exact: 1.7e18 does not fit a float64's mantissa
    assert np.array_equal(traces["gpu2"].power_w, w[2::4])
    print(f"\n1M rows parsed in {took:.2f} s (not asserted: a loaded CI machine's speed is no behaviour)")
    bad = write(tmp_path, "time_ns,gpu,power_w\n" + body + "\n" + f"{t[-1] + 1},0,nan\n", "bad.csv")
    with pytest.raises(InputError) as exc:
        read_trace_csv(bad)
    assert exc.value.line == n + 2 and "power_w is NaN" in str(exc.value)


# --------------------------------------------------------------------------- replaying


def collect(src, device="gpu0"):
    t, p, e = [], [], []
    for b in src.poll():
        if b.device != device:
            continue
        if b.kind == SampleKind.ENERGY:
            e.append((b.t_ns, b.value))
        else:
            t.append(b.t_ns)
            p.append(b.value)
    return t, p, e


def test_poll_returns_what_has_elapsed_on_the_monotonic_clock():
    rel, w = a100_rows()
    src = ReplaySource(A100_TRACE)
    (info,) = src.devices()
    assert info.id == "gpu0" and info.kind == "gpu" and info.sensor == "replay:trace:a100_power_instant.csv"
    assert not info.simulated and info.power_kind == SampleKind.INSTANT
    start = time.monotonic_ns() - S  # as if the replay began a second ago
    src.start(at_ns=start)
    (b,) = src.poll()
    now = time.monotonic_ns()
    k = b.t_ns.shape[0]
    assert np.array_equal(b.t_ns, start + rel[:k]) and np.array_equal(b.value, w[:k])
    assert rel[k - 1] <= now - start and (k == len(rel) or rel[k] > S)  # everything due, nothing early
    assert src.poll() == [] or src.poll()[0].t_ns[0] > b.t_ns[-1]
    assert not src.done


def test_real_time_replay_at_speed_plays_everything_once():
    rel, w = a100_rows()
    src = ReplaySource(A100_TRACE, speed=10.0)
    ts, ps = [], []
    deadline = time.monotonic() + 5
    while not src.done and time.monotonic() < deadline:
        t, p, _ = collect(src)
        ts += t
        ps += p
        time.sleep(0.01)
    assert src.done
    t = np.concatenate(ts)
    assert np.array_equal(np.concatenate(ps), w)
    assert np.all(np.diff(t) > 0)
    # trace time / 10 after the start, within the float rounding of one ns
    assert np.all(np.abs((t - src.start_ns) - rel / 10) <= 1)
    assert src.poll() == []


def test_loop_repeats_with_increasing_time_and_energy():
    t = np.arange(0, 100_000_000, 10_000_000)  # 10 readings, 10 ms apart
    p = np.full(10, 100.0)
    e = np.arange(10) * 1.0  # 100 W for 10 ms = 1 J per step
    src = ReplaySource([DeviceTrace("gpu0", t, p, e)], loop=True, speed=1.0)
    assert src.period_ns == 100_000_000
    start = time.monotonic_ns() - 345_000_000  # three and a half laps ago
    src.start(at_ns=start)
    before = time.monotonic_ns()
    got_t, got_p, got_e = collect(src)
    after = time.monotonic_ns()
    tt = np.concatenate(got_t)
    ee = np.concatenate([v for _, v in got_e])
    n = tt.shape[0]  # 3 full laps of 10 + the readings of the 4th lap that are due (35 unless the poll was slow)
    assert (before - start) // 10_000_000 + 1 <= n <= (after - start) // 10_000_000 + 1
    assert n >= 35
    assert np.array_equal(tt, start + np.arange(n) * 10_000_000)
    assert np.allclose(ee, np.arange(n) * 1.0)  # the counter carries on across laps
    assert not src.done


def test_a_poll_hands_out_copies_and_masks_only_traces_with_gaps():
    t = np.arange(0, 100_000_000, 10_000_000)  # 10 readings, 10 ms apart
    p = np.full(10, 100.0)
    e = np.arange(10) * 1.0
    src = ReplaySource([DeviceTrace("gpu0", t, p, e)])
    start = time.monotonic_ns() - S  # everything due
    src.start(at_ns=start)
    power, energy = src.poll()
    assert power.kind == SampleKind.INSTANT and energy.kind == SampleKind.ENERGY
    assert np.array_equal(power.t_ns, start + t) and np.array_equal(energy.t_ns, start + t)
    assert np.array_equal(power.value, p) and np.array_equal(energy.value, e)
    power.value[:] = -1.0  # a batch is the poll's own: writing into it leaves the trace as it was
    energy.value[:] = -1.0
    power.t_ns[:] = 0
    assert (p == 100.0).all() and np.array_equal(e, np.arange(10) * 1.0) and np.array_equal(t, np.arange(0, 100_000_000, 10_000_000))
    # a trace with gaps (NaN: no reading) still drops them, from each kind apart
    p2, e2 = p.copy(), e.copy()
    p2[3] = np.nan
    e2[[5, 6]] = np.nan
    src = ReplaySource([DeviceTrace("gpu0", t, p2, e2)])
    src.start(at_ns=start)
    power, energy = src.poll()
    assert np.array_equal(power.t_ns, start + np.delete(t, 3)) and np.array_equal(power.value, np.delete(p2, 3))
    assert np.array_equal(energy.t_ns, start + np.delete(t, [5, 6])) and np.array_equal(energy.value, np.delete(e2, [5, 6]))


def test_traces_in_memory_keep_their_kind_and_window():
    t = np.arange(5) * S
    avg = DeviceTrace("gpu3", t, np.full(5, 300.0), power_kind=SampleKind.AVERAGE, window_ns=S, sensor="nvidia-smi")
    host = DeviceTrace("cpu0-package", t, None, np.arange(5) * 40.0)
    src = ReplaySource({"gpu3": avg, "cpu0-package": host})
    infos = {d.id: d for d in src.devices()}
    assert infos["gpu3"].power_kind == SampleKind.AVERAGE and infos["gpu3"].window_ns == S
    assert infos["gpu3"].sensor == "replay:nvidia-smi"
    assert infos["cpu0-package"].kind == "cpu"
    src.start(at_ns=time.monotonic_ns() - 10 * S)
    kinds = {(b.device, b.kind, b.window_ns, b.t_ns.shape[0]) for b in src.poll()}
    assert kinds == {("gpu3", SampleKind.AVERAGE, S, 5), ("cpu0-package", SampleKind.ENERGY, 0, 5)}
    assert src.done


def test_bad_arguments():
    with pytest.raises(ValueError, match="speed"):
        ReplaySource(A100_TRACE, speed=0)
    with pytest.raises(TypeError):
        ReplaySource(42)
    with pytest.raises(ValueError, match="no traces"):
        ReplaySource({})


def test_device_trace_rejects_times_no_clock_reaches():
    """Built directly (the API, not a CSV): a reading 2^61 ns (73 years) after the first is refused by name
    rather than overflowing attribution's time arithmetic later."""
    with pytest.raises(ValueError, match="73.1 years after the first reading"):
        DeviceTrace("gpu0", np.array([0, 1, 2**61], dtype=np.int64), power_w=np.ones(3))
    assert len(DeviceTrace("gpu0", np.array([0, 1, 2**59], dtype=np.int64), power_w=np.ones(3))) == 3


def test_a_trace_csv_whose_counter_leaps_is_refused_with_its_line(tmp_path):
    from wattspan.errors import InputError
    from wattspan.sources.replay import read_trace_csv

    p = tmp_path / "t.csv"
    rows = [f"{i * 10_000_000},0,100,{i + (1e14 if i > 100 else 0)}" for i in range(200)]
    p.write_text("time_ns,gpu,power_w,energy_j\n" + "\n".join(rows) + "\n")
    with pytest.raises(InputError, match=r"t.csv:103: energy_j for gpu0 rises by 1e\+14 J from line 102 in 0.01 s") as e:
        read_trace_csv(p)
    assert "mJ for J?" in str(e.value)
    # a counter refreshed every 100 ms but read every 1 ms steps 100 ms of a 700 W board at once: a draw, kept
    rows = [f"{i * 1_000_000},0,700,{70.0 * (i // 100)}" for i in range(1000)]
    p.write_text("time_ns,gpu,power_w,energy_j\n" + "\n".join(rows) + "\n")
    assert read_trace_csv(p)["gpu0"].energy_j[-1] == 630.0
