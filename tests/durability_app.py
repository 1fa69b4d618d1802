"""The app test_durability.py serves with real uvicorn processes: the README's zero-argument setup.

``EnergyMiddleware()`` with no arguments, configured from ``WATTSPAN_*`` (the test sets
``WATTSPAN_LEDGER``, ``WATTSPAN_REQUEST_ID_HEADER``, ``WATTSPAN_SIMULATE``).
"""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from wattspan import EnergyMiddleware, set_tokens


async def work(request):
    await asyncio.sleep(0.01)
    set_tokens(prompt_tokens=8, output_tokens=4, model="tiny")
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/work", work)])


async def _bare(scope, receive, send):
    """A plain ASGI app that returns from the lifespan scope instead of speaking it."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(0.01)
    set_tokens(prompt_tokens=8, output_tokens=4, model="tiny")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


bare = EnergyMiddleware(_bare)
app.add_middleware(EnergyMiddleware, exclude=("/stats",))  # the stats probe is not a request to meter


async def stats(request):
    """What this process's meter has seen (for the peer-group test)."""
    from starlette.responses import JSONResponse

    from wattspan.defaults import get_default_meter

    m = get_default_meter()
    m.flush(5)
    c = m.stats()
    return JSONResponse({"peer_requests": c["peer_requests"], "records": c["records"], "measured_j": sum(m.device_energy_j.values()),
                         "unattributed_j": sum(m.device_unattributed_j.values()), "peers": c["peers"]})


app.add_route("/stats", stats)
