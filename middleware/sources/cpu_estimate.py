"""A labelled estimate of CPU power for machines where RAPL cannot be read.

Not a measurement: power is modelled from utilisation with the linear model of
the Cloud Carbon Footprint methodology (average cloud vCPU: 0.74 W at idle to
3.5 W at full load; cloudcarbonfootprint.org, "Methodology", compute
coefficients, Apache-2.0), read from ``/proc/stat``. Every output it touches
says ``cpu-estimate`` and ``simulated``.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..samples import DeviceInfo, SampleBatch, SampleKind
from ._base import SourceUnavailable

__all__ = ["CpuEstimateSource"]

CCF_MIN_W_PER_VCPU = 0.74
CCF_MAX_W_PER_VCPU = 3.5


class CpuEstimateSource:
    name = "cpu-estimate"

    def __init__(self, *, vcpus: int | None = None, min_w: float = CCF_MIN_W_PER_VCPU, max_w: float = CCF_MAX_W_PER_VCPU, stat: str = "/proc/stat") -> None:
        if not (0 <= min_w <= max_w):
            raise ValueError("CpuEstimateSource needs 0 <= min_w <= max_w (watts per vCPU)")
        self.vcpus = int(vcpus or os.cpu_count() or 1)
        self.min_w, self.max_w = float(min_w), float(max_w)
        self._stat = stat
        self.errors = 0
        try:
            self._last = self._read()
        except OSError as exc:
            raise SourceUnavailable(f"cannot read {stat} to estimate CPU power: {exc}") from None
        self._energy_j = 0.0
        self._last_t = time.monotonic_ns()
        self._info = DeviceInfo(
            id="cpu0-package",
            name=f"CPU, {self.vcpus} vCPU (estimated)",
            kind="cpu",
            sensor=f"cpu-estimate: utilisation x {self.min_w}-{self.max_w} W/vCPU (Cloud Carbon Footprint), not a measurement",
            simulated=True,
        )

    def _read(self) -> tuple[int, int]:
        with open(self._stat, "rb") as fh:
            f = fh.readline().split()[1:]
        vals = [int(x) for x in f]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    def devices(self) -> list[DeviceInfo]:
        return [self._info]

    def poll(self) -> list[SampleBatch]:
        now = time.monotonic_ns()
        try:
            total, idle = self._read()
        except OSError:
            self.errors += 1
            return []
        dt, di = total - self._last[0], idle - self._last[1]
        self._last = (total, idle)
        util = 1.0 - di / dt if dt > 0 else 0.0
        power = self.vcpus * (self.min_w + min(max(util, 0.0), 1.0) * (self.max_w - self.min_w))
        self._energy_j += power * (now - self._last_t) * 1e-9
        self._last_t = now
        t = np.array([now], dtype=np.int64)
        return [
            SampleBatch(self._info.id, SampleKind.INSTANT, t, np.array([power])),
            SampleBatch(self._info.id, SampleKind.ENERGY, t, np.array([self._energy_j])),
        ]

    def close(self) -> None:
        pass
