"""RaplSource on a powercap tree of real files laid out like /sys/class/powercap."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import pytest

from wattspan import SampleKind
from wattspan.sources import SourceUnavailable
from wattspan.sources.rapl import RaplSource

RANGE = 262_143_328_850  # a real package's max_energy_range_uj


def zone(root, rel, name, energy_uj=0, range_uj=RANGE, link=True):
    """A zone directory (nested like sysfs) plus, for subzones, the top-level symlink sysfs has."""
    d = os.path.join(root, rel)
    os.makedirs(d, exist_ok=True)
    for f, v in (("name", name), ("energy_uj", energy_uj), ("max_energy_range_uj", range_uj)):
        with open(os.path.join(d, f), "w") as fh:
            fh.write(f"{v}\n")
    base = os.path.basename(rel)
    if link and rel != base:
        os.symlink(os.path.join(root, rel), os.path.join(root, base))
    return d


def set_energy(zdir, uj):
    with open(os.path.join(zdir, "energy_uj"), "w") as fh:
        fh.write(f"{uj}\n")


def machine(root, packages=1, vendor="intel-rapl"):
    """A typical server: per package a package zone, its core and dram subzones; plus psys."""
    os.makedirs(os.path.join(root, vendor), exist_ok=True)  # the control type directory
    with open(os.path.join(root, vendor, "enabled"), "w") as fh:
        fh.write("1\n")
    zones = {}
    for n in range(packages):
        zones[f"cpu{n}-package"] = zone(root, f"{vendor}:{n}", f"package-{n}", 1_000_000 * (n + 1))
        zone(root, f"{vendor}:{n}/{vendor}:{n}:0", "core", 5)
        zones[f"cpu{n}-dram"] = zone(root, f"{vendor}:{n}/{vendor}:{n}:1", "dram", 7_000 * (n + 1), range_uj=65_712_999_613)
    zone(root, f"{vendor}:{packages}", "psys", 3)
    return zones


def energies(batches):
    out = {}
    for b in batches:
        assert b.kind == SampleKind.ENERGY and b.t_ns.shape == (1,)
        out[b.device] = float(b.value[0])
    return out


def test_package_and_dram_zones_become_devices(tmp_path):
    machine(str(tmp_path), packages=2)
    src = RaplSource(root=str(tmp_path))
    infos = {d.id: d for d in src.devices()}
    assert list(infos) == ["cpu0-package", "cpu0-dram", "cpu1-package", "cpu1-dram"]
    assert infos["cpu0-package"].kind == "cpu" and infos["cpu1-dram"].kind == "dram"
    assert all(d.sensor == "rapl:energy_uj" and not d.simulated for d in infos.values())
    assert infos["cpu1-dram"].extra["zone"] == "intel-rapl:1:1"
    assert infos["cpu0-dram"].extra["max_energy_range_uj"] == 65_712_999_613
    # core (part of the package) and psys (the whole platform) are not metered
    assert "core" not in {d.name.split()[-1] for d in infos.values()}
    src.close()


def test_energy_is_joules_since_the_first_read(tmp_path):
    zones = machine(str(tmp_path))
    src = RaplSource(root=str(tmp_path))
    first = energies(src.poll())
    assert first == {"cpu0-package": 0.0, "cpu0-dram": 0.0}
    set_energy(zones["cpu0-package"], 1_000_000 + 2_500_000)
    set_energy(zones["cpu0-dram"], 7_000 + 125)
    second = energies(src.poll())
    assert second["cpu0-package"] == pytest.approx(2.5)
    assert second["cpu0-dram"] == pytest.approx(125e-6)
    src.close()
    assert src.poll() == []


def test_counter_wraparound_is_unwrapped(tmp_path):
    rng = 1_000_000  # a 1 J counter, to wrap quickly
    d = zone(str(tmp_path), "intel-rapl:0", "package-0", 900_000, range_uj=rng)
    src = RaplSource(root=str(tmp_path))
    steps = [950_000, 100_000, 600_000, 50_000, 49_000 + 0]  # wraps twice, and the last is a full lap minus 1 mJ
    expected = [50_000, 50_000 + 150_000, 50_000 + 150_000 + 500_000, 700_000 + 450_000, 1_150_000 + 999_000]
    got = []
    for uj in steps:
        set_energy(d, uj)
        got.append(energies(src.poll())["cpu0-package"])
    assert np.allclose(got, np.array(expected) / 1e6)
    assert np.all(np.diff(got) > 0)


def test_timestamps_are_monotonic_and_increasing(tmp_path):
    machine(str(tmp_path))
    src = RaplSource(root=str(tmp_path))
    t = [int(b.t_ns[0]) for _ in range(5) for b in src.poll() if b.device == "cpu0-package"]
    assert np.all(np.diff(t) > 0)


def test_amd_rapl_zones_are_read_too(tmp_path):
    machine(str(tmp_path), vendor="amd-rapl")
    src = RaplSource(root=str(tmp_path))
    assert {d.id for d in src.devices()} == {"cpu0-package", "cpu0-dram"}
    assert src.devices()[0].name.startswith("amd-rapl")


def test_no_zones_says_rapl_is_not_exposed(tmp_path):
    with pytest.raises(SourceUnavailable, match="RAPL isn't exposed.*does not exist"):
        RaplSource(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceUnavailable, match="RAPL isn't exposed.*no intel-rapl or amd-rapl zones"):
        RaplSource(root=str(tmp_path / "empty"))
    # a zone whose energy_uj is a directory cannot be read: honest IsADirectoryError, reported by name
    d = zone(str(tmp_path / "odd"), "intel-rapl:0", "package-0")
    os.remove(os.path.join(d, "energy_uj"))
    os.mkdir(os.path.join(d, "energy_uj"))
    with pytest.raises(SourceUnavailable, match="intel-rapl:0: energy_uj unreadable"):
        RaplSource(root=str(tmp_path / "odd"))


def _as_nobody(fn) -> tuple[int, str]:
    """Run ``fn()`` (returning a str) in a forked child that has dropped root: file permissions
    do not stop root (CAP_DAC_OVERRIDE), so this is the honest way to meet the root-only
    energy_uj that kernels expose since the CVE-2020-8694 fix. Returns (status, text): 0 when fn
    returned, 1 when it raised SourceUnavailable (text: its message), 3 when privileges could not
    be dropped here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 2
        try:
            os.close(r)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except PermissionError as exc:
                msg, code = f"cannot drop privileges: {exc}", 3
            else:
                try:
                    msg, code = fn(), 0
                except SourceUnavailable as exc:
                    msg, code = str(exc), 1
        except BaseException as exc:
            msg = f"{type(exc).__name__}: {exc}"
        os.write(w, msg.encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


def unprivileged(fn) -> tuple[int, str]:
    """``fn()`` as a user who cannot read root-only files: this process if not root, else a forked child."""
    if os.geteuid() != 0:
        try:
            return 0, fn()
        except SourceUnavailable as exc:
            return 1, str(exc)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, Python >= 3.12
        code, text = _as_nobody(fn)
    if code == 3:
        pytest.skip(text)
    assert code in (0, 1), text
    return code, text


@pytest.fixture
def world_readable_root():
    # the unprivileged child must be able to walk the tree: pytest's tmp_path is private to root
    d = tempfile.mkdtemp(prefix="wattspan-rapl-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_root_only_counters_say_how_to_fix(world_readable_root):
    root = world_readable_root
    zones = machine(root)
    for z in zones.values():
        os.chmod(os.path.join(z, "energy_uj"), 0o000)  # as the kernel does: -r-------- root
    code, msg = unprivileged(lambda: repr(RaplSource(root=root).devices()))
    assert code == 1, f"RaplSource was built although no counter is readable: {msg}"
    assert "CVE-2020-8694" in msg and "run as root" in msg
    assert f"sudo chmod o+r {root}/intel-rapl:*/energy_uj" in msg
    assert "udev" in msg and "CAP_DAC_READ_SEARCH" in msg


def test_some_zones_unreadable_meters_the_rest(world_readable_root):
    root = world_readable_root
    zones = machine(root)
    os.chmod(os.path.join(zones["cpu0-dram"], "energy_uj"), 0o000)

    def build() -> str:
        src = RaplSource(root=root)
        return ",".join(d.id for d in src.devices()) + "|" + ",".join(src.denied)

    code, text = unprivileged(build)
    assert code == 0, text
    ids, denied = text.split("|")
    assert ids == "cpu0-package"
    assert denied == os.path.join(zones["cpu0-dram"], "energy_uj")


def test_a_zone_vanishing_mid_run_is_counted_not_raised(tmp_path, caplog):
    zones = machine(str(tmp_path))
    src = RaplSource(root=str(tmp_path))
    os.remove(os.path.join(zones["cpu0-dram"], "energy_uj"))
    caplog.set_level(logging.WARNING, logger="wattspan")
    for _ in range(3):
        assert set(energies(src.poll())) == {"cpu0-package"}
    assert src.errors == 3
    assert len([r for r in caplog.records if "RAPL read" in r.getMessage()]) == 1
