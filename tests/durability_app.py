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
app.add_middleware(EnergyMiddleware)
