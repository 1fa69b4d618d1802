"""What `wattspan proxy` costs, against talking to the upstream directly.

    python benchmarks/proxy_overhead.py [--streams 1,16,100] [--seconds 6] [--rounds 3] [--record]

A fast local upstream (``--serve-upstream``: raw ASGI under uvicorn, one process)
answers like an OpenAI-compatible server: streamed completions send ``--tokens``
SSE events, one every ``--token-interval-ms`` per stream (a decode step), and the
usage chunk when asked (``stream_options.include_usage``); non-streamed
completions answer at once with a JSON body and its ``usage``. ``wattspan proxy``
runs as users run it (the CLI, defaults: request id header, provisional energy in
``usage``, simulated power) in its own process. One client process (raw asyncio
HTTP/1.1, one keep-alive connection per stream, so the client costs the same in
both modes) drives each phase for ``--seconds``:

* **streamed**: ``N`` concurrent streams, back to back; tokens/s delivered, time
  to first token (TTFT) and whole-stream time, and the proxy's CPU per streamed
  token (its process's user+system CPU over the phase / tokens);
* **non-streamed**: ``N`` concurrent clients sending small JSON completions back to
  back; request latency p50/p99.

Phases alternate direct / via the proxy within each of ``--rounds`` rounds; the
table gives medians over rounds, added latency = proxy - direct, and the
tokens/s ratio per round (median and range). Prints the table; writes
``benchmarks/results/proxy_overhead.md`` only with ``--record``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import add_output_args, progress, write_results  # noqa: E402


# ---------------------------------------------------------------------- the upstream


def make_upstream(tokens_default: int, interval_s: float):
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        obj = json.loads(body or b"{}")
        rid = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), "direct")
        n = int(obj.get("max_tokens", tokens_default))
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        if not obj.get("stream"):
            out = json.dumps({"id": f"cmpl-{rid}", "object": "text_completion", "model": "bench", "choices": [{"index": 0, "text": "ok " * n, "finish_reason": "length"}], "usage": usage}, separators=(",", ":")).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        head = f'data: {{"id":"cmpl-{rid}","object":"text_completion","model":"bench","choices":[{{"index":0,"text":"tok'.encode()
        for i in range(n):
            await asyncio.sleep(interval_s)
            await send({"type": "http.response.body", "body": head + str(i).encode() + b' ","finish_reason":null}]}\n\n', "more_body": True})
        if (obj.get("stream_options") or {}).get("include_usage"):
            u = json.dumps({"id": f"cmpl-{rid}", "object": "text_completion", "model": "bench", "choices": [], "usage": usage}, separators=(",", ":"))
            await send({"type": "http.response.body", "body": f"data: {u}\n\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


# ---------------------------------------------------------------------- a lean client


async def _read_response(reader) -> tuple[int, float | None, int]:
    """Status, time of the first token event, token events (choices non-empty)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    first = None
    tokens = 0
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            k = data.count(b"data: {") - data.count(b'"choices":[]')
            if k > 0:
                tokens += k
                if first is None:
                    first = time.perf_counter()
    else:
        i = lower.find(b"content-length:")
        n = int(lower[i + 15 : lower.index(b"\r\n", i)]) if i >= 0 else 0
        await reader.readexactly(n)
        first = time.perf_counter()
    return status, first, tokens


async def _worker(host: str, port: int, stream: bool, tokens: int, stop_at: float, out: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"model": "bench", "prompt": "one two three four", "max_tokens": tokens if stream else 16, "stream": stream}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Authorization: Bearer bench-key\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(req)
            status, first, n = await _read_response(reader)
            t1 = time.perf_counter()
            if status != 200 or (stream and n != tokens):
                raise RuntimeError(f"bad response: status {status}, {n} of {tokens} token events")
            out.append((t0, (first or t1) - t0, t1 - t0, n, t1))
    finally:
        writer.close()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def phase(port: int, streams: int, stream: bool, tokens: int, seconds: float, pid: int | None) -> dict:
    out: list = []

    async def main():
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_worker("127.0.0.1", port, stream, tokens, stop_at, out) for _ in range(streams)))

    c0 = _cpu_s(pid) if pid else 0.0
    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    cpu = (_cpu_s(pid) - c0) if pid else 0.0
    ttft = sorted(x[1] for x in out)
    total = sorted(x[2] for x in out)
    n_tok = sum(x[3] for x in out)

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

    return {"requests": len(out), "wall_s": wall, "tokens": n_tok, "tok_s": n_tok / wall, "req_s": len(out) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "p50": pct(total, 0.5), "p99": pct(total, 0.99),
            "cpu_s": cpu}


# ---------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"proxy_overhead: {what} exited with {proc.returncode} at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"proxy_overhead: {what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", default="1,16,100", help="concurrency levels (default 1,16,100)")
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per phase (default 6)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--tokens", type=int, default=64, help="token events per stream (default 64)")
    ap.add_argument("--token-interval-ms", type=float, default=20.0, help="upstream's time between two tokens of a stream (default 20 ms)")
    add_output_args(ap, "proxy_overhead.md")
    ap.add_argument("--serve-upstream", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.serve_upstream is not None:
        import uvicorn

        uvicorn.run(make_upstream(args.tokens, args.token_interval_ms / 1000), host="127.0.0.1", port=args.serve_upstream, log_level="warning", access_log=False)
        return 0

    levels = [int(x) for x in args.streams.split(",") if x.strip()]
    up_port, px_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WATTSPAN_"))}
    env.update(WATTSPAN_SIMULATE="1", WATTSPAN_PEERS="0", PYTHONPATH=str(ROOT))
    up = subprocess.Popen([sys.executable, __file__, "--serve-upstream", str(up_port), "--tokens", str(args.tokens), "--token-interval-ms", str(args.token_interval_ms)], env=env, cwd=ROOT)
    px = subprocess.Popen([sys.executable, "-m", "wattspan.cli", "proxy", "--upstream", f"http://127.0.0.1:{up_port}", "--port", str(px_port)],
                          env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict = {}
    try:
        _wait(up_port, up, "the upstream")
        _wait(px_port, px, "wattspan proxy")
        for port in (up_port, px_port):  # warm up both paths (the proxy's meter, connection pools)
            phase(port, 4, True, args.tokens, 1.0, None)
            phase(port, 4, False, args.tokens, 1.0, None)
        total = args.rounds * len(levels) * 4
        k = 0
        t_start = time.monotonic()
        for r in range(args.rounds):
            for n in levels:
                for stream in (True, False):
                    order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
                    for mode in order:
                        k += 1
                        port = up_port if mode == "direct" else px_port
                        res = phase(port, n, stream, args.tokens, args.seconds, px.pid if mode == "proxy" else up.pid)
                        results.setdefault((n, stream, mode), []).append(res)
                        left = (time.monotonic() - t_start) / k * (total - k)
                        what = f"{res['tok_s']:,.0f} tok/s" if stream else f"p50 {res['p50'] * 1e3:.2f} ms"
                        progress(f"[{k}/{total}, ~{left:.0f} s left] round {r + 1}: {n} {'streams' if stream else 'clients, non-streamed'}, {mode}: {what}")
    finally:
        _stop(px)
        _stop(up)

    text = report(results, levels, args)
    print(text)
    write_results(args, "proxy_overhead.md", text)
    return 0


def _stack() -> str:
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} event loop, {http} parser"


def report(results: dict, levels: list[int], args) -> str:
    med = statistics.median
    cmd = f"python benchmarks/proxy_overhead.py --streams {args.streams} --seconds {args.seconds:g} --rounds {args.rounds} --tokens {args.tokens} --token-interval-ms {args.token_interval_ms:g} --record"
    lines = [
        "# wattspan proxy: cost against talking to the upstream directly",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.system()}; "
        "shared with other jobs while it ran (timings are noisy; ratios are taken within each round).",
        f"Upstream: raw ASGI under uvicorn ({_stack()}), one process; proxy: `wattspan proxy` defaults under the same uvicorn (request id header, "
        "provisional energy in `usage`, simulated power, access log on), one process; client: one asyncio process, "
        "one keep-alive connection per stream. All on 127.0.0.1.",
        "",
        f"## Streamed: {args.tokens} tokens per stream, one every {args.token_interval_ms:g} ms",
        "",
        "| streams | direct tok/s | proxy tok/s | ratio (median, range) | TTFT p50 added ms | TTFT p99 added ms | stream p50 added ms | stream p99 added ms | proxy CPU us/token |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in levels:
        d, p = results[(n, True, "direct")], results[(n, True, "proxy")]
        ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(d, p)]
        cpu_tok = med(x["cpu_s"] / x["tokens"] * 1e6 for x in p if x["tokens"])
        add = lambda key: med(b[key] - a[key] for a, b in zip(d, p)) * 1e3  # noqa: E731
        lines.append(
            f"| {n} | {med(x['tok_s'] for x in d):,.0f} | {med(x['tok_s'] for x in p):,.0f} | {med(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {add('ttft_p50'):.2f} | {add('ttft_p99'):.2f} | {add('p50'):.2f} | {add('p99'):.2f} | {cpu_tok:.1f} |"
        )
    lines += [
        "",
        "## Non-streamed: small JSON completions, back to back",
        "",
        "| clients | direct req/s | proxy req/s | ratio | latency p50 direct ms | p50 added ms | p99 direct ms | p99 added ms | proxy CPU us/request |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in levels:
        d, p = results[(n, False, "direct")], results[(n, False, "proxy")]
        ratios = [b["req_s"] / a["req_s"] for a, b in zip(d, p)]
        cpu_req = med(x["cpu_s"] / x["requests"] * 1e6 for x in p if x["requests"])
        lines.append(
            f"| {n} | {med(x['req_s'] for x in d):,.0f} | {med(x['req_s'] for x in p):,.0f} | {med(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {med(x['p50'] for x in d) * 1e3:.2f} | {med(b['p50'] - a['p50'] for a, b in zip(d, p)) * 1e3:.2f} "
            f"| {med(x['p99'] for x in d) * 1e3:.2f} | {med(b['p99'] - a['p99'] for a, b in zip(d, p)) * 1e3:.2f} | {cpu_req:.0f} |"
        )
    lines += [
        "",
        "Added = via the proxy minus direct, per round, median over rounds. TTFT is the time from sending the request "
        "to the first token event; stream time to its last byte. Proxy CPU is its whole process (event loop, meter "
        "thread, sampler) over the phase, divided by the tokens (or requests) it delivered.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
