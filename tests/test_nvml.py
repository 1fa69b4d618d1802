"""NvmlSource against a thin fake of nvidia-ml-py's functions (no GPU here), played from a real A100 trace."""

from __future__ import annotations

import inspect
import logging
import time

import numpy as np
import pynvml
import pytest
from tests.fakes import A100_TRACE
from tests.fakes.fake_nvml import ENERGY, FIELD_INSTANT, FUNCTIONS, SAMPLES, USAGE, FakeGpu, FakeNvml

from wattspan import SampleKind
from wattspan.sources import SourceUnavailable
from wattspan.sources.nvml import NvmlSource

_T = np.loadtxt(A100_TRACE, delimiter=",", skiprows=1, usecols=(0, 2))
TRACE_S, TRACE_W = _T[:, 0] / 1e9, _T[:, 1]

A = pynvml


def gpu(name, arch, supports, usage_window_s=0.0, **kw) -> FakeGpu:
    return FakeGpu(name, arch, TRACE_S, TRACE_W, supports=frozenset(supports), usage_window_s=usage_window_s, **kw)


def wall_offset_ns() -> int:
    a = time.monotonic_ns()
    w = time.time_ns()
    return w - (a + time.monotonic_ns()) // 2


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake with the given GPUs; every source made in the test is closed after it."""
    made = []

    def make(*gpus, **kw) -> FakeNvml:
        fake = FakeNvml(list(gpus), **kw).install(monkeypatch)
        made.append(fake)
        return fake

    yield make


def by_kind(batches, device):
    out = {}
    for b in batches:
        if b.device == device:
            out.setdefault(b.kind, []).append(b)
    return out


# --------------------------------------------------------------------------- the fake is thin


def test_fake_has_the_real_functions_signatures():
    fake = FakeNvml([])
    for name in FUNCTIONS:
        real = inspect.signature(getattr(pynvml, name))
        mine = inspect.signature(getattr(fake, name))
        assert list(real.parameters) == list(mine.parameters), name


# --------------------------------------------------------------------------- probing


@pytest.mark.parametrize(
    "name, arch, supports, window_s, sensor, kind, window_ns",
    [
        # Hopper with a recent driver: energy counter + instant power field
        ("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT, SAMPLES, USAGE}, 1.0,
         "nvml:energy-counter+power-instant", SampleKind.INSTANT, 0),
        # Hopper on a driver without field 186 or the sample buffer: power usage is a 1 s average
        ("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, USAGE}, 1.0,
         "nvml:energy-counter+power-usage-avg1s", SampleKind.AVERAGE, 1_000_000_000),
        # GA100 is Ampere but its power usage is an instant reading
        ("NVIDIA A100-SXM4-80GB", A.NVML_DEVICE_ARCH_AMPERE, {ENERGY, USAGE}, 0.0,
         "nvml:energy-counter+power-usage", SampleKind.INSTANT, 0),
        ("NVIDIA A30", A.NVML_DEVICE_ARCH_AMPERE, {ENERGY, USAGE}, 0.0,
         "nvml:energy-counter+power-usage", SampleKind.INSTANT, 0),
        # other Ampere (GA102): averaged
        ("NVIDIA A10", A.NVML_DEVICE_ARCH_AMPERE, {ENERGY, USAGE}, 1.0,
         "nvml:energy-counter+power-usage-avg1s", SampleKind.AVERAGE, 1_000_000_000),
        # Volta: counter + the driver's sample buffer
        ("Tesla V100-SXM2-16GB", A.NVML_DEVICE_ARCH_VOLTA, {ENERGY, SAMPLES, USAGE}, 0.0,
         "nvml:energy-counter+power-samples", SampleKind.INSTANT, 0),
        # Pascal: no energy counter, instant power usage only
        ("Tesla P100-PCIE-16GB", A.NVML_DEVICE_ARCH_PASCAL, {USAGE}, 0.0,
         "nvml:power-usage", SampleKind.INSTANT, 0),
        # architecture query unavailable: decided from the name
        ("NVIDIA H100 PCIe", None, {USAGE}, 1.0, "nvml:power-usage-avg1s", SampleKind.AVERAGE, 1_000_000_000),
        ("Tesla T4", None, {USAGE}, 0.0, "nvml:power-usage", SampleKind.INSTANT, 0),
    ],
)
def test_each_gpu_gets_the_best_reading_it_has(nvml, name, arch, supports, window_s, sensor, kind, window_ns):
    nvml(gpu(name, arch, supports, usage_window_s=window_s))
    src = NvmlSource()
    try:
        (info,) = src.devices()
        assert info.id == "gpu0" and info.name == name and info.kind == "gpu" and not info.simulated
        assert info.sensor == sensor
        assert info.power_kind == kind and info.window_ns == window_ns
        probes = info.extra["probes"]
        assert probes["energy-counter"] == ("ok" if ENERGY in supports else "NVMLError_NotSupported: Not Supported")
        chosen = info.extra["power"]
        assert probes[chosen] == "ok"
        # every probe before the chosen one says why it failed; those after were not tried
        order = ["power-instant", "power-samples", "power-usage"]
        for p in order[: order.index(chosen)]:
            assert "NotSupported" in probes[p]
        for p in order[order.index(chosen) + 1 :]:
            assert probes[p] == "not tried"
        # and a poll gives readings of that kind
        time.sleep(0.03)
        got = by_kind(src.poll(), "gpu0")
        assert (SampleKind.ENERGY in got) == (ENERGY in supports)
        if chosen != "power-samples":  # the buffer may have nothing new yet
            assert got[kind][0].window_ns == window_ns
    finally:
        src.close()


def test_prefer_moves_a_power_probe_first(nvml):
    nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT, SAMPLES, USAGE}, 1.0))
    src = NvmlSource(prefer="usage")
    try:
        info = src.devices()[0]
        assert info.sensor == "nvml:energy-counter+power-usage-avg1s"
        assert info.extra["probes"]["power-instant"] == "not tried"
    finally:
        src.close()
    with pytest.raises(ValueError, match="prefer must be one of"):
        NvmlSource(prefer="fastest")


def test_indices_select_gpus_and_bad_ones_are_refused(nvml):
    fake = nvml(*(gpu(f"NVIDIA H100 #{i}", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, USAGE}, 1.0) for i in range(3)))
    src = NvmlSource(indices=[2, 0])
    try:
        assert [d.id for d in src.devices()] == ["gpu2", "gpu0"]
        assert [d.name for d in src.devices()] == ["NVIDIA H100 #2", "NVIDIA H100 #0"]
    finally:
        src.close()
    with pytest.raises(SourceUnavailable, match=r"0\.\.2"):
        NvmlSource(indices=[3])
    assert fake.initialised == 0  # the failed constructor released NVML


# --------------------------------------------------------------------------- readings


def test_energy_counter_is_reported_in_joules_of_the_trace(nvml):
    fake = nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, USAGE}, 1.0))
    g = fake.gpus[0]
    src = NvmlSource()
    try:
        readings = []
        for _ in range(8):
            time.sleep(0.04)
            (e,) = by_kind(src.poll(), "gpu0")[SampleKind.ENERGY]
            readings.append((int(e.t_ns[0]), float(e.value[0]), wall_offset_ns()))
        for t, joules, off in readings:
            # what the fake GPU's counter held at that moment: start value (mJ) + the trace's integral
            expect = g.energy_at_start_mj / 1000 + g.energy_j(t + off)
            assert joules == pytest.approx(expect, abs=0.02)  # 1 mJ truncation + µs of clock jitter at <=181 W
        t = np.array([r[0] for r in readings])
        e = np.array([r[1] for r in readings])
        assert np.all(np.diff(t) > 0) and np.all(np.diff(e) > 0)
        mean_w = (e[-1] - e[0]) / ((t[-1] - t[0]) / 1e9)
        assert TRACE_W.min() - 1 < mean_w < TRACE_W.max() + 1
    finally:
        src.close()


def test_counter_reset_by_a_driver_reload_keeps_energy_increasing(nvml):
    fake = nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY}, 1.0))
    src = NvmlSource()
    try:
        time.sleep(0.02)
        (e1,) = by_kind(src.poll(), "gpu0")[SampleKind.ENERGY]
        fake.gpus[0].energy_at_start_mj = 0  # the counter restarts near zero
        time.sleep(0.02)
        (e2,) = by_kind(src.poll(), "gpu0")[SampleKind.ENERGY]
        assert e2.value[0] > e1.value[0]
    finally:
        src.close()


def test_instant_field_readings_are_the_trace_at_their_timestamp(nvml):
    fake = nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT}, 1.0))
    g = fake.gpus[0]
    src = NvmlSource()
    try:
        seen = mismatched = 0
        for _ in range(10):
            time.sleep(0.02)
            got = by_kind(src.poll(), "gpu0").get(SampleKind.INSTANT, [])
            for b in got:
                t, w = int(b.t_ns[0]), float(b.value[0])
                assert w in TRACE_W  # W, from the fake's mW
                # the field's wall-clock µs timestamp, mapped onto the monotonic clock: the trace
                # there is the value read (unless a trace step lies within µs of clock jitter)
                mismatched += w != pytest.approx(g.power_w(t + wall_offset_ns()), abs=1e-3)
                seen += 1
        assert mismatched <= 1
        assert seen >= 5
    finally:
        src.close()


def test_sample_buffer_is_read_incrementally_without_duplicates(nvml):
    fake = nvml(gpu("Tesla V100-SXM2-16GB", A.NVML_DEVICE_ARCH_VOLTA, {ENERGY, SAMPLES, USAGE}))
    g = fake.gpus[0]
    src = NvmlSource()
    try:
        first_seen_us = fake.samples_asked_since[-1] if fake.samples_asked_since else 0
        t_all, w_all = [], []
        for _ in range(12):
            time.sleep(0.025)
            for b in by_kind(src.poll(), "gpu0").get(SampleKind.INSTANT, []):
                t_all.append(b.t_ns)
                w_all.append(b.value)
        t = np.concatenate(t_all)
        w = np.concatenate(w_all)
        assert t.shape[0] >= 10
        assert np.all(np.diff(t) > 0), "a sample was returned twice or out of order"
        # each call asked from the newest timestamp already returned
        asked = fake.samples_asked_since
        assert asked == sorted(asked) and asked[0] == 0
        # nothing missed: every driver sample between the probe and the last poll came back
        off = wall_offset_ns()
        wall_us = g.sample_times_us(int(t[-1]) + off + 1_000_000)
        probe_us = asked[1] if len(asked) > 1 else first_seen_us
        expected = wall_us[(wall_us > probe_us) & (wall_us <= (int(t[-1]) + off) // 1000 + 1000)]
        assert t.shape[0] == expected.shape[0]
        # timestamps mapped from wall µs onto the monotonic clock, within clock jitter
        assert np.max(np.abs((t + off) // 1000 - expected)) < 2000
        # and the values are the trace's, in W
        assert np.all(np.isin(np.round(w, 2), np.round(TRACE_W, 2)))
    finally:
        src.close()


# --------------------------------------------------------------------------- failures


def test_lost_gpu_is_logged_once_and_the_others_keep_reading(nvml, caplog):
    fake = nvml(gpu("NVIDIA H100 #0", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT}, 1.0),
                gpu("NVIDIA H100 #1", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT}, 1.0))
    src = NvmlSource()
    try:
        time.sleep(0.01)
        assert {b.device for b in src.poll()} == {"gpu0", "gpu1"}
        fake.gpus[1].lost = True
        caplog.set_level(logging.WARNING, logger="wattspan")
        for _ in range(5):
            time.sleep(0.005)
            batches = src.poll()  # never raises
            assert {b.device for b in batches} <= {"gpu0"}
        assert src.errors == 1
        lost = [r for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost) == 1 and "gpu1" in lost[0].getMessage()
        infos = {d.id: d for d in src.devices()}
        assert infos["gpu1"].extra["lost"] is True and infos["gpu0"].extra["lost"] is False
    finally:
        src.close()


def test_transient_error_is_counted_and_the_other_reading_still_arrives(nvml, caplog, monkeypatch):
    fake = nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT}, 1.0))
    src = NvmlSource()
    try:
        def timeout(handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", timeout)
        caplog.set_level(logging.WARNING, logger="wattspan")
        kinds = set()
        for _ in range(4):
            time.sleep(0.01)
            kinds |= {b.kind for b in src.poll()}
        assert kinds == {SampleKind.INSTANT}
        assert src.errors == 4
        assert len([r for r in caplog.records if "Timeout" in r.getMessage()]) == 1
        assert src.devices()[0].extra["lost"] is False
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", fake.nvmlDeviceGetTotalEnergyConsumption)
        assert SampleKind.ENERGY in {b.kind for b in src.poll()}
    finally:
        src.close()


def test_gpu_lost_at_startup_is_skipped(nvml):
    fake = nvml(gpu("NVIDIA H100 #0", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY}, 1.0),
                gpu("NVIDIA H100 #1", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY}, 1.0, lost=True))
    src = NvmlSource()
    try:
        assert [d.id for d in src.devices()] == ["gpu0"]
        assert "GpuIsLost" in src.skipped["gpu1"]
    finally:
        src.close()
    assert fake.initialised == 0


def test_no_driver_is_source_unavailable(nvml):
    nvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(SourceUnavailable, match="Driver Not Loaded") as exc:
        NvmlSource()
    assert "NVIDIA driver" in str(exc.value)


def test_no_driver_with_the_real_library():
    # the real nvidia-ml-py on this machine: without libnvidia-ml.so.1, nvmlInit raises
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - a machine with a GPU
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here")
    with pytest.raises(SourceUnavailable, match="NVML is not available"):
        NvmlSource()


def test_no_gpu_and_no_usable_reading_are_source_unavailable(nvml):
    fake = nvml()
    with pytest.raises(SourceUnavailable, match="found no GPU"):
        NvmlSource()
    assert fake.initialised == 0
    fake = nvml(gpu("Mystery GPU", A.NVML_DEVICE_ARCH_KEPLER, set()))
    with pytest.raises(SourceUnavailable, match="no GPU gave a power or energy reading"):
        NvmlSource()
    assert fake.initialised == 0


def test_close_releases_nvml_once_and_poll_after_close_is_empty(nvml):
    fake = nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, USAGE}, 1.0))
    src = NvmlSource()
    assert fake.initialised == 1
    src.close()
    src.close()
    assert fake.initialised == 0 and fake.shutdowns == 1
    assert src.poll() == []


def test_through_the_sampler_both_columns_are_collected(nvml):
    from wattspan.sampler import Sampler

    nvml(gpu("NVIDIA H100 80GB HBM3", A.NVML_DEVICE_ARCH_HOPPER, {ENERGY, FIELD_INSTANT}, 1.0))
    s = Sampler([NvmlSource()], interval_s=0.005).start()
    try:
        time.sleep(0.25)
        tr = s.trace("gpu0")
    finally:
        assert s.close()
    assert tr.sensor == "nvml:energy-counter+power-instant" and tr.power_kind == SampleKind.INSTANT
    assert len(tr) >= 10 and np.all(np.diff(tr.t_ns) > 0)
    assert np.isfinite(tr.power_w).sum() >= 5 and np.isfinite(tr.energy_j).sum() >= 5
    assert s.health()["poll_errors"] == {"nvml": 0}
