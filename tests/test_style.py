"""The tree is ruff-clean, lint and format, with pyproject.toml's settings (line length 120), and keeps at most 20
format escapes (`# fmt: skip` / `# fmt: off`), each where a table reads better formatted by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    pytest.importorskip("ruff", reason="ruff is a dev dependency (bash scripts/setup.sh --dev)")
    proc = subprocess.run([sys.executable, "-m", "ruff", *command, "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_few_format_escapes():
    sources = [p for d in ("lxmert", "kernels", "engine", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")]
    marks = ("# fmt: " + "skip", "# fmt: " + "off")  # spelt apart: this file is not one of them
    escapes = [
        f"{p.relative_to(REPO)}:{i}"
        for p in sources
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if any(m in line for m in marks)
    ]
    assert len(escapes) <= 20, escapes
