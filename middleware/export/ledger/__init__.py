"""The local SQLite ledger: every final record, surviving restarts.

* :mod:`.writer`: :class:`Ledger` (a :class:`wattspan.RecordSink`);
* :mod:`.schema`: the table, its upgrades, and reads (:func:`query`, :func:`aggregate`, :func:`find`);
* :mod:`.runs`: ``wattspan run``'s runs and their power traces in the same file.
"""

from __future__ import annotations

from .runs import get_run, list_runs, run_trace, write_run
from .schema import GROUP_BY, SCHEMA_VERSION, aggregate, check_ledger, excluded, find, query, valid_sql
from .writer import Ledger

__all__ = ["GROUP_BY", "SCHEMA_VERSION", "Ledger", "aggregate", "check_ledger", "excluded", "find", "get_run", "list_runs", "query", "run_trace", "valid_sql", "write_run"]
