"""Reading request and batch-step files, refusing bad rows with file and line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

from ..devices import device_key
from ..errors import InputError
from .inputs import Requests, Steps

__all__ = ["read_requests_jsonl", "read_batches_jsonl"]


_INT64_MAX = 2**63 - 1
_OPTIONAL_TEXT = ("route", "model", "tenant")
_OPTIONAL_COUNTS = ("prompt_tokens", "output_tokens")


_MAX_DEPTH = 32  # nesting deeper than any row of these files needs


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(path, 0, f"cannot open: {exc.strerror or exc}") from None
    with fh:
        seen = False
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark, as the trace reader allows
            except UnicodeDecodeError as exc:
                raise InputError(path, n, f"is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
            if not line.strip():
                continue
            seen = True
            if _too_deep(line):
                raise InputError(path, n, f"JSON nested more than {_MAX_DEPTH} levels deep")
            try:
                row = _DECODER.decode(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, n, f"not valid JSON ({exc.msg})") from None
            except (RecursionError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
                raise InputError(path, n, f"not usable JSON ({exc})") from None
            if not isinstance(row, dict):
                raise InputError(path, n, "each line must be a JSON object")
            yield n, row
        if not seen:
            raise InputError(path, 0, "is empty: expected one JSON object per line")


class _Constant(float):
    """JSON's ``NaN``/``Infinity``/``-Infinity``: read as NaN, so every check refuses it as no number
    (``0 <= x`` is False), and named as written in the error."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> "_Constant":
        self = super().__new__(cls, "nan")
        self.text = text
        return self

    def __repr__(self) -> str:
        return self.text


#: one decoder for every line (``json.loads`` with an argument builds a new one per call)
_DECODER = json.JSONDecoder(parse_constant=_Constant)


def _short(v: object) -> str:
    r = repr(v) if not isinstance(v, int) or v.bit_length() < 200 else f"an integer of about {int(v.bit_length() * 0.30103) + 1} digits"
    return r if len(r) <= 60 else r[:57] + "..."


def _too_deep(line: str) -> bool:
    """More than ``_MAX_DEPTH`` open brackets at once (strings aside)? Cheap, no recursion."""
    if line.count("[") + line.count("{") <= _MAX_DEPTH:
        return False
    depth, in_str, esc = 0, False, False
    for ch in line:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > _MAX_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _time(path: Path, n: int, row: dict[str, Any], key: str) -> int:
    v = row.get(key)
    if type(v) is int and 0 <= v <= _INT64_MAX:  # the common case, in one test
        return v
    if key not in row:
        raise InputError(path, n, f"missing {key!r}")
    v = row[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise InputError(path, n, f"{key} must be an integer of nanoseconds, got {_short(v)}")
    if isinstance(v, float) and not v.is_integer():
        raise InputError(path, n, f"{key} must be an integer of nanoseconds, got {_short(v)}")
    v = int(v)
    if not 0 <= v <= _INT64_MAX:
        raise InputError(path, n, f"{key} = {_short(v)} is outside 0..2**63-1")
    return v


def _count(path: Path, n: int, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1e12 or not math.isfinite(v):
        raise InputError(path, n, f"{key} must be a finite number between 0 and 1e12, got {_short(v)}")
    return float(v)


_GPU_SEEN: dict[tuple[type, object], str] = {}  # a device as written (a str or int) -> its key: files name a few
_GPU_SEEN_MAX = 4096


def _gpu(path: Path, n: int, gpu: object) -> str:
    """A device (``0``, ``"gpu0"``) or a device group (``["gpu0", "gpu1"]`` or ``"gpu0,gpu1"``)."""
    t = type(gpu)
    if t is str or t is int:
        k = _GPU_SEEN.get((t, gpu))
        if k is not None:
            return k
        key = _gpu_key(path, n, gpu)
        if len(_GPU_SEEN) < _GPU_SEEN_MAX:
            _GPU_SEEN[(t, gpu)] = key
        return key
    return _gpu_key(path, n, gpu)


def _gpu_key(path: Path, n: int, gpu: object) -> str:
    if isinstance(gpu, list):
        if not gpu or len(gpu) > 1024 or not all(isinstance(g, (str, int)) and not isinstance(g, bool) and str(g).strip() for g in gpu):
            raise InputError(path, n, "'gpu' as a list must name 1..1024 devices, e.g. [\"gpu0\", \"gpu1\"]")
    elif gpu is None or isinstance(gpu, (dict, bool)) or str(gpu).strip() == "" or len(str(gpu)) > 4096:
        raise InputError(path, n, "missing 'gpu' (the device index, e.g. 0, or a group, e.g. [\"gpu0\", \"gpu1\"])")
    key = device_key(gpu)
    if not key or any(not m for m in key.split(",")):
        raise InputError(path, n, f"'gpu' names no device: {_short(gpu)}")
    return key


def read_requests_jsonl(path: str | PathLike[str]) -> tuple[Requests, list[dict[str, Any]]]:
    """Requests from JSONL: ``{"id", "start_ns", "end_ns", "gpu"}`` plus optional
    ``route, model, tenant, prompt_tokens, output_tokens``.

    Returns the columnar :class:`Requests` and the rows as read (for output).
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    ids: dict[str, int] = {}
    for n, row in _rows(path):
        if "id" not in row or not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool) or str(row["id"]) == "":
            raise InputError(path, n, "missing 'id' (a non-empty string)")
        rid = str(row["id"])
        if rid in ids:
            raise InputError(path, n, f"duplicate id {rid!r} (first on line {ids[rid]})")
        ids[rid] = n
        start = _time(path, n, row, "start_ns")
        end = _time(path, n, row, "end_ns")
        if end < start:
            raise InputError(path, n, f"request {rid!r} ends ({end}) before it starts ({start})")
        gpu = _gpu(path, n, row.get("gpu", row.get("device")))
        clean = {"id": rid, "start_ns": start, "end_ns": end, "gpu": gpu}
        for key in _OPTIONAL_TEXT:
            if key in row and row[key] is not None:
                if not isinstance(row[key], str):
                    raise InputError(path, n, f"{key} must be a string")
                clean[key] = row[key][:256]
        for key in _OPTIONAL_COUNTS:
            v = row.get(key)
            if type(v) is int and 0 <= v <= 1_000_000_000_000:  # the common case, in one test
                clean[key] = v
            elif v is not None:
                c = _count(path, n, key, v)
                if not c.is_integer():
                    raise InputError(path, n, f"{key} must be a whole number of tokens, got {_short(row[key])}")
                clean[key] = int(c)
        if "weight" in row:
            clean["weight"] = _count(path, n, "weight", row["weight"])
        rows.append(clean)
    return Requests.from_records(rows), rows


def read_batches_jsonl(path: str | PathLike[str], requests: Requests) -> Steps:
    """Batch steps from JSONL: ``{"start_ns", "end_ns", "gpu", "requests": {"<id>": <tokens>}}``."""
    import numpy as np

    path = Path(path)
    # each step checked and put into the columns as it is read, its entries a step at a time: no list of rows held
    index = {rid: i for i, rid in enumerate(requests.ids.tolist())}
    starts: list[int] = []
    ends: list[int] = []
    devs: list[str] = []
    lines: list[int] = []  # each step's line, to name the first bad token count
    e_req: list[int] = []
    e_tok: list[Any] = []  # every entry's token count as read: checked as one array at the end
    e_n: list[int] = []  # entries per step
    for n, row in _rows(path):
        start = _time(path, n, row, "start_ns")
        end = _time(path, n, row, "end_ns")
        if end <= start:
            raise InputError(path, n, f"batch step ends ({end}) at or before it starts ({start})")
        gpu = _gpu(path, n, row.get("gpu", row.get("device")))
        reqs = row.get("requests")
        if not isinstance(reqs, dict) or not reqs:
            raise InputError(path, n, "'requests' must be a non-empty object {request id: tokens}")
        try:
            e_req.extend(map(index.__getitem__, reqs))
        except KeyError as exc:
            raise InputError(path, n, f"batch step names unknown request {exc.args[0]!r} (not in the requests file)") from None
        e_tok.extend(reqs.values())
        e_n.append(len(reqs))
        lines.append(n)
        starts.append(start)
        ends.append(end)
        devs.append(gpu)
    counts = np.array(e_n, dtype=np.int64)
    tok = None
    if set(map(type, e_tok)) <= {int, float}:  # the common case, checked as one array (bools, strings, None fail)
        try:
            tok = np.array(e_tok, dtype=np.float64)
        except OverflowError:  # an int beyond float64
            tok = None
        if tok is not None and not bool(((tok >= 0) & (tok <= 1e12)).all()):  # NaN fails too
            tok = None
    if tok is None:  # the first bad one, named with its line
        first = np.concatenate(([0], np.cumsum(counts)))
        for i, n in enumerate(lines):
            entries = e_tok[first[i] : first[i + 1]]
            rids = requests.ids[np.array(e_req[first[i] : first[i + 1]], dtype=np.int64)]
            for rid, v in zip(rids.tolist(), entries):
                _count(path, n, f"tokens of {rid!r}", v)
        raise AssertionError("a bad token count was not found")  # pragma: no cover
    return Steps(
        start_ns=np.array(starts, dtype=np.int64),
        end_ns=np.array(ends, dtype=np.int64),
        device=np.array(devs, dtype=object),
        entry_step=np.repeat(np.arange(len(counts), dtype=np.int64), counts),
        entry_request=np.array(e_req, dtype=np.int64),
        entry_tokens=tok,
    )
