"""The pre-training loop (engine/train.py), checkpoints (engine/checkpoint.py), logs and the export.

One tiny synthetic store (feature dim 16) per module and a tiny model (hidden 32, 1/1/1 layers); CPU fp32 on
the plain path unless a test says otherwise. The DeepSpeed test is marked slow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, tiny_model_overrides

import lxmert
from engine import checkpoint as ckpt
from engine.config import load_config
from engine.context import TaskContext
from engine.launch import deepspeed_available
from engine.plots import read_metrics
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import load_into, read_state_dict

D = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("train_stores")
    return build_pretrain_stores(root, D)


def make_config(stores, out: Path, *extra: str):
    text, feats = stores
    overrides = [
        *tiny_model_overrides(text, D),
        f"data.train.text={text}",
        f"data.train.features={feats}",
        "data.num_workers=0",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.epochs=100",
        "train.max_steps=30",
        "train.log_every=1",
        "train.save_every=1000",
        f"train.output_dir={out}",
        "train.seed=0",
        *extra,
    ]
    return load_config(None, overrides)


def losses_of(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history]


@pytest.fixture(scope="module")
def baseline(stores, tmp_path_factory):
    """An uninterrupted 30-step run (shared by several tests)."""
    out = tmp_path_factory.mktemp("baseline")
    trainer = Trainer(make_config(stores, out), PretrainTask(), use_deepspeed=False)
    summary = trainer.train()
    return trainer, summary, out


class RecordingTask(PretrainTask):
    """Pre-training that keeps what each call into it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, object]] = []

    def check(self, ctx):
        self.calls.append(("check", ctx))
        super().check(ctx)

    def build_model(self, ctx):
        self.calls.append(("build_model", ctx))
        return super().build_model(ctx)

    def evaluate(self, ctx):
        self.calls.append(("evaluate", ctx))
        return super().evaluate(ctx)

    def summary(self, ctx, run):
        self.calls.append(("summary", ctx))
        return super().summary(ctx, run)


def test_a_task_sees_a_frozen_context_of_each_call_never_the_trainer(stores, tmp_path):
    text, feats = stores
    evals = (f"data.eval.text={text}", f"data.eval.features={feats}", "train.eval_every=2", "train.max_steps=4")
    task = RecordingTask()
    trainer = Trainer(make_config(stores, tmp_path, *evals), task, use_deepspeed=False)
    summary = trainer.train()
    assert all(type(ctx) is TaskContext for _, ctx in task.calls), task.calls
    calls = dict(task.calls[:2])
    assert calls["check"].runtime is None and calls["check"].config is trainer.config  # nothing built yet
    assert calls["build_model"].rank == trainer.rank and calls["build_model"].output_dir == tmp_path
    evaluated = [ctx for name, ctx in task.calls if name == "evaluate"]
    assert [ctx.step for ctx in evaluated] == [2, 4] and evaluated[0].runtime is trainer.runtime
    assert [len(ctx.evals) for ctx in evaluated] == [0, 1]  # the records before this evaluation
    assert task.calls[-1][1].evals == tuple(trainer.evals) and summary.task["eval"] == trainer.evals[-1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        evaluated[0].step = 0


FIELDS = {
    "step",
    "epoch",
    "loss",
    "losses",
    "lr",
    "grad_norm",
    "loss_scale",
    "skipped",
    "samples_per_s",
    "tokens_per_s",
    "tflops",
    "mfu",
    "data_wait_share",
    "peak_memory_gib",
}


def test_losses_fall_and_every_component_is_logged(baseline):
    trainer, summary, out = baseline
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30 and [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert set(r["losses"]) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
        assert r["mfu"] is None  # CPU: no known peak
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert 0 <= r["data_wait_share"] <= 1 and r["peak_memory_gib"] > 0
        assert math.isclose(r["loss"], sum(r["losses"].values()), rel_tol=1e-5)
    total = [r["loss"] for r in records]
    assert sum(total[-5:]) / 5 < 0.8 * sum(total[:5]) / 5, total
    assert summary.steps == 30 and summary.skipped_steps == 0
    assert (out / "config.yaml").is_file()


def test_resume_is_bit_identical(baseline, stores, tmp_path):
    reference = losses_of(baseline[0])
    first = Trainer(
        make_config(stores, tmp_path, "train.max_steps=30", "train.save_every=12"), PretrainTask(), use_deepspeed=False
    )
    # run 12 steps, as if killed right after the checkpoint at step 12
    first.total_steps = 12  # the schedule still spans 30 steps: the same lr as the uninterrupted run
    first.train()
    assert ckpt.find_latest(tmp_path).name == ckpt.tag_of(12)
    second = Trainer(make_config(stores, tmp_path, "train.resume=auto"), PretrainTask(), use_deepspeed=False)
    assert second.step == 12
    second.train()
    assert losses_of(first) + losses_of(second) == reference  # exact equality of floats
    # the log says where the second run went on, and the reader resolves the two runs into one
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in lines if r.get("kind") == "resume"]
    assert resumes == [
        {"kind": "resume", "step": 12, "checkpoint": str(ckpt.checkpoint_root(tmp_path) / ckpt.tag_of(12))}
    ]
    train, _ = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in train] == list(range(1, 31)) and [r["loss"] for r in train] == reference


def test_a_resume_record_drops_what_the_killed_run_logged_past_its_checkpoint(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in range(1, 6)] + [{"kind": "eval", "step": 5, "loss": 0.5}]
    rows += [{"kind": "resume", "step": 3, "checkpoint": "c"}] + [{"step": s, "loss": 10.0 + s} for s in (4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in train] == [1.0, 2.0, 3.0, 14.0, 15.0] and evals == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_respect_the_umask(stores, tmp_path, umask, mode):
    """Atomic writes go through mkstemp (0600); the files must end with what open() would give them."""
    old = os.umask(umask)
    try:
        Trainer(make_config(stores, tmp_path, "train.max_steps=2"), PretrainTask(), use_deepspeed=False).train()
    finally:
        os.umask(old)
    for name in (
        "config.yaml",
        "model.safetensors",
        "model_config.json",
        "plots/loss.svg",
        "plots/loss.png",
        "plots/throughput.svg",
        "checkpoints/latest",
        "metrics.jsonl",
    ):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_prune_keeps_the_newest_complete_checkpoints_and_the_latest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        ckpt.save_plain(tmp_path, step, {"step": step})
    root = ckpt.checkpoint_root(tmp_path)
    (root / ckpt.tag_of(0)).mkdir()  # an older save that crashed: incomplete
    (root / ckpt.tag_of(9)).mkdir()  # an incomplete newer one (another save in flight): never touched
    (root / ckpt.LATEST).write_text(ckpt.tag_of(2) + "\n")  # latest names an old one: it stays
    deleted = ckpt.prune(tmp_path, 2)
    assert sorted(p.name for p in deleted) == [ckpt.tag_of(s) for s in (0, 1, 3)]
    assert sorted(p.name for p in root.glob("step_*")) == [ckpt.tag_of(s) for s in (2, 4, 5, 9)]
    assert ckpt.prune(tmp_path, 2) == [] and ckpt.load_plain(root / ckpt.tag_of(5))["step"] == 5
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune(tmp_path, 0)


def test_keep_checkpoints_rotates_and_the_run_still_resumes(baseline, stores, tmp_path):
    """train.keep_checkpoints=2 with a checkpoint every 5 steps: after step 20 only steps 15 and 20 are left, and a
    resumed run continues from 20 with the uninterrupted run's losses."""
    config = make_config(stores, tmp_path, "train.save_every=5", "train.keep_checkpoints=2")
    first = Trainer(config, PretrainTask(), use_deepspeed=False)
    first.total_steps = 20
    first.train()
    root = ckpt.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.glob("step_*")) == [ckpt.tag_of(15), ckpt.tag_of(20)]
    second = Trainer(
        make_config(stores, tmp_path, "train.save_every=5", "train.keep_checkpoints=2"),
        PretrainTask(),
        use_deepspeed=False,
    )
    assert second.step == 20
    second.train()
    assert losses_of(first) + losses_of(second) == losses_of(baseline[0])
    assert sorted(p.name for p in root.glob("step_*")) == [ckpt.tag_of(25), ckpt.tag_of(30)]


def test_failed_save_keeps_the_previous_checkpoint(baseline, stores, tmp_path, monkeypatch):
    state = {"step": 1, "weights": torch.arange(5.0)}
    good = ckpt.save_plain(tmp_path, 1, state)

    def broken_save(tensors, name, *args, **kwargs):  # the tensors' file of the next save: half written
        Path(name).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_plain(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    assert ckpt.find_latest(tmp_path) == good
    assert (ckpt.checkpoint_root(tmp_path) / "latest").read_text().strip() == good.name
    assert not any(p.name.endswith(".tmp") for p in ckpt.checkpoint_root(tmp_path).iterdir())
    assert torch.equal(ckpt.load_plain(good)["weights"], torch.arange(5.0))
    # a later save of the same step replaces it only once complete
    again = ckpt.save_plain(tmp_path, 1, {"step": 1, "weights": torch.ones(2)})
    assert torch.equal(ckpt.load_plain(again)["weights"], torch.ones(2))


def test_fp16_non_finite_gradient_skips_the_step(stores, tmp_path):
    """CPU fp16 autocast with GradScaler: an inf injected into one gradient at step 3 is skipped, not applied."""
    config = make_config(stores, tmp_path, "train.precision=fp16", "train.max_steps=5")
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    assert trainer.runtime.scaler.is_enabled()
    # the default initial scale 2^16 overflows this model's early gradients in fp16 (skipped steps, as they
    # should be); start low so that only the injected inf is skipped
    trainer.runtime.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)
    param = trainer.model.match_head.weight
    snapshots = {}

    def inject(grad):
        if trainer.step == 2:  # the backward of the third step
            snapshots["before"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            return grad * math.inf
        return grad

    param.register_hook(inject)
    original = trainer.train_step.optimizer_step

    def recording_step():
        result = original()
        if trainer.step == 2:
            snapshots["after"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return result

    trainer.train_step.optimizer_step = recording_step
    trainer.train()
    records = {r["step"]: r for r in trainer.history}
    assert records[3]["skipped"] is True and trainer.skipped_steps == 1
    assert all(not records[s]["skipped"] for s in (1, 2, 4, 5))
    for name, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][name]), name
    assert records[3]["loss_scale"] < records[2]["loss_scale"]  # halved by the scaler


def test_export_loads_with_equal_outputs(baseline, stores):
    trainer, summary, out = baseline
    path = Path(summary.task["model"])
    assert path == out / "model.safetensors" and path.is_file()
    model = lxmert.LxmertForPreTraining(trainer.config.model)
    load_into(model, read_state_dict(path))
    model.eval()
    trainer.model.eval()
    batch = next(iter(trainer.loader))
    with torch.no_grad():
        a = trainer.model(**batch.model_inputs())
        b = model(**batch.model_inputs())
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.cross_relationship_score, b.cross_relationship_score)


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
def test_deepspeed_zero1_matches_the_plain_path(stores, tmp_path, monkeypatch):
    extra = (
        "train.max_steps=4",
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        "optim.name=adamw",
        "train.zero_stage=1",
    )
    plain = Trainer(make_config(stores, tmp_path / "plain", *extra), PretrainTask(), use_deepspeed=False)
    plain.train()
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    ds = Trainer(make_config(stores, tmp_path / "ds", *extra), PretrainTask(), use_deepspeed=True)
    ds.train()
    assert ds.engine is not None
    a, b = losses_of(plain), losses_of(ds)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)


@pytest.mark.parametrize("drop_last", [False, True])
def test_data_drop_last_reaches_the_sampler(stores, tmp_path, drop_last):
    """data.drop_last (the authors' recipes set it): an epoch of N samples in global batches of 8 has N // 8
    steps and leaves the tail out, or ceil(N / 8) steps with every sample in."""
    from engine.data.store import TextStore

    text, feats = stores
    trainer = Trainer(
        make_config(
            stores,
            tmp_path,
            f"data.drop_last={str(drop_last).lower()}",
            f"data.eval.text={text}",
            f"data.eval.features={feats}",
        ),
        PretrainTask(),
        use_deepspeed=False,
    )
    n = len(TextStore(text))
    assert n % 8, "the store must leave a partial batch"
    assert trainer.steps_per_epoch == (n // 8 if drop_last else -(-n // 8))
    assert len(trainer.eval_loader) == -(-n // 8)  # evaluation keeps the last batch, as the authors' valid loader
    trainer.loader.set_epoch(0)
    seen = {int(i) for batch in trainer.loader for i in batch.sample_index}
    assert len(seen) == (n // 8 * 8 if drop_last else n)
