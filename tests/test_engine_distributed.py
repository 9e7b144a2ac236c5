"""The real CLI (`python -m engine.pretrain`) under the DeepSpeed launcher with 2 CPU ranks (gloo).

- ZeRO 1, 2 and 3, fp32, dropout off (and ZeRO-1 through torchrun): 2 ranks x micro batch 4 log the per-step
  losses of one process on the same global batch of 8 (the plain path, micro 4 x 2 accumulation steps: what data
  parallelism computes, the mean of the two halves' losses; the sampler hands rank r the r-th slice of each
  global batch).
- The final validation (each rank its slice of every global batch, sums all-reduced) equals one process's
  evaluation of the same slices.
- ZeRO-2: the checkpoint at step 2, resumed by a second launch with train.resume=auto, continues with the losses
  of the uninterrupted run.
- Fine-tuning (engine.finetune, VQA, ZeRO-2): losses, evaluation and best model of one process with the same
  global batch.
- ZeRO-3: the consolidated export (model.safetensors and the --export-hf layout) holds the full fp32 master
  weights and loads into lxmert.LxmertForPreTraining and transformers.LxmertForPreTraining with equal outputs.

One launch per stage + one resume launch (each 10-30 s on 2 cores, mostly start-up). A rank occasionally aborts at exit
after writing its results, so the tests read metrics.jsonl / the files rather than trust the exit code alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, free_port, tiny_model_overrides

import lxmert
from engine import checkpoint as ckpt
from engine.config import load_config
from engine.data.tasks import TaskStore
from engine.finetune import FineTuner
from engine.launch import deepspeed_available
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import load_into, read_state_dict

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed"),
]

REPO = Path(__file__).resolve().parents[1]
D = 16
STEPS = 4
SAVE_AT = 2


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist_stores")
    return build_pretrain_stores(root, D)


def overrides(stores, out: Path, *extra: str) -> list[str]:
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        f"data.train.text={text}",
        f"data.train.features={feats}",
        "data.num_workers=0",
        f"data.eval.text={text}",
        f"data.eval.features={feats}",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.epochs=100",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"train.save_every={SAVE_AT}",
        f"train.output_dir={out}",
        "train.seed=0",
        "train.precision=fp32",
        *extra,
    ]


def launch(
    args: list[str], log: Path, *flags: str, module: str = "engine.pretrain", launcher: str = "deepspeed"
) -> int:
    """`deepspeed --num_gpus 2 --module <module> [flags] args` (2 CPU ranks; or the same through torchrun);
    returns the exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("OMP_NUM_THREADS", None)  # the engine's own default: cores / local ranks
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if launcher == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            module,
            *flags,
            *args,
        ]
    else:
        command = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            module,
            *flags,
            *args,
        ]
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    return proc.returncode


def records(out: Path, kind: str = "train") -> list[dict]:
    """The run's metrics.jsonl records of one kind (train, eval)."""
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if r.get("kind", "train") == kind]


def losses(recs: list[dict]) -> list[float]:
    return [r["loss"] for r in recs]


def assert_close_lists(got: list[float], expected: list[float], tol: float, what: str) -> None:
    assert len(got) == len(expected), (what, got, expected)
    for g, e in zip(got, expected):
        assert abs(g - e) <= tol * max(1.0, abs(e)), (what, got, expected)


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory) -> Trainer:
    """One process, the plain path, micro batch 4 x 2 accumulation steps = the 2-rank run's global batch."""
    out = tmp_path_factory.mktemp("reference")
    config = load_config(None, overrides(stores, out, "train.micro_batch_size=4", "train.grad_accum_steps=2"))
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def reference_eval(reference) -> dict:
    """The reference's final model evaluated in this process as the 2-rank run evaluates: each rank's eval
    loader (micro batch 4, its slice of each global batch of 8), the sample-weighted sums combined."""
    rank, world = reference.rank, reference.world_size
    parts = []
    try:
        for r in range(2):
            reference.rank, reference.world_size = r, 2
            reference.eval_loader = reference._make_loader(reference.config.data.eval)
            parts.append(reference.evaluate())
    finally:
        reference.rank, reference.world_size = rank, world
    n = sum(p["samples"] for p in parts)
    asked = sum(p["qa_questions"] for p in parts)
    return {
        "samples": n,
        "loss": sum(p["loss"] * p["samples"] for p in parts) / n,
        "losses": {k: sum(p["losses"][k] * p["samples"] for p in parts) / n for k in parts[0]["losses"]},
        "matched_accuracy": sum(p["matched_accuracy"] * p["samples"] for p in parts) / n,
        "qa_accuracy": sum(p["qa_accuracy"] * p["qa_questions"] for p in parts) / asked,
    }


_runs: dict[int, tuple[Path, int]] = {}


@pytest.fixture(scope="module")
def run_stage(stores, tmp_path_factory):
    """Launch (once per stage) the 2-rank run of a ZeRO stage; returns (output_dir, exit code)."""

    def get(stage: int) -> tuple[Path, int]:
        if stage not in _runs:
            out = tmp_path_factory.mktemp(f"zero{stage}")
            flags = ("--export-hf",) if stage == 3 else ()
            rc = launch(overrides(stores, out, f"train.zero_stage={stage}"), out / "launch.log", *flags)
            _runs[stage] = (out, rc)
        return _runs[stage]

    return get


def diagnose(out: Path, rc: int) -> str:
    log = out / "launch.log"
    return f"exit code {rc}; {log}:\n" + (log.read_text()[-4000:] if log.is_file() else "(no log)")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_match_one_process_on_the_same_global_batch(stage, run_stage, reference, reference_eval):
    out, rc = run_stage(stage)
    recs = records(out)
    # each rank's share of the cores (the launcher sets no OMP_NUM_THREADS on the CPU; launch() drops ours)
    assert {r["threads"] for r in recs} == {max(1, len(os.sched_getaffinity(0)) // 2)}, diagnose(out, rc)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), diagnose(out, rc)
    assert_close_lists(losses(recs), losses(reference.history), 1e-5, f"ZeRO-{stage} loss")
    for r, e in zip(recs, reference.history):
        assert list(r["losses"]) == list(e["losses"])  # the components in the single process's order
        for name, value in e["losses"].items():
            assert abs(r["losses"][name] - value) <= 1e-5 * max(1.0, abs(value)), (stage, r["step"], name)
        assert abs(r["lr"] - e["lr"]) <= 1e-12
        assert abs(r["grad_norm"] - e["grad_norm"]) <= 1e-4 * max(1.0, e["grad_norm"]), (stage, r, e)
    # the final validation: each rank evaluates its slice, the sums are all-reduced
    (final,) = records(out, "eval")
    assert final["step"] == STEPS and final["samples"] == reference_eval["samples"]
    assert list(final["losses"]) == list(recs[0]["losses"])  # validation lists them as training does
    assert_close_lists(
        [final["loss"], *final["losses"].values(), final["matched_accuracy"]],
        [reference_eval["loss"], *reference_eval["losses"].values(), reference_eval["matched_accuracy"]],
        1e-5,
        f"ZeRO-{stage} eval",
    )
    assert final["qa_accuracy"] == pytest.approx(reference_eval["qa_accuracy"], abs=1e-9)
    # every rank's ZeRO shards and RNG states of the step-2 and the final checkpoint were written and are listed in
    # the manifest rank 0 wrote
    for step in (SAVE_AT, STEPS):
        path = ckpt.checkpoint_root(out) / ckpt.tag_of(step)
        assert ckpt.is_complete(path), path
        parts = ckpt.read_manifest(path)["parts"]
        assert sorted(p for p in parts if p.startswith("rng_rank")) == ["rng_rank0.json", "rng_rank1.json"]
        assert sum("optim_states" in p for p in parts) == (2 if stage > 0 else 0), sorted(parts)
        assert sorted(p.name for p in path.iterdir()) == sorted([*parts, ckpt.MANIFEST])


@pytest.mark.parametrize("stage", [0, 1])
def test_torchrun_launch_gives_the_same_losses(stage, stores, reference, tmp_path):
    """The same CLI under torchrun (ZeRO-1, and ZeRO-0 where DeepSpeed reports no gradient norm: the runtime
    measures it): DeepSpeed takes the ranks from torchrun's environment."""
    out = tmp_path / "torchrun"
    rc = launch(overrides(stores, out, f"train.zero_stage={stage}"), tmp_path / "launch.log", launcher="torchrun")
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1)), diagnose(out, rc)
    assert_close_lists(losses(recs), losses(reference.history), 1e-5, f"torchrun ZeRO-{stage} loss")
    for r, e in zip(recs, reference.history):
        assert abs(r["grad_norm"] - e["grad_norm"]) <= 1e-4 * max(1.0, e["grad_norm"]), (stage, r, e)


def test_zero2_resume_continues_with_the_uninterrupted_losses(run_stage, stores, tmp_path):
    full, rc = run_stage(2)
    full_losses = losses(records(full))
    assert len(full_losses) == STEPS, diagnose(full, rc)
    # a copy of the run as it stood right after the step-2 checkpoint
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ckpt.checkpoint_root(full) / ckpt.tag_of(SAVE_AT), ckpt.checkpoint_root(out) / ckpt.tag_of(SAVE_AT))
    (ckpt.checkpoint_root(out) / ckpt.LATEST).write_text(ckpt.tag_of(SAVE_AT))
    rc = launch(
        overrides(stores, out, "train.zero_stage=2", "train.resume=auto", "train.keep_checkpoints=1"),
        tmp_path / "resume.log",
    )
    recs = records(out)
    log = (tmp_path / "resume.log").read_text()
    assert f"resumed from {ckpt.checkpoint_root(out) / ckpt.tag_of(SAVE_AT)} at step {SAVE_AT}" in log, log[-3000:]
    assert [r["step"] for r in recs] == list(range(SAVE_AT + 1, STEPS + 1)), (rc, log[-3000:])
    assert_close_lists(losses(recs), full_losses[SAVE_AT:], 1e-6, "resumed loss")
    # keep_checkpoints=1 under DeepSpeed: the final checkpoint (with both ranks' RNG states) is all that is left
    root = ckpt.checkpoint_root(out)
    assert [p.name for p in root.glob("step_*")] == [ckpt.tag_of(STEPS)]
    assert ckpt.find_latest(out) == root / ckpt.tag_of(STEPS)
    assert sorted(p.name for p in (root / ckpt.tag_of(STEPS)).glob("rng_rank*")) == ["rng_rank0.json", "rng_rank1.json"]


def test_zero3_export_is_the_fp32_master_weights_and_loads_into_both_models(run_stage):
    out, rc = run_stage(3)
    path = out / "model.safetensors"
    assert path.is_file() and (out / "hf/model.safetensors").is_file(), diagnose(out, rc)
    config = load_config(out / "config.yaml", []).model
    exported = read_state_dict(path)

    # the master weights of the final checkpoint, consolidated from both ranks' ZeRO-3 shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = ckpt.checkpoint_root(out) / ckpt.tag_of(STEPS)
    master = get_fp32_state_dict_from_zero_checkpoint(str(final.parent), tag=final.name)
    ours = lxmert.LxmertForPreTraining(config)
    expected_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert set(exported) == set(expected_shapes)
    for key, value in exported.items():
        assert value.dtype == torch.float32, (key, value.dtype)
        assert value.shape == expected_shapes[key], (key, value.shape)  # gathered, not a partition
        if key in master:
            assert torch.equal(value, master[key].float()), key

    load_into(ours, exported)
    ours.eval()
    import transformers

    hf_config = transformers.LxmertConfig(**json.loads((out / "hf/config.json").read_text()))
    hf = transformers.LxmertForPreTraining(hf_config).eval()
    hf.load_state_dict(read_state_dict(out / "hf/model.safetensors"), strict=True)

    g = torch.Generator().manual_seed(0)
    b, length, regions = 3, 11, 7
    inputs = {
        "input_ids": torch.randint(0, config.vocab_size, (b, length), generator=g),
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "token_type_ids": torch.zeros(b, length, dtype=torch.long),
        "visual_feats": torch.randn(b, regions, D, generator=g),
        "visual_pos": torch.rand(b, regions, 4, generator=g),
    }
    inputs["attention_mask"][0, 8:] = 0
    with torch.no_grad():
        got = ours(**inputs, return_prediction_logits=True)
        expected = hf(**inputs)
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=key)


def test_two_rank_vqa_fine_tuning_matches_one_process(tmp_path):
    """engine.finetune under the launcher, ZeRO-2, 2 ranks x micro 4: the losses, the evaluation (each rank
    predicts a slice, the ranks share them) and the best model of one process with micro 4 x 2 accumulation."""
    from test_engine_finetune import TINY, build_data

    data = build_data(tmp_path / "data", images=60)
    common = [
        *TINY,
        f"data.train.text={data['vqa_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data['vqa_minival']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.task=vqa",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.log_every=1",
        "train.seed=0",
    ]
    one = FineTuner(
        load_config(
            None,
            [*common, f"train.output_dir={tmp_path / 'one'}", "train.micro_batch_size=4", "train.grad_accum_steps=2"],
        ),
        use_deepspeed=False,
    )
    expected = one.train()
    out = tmp_path / "two"
    rc = launch(
        [*common, f"train.output_dir={out}", "train.zero_stage=2"], tmp_path / "launch.log", module="engine.finetune"
    )
    train, evals = records(out), records(out, "eval")
    assert len(train) == 6, diagnose(out, rc)
    assert_close_lists(losses(train), [r["loss"] for r in one.history], 1e-5, "fine-tuning losses")
    assert len(evals) == 1 and evals[0]["examples"] == len(TaskStore(data["vqa_minival"]))
    assert evals[0]["metric"] == pytest.approx(expected.task["eval"][0]["metric"], abs=1e-9)
    a, b = read_state_dict(expected.task["model"]), read_state_dict(out / "best/model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
