"""Type-check the ``wattspan`` package with mypy and the project's configuration.

    python tools/typecheck.py            # the whole package (pyproject.toml's [tool.mypy])

Why a script and not plain ``mypy``: the package lives in ``middleware/`` and
``integrations/`` (setuptools ``package-dir``), and an editable install reaches
it through an import hook that mypy cannot follow, so ``mypy -p wattspan``
finds nothing and ``mypy middleware`` would name the modules ``middleware.*``.
This script hands mypy every file with its real module name
(``middleware/meter/core.py`` is ``wattspan.meter.core``), so the per-module
settings in ``[tool.mypy]`` apply and the messages name the files in the tree.

Extra arguments go to mypy (``--cache-dir DIR``, ``--no-incremental``, ...).
Exit status: 0 clean, 1 type errors, 2 mypy could not run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import package -> directory, as in pyproject.toml's [tool.setuptools] package-dir
PACKAGE_DIRS = {"wattspan": ROOT / "middleware", "wattspan.integrations": ROOT / "integrations"}


def sources() -> list[tuple[str, str]]:
    """(path relative to the repository, module name) of every Python file of the package."""
    out: list[tuple[str, str]] = []
    for package, base in PACKAGE_DIRS.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if package == "wattspan" and parts[:1] == ["integrations"]:
                continue  # not part of the package (integrations/ is mapped on its own)
            name = ".".join([package, *parts])
            out.append((str(path.relative_to(ROOT)), name))
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from mypy import build
        from mypy.errors import CompileError
        from mypy.fscache import FileSystemCache
        from mypy.main import process_options
        from mypy.modulefinder import BuildSource
    except ImportError:
        print("typecheck: mypy is not installed (pip install -e '.[test]')", file=sys.stderr)
        return 2
    import os

    os.chdir(ROOT)  # messages relative to the repository, pyproject.toml found
    fscache = FileSystemCache()
    # the sources given below replace this placeholder target; the options come from pyproject.toml
    _, options = process_options(
        ["--config-file", str(ROOT / "pyproject.toml"), *args, "-c", "pass"], fscache=fscache
    )
    todo = [BuildSource(path, module, None) for path, module in sources()]
    t0 = time.time()
    try:
        result = build.build(todo, options, fscache=fscache)
        messages = result.errors
    except CompileError as exc:
        messages = exc.messages
    for line in messages:
        print(line)
    errors = [m for m in messages if ": error:" in m]
    files = {m.split(":", 1)[0] for m in errors}
    took = time.time() - t0
    if errors:
        print(f"Found {len(errors)} errors in {len(files)} files (checked {len(todo)} source files, {took:.0f} s)")
        return 1
    print(f"Success: no issues found in {len(todo)} source files ({took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
