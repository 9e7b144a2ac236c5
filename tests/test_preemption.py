"""Stopping early without losing anything (issue 19, items 1 and 9), through the command line.

- SIGTERM at a seeded random moment to `python -m engine.pretrain` (the plain path) and its two loader workers,
  as a scheduler signals every process: exit 75, one line "preempted at
  step N: checkpoint ...", a complete checkpoint at N; the same command resumes at N and ends with the train
  records and weights of an uninterrupted run, bit for bit. The same for a 2-rank DeepSpeed ZeRO-2 job under the
  deepspeed launcher, its whole process group signalled as a scheduler does (the ranks get SIGTERM at different
  moments, from the scheduler and again from the launcher): both ranks stop at the same step.
- train.preempt_signal (SIGUSR1) is an early warning that stops the same way; ^C (SIGINT to the process group as a
  terminal sends it, twice at once as when a launcher passes it on) saves and exits 130 without a traceback; a
  second ^C later exits at once, in one line.
- train.time_limit stops with a checkpoint before the limit.
- VQA fine-tuning (the same loop, with evaluations) signalled in-process stops and resumes as uninterrupted.
- engine.main ends with a stopped run's line and status, without fine-tuning.
- Item 9: a run whose every step is skipped (an injected inf) stops at the first log line that sees
  train.max_skipped_steps of them in a row, naming the step and the last finite loss, with a checkpoint of the last
  applied weights.

Tiny model and stores as in test_faults_checkpoint.py, CPU fp32; SIGNAL_SEED overrides the seed of the moments.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, free_port
from test_faults_checkpoint import overrides as checkpoint_run_overrides

from engine import checkpoint as ckpt
from engine.config import load_config
from engine.launch import deepspeed_available
from engine.metrics_log import read_metrics
from engine.records import RunSummary
from engine.stopping import EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_PREEMPTED, interrupt_in_one_line
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import read_state_dict

REPO = Path(__file__).resolve().parents[1]
D = 16
STEPS, SAVE_EVERY = 40, 10
SEED = int(os.environ.get("SIGNAL_SEED", "19"))
KEYS = ("step", "loss", "losses", "lr", "grad_norm", "skipped_steps")
WORKERS = ("data.num_workers=2",)  # signalled too, as a scheduler or a terminal signals every process (shield_worker)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pretrain_stores(tmp_path_factory.mktemp("preempt_stores"), D)


def overrides(stores, out: Path, *extra: str) -> list[str]:
    return checkpoint_run_overrides(stores, out, *extra, steps=STEPS, save_every=SAVE_EVERY)


def environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def logged_steps(out: Path) -> list[int]:
    """The steps of the train records written so far (complete lines only)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_bytes().split(b"\n")[:-1]:
        record = json.loads(line)
        if record.get("kind", "train") == "train":
            steps.append(record["step"])
    return steps


def signal_after(proc: subprocess.Popen, out: Path, step: int, delay: float, send) -> None:
    """send() `delay` seconds after the run logged `step` (a moment inside a later step, or a save)."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and step not in logged_steps(out):
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended before the signal: {out}"
    send()


def cli(stores, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.pretrain", *overrides(stores, out, *extra)]


def run(command: list[str], log: Path, timeout: float = 300) -> tuple[int, str]:
    with open(log, "w") as f:
        rc = subprocess.run(
            command, cwd=REPO, env=environment(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
    return rc, log.read_text()


def signalled(
    command: list[str], out: Path, log: Path, rng: random.Random, *signals: int, group: bool = False, steps: int = STEPS
) -> tuple[int, str, int]:
    """Run `command` (`steps` steps), send `signals` (0.1 s apart) at a random moment after one of steps 2 to
    steps - 6 was logged: (exit status, output, the step the signal followed). group: to every process of the
    command's process group."""
    after = rng.randint(2, steps - 6)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            command, cwd=REPO, env=environment(), stdout=f, stderr=subprocess.STDOUT, start_new_session=group
        )

        def send() -> None:
            for i, number in enumerate(signals):
                time.sleep(0.1 if i else 0)
                if group:
                    os.killpg(proc.pid, number)
                else:
                    proc.send_signal(number)

        signal_after(proc, out, after, round(rng.random() * 0.05, 3), send)
        rc = proc.wait(timeout=120)
        if group:  # the launcher may go first: wait for the ranks
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
    return rc, log.read_text(), after


def assert_stopped(out: Path, text: str, after: int, line: str, steps: int = STEPS) -> tuple[int, Path]:
    """One line `line` (with {step} and {checkpoint}) for a stop at a step >= after, whose checkpoint is complete
    and is the newest; no traceback. Returns the step and the checkpoint."""
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    step = logged_steps(out)[-1]
    path = ckpt.checkpoint_root(out) / ckpt.tag_of(step)
    expected = line.format(step=step, checkpoint=path)
    assert [x for x in text.splitlines() if " at step " in x and "checkpoint" in x] == [expected], text[-3000:]
    assert after <= step < steps and ckpt.is_complete(path) and ckpt.find_latest(out) == path
    stop = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "stop"' in x]
    assert [(r["step"], r["checkpoint"]) for r in stop] == [(step, str(path))]
    return step, path


def assert_resumed_as_uninterrupted(out: Path, reference: Path, text: str, step: int, path: Path) -> None:
    assert f"resumed from {path} at step {step}" in text, text[-3000:]
    got, _ = read_metrics(out / "metrics.jsonl")
    want, _ = read_metrics(reference / "metrics.jsonl")
    assert [{k: r.get(k) for k in KEYS} for r in got] == [{k: r.get(k) for k in KEYS} for r in want]
    a, b = read_state_dict(out / "model.safetensors"), read_state_dict(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- the plain path


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory) -> Path:
    """The uninterrupted run the signalled ones are compared with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    Trainer(load_config(None, overrides(stores, out)), PretrainTask(), use_deepspeed=False).train()
    return out


def test_sigterm_saves_at_the_step_in_flight_and_the_same_command_resumes_there(stores, reference, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "run"
    rc, text, after = signalled(
        cli(stores, out, *WORKERS), out, tmp_path / "stopped.log", rng, signal.SIGTERM, group=True
    )
    message = f"seed {SEED} (SIGNAL_SEED): SIGTERM after step {after}"
    assert rc == EXIT_PREEMPTED, (message, text[-3000:])
    step, path = assert_stopped(
        out, text, after, "preempted at step {step}: checkpoint {checkpoint} (SIGTERM); the same command resumes it"
    )
    rc, text = run(cli(stores, out), tmp_path / "resumed.log")
    assert rc == 0, text[-3000:]
    assert_resumed_as_uninterrupted(out, reference, text, step, path)


def test_the_preempt_signal_is_an_early_warning_that_stops_the_same_way(stores, tmp_path):
    out = tmp_path / "run"
    rc, text, after = signalled(
        cli(stores, out, *WORKERS), out, tmp_path / "stopped.log", random.Random(SEED + 1), signal.SIGUSR1, group=True
    )
    assert rc == EXIT_PREEMPTED, text[-3000:]
    assert_stopped(
        out, text, after, "preempted at step {step}: checkpoint {checkpoint} (SIGUSR1); the same command resumes it"
    )


def test_ctrl_c_saves_and_exits_130_without_a_traceback(stores, tmp_path):
    """Twice within a second, as torchrun passes on the SIGINT a scheduler also sends its workers: one ^C."""
    out = tmp_path / "run"
    rc, text, after = signalled(
        cli(stores, out, *WORKERS),
        out,
        tmp_path / "stopped.log",
        random.Random(SEED + 2),
        signal.SIGINT,
        signal.SIGINT,
        group=True,
    )
    assert rc == EXIT_INTERRUPTED, text[-3000:]
    assert_stopped(
        out, text, after, "interrupted (^C) at step {step}: checkpoint {checkpoint}; the same command resumes it"
    )


def test_a_second_ctrl_c_exits_at_once_in_one_line(tmp_path):
    script = (
        "import os, signal, time\nfrom engine.stopping import StopRequests\nwith StopRequests('SIGUSR1') as r:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(1.3)\n    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\nprint('not reached')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_INTERRUPTED and proc.stdout == ""
    assert proc.stderr == "interrupted again: exiting now, without a checkpoint of this step\n"


def test_ctrl_c_outside_the_loop_is_one_line(capsys):
    @interrupt_in_one_line("lxmert-pretrain")
    def main() -> int:
        raise KeyboardInterrupt

    assert main() == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "lxmert-pretrain: interrupted (^C) outside the training loop\n"


def test_the_time_limit_saves_and_stops_before_it(stores, tmp_path):
    out = tmp_path / "run"
    limit = 12.0
    tick = time.monotonic()
    with open(tmp_path / "run.log", "w") as f:
        proc = subprocess.Popen(
            cli(stores, out, "train.max_steps=100000", f"train.time_limit={limit}"),
            cwd=REPO,
            env=environment(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        while proc.poll() is None and not logged_steps(out):
            time.sleep(0.01)
        first_step = time.monotonic() - tick
        rc = proc.wait(timeout=120)
    seconds = time.monotonic() - tick
    text = (tmp_path / "run.log").read_text()
    assert rc == EXIT_PREEMPTED, text[-3000:]
    step = logged_steps(out)[-1]
    path = ckpt.checkpoint_root(out) / ckpt.tag_of(step)
    line = f"stopped at step {step} by train.time_limit {limit}: checkpoint {path}; the same command resumes it"
    assert line in text.splitlines() and ckpt.find_latest(out) == path and ckpt.is_complete(path), text[-3000:]
    if first_step < limit - 6:  # a loaded machine may spend the budget starting up: the stop is then at step 1
        assert seconds < limit, (first_step, seconds)  # from the start to the exit, shutdown included


# ------------------------------------------------------------------------------------- runs that only skip


def test_a_run_that_only_skips_steps_stops_with_the_last_good_weights(stores, tmp_path):
    """An inf in every gradient from step 3 on: steps 3, 4, 5, ... apply nothing. train.max_skipped_steps=3,
    logging every 2 steps: the log line of step 4 sees 2 in a row, step 6's sees 4 and stops."""
    config = load_config(
        None, overrides(stores, tmp_path, "train.max_skipped_steps=3", "train.log_every=2", "train.save_every=2")
    )
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    trainer.model.match_head.weight.register_hook(lambda grad: grad * math.inf if trainer.step >= 2 else grad)
    summary = trainer.train()
    assert summary.exit_status == EXIT_DIVERGED and trainer.step == 6
    loss = next(r["loss"] for r in trainer.history if r["step"] == 2)
    path = ckpt.checkpoint_root(tmp_path) / ckpt.tag_of(6)
    assert summary.stopped["line"] == (
        f"stopped at step 6: the last 4 steps had a non-finite gradient (train.max_skipped_steps 3); last finite "
        f"loss {loss:.4f} at step 2: checkpoint {path} (the weights of step 2)"
    )
    assert [r["skipped_steps"] for r in trainer.history] == [0, 2, 4]
    good, last = (ckpt.load_plain(ckpt.checkpoint_root(tmp_path) / ckpt.tag_of(s))["model"] for s in (2, 6))
    assert all(torch.equal(good[k], last[k]) for k in good)
    assert ckpt.find_latest(tmp_path) == path and not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- 2 ranks

DS_STEPS = 12


def launcher(stores, out: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "engine.pretrain",
        *overrides(stores, out, "train.zero_stage=2", f"train.max_steps={DS_STEPS}", "train.save_every=4", *extra),
    ]


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_a_two_rank_zero_job_signalled_as_a_scheduler_does_stops_at_one_step_and_resumes(stores, tmp_path):
    """SIGTERM to the launcher's whole process group (the deepspeed runner, its per-node launcher and both ranks;
    the launcher passes another SIGTERM on to the ranks and gives them 30 s): both ranks save at the step they
    agree on, and a second launch resumes there with the uninterrupted 2-rank run's records and weights."""
    reference = tmp_path / "reference"
    rc, text = run(launcher(stores, reference), tmp_path / "reference.log")
    assert logged_steps(reference) == list(range(1, DS_STEPS + 1)), text[-3000:]
    out = tmp_path / "run"
    _, text, after = signalled(
        launcher(stores, out),
        out,
        tmp_path / "stopped.log",
        random.Random(SEED + 3),
        signal.SIGTERM,
        group=True,
        steps=DS_STEPS,
    )
    step, path = assert_stopped(
        out,
        text,
        after,
        "preempted at step {step}: checkpoint {checkpoint} (SIGTERM); the same command resumes it",
        steps=DS_STEPS,
    )
    parts = ckpt.read_manifest(path)["parts"]  # rank 0 lists the files every rank wrote at this step
    assert sorted(p for p in parts if p.startswith("rng_rank")) == ["rng_rank0.json", "rng_rank1.json"]
    assert sum("optim_states" in p for p in parts) == 2
    assert not re.search(r"exits with return code = (?!75)", text), text[-3000:]
    rc, text = run(launcher(stores, out), tmp_path / "resumed.log")
    assert_resumed_as_uninterrupted(out, reference, text, step, path)


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_a_two_rank_job_stops_by_its_time_limit_at_one_step_on_both_ranks(stores, tmp_path):
    """train.time_limit on rank 0's clock, 2 ranks: both stop at the step rank 0 decides (the other rank's clock,
    started later, would decide another), each writing its shards into the one checkpoint, exit 75."""
    out, limit = tmp_path / "run", 20.0
    tick = time.monotonic()
    command = launcher(stores, out, "train.max_steps=100000", f"train.time_limit={limit}")
    rc, text = run(command, tmp_path / "run.log", timeout=120)
    seconds = time.monotonic() - tick
    assert rc == EXIT_PREEMPTED, text[-3000:]
    line = f"stopped at step {{step}} by train.time_limit {limit}: checkpoint {{checkpoint}}; the same command "
    step, path = assert_stopped(out, text, 1, line + "resumes it", steps=100000)
    parts = ckpt.read_manifest(path)["parts"]
    assert sorted(p for p in parts if p.startswith("rng_rank")) == ["rng_rank0.json", "rng_rank1.json"]
    assert sum("optim_states" in p for p in parts) == 2
    # the launcher reports the first rank to exit (then it ends the other, whose part is written): 75
    assert re.findall(r"exits with return code = (-?\d+)", text)[:1] == ["75"], text[-3000:]
    assert step > 1 or seconds > limit - 10, (step, seconds)  # stopped at once only where start-up ate the budget


def test_the_main_job_ends_with_a_stopped_runs_line_and_status(monkeypatch, tmp_path, capsys):
    """engine.main does not go on to fine-tuning after a stopped pre-training: its line, its status."""
    from engine import main as job

    line = f"preempted at step 7: checkpoint {tmp_path}/checkpoints/step_00000007 (SIGTERM); the same command resumes"
    monkeypatch.setattr(job, "prepare_data", lambda layout, options: {})
    stopped = RunSummary(
        7, 7, 0, 1.0, f"{tmp_path}/checkpoints/step_00000007", "metrics.jsonl", {"line": line, "status": 75}
    )
    monkeypatch.setattr(job, "run_pretraining", lambda layout, options: stopped)
    monkeypatch.setattr(job, "run_finetuning", lambda layout, options: pytest.fail("fine-tuning after a stop"))
    assert job.main(["--workdir", str(tmp_path)]) == EXIT_PREEMPTED
    assert capsys.readouterr().out == f"engine.main: {line}\n"


def test_a_fine_tuning_run_stops_and_resumes_the_same_way(tmp_path):
    """The loop is shared: VQA fine-tuning (with evaluation) signalled in-process in its fourth step saves there,
    and a new FineTuner on the same output dir ends with the uninterrupted run's losses, evaluations and best model."""
    from test_engine_finetune import TINY, build_data

    from engine.finetune import FineTuner

    data = build_data(tmp_path / "data", images=40)
    common = [
        *TINY,
        f"data.train.text={data['vqa_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data['vqa_minival']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.task=vqa",
        "train.batch_size=8",
        "train.max_steps=8",
        "train.log_every=1",
        "train.eval_every=3",
        "train.seed=0",
    ]

    def tuner(out: Path) -> FineTuner:
        return FineTuner(load_config(None, [*common, f"train.output_dir={out}"]), use_deepspeed=False)

    expected = tuner(tmp_path / "uninterrupted").train()
    first = tuner(tmp_path / "run")
    step = first.train_step.optimizer_step

    def signalled_step():
        if first.step == 3:  # inside the fourth step
            os.kill(os.getpid(), signal.SIGTERM)
        return step()

    first.train_step.optimizer_step = signalled_step
    stopped = first.train()
    assert stopped.exit_status == EXIT_PREEMPTED and stopped.steps == 4, stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    second = tuner(tmp_path / "run")
    assert second.step == 4
    summary = second.train()
    history = [{k: r.get(k) for k in KEYS} for r in [*first.history, *second.history]]
    reference, _ = read_metrics(tmp_path / "uninterrupted/metrics.jsonl")
    assert history == [{k: r.get(k) for k in KEYS} for r in reference]
    assert [e["metric"] for e in summary.task["eval"]] == [e["metric"] for e in expected.task["eval"]]
    a, b = read_state_dict(summary.task["model"]), read_state_dict(expected.task["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
