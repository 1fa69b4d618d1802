"""``wattspan attribute`` on hostile files: exit 2 with a ``file:line`` message, never a traceback
(reliability item 12). Hypothesis builds request and batch files from valid rows, mutated:
binary bytes, deep nesting, huge and odd numbers, wrong types, truncation."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wattspan.cli import main

T0 = 1_000_000_000_000
TRACE = "time_ns,gpu,power_w\n" + "".join(f"{T0 + i * 10_000_000},0,{60 + (i % 7) * 20}\n" for i in range(200))

NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, 2**63 - 1, -1, 0, 10**300, 1e308, 1e-308]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(NUMBERS, st.booleans(), st.none(), st.text(max_size=12))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def values(draw):
    kind = draw(st.sampled_from(["scalar", "list", "dict", "deep"]))
    if kind == "scalar":
        return json.dumps(draw(SCALARS))
    if kind == "list":
        return json.dumps(draw(st.lists(SCALARS, max_size=3)))
    if kind == "dict":
        return json.dumps(draw(st.dictionaries(st.text(max_size=6), SCALARS, max_size=3)))
    return _deep(draw(st.integers(1, 50_000)))


def _request(i: int) -> dict:
    return {"id": f"r{i}", "start_ns": T0 + i * 100_000_000, "end_ns": T0 + i * 100_000_000 + 50_000_000, "gpu": 0}


@st.composite
def request_file(draw) -> bytes:
    lines = []
    for i in range(draw(st.integers(1, 6))):
        row = _request(i)
        text = json.dumps(row)
        how = draw(st.sampled_from(["keep", "field", "drop", "bytes", "truncate", "raw"]))
        if how == "field":
            key = draw(st.sampled_from(["id", "start_ns", "end_ns", "gpu", "prompt_tokens", "output_tokens", "route", "model", "weight"]))
            row.pop(key, None)
            text = json.dumps(row)[:-1] + f', "{key}": ' + draw(values()) + "}"
        elif how == "drop":
            row.pop(draw(st.sampled_from(sorted(row))))
            text = json.dumps(row)
        elif how == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif how == "raw":
            text = draw(values())
        data = text.encode()
        if how == "bytes":
            pos = draw(st.integers(0, len(data)))
            data = data[:pos] + draw(st.binary(min_size=1, max_size=4)) + data[pos:]
        lines.append(data)
    return b"\n".join(lines) + b"\n"


@st.composite
def batch_file(draw) -> bytes:
    lines = []
    for i in range(draw(st.integers(1, 4))):
        r = _request(i)
        row = {"start_ns": r["start_ns"], "end_ns": r["end_ns"], "gpu": 0, "requests": {r["id"]: 3}}
        key = draw(st.sampled_from(["start_ns", "end_ns", "gpu", "requests", None]))
        text = json.dumps(row)
        if key is not None:
            row.pop(key)
            text = json.dumps(row)[:-1] + (", " if row else "") + f'"{key}": ' + draw(values()) + "}"
        lines.append(text.encode())
    if draw(st.booleans()):
        lines.append(draw(st.binary(max_size=20)))
    return b"\n".join(lines) + b"\n"


def _run(tmp: Path, requests: bytes, batches: bytes | None, trace: bytes | None = None) -> tuple[int, str]:
    (tmp / "trace.csv").write_bytes(TRACE.encode() if trace is None else trace)
    (tmp / "requests.jsonl").write_bytes(requests)
    args = ["attribute", "--trace", str(tmp / "trace.csv"), "--requests", str(tmp / "requests.jsonl"), "--out", str(tmp / "out.jsonl")]
    if batches is not None:
        (tmp / "batches.jsonl").write_bytes(batches)
        args += ["--batches", str(tmp / "batches.jsonl")]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(args)
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, err.getvalue()


_WHERE = re.compile(r"^wattspan: error: \S+(requests\.jsonl|batches\.jsonl|trace\.csv)(:\d+)?: \S", re.M)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests=request_file(), batches=st.one_of(st.none(), batch_file()))
def test_every_malformed_file_is_exit_2_with_file_and_line_or_a_clean_result(tmp_path, requests, batches):
    rc, err = _run(tmp_path, requests, batches)  # an uncaught exception fails the test here
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert _WHERE.search(err), err
        assert "Traceback" not in err


def test_the_issue_s_three_files(tmp_path):
    cases = {
        "binary bytes": b'{"id": "a", "start_ns": 1, "end_ns": 2, "gpu": 0}\n\xff\xfe\x00\n',
        "deep nesting": _deep(100_000).encode() + b"\n",
        "a huge int": b'{"id": "a", "start_ns": 1, "end_ns": 2, "gpu": 0, "prompt_tokens": 1' + b"0" * 5000 + b"}\n",
    }
    for what, data in cases.items():
        rc, err = _run(tmp_path, data, None)
        assert rc == 2 and _WHERE.search(err), (what, err)
    step = b'{"start_ns": %d, "end_ns": %d, "gpu": 0, "requests": {"r0": 1}}\n' % (2**63, 2**63 + 5)
    rc, err = _run(tmp_path, json.dumps(_request(0)).encode() + b"\n", step)
    assert rc == 2 and "batches.jsonl:1:" in err


@st.composite
def trace_file(draw) -> bytes:
    lines = TRACE.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["field", "bytes", "drop", "extra"]))
        cells = lines[i].split(",")
        if how == "field":
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.one_of(NUMBERS.map(str), st.text(max_size=8)))
            lines[i] = ",".join(cells)
        elif how == "bytes":
            lines[i] = lines[i] + draw(st.binary(min_size=1, max_size=4)).decode("latin-1")
        elif how == "drop":
            lines[i] = ",".join(cells[:-1])
        else:
            lines[i] = lines[i] + ",1"
    return "\n".join(lines).encode("latin-1", "replace") + b"\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(trace=trace_file())
def test_every_malformed_trace_is_exit_2_with_file_and_line_or_a_clean_result(tmp_path, trace):
    rc, err = _run(tmp_path, b"".join(json.dumps(_request(i)).encode() + b"\n" for i in range(5)), None, trace)
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert _WHERE.search(err), err


# --------------------------------------------------------------------------- valid files, hostile contents
# The band's terms need more than a parser's view: idle stretches between busy ones (the idle drift
# term), batches over tens of requests (the components fitted on lifetimes, with the persistent terms from
# cross products), part-time instant readings (the aliasing term), runs of readings as long as a request
# (the groups term). Valid files built to reach them, with the awkward cases in them: a stretch of one
# reading, an idle level of ~0 W, readings up to the CLI's 1e6 W, irregular spacing, a counter beside the
# power, requests of zero length, identical ones, ones outside the trace.

_SENSORS = {  # name: (reading spacing ns, --power-kind / window s, energy counter)
    "instant-1ms": (1_000_000, None, False),
    "instant-10ms": (10_000_000, None, False),  # further apart than 5 ms: part-time instant values
    "instant-100ms": (100_000_000, None, False),
    "average-100ms": (100_000_000, 1.0, False),
    "counter-20ms": (20_000_000, None, True),
}


@st.composite
def banded_run(draw) -> tuple[bytes, bytes, bytes, list[str]]:
    import numpy as np

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spacing, window_s, counter = _SENSORS[draw(st.sampled_from(sorted(_SENSORS)))]
    idle_w = draw(st.sampled_from([0.0, 1e-9, 0.5, 90.0, 9e5]))
    drift = draw(st.sampled_from([0.0, 0.05]))  # relative move of the idle level from stretch to stretch
    n_busy = draw(st.integers(1, 3))
    idle_ns = draw(st.sampled_from([spacing, 2 * spacing, 300_000_000, 2_000_000_000]))  # one reading up to 2 s
    busy_ns = draw(st.sampled_from([1_000_000_000, 3_000_000_000]))
    irregular = draw(st.booleans())
    grid = 1_000_000  # the true power on a 1 ms grid
    spans = [("idle", idle_ns)] + [x for _ in range(n_busy) for x in (("busy", busy_ns), ("idle", idle_ns))]
    total = sum(d for _, d in spans)
    n_grid = total // grid
    power = np.empty(n_grid)
    req_rows: list[dict] = []
    step_rows: list[dict] = []
    pos, k = 0, 0
    for what, d in spans:
        lo, hi = pos // grid, (pos + d) // grid
        level = idle_w * (1.0 + drift * rng.standard_normal())
        power[lo:hi] = max(level, 0.0)
        if what == "busy":
            n_req = int(rng.integers(20, 60))
            starts = np.sort(rng.integers(pos, pos + d - 50_000_000, n_req))
            ends = np.minimum(starts + rng.integers(20_000_000, d // 2, n_req), pos + d)
            ids = [f"r{k + i}" for i in range(n_req)]
            k += n_req
            req_rows += [{"id": i, "start_ns": T0 + int(s), "end_ns": T0 + int(e), "gpu": 0} for i, s, e in zip(ids, starts, ends)]
            t = pos
            while t + 20_000_000 <= pos + d:
                live = [(i, int(rng.integers(1, 400))) for i, s, e in zip(ids, starts, ends) if s <= t < e]
                step = int(rng.integers(5_000_000, 20_000_000))
                if live:
                    tok = sum(v for _, v in live)
                    step_rows.append({"start_ns": T0 + t, "end_ns": T0 + t + step, "gpu": 0, "requests": dict(live)})
                    power[t // grid:(t + step) // grid] += min(50.0 + 0.2 * tok, 9e4)
                t += step + 1_000_000
        pos += d
    np.minimum(power, 1e6, out=power)  # the CLI's plausible maximum
    # the readings: instant values, averages over the window, and optionally the counter's cumulative J
    gaps = rng.uniform(0.3, 1.7, total // spacing + 2) if irregular else np.ones(total // spacing + 2)
    t_read = np.unique(np.cumsum(np.maximum((gaps * spacing).astype(np.int64), 1)))
    t_read = t_read[t_read < total]
    cum = np.concatenate(([0.0], np.cumsum(power) * grid * 1e-9))
    cell = np.minimum(t_read // grid, n_grid - 1)
    if window_s is not None:
        w = int(window_s * 1e9) // grid
        a_i = np.maximum(cell - w, 0)
        pw = (cum[cell] - cum[a_i]) / np.maximum(cell - a_i, 1) / (grid * 1e-9)
        pw[cell == a_i] = power[cell[cell == a_i]]
    else:
        pw = power[cell]
    head = "time_ns,gpu,power_w" + (",energy_j" if counter else "")
    lines = [head] + [f"{T0 + int(t)},0,{p:.9g}" + (f",{cum[c]:.9g}" if counter else "") for t, p, c in zip(t_read, pw, cell)]
    # awkward requests beside the real ones
    first = req_rows[0]
    req_rows += [
        {"id": "zero", "start_ns": first["start_ns"], "end_ns": first["start_ns"], "gpu": 0},
        {"id": "twin-a", "start_ns": first["start_ns"], "end_ns": first["end_ns"], "gpu": 0},
        {"id": "twin-b", "start_ns": first["start_ns"], "end_ns": first["end_ns"], "gpu": 0},
        {"id": "before", "start_ns": T0 - 5 * 10**9, "end_ns": T0 - 10**9, "gpu": 0},
        {"id": "after", "start_ns": T0 + total + 10**9, "end_ns": T0 + total + 2 * 10**9, "gpu": 0},
    ]
    if draw(st.integers(0, 4)) == 0:  # one request over the whole trace: nothing is ever idle
        req_rows.append({"id": "across", "start_ns": T0 - 10**9, "end_ns": T0 + total + 10**9, "gpu": 0})
    extra = [] if window_s is None else ["--power-kind", "average", "--power-window-s", str(window_s)]
    return ("\n".join(lines) + "\n").encode(), "".join(json.dumps(r) + "\n" for r in req_rows).encode(), \
        "".join(json.dumps(r) + "\n" for r in step_rows).encode(), extra


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield float(x)


def _strict(text: str):
    def no_constants(c: str):
        raise ValueError(f"{c} in the output")
    return json.loads(text, parse_constant=no_constants)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(run=banded_run())
def test_every_band_is_finite_and_brackets_its_estimate_on_awkward_valid_runs(tmp_path, run):
    trace, requests, batches, extra = run
    for f, data in (("trace.csv", trace), ("requests.jsonl", requests), ("batches.jsonl", batches)):
        (tmp_path / f).write_bytes(data)
    args = ["attribute", "--trace", str(tmp_path / "trace.csv"), "--requests", str(tmp_path / "requests.jsonl"),
            "--batches", str(tmp_path / "batches.jsonl"), "--out", str(tmp_path / "out.jsonl"),
            "--summary", str(tmp_path / "summary.json"), *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(args)
    assert rc == 0, err.getvalue()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for dev in summary["devices"].values():  # the band's terms (a model's r2 may be NaN: too few readings to fit)
        assert all(math.isfinite(v) for v in _numbers(dev.get("noise") or {})), dev["noise"]
    rows = [_strict(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == requests.count(b"\n")
    for r in rows:
        e, lo, hi = r["energy_j"], r["energy_j_low"], r["energy_j_high"]
        assert 0.0 <= lo <= e <= hi, r
