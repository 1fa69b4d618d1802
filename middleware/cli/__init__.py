"""The ``wattspan`` command line (``wattspan = "wattspan.cli:main"``).

* :mod:`.main`: the parser and :func:`main`; ``attribute``, ``report --id``, budgets;
* :mod:`.report`: ``wattspan report`` (ledger tables);
* :mod:`.apps`: ``wattspan run``, ``audit``, ``dashboard``.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
