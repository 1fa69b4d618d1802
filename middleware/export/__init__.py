"""Sinks for the meter's records: :mod:`.otel` (spans and metrics over OpenTelemetry), :mod:`.ledger` (SQLite)."""
