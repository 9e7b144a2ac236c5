"""The installed console commands: every one of pyproject.toml's entry points resolves and answers --help."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = {
    "lxmert-attention",
    "lxmert-convert",
    "lxmert-pretrain",
    "lxmert-finetune",
    "lxmert-predict",
    "lxmert-data-convert",
    "lxmert-synthetic",
    "lxmert-plots",
    "lxmert-download",
}


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
    assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:200]  # --help names the command typed


def test_the_readmes_data_and_run_directories_are_ignored_by_git():
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("data/feats/meta.json", "runs/main/report.json", "runs/benchmarks/kernels.jsonl"):
        proc = subprocess.run(["git", "check-ignore", "-q", path], cwd=repo)
        assert proc.returncode == 0, f"{path} is not ignored"


def test_benchmarks_write_new_runs_outside_the_tracked_results():
    from benchmarks import dataloader, harness, kernels, scaling

    assert harness.RUNS_DIR.relative_to(harness.REPO_ROOT).parts[0] == "runs"
    for parse, name in ((lambda: scaling.parse_args([]), "scaling"),):
        assert parse().out == harness.RUNS_DIR / f"{name}.jsonl"
    for module, name in ((dataloader, "dataloader"), (kernels, "kernels")):
        source = Path(module.__file__).read_text()
        assert f'default=harness.RUNS_DIR / "{name}.jsonl"' in source, name
