"""The ledger: a real SQLite file written by a real writer thread, read back exactly."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest

from wattspan import InputError, RequestRecord
from wattspan.cli.report import run_report
from wattspan.export.ledger import GROUP_BY, SCHEMA_VERSION, Ledger, aggregate, query

FIELDS = [f.name for f in dataclasses.fields(RequestRecord)]
ROUTES = ["/v1/chat/completions", "/v1/embeddings", "/health"]
TENANTS = ["acme", "globex", ""]


def make_records(n: int, *, seed: int = 0, prefix: str = "r", simulated: float = 0.0) -> list[RequestRecord]:
    """``n`` records with random (seeded) values in every field, including 128-bit trace ids."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        start = rng.randrange(0, 2**62)
        dyn, idle = rng.uniform(0, 500), rng.uniform(0, 50)
        out.append(RequestRecord(
            id=f"{prefix}{i}", device=rng.choice(["gpu0", "gpu1"]), start_ns=start,
            end_ns=start + rng.randrange(1, 10**10), energy_j=dyn + idle, dynamic_j=dyn, idle_j=idle,
            device_s=rng.random(), co2e_g=rng.uniform(0, 0.1), embodied_g=rng.uniform(0, 0.01),
            method=rng.choice(["batch-fit", "time-share"]), sensor="nvml:energy-counter",
            coverage=rng.random(), simulated=rng.random() < simulated, route=rng.choice(ROUTES),
            http_method=rng.choice(["GET", "POST"]), status_code=rng.choice([200, 429, 500]),
            model=rng.choice(["llama", "minilm"]), tenant=rng.choice(TENANTS),
            prompt_tokens=rng.randrange(0, 4096), output_tokens=rng.randrange(0, 4096),
            trace_id=rng.getrandbits(128), span_id=rng.getrandbits(64), host_j=rng.uniform(0, 5),
        ))
    return out


def as_record(row: dict) -> RequestRecord:
    return RequestRecord(**{f: row[f] for f in FIELDS})


def wait_until(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_schema_has_a_column_per_record_field(tmp_path):
    # A new RequestRecord field must get a column (and a schema version bump once released).
    with Ledger(tmp_path / "l.db") as led:
        led.write(make_records(1))
        assert led.flush()
    con = sqlite3.connect(tmp_path / "l.db")
    cols = [r[1] for r in con.execute("PRAGMA table_info(requests)")]
    assert cols == [*FIELDS, "recorded_at", "run_id"]
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexed = {r[0] for r in con.execute("SELECT sql FROM sqlite_master WHERE type = 'index'")}
    assert {s.rsplit("(", 1)[1].strip(" )") for s in indexed} == {"recorded_at"}
    con.close()


def test_new_files_get_16k_pages_and_an_older_file_keeps_its_own(tmp_path):
    with Ledger(tmp_path / "new.db") as led:
        led.write(make_records(2))
        assert led.flush()
    con = sqlite3.connect(tmp_path / "new.db")
    assert con.execute("PRAGMA page_size").fetchone()[0] == 16384
    assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental, as before
    con.close()
    # a file made with SQLite's default pages (an older wattspan's) is appended to as it is
    with Ledger(tmp_path / "old.db") as led:
        led.write(make_records(3))
        assert led.flush()
    con = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA page_size=4096")
    con.execute("VACUUM")
    assert con.execute("PRAGMA page_size").fetchone()[0] == 4096
    con.close()
    with Ledger(tmp_path / "old.db") as led:
        led.write(make_records(4, seed=1, prefix="b"))
        assert led.flush()
        assert len(led.query()) == 7
    con = sqlite3.connect(tmp_path / "old.db")
    assert con.execute("PRAGMA page_size").fetchone()[0] == 4096
    con.close()


def test_opening_an_older_ledger_drops_the_indexes_no_query_uses(tmp_path):
    # Files written before export15 have indexes on route and tenant: each insert paid for them.
    with Ledger(tmp_path / "l.db") as led:
        led.write(make_records(3))
        assert led.flush()
    con = sqlite3.connect(tmp_path / "l.db")
    con.execute("CREATE INDEX requests_route ON requests (route)")
    con.execute("CREATE INDEX requests_tenant ON requests (tenant)")
    con.commit()
    con.close()
    with Ledger(tmp_path / "l.db") as led:
        led.write(make_records(2))
        assert led.flush()
        assert len(led.query()) == 5
    con = sqlite3.connect(tmp_path / "l.db")
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()
    assert names == {"requests_recorded_at"}


def test_concurrent_writers_read_back_exactly(tmp_path):
    threads_n, per = 4, 400
    batches = [make_records(per, seed=t, prefix=f"t{t}-") for t in range(threads_n)]
    t0 = time.time()
    with Ledger(tmp_path / "l.db") as led:

        def writer(recs):
            for i in range(0, len(recs), 7):  # many small writes, interleaved across threads
                led.write(recs[i : i + 7])

        ths = [threading.Thread(target=writer, args=(b,)) for b in batches]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        assert led.flush(10)
        assert led.stats() == {"written": threads_n * per, "dropped": 0, "errors": 0, "queued": 0, "sanitized": 0}
        rows = led.query()
    t1 = time.time()
    got = {r["id"]: r for r in rows}
    assert len(rows) == len(got) == threads_n * per
    for rec in (r for b in batches for r in b):
        row = got[rec.id]
        assert as_record(row) == rec  # every field, bit for bit (floats, 128-bit ids, bools)
        assert row["run_id"] == led.run_id and t0 <= row["recorded_at"] <= t1
    for b in batches:  # each thread's records keep their order
        order = [r["id"] for r in rows if r["id"].startswith(b[0].id.split("-")[0] + "-")]
        assert order == [r.id for r in b]


def test_reopen_appends_and_starts_a_new_run(tmp_path):
    path = tmp_path / "l.db"
    first, second = make_records(10, seed=1, prefix="a"), make_records(5, seed=2, prefix="b")
    with Ledger(path) as led1:
        led1.write(first)
    with Ledger(path) as led2:  # a restart
        led2.write(second)
    assert led1.run_id != led2.run_id
    rows = query(path)
    assert [as_record(r) for r in rows] == first + second
    assert [r["run_id"] for r in rows] == [led1.run_id] * 10 + [led2.run_id] * 5
    assert [as_record(r) for r in query(path, run_id=led1.run_id)] == first
    runs = {r["run_id"]: r["requests"] for r in aggregate(path, "run_id")}
    assert runs == {led1.run_id: 10, led2.run_id: 5}
    with Ledger(path, run_id="deploy-42") as led3:
        led3.write(first[:1])
    assert len(query(path, run_id="deploy-42")) == 1


def test_since_and_until_select_by_recorded_time(tmp_path):
    with Ledger(tmp_path / "l.db") as led:
        led.write(make_records(3, prefix="old"))
        assert led.flush()
        time.sleep(0.02)
        cut = time.time()
        time.sleep(0.02)
        led.write(make_records(4, prefix="new"))
        assert led.flush()
        assert {r["id"][:3] for r in led.query(since=cut)} == {"new"} and len(led.query(since=cut)) == 4
        assert {r["id"][:3] for r in led.query(until=cut)} == {"old"} and len(led.query(until=cut)) == 3
        assert sum(r["requests"] for r in led.aggregate(since=cut)) == 4
        with pytest.raises(ValueError, match="since must be unix seconds"):
            led.query(since=float("nan"))


def test_write_never_waits_for_a_locked_database(tmp_path):
    path = tmp_path / "l.db"
    recs = make_records(2000)
    with Ledger(path) as led:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        # write() returns while the lock is still held (a write that waited for the disk
        # would wait for the COMMIT below, which comes only after the join): behaviour,
        # not the machine's speed, so the join's bound is generous
        caller = threading.Thread(target=led.write, args=(recs,))
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), "write() waited for the locked database"
        s = led.stats()
        assert (s["written"], s["queued"]) == (0, 2000)  # queued, not committed by the caller
        assert not led.flush(0.3)  # the writer is stuck behind the lock...
        blocker.execute("COMMIT")
        blocker.close()
        assert led.flush(10)  # ...and commits once it is released
        assert led.stats()["written"] == 2000


def test_queue_overflow_is_counted_logged_and_recovers(tmp_path, caplog):
    blocker = tmp_path / "notadir"
    blocker.write_text("a file where the ledger's directory should be")
    path = blocker / "l.db"
    with caplog.at_level(logging.WARNING, logger="wattspan.export.ledger"):
        led = Ledger(path, max_queue=50)  # unopenable: must not raise
        led.write(make_records(80))  # nothing can drain: 50 kept, 30 dropped
        led.write(make_records(5, prefix="x"))
        s = led.stats()
        assert (s["queued"], s["dropped"], s["written"]) == (50, 35, 0)
        assert any("dropped 30 records" in m for m in caplog.messages)
        assert wait_until(lambda: led.stats()["errors"] >= 1)
        assert any("cannot write" in m and "retrying" in m for m in caplog.messages)
        blocker.unlink()  # the disk comes back
        blocker.mkdir()
        assert led.flush(15)
        led.close()
    end = led.stats()
    assert (end["written"], end["dropped"], end["queued"]) == (50, 35, 0) and end["errors"] >= 1
    assert [r["id"] for r in query(path)] == [f"r{i}" for i in range(50)]


def test_deleted_directory_keeps_records_until_it_is_back(tmp_path):
    d = tmp_path / "ledgers"
    path = d / "l.db"
    with Ledger(path) as led:
        led.write(make_records(10, prefix="before"))
        assert led.flush()
        shutil.rmtree(d)  # SQLite alone would keep writing into the unlinked file
        after = make_records(10, seed=3, prefix="after")
        led.write(after)  # no exception into the caller
        assert wait_until(lambda: led.stats()["errors"] >= 1)
        assert not led.flush(0.2) and led.stats()["queued"] == 10
        d.mkdir()
        assert led.flush(15)
        s = led.stats()
    assert s["written"] == 20 and s["dropped"] == 0 and s["errors"] >= 1
    assert [as_record(r) for r in query(path)] == after  # the new file holds what was pending


def test_close_on_a_failing_disk_counts_what_is_lost(tmp_path, caplog):
    (tmp_path / "f").write_text("")
    led = Ledger(tmp_path / "f" / "l.db")
    led.write(make_records(5))
    with caplog.at_level(logging.ERROR, logger="wattspan.export.ledger"):
        led.close(timeout=0.2)
    s = led.stats()
    assert (s["written"], s["dropped"], s["queued"]) == (0, 5, 0) and s["errors"] >= 1
    assert any("5 records lost" in m for m in caplog.messages)
    led.write(make_records(2))  # after close: counted, not silent
    assert led.stats()["dropped"] == 7


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_queue"):
        Ledger(tmp_path / "a.db", max_queue=0)
    with pytest.raises(ValueError, match="retention_days"):
        Ledger(tmp_path / "a.db", retention_days=-1)
    with Ledger(tmp_path / "a.db") as led:
        with pytest.raises(TypeError, match="RequestRecord"):
            led.write([make_records(1)[0], {"id": "x"}])
        assert led.stats()["queued"] == 0 and led.flush() and led.query() == []


def test_foreign_and_newer_files_are_refused(tmp_path):
    path = tmp_path / "l.db"
    Ledger(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(InputError, match="newer than this wattspan"):
        Ledger(path)
    with pytest.raises(InputError, match="newer than this wattspan"):
        query(path)
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.close()
    with pytest.raises(InputError, match="not a wattspan ledger"):
        Ledger(other)
    text = tmp_path / "notes.txt"
    text.write_text("x" * 4096)
    with pytest.raises(InputError, match="not a wattspan ledger"):
        Ledger(text)
    assert text.read_text() == "x" * 4096


def test_retention_deletes_old_records_on_open(tmp_path):
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.write(make_records(10))
    con = sqlite3.connect(path)
    con.execute("UPDATE requests SET recorded_at = recorded_at - 3 * 86400 WHERE id IN ('r0', 'r1', 'r2', 'r3')")
    con.commit()
    con.close()
    assert len(query(path)) == 10
    with Ledger(path, retention_days=2) as led:
        assert sorted(r["id"] for r in led.query()) == [f"r{i}" for i in range(4, 10)]


def test_another_process_reads_while_a_server_writes(tmp_path):
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.write(make_records(25))
        assert led.flush()
        code = "import sys; from wattspan.export.ledger import query; print(len(query(sys.argv[1])))"
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == 25
        led.write(make_records(5, prefix="late"))
        assert led.flush() and len(led.query()) == 30  # the reader left the writer undisturbed


def expected_groups(recs: list[RequestRecord], by: str) -> dict:
    groups = defaultdict(list)
    for r in recs:
        groups[getattr(r, by)].append(r)
    return groups


@pytest.mark.parametrize("by", ["route", "tenant", "model", "device", "http_method"])
def test_aggregate_sums_match_the_inputs(tmp_path, by):
    recs = make_records(300, seed=7, simulated=0.02)
    with Ledger(tmp_path / "l.db") as led:
        led.write(recs)
        assert led.flush()
        rows = led.aggregate(by)
    groups = expected_groups(recs, by)
    assert [r[by] for r in rows] == sorted(groups, key=lambda k: -math.fsum(x.energy_j for x in groups[k]))
    for row in rows:
        g = groups[row[by]]
        assert row["requests"] == len(g)
        for key in ("energy_j", "dynamic_j", "idle_j", "host_j", "co2e_g"):
            assert row[key] == pytest.approx(math.fsum(getattr(x, key) for x in g), rel=1e-12)
        assert row["energy_j_per_1k"] == pytest.approx(row["energy_j"] / len(g) * 1000, rel=1e-12)
        assert row["co2e_g_per_1k"] == pytest.approx(row["co2e_g"] / len(g) * 1000, rel=1e-12)
        assert row["mean_duration_s"] == pytest.approx(math.fsum(x.duration_s for x in g) / len(g), rel=1e-9)
        assert row["simulated"] == any(x.simulated for x in g)
        assert row["methods"] == sorted({x.method for x in g})


@pytest.mark.parametrize("by", ["route; DROP TABLE requests", "energy_j", "1", "route--", "", "ROUTE"])
def test_aggregate_refuses_anything_but_known_columns(tmp_path, by):
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.write(make_records(5))
    with pytest.raises(ValueError, match="choose one of route, tenant"):
        aggregate(path, by)
    err = io.StringIO()
    assert run_report(path, by=by, out=err) == 2 and err.getvalue() == ""
    assert len(query(path)) == 5


# -- the report ---------------------------------------------------------------------------
@pytest.fixture
def ledger_file(tmp_path):
    path = tmp_path / "l.db"
    recs = make_records(120, seed=11)
    with Ledger(path) as led:
        led.write(recs)
    return path, recs


def test_report_csv_and_json_carry_the_aggregate_rows(ledger_file, capsys):
    path, recs = ledger_file
    for by in GROUP_BY:
        want = aggregate(path, by)
        buf = io.StringIO()
        assert run_report(path, by=by, fmt="json", out=buf) == 0
        assert json.loads(buf.getvalue()) == want
        buf = io.StringIO()
        assert run_report(path, by=by, fmt="csv", out=buf) == 0
        got = list(csv.DictReader(io.StringIO(buf.getvalue())))
        assert [g[by] for g in got] == [w[by] for w in want]
        for g, w in zip(got, want):
            assert int(g["requests"]) == w["requests"]
            for key in ("energy_j", "dynamic_j", "idle_j", "host_j", "co2e_g", "energy_j_per_1k", "co2e_g_per_1k", "mean_duration_s"):
                assert float(g[key]) == w[key]  # full precision
            assert g["simulated"] == "false" and g["methods"].split(";") == w["methods"]
    assert sum(int(g["requests"]) for g in got) == len(recs)
    assert "SIMULATED" not in capsys.readouterr().err


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    """The body of the table under ``by <section>``: first cell -> the other cells."""
    lines = text.split(f"\nby {section}\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    return {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}


def test_report_table_by_route_then_tenant(ledger_file):
    path, recs = ledger_file
    buf = io.StringIO()
    assert run_report(path, out=buf) == 0
    text = buf.getvalue()
    assert "SIMULATED" not in text
    assert f"{len(recs)} requests" in text.splitlines()[0]
    header = text.split("\nby route\n", 1)[1].splitlines()[0]
    for unit in ("energy J", "gCO2e", "J / 1k req", "gCO2e / 1k req", "mean latency s"):
        assert unit in header
    for section, key in (("route", "route"), ("tenant", "tenant")):
        groups = expected_groups(recs, key)
        body = table_rows(text, section)
        assert set(body) == {k or "(none)" for k in groups}
        for k, g in groups.items():
            cells = body[k or "(none)"]
            assert int(cells[0]) == len(g)
            assert float(cells[1].replace(",", "")) == pytest.approx(math.fsum(x.energy_j for x in g), rel=1e-3)
    only = io.StringIO()
    assert run_report(path, by="model", out=only) == 0
    assert "\nby model\n" in only.getvalue() and "\nby tenant\n" not in only.getvalue()


def test_report_flags_simulated_power(tmp_path, capsys):
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.write(make_records(20, simulated=0.0) + make_records(1, prefix="sim", simulated=1.0))
    buf = io.StringIO()
    assert run_report(path, out=buf) == 0
    assert "SIMULATED power (no sensor)" in buf.getvalue().splitlines()[1]
    assert run_report(path, fmt="json", out=io.StringIO()) == 0
    assert "SIMULATED power (no sensor)" in capsys.readouterr().err


def test_report_problems_exit_2(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "l.db"
    assert run_report(missing, out=io.StringIO()) == 2
    assert "no wattspan ledger at" in capsys.readouterr().err
    assert not missing.parent.exists()
    with Ledger(tmp_path / "l.db") as led:
        led.write(make_records(3))
    assert run_report(tmp_path / "l.db", fmt="xml", out=io.StringIO()) == 2
    assert run_report(tmp_path / "l.db", since_s=-5, out=io.StringIO()) == 2
    buf = io.StringIO()
    assert run_report(tmp_path / "l.db", since_s=3600, fmt="json", out=buf) == 0
    assert sum(r["requests"] for r in json.loads(buf.getvalue())) == 3
    empty = tmp_path / "empty.db"
    Ledger(empty).close()
    buf = io.StringIO()
    assert run_report(empty, out=buf) == 0 and "no requests recorded" in buf.getvalue()


def test_several_writers_opening_an_older_file_at_once_all_write_and_the_indexes_go(tmp_path):
    path = tmp_path / "l.db"
    with Ledger(path) as led:
        led.write(make_records(3))
        assert led.flush()
    con = sqlite3.connect(path)
    con.execute("CREATE INDEX requests_route ON requests (route)")
    con.execute("CREATE INDEX requests_tenant ON requests (tenant)")
    con.commit()
    con.close()
    ledgers, start = [], threading.Barrier(6)

    def open_and_write(t: int) -> None:
        start.wait()
        led = Ledger(path)
        ledgers.append(led)
        for k in range(5):
            led.write(make_records(40, seed=t * 10 + k, prefix=f"t{t}k{k}-"))

    threads = [threading.Thread(target=open_and_write, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert len(ledgers) == 6
    for led in ledgers:
        assert led.flush(30)
    stats = [led.stats() for led in ledgers]
    for led in ledgers:
        led.close()
    assert all(s["written"] == 200 and s["dropped"] == 0 and s["errors"] == 0 for s in stats), stats
    con = sqlite3.connect(path)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    n = con.execute("SELECT count(*), count(DISTINCT id) FROM requests").fetchone()
    con.close()
    assert names == {"requests_recorded_at"} and n == (3 + 6 * 200, 3 + 6 * 200)


def test_report_of_a_ledger_another_writer_left_bad_values_in_is_one_line_not_a_traceback(tmp_path, capsys):
    # SQLite keeps any type in any column: a BLOB label broke every table and --format json
    # (TypeError tracebacks), a text energy broke report --id; wattspan's own writer stores neither
    from wattspan.cli.main import main

    db = tmp_path / "l.db"
    with Ledger(db) as led:
        led.write(make_records(3))
        assert led.flush()
    con = sqlite3.connect(db)
    con.execute("UPDATE requests SET route = ?, tenant = ? WHERE id = 'r0'", (b"\xff/v1", b"t\x00"))
    con.execute("UPDATE requests SET energy_j = 'abc', co2e_g = 'x' WHERE id = 'r1'")
    con.commit()
    con.close()
    for by in ("route", "tenant"):
        for fmt in ("table", "json", "csv"):
            assert run_report(db, by=by, fmt=fmt) == 0
    assert "\ufffd/v1" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--id", "r1"]) == 2
    assert "the record of 'r1' holds a value of the wrong type" in capsys.readouterr().err
    assert main(["report", "--db", str(db), "--id", "r2"]) == 0


def test_report_id_escapes_labels_and_writes_strict_json_and_plain_csv(tmp_path, capsys):
    # a label holding a terminal escape or a line break is shown escaped; an infinity read from an edited
    # file is null in JSON (which has no Infinity); the CSV's line ends and booleans match the report's
    import csv as csv_mod
    import io
    import json as json_mod

    from wattspan.cli.main import main

    db = tmp_path / "l.db"
    with Ledger(db) as led:
        led.write(make_records(2))
        assert led.flush()
    con = sqlite3.connect(db)
    con.execute("UPDATE requests SET route = ?, tenant = ?, co2e_g = ?, host_j = 2.5 WHERE id = 'r0'", ("/v1\x1b[2J", "a\nb", float("inf")))
    con.commit()
    con.close()
    capsys.readouterr()
    assert main(["report", "--db", str(db), "--id", "r0"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "/v1\\x1b[2J" in out and "a\\nb" in out
    head = out.splitlines()[0]
    assert "accelerator" in head and "host 2.5 J" in head  # the headline joules include the host's share
    assert main(["report", "--db", str(db), "--id", "r0", "--format", "json"]) == 0
    rec = json_mod.loads(capsys.readouterr().out)  # strict JSON: no Infinity
    assert rec["co2e_g"] is None and rec["route"] == "/v1\x1b[2J"
    assert main(["report", "--db", str(db), "--id", "r0", "--format", "csv"]) == 0
    raw = capsys.readouterr().out
    assert "\r\n" not in raw
    row = next(csv_mod.DictReader(io.StringIO(raw)))
    assert row["simulated"] in ("true", "false") and row["tenant"] == "a\nb"
