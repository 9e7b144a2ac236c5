"""benchmarks/gpu_session.py: its dry run on the CPU (every stage, every number labelled), its stage runner (a failed
stage recorded and the next ones run, a stage over its limit killed with its whole process group, the time kept
for later stages), its --wheels install for an offline machine, and its GPU form stopping where there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_session as gs

STAGES = ["preflight", "environment", "kernel_tests", "kernels", "throughput", "pretrain_data", "pretrain"]
PY = sys.executable


def numbers_section(markdown: str) -> list[str]:
    return markdown.split("\n## Numbers\n", 1)[1].splitlines()


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# ------------------------------------------------------------------------------------------------ dry run


@pytest.mark.slow
def test_the_dry_run_reports_every_stage_with_every_number_labelled_cpu_dry_run(gpu_session_dry_run):
    out, proc, seconds = gpu_session_dry_run["out"], gpu_session_dry_run["proc"], gpu_session_dry_run["seconds"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert seconds < 300, f"the dry run took {seconds:.0f} s"

    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["session"]["dry_run"] is True and summary["session"]["label"] == gs.DRY_LABEL
    environment = summary["environment"]
    for key in ("device", "measured_on", "torch", "triton", "cuda", "deepspeed", "transformers", "commit", "date"):
        assert key in environment, key
    assert environment["device"] == "cpu" and environment["measured_on"] == "cpu"
    assert summary["session"]["commit"] == environment["commit"] and summary["session"]["date"]

    numbers = summary["numbers"]
    assert {n["stage"] for n in numbers} == set(STAGES) - {"preflight", "environment"}
    for n in numbers:
        assert n["measured_on"] == "cpu" and n["dry_run"] is True and n["label"] == gs.DRY_LABEL, n
    by_name = {(n["stage"], n["name"]): n["value"] for n in numbers}
    assert by_name[("kernel_tests", "tests passed")] > 0 and by_name[("kernel_tests", "tests failed")] == 0
    assert by_name[("kernels", "correctness checks passed")] > 0
    assert by_name[("pretrain", "steps done")] == 4
    assert any(stage == "pretrain" and "samples/s" in name and value > 0 for (stage, name), value in by_name.items())
    assert any(stage == "throughput" and name.startswith("ours-") for stage, name in by_name)

    markdown = (out / "summary.md").read_text()
    assert markdown.startswith("# GPU session DRY RUN on the CPU: no number in this file is a GPU number")
    for stage in STAGES:
        assert f"| {stage} | ok |" in markdown
    bullets = [line for line in numbers_section(markdown) if line.startswith("- ")]
    assert len(bullets) == len(numbers)
    for line in bullets:
        assert line.endswith(f"[{gs.DRY_LABEL}]"), line
    for line in numbers_section(markdown):
        assert not line.strip() or line.startswith(("- ", "#", "Each line", "Files:")), line

    assert sorted(p.name for p in out.iterdir()) == sorted(gs.OUT_FILES)
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {gs.KERNEL_TESTS_XML, gs.THROUGHPUT_ROWS, gs.PRETRAIN_METRICS, "environment/environment.json"} <= names
    assert not any(part in gs.RESULT_SKIP_DIRS for name in names for part in Path(name).parts[:-1]), names
    log = (out / "session.log").read_text()
    assert all(f"===== {stage}: ok" in log for stage in STAGES)
    assert "--smoke" in log and "train.precision=bf16" in log and "engine.pretrain" in log


# ------------------------------------------------------------------------------------------ the runner

SLEEPER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so that the kill has to escalate to SIGKILL
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(120)
"""


def test_a_failed_stage_and_one_over_its_limit_are_recorded_and_the_later_stages_still_run(tmp_path, monkeypatch):
    """The dry run's own stages through the same runner, a few replaced by stand-ins: kernel_tests by a bogus
    command, kernels by one that outlives its limit (ignoring SIGTERM, with a child of its own)."""
    monkeypatch.setattr(gs, "KILL_GRACE_S", 0.5)
    monkeypatch.setattr(gs, "MIN_STAGE_S", 0.5)
    session = gs.Session(out=tmp_path / "out", work=tmp_path / "work", dry_run=True, budget_s=120)
    session.env = gs.stage_env(session, [])
    stages = {stage.name: stage for stage in gs.stages(dry_run=True)}
    ran_after_failure, grandchild = tmp_path / "second_command_ran", tmp_path / "grandchild.pid"
    stand_in = lambda text: lambda session: [[PY, "-c", f"print({text!r})"]]  # noqa: E731
    stages["preflight"].commands = stand_in("preflight stand-in")
    # environment stays real: the session needs its record
    bogus = [PY, "-c", "import sys; print('bogus'); sys.exit(3)"]
    stages["kernel_tests"].commands = lambda session: [bogus, [PY, "-c", f"open({str(ran_after_failure)!r}, 'w')"]]
    stages["kernels"].limit_s = 2.0
    stages["kernels"].commands = lambda session: [[PY, "-c", SLEEPER, str(grandchild)]]
    stages["throughput"].commands = stand_in("throughput stand-in")
    stages["pretrain_data"].commands = stand_in("pretrain_data stand-in")
    stages["pretrain"].commands = stand_in("pretrain stand-in")

    start = time.perf_counter()
    assert gs.run_session(session, list(stages.values())) == 1
    results = {r.name: r for r in session.results}
    assert [(r.name, r.status) for r in session.results] == list(
        zip(STAGES, ["ok", "ok", "failed", "timed out", "ok", "ok", "ok"])
    )
    assert results["kernel_tests"].returncode == 3 and "exit status 3" in results["kernel_tests"].note
    assert not ran_after_failure.exists(), "a stage goes on after its failing command"
    assert results["kernels"].limit_s == 2.0 and 2.0 <= results["kernels"].seconds < 6.0
    assert "killed at its limit" in results["kernels"].note
    pid = int(grandchild.read_text())
    deadline = time.time() + 5
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the timed-out stage's child outlived it"
    assert time.perf_counter() - start < 60
    assert session.environment["measured_on"] == "cpu"

    summary = json.loads((session.out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [(r.name, r.status) for r in session.results]
    markdown = (session.out / "summary.md").read_text()
    assert "| kernel_tests | failed |" in markdown and "| kernels | timed out |" in markdown
    assert "| pretrain | ok |" in markdown
    log = (session.out / "session.log").read_text()
    assert "bogus" in log and "the stage's limit reached" in log and "pretrain stand-in" in log


def test_a_stage_that_needs_a_failed_one_is_skipped_and_a_stage_cannot_eat_the_time_kept_for_later(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(gs, "MIN_STAGE_S", 0.5)
    session = gs.Session(out=tmp_path / "out", work=tmp_path / "work", dry_run=True, budget_s=12)
    session.env = gs.stage_env(session, [])
    command = lambda *code: lambda session: [[PY, "-c", ";".join(code)]]  # noqa: E731
    stages = [
        gs.Stage("greedy", "wants 100 s", 100, 0, command("import time", "time.sleep(100)")),
        gs.Stage("data", "fails", 30, 1, command("import sys", "sys.exit(1)")),
        gs.Stage("train", "needs data", 30, 1, command("print(1)"), needs=("data",)),
        gs.Stage("last", "keeps its time", 30, 7, command("print('last ran')")),
    ]
    assert gs.run_session(session, stages) == 1
    results = {r.name: r for r in session.results}
    assert results["greedy"].status == "timed out" and results["greedy"].limit_s <= 12 - 9 + 0.5
    assert results["data"].status == "failed"
    assert results["train"].status == "skipped" and "needs data" in results["train"].note
    assert results["last"].status == "ok"


# ------------------------------------------------------------------------------------ --wheels, the GPU form


def write_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, as pip wheel writes one (RECORD without hashes is accepted)."""
    folder.mkdir(exist_ok=True)
    path = folder / "gpu_session_probe-1.0-py3-none-any.whl"
    files = {
        "gpu_session_probe/__init__.py": "FOUND = True\n",
        "gpu_session_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-session-probe\nVersion: 1.0\n",
        "gpu_session_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files["gpu_session_probe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + (
        "gpu_session_probe-1.0.dist-info/RECORD,,\n"
    )
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def test_wheels_are_installed_without_an_index_into_a_site_the_stages_see_first(tmp_path):
    session = gs.Session(
        out=tmp_path / "out", work=tmp_path / "work", dry_run=True, budget_s=60, wheels=tmp_path / "wheels"
    )
    write_wheel(session.wheels)
    session.env = gs.stage_env(session, [session.work / "site"])
    install, check = gs.preflight_commands(session)
    assert "--no-index" in install and str(session.work / "site") in install
    subprocess.run(install, env=session.env, check=True, timeout=120, capture_output=True)
    probe = [PY, "-c", "import gpu_session_probe; print(gpu_session_probe.__file__)"]
    found = subprocess.run(probe, env=session.env, check=True, capture_output=True, text=True).stdout
    assert found.startswith(str(session.work / "site"))
    assert check[-1] == gs.IMPORT_CHECK


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole GPU session")
def test_the_gpu_form_reports_an_empty_wheel_folder_and_stops_after_the_environment_without_a_gpu(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = gs.main(["--out", str(tmp_path / "out"), "--wheels", str(empty), "--work", str(tmp_path / "work")])
    assert code == 1
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert stages["preflight"]["status"] == "failed" and "no .whl file" in stages["preflight"]["note"]
    assert stages["environment"]["status"] == "ok"
    assert all(stages[name]["status"] == "skipped" and "no CUDA device" in stages[name]["note"] for name in STAGES[2:])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(gs.OUT_FILES)


def test_the_kernels_stage_reports_benchmarks_kernels_own_speed_ups(tmp_path):
    """On a GPU the kernels' rows carry timings: the session reports benchmarks.kernels' speedups() of them."""
    session = gs.Session(out=tmp_path / "out", work=tmp_path / "work", dry_run=False, budget_s=60)
    gpu = {"device": "NVIDIA H100", "measured_on": "gpu", "bench": "attention", "config": "B256 20x36", "dtype": "bf16"}
    rows = [{**gpu, "bench": "check", "check": "attention", "passed": True}]
    rows += [
        {**gpu, "provider": provider, "mode": mode, "median_ms": ms * (2 if mode == "full" else 1)}
        for provider, ms in (("triton", 0.5), ("eager", 2.0), ("sdpa_flash", 1.0))
        for mode in ("forward", "backward", "full")
    ]
    gs.harness.append_rows(session.path(gs.KERNELS_ROWS), rows)
    session.path("logs/kernels.log").write_text("checks: 21 passed, 0 failed (3.0 s)\n")
    numbers = {n.name: (n.value, n.label) for n in gs.kernels_numbers(session)}
    assert numbers["correctness checks passed"][0] == 21
    assert numbers["attention B256 20x36 bf16 triton fwd+bwd"] == (1.0, "NVIDIA H100")
    assert numbers["attention B256 20x36 bf16 triton speed-up over sdpa_flash"] == (2.0, "NVIDIA H100")
