"""``wattspan bench``: run the phases against a server, read wattspan's records, write the report.

The server under test runs in another process: by default ``wattspan demo --serve`` is
started as a subprocess (and always stopped); ``--url`` takes your own server (running
``EnergyMiddleware(request_id_header="x-wattspan-request-id")`` with a ledger whose file
you pass as ``--db``) or the metering proxy. Per-request energy comes from the ledger's
records, matched to the request id each response carries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

from ..records import json_safe

__all__ = ["BenchConfig", "BenchError", "add_bench_arguments", "config_from_args", "run_bench"]

ID_HEADER = "x-wattspan-request-id"
_DEFAULT_REGIONS = ("world", "aws:us-east-1", "gcp:europe-north1", "IND")
_DEFAULT_RATES = (4.0, 16.0)
_DEFAULT_CONCURRENCY = (8,)
_MODES = ("open", "closed", "batch")
_LOAD_FORMAT = "wattspan-bench-load/1"


class BenchError(Exception):
    """A problem the user can fix; the message says how."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run depends on (written into ``report.json``)."""

    url: str | None
    db: str | None
    out: str
    workload: str
    requests: int
    max_tokens: int
    model: str | None
    stream: bool
    seed: int
    modes: tuple[str, ...]
    rates: tuple[float, ...]
    concurrency: tuple[int, ...]
    batch_size: int
    batch_path: str
    id_header: str
    warmup: int
    calls: int
    regions: tuple[str, ...]
    intensities: tuple[float, ...]
    pue: float | None
    embodied_kg: float | None
    lifetime_years: float
    include_host: bool
    basis: str
    request_timeout_s: float
    record_timeout_s: float
    server_timeout_s: float
    load_only: bool
    merge: tuple[str, ...]
    start_at: float | None
    progress: bool
    deploy: tuple[str, ...] = ()  # MODE=REGION[@HOURS] (see wattspan.bench.deploy)


# ------------------------------------------------------------------------------------ CLI

def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``wattspan bench``'s options to ``parser`` (a subcommand's parser)."""
    g = parser.add_argument_group("target")
    g.add_argument("--url", default=None, help="base URL of the server to bench (default: start the demo server in a "
                                               "subprocess). It must echo wattspan's request id (EnergyMiddleware "
                                               "request_id_header) and write a ledger: pass its file as --db")
    g.add_argument("--db", default=None, metavar="LEDGER", help="the server's wattspan ledger (SQLite). Required with --url; with the "
                                              "demo server, where to keep its ledger (default: a temporary file)")
    g.add_argument("--id-header", default=ID_HEADER, metavar="NAME", help=f"response header with wattspan's request id (default {ID_HEADER})")
    g.add_argument("--batch-path", default="/v1/batch", metavar="PATH", help="the server's batch endpoint (default /v1/batch)")
    g.add_argument("--model", default=None, help="'model' to put in every request body (default: none)")

    g = parser.add_argument_group("workload and modes")
    g.add_argument("--workload", choices=("completions", "embeddings"), default="completions",
                   help="which API to call (default completions, streamed on demand)")
    g.add_argument("--requests", type=int, default=96, metavar="N", help="requests per phase; the same seeded requests in every phase (default 96)")
    g.add_argument("--max-tokens", type=int, default=32, metavar="N", help="tokens per completion (default 32)")
    g.add_argument("--no-stream", dest="stream", action="store_false", help="on-demand completions without streaming (no TTFT)")
    g.add_argument("--modes", default=",".join(_MODES), help="phases to run, comma-separated from open,closed,batch (default all)")
    g.add_argument("--rate", dest="rates", type=float, action="append", default=None, metavar="REQ_PER_S",
                   help=f"open-loop Poisson rate in requests/s; repeat for several (default {' and '.join(f'{r:g}' for r in _DEFAULT_RATES)})")
    g.add_argument("--concurrency", dest="concurrencies", type=int, action="append", default=None, metavar="N",
                   help=f"closed-loop concurrency; repeat for several (default {_DEFAULT_CONCURRENCY[0]})")
    g.add_argument("--batch-size", type=int, default=48, metavar="N", help="requests per batch in batch mode (default 48)")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and of the Poisson arrivals (default 0)")
    g.add_argument("--warmup", type=int, default=8, metavar="N", help="uncounted requests before the phases (default 8)")

    g = parser.add_argument_group("projection")
    g.add_argument("--calls", type=int, default=1_000_000, metavar="N", help="project to this many API calls (default 1000000)")
    g.add_argument("--region", dest="regions", action="append", default=None, metavar="REGION",
                   help="grid region from the offline table (aws:us-east-1, gcp:europe-west1, FR, world, ...); repeat "
                        f"for several (default {', '.join(_DEFAULT_REGIONS)})")
    g.add_argument("--intensity", dest="intensities", type=float, action="append", default=None, metavar="G_PER_KWH",
                   help="a grid intensity in gCO2e/kWh (a live value), projected as one more region; repeatable")
    g.add_argument("--pue", type=float, default=None, help="PUE for every region (default: the provider's published value, else 1.0)")
    g.add_argument("--embodied-kg", type=float, default=318.0, metavar="KG",
                   help="embodied kgCO2e of the serving device (default 318: one A100's share of an 8-GPU server, "
                        "Chien et al. HotCarbon'23)")
    g.add_argument("--lifetime-years", type=float, default=4.0, metavar="YEARS", help="device life the embodied carbon is spread over (default 4)")
    g.add_argument("--no-embodied", action="store_true", help="leave the embodied share out")
    g.add_argument("--include-host", action="store_true", help="add the host CPU energy wattspan attributed to the requests")
    g.add_argument("--deploy", action="append", default=None, metavar="MODE=REGION[@HOURS]",
                   help="deploy a mode in its own region and hours, e.g. on-demand=FR or batch=DE@cleanest:6 "
                        "(hours: all, cleanest:N, H1-H2 UTC); repeatable")
    g.add_argument("--basis", choices=("dynamic", "attributed", "amortised"), default="amortised",
                   help="idle basis of the verdict and the sensitivity chart (default amortised: all idle time counts)")

    g = parser.add_argument_group("run")
    g.add_argument("--out", default="wattspan-bench", metavar="DIR", help="report directory (default ./wattspan-bench)")
    g.add_argument("--request-timeout-s", type=float, default=120.0, metavar="S", help="per HTTP request (default 120)")
    g.add_argument("--record-timeout-s", type=float, default=30.0, metavar="S", help="wait at most this long for the records to reach the ledger (default 30)")
    g.add_argument("--server-timeout-s", type=float, default=180.0, metavar="S", help="wait at most this long for the demo server to start (default 180)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = parser.add_argument_group("load from several machines")
    g.add_argument("--load-only", action="store_true", help="only send the load (needs --url); write OUT/load.json with "
                                                           "each request's id and timings, no report")
    g.add_argument("--merge", nargs="+", default=None, metavar="LOAD_JSON",
                   help="build one report from several --load-only files (needs --db); sends no load")
    g.add_argument("--start-at", type=float, default=None, metavar="UNIX_S", help="unix time to start the first phase at (to line up several load processes)")


def _list(v, default, cast):
    """An append option's values; a string (from a WATTSPAN_* variable) may hold several, comma-separated."""
    if v is None:
        return tuple(default)
    if isinstance(v, str):
        v = [v]
    out = []
    for x in v:
        parts = x.split(",") if isinstance(x, str) else [x]
        out += [cast(p) for p in parts if str(p).strip()]
    return tuple(out)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Check the options; raises :class:`BenchError` naming what is wrong and how to fix it."""
    def num(name: str, v, lo: float, hi: float, kind=float):
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise BenchError(f"--{name} must be a number, got {v!r}") from None
        if not (math.isfinite(x) and lo <= x <= hi):
            raise BenchError(f"--{name} must be between {lo:g} and {hi:g}, got {v!r}")
        return x

    try:
        rates = _list(args.rates, _DEFAULT_RATES, float)
        conc = _list(args.concurrencies, _DEFAULT_CONCURRENCY, int)
        regions = _list(args.regions, _DEFAULT_REGIONS, str)
        intens = _list(args.intensities, (), float)
    except ValueError as exc:
        raise BenchError(f"bad value in a repeated option: {exc}") from None
    modes = tuple(m.strip() for m in str(args.modes).split(",") if m.strip())
    bad = [m for m in modes if m not in _MODES]
    if bad or not modes:
        raise BenchError(f"--modes takes a comma-separated list from {','.join(_MODES)}, got {args.modes!r}")
    for r in rates:
        num("rate", r, 0.01, 100_000)
    for c in conc:
        num("concurrency", c, 1, 10_000, int)
    for i in intens:
        num("intensity", i, 0, 2500)
    if not regions and not intens:
        raise BenchError("give at least one --region or --intensity to project to")
    url = args.url.rstrip("/") if args.url else None
    if url is not None and not url.startswith(("http://", "https://")):
        raise BenchError(f"--url must start with http:// or https://, got {args.url!r}")
    merge = tuple(args.merge or ())
    if args.load_only and url is None:
        raise BenchError("--load-only sends load to a server you run: give its --url")
    if args.load_only and merge:
        raise BenchError("--load-only and --merge exclude each other: send load first, then merge the files")
    if (url is not None or merge) and not args.load_only and not args.db:
        raise BenchError("give --db: the ledger file your server writes (wattspan's records are where per-request "
                         "energy comes from; see EnergyMiddleware and wattspan.export.ledger.Ledger)")
    if url is None and not merge and args.db and Path(args.db).exists() and not Path(args.db).is_file():
        raise BenchError(f"--db {args.db} exists and is not a file")
    from .._paths import writable_dir, writable_file

    from ..errors import InputError
    from ..export.ledger import check_ledger

    try:  # the report is written after the whole run: a path it cannot write is refused now
        writable_dir(args.out, "--out")
        if url is None and not merge and args.db:
            writable_file(args.db, "--db")
        if not merge and args.db:
            check_ledger(args.db)
    except (ValueError, InputError) as exc:
        raise BenchError(str(exc)) from None
    for f in merge:
        if not Path(f).is_file():
            raise BenchError(f"--merge: no file {f} (give the load.json files written by --load-only)")
    bp = str(args.batch_path)
    if not bp.startswith("/"):
        raise BenchError(f"--batch-path must start with '/', got {bp!r}")
    emb = None if args.no_embodied else num("embodied-kg", args.embodied_kg, 1e-6, 1e6)
    return BenchConfig(
        url=url, db=str(args.db) if args.db else None, out=str(args.out), workload=str(args.workload),
        requests=num("requests", args.requests, 1, 1_000_000, int), max_tokens=num("max-tokens", args.max_tokens, 1, 4096, int),
        model=args.model or None, stream=bool(args.stream), seed=num("seed", args.seed, 0, 2**31 - 1, int), modes=modes,
        rates=tuple(float(r) for r in rates), concurrency=tuple(int(c) for c in conc),
        batch_size=num("batch-size", args.batch_size, 1, 100_000, int), batch_path=bp,
        id_header=str(args.id_header).strip().lower(), warmup=num("warmup", args.warmup, 0, 10_000, int),
        calls=num("calls", args.calls, 1, 1e15, int), regions=regions, intensities=intens,
        pue=None if args.pue is None else num("pue", args.pue, 1.0, 3.0), embodied_kg=emb,
        lifetime_years=num("lifetime-years", args.lifetime_years, 0.01, 50), include_host=bool(args.include_host),
        basis=str(args.basis), request_timeout_s=num("request-timeout-s", args.request_timeout_s, 0.1, 3600),
        record_timeout_s=num("record-timeout-s", args.record_timeout_s, 0, 3600),
        server_timeout_s=num("server-timeout-s", args.server_timeout_s, 1, 3600), load_only=bool(args.load_only),
        merge=merge, start_at=None if args.start_at is None else num("start-at", args.start_at, 0, 1e11),
        progress=bool(args.progress), deploy=_deploys(getattr(args, "deploy", None), args.pue, None if merge or args.load_only else modes),
    )


def _deploys(specs, pue, modes: tuple[str, ...] | None = None) -> tuple[str, ...]:
    from .deploy import DEPLOY_MODES, parse_deploy

    for spec in specs or ():
        try:
            d = parse_deploy(spec, pue=pue)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if modes is not None and not set(DEPLOY_MODES[d.mode]) & set(modes):
            raise BenchError(f"--deploy {spec}: no phase of this run is {d.mode!r} ({'/'.join(DEPLOY_MODES[d.mode])}); "
                             f"--modes is {','.join(modes)}: add the mode, or drop the --deploy")
    return tuple(specs or ())


def _phases(cfg: BenchConfig):
    from .load import PhaseSpec

    out = []
    if "open" in cfg.modes:
        out += [PhaseSpec("open", r) for r in cfg.rates]
    if "closed" in cfg.modes:
        out += [PhaseSpec("closed", c) for c in cfg.concurrency]
    if "batch" in cfg.modes:
        out.append(PhaseSpec("batch", cfg.batch_size))
    return out


# ------------------------------------------------------------------------- demo server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """``wattspan demo --serve`` in a subprocess on 127.0.0.1, stopped on :meth:`stop`."""

    def __init__(self, db: Path, log_path: Path, timeout_s: float = 180.0) -> None:
        self.db, self.log_path, self.timeout_s = Path(db), Path(log_path), float(timeout_s)
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._log: BinaryIO | None = None  # the server's output, while it runs
        self.ready_s = math.nan

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DemoServer:
        import httpx

        cmd = [sys.executable, "-m", "wattspan.cli", "demo", "--serve", "--port", str(self.port), "--db", str(self.db),
               "--embeddings", "0", "--completions", "0"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = t0 + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the demo server exited during start-up (code {self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    self.ready_s = time.monotonic() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise BenchError(f"the demo server was not ready within {self.timeout_s:g} s (--server-timeout-s):\n{self.log_tail()}")

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)  # the demo stops its server, meter and ledger cleanly
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


# ------------------------------------------------------------------------------ running

def _client(cfg: BenchConfig, url: str, n_conn: int):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(cfg.request_timeout_s, connect=30.0),
                             limits=httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn))


async def _check_and_warm(cfg: BenchConfig, url: str, items) -> None:
    """Warm the server up (uncounted) and check it honours the contract: ids in a header, a batch endpoint."""
    from .load import PhaseSpec, batches, closed_loop

    async with _client(cfg, url, 16) as client:
        if cfg.warmup:
            res, _ = await closed_loop(client, items[:cfg.warmup], concurrency=min(4, cfg.warmup), stream=cfg.stream,
                                       id_header=cfg.id_header)
            ok = [r for r in res if r.ok]
            if not ok:
                errs = sorted({r.error for r in res})
                raise BenchError(f"no warm-up request to {url}{items[0].route} succeeded ({'; '.join(errs)[:300]}); is "
                                 "the server up and serving that route? (--workload, --model)")
            if not any(r.rid for r in ok):
                raise BenchError(f"responses from {url} carry no '{cfg.id_header}' header: run the server with "
                                 f"EnergyMiddleware(..., request_id_header='{ID_HEADER}') (or give --id-header)")
        if "batch" in cfg.modes:
            res, _ = await batches(client, items[:2], batch_size=2, path=cfg.batch_path, id_header=cfg.id_header,
                                   prefix=PhaseSpec("batch", 2).name + "-warmup")
            r = res[0]
            if not r.ok:
                raise BenchError(f"the batch endpoint {url}{cfg.batch_path} failed ({r.error}); give --batch-path, or leave "
                                 "batch mode out with --modes open,closed")


async def _run_phases(cfg: BenchConfig, url: str, items, specs) -> list:
    from tqdm import tqdm

    from .load import run_phase

    if cfg.start_at is not None:
        wait = cfg.start_at - time.time()
        if wait > 0:
            print(f"waiting {wait:.1f} s for --start-at", file=sys.stderr)
            await asyncio.sleep(wait)
    n_conn = max([1000] + [int(s.value) for s in specs if s.mode == "closed"])
    out = []
    async with _client(cfg, url, n_conn) as client:
        for k, spec in enumerate(specs):
            with tqdm(total=len(items), desc=f"{spec.name:>14}", unit="call", disable=not cfg.progress, file=sys.stderr,
                      dynamic_ncols=True, leave=True) as bar:
                ph = await run_phase(client, spec, items, seed=cfg.seed + k + 1, stream=cfg.stream,
                                     id_header=cfg.id_header, batch_path=cfg.batch_path, on_done=bar.update)
            out.append(ph)
            await asyncio.sleep(0.3)  # keep phases apart in the records
    return out


def wait_for_records(db: str | Path, ids: set[str], *, since_unix: float, timeout_s: float,
                     progress: bool = False) -> dict[str, dict]:
    """Ledger records for ``ids``, polling until all are there or ``timeout_s`` passed."""
    from tqdm import tqdm

    from ..export.ledger import query

    deadline = time.monotonic() + timeout_s
    found: dict[str, dict] = {}
    with tqdm(total=len(ids), desc="      records", unit="rec", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        while True:
            try:
                rows = query(db, since=since_unix)
            except FileNotFoundError:
                rows = []
            for r in rows:
                if r["id"] in ids and r["id"] not in found:
                    found[r["id"]] = r
                    bar.update(1)
            if len(found) == len(ids) or time.monotonic() >= deadline:
                return found
            time.sleep(0.25)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("wattspan", "numpy", "httpx", "tqdm", "matplotlib", "fastapi", "uvicorn", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _write_load(path: Path, cfg: BenchConfig, phases) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": _LOAD_FORMAT, "config": _cfg_dict(cfg), "host": platform.node(),
           "phases": [p.to_dict() for p in phases]}
    path.write_text(json.dumps(doc, allow_nan=True) + "\n", encoding="utf-8")


def merge_load_files(files) -> tuple[list, dict]:
    """Phases of several ``--load-only`` files merged by name: results together, times on one
    clock (unix), open-loop target rates summed."""
    from .load import PhaseResult, PhaseSpec

    by_name: dict[str, PhaseResult] = {}
    first_cfg = None
    seen: dict[str, str] = {}  # request id -> the file that holds it
    for f in files:
        try:
            doc = json.loads(Path(f).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise BenchError(f"--merge: cannot read {f}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != _LOAD_FORMAT:
            raise BenchError(f"--merge: {f} is not a file written by `wattspan bench --load-only`")
        try:
            first_cfg = first_cfg or doc["config"]
            phases = [(d["name"], PhaseResult.from_dict(d)) for d in doc["phases"]]
        except (KeyError, TypeError, ValueError) as exc:  # an edited file, or another version's
            raise BenchError(f"--merge: {f} is damaged: {type(exc).__name__} {exc} (was it edited?)") from None
        for r in (r for _, ph in phases for r in ph.results if r.rid):  # one load given twice would count twice
            if r.rid in seen:
                raise BenchError(f"--merge: request {r.rid!r} is in both {seen[r.rid]} and {f}: the same load given twice? "
                                 "(each client's file once)")
            seen[r.rid] = str(f)
        for name, ph in phases:
            d = {"name": name}
            m = by_name.get(d["name"])
            if m is None:
                by_name[d["name"]] = ph
                continue
            start = min(m.started_unix, ph.started_unix)
            for src in (m, ph):  # re-base times on the merged start
                for r in src.results:
                    r.sent_s += src.started_unix - start
                    r.scheduled_s += src.started_unix - start
            m.results.extend(ph.results)
            m.started_unix, m.ended_unix = start, max(m.ended_unix, ph.ended_unix)
            if ph.spec.mode == "open":
                m.target_rate += ph.target_rate
    merged = list(by_name.values())
    for m in merged:
        if m.spec.mode == "open":
            m.spec = PhaseSpec("open", m.target_rate)
    return merged, first_cfg or {}


def _cfg_dict(cfg: BenchConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


@contextmanager
def _target(cfg: BenchConfig, tmp: Path):
    """(url, db, description, server start seconds); starts and always stops the demo server."""
    if cfg.url is not None:
        yield cfg.url, cfg.db, f"your server at {cfg.url} (ledger {cfg.db})", None
        return
    db = Path(cfg.db) if cfg.db else tmp / "ledger.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    print("starting the demo server (MiniLM embeddings and a tiny generator on the CPU) ...", file=sys.stderr, flush=True)
    srv = DemoServer(db, tmp / "demo-server.log", cfg.server_timeout_s)
    try:
        srv.start()
        print(f"demo server ready on {srv.url} in {srv.ready_s:.1f} s", file=sys.stderr, flush=True)
        from ..demo.app import DemoSettings

        ds = DemoSettings()
        yield srv.url, str(db), ("the wattspan demo server (`wattspan demo --serve`) in a subprocess on 127.0.0.1, "
                                 f"metered by EnergyMiddleware; its model steps hold at most {ds.gen_max_batch_size} "
                                 f"completions or {ds.embed_max_batch_size} embedding texts, so a batch runs as "
                                 "continuous batching at that width"), srv.ready_s
    finally:
        srv.stop()


def run_bench(args: argparse.Namespace) -> int:
    """Run ``wattspan bench`` with parsed ``args``; returns the exit status (0 ok, 1 some
    requests or records missing, 2 bad usage or an unusable target)."""
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:  # a CI timeout's SIGTERM: unwind, so the demo server is stopped
        raise SystemExit(128 + signum)

    held = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):  # (never one the caller set)
                held[sig] = signal.signal(sig, stop)
    try:
        cfg = config_from_args(args)
        return _run(cfg)
    except BenchError as exc:
        print(f"wattspan bench: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # e.g. an unknown region, with close matches
        print(f"wattspan bench: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, old in held.items():
            signal.signal(sig, old)


def _run(cfg: BenchConfig) -> int:
    from .analysis import Assumptions, analyse
    from .load import make_workload
    from .projection import resolve_regions
    from .report import write_report

    t_start = time.monotonic()
    regions = tuple(resolve_regions(cfg.regions, cfg.intensities, pue=cfg.pue))  # fail early on a bad region
    out = Path(cfg.out)
    items = make_workload(cfg.workload, cfg.requests, seed=cfg.seed, max_tokens=cfg.max_tokens, model=cfg.model)
    specs = _phases(cfg)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wattspan-bench-") as tmp:
        if cfg.merge:
            phases, _ = merge_load_files(cfg.merge)
            assert cfg.db is not None  # --merge needs --db (checked with the arguments)
            url, db, desc = None, cfg.db, f"load merged from {len(cfg.merge)} files (ledger {cfg.db})"
            ids = {r.rid for p in phases for r in p.results if r.rid}
            since = min(p.started_unix for p in phases) - 60.0
            t = time.monotonic()
            records = wait_for_records(db, ids, since_unix=since, timeout_s=cfg.record_timeout_s, progress=cfg.progress)
            timings["records_wait"] = time.monotonic() - t
        else:
            with _target(cfg, Path(tmp)) as (url, db, desc, start_s):
                if start_s is not None:
                    timings["server_start"] = start_s
                t = time.monotonic()
                asyncio.run(_check_and_warm(cfg, url, items))
                timings["warmup"] = time.monotonic() - t
                t = time.monotonic()
                since = time.time() - 5.0
                phases = asyncio.run(_run_phases(cfg, url, items, specs))
                timings["phases"] = time.monotonic() - t
                if cfg.load_only:
                    path = out / "load.json"
                    _write_load(path, cfg, phases)
                    print(f"wrote {path}: {sum(len(p.results) for p in phases)} requests; merge with "
                          f"`wattspan bench --merge {path} ... --db LEDGER`", file=sys.stderr)
                    return 0
                t = time.monotonic()
                ids = {r.rid for p in phases for r in p.results if r.rid}
                if not ids and any(r.ok for p in phases for r in p.results):
                    raise BenchError(f"responses from {url} carry no '{cfg.id_header}' header: run the server with "
                                     f"EnergyMiddleware(..., request_id_header='{ID_HEADER}') (or give --id-header)")
                records = wait_for_records(db, ids, since_unix=since, timeout_s=cfg.record_timeout_s,
                                           progress=cfg.progress)
                timings["records_wait"] = time.monotonic() - t
        t = time.monotonic()
        emb_src = ("one A100's share of an 8-GPU server, Chien et al. HotCarbon'23 (wattspan.carbon."
                   "EMBODIED_A100_SERVER_SHARE)" if cfg.embodied_kg == 318.0 else "given (--embodied-kg)")
        a = Assumptions(calls=cfg.calls, regions=regions, embodied_kg=cfg.embodied_kg,
                        lifetime_years=cfg.lifetime_years, embodied_source=emb_src, include_host=cfg.include_host,
                        basis=cfg.basis)
        rep = analyse(phases, records, a)
        if cfg.deploy:  # each mode in its own region and hours
            from .deploy import deployment_report, parse_deploy

            rep["deployment"] = deployment_report(rep, [parse_deploy(x, pue=cfg.pue) for x in cfg.deploy], basis=cfg.basis,
                                                  calls=cfg.calls, g_per_device_s=a.g_per_device_s)
            for u in rep["deployment"]["unmatched"]:
                print(f"wattspan bench: --deploy {u}: no measured phase of that mode; it has no figure in the report", file=sys.stderr)
        rep = {"format": "wattspan-bench-report/1", "created_unix": time.time(), "command": command_line(cfg),
               "simulated": rep.pop("simulated"), "config": _cfg_dict(cfg), "versions": _versions(),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
               "target": {"description": desc, "url": url, "db": str(db) if cfg.url or cfg.merge or cfg.db else None},
               "seeds": {"workload": cfg.seed,
                         "arrivals": {p.spec.name: cfg.seed + k + 1 for k, p in enumerate(phases) if p.spec.mode == "open"}},
               "timings_s": timings, **rep}
        timings["analysis"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t_start
        paths = write_report(json_safe(rep, digits=7), out)
    _print_summary(rep, paths)
    missing = rep["quality"]["missing_records"]
    failed = sum(p["client"]["calls"] - p["client"]["calls_ok"] for p in rep["phases"])
    if missing or failed:
        print(f"wattspan bench: {failed} calls failed and {missing} requests have no record; see the report",
              file=sys.stderr)
        return 1
    return 0


def command_line(cfg: BenchConfig) -> str:
    """The ``wattspan bench`` command that reproduces ``cfg`` (options that differ from the defaults)."""
    p = argparse.ArgumentParser(add_help=False)
    add_bench_arguments(p)
    default = _cfg_dict(config_from_args(p.parse_args([])))
    flags = {"url": "--url", "db": "--db", "out": "--out", "workload": "--workload", "requests": "--requests",
             "max_tokens": "--max-tokens", "model": "--model", "seed": "--seed", "batch_size": "--batch-size",
             "batch_path": "--batch-path", "id_header": "--id-header", "warmup": "--warmup", "calls": "--calls",
             "pue": "--pue", "embodied_kg": "--embodied-kg", "lifetime_years": "--lifetime-years", "basis": "--basis",
             "start_at": "--start-at"}
    repeat = {"rates": "--rate", "concurrency": "--concurrency", "regions": "--region", "intensities": "--intensity", "deploy": "--deploy"}
    d = _cfg_dict(cfg)
    parts = ["wattspan", "bench"]
    for k, v in d.items():
        if default.get(k) == v:
            continue
        if k in flags and v is not None:
            parts += [flags[k], f"{v:g}" if isinstance(v, float) else str(v)]
        elif k in repeat:
            for x in v:
                parts += [repeat[k], f"{x:g}" if isinstance(x, float) else str(x)]
        elif k == "modes" and tuple(v) != _MODES:
            parts += ["--modes", ",".join(v)]
        elif k == "stream" and not v:
            parts.append("--no-stream")
        elif k == "include_host" and v:
            parts.append("--include-host")
        elif k == "merge" and v:
            parts += ["--merge", *v]
        elif k == "load_only" and v:
            parts.append("--load-only")
    if cfg.embodied_kg is None:
        parts.append("--no-embodied")
    return " ".join(shlex.quote(x) for x in parts)


def _print_summary(rep: dict, paths: dict) -> None:
    from .report import fmt_sig

    a = rep["assumptions"]
    reg = a["regions"][0]["label"] if a["regions"] else None
    lines = []
    if rep["simulated"]:
        lines.append("POWER IS SIMULATED (no sensor on this machine): figures illustrate the method, not real hardware.")
    lines.append(f"{'phase':<34}{'J/call dyn':>11}{'+idle':>9}{'amortised':>11}{'p50 ms':>9}{'util':>7}"
                 f"   kgCO2e/{a['calls']:,} calls ({reg}, {a['basis']})")
    for p in rep["phases"]:
        if not p["per_request"]:
            lines.append(f"{p['label']:<34} no records")
            continue
        pr, c = p["per_request"], p["client"]
        g = next((r["total_g"] for r in rep["projection"] if r["phase"] == p["name"] and r["region"] == reg
                  and r["basis"] == a["basis"]), None)
        lines.append(f"{p['label']:<34}{fmt_sig(pr['dynamic']['energy_j']):>11}{fmt_sig(pr['attributed']['energy_j']):>9}"
                     f"{fmt_sig(pr['amortised']['energy_j']):>11}{fmt_sig((c['latency_p50_s'] or 0) * 1000):>9}"
                     f"{100 * p['records']['utilisation']:>6.0f}%   {fmt_sig(g / 1e3) if g is not None else '-'}")
    lines.append(f"report: {paths['md']} (and report.html, report.json)")
    print("\n".join(lines))
