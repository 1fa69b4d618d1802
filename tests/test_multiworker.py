"""Several worker processes on one GPU: energy is shared across them, not counted once per worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


async def _get(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /work HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.partition(b"\r\n\r\n")[2].decode()


def _run(tmp_path: Path, peers: bool) -> dict[str, list[dict]]:
    out = tmp_path / ("peers" if peers else "alone")
    out.mkdir()
    port = free_port()
    env = {**os.environ, "WATTSPAN_TEST_OUT": str(out), "PYTHONPATH": str(ROOT)}
    if peers:
        env["WATTSPAN_TEST_PEERS"] = str(tmp_path / "peerdir")
    srv = subprocess.Popen([sys.executable, "-m", "uvicorn", "tests.multiworker_app:asgi", "--workers", "2", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                asyncio.run(_get(port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("uvicorn workers did not start")
                time.sleep(0.2)
        time.sleep(1.0)

        async def load():
            pids = set()
            for _ in range(6):  # waves of 24 overlapping requests
                pids |= set(await asyncio.gather(*(_get(port) for _ in range(24))))
            return pids

        pids = asyncio.run(load())
        time.sleep(2.5)  # records become final within a second or so
    finally:
        srv.terminate()
        srv.wait(30)
    assert len(pids) == 2, "both workers should have served requests"
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in out.glob("*.jsonl")}


def _union_s(recs: list[dict]) -> float:
    spans = sorted((r["start_ns"], r["end_ns"]) for r in recs)
    total, cur_s, cur_e = 0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return (total + cur_e - cur_s) / 1e9


def test_two_workers_share_the_gpu_energy_instead_of_counting_it_twice(tmp_path):
    # A constant 100 W GPU: while any request is in flight, 100 W is to be shared.
    alone = _run(tmp_path, peers=False)
    shared = _run(tmp_path, peers=True)
    for by_worker in (alone, shared):
        recs = [r for rs in by_worker.values() for r in rs]
        assert len(recs) >= 140 and len({r["id"] for r in recs}) == len(recs)
    everything = [r for rs in shared.values() for r in rs]
    assert sum(r["energy_j"] for r in everything) == pytest.approx(100.0 * _union_s(everything), rel=0.08)
    # without peers each worker claims the whole GPU whenever one of its own requests runs
    claimed = sum(r["energy_j"] for rs in alone.values() for r in rs)
    assert claimed == pytest.approx(sum(100.0 * _union_s(rs) for rs in alone.values()), rel=0.08)
    assert claimed > 1.05 * 100.0 * _union_s([r for rs in alone.values() for r in rs])
