"""Project-level guarantees: the CI runs the README's test command; no eval(); weights-only loading."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no Quick start code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_two_commands_and_ci_runs_both():
    lines = quickstart_lines()
    assert len(lines) == 2
    assert "dgmrec demo" in lines[0] and "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    extract = ci.split("mapfile -t cmds < <(", 1)[1].split(")\n", 1)[0]
    extracted = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    assert extracted == lines
    assert "for i in 0 1" in ci and "rm -rf .venv" in ci  # each command in a fresh environment


def test_no_eval_and_safe_checkpoint_loading():
    for path in (ROOT / "src" / "dgmrec").rglob("*.py"):
        code = path.read_text()
        assert not re.search(r"(?<![\w.])eval\(", code), f"eval() in {path}"
        for call in re.findall(r"torch\.load\(.*", code):
            assert "weights_only=True" in call, f"{path}: {call}"
