"""The public API: what `import wattspan` offers, and that it stays importable and light."""

from __future__ import annotations

import subprocess
import sys

import wattspan


def test_all_is_sorted_complete_and_resolvable():
    assert wattspan.__all__ == sorted(wattspan.__all__)
    for name in wattspan.__all__:
        assert getattr(wattspan, name) is not None
    public = {n for n in dir(wattspan) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(wattspan.__all__) | {"PackageNotFoundError"}


def test_importing_wattspan_pulls_in_no_server_or_exporter():
    code = "import sys, wattspan; bad = [m for m in ('starlette', 'uvicorn', 'opentelemetry', 'torch', 'pynvml') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_unknown_attribute_is_a_clear_attribute_error():
    try:
        wattspan.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
