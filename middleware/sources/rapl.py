"""CPU package and DRAM energy from Linux powercap RAPL zones (``intel-rapl``, ``amd-rapl``).

Each package zone ``<type>:N`` named ``package-K`` becomes device ``cpuK-package``
(kind ``cpu``); its subzone ``<type>:N:M`` named ``dram`` becomes ``cpuK-dram``
(kind ``dram``). ``core``/``uncore`` (parts of the package) and ``psys`` (the
whole platform, overlapping the others) are not metered.
"""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np

from ..logs import LogOnce, get_logger
from ..samples import DeviceInfo, SampleBatch, SampleKind
from ._base import SourceUnavailable

__all__ = ["RaplSource"]

log = get_logger(__name__)

_ZONE = re.compile(r"^(intel-rapl|amd-rapl):(\d+)(?::(\d+))?$")


def _read_int(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return int(os.read(fd, 64))
    finally:
        os.close(fd)


def _read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as fh:
        return fh.read().strip()


class _Zone:
    """One RAPL zone: its counter file, wrap range and the unwrapped total (µJ since the first read)."""

    __slots__ = ("info", "path", "range_uj", "last_uj", "total_uj")

    def __init__(self, info: DeviceInfo, path: str, range_uj: int, first_uj: int) -> None:
        self.info = info
        self.path = path
        self.range_uj = range_uj
        self.last_uj = first_uj
        self.total_uj = 0


def _permission_help(root: str, denied: list[str]) -> str:
    return (
        f"RAPL energy counters are not readable by this user ({', '.join(denied[:3])}"
        f"{', ...' if len(denied) > 3 else ''}): since the fix for CVE-2020-8694 (Platypus) energy_uj is "
        "readable by root only. To meter the CPU, either run as root; or make the counters world-readable "
        f"until the next reboot with `sudo chmod o+r {root}/intel-rapl:*/energy_uj {root}/intel-rapl:*:*/energy_uj`; "
        "or make that permanent with a udev rule, e.g. /etc/udev/rules.d/99-rapl.rules containing "
        '`ACTION=="add", SUBSYSTEM=="powercap", RUN+="/bin/chmod o+r /sys%p/energy_uj"`; '
        "or give the Python binary the CAP_DAC_READ_SEARCH capability (setcap). "
        "Note that readable counters let local users run power side-channel attacks."
    )


class RaplSource:
    """A :class:`~wattspan.sources.PowerSource` for RAPL energy counters (ENERGY samples, joules).

    ``root``: the powercap class directory. Each poll reads every zone's
    ``energy_uj`` once (a few microseconds each); the counter wraps at
    ``max_energy_range_uj`` and is unwrapped here, so the reported value is the
    energy in joules since the source's first read.

    Attributes: ``errors`` (failed reads), ``skipped`` ({zone path: why not
    metered}), ``denied`` (``energy_uj`` files this user may not read).

    Raises :class:`SourceUnavailable` if no RAPL zone is exposed (not Linux,
    no driver, a VM or container that hides it) or the counters cannot be read
    (root-only since CVE-2020-8694; the message says how to allow it).
    """

    name = "rapl"

    def __init__(self, *, root: str = "/sys/class/powercap") -> None:
        self.root = str(root)
        self.errors = 0
        self._lock = threading.Lock()
        self._once = LogOnce(log)
        self._closed = False
        self._zones = self._discover()

    # ------------------------------------------------------------------ discovery

    def _candidates(self) -> list[tuple[str, int, int | None, str]]:
        """(path, package index N, subzone index M or None, zone type) for every RAPL zone found."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            raise SourceUnavailable(
                f"RAPL isn't exposed here: {self.root} does not exist (not Linux, or the powercap driver is not "
                "loaded: try `sudo modprobe intel_rapl_msr`; virtual machines and most cloud instances do not "
                "expose RAPL at all)"
            ) from None
        except PermissionError:
            raise SourceUnavailable(_permission_help(self.root, [self.root])) from None
        found: dict[str, tuple[str, int, int | None, str]] = {}

        def add(path: str, name: str) -> None:
            m = _ZONE.match(name)
            if not m or not os.path.isdir(path):
                return
            real = os.path.realpath(path)
            if real not in found:
                found[real] = (path, int(m.group(2)), None if m.group(3) is None else int(m.group(3)), m.group(1))

        for name in sorted(entries):
            path = os.path.join(self.root, name)
            add(path, name)
            if _ZONE.match(name):  # subzones also live inside their parent zone's directory
                try:
                    for sub in sorted(os.listdir(path)):
                        add(os.path.join(path, sub), sub)
                except OSError:
                    pass
        return sorted(found.values(), key=lambda z: (z[3], z[1], -1 if z[2] is None else z[2]))

    def _discover(self) -> list[_Zone]:
        zones: list[_Zone] = []
        denied: list[str] = []
        skipped: dict[str, str] = {}
        package_of: dict[tuple[str, int], int] = {}  # (type, N) -> K of its "package-K" name
        cands = self._candidates()
        named = []
        for path, n, m, typ in cands:
            try:
                zname = _read_text(os.path.join(path, "name"))
            except OSError as exc:
                skipped[path] = f"cannot read name: {exc.strerror or exc}"
                continue
            named.append((path, n, m, typ, zname))
            if m is None and (mk := re.fullmatch(r"package-(\d+)", zname)):
                package_of[(typ, n)] = int(mk.group(1))
        seen_ids: set[str] = set()
        for path, n, m, typ, zname in named:
            if m is None and zname.startswith("package-"):
                dev, kind = f"cpu{package_of[(typ, n)]}-package", "cpu"
            elif m is not None and zname == "dram":
                dev, kind = f"cpu{package_of.get((typ, n), n)}-dram", "dram"
            else:
                skipped[path] = f"zone {zname!r} is not metered (only package and dram)"
                continue
            if dev in seen_ids:  # the same package through both intel-rapl and amd-rapl
                skipped[path] = f"duplicate of {dev}"
                continue
            try:
                first = _read_int(os.path.join(path, "energy_uj"))
            except PermissionError:
                denied.append(os.path.join(path, "energy_uj"))
                continue
            except (OSError, ValueError) as exc:
                skipped[path] = f"energy_uj unreadable: {getattr(exc, 'strerror', None) or exc}"
                continue
            try:
                rng = _read_int(os.path.join(path, "max_energy_range_uj"))
                if rng <= 0:
                    raise ValueError(f"max_energy_range_uj is {rng}")
            except (OSError, ValueError) as exc:
                skipped[path] = f"max_energy_range_uj unreadable: {getattr(exc, 'strerror', None) or exc}"
                continue
            seen_ids.add(dev)
            info = DeviceInfo(
                id=dev,
                name=f"{typ} {zname}",
                kind=kind,
                sensor="rapl:energy_uj",
                power_kind=SampleKind.INSTANT,
                window_ns=0,
                extra={"zone": os.path.basename(path), "path": path, "max_energy_range_uj": rng},
            )
            zones.append(_Zone(info, os.path.join(path, "energy_uj"), rng, first))
        if denied and not zones:
            raise SourceUnavailable(_permission_help(self.root, denied))
        if not zones:
            detail = "; ".join(f"{os.path.basename(k)}: {v}" for k, v in skipped.items())
            raise SourceUnavailable(
                f"RAPL isn't exposed here: no readable package or dram zone under {self.root}"
                + (f" ({detail})" if detail else " (no intel-rapl or amd-rapl zones)")
                + ". Virtual machines and most cloud instances do not expose RAPL; on bare metal load the "
                "driver with `sudo modprobe intel_rapl_msr`."
            )
        if denied:
            log.warning("wattspan: %s", _permission_help(self.root, denied))
        self.skipped = skipped
        self.denied = denied
        return zones

    # ------------------------------------------------------------------ PowerSource

    def devices(self) -> list[DeviceInfo]:
        return [z.info for z in self._zones]

    def poll(self) -> list[SampleBatch]:
        """One ENERGY reading (J since the first read) per zone, stamped at the read."""
        out: list[SampleBatch] = []
        with self._lock:
            if self._closed:
                return out
            for z in self._zones:
                t0 = time.monotonic_ns()
                try:
                    raw = _read_int(z.path)
                except (OSError, ValueError) as exc:
                    self.errors += 1
                    self._once.warning((z.info.id, type(exc).__name__, str(exc)),
                                       "wattspan: RAPL read of %s failed: %s (counted in errors, will retry)", z.path, exc)
                    continue
                t = (t0 + time.monotonic_ns()) // 2
                delta = raw - z.last_uj
                if delta < 0:  # the counter wrapped at max_energy_range_uj
                    delta += z.range_uj
                z.last_uj = raw
                z.total_uj += delta
                out.append(SampleBatch(z.info.id, SampleKind.ENERGY, np.array([t], dtype=np.int64),
                                       np.array([z.total_uj * 1e-6])))
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
