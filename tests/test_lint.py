"""The lint gate: `ruff check .` passes on the whole repository (ruff.toml: flake8-bandit's security rules, so no
shell=True, no os.system / os.popen, subprocesses from argument lists; plus pycodestyle, pyflakes, import order,
bugbear, pyupgrade), and no code runs a broad process killer (pkill, killall: kill by name can hit processes that
are not ours; our servers are stopped by their own PID). Ruff has no rule for the latter, so it is checked here.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILLERS = {"pkill", "killall", "pgrep"}  # pgrep: finding processes by name is how a broad kill starts
SKIP_DIRS = {".venv", ".git", ".cache", ".selflengthen", "runs", "node_modules", "__pycache__", ".ruff_cache",
             ".pytest_cache"}


def ruff() -> str | None:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed (it belongs to the dev tools CI installs)")
        pytest.skip("ruff is not installed")
    return found


def test_ruff_passes_on_the_whole_repository():
    result = subprocess.run([ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_config_keeps_the_security_rules_on():
    """The shell rules may not be switched off anywhere, not even for tests."""
    import tomllib

    config = tomllib.loads((REPO / "ruff.toml").read_text())
    assert "S" in config["lint"]["select"]
    never_ignored = {"S602", "S604", "S605", "S609"}  # shell=True, shell-like calls, os.system/os.popen, wildcards
    ignored = set(config["lint"].get("ignore", []))
    for rules in config["lint"].get("per-file-ignores", {}).values():
        ignored |= set(rules)
    assert not (ignored & (never_ignored | {"S"})), ignored & never_ignored


def _source_files():
    for path in sorted(REPO.rglob("*")):
        if SKIP_DIRS & set(path.relative_to(REPO).parts[:-1]) or not path.is_file():
            continue
        if path.suffix in (".py", ".sh", ".yaml", ".yml", ".tpl", ".toml") or path.name in ("Makefile", "Dockerfile") \
                or path.parent.name == ".ci":
            yield path


def _python_killers(path: Path, root: Path = REPO) -> list[str]:
    """String constants that start a broad killer: "pkill", "/usr/bin/pkill -f x", ...."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip():
            command = node.value.split()[0].rsplit("/", 1)[-1]
            if command in KILLERS:
                found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno}: {node.value!r}"))
    return [hit for _, hit in sorted(found)]


def _script_killers(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        code = line.split("#", 1)[0]
        if re.search(r"(^|[\s;&|(`\"'/])(pkill|killall|pgrep)(\s|$)", code):
            found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_no_broad_process_killers():
    found = []
    for path in _source_files():
        if path == Path(__file__).resolve():
            continue  # this file names them to forbid them
        found += _python_killers(path) if path.suffix == ".py" else _script_killers(path)
    assert not found, "kill processes by their own PID, not by name:\n" + "\n".join(found)


def test_the_killer_check_finds_what_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import subprocess\nsubprocess.run(["pkill", "-f", "vllm"])\nX = "/usr/bin/killall python"\n'
                      'Y = "kill the server by its pid"\n')
    hits = _python_killers(sample, root=tmp_path)
    assert hits == ["sample.py:2: 'pkill'", "sample.py:3: '/usr/bin/killall python'"]
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n# never: pkill -f vllm\nkill \"$PID\"\nsleep 1; pkill -f vllm\n")
    assert _script_killers(script, root=tmp_path) == ["run.sh:4: sleep 1; pkill -f vllm"]
