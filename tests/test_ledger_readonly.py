"""A ledger in a folder its reader cannot write (a read-only mount, another user's folder, an archive):
WAL readers make a -shm file beside the ledger, which SQLite could not, so report, audit, the
dashboard and budgets all failed on a file that reads fine elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from wattspan import RequestRecord
from wattspan.export.ledger import Ledger, aggregate


def _rec(i: int) -> RequestRecord:
    return RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=2.0, dynamic_j=1.5, idle_j=0.5,
                         device_s=0.1, co2e_g=0.001, route="/v1/chat", model="m", tenant="t", prompt_tokens=1, output_tokens=1)


@pytest.fixture
def readonly_folder(tmp_path):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    with Ledger(src / "l.sqlite") as led:
        led.write([_rec(i) for i in range(5)])
        assert led.flush()
    assert not (src / "l.sqlite-wal").exists() or (src / "l.sqlite-wal").stat().st_size == 0
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root's mount --bind -o ro (a plain chmod does not hold for root)")
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("mount --bind is not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode != 0:
            pytest.skip("a read-only remount is not permitted here")
        yield ro / "l.sqlite"
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_a_ledger_in_a_read_only_folder_is_read(readonly_folder):
    rows = aggregate(readonly_folder)
    assert sum(r["requests"] for r in rows) == 5
    p = subprocess.run([sys.executable, "-m", "wattspan.cli", "report", "--db", str(readonly_folder), "--format", "json"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    from wattspan.dashboard import data

    assert data(readonly_folder, 3600.0)["totals"]["requests"] == 5
