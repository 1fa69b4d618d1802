"""What every benchmark here shares: results written only when asked, progress, missing tools said.

``--record`` writes the results file under ``benchmarks/results/`` (the one the README
quotes); ``--out PATH`` writes them elsewhere; without either the results are only
printed, so a trial run never overwrites the recorded figures.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_T0 = time.monotonic()


def add_output_args(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--record", action="store_true", help=f"write the results to benchmarks/results/{name} (the file the README quotes)")
    ap.add_argument("--out", type=Path, default=None, help="write the results to this file instead (default: print only)")


def write_results(args, name: str, text: str) -> Path | None:
    """Write ``text`` where ``--record`` / ``--out`` say; return the path, or None (printed only)."""
    path = args.out if getattr(args, "out", None) is not None else (RESULTS / name if getattr(args, "record", False) else None)
    if path is None:
        progress(f"results printed only; --record writes benchmarks/results/{name}")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    progress(f"wrote {path}")
    return path


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def need_tool(name: str, what: str, install: str) -> bool:
    """Whether ``name`` is on PATH; if not, warn on stderr (what is left out, and how to install it)."""
    if shutil.which(name):
        return True
    print(f"WARNING: `{name}` not found on PATH: {what} is left out (n/a). Install it: {install}", file=sys.stderr, flush=True)
    return False


def http_scope(path: str = "/", headers: tuple[tuple[bytes, bytes], ...] = ()) -> dict:
    """A plain HTTP GET's ASGI scope on loopback, for driving an app in process (copy it per request)."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"127.0.0.1"), *headers], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}


async def empty_receive() -> dict:
    """ASGI ``receive``: a request with no body."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def ignore_send(message: dict) -> None:
    """ASGI ``send`` that drops what the app sends."""


def time_sinks(meter) -> dict[str, int]:
    """Wrap each of ``meter``'s sinks' ``on_records`` (an instance attribute over the method) to add
    its thread CPU time to the returned dict, ns by sink class name."""
    import time

    sink_ns: dict[str, int] = {}
    for sink in meter.sinks:
        def timed(records, _fn=sink.on_records, _name=type(sink).__name__):
            t = time.thread_time_ns()
            try:
                _fn(records)
            finally:
                sink_ns[_name] = sink_ns.get(_name, 0) + time.thread_time_ns() - t
        sink.on_records = timed
    return sink_ns


def band_made_of(parts, top: int = 2) -> str:
    """The ``top`` sources holding most of a band's variance: ``parts`` are devices' ``band_parts``
    (each source's mean share of its requests' band variance), averaged with equal weight."""
    parts = [p for p in parts if p]
    if not parts:
        return "-"
    mean = {k: sum(p.get(k, 0.0) for p in parts) / len(parts) for k in {k for p in parts for k in p}}
    return ", ".join(f"{k} {v * 100:.0f} %" for k, v in sorted(mean.items(), key=lambda kv: -kv[1])[:top])
