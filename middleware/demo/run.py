"""``wattspan demo``: serve a real model on the CPU, meter it, drive a short load, print the bill.

The server is the demo app (MiniLM embeddings and a streaming generator behind
dynamic batchers) wrapped in :class:`~wattspan.EnergyMiddleware`, served by
uvicorn on 127.0.0.1. Power comes from NVML where a GPU answers; otherwise
from the labelled simulated GPU, driven by the batch steps the batchers
report (and host CPU power from RAPL, or a labelled estimate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..records import RequestRecord

__all__ = ["run_demo"]

_TEXTS = [
    "How much energy does one request cost?",
    "Batching many requests onto one GPU hides the cost of each.",
    "Grid intensity varies by region and by hour.",
    "Idle power is paid whether or not a request is in flight.",
    "The energy counter moves every few tens of milliseconds.",
    "A prefill chunk costs more than a decode token.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(*, region: str = "world", db: Path | None = None, otel: bool = False):
    """The metered demo app and its meter (also used by the tests and ``wattspan bench``)."""
    from wattspan import EnergyMiddleware
    from wattspan import Meter
    from wattspan.carbon import CarbonModel
    from wattspan.defaults import default_sources
    from wattspan.demo.app import create_app
    from wattspan.sources import SourceUnavailable

    sources = default_sources()
    if not any(getattr(s, "name", "") in ("rapl",) for s in sources):
        try:
            from wattspan.sources.cpu_estimate import CpuEstimateSource

            sources.append(CpuEstimateSource())
        except SourceUnavailable:
            pass
    sinks = []
    ledger = None
    if db is not None:
        from wattspan.export.ledger import Ledger

        ledger = Ledger(db)
        sinks.append(ledger)
    from wattspan.carbon.intensity import hourly_from_env

    from wattspan.settings import get_settings

    pue = get_settings().pue  # WATTSPAN_PUE, as for any metered server (None: the provider's published value)
    meter = Meter(sources=sources, carbon=hourly_from_env(CarbonModel.for_region(region, pue=pue)), sinks=sinks)
    if otel:
        from wattspan.export import otel as wotel

        wotel.configure_from_env(meter=meter)
    app = create_app(on_step=meter.record_step, device="gpu0")
    app.add_middleware(EnergyMiddleware, meter=meter, exclude=("/healthz",), request_id_header="x-wattspan-request-id")
    # outside the meter, so deferred work is metered when it runs: POST /v1/batch with
    # x-wattspan-deadline-s is queued for the cleanest hour; $WATTSPAN_BUDGETS enforces budgets
    from wattspan.deferral import DeferralMiddleware

    app.add_middleware(DeferralMiddleware, zone=region)
    if os.environ.get("WATTSPAN_BUDGETS"):
        from wattspan.budgets import BudgetMiddleware

        app.add_middleware(BudgetMiddleware, budgets=os.environ["WATTSPAN_BUDGETS"])
    return app, meter, ledger


class Server:
    """uvicorn in a thread on 127.0.0.1."""

    def __init__(self, app, port: int = 0) -> None:
        import uvicorn

        self.port = port or _free_port()
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", server_header=False, date_header=False, lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name="wattspan-demo-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "Server":
        import httpx

        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError(f"the demo server exited during start-up (is port {self.port} in use?)")
            if not self.server.started:  # bound and serving: our server, not another one on that port
                time.sleep(0.05)
                continue
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the demo server was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def plan_load(n_embed: int, n_complete: int, seed: int) -> list[tuple[str, str, dict]]:
    """The demo's load, fixed by ``seed`` before any request is sent: (kind, tenant, body) in sending order.

    Every body is drawn here, not as requests are sent, so the same seed gives the same
    requests whatever order the server answers in; completions carry their own seed,
    so they generate the same tokens each run.
    """
    rng = random.Random(seed)
    jobs = ["embed"] * n_embed + ["complete"] * n_complete
    rng.shuffle(jobs)
    out = []
    for i, kind in enumerate(jobs):
        tenant = rng.choice(["search", "chat", "batch-jobs"])
        body: dict[str, Any]
        if kind == "embed":
            body = {"input": rng.sample(_TEXTS, rng.randint(1, 4)), "model": "all-MiniLM-L6-v2"}
        else:
            body = {"prompt": rng.choice(_TEXTS), "max_tokens": rng.randint(16, 64), "stream": True, "seed": seed * 100_003 + i}
        out.append((kind, tenant, body))
    return out


async def _drive(url: str, n_embed: int, n_complete: int, concurrency: int, seed: int, progress) -> list[str]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    failures = []

    async def one(client, kind, tenant, body):
        async with sem:
            if kind == "embed":
                r = await client.post("/v1/embeddings", json=body, headers={"x-tenant-id": tenant})
                ok = r.status_code == 200
            else:
                ok = False
                async with client.stream("POST", "/v1/completions", json=body, headers={"x-tenant-id": tenant}) as r:
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            ok = True
            if not ok:
                failures.append(kind)
            progress.update(1)

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(one(client, k, t, b) for k, t, b in plan_load(n_embed, n_complete, seed)))
    return failures


def spread(runs: list[list]) -> str:
    """Per endpoint: mJ per request in each repeat of the same load, median and range.

    Total (accelerator + host) and the accelerator's dynamic part alone: the idle share
    follows each request's wall time, which on a shared CPU moves with the machine's
    other load; the dynamic share follows the work (the batch steps) and moves less.
    """
    tot: dict[str, list[float]] = defaultdict(list)
    dyn: dict[str, list[float]] = defaultdict(list)
    for recs in runs:
        per: dict[str, list] = defaultdict(list)
        for r in recs:
            per[r.route].append(r)
        for route, rs in per.items():
            tot[route].append(sum(r.energy_j + r.host_j for r in rs) / len(rs) * 1000)
            dyn[route].append(sum(r.dynamic_j for r in rs) / len(rs) * 1000)

    def cell(v):
        med = statistics.median(v)
        sp = (max(v) - min(v)) / med * 100 if med else 0.0
        return f"{med:>9.1f} ({min(v):.1f}-{max(v):.1f}, {sp:.0f} %)"

    out = [f"the same seeded load, {len(runs)} runs: mJ/req, median (min-max, spread)",
           f"{'endpoint':<18}{'total':>36}{'accelerator dynamic':>40}"]
    for route in sorted(tot):
        out.append(f"{route:<18}{cell(tot[route]):>36}{cell(dyn[route]):>40}")
    return "\n".join(out)


def summarize(records, meter, since: tuple[float, float] = (0.0, 0.0)) -> str:
    """Per-endpoint energy and CO2e, with where each number comes from.

    ``since``: the meter's (measured, unattributed) joules before ``records`` began
    (a warm-up left out), so the totals line adds up over the same stretch.
    """
    by = defaultdict(list)
    for r in records:
        by[r.route].append(r)
    carbon = meter.carbon
    devs = {d.id: d for d in meter.sampler.devices()}
    out = []
    for d in devs.values():
        flag = "  <- SIMULATED, not a measurement" if d.simulated else ""
        out.append(f"  {d.id:<13} {d.name}: {d.sensor}{flag}")
    out.append(f"  carbon        {carbon.intensity_g_per_kwh:.0f} gCO2e/kWh ({carbon.region}: {carbon.intensity_source}), PUE {carbon.pue:.2f}")
    out.append("")
    hdr = f"{'endpoint':<18}{'requests':>9}{'accel J':>10}{'host J':>9}{'mJ/req':>9}{'gCO2e/1k req':>14}{'p50 ms':>8}  method"
    out.append(hdr)
    out.append("-" * len(hdr))
    for route, rs in sorted(by.items()):
        e = sum(r.energy_j for r in rs)
        h = sum(r.host_j for r in rs)
        g = sum(r.co2e_g for r in rs)
        lat = statistics.median(r.duration_s for r in rs) * 1000
        methods = "/".join(sorted({r.method for r in rs}))
        out.append(f"{route:<18}{len(rs):>9}{e:>10.2f}{h:>9.2f}{(e + h) / len(rs) * 1000:>9.1f}{g / len(rs) * 1000:>14.4f}{lat:>8.0f}  {methods}")
    measured = sum(meter.device_energy_j.values()) - since[0]
    out.append("")
    out.append(f"accelerator energy measured {measured:.2f} J = requests {sum(r.energy_j for r in records):.2f} J + unattributed {meter.counters['unattributed_j'] - since[1]:.2f} J")
    out.append("mJ/req and gCO2e cover accelerator + host energy (host J kept apart in the records' host_j; "
               "gCO2e = (accel + host J) x PUE x grid intensity + embodied), as in every wattspan record")
    return "\n".join(out)


def run_demo(*, embeds: int = 48, completions: int = 24, concurrency: int = 8, region: str = "world", db: Path | None = Path("wattspan.sqlite"), serve: bool = False, port: int = 0, seed: int = 0, repeat: int = 3) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    t0 = time.monotonic()
    print("wattspan demo: loading the models (all-MiniLM-L6-v2, a tiny random-weight generator) on the CPU ...", flush=True)
    app, meter, ledger = build(region=region, db=db)
    records: list[RequestRecord] = []
    from wattspan.meter import RecordCallback

    meter.add_sink(RecordCallback(records.append))
    server = Server(app, port).start()
    print(f"serving on {server.url} (ready in {time.monotonic() - t0:.1f} s)", flush=True)
    try:
        # a warm-up pass first (models, batchers and the meter's fit settle), not counted
        with tqdm(total=min(8, embeds) + min(4, completions), desc="warm-up", unit="req", file=sys.stdout, dynamic_ncols=True) as bar:
            asyncio.run(_drive(server.url, min(8, embeds), min(4, completions), concurrency, seed + 1, bar))
        meter.flush(15)
        records.clear()
        since = (sum(meter.device_energy_j.values()), meter.counters["unattributed_j"])
        runs: list[list[RequestRecord]] = []
        failures: list[str] = []
        for k in range(max(1, repeat)):
            with tqdm(total=embeds + completions, desc=f"run {k + 1}/{max(1, repeat)}", unit="req", file=sys.stdout, dynamic_ncols=True) as bar:
                failures += asyncio.run(_drive(server.url, embeds, completions, concurrency, seed, bar))
            meter.flush(15)
            runs.append(list(records[sum(len(r) for r in runs):]))
        print()
        print(summarize(records, meter, since))
        if len(runs) > 1:
            print()
            print(spread(runs))
        if failures:
            print(f"\n{len(failures)} requests failed: {sorted(set(failures))}")
        if ledger is not None:
            ledger.flush(10)
            print(f"\nrecords kept in {db} (`wattspan report --db {db}`)")
        if serve:
            print(f"\nstill serving on {server.url}; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 1 if failures else 0
    finally:
        server.stop()
        meter.close()
        if ledger is not None:
            ledger.close()
