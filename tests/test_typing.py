"""mypy with the project's configuration ([tool.mypy] in pyproject.toml) over the whole package.

The core packages are checked with ``strict = true``, the applications with the looser
settings pyproject.toml documents. Runs ``tools/typecheck.py``, which hands mypy every file
of ``middleware/`` and ``integrations/`` under its ``wattspan`` module name. The cache lives
in ``.mypy_cache`` (git-ignored): a cold run takes a minute or two on two cores, a warm one
seconds. Outside CI a missing mypy skips; in CI (``WATTSPAN_REQUIRE_BACKENDS=1`` or
``CI=true``) it fails, since mypy is in the ``[test]`` extra.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "typecheck.py"
CACHE = ROOT / ".mypy_cache"
IN_CI = os.environ.get("WATTSPAN_REQUIRE_BACKENDS") == "1" or os.environ.get("CI", "").lower() == "true"


def _need_mypy() -> None:
    if importlib.util.find_spec("mypy") is None:
        if IN_CI:
            pytest.fail("mypy is not installed: it is in the [test] extra (pip install -e '.[test]')")
        pytest.skip("mypy is not installed (pip install -e '.[test]')")


def _typecheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), "--cache-dir", str(CACHE), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_every_package_file_is_checked_under_its_module_name():
    sys.path.insert(0, str(TOOL.parent))
    try:
        import typecheck
    finally:
        sys.path.remove(str(TOOL.parent))
    mapped = dict(typecheck.sources())
    files = sorted(str(p.relative_to(ROOT)) for d in ("middleware", "integrations") for p in (ROOT / d).rglob("*.py")
                   if "__pycache__" not in p.parts)
    assert sorted(mapped) == files
    assert mapped["middleware/__init__.py"] == "wattspan"
    assert mapped["middleware/sources/nvml.py"] == "wattspan.sources.nvml"
    assert mapped["integrations/__init__.py"] == "wattspan.integrations"
    assert mapped["integrations/vllm.py"] == "wattspan.integrations.vllm"
    assert len(set(mapped.values())) == len(mapped)


def test_mypy_is_clean_with_the_project_configuration():
    _need_mypy()
    p = _typecheck()
    assert p.returncode == 0, (p.stdout[-20000:] + p.stderr[-5000:])
    assert "Success: no issues found" in p.stdout


def test_the_check_fails_on_a_type_error(tmp_path):
    # the same run, with one core module replaced by a copy that calls its own class with a bad
    # line number (a statement, not a new name: the modules that import it need no new check)
    _need_mypy()
    target = ROOT / "middleware" / "errors.py"
    bad = tmp_path / "errors.py"
    bad.write_text(target.read_text("utf-8") + '\n\nInputError("trace.csv", "line two", "bad row")\n', "utf-8")
    p = _typecheck("--shadow-file", str(target), str(bad))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "middleware/errors.py:" in p.stdout and "[arg-type]" in p.stdout, p.stdout
