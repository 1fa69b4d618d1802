"""`wattspan attribute` and `audit --records` on inputs that are valid to parse but doubtful, or
that would destroy data: each is refused in one line (exit 2), or the run goes on with a warning
and its books still close. Real files (the shipped examples, changed as a user's would be), the
real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wattspan.attribution import Requests, Steps, attribute
from wattspan.samples import DeviceTrace

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "examples" / "simulated"
A100 = ROOT / "examples" / "a100"


def wattspan(*args, env=None):
    return subprocess.run([sys.executable, "-m", "wattspan.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=180)


def summary(path: Path) -> dict:
    return json.loads(path.read_text())


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    return p


def refused(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1, p.stderr  # one line
    for w in words:
        assert w in p.stderr, p.stderr


# --- batch steps that give no tokens ------------------------------------------------------------


def test_a_step_that_gives_no_tokens_is_split_equally_never_left_to_no_one():
    # two requests in one step that reports 0 tokens for both: the step's energy is theirs
    t = np.arange(0, 1_000_000_001, 1_000_000, dtype=np.int64)
    power = np.where((t >= 200_000_000) & (t < 600_000_000), 300.0, 100.0)
    tr = {"gpu0": DeviceTrace("gpu0", t, power_w=power)}
    req = Requests.from_records([{"id": "a", "start_ns": 100_000_000, "end_ns": 700_000_000, "gpu": "gpu0"},
                                 {"id": "b", "start_ns": 100_000_000, "end_ns": 700_000_000, "gpu": "gpu0"}])
    steps = Steps.from_records([{"start_ns": 200_000_000, "end_ns": 600_000_000, "gpu": "gpu0", "requests": {"a": 0, "b": 0}}], req)
    res = attribute(tr, req, steps, idle_w=100.0)
    d = res.devices["gpu0"]
    assert res.dynamic_j[0] == pytest.approx(res.dynamic_j[1]) and res.dynamic_j.sum() == pytest.approx(80.0, rel=0.05)
    assert d.attributed_j + d.unattributed_j == pytest.approx(d.measured_j, rel=1e-9)


def test_zero_token_batches_keep_the_dynamic_energy_on_the_requests_and_say_so(tmp_path):
    zero = tmp_path / "batches.jsonl"
    rows = [json.loads(x) for x in (A100 / "batches.jsonl").read_text().splitlines() if x.strip()]
    zero.write_text("".join(json.dumps({**r, "requests": {k: 0 for k in r["requests"]}}) + "\n" for r in rows))
    base, got = tmp_path / "base.json", tmp_path / "zero.json"
    ok(wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--batches", A100 / "batches.jsonl",
                "--out", tmp_path / "b.jsonl", "--summary", base))
    p = ok(wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--batches", zero,
                    "--out", tmp_path / "z.jsonl", "--summary", got))
    assert f"{len(rows)} of {len(rows)} batch step(s) give 0 tokens" in p.stderr
    b, z = summary(base), summary(got)
    # the same requests in flight: what no request carries is the same idle energy (it had all
    # the dynamic energy moved into it: 1,064 J of 1,300 J unattributed)
    assert z["unattributed_j"] == pytest.approx(b["unattributed_j"], rel=0.02)
    assert z["attributed_j"] + z["unattributed_j"] == pytest.approx(z["measured_j"], rel=1e-9)


def test_requests_all_of_weight_zero_still_share_what_they_ran_through():
    t = np.arange(0, 1_000_000_001, 10_000_000, dtype=np.int64)
    tr = {"gpu0": DeviceTrace("gpu0", t, power_w=np.full(len(t), 200.0))}
    req = Requests.from_records([{"id": "a", "start_ns": 0, "end_ns": 500_000_000, "gpu": "gpu0", "weight": 0.0},
                                 {"id": "b", "start_ns": 250_000_000, "end_ns": 1_000_000_000, "gpu": "gpu0", "weight": 0.0}])
    res = attribute(tr, req, None, idle_w=100.0)
    d = res.devices["gpu0"]
    assert d.unattributed_j == pytest.approx(0.0, abs=1e-6)  # something was in flight the whole time
    assert res.energy_j.sum() == pytest.approx(d.measured_j, rel=1e-9) and res.energy_j[0] > 0 and res.energy_j[1] > 0


# --- outputs that would destroy an input --------------------------------------------------------


@pytest.mark.parametrize("option, victim", [("--out", "requests"), ("--summary", "trace"), ("--out", "batches")])
def test_an_output_naming_an_input_is_refused_and_the_input_kept(tmp_path, option, victim):
    files = {"trace": tmp_path / "trace.csv", "requests": tmp_path / "requests.jsonl", "batches": tmp_path / "batches.jsonl"}
    for k, f in files.items():
        f.write_bytes((SIM / f.name).read_bytes())
    before = files[victim].read_bytes()
    other = "--summary" if option == "--out" else "--out"
    p = wattspan("attribute", "--trace", files["trace"], "--requests", files["requests"], "--batches", files["batches"],
                 option, files[victim], other, tmp_path / "other.out")
    refused(p, f"{option} and --{victim} name one file", "destroy the input")
    assert files[victim].read_bytes() == before


# --- values that parse but make no sense --------------------------------------------------------


def test_an_averaging_window_below_a_nanosecond_is_a_usage_error_not_a_traceback(tmp_path):
    p = wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl",
                 "--power-kind", "average", "--power-window-s", "5e-10", "--out", tmp_path / "o.jsonl")
    refused(p, "--power-window-s must be >=")


def test_a_counter_in_millijoules_beside_power_in_watts_is_named(tmp_path):
    lines = (SIM / "trace.csv").read_text().splitlines()
    head, rows = lines[0], [r.split(",") for r in lines[1:]]
    mj = tmp_path / "trace.csv"
    mj.write_text(head + "\n" + "".join(f"{t},{g},{pw},{float(e) * 1000:.3f}\n" for t, g, pw, e in rows))
    p = ok(wattspan("attribute", "--trace", mj, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "its energy counter averages" in p.stderr and "mJ read as J" in p.stderr
    p = ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "warning" not in p.stderr  # the shipped trace's counter and power agree


@pytest.mark.parametrize("what", ["power-mW", "counter-mJ"])
def test_readings_a_thousand_times_too_large_are_named(tmp_path, what):
    # one set of units throughout (no counter to compare against): only the magnitude gives it away
    lines = (SIM / "trace.csv").read_text().splitlines()
    head = lines[0]
    rows = [r.split(",") for r in lines[1:]]
    bad = tmp_path / "trace.csv"
    if what == "power-mW":
        bad.write_text("time_ns,gpu,power_w\n" + "".join(f"{t},{g},{float(pw) * 1000:.1f}\n" for t, g, pw, _ in rows))
    else:
        bad.write_text(head + "\n" + "".join(f"{t},{g},,{float(e) * 1000:.3f}\n" for t, g, _, e in rows))
    p = ok(wattspan("attribute", "--trace", bad, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "more than any one accelerator draws" in p.stderr and "not mW" in p.stderr, p.stderr


def test_a_glitch_reading_above_any_board_is_named(tmp_path):
    lines = (SIM / "trace.csv").read_text().splitlines()
    rows = [r.split(",") for r in lines[1:]]
    rows[len(rows) // 2][2] = "5000.0"
    bad = tmp_path / "trace.csv"
    bad.write_text(lines[0] + "\n" + "".join(",".join(r) + "\n" for r in rows))
    p = ok(wattspan("attribute", "--trace", bad, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "1 power reading(s) above 3000 W" in p.stderr, p.stderr


def _batches(tmp_path, change) -> Path:
    rows = [json.loads(line) for line in (SIM / "batches.jsonl").read_text().splitlines()]
    out = tmp_path / "batches.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in change(rows)))
    return out


def _attribute(tmp_path, batches, name):
    return ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", batches,
                       "--out", tmp_path / f"{name}.jsonl"))


def _energies(tmp_path, name) -> dict:
    return {r["id"]: r["energy_j"] for r in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines())}


def test_batch_steps_appended_twice_are_named_and_counted_once(tmp_path):
    p = _attribute(tmp_path, SIM / "batches.jsonl", "ref")
    assert "warning" not in p.stderr, p.stderr
    p = _attribute(tmp_path, _batches(tmp_path, lambda rows: rows + rows[:40]), "dup")
    assert "40 batch step(s)" in p.stderr and "repeat an earlier line exactly" in p.stderr, p.stderr
    ref, dup = _energies(tmp_path, "ref"), _energies(tmp_path, "dup")
    assert ref.keys() == dup.keys() and all(abs(dup[k] - ref[k]) <= 1e-9 * max(ref[k], 1.0) for k in ref)


def test_a_step_with_more_tokens_than_any_accelerator_processes_is_named(tmp_path):
    def huge(rows):
        rows[60]["requests"] = {k: 1e9 for k in rows[60]["requests"]}
        return rows
    p = _attribute(tmp_path, _batches(tmp_path, huge), "huge")
    assert "1 batch step(s)" in p.stderr and "tokens a second" in p.stderr, p.stderr


def test_requests_in_no_batch_step_are_counted(tmp_path):
    def without_first(rows):
        victim = next(iter(rows[0]["requests"]))
        for r in rows:
            r["requests"].pop(victim, None)
        return [r for r in rows if r["requests"]]
    p = _attribute(tmp_path, _batches(tmp_path, without_first), "lone")
    assert "1 of " in p.stderr and "appear in no step" in p.stderr, p.stderr


def test_a_hole_in_power_only_readings_is_named(tmp_path):
    lines = (SIM / "trace.csv").read_text().splitlines()
    rows = [r.split(",") for r in lines[1:]]
    gap = tmp_path / "trace.csv"
    shift = lambda i, t: int(t) + (3_600 * 10**9 if i > 700 else 0)  # noqa: E731
    gap.write_text("time_ns,gpu,power_w\n" + "".join(f"{shift(i, t)},{g},{pw}\n" for i, (t, g, pw, _) in enumerate(rows)))
    p = ok(wattspan("attribute", "--trace", gap, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "1 hole(s) in its readings" in p.stderr and "3600 s" in p.stderr
    no_gap = tmp_path / "plain.csv"
    no_gap.write_text("time_ns,gpu,power_w\n" + "".join(f"{t},{g},{pw}\n" for t, g, pw, _ in rows))
    p = ok(wattspan("attribute", "--trace", no_gap, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "hole" not in p.stderr


@pytest.mark.parametrize("cell", ["1_000_148_265_196", "\u0661\u0660\u0660\u0660"])
def test_numbers_only_python_reads_are_refused_with_the_line(tmp_path, cell):
    lines = (SIM / "trace.csv").read_text().splitlines()
    first = lines[1].split(",")
    bad = tmp_path / "trace.csv"
    bad.write_text("\n".join([lines[0], ",".join([cell, *first[1:]]), *lines[2:]]) + "\n")
    p = wattspan("attribute", "--trace", bad, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl")
    refused(p, "trace.csv:2:", "not a plain number")


def test_a_fraction_of_a_token_is_refused_not_truncated(tmp_path):
    rows = (SIM / "requests.jsonl").read_text().splitlines()
    r0 = json.loads(rows[0])
    req = tmp_path / "requests.jsonl"
    req.write_text("\n".join([json.dumps({**r0, "prompt_tokens": 203.7}), *rows[1:]]) + "\n")
    refused(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", req, "--out", tmp_path / "o.jsonl"),
            "requests.jsonl:1:", "whole number of tokens")
    req.write_text("\n".join([json.dumps({**r0, "prompt_tokens": 203.0}), *rows[1:]]) + "\n")  # a whole number written as a float
    ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", req, "--out", tmp_path / "o.jsonl"))


# --- what the summary prints and says ---------------------------------------------------------


def test_control_characters_in_a_route_are_shown_escaped_in_the_summary(tmp_path):
    rows = (SIM / "requests.jsonl").read_text().splitlines()
    req = tmp_path / "requests.jsonl"
    req.write_text("\n".join(json.dumps({**json.loads(r), "route": "/v1/a\n\x1b[31mred"}) for r in rows) + "\n")
    p = ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", req, "--out", tmp_path / "o.jsonl"))
    assert "\x1b" not in p.stdout and "/v1/a\\n\\x1b[31mred"[:27] in p.stdout


def test_a_lag_for_device_0_is_the_lag_of_gpu0_and_no_warning(tmp_path):
    s = tmp_path / "s.json"
    p = ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl",
                    "--board-lag-ms", "0=4", "--out", tmp_path / "o.jsonl", "--summary", s))
    assert "--board-lag-ms names" not in p.stderr
    assert summary(s)["devices"]["gpu0"]["model"]["lag_tau_s"] == pytest.approx(0.004)
    p = ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl",
                    "--board-lag-ms", "3=4", "--out", tmp_path / "o.jsonl"))
    assert "--board-lag-ms names 3" in p.stderr


@pytest.mark.parametrize("var, value, word", [("WATTSPAN_PUE", "9", "pue"), ("WATTSPAN_INTENSITY", "-3", "intensity"),
                                              ("WATTSPAN_IDLE", "-3", "--idle")])
def test_a_value_refused_from_a_variable_names_the_variable(tmp_path, var, value, word):
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--out", tmp_path / "o.jsonl",
                 env={var: value})
    refused(p, word, f"(from {var}='{value}')")
    flag = {"WATTSPAN_PUE": "--pue", "WATTSPAN_INTENSITY": "--intensity", "WATTSPAN_IDLE": "--idle"}[var]
    p = wattspan("attribute", "--trace", A100 / "trace.csv", "--requests", A100 / "requests.jsonl", "--out", tmp_path / "o.jsonl",
                 flag, value, env={var: "1"})
    refused(p, word)
    assert var not in p.stderr  # the flag's value was refused, not the variable's


# --- audit of attribute's output ----------------------------------------------------------------


def test_audit_of_records_shows_their_band_and_refuses_another_runs_summary(tmp_path):
    recs, s = tmp_path / "r.jsonl", tmp_path / "s.json"
    ok(wattspan("attribute", "--trace", SIM / "trace.csv", "--requests", SIM / "requests.jsonl", "--batches", SIM / "batches.jsonl",
                "--out", recs, "--summary", s))
    rows = [json.loads(x) for x in recs.read_text().splitlines()]
    md = tmp_path / "a.md"
    ok(wattspan("audit", "--records", recs, "--summary", s, "--out", md))
    text = md.read_text()
    lo, hi = sum(r["energy_j_low"] for r in rows), sum(r["energy_j_high"] for r in rows)
    assert "the records' own low and high bounds" in text and "carry no low/high bounds" not in text
    assert f"{lo:,.0f}" in text and f"{hi:,.0f}" in text
    half = tmp_path / "half.jsonl"
    half.write_text("".join(x + "\n" for x in recs.read_text().splitlines()[:60]))
    refused(wattspan("audit", "--records", half, "--summary", s, "--out", tmp_path / "b.md"),
            f"summary of {len(rows)} requests", "the records hold 60 requests")
    ok(wattspan("audit", "--records", half, "--out", tmp_path / "c.md"))  # without the summary: the records alone


def test_a_hole_in_a_counters_readings_is_named(tmp_path):
    lines = (SIM / "trace.csv").read_text().splitlines()
    head, rows = lines[0], [r.split(",") for r in lines[1:]]
    gap = tmp_path / "trace.csv"
    shift = lambda i, t: int(t) + (3_600 * 10**9 if i > 700 else 0)  # noqa: E731
    gap.write_text(head + "\n" + "".join(f"{shift(i, t)},{g},{pw},{e}\n" for i, (t, g, pw, e) in enumerate(rows)))
    p = ok(wattspan("attribute", "--trace", gap, "--requests", SIM / "requests.jsonl", "--out", tmp_path / "o.jsonl"))
    assert "1 hole(s) in its readings" in p.stderr and "spread evenly over the hole" in p.stderr, p.stderr


def test_a_board_that_is_never_idle_is_named_when_its_baseline_is_a_guess(tmp_path):
    # no idle stretch and no step model: the baseline was a low quantile of busy readings, silently
    t0 = 10**12
    trace = tmp_path / "trace.csv"
    trace.write_text("time_ns,gpu,power_w\n" + "".join(f"{t0 + i * 10**8},0,{200 + 20 * (i % 7)}\n" for i in range(300)))
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("".join(json.dumps({"id": f"r{i}", "start_ns": t0 + (i - 1) * 10**9, "end_ns": t0 + (i + 3) * 10**9, "gpu": 0}) + "\n"
                            for i in range(31)))
    p = ok(wattspan("attribute", "--trace", trace, "--requests", reqs, "--out", tmp_path / "o.jsonl"))
    assert "no idle stretch" in p.stderr and "--idle" in p.stderr, p.stderr
    p = ok(wattspan("attribute", "--trace", trace, "--requests", reqs, "--idle", "70", "--out", tmp_path / "o.jsonl"))
    assert "no idle stretch" not in p.stderr
