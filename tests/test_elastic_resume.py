"""Elastic resume (issue 19, item 2): a DeepSpeed checkpoint written by N ranks resumes on M (engine/elastic.py).

Through the command lines: `deepspeed --num_gpus 2 --module engine.pretrain` (2 CPU ranks) and `python -m
engine.pretrain` (one process; `deepspeed --num_gpus 1` at ZeRO-0, where one process without a launcher takes the plain
path). Every run has the global batch 8 in micro batches of 4: 2 ranks x 4, or one rank x 4 x 2 accumulation steps,
which compute the same losses. A run writes checkpoints at steps 2 and 4; its step-2 checkpoint, copied alone into a
new directory, is resumed with the other number of ranks, which must say so in one line and log steps 3 and 4 within
1e-4 of the uninterrupted run (one process on the plain path, shared by both directions: the sampling and the losses
do not depend on the ranks).

Cases: 2 -> 1 and 1 -> 2 at ZeRO-2 and ZeRO-3, 2 -> 1 at ZeRO-0, 1 -> 2 at ZeRO-1 (ZeRO 1/2 share their code: 2 -> 1
at ZeRO-1 is ZeRO-2's path). Each run that writes a checkpoint is launched once for the module. Tiny model, 4 steps,
fp32, dropout off. 12 launches of 10-30 s each: about 2.5 minutes on 2 cores. 1 -> 2 at ZeRO-2 and 2 -> 1 at ZeRO-3
are marked `interpreters` (4 launches; tests/test_checkpoint_interpreters.py says why).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_pretrain_stores, free_port, tiny_model_overrides

from engine import checkpoint as ckpt
from engine.config import ConfigError, load_config
from engine.launch import deepspeed_available
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed"),
]

REPO = Path(__file__).resolve().parents[1]
D = 16
STEPS, SAVE_AT = 4, 2
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pretrain_stores(tmp_path_factory.mktemp("elastic_stores"), D)


def overrides(stores, out: Path, *extra: str) -> list[str]:
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        f"data.train.text={text}",
        f"data.train.features={feats}",
        "data.num_workers=0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.epochs=100",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"train.save_every={SAVE_AT}",
        f"train.output_dir={out}",
        "train.seed=0",
        "train.precision=fp32",
        *extra,
    ]


def launch(ranks: int, stage: int, args: list[str], log: Path) -> int:
    """engine.pretrain on `ranks` CPU ranks: the deepspeed launcher for 2 (and for 1 at ZeRO-0), else one process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if ranks == 1 and stage > 0:
        command = [sys.executable, "-m", "engine.pretrain"]
    else:
        command = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            "--module",
            "engine.pretrain",
        ]
    with open(log, "w") as f:
        return subprocess.run(
            [*command, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300
        ).returncode


def train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if r.get("kind", "train") == "train"]


def assert_close(got: list[dict], expected: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected], what
    for g, e in zip(got, expected):
        assert abs(g["loss"] - e["loss"]) <= TOLERANCE * max(1.0, abs(e["loss"])), (what, g, e)
        for name, value in e["losses"].items():
            assert abs(g["losses"][name] - value) <= TOLERANCE * max(1.0, abs(value)), (what, name, g, e)
        assert abs(g["lr"] - e["lr"]) <= 1e-12, (what, g, e)
        assert abs(g["grad_norm"] - e["grad_norm"]) <= TOLERANCE * max(1.0, e["grad_norm"]), (what, g, e)


@pytest.fixture(scope="module")
def uninterrupted(stores, tmp_path_factory) -> list[dict]:
    """One process, the plain path, micro 4 x 2 accumulation steps: the losses of 1 and of 2 ranks."""
    config = load_config(None, overrides(stores, tmp_path_factory.mktemp("uninterrupted")))
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    trainer.train()
    return trainer.history


_written: dict[tuple[int, int], Path] = {}


@pytest.fixture(scope="module")
def written(stores, tmp_path_factory, uninterrupted):
    """The run of (ranks, ZeRO stage) that writes the checkpoints, launched once; it matches the uninterrupted one."""

    def get(ranks: int, stage: int) -> Path:
        if (ranks, stage) not in _written:
            out = tmp_path_factory.mktemp(f"written_{ranks}ranks_zero{stage}")
            rc = launch(ranks, stage, overrides(stores, out, f"train.zero_stage={stage}"), out / "launch.log")
            log = (out / "launch.log").read_text()
            assert_close(train_records(out), uninterrupted, f"{ranks} ranks, ZeRO-{stage}, exit {rc}: {log[-3000:]}")
            _written[ranks, stage] = out
        return _written[ranks, stage]

    return get


ALSO_UNDER_A_SECOND_PYTHON = pytest.mark.interpreters  # CI runs these two under the system python3 too


@pytest.mark.parametrize(
    "before, after, stage",
    [
        (2, 1, 0),
        (1, 2, 1),
        (2, 1, 2),
        pytest.param(1, 2, 2, marks=ALSO_UNDER_A_SECOND_PYTHON),
        pytest.param(2, 1, 3, marks=ALSO_UNDER_A_SECOND_PYTHON),
        (1, 2, 3),
    ],
)
def test_a_checkpoint_of_n_ranks_resumes_on_m_with_the_uninterrupted_losses(
    before, after, stage, stores, written, uninterrupted, tmp_path
):
    source = ckpt.checkpoint_root(written(before, stage)) / ckpt.tag_of(SAVE_AT)
    out = tmp_path / "resumed"
    path = ckpt.checkpoint_root(out) / ckpt.tag_of(SAVE_AT)
    shutil.copytree(source, path)
    rc = launch(after, stage, overrides(stores, out, f"train.zero_stage={stage}"), tmp_path / "resume.log")
    log = (tmp_path / "resume.log").read_text()
    said = [line for line in log.splitlines() if line.startswith(f"resume: {path}: the world size changed")]
    assert len(said) == 1, f"exit {rc}:\n{log[-4000:]}"
    assert said[0].startswith(f"resume: {path}: the world size changed from {before} to {after} ranks: "), said
    assert f"resumed from {path} at step {SAVE_AT}" in log
    assert_close(train_records(out), uninterrupted[SAVE_AT:], f"{before} -> {after} ranks, ZeRO-{stage}: {log[-3000:]}")
    final = ckpt.checkpoint_root(out) / ckpt.tag_of(STEPS)
    assert ckpt.saved_world_size(final) == after  # and it saves as a run of `after` ranks
    # nothing written into the checkpoint read (a resume killed while it reshards loses nothing)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in path.iterdir())
    ckpt.verify(path)


def test_a_resume_with_another_global_batch_is_refused_in_one_line(stores, tmp_path, uninterrupted):
    """The ranks may change, the global batch may not (a plain checkpoint: the check is the trainer's)."""
    out = tmp_path / "run"
    Trainer(load_config(None, overrides(stores, out, "train.max_steps=2")), PretrainTask(), use_deepspeed=False).train()
    with pytest.raises(ConfigError, match="train.batch_size 8 -> 16 "):  # the run's config.yaml against this one
        Trainer(load_config(None, overrides(stores, out, "train.batch_size=16")), PretrainTask(), use_deepspeed=False)
    (out / "config.yaml").unlink()  # without it, the checkpoint's own record of the batch
    with pytest.raises(ConfigError, match="written with train.batch_size 8, this run has 16: a resumed run keeps"):
        Trainer(load_config(None, overrides(stores, out, "train.batch_size=16")), PretrainTask(), use_deepspeed=False)
