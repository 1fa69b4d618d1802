"""``wattspan attribute`` on hostile files: exit 2 with a ``file:line`` message, never a traceback
(reliability item 12). Hypothesis builds request and batch files from valid rows, mutated:
binary bytes, deep nesting, huge and odd numbers, wrong types, truncation."""

from __future__ import annotations

import contextlib
import io
import json
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
