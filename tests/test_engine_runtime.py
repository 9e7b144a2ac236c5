"""engine/runtime.py and what the pre-training loop builds on it: activation checkpointing, torch.compile,
evaluation inside pre-training, and DeepSpeed's mixed precision and offload (one in-process rank, gloo).

The DeepSpeed tests are marked slow. Tiny model and stores as in test_engine_train.py; CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, tiny_model_overrides

import lxmert
from engine import checkpoint as ckpt
from engine.config import ConfigError, load_config
from engine.data import convert
from engine.data.store import TextStore
from engine.launch import deepspeed_available
from engine.parallelize import apply_activation_checkpointing, encoder_layers
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import load_into, read_state_dict

D = 16
NO_DROPOUT = ("model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime_stores")
    text, feats = build_pretrain_stores(root, D)
    convert.convert_text(
        [root / "syn/lxmert/mscoco_minival.json"],
        feats,
        root / "text_minival",
        answers=root / "syn/lxmert/all_ans.json",
        progress=False,
    )
    return {"text": text, "feats": feats, "minival": root / "text_minival"}


def make_config(stores, out: Path, *extra: str):
    return load_config(None, overrides(stores, out, *extra))


def overrides(stores, out: Path, *extra: str) -> list[str]:
    return [
        *tiny_model_overrides(stores["text"], D, layers=(2, 1, 2)),
        f"data.train.text={stores['text']}",
        f"data.train.features={stores['feats']}",
        "data.num_workers=0",
        "optim.lr=1e-3",
        "optim.name=adamw",
        "train.batch_size=8",
        "train.epochs=100",
        "train.max_steps=4",
        "train.log_every=1",
        "train.save_every=1000",
        f"train.output_dir={out}",
        "train.seed=0",
        *extra,
    ]


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history]


def test_activation_checkpointing_leaves_losses_and_gradients_bit_identical(stores, tmp_path):
    """Dropout on: the recomputation replays the same masks (RNG state preserved), so nothing changes."""
    plain = Trainer(make_config(stores, tmp_path / "a"), PretrainTask(), use_deepspeed=False)
    plain.train()
    ckpt = Trainer(
        make_config(stores, tmp_path / "b", "train.activation_checkpointing=true"), PretrainTask(), use_deepspeed=False
    )
    layers = encoder_layers(ckpt.model)
    assert len(layers) == 5 and all(layer._checkpointed for layer in layers)
    assert apply_activation_checkpointing(ckpt.model) == 5  # idempotent: wrapping twice would recompute twice
    ckpt.train()
    assert losses(plain) == losses(ckpt) and len(losses(plain)) == 4
    for (name, a), b in zip(plain.model.state_dict().items(), ckpt.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_activation_checkpointing_recomputes_in_the_backward(stores, tmp_path):
    """The wrapped layers run twice per training step (forward, then again in the backward), once in eval."""
    trainer = Trainer(
        make_config(stores, tmp_path, "train.activation_checkpointing=true", *NO_DROPOUT),
        PretrainTask(),
        use_deepspeed=False,
    )
    calls = []
    layer = trainer.model.lxmert.cross_layers[0]
    layer.lang_ffn.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    batch = next(iter(trainer.loader))
    out = trainer.model(**batch.model_inputs())
    out.loss.backward()
    assert len(calls) == 2
    with torch.no_grad():
        trainer.model(**batch.model_inputs())
    assert len(calls) == 3


def test_compiled_model_gives_the_eager_losses(stores, tmp_path):
    """train.compile through torch.compile's tracing (aot_eager: inductor's C++ build takes minutes on 2 CPU
    cores); dropout off, because compiled dropout draws its own random numbers."""
    eager = Trainer(
        make_config(stores, tmp_path / "eager", *NO_DROPOUT, "train.max_steps=3"), PretrainTask(), use_deepspeed=False
    )
    eager.train()
    torch._dynamo.reset()
    compiled = Trainer(
        make_config(
            stores,
            tmp_path / "compiled",
            *NO_DROPOUT,
            "train.max_steps=3",
            "train.compile=true",
            "train.compile_backend=aot_eager",
        ),
        PretrainTask(),
        use_deepspeed=False,
    )
    assert compiled.model._compiled_call_impl is not None
    compiled.train()
    for a, b in zip(losses(eager), losses(compiled), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    torch._dynamo.reset()


def test_cuda_graphs_compile_in_reduce_overhead_mode_and_mark_every_micro_batch(stores, tmp_path, monkeypatch):
    """train.cuda_graphs: torch.compile's "reduce-overhead" mode on the model (inductor's build is minutes here, so
    the compile call is recorded, not made) and a new CUDA-graph iteration at every micro batch; it needs
    train.compile with inductor."""
    compiled, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append(kwargs))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    extra = ("train.max_steps=3", "train.grad_accum_steps=2", "train.compile=true", "train.cuda_graphs=true")
    trainer = Trainer(make_config(stores, tmp_path / "graphs", *extra), PretrainTask(), use_deepspeed=False)
    trainer.train()
    assert compiled == [{"backend": "inductor", "mode": "reduce-overhead"}]
    assert len(marks) == 3 * 2  # steps x micro batches
    for wrong in (
        ("train.cuda_graphs=true",),
        ("train.compile=true", "train.compile_backend=aot_eager", "train.cuda_graphs=true"),
    ):
        with pytest.raises(
            ConfigError, match=r"train.cuda_graphs needs train.compile=true with train.compile_backend=inductor"
        ):
            make_config(stores, tmp_path / "wrong", *wrong)


def test_pretraining_evaluates_on_schedule_and_the_numbers_are_the_models(stores, tmp_path):
    """Eval records every train.eval_every steps and at the end; the last one is recomputed here from the
    exported model over the whole minival split."""
    config = make_config(
        stores,
        tmp_path,
        f"data.eval.text={stores['minival']}",
        f"data.eval.features={stores['feats']}",
        "train.eval_every=2",
        "train.max_steps=5",
    )
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert summary.task["eval"] == trainer.evals[-1] and summary.task["eval"]["step"] == 5
    last = evals[-1]
    assert set(last["losses"]) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert last["loss"] == pytest.approx(sum(last["losses"].values()), rel=1e-5)

    model = lxmert.LxmertForPreTraining(trainer.config.model)
    load_into(model, read_state_dict(summary.task["model"]))
    model.eval()
    loader = trainer.eval_loader
    loader.set_epoch(0)
    n = right = asked = matched = 0
    total = 0.0
    with torch.no_grad():
        for batch in loader:
            out = model(**batch.model_inputs())
            b = batch.input_ids.shape[0]
            n += b
            total += float(out.loss) * b
            mask = batch.ans >= 0
            right += int(((out.question_answering_score.argmax(-1) == batch.ans) & mask).sum())
            asked += int(mask.sum())
            matched += int((out.cross_relationship_score.argmax(-1) == batch.matched_label).sum())
    assert last["samples"] == n and n >= len(TextStore(stores["minival"]))
    assert last["loss"] == pytest.approx(total / n, rel=1e-5)
    assert last["qa_questions"] == asked > 0 and last["qa_accuracy"] == pytest.approx(right / asked)
    assert last["matched_accuracy"] == pytest.approx(matched / n)
    # the training log's throughput windows exclude evaluation time; plots are written at the end
    assert all(Path(p).is_file() for p in summary.plots) and len(summary.plots) == 4  # SVG and PNG each


def test_eval_every_zero_evaluates_at_each_epoch_end(stores, tmp_path):
    config = make_config(
        stores,
        tmp_path,
        f"data.eval.text={stores['minival']}",
        f"data.eval.features={stores['feats']}",
        "train.eval_every=0",
        "train.epochs=2",
        "train.max_steps=null",
        "train.batch_size=32",
    )
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    trainer.train()
    steps = [r["step"] for r in trainer.evals]
    assert steps == [trainer.steps_per_epoch, 2 * trainer.steps_per_epoch]


# --------------------------------------------------------------------------------- DeepSpeed, one rank


@pytest.fixture
def one_rank(monkeypatch):
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)


needs_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_bf16_tracks_fp32_and_exports_the_fp32_masters(stores, tmp_path, one_rank, stage):
    reference = Trainer(make_config(stores, tmp_path / "fp32", *NO_DROPOUT), PretrainTask(), use_deepspeed=False)
    reference.train()
    bf16 = Trainer(
        make_config(stores, tmp_path / "bf16", *NO_DROPOUT, "train.precision=bf16", f"train.zero_stage={stage}"),
        PretrainTask(),
        use_deepspeed=True,
    )
    summary = bf16.train()
    assert next(bf16.engine.module.parameters()).dtype == torch.bfloat16
    for a, b in zip(losses(reference), losses(bf16), strict=True):
        assert b == pytest.approx(a, rel=2e-2)  # bf16 keeps 8 bits of mantissa
    exported = read_state_dict(summary.task["model"])
    weight = exported["lxmert.lang_layers.0.attention.qkv.weight"]
    assert weight.dtype == torch.float32
    # the fp32 masters after 4 updates, not bf16 values widened; and close to the fp32 run's weights
    assert (weight.bfloat16().float() != weight).float().mean() > 0.9
    fp32_weight = reference.model.state_dict()["lxmert.lang_layers.0.attention.qkv.weight"]
    assert (weight - fp32_weight).abs().max() < 1e-2 * fp32_weight.abs().max()


def weights_around_step(trainer, step: int, weights) -> dict[str, dict]:
    """Wraps the trainer's step: `weights()` before the backward of the step that follows `step` steps (DeepSpeed
    steps inside the backward) and after that step's optimizer step, as {"before": ..., "after": ...}."""
    snapshots = {}
    forward_backward, optimizer_step = trainer.train_step.forward_backward, trainer.train_step.optimizer_step

    def recording_forward_backward(batch, *args):
        if trainer.step == step:
            snapshots["before"] = weights()
        return forward_backward(batch, *args)

    def recording_step():
        result = optimizer_step()
        if trainer.step == step:
            snapshots["after"] = weights()
        return result

    trainer.train_step.forward_backward, trainer.train_step.optimizer_step = recording_forward_backward, recording_step
    return snapshots


def cpu_has_fp16() -> bool:
    """DeepSpeed refuses fp16 on a CPU whose oneDNN has no fp16 kernels (the CPU accelerator's check)."""
    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.skipif(not cpu_has_fp16(), reason="DeepSpeed: 'Type fp16 is not supported on your device' (this CPU)")
def test_deepspeed_fp16_skips_an_injected_inf_step(stores, tmp_path, one_rank):
    template = tmp_path / "fp16.json"
    # a low initial scale: the default 2^16 overflows this model's early fp16 gradients (skipped, as it should)
    template.write_text(
        json.dumps(
            {
                "fp16": {
                    "enabled": "auto",
                    "initial_scale_power": 1,
                    "loss_scale_window": 1000,
                    "min_loss_scale": 1,
                    "hysteresis": 1,
                }
            }
        )
    )
    # CPU quirk: fp16 LayerNorm's backward on a constant row (a zeroed region's projection at initialisation)
    # is NaN there with the authors' eps 1e-12 (its 1/std ~1e6 is kept in fp16; CUDA keeps it in fp32)
    trainer = Trainer(
        make_config(
            stores,
            tmp_path / "run",
            *NO_DROPOUT,
            "train.precision=fp16",
            "train.max_steps=5",
            "train.zero_stage=1",
            f"deepspeed.config={template}",
            "model.layer_norm_eps=1e-5",
        ),
        PretrainTask(),
        use_deepspeed=True,
    )
    param = trainer.engine.module.match_head.weight
    assert param.dtype == torch.float16

    def inject(grad):
        return grad * math.inf if trainer.step == 2 else grad  # the backward of the third step

    param.register_hook(inject)
    snapshots = weights_around_step(trainer, 2, trainer.consolidated_state_dict)
    trainer.train()
    records = {r["step"]: r for r in trainer.history}
    assert records[3]["skipped"] is True and trainer.skipped_steps == 1
    assert all(not records[s]["skipped"] for s in (1, 2, 4, 5)), records
    for name, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][name]), name  # masters untouched
    assert records[3]["loss_scale"] == records[2]["loss_scale"] / 2 == 1.0
    assert records[3]["lr"] == records[2]["lr"]  # the schedule did not advance either
    assert records[4]["loss"] < records[1]["loss"]


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero0_fp32_logs_the_norm_and_skips_an_inf_step(stores, tmp_path, one_rank):
    """ZeRO-0 fp32: DeepSpeed steps the client optimizer itself and reports no gradient norm (and would apply a
    non-finite step). The runtime measures the norm (the plain path's, on the same batches) and skips such a step:
    weights, schedule and later losses as if it never came."""
    plain = Trainer(make_config(stores, tmp_path / "plain", *NO_DROPOUT), PretrainTask(), use_deepspeed=False)
    plain.train()
    ds = Trainer(
        make_config(stores, tmp_path / "ds", *NO_DROPOUT, "train.zero_stage=0"), PretrainTask(), use_deepspeed=True
    )
    ds.train()
    for a, b in zip(plain.history, ds.history, strict=True):
        assert math.isfinite(b["grad_norm"]) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    line = (tmp_path / "ds/metrics.jsonl").read_text()
    assert '"grad_norm": "nan"' not in line and '"grad_norm": null' not in line

    # an inf gradient in the third step: skipped, nothing applied, the lr not advanced
    skipper = Trainer(
        make_config(stores, tmp_path / "skip", *NO_DROPOUT, "train.zero_stage=0", "train.max_steps=5"),
        PretrainTask(),
        use_deepspeed=True,
    )
    param = skipper.model.match_head.weight
    param.register_hook(lambda grad: grad * math.inf if skipper.step == 2 else grad)
    snapshots = weights_around_step(skipper, 2, lambda: {k: v.clone() for k, v in skipper.model.state_dict().items()})
    skipper.train()
    records = {r["step"]: r for r in skipper.history}
    assert records[3]["skipped"] is True and not math.isfinite(records[3]["grad_norm"])
    assert skipper.skipped_steps == 1 and all(not records[s]["skipped"] for s in (1, 2, 4, 5))
    for name, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][name]), name
    assert records[3]["lr"] == records[2]["lr"] and records[4]["lr"] < records[3]["lr"]
    assert all(math.isfinite(records[s]["loss"]) for s in (4, 5))


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_bf16_zero_skips_an_inf_step_on_the_device(stores, tmp_path, one_rank, stage):
    """bf16 ZeRO-1/2 runs without DeepSpeed's overflow check (bf16.check_grad_overflow false, deepspeed_config):
    the runtime's guard on the client optimizer applies nothing for a non-finite norm, and settle() takes the
    schedule step back, as on the plain path."""
    skipper = Trainer(
        make_config(
            stores,
            tmp_path / "skip",
            *NO_DROPOUT,
            "train.precision=bf16",
            f"train.zero_stage={stage}",
            "train.max_steps=5",
        ),
        PretrainTask(),
        use_deepspeed=True,
    )
    assert skipper.runtime.engine.optimizer.check_grad_overflow is False and skipper.runtime._device_skip
    param = skipper.engine.module.match_head.weight
    param.register_hook(lambda grad: grad * math.inf if skipper.step == 2 else grad)
    snapshots = weights_around_step(skipper, 2, skipper.consolidated_state_dict)
    skipper.train()
    records = {r["step"]: r for r in skipper.history}
    assert records[3]["skipped"] is True and not math.isfinite(records[3]["grad_norm"])
    assert skipper.skipped_steps == 1 and all(not records[s]["skipped"] for s in (1, 2, 4, 5))
    for name, value in snapshots["before"].items():
        assert torch.equal(value, snapshots["after"][name]), name  # masters untouched
    assert records[3]["lr"] == records[2]["lr"] and records[4]["lr"] < records[3]["lr"]
    assert all(math.isfinite(records[s]["loss"]) for s in (4, 5))


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    "stage, offload, extra",
    [
        (2, "optimizer", ()),
        (3, "optimizer+params", ("train.activation_checkpointing=true",)),
    ],
)
def test_deepspeed_offload_matches_the_plain_path(stores, tmp_path, one_rank, stage, offload, extra):
    """ZeRO-Offload steps our BertAdam on the CPU partitions: the same numbers as the plain path (fp32)."""
    plain = Trainer(
        make_config(stores, tmp_path / "plain", *NO_DROPOUT, "optim.name=bertadam"), PretrainTask(), use_deepspeed=False
    )
    plain.train()
    offloaded = Trainer(
        make_config(
            stores,
            tmp_path / "ds",
            *NO_DROPOUT,
            "optim.name=bertadam",
            f"train.zero_stage={stage}",
            f"train.offload={offload}",
            *extra,
        ),
        PretrainTask(),
        use_deepspeed=True,
    )
    summary = offloaded.train()
    for a, b in zip(losses(plain), losses(offloaded), strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (losses(plain), losses(offloaded))
    exported = read_state_dict(summary.task["model"])
    for name, value in plain.model.state_dict().items():
        assert torch.allclose(exported[name], value, rtol=1e-4, atol=1e-6), name


def test_pretrain_cli_reports_the_runs_numbers(stores, tmp_path, capsys):
    from engine.pretrain import main

    assert (
        main(
            overrides(
                stores,
                tmp_path,
                f"data.eval.text={stores['minival']}",
                f"data.eval.features={stores['feats']}",
                "train.max_steps=2",
            )
        )
        == 0
    )
    out = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert f"  {'mlm':<10} {train[0]['losses']['mlm']:>10.4f} {train[-1]['losses']['mlm']:>10.4f}" in out
    assert f"eval (step 2, {final['samples']} samples): loss {final['loss']:.4f}" in out
    assert f"plot       {tmp_path / 'plots' / 'loss.svg'}" in out and (tmp_path / "plots/loss.svg").is_file()
    assert f"model      {tmp_path / 'model.safetensors'}" in out


@pytest.mark.slow
@needs_deepspeed
def test_a_weights_only_zero3_load_reads_the_named_checkpoint_through_the_allow_list(
    stores, tmp_path, one_rank, monkeypatch
):
    """--evaluate-only and train.resume=weights: under ZeRO-3: DeepSpeed's own consolidation would read the
    checkpoint `latest` names (here step 4, not the step 2 asked for) with torch.load(weights_only=False)."""
    zero3 = ("train.zero_stage=3", "train.save_every=2", *NO_DROPOUT)
    Trainer(make_config(stores, tmp_path / "run", *zero3), PretrainTask(), use_deepspeed=True).train()
    step2, step4 = (ckpt.checkpoint_root(tmp_path / "run") / ckpt.tag_of(step) for step in (2, 4))
    assert ckpt.find_latest(tmp_path / "run") == step4
    resumed = Trainer(
        make_config(stores, tmp_path / "resumed", *zero3, f"train.resume={step2}"), PretrainTask(), use_deepspeed=True
    )
    assert resumed.step == 2
    expected = resumed.consolidated_state_dict()

    real_load = torch.load

    def allow_listed_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, f"{args[0]} unpickled without the allow-list"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", allow_listed_load)
    fresh = Trainer(make_config(stores, tmp_path / "fresh", *zero3), PretrainTask(), use_deepspeed=True)
    fresh.runtime.load(step2, weights_only=True)
    got = fresh.consolidated_state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
