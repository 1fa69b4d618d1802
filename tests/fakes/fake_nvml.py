"""A thin fake of nvidia-ml-py's own functions, for machines without an NVIDIA GPU.

It replaces only the C library behind ``pynvml``: the same function names and
parameters, the real ``pynvml`` structs (``c_nvmlFieldValue_t``,
``c_nvmlSample_t``, ``c_nvmlValue_t``) as return values, and the real
``pynvml.NVMLError`` subclasses as errors. Each fake GPU plays a power trace
(seconds, watts; stepwise, repeating) against the real clocks from the moment
it was created, so the code under test reads it exactly as it would a GPU:
wall-clock microsecond timestamps in the sample buffer, a millijoule counter
that integrates the trace, milliwatt power readings.

Use ``FakeNvml(...).install(monkeypatch)``: it monkeypatches these functions on
the real ``pynvml`` module.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pynvml

FUNCTIONS = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetSamples",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetUUID",
)

# what each API needs from the hardware (a GPU that lacks it raises NOT_SUPPORTED, as the driver does)
ENERGY, FIELD_INSTANT, SAMPLES, USAGE = "energy", "field-instant", "samples", "usage"
ALL = frozenset({ENERGY, FIELD_INSTANT, SAMPLES, USAGE})


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # maps to the matching NVMLError_* subclass


@dataclass
class FakeGpu:
    """One GPU. ``trace_t_s``/``trace_w``: a power trace (s from its start, W), played stepwise
    and repeated. ``supports``: which APIs answer. ``usage_window_s``: 1.0 for parts whose
    nvmlDeviceGetPowerUsage is a 1 s average (Ampere+ except GA100), 0 for an instant reading.
    ``sample_buffer``: how many power samples the driver keeps."""

    name: str
    arch: int | None
    trace_t_s: np.ndarray
    trace_w: np.ndarray
    supports: frozenset = ALL
    usage_window_s: float = 0.0
    sample_buffer: int = 120
    lost: bool = False
    uuid: str = ""  # "" -> GPU-00000000-0000-0000-0000-<index> (a MIG instance reports its parent GPU's)
    calls: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trace_t_s = np.asarray(self.trace_t_s, dtype=np.float64) - float(self.trace_t_s[0])
        self.trace_w = np.asarray(self.trace_w, dtype=np.float64)
        step = float(np.median(np.diff(self.trace_t_s))) if len(self.trace_t_s) > 1 else 0.01
        self.period_s = float(self.trace_t_s[-1]) + step
        dt = np.diff(np.append(self.trace_t_s, self.period_s))
        self._lap_j = float(np.sum(self.trace_w * dt))
        self._cum_j = np.concatenate(([0.0], np.cumsum(self.trace_w * dt)))[:-1]
        self.t0_wall_ns = time.time_ns()
        self.energy_at_start_mj = 123_456_789  # the counter runs since the driver loaded, not from 0

    # the trace as the hardware sees it, at wall time w (ns)
    def _pos(self, wall_ns: int) -> tuple[int, int]:
        s = (wall_ns - self.t0_wall_ns) / 1e9
        lap, r = divmod(s, self.period_s)
        k = int(np.searchsorted(self.trace_t_s, r, side="right")) - 1
        return int(lap), max(k, 0)

    def power_w(self, wall_ns: int) -> float:
        return float(self.trace_w[self._pos(wall_ns)[1]])

    def energy_j(self, wall_ns: int) -> float:
        """Energy since the fake started, J (exact integral of the stepwise trace)."""
        s = (wall_ns - self.t0_wall_ns) / 1e9
        lap, r = divmod(s, self.period_s)
        k = max(int(np.searchsorted(self.trace_t_s, r, side="right")) - 1, 0)
        return lap * self._lap_j + float(self._cum_j[k]) + float(self.trace_w[k]) * (r - float(self.trace_t_s[k]))

    def sample_times_us(self, wall_ns: int) -> np.ndarray:
        """Wall-clock µs of the driver's buffered power samples (the trace's own timestamps), newest last."""
        s = (wall_ns - self.t0_wall_ns) / 1e9
        laps = int(s // self.period_s)
        t = np.concatenate([self.trace_t_s + lap * self.period_s for lap in range(max(0, laps - 1), laps + 1)])
        t = t[t <= s][-self.sample_buffer :]
        return (self.t0_wall_ns // 1000 + np.round(t * 1e6)).astype(np.int64)


class _Handle:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml:
    """The fake library: ``gpus`` in NVML index order; ``init_error``: an NVML_ERROR_* code
    that nvmlInit fails with (no driver)."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.initialised = 0
        self.shutdowns = 0
        self.samples_asked_since: list[int] = []  # the timeStamp argument of each nvmlDeviceGetSamples call
        self._lock = threading.Lock()

    def install(self, monkeypatch) -> "FakeNvml":
        for name in FUNCTIONS:
            monkeypatch.setattr(pynvml, name, getattr(self, name))
        return self

    def _gpu(self, handle, api: str | None = None) -> FakeGpu:
        if self.initialised <= 0:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        g = self.gpus[handle.index]
        if g.lost:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        if api is not None:
            g.calls[api] = g.calls.get(api, 0) + 1
            if api not in g.supports:
                raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return g

    # ------------------------------------------------------------------ the pynvml API

    def nvmlInit(self):
        if self.init_error is not None:
            raise _err(self.init_error)
        with self._lock:
            self.initialised += 1
        return None

    def nvmlShutdown(self):
        with self._lock:
            if self.initialised <= 0:
                raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
            self.initialised -= 1
            self.shutdowns += 1
        return None

    def nvmlDeviceGetCount(self):
        if self.initialised <= 0:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if self.initialised <= 0:
            raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
        if not 0 <= index < len(self.gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle).uuid or f"GPU-00000000-0000-0000-0000-{handle.index:012d}"

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name  # pynvml decodes to str on Python 3

    def nvmlDeviceGetArchitecture(self, device):
        g = self._gpu(device)
        if g.arch is None:  # an old driver that does not know the architecture query
            raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return g.arch

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        g = self._gpu(handle, ENERGY)
        return g.energy_at_start_mj + int(g.energy_j(time.time_ns()) * 1000)

    def nvmlDeviceGetFieldValues(self, handle, fieldIds):
        g = self._gpu(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        now = time.time_ns()
        for v, fid in zip(values, fieldIds):
            try:
                v.fieldId, v.scopeId = fid
            except TypeError:
                v.fieldId = fid
            v.timestamp = now // 1000
            v.latencyUsec = 0
            if v.fieldId == pynvml.NVML_FI_DEV_POWER_INSTANT and FIELD_INSTANT in g.supports:
                g.calls[FIELD_INSTANT] = g.calls.get(FIELD_INSTANT, 0) + 1
                v.nvmlReturn = pynvml.NVML_SUCCESS
                v.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                v.value.uiVal = int(round(g.power_w(now) * 1000))
            else:
                v.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetSamples(self, device, sampling_type, timeStamp):
        g = self._gpu(device, SAMPLES)
        if sampling_type != pynvml.NVML_TOTAL_POWER_SAMPLES:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        self.samples_asked_since.append(int(timeStamp))
        now = time.time_ns()
        ts = g.sample_times_us(now)
        ts = ts[ts > timeStamp]
        if ts.shape[0] == 0:
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)  # what the driver says when nothing is newer
        out = []
        for t_us in ts.tolist():
            s = pynvml.c_nvmlSample_t()
            s.timeStamp = t_us
            s.sampleValue.uiVal = int(round(g.power_w(t_us * 1000) * 1000))
            out.append(s)
        return (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, out)

    def nvmlDeviceGetPowerUsage(self, handle):
        g = self._gpu(handle, USAGE)
        now = time.time_ns()
        if g.usage_window_s > 0:
            w = int(g.usage_window_s * 1e9)
            return int(round((g.energy_j(now) - g.energy_j(now - w)) / g.usage_window_s * 1000))
        return int(round(g.power_w(now) * 1000))
