"""The ``wattspan`` command line (``wattspan = "wattspan.cli:main"``).

* :mod:`.main`: the parser and :func:`main` (dispatch; ``demo``, ``bench``, ``proxy`` are in their own packages);
* :mod:`.attribute`: ``wattspan attribute`` (offline files);
* :mod:`.report`: ``wattspan report`` (ledger tables, ``--id``);
* :mod:`.budgets`: ``report --budgets`` and the proxy's budget / deferral wrapper;
* :mod:`.apps`: ``wattspan run``, ``audit``, ``dashboard``;
* :mod:`.common`: the usage error, the optional-dependency check, the carbon options.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
