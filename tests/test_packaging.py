"""The installed console commands: every one of setup.py's entry points resolves and answers --help."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = {"lxmert-convert", "lxmert-pretrain", "lxmert-finetune", "lxmert-data-convert", "lxmert-synthetic",
            "lxmert-plots"}  # fmt: skip


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    dist = importlib.metadata.distribution("lxmert-engine")
    return {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}


def test_every_command_is_installed_and_resolves():
    found = entry_points()
    assert set(found) == COMMANDS
    for name, ep in found.items():
        assert callable(ep.load()), name


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_answers_help(name):
    executable = Path(sys.executable).parent / name  # pip puts console scripts beside the interpreter
    proc = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
