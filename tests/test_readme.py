"""Every snippet of the README runs as written.

The rules, so that a new snippet cannot slip by untested:

* a ```python block is run in a fresh interpreter (simulated power, no OpenTelemetry
  export configured but the console); if it defines ``app``, one request is served through it;
* in any other block, each line that starts with ``wattspan `` is a command: it is run (in a
  scratch folder holding the repository's ``examples/``) and must exit 0;
* a block right after ``<!-- tested: PATH [PATH ...] ... -->`` is one that needs what the suite
  runs elsewhere (a server, real vLLM, a command that runs until stopped): each PATH must be a
  test file of this repository, and each of the block's commands must be run by one of them;
* a ```toml block must parse; one whose first line is ``# NAME.toml`` is written to NAME.toml
  in the python snippets' scratch folder (a budget file is loaded as one, so it must be valid);
* lines starting with ``make`` are the quick start (CI runs ``make test``), other lines
  (output, curl, JSON) are illustrations.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
_TESTED = re.compile(r"<!--\s*tested:(.*?)-->")
_TEST_PATH = re.compile(r"\btests/[\w/]+\.py\b")


def snippets() -> list[dict]:
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2)
        start = i + 1
        j = start
        while j < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[j]):
            j += 1
        body = "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in lines[start:j])
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        t = _TESTED.search(prev)
        tested = _TEST_PATH.findall(t.group(1)) if t else None
        assert tested is None or tested, f"README.md:{i}: a tested marker names no tests/*.py file"
        out.append({"line": i + 1, "lang": lang, "body": body, "tested": tested})
        i = j + 1
    return out


def _commands(body: str) -> list[str]:
    """The ``wattspan ...`` command lines of a block (backslash continuations joined, comments cut)."""
    cmds, cur = [], ""
    for line in body.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        c = cur.strip()
        cur = ""
        if c.startswith("wattspan "):
            cmds.append(re.split(r"\s+#\s", c, maxsplit=1)[0].strip())
    return cmds


ALL = snippets()
PYTHON = [s for s in ALL if s["lang"] == "python" and not s["tested"]]
TOML = [s for s in ALL if s["lang"] == "toml"]
COMMANDS = [(s, c) for s in ALL if s["lang"] not in ("python", "toml") and not s["tested"] for c in _commands(s["body"])]
ELSEWHERE = [s for s in ALL if s["tested"]]


def test_the_readme_has_snippets_and_each_is_classified():
    assert len(PYTHON) >= 3 and COMMANDS and ELSEWHERE
    for s in ALL:
        assert s["lang"] in ("", "python", "toml", "bash", "sh", "console", "text"), f"README.md:{s['line']}: unknown fence language {s['lang']!r}"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WATTSPAN_"))}
    env.update(WATTSPAN_SIMULATE="1", WATTSPAN_PEERS="0", OTEL_TRACES_EXPORTER="console", OTEL_METRICS_EXPORTER="none", PYTHONPATH=str(ROOT))
    return env


RUNNER = r"""
import sys
src = open(sys.argv[1], encoding="utf-8").read()
ns = {"__name__": "__readme__"}
exec(compile(src, sys.argv[2], "exec"), ns)
app = ns.get("app")
if app is not None:  # serve one request through it, as a user's first request would be
    from starlette.testclient import TestClient
    with TestClient(app) as client:
        r = client.get("/")
        assert r.status_code < 500, r.status_code
    print("SERVED", r.status_code)
meter = ns.get("meter")
if meter is not None and hasattr(meter, "flush"):
    meter.flush(5)
print("OK")
"""


def _toml_name(snippet: dict) -> str | None:
    m = re.match(r"#\s*([\w.-]+\.toml)\b", snippet["body"])
    return m.group(1) if m else None


@pytest.mark.parametrize("snippet", TOML, ids=[f"toml-line-{s['line']}" for s in TOML])
def test_toml_snippet_parses(snippet, tmp_path):
    tomllib = pytest.importorskip("tomllib")
    doc = tomllib.loads(snippet["body"])
    if "budget" in doc:  # a budget file: it must load as one
        from wattspan.budgets import load_budgets

        path = tmp_path / (_toml_name(snippet) or "budgets.toml")
        path.write_text(snippet["body"], encoding="utf-8")
        assert load_budgets(path).budgets


@pytest.mark.parametrize("snippet", PYTHON, ids=[f"python-line-{s['line']}" for s in PYTHON])
def test_python_snippet_runs(snippet, tmp_path):
    for t in TOML:  # the files the README shows are there, as a reader following it would have them
        if _toml_name(t):
            (tmp_path / _toml_name(t)).write_text(t["body"], encoding="utf-8")
    src = tmp_path / "snippet.py"
    src.write_text(snippet["body"], encoding="utf-8")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    r = subprocess.run([sys.executable, str(runner), str(src), f"README.md:{snippet['line']}"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env())
    assert r.returncode == 0 and "OK" in r.stdout, f"README.md:{snippet['line']} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    if "app = " in snippet["body"]:
        assert "SERVED" in r.stdout


@pytest.mark.parametrize("snippet,command", COMMANDS, ids=[f"line-{s['line']}-{c.split()[1]}" for s, c in COMMANDS])
def test_command_snippet_runs(snippet, command, tmp_path):
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    argv = shlex.split(command)
    assert argv[0] == "wattspan"
    r = subprocess.run([sys.executable, "-m", "wattspan.cli", *argv[1:]], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env())
    assert r.returncode == 0, f"README.md:{snippet['line']}: `{command}` exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("snippet", ELSEWHERE, ids=[f"line-{s['line']}" for s in ELSEWHERE])
def test_snippets_tested_elsewhere_name_a_test_that_runs_them(snippet):
    texts = []
    for rel in snippet["tested"]:
        path = ROOT / rel
        assert path.is_file() and path.parent.name == "tests", f"README.md:{snippet['line']}: no test file {rel}"
        texts.append(path.read_text(encoding="utf-8"))
    names = ", ".join(snippet["tested"])
    for cmd in _commands(snippet["body"]):
        sub = cmd.split()[1]
        assert any(f'"{sub}"' in t or f"wattspan {sub}" in t for t in texts), f"README.md:{snippet['line']}: none of {names} runs `wattspan {sub}`"
    if snippet["lang"] == "python":
        for name in re.findall(r"\b(instrument_vllm|track_requests|VLLM_ENABLE_V1_MULTIPROCESSING)\b", snippet["body"]):
            assert any(name in t for t in texts), f"README.md:{snippet['line']}: none of {names} uses {name}"
