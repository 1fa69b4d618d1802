"""`wattspan report` and `wattspan audit` on a ledger someone edited: a record holding a value no
wattspan writer stores (an infinity, a negative energy, text in a number column) is counted and
left out of every figure, never summed into them; JSON output stays JSON; labels that carry
terminal escape sequences are shown escaped. Real files, the real command line."""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import sys

import pytest

from wattspan import RequestRecord
from wattspan.export.ledger import Ledger, aggregate, excluded


def _rec(i: int, route: str = "/v1/chat") -> RequestRecord:
    return RequestRecord(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=2.0, dynamic_j=1.5, idle_j=0.5,
                         device_s=0.1, co2e_g=0.001, method="batch-fit", sensor="nvml:energy-counter", coverage=1.0,
                         route=route, model="m", tenant="t", prompt_tokens=10, output_tokens=5, host_j=0.25)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True, timeout=120)


def _tampered(path, n: int, sql: str, args: tuple = ()):
    """A ledger of ``n`` records the real writer wrote, then ``sql`` run on it by hand."""
    with Ledger(path) as led:
        led.write([_rec(i) for i in range(n)])
        assert led.flush()
    con = sqlite3.connect(path)
    con.execute(sql, args)
    con.commit()
    con.close()
    return path


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "w.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i) for i in range(8)] + [_rec(8, "/v1/\x1b[2J\x1b[31mred"), _rec(9, "/v1/a\nforged row")])
        assert led.flush()
    con = sqlite3.connect(db)
    for sql, v in (("UPDATE requests SET energy_j = ? WHERE id = 'r0'", math.inf),
                   ("UPDATE requests SET energy_j = ? WHERE id = 'r1'", -50.0),
                   ("UPDATE requests SET co2e_g = ? WHERE id = 'r2'", "lots")):
        con.execute(sql, (v,))
    con.commit()
    con.close()
    return db


@pytest.mark.parametrize("column, value", [("device_s", math.inf), ("co2e_g_low", -5.0), ("co2e_g_high", math.inf),
                                           ("intensity_g_per_kwh", math.inf), ("coverage", "x"), ("embodied_g", b"\x00")])
def test_every_column_a_figure_is_made_of_is_checked(tmp_path, column, value):
    db = _tampered(tmp_path / "c.sqlite", 4, f"UPDATE requests SET {column} = ? WHERE id = 'r0'", (value,))
    assert excluded(db) == 1 and sum(r["requests"] for r in aggregate(db, "route")) == 3


def test_the_ledger_api_leaves_them_out_and_counts_them(ledger):
    rows = aggregate(ledger, "route")
    assert sum(r["requests"] for r in rows) == 7 and excluded(ledger) == 3
    assert sum(r["energy_j"] for r in rows) == pytest.approx(14.0) and all(math.isfinite(r["energy_j"]) for r in rows)


def test_report_says_how_many_it_left_out_and_sums_the_rest(ledger):
    p = cli("report", "--db", ledger)
    assert p.returncode == 0, p.stderr
    assert "3 record(s)" in p.stderr and "left out" in p.stderr
    assert "7 requests" in p.stdout and "accelerator 14.00 J" in p.stdout and "inf" not in p.stdout
    assert "\x1b" not in p.stdout and "\\x1b[2J" in p.stdout  # the escape shown, not obeyed
    assert "forged row" in p.stdout and "a\\nforged row" in p.stdout  # one row, the line break shown


def test_a_method_with_escapes_is_shown_escaped_in_report_and_audit(tmp_path):
    db = _tampered(tmp_path / "m.sqlite", 1, "UPDATE requests SET method = ?, quality = ?", ("batch-fit\x1b]0;pwned\x07\x1b[2J", "ok\x1b[31m"))
    p = cli("report", "--db", db)
    assert p.returncode == 0 and "\x1b" not in p.stdout and "\x07" not in p.stdout and "pwned" in p.stdout
    p = cli("audit", "--db", db, "--out", tmp_path / "a.md")
    md = (tmp_path / "a.md").read_text()
    assert p.returncode == 0 and "\x1b" not in md and "\x07" not in md and "pwned" in md


def test_values_whose_sum_passes_floats_range_are_left_out_not_summed_to_inf(tmp_path):
    # each 1.7e308 J finite, as the real writer stores it; two of them sum past float's range
    # (report printed "inf J", its JSON null, and audit ended in a plotting error)
    db = tmp_path / "big.sqlite"
    with Ledger(db) as led:
        led.write([_rec(i) for i in range(5)])
        assert led.flush()
    con = sqlite3.connect(db)
    con.execute("UPDATE requests SET energy_j = 1.7e308 WHERE id IN ('r0', 'r1')")
    con.commit()
    con.close()
    assert excluded(db) == 2
    p = cli("report", "--db", db, "--format", "json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert rows[0]["requests"] == 3 and rows[0]["energy_j"] == pytest.approx(6.0)
    assert "2 record(s)" in p.stderr and "past 2**63" in p.stderr
    p = cli("report", "--db", db)
    assert p.returncode == 0 and "accelerator 6.000 J" in p.stdout and "inf" not in p.stdout, p.stdout
    out = tmp_path / "a.md"
    p = cli("audit", "--db", db, "--out", out)
    assert p.returncode == 0, p.stderr
    md = out.read_text()
    assert "2 record(s) left out of every figure" in md and not re.search(r"\binf\b", md)


def test_the_bound_is_past_any_value_the_writer_stores(tmp_path):
    # the writer clips integers to 64 bits: a token count at the clip is still summed
    from wattspan.export.ledger.schema import VALUE_MAX
    assert VALUE_MAX >= 2**63 - 1 and VALUE_MAX * 2**63 < 1.7e308
    db = _tampered(tmp_path / "t.sqlite", 2, "UPDATE requests SET prompt_tokens = ? WHERE id = 'r0'", (2**63 - 1,))
    assert excluded(db) == 0 and sum(r["requests"] for r in aggregate(db, "route")) == 2


def test_audit_flags_them_and_reports_the_rest(ledger, tmp_path):
    out = tmp_path / "audit.md"
    p = cli("audit", "--db", ledger, "--out", out)
    assert p.returncode == 0, p.stderr
    md = out.read_text()
    assert "left out (invalid values): 3" in md and "3 record(s) left out of every figure" in md
    assert "\x1b" not in md and "inf J" not in md


def test_audit_of_a_ledger_with_nothing_valid_is_one_clear_error(tmp_path):
    db = _tampered(tmp_path / "bad.sqlite", 1, "UPDATE requests SET energy_j = -1")
    p = cli("audit", "--db", db, "--out", tmp_path / "a.md")
    assert p.returncode == 2 and "no wattspan writer stores" in p.stderr and "Traceback" not in p.stderr
