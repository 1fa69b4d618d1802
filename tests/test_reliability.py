"""Nothing lost, nothing miscounted: hostile values and bounds, each through the real path.

Each test names the numbered defect of the reliability issue it keeps mended.
"""

from __future__ import annotations

import math

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, RequestRecord, set_tokens
from wattspan import _context
from wattspan.ledger import Ledger

from .conftest import serve


def _rec(i: int, **kw) -> RequestRecord:
    base = dict(id=f"r{i}", device="gpu0", start_ns=i, end_ns=i + 1, energy_j=1.0, dynamic_j=0.5, idle_j=0.5, device_s=0.1)
    return RequestRecord(**{**base, **kw})


# 1. one huge token count must not block the ledger --------------------------------------------


def test_a_huge_token_count_is_clipped_where_it_enters_and_the_ledger_keeps_committing(live_meter, tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    live_meter.batch_sinks.append(ledger.write)

    async def huge(request):
        set_tokens(prompt_tokens=1e30, output_tokens=2**70)
        return PlainTextResponse("ok")

    async def ok(request):
        set_tokens(prompt_tokens=12, output_tokens=3)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/huge", huge), Route("/ok", ok)])
    app.add_middleware(EnergyMiddleware, meter=live_meter)
    before = dict(_context.counters)
    with serve(app) as url, httpx.Client(base_url=url) as c:
        assert c.get("/huge").status_code == 200
        codes = [c.get("/ok").status_code for _ in range(100)]
    assert codes == [200] * 100
    assert live_meter.flush(10) and ledger.flush(10)
    rows = ledger.query()
    ledger.close()
    assert len(rows) == 101
    big = [r for r in rows if r["route"] == "/huge"]
    assert [(r["prompt_tokens"], r["output_tokens"]) for r in big] == [(_context.MAX_TOKENS, _context.MAX_TOKENS)]
    assert _context.counters["tokens_clipped"] == before["tokens_clipped"] + 2


def test_the_ledger_stores_a_record_the_database_refuses_clipped_and_keeps_going(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([_rec(0, prompt_tokens=2**70, energy_j=math.nan, model="bad\udcff")])
    ledger.write([_rec(i) for i in range(1, 10_001)])
    assert ledger.flush(30)
    st = ledger.stats()
    rows = ledger.query()
    ledger.close()
    assert st["written"] == 10_001 and st["sanitized"] == 1 and st["errors"] == 0 and st["dropped"] == 0
    bad = rows[0]
    assert bad["id"] == "r0" and bad["prompt_tokens"] == 2**63 - 1 and bad["energy_j"] == 0.0


# 10. NaN or inf token counts must never turn a response into a 500 -----------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "12x", object(), -5, True])
def test_set_tokens_with_a_non_number_never_breaks_the_request(live_meter, value):
    async def ep(request):
        set_tokens(prompt_tokens=value, output_tokens=value, model="m")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ep)])
    app.add_middleware(EnergyMiddleware, meter=live_meter)
    with serve(app) as url:
        assert httpx.get(f"{url}/x").status_code == 200
    assert live_meter.flush(10)
    (rec,) = live_meter.records
    assert rec.prompt_tokens == rec.output_tokens == 0 and rec.model == "m"
