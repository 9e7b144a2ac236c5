"""A run's output directory (issue 19; engine/output_dir.py): one run at a time, resumes only where the config
allows, and the failures a user causes as one line on stderr, exit 2.

- the lock: a second run into a directory in use (pre-training, fine-tuning, the main job) is refused at once,
  naming the directory and the holder, and writes nothing; a killed holder's lock (dead pid here, or a heartbeat
  gone stale on another node) is taken over with one line; the other ranks learn the outcome without hanging;
- resume checks: another architecture, global batch or data draw is refused naming each key with both values,
  before anything is written; absorbed keys (schedule length, cadence, world size) resume; train.resume=weights:
  starts a new schedule from a checkpoint's weights;
- one line each: a full disk during a save (a real tmpfs, as root; plain and DeepSpeed paths: the last complete
  checkpoint stays latest and loads), an output directory that cannot be made, a store array missing or cut
  short, a multi-rank launch without DeepSpeed, a config with several errors.
Tiny model and the shared synthetic stores, CPU fp32; the first test runs one pre-training subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, tiny_model_overrides
from test_cli_errors import one_line_error as one_line

from engine import checkpoint as ckpt
from engine import finetune, launch, output_dir, pretrain
from engine import main as main_job
from engine.config import ConfigError, load_config
from engine.data.tasks import convert_task
from engine.output_dir import LOCK_FILE, STALE_S, RunError, RunLock, resume_conflicts
from engine.runtime import Runtime, resume_point
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import read_state_dict

REPO = Path(__file__).resolve().parents[1]
D = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("output_dir_stores")
    text, feats = build_pretrain_stores(root, D)
    syn = root / "syn/vqa"
    convert_task("vqa", [syn / "train.json"], feats, syn / "trainval_ans2label.json", root / "vqa", progress=False)
    return {"text": text, "feats": feats, "vqa": root / "vqa"}


def overrides(stores, out: Path, *extra: str) -> list[str]:
    return [
        *tiny_model_overrides(stores["text"], D),
        f"data.train.text={stores['text']}",
        f"data.train.features={stores['feats']}",
        "data.num_workers=0",
        "optim.name=adamw",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.save_every=2",
        "train.log_every=1",
        "train.threads=1",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(stores, tmp_path_factory) -> Path:
    """A finished 2-step pre-training run with its checkpoint at step 2 (tests copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert pretrain.main(overrides(stores, out)) == 0
    return out


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sleeper():
    """A live process on this host that is not this one: the holder of a lock a test writes."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(directory: Path, pid: int, host: str | None = None, job: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    path.write_text(
        json.dumps(
            {"pid": pid, "host": host or socket.gethostname(), "started": time.time(), "job": job, "token": "theirs"}
        )
    )
    return path


# ------------------------------------------------------------------------------------------------- the lock


def test_a_second_run_is_refused_at_once_and_a_killed_runs_lock_does_not_block(stores, tmp_path, capsys):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "engine.pretrain",
        *overrides(stores, out, "train.max_steps=100000", "train.epochs=1000", "train.save_every=0"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():  # training: the lock was taken before anything was written
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.2)
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        tick = time.monotonic()
        assert pretrain.main(overrides(stores, out)) == 2
        assert time.monotonic() - tick < 10  # at once: before a model is built
        one_line(
            capsys,
            f"lxmert-pretrain: error: {out} is in use by another run: pid {first.pid} on {socket.gethostname()}",
            "another train.output_dir",
        )
        assert json.loads((out / LOCK_FILE).read_text()) == holder
    finally:
        first.send_signal(signal.SIGKILL)  # leaves its lock behind, as a crash or the OOM killer would
        first.communicate(timeout=60)
    assert (out / LOCK_FILE).is_file()
    assert pretrain.main(overrides(stores, out)) == 0  # max_steps 2: the killed run's schedule is absorbed
    printed = capsys.readouterr().out
    assert f"{out}: took over the lock of pid {first.pid}" in printed and "is not running on this host" in printed
    assert not (out / LOCK_FILE).exists()  # released at the end


@pytest.mark.parametrize("cli", ["pretrain", "finetune", "main"])
def test_every_cli_refuses_a_directory_in_use_and_writes_nothing(cli, stores, tmp_path, capsys, sleeper):
    out = tmp_path / "out"
    lock = write_lock(out, sleeper.pid)
    before = files(out)
    if cli == "pretrain":
        assert pretrain.main(overrides(stores, out)) == 2
        prefix = "lxmert-pretrain: error: "
    elif cli == "finetune":
        args = [*overrides(stores, out), "train.task=vqa", f"data.train.text={stores['vqa']}", "--from-scratch"]
        assert finetune.main([a for a in args if not a.startswith("model.num_qa_labels")]) == 2
        prefix = "lxmert-finetune: error: "
    else:
        assert main_job.main(["--workdir", str(out), "--steps", "2"]) == 2
        prefix = "engine.main: "
    err = one_line(capsys, f"{prefix}{out} is in use by another run: pid {sleeper.pid} on {socket.gethostname()}")
    assert ("another --workdir" if cli == "main" else "another train.output_dir") in err
    assert files(out) == before and lock.is_file()


def test_a_stale_heartbeat_is_taken_over_and_the_holder_keeps_its_own_fresh(tmp_path, monkeypatch):
    lock_file = write_lock(tmp_path, 4321, host="another-node")
    with pytest.raises(RunError, match="in use by another run: pid 4321 on another-node"):
        RunLock.take(tmp_path)  # alive as far as this host can tell: its heartbeat is fresh
    old = time.time() - STALE_S - 60
    os.utime(lock_file, (old, old))
    monkeypatch.setattr(output_dir, "HEARTBEAT_S", 0.05)
    said: list[str] = []
    lock = RunLock.take(tmp_path, report=said.append)
    assert len(said) == 1 and "took over the lock of pid 4321 on another-node" in said[0] and "stale" in said[0]
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    os.utime(lock_file, (old, old))
    time.sleep(0.5)
    assert time.time() - lock_file.stat().st_mtime < 5  # the heartbeat thread refreshed it
    lock.release()
    assert not lock_file.exists()


def test_the_other_ranks_learn_the_outcome_without_hanging(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(output_dir, "RANK_WAIT_S", 0.5)
    with pytest.raises(RunError, match="rank 1: rank 0 did not take the lock"):
        RunLock.take(tmp_path, rank=1)
    lock = RunLock.take(tmp_path, rank=0)
    assert RunLock.take(tmp_path, rank=1) is None  # this job's lock: rank 1 goes on
    lock.release()
    write_lock(tmp_path, os.getpid(), job="10.0.0.1:29500:")  # a live run of another job
    tick = time.monotonic()
    with pytest.raises(RunError, match="is in use by another run") as refused:
        RunLock.take(tmp_path, rank=1)
    assert time.monotonic() - tick < 0.5
    monkeypatch.setenv("RANK", "1")  # rank 0 prints the refusal; rank 1 only what names it
    assert launch.error_line("lxmert-pretrain", refused.value) == 2 and capsys.readouterr().err == ""
    assert launch.error_line("lxmert-pretrain", RunError("rank 1: rank 0 did not take the lock")) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------------------------------- resume checks


def test_a_resume_the_checkpoint_cannot_take_is_refused_naming_each_key(finished, stores, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    before = files(run)
    changed = ["model.hidden_size=64", "model.l_layers=2", "train.batch_size=16", "data.seed=5", "optim.lr=5e-4"]
    assert pretrain.main(overrides(stores, run, *changed)) == 2
    one_line(
        capsys,
        f"{run / 'checkpoints' / ckpt.tag_of(2)} was written with settings a resume cannot take in",
        "model.hidden_size 32 -> 64",
        "model.l_layers 1 -> 2",
        "train.batch_size 8 -> 16",
        "data.seed 0 -> 5",
        "optim.lr 0.0001 -> 0.0005",
        f"train.resume=weights:{run / 'checkpoints' / ckpt.tag_of(2)}",
    )
    assert files(run) == before  # nothing written, no lock left


def test_changes_a_resume_absorbs_are_not_refused(finished, stores, tmp_path, capsys):
    old = {
        "train.world_size": 1,
        "train.micro_batch_size": 8,
        "train.grad_accum_steps": 1,
        "train.log_every": 1,
        "data.num_workers": 0,
        "model.attn_backend": "sdpa",
        "train.batch_size": 8,
    }
    new = {
        "train.world_size": 2,
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 2,
        "train.log_every": 5,
        "data.num_workers": 4,
        "model.attn_backend": "eager",
        "train.batch_size": 8,
    }
    assert resume_conflicts(old, new) == ([], [])  # another world size with the same global batch resumes
    run = shutil.copytree(finished, tmp_path / "run")
    absorbed = ("train.max_steps=3", "train.log_every=2", "model.attn_backend=eager")
    assert pretrain.main(overrides(stores, run, *absorbed)) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / ckpt.tag_of(2)} at step 2" in printed
    assert "train.max_steps 2 -> 3: the learning-rate schedule now spans the new total" in printed
    assert ckpt.find_latest(run).name == ckpt.tag_of(3)


def test_resume_weights_starts_a_new_schedule_from_a_checkpoints_weights(finished, stores, tmp_path, capsys):
    source = ckpt.checkpoint_root(finished) / ckpt.tag_of(2)
    out = tmp_path / "new"
    config = load_config(
        None,
        overrides(
            stores, out, f"train.resume=weights:{finished}", "train.batch_size=16", "optim.lr=5e-4", "train.max_steps=3"
        ),
    )
    trainer = Trainer(config, PretrainTask())
    assert trainer.step == 0 and trainer.weights_only_resume and trainer.resume_from == source
    weights = read_state_dict(source / ckpt.MODEL_FILE)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.runtime.lr() == 0.0  # a new warm-up, from step 0
    trainer.train()
    trainer.release_output_dir()
    again = Trainer(config, PretrainTask())  # its own checkpoint now takes precedence: a rerun resumes it
    assert again.step == 3 and not again.weights_only_resume
    again.release_output_dir()
    capsys.readouterr()
    assert (
        pretrain.main(overrides(stores, tmp_path / "other", f"train.resume=weights:{source}", "model.hidden_size=64"))
        == 2
    )
    one_line(capsys, f"train.resume=weights:{source}: its weights do not fit this run: model.hidden_size 32 -> 64")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ConfigError, match="in this run's own train.output_dir"):
        Trainer(load_config(None, overrides(stores, out, f"train.resume=weights:{out}")), PretrainTask())
    assert not (out / LOCK_FILE).exists()  # released when the start-up failed


def test_a_fresh_start_into_a_used_directory_keeps_the_previous_run_aside(finished, stores, tmp_path, capsys):
    """train.resume=none into a finished run's directory: its files move, byte for byte, into previous-<time>/
    (said in one line), and the new run is a fresh one (the same records as the first run's, no resume)."""
    out = shutil.copytree(finished, tmp_path / "run")
    before = {name: (out / name).read_bytes() for name in sorted(files(out))}
    capsys.readouterr()
    assert pretrain.main(overrides(stores, out, "train.resume=none")) == 0
    (previous,) = [p for p in out.iterdir() if p.name.startswith(output_dir.PREVIOUS)]
    assert f"train.resume=none: what {out} held is now in {previous}" in capsys.readouterr().out.splitlines()
    assert {name: (previous / name).read_bytes() for name in sorted(files(previous))} == before
    timing = ("samples_per_s", "tokens_per_s", "tflops", "data_wait_share", "step_time_s", "eta_s", "peak_memory_gib")
    records = [
        [{k: v for k, v in json.loads(line).items() if k not in timing} for line in path.read_text().splitlines()]
        for path in (out / "metrics.jsonl", previous / "metrics.jsonl")
    ]
    assert records[0] == records[1] and all(r["kind"] != "resume" for r in records[0])
    assert sorted(p.name for p in ckpt.checkpoint_root(out).iterdir()) == [ckpt.LATEST, ckpt.tag_of(2)]
    assert output_dir.set_aside(tmp_path / "missing") is None and not (out / LOCK_FILE).exists()


# ----------------------------------------------------------------------------------------- one-line failures


@pytest.mark.parametrize(
    "path",
    [
        "plain",
        pytest.param(
            "deepspeed",
            marks=[
                pytest.mark.slow,
                pytest.mark.skipif(not launch.deepspeed_available(), reason="DeepSpeed is not installed"),
            ],
        ),
    ],
)
def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_stays_latest(
    path, stores, tmp_path, capsys, monkeypatch
):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=26m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root: a real full disk cannot be made here")
    try:
        out = disk / "run"
        real_save = Runtime.save

        def save_then_fill_the_disk(self, output_dir, step, client, rank=0):
            path = real_save(self, output_dir, step, client, rank)
            free = shutil.disk_usage(disk).free
            with open(disk / "filler", "wb") as f:  # leave 1 MiB: the log's lines fit, a checkpoint does not
                f.write(b"\0" * (free - 2**20))
            return path

        monkeypatch.setattr(Runtime, "save", save_then_fill_the_disk)
        stage = "train.zero_stage=1" if path == "deepspeed" else "train.zero_stage=0"
        assert pretrain.main(overrides(stores, out, "train.max_steps=4", stage)) == 2
        kept = ckpt.checkpoint_root(out) / ckpt.tag_of(2)
        one_line(
            capsys,
            f"lxmert-pretrain: error: checkpoint {ckpt.tag_of(4)} into {ckpt.checkpoint_root(out)} failed: ",
            "No space left on device (it needed about ",
            f"{kept} stays the latest",
        )
        assert (ckpt.checkpoint_root(out) / ckpt.LATEST).read_text().strip() == ckpt.tag_of(2)
        assert resume_point("auto", out) == kept  # complete and verified: the failed save left no checkpoint
        if path == "plain":
            assert sorted(p.name for p in ckpt.checkpoint_root(out).iterdir()) == [ckpt.LATEST, ckpt.tag_of(2)]
            assert ckpt.load_plain(kept)["step"] == 2
        assert not (out / LOCK_FILE).exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_store_array_missing_or_cut_short_names_the_file_and_the_bytes(stores, tmp_path, capsys):
    feats = shutil.copytree(stores["feats"], tmp_path / "feats")
    boxes = feats / "boxes.npy"
    size = boxes.stat().st_size
    boxes.write_bytes(boxes.read_bytes()[: size // 2])
    assert pretrain.main(overrides({**stores, "feats": feats}, tmp_path / "out")) == 2
    one_line(capsys, f"data.train.features: {boxes} is cut short: {size // 2} bytes, expected {size} (float32")
    boxes.unlink()
    assert pretrain.main(overrides({**stores, "feats": feats}, tmp_path / "out")) == 2
    one_line(capsys, f"data.train.features: {boxes} is missing (meta.json lists it: {size} bytes)")
    assert not (tmp_path / "out").exists()


def test_a_multi_rank_launch_without_deepspeed_is_one_line_from_rank_0(stores, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(launch, "deepspeed_available", lambda: False)  # as if it were not installed
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert pretrain.main(overrides(stores, tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == lines and "Traceback" not in err, err
    monkeypatch.setenv("RANK", "0")
    assert pretrain.main(overrides(stores, tmp_path / "out")) == 2
    one_line(
        capsys, "WORLD_SIZE=2: a launch of 2 ranks needs DeepSpeed, which is not installed (pip install deepspeed)"
    )
    assert not (tmp_path / "out").exists()


def test_a_config_with_several_errors_is_one_line(tmp_path, capsys):
    assert pretrain.main(["optim.lr=-1", "train.batch_size=0", f"train.output_dir={tmp_path / 'out'}"]) == 2
    one_line(capsys, "invalid configuration: ", "optim.lr must be > 0, got -1.0", "; train.batch_size must be >= 1")


def test_safetensors_io_errors_are_os_errors_naming_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as error:
        ckpt.write_state_dict({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert error.value.errno == 28 and error.value.filename == str(tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not launch.deepspeed_available(), reason="DeepSpeed is not installed")
def test_deepspeeds_writer_keeps_its_first_failed_write_as_an_os_error_and_writes_no_more(tmp_path, monkeypatch):
    """What lets every rank of a save agree on a failure (tests/test_cluster.py): torch.save's RuntimeError is an
    OSError naming the file (EIO with torch's words, or ENOSPC where the disk has no room), kept, not raised."""
    writer = ckpt._checkpoint_engine_class()(True)
    calls = []

    def broken(obj, path, **kwargs):
        calls.append(path)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", broken)
    first, second = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    writer.save({"w": torch.zeros(2)}, first)
    writer.save({"w": torch.zeros(2)}, second)
    assert calls == [first] and writer.written == [] and writer.failure.filename == first
    assert writer.failure.errno == errno.EIO and "unexpected pos 64 vs 0" in writer.failure.strerror
    assert writer.failure.__traceback__ is None  # its frames would hold the failed file open
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    writer.failure = None
    writer.save({"w": torch.zeros(2)}, first)
    assert writer.failure.errno == errno.ENOSPC and writer.failure.filename == first


def test_an_output_directory_that_cannot_be_made_is_one_line(stores, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    assert pretrain.main(overrides(stores, blocker / "run")) == 2
    one_line(capsys, f"taking the run's lock into {blocker / 'run'} failed: ", "Not a directory")
