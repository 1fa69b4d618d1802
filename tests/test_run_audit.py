"""`wattspan run` meters a real process; `wattspan audit` turns a run, a ledger period or
attribute's output into a report whose every line can be checked."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import wattspan
from wattspan import RequestRecord
from wattspan.phases import read_phases
from wattspan.export.ledger.runs import get_run, list_runs, run_trace
from wattspan.samples import DeviceInfo, SampleBatch, SampleKind
from wattspan.audit import build_report, carbon_for, from_ledger, from_run, g, parse_time
from wattspan.carbon import CarbonModel
from wattspan.export.ledger import Ledger
from wattspan.run import measure

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "examples" / "simulated"


class ConstantGpu:
    """A GPU drawing a constant power (the thinnest stand-in for NVML): readings on the real clock."""

    name = "constant"

    def __init__(self, watts: float = 50.0, counter: bool = True) -> None:
        self.watts, self.counter, self.errors = watts, counter, 0
        self._t0 = time.monotonic_ns()

    def devices(self):
        return [DeviceInfo("gpu0", "constant GPU", kind="gpu", sensor="constant-test")]

    def poll(self):
        now = time.monotonic_ns()
        t = np.array([now], dtype=np.int64)
        if self.counter:
            return [SampleBatch("gpu0", SampleKind.ENERGY, t, np.array([self.watts * (now - self._t0) * 1e-9]))]
        return [SampleBatch("gpu0", SampleKind.INSTANT, t, np.array([self.watts]))]

    def close(self):
        pass


def cli(*args, timeout=240, **kw):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


JOB = """
import sys, time, wattspan
def spin(s):
    end = time.monotonic() + s
    while time.monotonic() < end:
        pass
with wattspan.phase("train"):
    spin(0.6)
with wattspan.phase("evaluate"):
    time.sleep(0.3)
with wattspan.phase("bad\\tname\\n" + "x" * 500):
    pass
sys.exit(3)
"""


class TestPhase:
    def test_outside_a_run_a_phase_does_nothing_and_never_raises(self, monkeypatch):
        monkeypatch.delenv("WATTSPAN_RUN_PHASES", raising=False)
        with wattspan.phase("epoch 1") as p:
            pass
        assert p.name == "epoch 1"

    def test_a_marker_that_cannot_be_written_is_counted_not_raised(self, monkeypatch, tmp_path):
        from wattspan.phases import phase_errors

        monkeypatch.setenv("WATTSPAN_RUN_PHASES", str(tmp_path / "no" / "such" / "dir" / "f"))
        before = phase_errors()
        with wattspan.phase("x"):
            pass
        assert phase_errors() == before + 2

    def test_phases_pair_up_nest_and_unclosed_ones_end_with_the_run(self, monkeypatch, tmp_path):
        f = tmp_path / "phases.tsv"
        monkeypatch.setenv("WATTSPAN_RUN_PHASES", str(f))
        with wattspan.phase("outer"):
            with wattspan.phase("inner"):
                pass

        @wattspan.phase("decorated")
        def work():
            return 7

        assert work() == 7
        wattspan.phase("never closed").__enter__()
        with open(f, "a") as fh:
            fh.write("garbage line\nB\tx\tnot-a-number\tname\n")
        got = read_phases(f, end_ns=time.monotonic_ns() + 10**9)
        names = [n for n, _, _ in got]
        assert names == ["outer", "inner", "decorated", "never closed"]
        (o, ob, oe), (i, ib, ie) = got[0], got[1]
        assert ob <= ib <= ie <= oe
        assert got[-1][2] > got[-1][1]


class TestRun:
    def test_a_job_is_metered_start_to_end_with_its_phases_and_exit_code(self, tmp_path):
        db = tmp_path / "w.sqlite"
        s = measure([sys.executable, "-c", JOB], carbon=CarbonModel(intensity_g_per_kwh=400.0, pue=1.2), db=db,
                    sources=[ConstantGpu(50.0)], interval_s=0.02)
        assert s["exit_code"] == 3
        # 50 W for the run's duration: exact up to one sampling interval at each end
        assert s["accelerator_j"] == pytest.approx(50.0 * s["duration_s"], rel=0.02)
        assert s["facility_j"] == pytest.approx(1.2 * s["energy_j"], rel=1e-12)
        assert s["operational_g"] == pytest.approx(s["energy_j"] * 1.2 / 3.6e6 * 400.0, rel=1e-12)
        ph = {p["name"]: p for p in s["phases"]}
        assert list(ph)[:2] == ["train", "evaluate"]
        assert "\t" not in list(ph)[2] and len(list(ph)[2]) <= 120
        for name, want_s in (("train", 0.6), ("evaluate", 0.3)):
            assert ph[name]["duration_s"] == pytest.approx(want_s, abs=0.15)
            assert ph[name]["energy_j"] == pytest.approx(50.0 * ph[name]["duration_s"], rel=0.1, abs=2.0)
        assert sum(p["energy_j"] for p in s["phases"]) <= s["energy_j"]
        # stored: the summary and a cumulative trace that ends at the run's energy
        assert [r["run_id"] for r in list_runs(db)] == [s["run_id"]]
        assert get_run(db, "last")["accelerator_j"] == s["accelerator_j"]
        assert get_run(db, s["run_id"][:8])["run_id"] == s["run_id"]
        (ts, es), = run_trace(db, s["run_id"]).values()
        assert es[0] == 0.0 and es[-1] == pytest.approx(s["accelerator_j"], rel=1e-9)
        assert all(b >= a for a, b in zip(ts, ts[1:])) and all(b >= a for a, b in zip(es, es[1:]))

    def test_power_readings_without_a_counter_are_integrated(self, tmp_path):
        s = measure([sys.executable, "-c", "import time; time.sleep(0.5)"], carbon=CarbonModel(intensity_g_per_kwh=100.0),
                    db=None, sources=[ConstantGpu(80.0, counter=False)], interval_s=0.02)
        assert s["exit_code"] == 0
        assert s["accelerator_j"] == pytest.approx(80.0 * s["duration_s"], rel=0.03)

    def test_cli_runs_the_tiny_training_job_and_audit_reports_it_line_by_line(self, tmp_path):
        db = tmp_path / "w.sqlite"
        p = cli("run", "--db", db, "--region", "gcp:europe-west1", "--json", tmp_path / "run.json", "--",
                sys.executable, ROOT / "examples" / "train_tiny.py", "--epochs", "2", "--samples", "4000", cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert "epoch 2" in p.stdout and "phase train epoch 1" in p.stderr
        s = json.loads((tmp_path / "run.json").read_text())
        assert s["host_j"] > 0 and s["devices"]  # the host is metered (RAPL, or the labelled estimate)
        assert {p["name"] for p in s["phases"]} >= {"prepare data", "train epoch 1", "train epoch 2", "evaluate"}

        out = tmp_path / "audit.md"
        p = cli("audit", "--db", db, "--out", out, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        md = out.read_text()
        assert (tmp_path / "audit-power.png").stat().st_size > 1000 and "(audit-power.png)" in md
        assert "train epoch 1" in md and "| evaluate | 2 |" in md
        lines = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([A-I])\. [^|]+\| ([^|]+) \|", md, re.M)}

        def num(s):
            return float(s.strip("* ").split()[0].replace(",", ""))

        a, b, c, d, e = (num(lines[k]) for k in "ABCDE")
        assert c == pytest.approx(a + b, rel=2e-3)
        assert d == 1.10  # the run was recorded with Google's fleet PUE
        assert e == pytest.approx(c * d, rel=2e-3)
        f, gop, h, i = (num(lines[k]) for k in "FGHI")
        kwh = float(re.search(r"= ([0-9.e+-]+) kWh \|", md).group(1))
        assert gop == pytest.approx(kwh * f, rel=2e-3) and i == pytest.approx(gop + h, rel=2e-3)
        assert "SCI = ((E x I) + M) per R" in md and "training hour" in md
        assert s["command_line"].split()[-1] in md and "Versions:" in md
        if any(d["simulated"] for d in s["devices"].values()):
            assert "ESTIMATED power: not a measurement" in md
        for fmt in ("html", "pdf"):
            p = cli("audit", "--db", db, "--out", tmp_path / f"audit.{fmt}", cwd=tmp_path)
            assert p.returncode == 0, p.stderr
        html = (tmp_path / "audit.html").read_text()
        assert html.startswith("<!doctype html>") and "data:image/png;base64," in html and "<table>" in html
        pdf = (tmp_path / "audit.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and 1 <= len(re.findall(rb"/Type /Page\b", pdf)) <= 3

    def test_a_command_that_cannot_start_is_a_clear_error(self, tmp_path):
        p = cli("run", "--db", tmp_path / "w.sqlite", "--", "no-such-program-wattspan")
        assert p.returncode == 2 and "cannot start 'no-such-program-wattspan'" in p.stderr
        p = cli("run", "--db", tmp_path / "w.sqlite")
        assert p.returncode == 2 and "give the command after --" in p.stderr


def _records(n=20, t0=1000):
    out = []
    for i in range(n):
        out.append(RequestRecord(id=f"r{i}", device="gpu0", start_ns=t0 + i, end_ns=t0 + i + 10**8, energy_j=2.0 + i % 3,
                                 dynamic_j=1.5, idle_j=0.5 + i % 3, device_s=0.1, co2e_g=0.001 * (1 + i % 3), embodied_g=0.0001,
                                 method="time-share", sensor="nvml:energy-counter", coverage=1.0 if i else 0.5,
                                 route="/v1/embeddings" if i % 2 else "/v1/completions", model="m", tenant=f"t{i % 4}",
                                 prompt_tokens=10, output_tokens=5 * (i % 2), host_j=0.25))
    return out


@pytest.fixture
def ledger(tmp_path):
    db = tmp_path / "serve.sqlite"
    with Ledger(db) as led:
        led.write(_records())
        assert led.flush()
    return db


class TestAuditLedger:
    def test_since_1h_reports_the_ledgers_sums_and_per_unit_figures(self, ledger, tmp_path):
        out = tmp_path / "a.md"
        p = cli("audit", "--db", ledger, "--since", "1h", "--region", "FR", "--pue", "1.25", "--out", out)
        assert p.returncode == 0, p.stderr
        md = out.read_text()
        recs = _records()
        acc = sum(r.energy_j for r in recs)
        host = sum(r.host_j for r in recs)
        assert acc == 59.0 and host == 5.0
        assert "| A. Accelerator energy | 59.00 J |" in md and "| B. Host energy | 5.000 J |" in md
        assert "| D. PUE | 1.25 | given on the command line |" in md
        assert "40.48 gCO2e/kWh" in md  # France, the offline table
        fac = (acc + host) * 1.25
        op = fac / 3.6e6 * 40.48
        emb = sum(r.embodied_g for r in recs)
        total = op + emb
        m = re.search(r"\| per 1k requests \| ([0-9.e+-]+) gCO2e, ([0-9.,]+) J \|", md)
        assert float(m.group(1)) == pytest.approx(total / 0.02, rel=1e-3)
        assert float(m.group(2).replace(",", "")) == pytest.approx(fac / 0.02, rel=1e-3)
        toks = sum(r.prompt_tokens + r.output_tokens for r in recs)
        m = re.search(r"AI extension \(GSF SCI for AI\): ([0-9.e+-]+) gCO2e per 1k tokens", md)
        assert float(m.group(1)) == pytest.approx(total / (toks / 1000), rel=1e-3)
        assert "Boundary: **provider**" in md
        assert "| /v1/embeddings | 10 |" in md and "| t0 | 5 |" in md
        assert "min 50.0%" in md  # coverage of the worst request
        assert "Equivalent to" not in md and "F'. Intensity, market-based" not in md

    def test_market_based_intensity_and_an_equivalent_line_only_with_a_source(self, ledger, tmp_path):
        p = cli("audit", "--db", ledger, "--since", "2h", "--market-intensity", "12.5", "--market-source", "PPA 2025",
                "--equivalent-g", "120", "--equivalent-unit", "km by car")
        assert p.returncode == 0, p.stderr
        assert "F'. Intensity, market-based | 12.50 gCO2e/kWh | PPA 2025" in p.stdout
        assert "Equivalent to" not in p.stdout  # no source: no line
        p = cli("audit", "--db", ledger, "--since", "2h", "--equivalent-g", "120", "--equivalent-unit", "km by car",
                "--equivalent-source", "a cited table")
        assert re.search(r"Equivalent to [0-9.e+-]+ km by car, at 120.0 gCO2e per unit \(a cited table\)", p.stdout)

    def test_bad_input_is_a_clear_error(self, ledger, tmp_path):
        p = cli("audit", "--db", ledger, "--since", "yesterday-ish")
        assert p.returncode == 2 and "cannot read the time" in p.stderr
        p = cli("audit", "--db", tmp_path / "none.sqlite")
        assert p.returncode == 2 and "no wattspan ledger" in p.stderr
        p = cli("audit", "--db", ledger, "--since", "1h", "--out", tmp_path / "x.docx")
        assert p.returncode == 2 and "cannot tell the format" in p.stderr
        p = cli("audit", "--db", ledger, "--since", "1h", "--pue", "9")
        assert p.returncode == 2 and "pue" in p.stderr

    def test_a_ledger_without_runs_audits_its_requests_and_newer_columns_show(self, ledger):
        assert list_runs(ledger) == []
        conn = sqlite3.connect(ledger)  # the error band and quality flag of each record
        conn.execute("UPDATE requests SET energy_j_low = energy_j * 0.9, energy_j_high = energy_j * 1.1, quality = 'ok'")
        conn.commit()
        conn.close()
        b = from_ledger(ledger)
        acc = sum(r.energy_j for r in _records())
        host = sum(r.host_j for r in _records())
        assert b.band_j == pytest.approx((acc * 0.9 + host, acc * 1.1 + host))
        assert b.quality_flags == {"ok": 20}
        r = build_report(b, carbon_for(b))
        assert r["it_j"] == pytest.approx(acc + host)

    def test_parse_time(self):
        assert parse_time("1h", now=10_000.0) == 6400.0
        assert parse_time("30m", now=10_000.0) == 8200.0
        assert parse_time("2026-05-01T00:00:00Z") == 1777593600.0
        assert parse_time("1777593600") == 1777593600.0


def test_audit_of_attribute_output_counts_the_unattributed_energy(tmp_path):
    out, summ = tmp_path / "a.jsonl", tmp_path / "s.json"
    p = cli("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl",
            "--out", out, "--summary", summ, "--region", "FR")
    assert p.returncode == 0, p.stderr
    p = cli("audit", "--records", out, "--summary", summ)
    assert p.returncode == 0, p.stderr
    s = json.loads(summ.read_text())
    assert f"| Unattributed | {g(s['unattributed_j'])} J |" in p.stdout
    assert "| D. PUE | 1.00 | as recorded with the input |" in p.stdout
    assert "40.48 gCO2e/kWh" in p.stdout and "per 1k output tokens" in p.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert f"| A. Accelerator energy | {g(sum(r['energy_j'] for r in recs))} J |" in p.stdout


def test_a_foreign_ledger_file_is_refused_before_the_job_runs(tmp_path):
    db = tmp_path / "other.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    marker = tmp_path / "ran"
    p = cli("run", "--db", db, "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert p.returncode == 2 and "not a wattspan ledger" in p.stderr
    assert not marker.exists()


def test_ledger_text_cannot_inject_markup_into_the_report(tmp_path):
    db = tmp_path / "w.sqlite"
    evil = "/v1/[click](http://evil.example)<script>x</script>|*"
    with Ledger(db) as led:
        led.write([RequestRecord(id="a", device="gpu0", start_ns=0, end_ns=1, energy_j=1.0, dynamic_j=1.0, idle_j=0.0,
                                 device_s=0.1, route=evil, tenant="<b>t</b>")])
        assert led.flush()
    out = tmp_path / "a.html"
    p = cli("audit", "--db", db, "--since", "1h", "--out", out)
    assert p.returncode == 0, p.stderr
    html = out.read_text()
    assert "<script>" not in html and "<b>t</b>" not in html and 'href="http://evil.example"' not in html
    assert "[click](http://evil.example)&lt;script&gt;" in html


def test_run_on_a_gpu_reads_the_nvml_energy_counter(monkeypatch, tmp_path):
    """The same path as on a GPU machine: run_sources() finds NVML (here a thin fake of
    nvidia-ml-py playing a real A100 trace) and the run is charged the counter's energy."""
    import pynvml

    from tests.fakes.fake_nvml import ENERGY, USAGE, FakeGpu, FakeNvml
    from tests.test_nvml import TRACE_S, TRACE_W

    monkeypatch.delenv("WATTSPAN_SIMULATE", raising=False)
    fake = FakeNvml([FakeGpu("NVIDIA A100-SXM4-40GB", pynvml.NVML_DEVICE_ARCH_AMPERE, TRACE_S, TRACE_W,
                             supports=frozenset({ENERGY, USAGE}))]).install(monkeypatch)
    s = measure([sys.executable, "-c", "import time; time.sleep(1.0)"], carbon=CarbonModel(intensity_g_per_kwh=300.0),
                db=tmp_path / "w.sqlite", interval_s=0.02)
    d = s["devices"]["gpu0"]
    assert d["role"] == "accelerator" and d["sensor"].startswith("nvml") and not d["simulated"]
    g = fake.gpus[0]
    want = g.energy_j(int(s["ended_at"] * 1e9)) - g.energy_j(int(s["started_at"] * 1e9))
    assert s["accelerator_j"] == pytest.approx(want, rel=0.05)
    assert s["accelerator_j"] / s["duration_s"] == pytest.approx(d["mean_power_w"])
    assert fake.initialised == 0  # NVML released when the run ended


def test_the_run_ends_when_the_job_ends_not_at_the_next_tick(tmp_path, monkeypatch):
    # the ingest loop ticks rarely here: the run's end must still be the job's own end
    import wattspan.run as run_mod

    monkeypatch.setattr(run_mod, "_TICK_S", 30.0)
    mark = tmp_path / "end"
    job = f"import time, pathlib; time.sleep(2.5); pathlib.Path({str(mark)!r}).write_text(repr(time.time()))"
    s = measure([sys.executable, "-c", job], carbon=CarbonModel(intensity_g_per_kwh=100.0), db=None,
                sources=[ConstantGpu(50.0)], interval_s=0.02)
    job_end = float(mark.read_text())
    assert s["exit_code"] == 0
    assert 0 <= s["ended_at"] - job_end < 10, "the run ended at a tick of the loop, long after the job"
    assert s["accelerator_j"] == pytest.approx(50.0 * s["duration_s"], rel=0.02)


def test_run_reads_wattspan_simulate_through_the_settings(monkeypatch):
    # the same sources and the same reading of WATTSPAN_SIMULATE as the meter ("on" included)
    import wattspan.sources.nvml as nvml
    from wattspan.run import run_sources
    from wattspan.sources import SourceUnavailable

    tried = []

    class NoGpu:
        def __init__(self, *a, **kw):
            tried.append(1)
            raise SourceUnavailable("no GPU in this test")

    monkeypatch.setattr(nvml, "NvmlSource", NoGpu)
    monkeypatch.setenv("WATTSPAN_SIMULATE", "on")
    found = run_sources()
    assert tried == [] and found and all(s.name != "nvml" for s in found)
    monkeypatch.setenv("WATTSPAN_SIMULATE", "0")
    run_sources()
    assert tried == [1]
    monkeypatch.setenv("WATTSPAN_SIMULATE", "maybe")
    with pytest.raises(ValueError, match="WATTSPAN_SIMULATE"):
        run_sources()


def test_a_ledger_audit_uses_the_intensity_each_record_ran_at(tmp_path):
    """Records carry the hour's intensity (issue 11): the audit weighs those, says so, and its
    operational CO2e is the records' own; the PUE is the one their CO2e implies."""
    pue, recs = 1.2, []
    for i, (e, intensity, hour) in enumerate([(3.0, 100.0, "2023-07-14T02:00Z"), (1.0, 300.0, "2023-07-14T18:00Z")] * 5):
        op = (e + 0.5) * pue * intensity / 3.6e6
        recs.append(RequestRecord(id=f"h{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=e, dynamic_j=e, idle_j=0.0,
                                  device_s=0.1, co2e_g=op, method="batch-fit", sensor="nvml:energy-counter", host_j=0.5,
                                  intensity_g_per_kwh=intensity, intensity_provider="profile", intensity_zone="GB",
                                  intensity_hour=hour, intensity_basis="location"))
    db = tmp_path / "h.sqlite"
    with Ledger(db) as led:
        led.write(recs)
        assert led.flush()
    b = from_ledger(db)
    c = carbon_for(b)
    want = sum((r.energy_j + r.host_j) * r.intensity_g_per_kwh for r in recs) / sum(r.energy_j + r.host_j for r in recs)
    assert c["intensity"] == pytest.approx(want) and c["pue"] == pytest.approx(pue, abs=1e-3) and c["hourly"]
    assert "GB" in c["intensity_source"] and "2023-07-14T02:00Z" in c["intensity_source"] and "profile" in c["intensity_source"]
    r = build_report(b, c)
    assert r["operational_g"] == pytest.approx(sum(x.co2e_g for x in recs), rel=1e-3)
    assert carbon_for(b, region="FR")["hourly"] is False  # --region overrides with the yearly table


def test_a_ledger_audit_keeps_a_zero_intensity_and_sums_only_the_bands_records_carry(tmp_path):
    # a record priced at 0 g/kWh was left out of the weighting (the other's 400 g/kWh applied to both: +100 %),
    # and records with no band (0..0, RequestRecord's default) were summed as a band of 0 J
    def rec(i, intensity, band):
        e = 3.6e6
        return RequestRecord(id=f"z{i}", device="gpu0", start_ns=i, end_ns=i + 10**8, energy_j=e, dynamic_j=e, idle_j=0.0,
                             device_s=0.1, co2e_g=intensity, method="batch-fit", sensor="nvml:energy-counter",
                             intensity_g_per_kwh=intensity, intensity_provider="table", intensity_zone="ZZ",
                             intensity_hour="2026-01-01T00:00Z", intensity_basis="location",
                             energy_j_low=0.9 * e if band else 0.0, energy_j_high=1.1 * e if band else 0.0)

    for bands, want_band in (((False, False), None), ((True, False), (3.6e6 * 0.9 + 3.6e6, 3.6e6 * 1.1 + 3.6e6))):
        db = tmp_path / f"z{len(bands)}{bands[0]}.sqlite"
        with Ledger(db) as led:
            led.write([rec(0, 0.0, bands[0]), rec(1, 400.0, bands[1])])
            assert led.flush()
        b = from_ledger(db)
        c = carbon_for(b)
        assert c["intensity"] == pytest.approx(200.0)  # energy-weighted over both: 0 g/kWh is a figure
        assert build_report(b, c)["operational_g"] == pytest.approx(400.0, rel=1e-6)
        assert b.band_j == (pytest.approx(want_band) if want_band else None)
        assert any("1 of 2 records carry no 90 % band" in x for x in b.notes) == (want_band is not None)


_COUNT_SIGNALS = """
import os, signal, sys, time
got = []
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
open(sys.argv[1] + ".ready", "w").close()
end = time.monotonic() + 20
while time.monotonic() < end and not got:
    time.sleep(0.01)
time.sleep(1.0)  # a second, forwarded copy would arrive by now
open(sys.argv[1], "w").write(",".join(got))
"""


def _run_in_a_terminal(tmp_path, send, terminal=True):
    """`wattspan run` as a shell runs a foreground job: session leader of a pseudo-terminal, the job in
    its process group (or, ``terminal=False``, as a supervisor runs it: its own session, no terminal);
    ``send(pid)`` delivers the signal once the job is ready; returns what the job got."""
    import os
    import pty
    import signal

    master, slave = pty.openpty()
    out = tmp_path / "got"
    code = tmp_path / "job.py"
    code.write_text(_COUNT_SIGNALS)

    def controlling_tty():
        os.setsid()
        if terminal:
            os.close(os.open(os.ttyname(slave), os.O_RDWR))  # a session leader opening a tty makes it its terminal

    io = slave if terminal else subprocess.DEVNULL
    p = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "run", "--db", str(tmp_path / "w.sqlite"), "--",
                          sys.executable, str(code), str(out)], cwd=tmp_path, stdin=io, stdout=io, stderr=io,
                         preexec_fn=controlling_tty, env={**os.environ, "WATTSPAN_SIMULATE": "1"})
    os.close(slave)
    try:
        end = time.monotonic() + 60
        while not (tmp_path / "got.ready").exists() and time.monotonic() < end:
            time.sleep(0.05)
        send(p.pid, signal)
        p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    return out.read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals and signals")
def test_ctrl_c_at_the_terminal_reaches_the_job_once(tmp_path):
    # the terminal delivers Ctrl-C to the whole foreground group: run must not send it again
    assert _run_in_a_terminal(tmp_path, lambda pid, signal: os.killpg(pid, signal.SIGINT)) == "SIGINT"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals and signals")
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_a_supervisor_sends_to_run_is_forwarded_to_the_job_once(tmp_path, name):
    assert _run_in_a_terminal(tmp_path, lambda pid, signal: os.kill(pid, getattr(signal, name)), terminal=False) == name


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX terminals and signals")
def test_sigterm_to_run_in_a_terminal_is_forwarded_once(tmp_path):
    assert _run_in_a_terminal(tmp_path, lambda pid, signal: os.kill(pid, signal.SIGTERM)) == "SIGTERM"


@pytest.mark.parametrize("db, fragment", [
    (lambda t: t, "is a directory"),
    (lambda t: "/dev/null", "not a regular file"),
    (lambda t: t / "no" / "w.sqlite", "no folder"),
    (lambda t: (t / "bad.sqlite").write_text("not sqlite") and t / "bad.sqlite", "not a wattspan ledger"),
])
def test_a_ledger_run_cannot_write_is_refused_before_the_job_runs(tmp_path, db, fragment):
    mark = tmp_path / "ran"
    p = cli("run", "--db", db(tmp_path), "--", sys.executable, "-c", f"open({str(mark)!r}, 'w')", cwd=tmp_path)
    assert p.returncode == 2 and fragment in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not mark.exists(), "the job ran although its result could not be stored"


def test_a_json_summary_run_cannot_write_is_refused_before_the_job_runs(tmp_path):
    mark = tmp_path / "ran"
    p = cli("run", "--db", tmp_path / "w.sqlite", "--json", tmp_path, "--", sys.executable, "-c", f"open({str(mark)!r}, 'w')", cwd=tmp_path)
    assert p.returncode == 2 and "--json" in p.stderr and "is a directory" in p.stderr and not mark.exists()


def test_run_prices_each_half_hour_at_its_own_intensity_with_market_and_price_beside(tmp_path):
    # FR has an hourly 2023 profile: the run's operational CO2e is its energy at the hour it ran, not the yearly value
    from wattspan.carbon import CarbonModel as CM

    model = CM.for_region("FR", carbon_price_per_tonne=80.0).with_hourly("profile", market_g_per_kwh=25.0)
    s = measure([sys.executable, "-c", "import time; time.sleep(0.5)"], carbon=model, db=tmp_path / "w.sqlite",
                sources=[ConstantGpu(200.0)], interval_s=0.02)
    c = s["carbon"]
    [hour] = c["hourly"] if len(c["hourly"]) == 1 else [max(c["hourly"], key=lambda h: h["energy_j"])]
    expect = model.hourly.at(model.zone, (s["started_at"] + s["ended_at"]) / 2).g_per_kwh
    assert len(c["hourly"]) in (1, 2) and hour["provider"] == "profile" and hour["g_per_kwh"] == pytest.approx(expect)
    kwh = s["energy_j"] / 3.6e6 * c["pue"]
    assert s["operational_g"] == pytest.approx(kwh * c["intensity_g_per_kwh"], rel=1e-9)
    assert c["yearly_intensity_g_per_kwh"] == model.intensity_g_per_kwh and "hourly (profile" in c["intensity_source"]
    assert s["market_g"] == pytest.approx(kwh * 25.0, rel=1e-9)  # beside, never in the figure
    assert s["co2e_g"] == pytest.approx(s["operational_g"] + s["embodied_g"])
    assert s["carbon_cost"] == pytest.approx(s["co2e_g"] / 1e6 * 80.0)
    # the audit of the run shows the market figure it recorded, without being told again
    report = build_report(from_run(tmp_path / "w.sqlite"), carbon_for(from_run(tmp_path / "w.sqlite")), market_intensity=25.0)
    assert report["market"]["operational_g"] == pytest.approx(s["market_g"], rel=1e-6)
    p = cli("audit", "--db", tmp_path / "w.sqlite", cwd=tmp_path)
    assert p.returncode == 0 and "| F'. Intensity, market-based | 25.00 gCO2e/kWh | as recorded with the run" in p.stdout, p.stdout[-3000:]


@pytest.mark.parametrize("flag, value", [("--lifetime-years", "1e-320"), ("--lifetime-years", "0.001"), ("--utilisation", "1e-9")])
def test_an_embodied_lifetime_or_utilisation_no_device_has_is_refused(tmp_path, flag, value):
    mark = tmp_path / "ran"
    p = cli("run", "--db", tmp_path / "w.sqlite", "--embodied-kg", "300", flag, value, "--",
            sys.executable, "-c", f"open({str(mark)!r}, 'w')", cwd=tmp_path)
    assert p.returncode == 2 and flag.strip("-").replace("-", "_") in p.stderr and not mark.exists(), p.stderr


def test_run_keeps_the_jobs_exit_code_and_its_json_when_stderr_is_gone(tmp_path):
    # `wattspan run ... 2>&1 | true`: printing the summary raised BrokenPipeError, so rc was 1 and --json never written
    js = tmp_path / "r.json"
    cmd = (f"{sys.executable} -m wattspan.cli run --db {tmp_path / 'r.sqlite'} --json {js} -- "
           f"{sys.executable} -c 'import time, sys; time.sleep(1); sys.exit(7)' 2>&1 | true; exit ${{PIPESTATUS[0]}}")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, env={**os.environ, "WATTSPAN_SIMULATE": "1"})
    assert p.returncode == 7 and json.loads(js.read_text())["exit_code"] == 7


def test_audit_refuses_an_out_it_cannot_write_and_a_damaged_run_in_one_line(tmp_path):
    db = tmp_path / "a.sqlite"
    env = {**os.environ, "WATTSPAN_SIMULATE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, env=env)
    assert run("run", "--db", db, "--", sys.executable, "-c", "pass").returncode == 0
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    for out in (tmp_path / "afile" / "x.md", tmp_path / "adir", "/dev/full"):
        p = run("audit", "--db", db, "--out", out, "--format", "md")
        assert p.returncode == 2 and "--out" in p.stderr and "Traceback" not in p.stderr, p.stderr
    with sqlite3.connect(db) as c:
        rid, s = c.execute("SELECT run_id, summary FROM runs").fetchone()
        d = json.loads(s)
        del d["phases"]
        c.execute("UPDATE runs SET summary = ? WHERE run_id = ?", (json.dumps(d), rid))
    p = run("audit", "--db", db)
    assert p.returncode == 2 and "damaged" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_audit_of_a_run_priced_hour_by_hour_says_so(tmp_path):
    db = tmp_path / "h.sqlite"
    env = {**os.environ, "WATTSPAN_SIMULATE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=120, env=env)
    assert run("run", "--db", db, "--region", "FR", "--", sys.executable, "-c", "pass").returncode == 0
    line = next(x for x in run("audit", "--db", db).stdout.splitlines() if x.startswith("| F."))
    assert "half-hours" in line and "one average applied to every hour" not in line, line
