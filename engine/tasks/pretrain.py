"""Pre-training as a task of the training loop: LxmertForPreTraining on a text store and its region store, the
authors' five tasks (masked words; masked objects: labels, attributes, features; image-sentence matching; QA).

Data: engine/data/loaders.make_loader of data.loader's kind over data.train (and data.eval), the micro batch per
rank; every draw of a sample (order, masks, negatives) comes from the sampler's Philox keyed by (data.seed,
epoch, position), so batches do not depend on ranks, workers or where a run resumed.

Evaluation (data.eval set): the validation losses (each component, sample-weighted over the split and the ranks)
and the QA and image-text matching accuracies, drawn as in training with epoch 0 of the eval sampler: the same
masks and negatives every time, so evaluations compare. The outputs: <output_dir>/model.safetensors (+
model_config.json; --export-hf adds transformers' layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from engine.config import ConfigError, StorePaths
from engine.context import TaskContext
from engine.data.batch import PretrainBatch
from engine.data.loaders import make_loader
from engine.data.sampling import SamplingConfig
from engine.data.store import RegionStore, StoreError, TextStore
from engine.flops import step_flops
from engine.launch import all_reduce_sum
from engine.tasks.base import Task, open_store
from lxmert.config import LxmertConfig
from lxmert.pretraining import LxmertForPreTraining

BUCKET_BATCHES = 100  # data.length_bucketing: sort by length within windows of this many global batches


def open_pretrain_stores(stores: StorePaths, split: str, model: LxmertConfig) -> tuple[TextStore, RegionStore]:
    """The text and feature stores of data.<split>, checked against each other and against the model."""
    regions = open_store(stores.features, f"data.{split}.features", RegionStore, "engine.data.convert --tsv")
    text = open_store(stores.text, f"data.{split}.text", TextStore, "engine.data.convert --text")
    try:
        text.check_features(regions)
    except StoreError as error:
        raise ConfigError(f"data.{split}: {error}") from None
    if regions.feat_dim != model.visual_feat_dim:
        raise ConfigError(
            f"data.{split}.features {regions.path} holds {regions.feat_dim}-d features but "
            f"model.visual_feat_dim is {model.visual_feat_dim}"
        )
    if model.task_qa and len(text.answers) != model.num_qa_labels:  # the head is the table, as the authors size it
        raise ConfigError(
            f"data.{split}.text {text.path} has {len(text.answers)} answers but the QA head has "
            f"model.num_qa_labels {model.num_qa_labels}: make them equal"
        )
    return text, regions


SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingConfig)}


def sampling_config(ctx: TaskContext) -> SamplingConfig:
    """The sampler's view of the run: data.* fields of the same name, and the rank's place in the batch."""
    c, d = ctx.config, ctx.config.data
    shared = {name: getattr(d, name) for name in SAMPLING_FIELDS if hasattr(d, name) and name != "sources"}  # seed,
    # drop_last and the masking / negative probabilities
    return SamplingConfig(
        **shared,
        batch_size=c.train.micro_batch_size,
        world_size=ctx.world_size,
        rank=ctx.rank,
        bucket_batches=BUCKET_BATCHES if d.length_bucketing else 0,
        vocab_size=c.model.vocab_size,
        sources=tuple(d.sources),
    )


class PretrainTask(Task):
    name = "pretrain"

    def __init__(self, export_hf: bool = False) -> None:
        self.export_hf = export_hf

    def check(self, ctx: TaskContext) -> None:
        data = ctx.config.data
        for split in ("train", "eval") if data.eval.text else ("train",):
            open_pretrain_stores(getattr(data, split), split, ctx.config.model)

    def build_model(self, ctx: TaskContext) -> torch.nn.Module:
        return LxmertForPreTraining(ctx.config.model).to(ctx.device)

    def make_loader(self, ctx: TaskContext, stores: StorePaths, split: str = "train"):
        """The loader of one split's stores; a missing, unfinished or mismatched store is a ConfigError naming
        the data.<split> key."""
        d = ctx.config.data
        text, regions = open_pretrain_stores(stores, split, ctx.config.model)
        options: dict[str, Any] = {"unpadding": ctx.config.model.attn_backend == "flash"}  # found on the host
        if d.loader in ("torch", "dali"):
            options["num_workers"] = d.num_workers
        unknown = set(d.sources) - set(text.sources)
        if unknown:
            raise ConfigError(
                f"data.sources: {sorted(unknown)} are not in the data.{split}.text store {text.path} "
                f"(it has {text.sources}; [] takes every source)"
            )
        sampling = sampling_config(ctx)
        if split == "eval":  # the authors' valid loader keeps its last batch whatever the training's drop_last
            sampling = dataclasses.replace(sampling, drop_last=False)
        try:
            return make_loader(d.loader, text, regions, sampling, device=ctx.device, **options)
        except (ValueError, StoreError) as error:
            raise ConfigError(f"data.{split}: {error}") from None

    def train_loader(self, ctx: TaskContext):
        return self.make_loader(ctx, ctx.config.data.train, "train")

    def eval_loader(self, ctx: TaskContext):
        data = ctx.config.data
        return self.make_loader(ctx, data.eval, "eval") if data.eval.text else None

    def flops(self, batch: PretrainBatch) -> int:
        b, length = batch.input_ids.shape
        regions = batch.visual_feats.shape[1]
        masked_regions = batch.masked_regions if "feat" in batch.obj_labels else 0  # host counts: no device read
        return step_flops(self.config.model, "pretrain", b, length, regions, batch.masked_tokens, masked_regions).total

    def tokens(self, batch: PretrainBatch) -> int:
        b, length = batch.input_ids.shape
        return b * (length + batch.visual_feats.shape[1])

    @torch.no_grad()
    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        """Validation losses and accuracies over the whole eval split (every rank takes its slice)."""
        loader = ctx.eval_loader
        assert loader is not None, "data.eval.text is not set"
        loader.set_epoch(0)
        names: list[str] = []
        sums: torch.Tensor | None = None  # [loss, components..., samples, qa right, qa asked, match right]
        device = ctx.device
        for batch in loader:
            out = ctx.runtime.forward(**ctx.inputs(batch).model_inputs())
            n = batch.input_ids.shape[0]
            if not names:
                names = list(out.losses)  # the model's order, as the training records list them
            ans = batch.ans.to(device)
            asked = ans >= 0
            qa_right = (out.question_answering_score.argmax(-1) == ans) & asked
            match_right = out.cross_relationship_score.argmax(-1) == batch.matched_label.to(device)
            row = torch.stack(
                [
                    out.loss.detach().float() * n,
                    *(out.losses[k].detach().float() * n for k in names),
                    torch.tensor(float(n), device=device),
                    qa_right.sum().float(),
                    asked.sum().float(),
                    match_right.sum().float(),
                ]
            )
            sums = row if sums is None else sums + row
        if sums is None:
            raise ValueError(f"data.eval stores {ctx.config.data.eval.text} gave no batch")
        sums = all_reduce_sum(sums).cpu().double()
        samples, qa_right, qa_asked, match_right = (float(v) for v in sums[-4:])
        return {
            "kind": "eval",
            "step": ctx.step,
            "samples": int(samples),
            "loss": float(sums[0]) / samples,
            "losses": {k: float(sums[i + 1]) / samples for i, k in enumerate(names)},
            "qa_accuracy": qa_right / qa_asked if qa_asked else None,
            "qa_questions": int(qa_asked),
            "matched_accuracy": match_right / samples,
        }

    def eval_line(self, record: dict[str, Any]) -> str:
        parts = " ".join(f"{k} {v:.3f}" for k, v in record["losses"].items())
        qa = record["qa_accuracy"]
        return (
            f"eval step {record['step']}: loss {record['loss']:.4f} ({parts}) | QA accuracy "
            f"{'-' if qa is None else f'{qa:.3f}'} | matching accuracy {record['matched_accuracy']:.3f}"
        )

    def finish(self, ctx: TaskContext) -> dict[str, Any]:
        model = ctx.runtime.export(ctx.output_dir, ctx.rank, hf=self.export_hf)
        return {"model": str(model) if model else None}

    def summary(self, ctx: TaskContext, run: dict[str, Any]) -> dict[str, Any]:
        return {
            "first": run["first"],
            "last": run["last"],
            "eval": ctx.evals[-1] if ctx.evals else None,
            "model": run.get("model"),
        }
