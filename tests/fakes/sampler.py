"""A sampler whose newest reading the test moves: the meter's passes become deterministic.

It has only what the meter reads of a :class:`wattspan.sampler.Sampler` (``devices``, ``latest_ns``,
``trace``, ``start``, ``close``, ``health`` and ``sources``), and serves one fixed
:class:`~wattspan.samples.DeviceTrace` per device, cut to ``[since_ns, latest[device]]``.
"""

from __future__ import annotations

import dataclasses

from wattspan.samples import DeviceInfo, DeviceTrace


class CutSampler:
    sources: list[object] = []

    def __init__(self, traces: list[DeviceTrace], latest: int, *, kinds: dict[str, str] | None = None) -> None:
        self.traces = {tr.device: tr for tr in traces}
        self.latest = {tr.device: latest for tr in traces}  # device -> newest reading the meter may see (ns)
        self.start_at = {tr.device: int(tr.t_ns[0]) for tr in traces}  # device -> its first reading (ns)
        self.fail: dict[str, int] = {}  # device -> trace() calls left that raise
        kinds = kinds or {}
        self.infos = [DeviceInfo(tr.device, tr.device, kind=kinds.get(tr.device, "gpu"), sensor=tr.sensor,
                                 power_kind=tr.power_kind, window_ns=tr.window_ns) for tr in traces]

    def devices(self) -> list[DeviceInfo]:
        return self.infos

    def latest_ns(self, device: str) -> int:
        return self.latest[device]

    def trace(self, device: str, since_ns: int | None = None) -> DeviceTrace:
        if self.fail.get(device):
            self.fail[device] -= 1
            raise RuntimeError(f"sensor {device} failed")
        tr = self.traces[device]
        keep = (tr.t_ns >= max(since_ns or 0, self.start_at[device])) & (tr.t_ns <= self.latest[device])
        return dataclasses.replace(tr, t_ns=tr.t_ns[keep], power_w=None if tr.power_w is None else tr.power_w[keep],
                                   energy_j=None if tr.energy_j is None else tr.energy_j[keep])

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def health(self) -> dict[str, object]:
        return {}
