"""Fine-tuning (VQA, GQA, NLVR2) from a pre-trained LXMERT: train, evaluate every epoch, keep the best model,
write the submission file.

    lxmert-finetune --config configs/vqa.yaml [section.key=value ...] [--answer-table PATH]
                    [--from-scratch] [--evaluate-only]

Alone it runs one process; under a launcher every rank runs it (`deepspeed --num_gpus 8 --module engine.finetune
--config configs/vqa.yaml train.zero_stage=2`). Training runs on engine/runtime.py, as pre-training does
(DeepSpeed or plain PyTorch, precision, ZeRO, activation checkpointing, compile):
- data: the task stores of engine/data/tasks.py (data.train.text / data.train.features, data.eval.*), batches
  from task_batch + to_torch; each epoch a permutation seeded by (data.seed, epoch) (deterministic, the same
  on every run), the last partial batch dropped (the authors' drop_last); evaluation in store order.
- model: LxmertForQuestionAnswering(config.model, num_answers = the task store's answers) for VQA/GQA,
  LxmertForNLVR2 for NLVR2. model.num_qa_labels is only the *pre-training* QA head's size. The architecture
  (ARCHITECTURE's fields) comes from the config beside train.init_from (model_config.json, or transformers'
  config.json); a recipe or override that sets one of them to another value is an error naming both.
- init: train.init_from, a pre-training checkpoint in any layout lxmert.convert reads (our model.safetensors
  export, a directory holding one, transformers', the authors' model_LXRT.pth). The backbone is loaded whole
  (strict: a size mismatch is an error naming the keys); VQA/GQA heads start from the pre-trained QA head's
  rows matched by answer string (lxmert.answers.init_answer_head; unmatched rows zero). The pre-training
  answer table (the QA head's row order) is looked up, first found wins:
    1. --answer-table PATH (a JSON list of answers, the authors' all_ans.json, or a text-store directory);
    2. answers.json beside the checkpoint (in its directory);
    3. the pre-training run's config.yaml beside the checkpoint (engine.train writes it into output_dir,
       where the export lives): its data.train.text store's answers.json.
  A checkpoint with a QA head but no table found is an error (silently dropping the head would be worse); a
  checkpoint without a QA head starts the VQA/GQA head from scratch, with a warning.
- optimisation: engine.optim.make_optimizer / make_scheduler (bertadam or adamw, warm-up, linear decay), the
  schedule over train.total_steps(steps per epoch) (train.max_steps caps it), clipping optim.grad_clip,
  precision fp32 / bf16 / fp16 (autocast + GradScaler on the plain path, DeepSpeed's own otherwise).
- logs: <output_dir>/metrics.jsonl (engine.metrics_log): a train record every train.log_every steps and an
  "eval" record after each epoch; the resolved config in <output_dir>/config.yaml.
- outputs: <output_dir>/best/model.safetensors + model_config.json (atomic, engine.checkpoint.export_model)
  for the best eval metric (the last epoch when there is no labelled eval split), and the submission file for
  the eval split predicted by that best model, written when it is found: VQA <output_dir>/vqa_submission.json
  ([{question_id, answer}]), GQA gqa_submission.json ([{questionId, prediction}]), NLVR2 nlvr2_submission.csv
  (identifier,True|False); loss / throughput plots in <output_dir>/plots/.
- ranks: each global batch (micro x accumulation x ranks) is cut into accumulation x ranks micro batches, so
  a run's losses do not depend on how the batch is split; evaluation: each rank predicts an interleaved slice
  (padded to equal length: ZeRO-3's forward is a collective) and the ranks share the predictions.
- checkpoints: <output_dir>/checkpoints/ (engine/checkpoint.py) at the end of every epoch (after its
  evaluation) and every train.save_every steps; train.resume="auto" continues a killed run where it stopped
  (epoch order, dropout RNG, optimizer, best model so far). A checkpoint there takes precedence over init_from.
- --evaluate-only: predicts data.eval with train.init_from (a fine-tuned best/model.safetensors) or, without
  it, the latest checkpoint in output_dir; writes <output_dir>/evaluate/{submission, result.json} and leaves
  the training's outputs alone. The training store is not read (the answers are the eval store's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from engine import checkpoint as ckpt
from engine.atomic import write_text_atomic
from engine.config import ConfigError, RunConfig, format_config, given_keys, load_config, resolve, save_config
from engine.convert_checkpoint import ConvertError, find_config, read_model_config, weights_file
from engine.data.store import RegionStore, StoreError
from engine.data.tasks import TaskStore, task_batch, to_torch
from engine.evaluate import Accumulator
from engine.launch import Launch, all_reduce_sum, choose_deepspeed, pick_device, set_threads
from engine.metrics_log import MetricsLog, console_line, peak_memory_gib
from engine.runtime import Runtime
from engine.train import open_store, write_run_plots
from lxmert.answers import normalize_answer
from lxmert.config import LxmertConfig
from lxmert.convert import read_state_dict, state_dict_problems, to_ours
from lxmert.finetune import LxmertForNLVR2, LxmertForQuestionAnswering

FINETUNE_TASKS = ("vqa", "gqa", "nlvr2")
SUBMISSION_NAMES = {"vqa": "vqa_submission.json", "gqa": "gqa_submission.json", "nlvr2": "nlvr2_submission.csv"}


class FineTuneError(ValueError):
    """A fine-tuning run that cannot start: a missing or mismatched store, a wrong task, a bad checkpoint."""


# ------------------------------------------------------------------------------------------ inputs


def _open_task_store(text: str, features: str, task: str, what: str) -> tuple[TaskStore, RegionStore]:
    try:
        regions = open_store(features, f"data.{what}.features", RegionStore, "engine.data.convert --tsv")
        store = open_store(text, f"data.{what}.text", TaskStore, f"engine.data.convert --task {task}")
    except ConfigError as error:
        raise FineTuneError(str(error)) from None
    if store.task != task:
        raise FineTuneError(f"data.{what}.text {text} is a {store.task!r} store but train.task is {task!r}")
    try:
        store.check_features(regions)
    except StoreError as error:
        raise FineTuneError(f"data.{what}: {error}") from error
    return store, regions


def _checkpoint_file(path: str) -> Path:
    """The weights file train.init_from names (a file, or a model directory holding one)."""
    try:
        return weights_file(Path(path))
    except ConvertError as error:
        raise FineTuneError(f"train.init_from {error}") from None


# The fields that fix a checkpoint's shapes and arithmetic: fine-tuning takes them from the checkpoint's config.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size", "hidden_act",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "l_layers", "r_layers", "x_layers",
                "visual_feat_dim", "visual_pos_dim", "num_qa_labels", "num_object_labels", "num_attr_labels")  # fmt: skip


def checkpoint_config(file: Path) -> tuple[Path, LxmertConfig] | None:
    """The model config written beside a checkpoint (ours: model_config.json; transformers': config.json)."""
    path = find_config(file, None)
    if path is None:
        return None
    try:
        return path, read_model_config(path)
    except ConvertError as error:
        raise FineTuneError(str(error)) from None


def adopt_architecture(config: RunConfig, checkpoint: Path) -> list[str]:
    """Set config.model's ARCHITECTURE fields to those of the checkpoint's own config (in place); a field that
    the recipe or an override set to another value is an error naming both. Returns the fields changed."""
    found = checkpoint_config(checkpoint)
    if found is None:
        return []
    path, theirs = found
    given = given_keys(config)
    adopted, conflicts = [], []
    for name in ARCHITECTURE:
        ours, value = getattr(config.model, name), getattr(theirs, name)
        if ours == value:
            continue
        if f"model.{name}" in given:
            conflicts.append(f"model.{name} is {ours!r} but the checkpoint's {path} says {value!r}")
        else:
            setattr(config.model, name, value)
            adopted.append(name)
    if conflicts:
        raise FineTuneError("; ".join(conflicts) + " (the architecture comes from train.init_from: drop the override)")
    return adopted


def read_answer_table(path: str | Path) -> list[str]:
    """The pre-training QA head's answers in row order, normalised: a JSON list of strings (a text store's
    answers.json), the authors' all_ans.json ([{"ans": ..., "dsets": ...}]), or a directory holding answers.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "answers.json"
    if not p.is_file():
        raise FineTuneError(f"answer table {p} does not exist")
    with open(p, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list):
        raise FineTuneError(f"answer table {p}: expected a JSON list")
    return [normalize_answer(a["ans"] if isinstance(a, dict) else str(a)) for a in raw]


def find_answer_table(checkpoint: Path, explicit: str | None) -> Path | None:
    """Where the pre-training answer table is (see the module docstring for the order), or None."""
    if explicit:
        return Path(explicit)
    beside = checkpoint.parent / "answers.json"
    if beside.is_file():
        return beside
    run_config = checkpoint.parent / "config.yaml"
    if run_config.is_file():
        with open(run_config, encoding="utf-8") as f:
            text = ((yaml.safe_load(f) or {}).get("data", {}).get("train", {}) or {}).get("text", "")
        if text and (Path(text) / "answers.json").is_file():
            return Path(text) / "answers.json"
    return None


# ------------------------------------------------------------------------------------------- the run


class FineTuner:
    """Builds data, model and runtime from a RunConfig (train.task vqa | gqa | nlvr2); `train()` runs it,
    `evaluate_only()` predicts the eval split with the weights as loaded."""

    def __init__(self, config: RunConfig, answer_table: str | None = None, use_deepspeed: bool | None = None,
                 evaluate_only: bool = False) -> None:  # fmt: skip
        task = config.train.task
        if task not in FINETUNE_TASKS:
            raise FineTuneError(f"train.task must be one of {FINETUNE_TASKS} for fine-tuning, got {task!r} "
                                "(lxmert-pretrain pre-trains)")  # fmt: skip
        self.launch = Launch.from_env()
        self.rank, self.local_rank, world = self.launch.rank, self.launch.local_rank, self.launch.world_size
        self.use_deepspeed = choose_deepspeed(config.train.zero_stage, use_deepspeed, self.launch)
        self.world_size = world
        self.config = resolve(config, world)
        self.task = task
        t, d = self.config.train, self.config.data
        self.output_dir = Path(t.output_dir)
        checkpoint = _checkpoint_file(t.init_from) if t.init_from else None  # even where a checkpoint resumes
        self.adopted = adopt_architecture(self.config, checkpoint) if checkpoint is not None else []
        self.device = pick_device(self.local_rank)
        self.threads = set_threads(t.threads, self.launch)
        self.eval_store = self.eval_regions = None
        if d.eval.text or evaluate_only:
            self.eval_store, self.eval_regions = _open_task_store(d.eval.text, d.eval.features, task, "eval")
        self.train_store = self.train_regions = None
        if not evaluate_only:  # predicting needs only the split predicted
            self.train_store, self.train_regions = _open_task_store(d.train.text, d.train.features, task, "train")
        first = self.train_store or self.eval_store
        if self.train_store is not None and self.eval_store is not None and task != "nlvr2" and (
                self.eval_store.answers != self.train_store.answers):  # fmt: skip
            raise FineTuneError(f"data.eval.text {d.eval.text} has another answer list than data.train.text")
        self.answers = first.answers
        if task != "nlvr2" and not self.answers:
            raise FineTuneError(f"data.{'eval' if evaluate_only else 'train'}.text {first.path} has no answers")
        for split, regions in (("train", self.train_regions), ("eval", self.eval_regions)):
            if regions is not None and regions.feat_dim != self.config.model.visual_feat_dim:
                raise FineTuneError(f"data.{split}.features {regions.path} holds {regions.feat_dim}-d features but "
                                    f"model.visual_feat_dim is {self.config.model.visual_feat_dim}")  # fmt: skip

        torch.manual_seed(t.seed)
        if task == "nlvr2":
            self.model: torch.nn.Module = LxmertForNLVR2(self.config.model)
        else:
            self.model = LxmertForQuestionAnswering(self.config.model, num_answers=len(self.answers))
        self.init_report: dict[str, Any] = {}
        try:
            resume = None if evaluate_only and t.init_from else ckpt.resolve_resume(t.resume, self.output_dir)
        except FileNotFoundError as error:
            raise FineTuneError(str(error)) from None
        if checkpoint is not None and resume is None:
            self.init_report = self._init_from(checkpoint, answer_table)
        elif evaluate_only and resume is None:
            raise FineTuneError(f"evaluate-only needs weights: train.init_from (a fine-tuned model.safetensors) or "
                                f"a checkpoint in {self.output_dir / 'checkpoints'}")  # fmt: skip
        self.model.to(self.device)

        self.micro = t.micro_batch_size
        self.accum = t.grad_accum_steps
        self.global_batch = self.micro * self.accum * world
        self.steps_per_epoch = len(self.train_store) // self.global_batch if self.train_store is not None else 1
        if self.steps_per_epoch < 1:
            raise FineTuneError(f"data.train.text has {len(self.train_store)} examples, fewer than one batch of "
                                f"{t.batch_size}")  # fmt: skip
        self.total_steps = t.total_steps(self.steps_per_epoch)
        self.runtime = Runtime(self.model, self.config, self.total_steps, self.device, self.use_deepspeed, self.launch)
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None  # {"score", "epoch", "step", "model", "submission"}
        self.last_checkpoint: Path | None = None
        self._eval_labels = self._labels(self.eval_store) if self.eval_store is not None else None
        if resume is not None:
            self._resume(resume, weights_only=evaluate_only)
        if self.rank == 0 and not evaluate_only:
            save_config(self.config, self.output_dir / "config.yaml")

    @property
    def engine(self):
        return self.runtime.engine

    # ------------------------------------------------------------------------------------ initialisation

    def _init_from(self, file: Path, answer_table: str | None) -> dict[str, Any]:
        try:
            state = to_ours(read_state_dict(file))
        except (ValueError, KeyError) as error:
            raise FineTuneError(f"train.init_from {file}: {error}") from error
        expected = self.model.state_dict()
        if set(state) == set(expected):  # a fine-tuned model of this task (a best/model.safetensors export)
            problems = state_dict_problems(expected, state)
            if problems:
                raise FineTuneError(f"train.init_from {file} does not fit this {self.task} model: "
                                    + "; ".join(problems))  # fmt: skip
            self.model.load_state_dict(state)
            return {"checkpoint": str(file), "fine_tuned": True, "tensors": len(state)}
        backbone = {k[len("lxmert."):]: v for k, v in state.items() if k.startswith("lxmert.")}
        if not backbone:
            raise FineTuneError(f"train.init_from {file} holds no LXMERT backbone (lxmert.* weights)")
        problems = state_dict_problems(self.model.lxmert.state_dict(), backbone)
        if problems:
            raise FineTuneError(f"train.init_from {file} does not fit model.* (no model_config.json or config.json "
                                f"beside it tells its sizes): " + "; ".join(problems))  # fmt: skip
        self.model.lxmert.load_state_dict(backbone)
        report: dict[str, Any] = {"checkpoint": str(file), "backbone_tensors": len(backbone)}
        if self.task == "nlvr2":
            return report  # the NLVR2 head (2H -> 2) has no pre-trained counterpart
        if "answer_head.fc2.weight" not in state:
            warnings.warn(f"{file} has no pre-trained QA head: the {self.task} head starts from scratch")
            return report
        table_path = find_answer_table(file, answer_table)
        if table_path is None:
            raise FineTuneError(
                f"train.init_from {file} has a QA head but its answer table was not found: pass --answer-table "
                "(a text store, its answers.json or the authors' all_ans.json), or put answers.json beside it"
            )
        table = read_answer_table(table_path)
        assert isinstance(self.model, LxmertForQuestionAnswering)
        try:
            found, missing = self.model.init_from_pretraining(state, table, self.answers)
        except (ValueError, KeyError, RuntimeError) as error:
            raise FineTuneError(f"train.init_from {file} with answer table {table_path}: {error}") from error
        report |= {"answer_table": str(table_path), "answers_found": found, "answers_missing": missing}
        return report

    def _resume(self, path: Path, weights_only: bool = False) -> None:
        state = self.runtime.load(path, self.rank, weights_only=weights_only)
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        self.evals = list(state.get("evals", []))
        self.best = state.get("best")
        self.last_checkpoint = path
        self.init_report = {"resumed_from": str(path), "step": self.step}
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def save(self) -> Path:
        client = {"step": self.step, "skipped_steps": self.skipped_steps, "evals": self.evals, "best": self.best,
                  "task": self.task}  # fmt: skip
        self.last_checkpoint = self.runtime.save(self.output_dir, self.step, client, self.rank)
        return self.last_checkpoint

    # ---------------------------------------------------------------------------------------------- data

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example order of an epoch: a permutation from (data.seed, epoch), whole global batches only."""
        rng = np.random.default_rng([self.config.data.seed, epoch])
        order = rng.permutation(len(self.train_store))
        return order[: self.steps_per_epoch * self.global_batch]

    def _micro_batch(self, order: np.ndarray, step_in_epoch: int, micro_step: int) -> dict[str, torch.Tensor]:
        """This rank's share of one micro step: the global batch is cut into accumulation x ranks chunks."""
        chunk = micro_step * self.world_size + self.rank
        start = step_in_epoch * self.global_batch + chunk * self.micro
        return self._to_device(task_batch(self.train_store, self.train_regions, order[start : start + self.micro]))

    def _to_device(self, batch: dict) -> dict[str, torch.Tensor]:
        tensors = to_torch(batch, self.device)
        dtype = self.runtime.input_dtype
        if dtype != torch.float32:  # DeepSpeed cast the model to the training precision
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        return tensors

    def _labels(self, store: TaskStore) -> dict[Any, Any] | None:
        labels: dict[Any, Any] = {}
        ids = store.question_ids
        for i in range(len(store)):
            label = store.labels_of(i)
            if label is None:
                return None  # an unlabelled (test) split
            key = int(ids[i]) if self.task == "vqa" else ids[i]
            labels[key] = label if self.task == "nlvr2" else {self.answers[k]: s for k, s in label.items()}
        return labels

    # ---------------------------------------------------------------------------------------------- loop

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.runtime.forward(**batch)
        self.runtime.backward(out.loss)
        return out.loss.detach().float()

    def _optimizer_step(self) -> tuple[float, bool]:
        return self.runtime.step()

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, Accumulator]:
        """Predictions on the eval split and the task metric (None for an unlabelled split). Ranks predict
        interleaved slices padded to equal length (ZeRO-3's forward is a collective), then share them."""
        assert self.eval_store is not None and self.eval_regions is not None
        store, n = self.eval_store, len(self.eval_store)
        ids = store.question_ids
        per_rank = -(-n // self.world_size)
        mine = (self.rank + self.world_size * np.arange(per_rank)) % n  # a repeated id keeps one prediction
        acc = Accumulator(self.task, label2ans=None if self.task == "nlvr2" else self.answers,
                          labels=self._eval_labels)  # fmt: skip
        was_training = self.runtime.training
        self.runtime.train(False)
        for start in range(0, len(mine), self.micro):
            idx = mine[start : start + self.micro]
            batch = self._to_device(task_batch(store, self.eval_regions, idx))
            batch.pop("labels", None)
            out = self.runtime.forward(**batch)
            scores = out.logits if self.task == "nlvr2" else out.question_answering_score
            acc.add([int(ids[i]) if self.task == "vqa" else ids[i] for i in idx], scores.float().cpu())
        self.runtime.train(was_training)
        if self.world_size > 1:
            import torch.distributed as dist

            shares: list[Any] = [None] * self.world_size
            dist.all_gather_object(shares, acc.predictions)
            for share in shares:
                acc.predictions.update(share)
        return (acc.result() if self._eval_labels is not None else None), acc

    def _export(self, directory: Path) -> Path | None:
        """The model's weights (gathered under ZeRO-3: every rank calls this) into directory; rank 0 writes."""
        state = self.runtime.consolidated_state_dict()
        return ckpt.export_model(state, self.config.model, directory) if self.rank == 0 else None

    def _keep_if_best(self, metric: float | None, epoch: int, acc: Accumulator) -> None:
        """A new best (or, unlabelled, the latest) model: its weights and its predictions' submission file."""
        score = metric if metric is not None else -math.inf
        if self.best is not None and score <= self.best["score"] and metric is not None:
            return
        model = self._export(self.output_dir / "best")
        submission = self.output_dir / SUBMISSION_NAMES[self.task]
        if self.rank == 0:
            acc.write_submission(submission)
        self.best = {"score": score, "epoch": epoch, "step": self.step, "model": str(model or ""),
                     "submission": str(submission)}  # fmt: skip

    def evaluate_only(self) -> dict[str, Any]:
        """Predict the eval split with the loaded weights: <output_dir>/evaluate/{submission, result.json}."""
        start = time.perf_counter()
        metric, acc = self.evaluate()
        out = self.output_dir / "evaluate"
        submission = out / SUBMISSION_NAMES[self.task]
        result = {"task": self.task, "metric": self.metric_name, "value": metric, "examples": len(acc.predictions),
                  "eval_text": self.config.data.eval.text, "weights": self.init_report,
                  "submission": str(submission), "seconds": time.perf_counter() - start}  # fmt: skip
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            acc.write_submission(submission)
            write_text_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
        return result

    def train(self) -> dict[str, Any]:
        t = self.config.train
        log = MetricsLog(self.output_dir, enabled=self.rank == 0, progress_total=self.total_steps,
                         progress_initial=self.step)  # fmt: skip
        if self.last_checkpoint is not None and self.step < self.total_steps:
            log.write({"kind": "resume", "step": self.step, "checkpoint": str(self.last_checkpoint)})
        if self.last_checkpoint is None:
            torch.manual_seed(t.seed + 1)  # dropout: the same draws whatever ran between building and training
        self.runtime.train(True)
        save_every = t.save_every or self.steps_per_epoch
        first = last = None
        run_start = time.perf_counter()
        train_seconds = 0.0
        samples_total = 0
        window_start, window_samples, window_steps = time.perf_counter(), 0, 0
        started_at = self.step
        epoch = self.step // self.steps_per_epoch
        try:
            while self.step < self.total_steps and epoch < t.epochs:
                epoch_start = time.perf_counter()
                order = self.epoch_order(epoch)
                for position in range(self.step - epoch * self.steps_per_epoch, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    loss = torch.zeros((), device=self.device)
                    for micro_step in range(self.accum):
                        batch = self._micro_batch(order, position, micro_step)
                        loss += self._forward_backward(batch) / self.accum
                    norm, skipped = self._optimizer_step()
                    if self.world_size > 1:
                        loss = all_reduce_sum(loss) / self.world_size
                    window_samples += self.global_batch
                    window_steps += 1
                    self.step += 1
                    self.skipped_steps += int(skipped)
                    value = float(loss)
                    first = value if first is None else first
                    last = value
                    if skipped:
                        log.console(f"step {self.step}: non-finite gradient (norm {norm}): step skipped, not applied")
                    if self.step % t.log_every == 0 or self.step == self.total_steps or skipped:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        record = {
                            "kind": "train", "step": self.step, "total_steps": self.total_steps,
                            "epoch": epoch + (position + 1) / self.steps_per_epoch,
                            "loss": value, "lr": self.runtime.lr(), "grad_norm": norm,
                            "loss_scale": self.runtime.loss_scale(), "skipped": skipped,
                            "skipped_steps": self.skipped_steps, "samples_per_s": window_samples / elapsed,
                            "peak_memory_gib": peak_memory_gib(self.device), "threads": self.threads,
                            "step_time_s": elapsed / window_steps,
                            "eta_s": elapsed / window_steps * (self.total_steps - self.step),
                        }  # fmt: skip
                        self.history.append(record)
                        log.write(record)
                        log.console(console_line(record))
                        log.advance(0, samples_per_s=record["samples_per_s"])
                        samples_total += window_samples
                        window_start, window_samples, window_steps = time.perf_counter(), 0, 0
                    log.advance(1)
                    if self.step % save_every == 0 and self.step % self.steps_per_epoch and self.step < self.total_steps:
                        self.save()  # mid-epoch; the end of an epoch saves after its evaluation
                train_seconds += time.perf_counter() - epoch_start
                epoch += 1
                if self.eval_store is not None:
                    tick = time.perf_counter()
                    metric, acc = self.evaluate()
                    record = {"kind": "eval", "step": self.step, "epoch": epoch, "metric": metric,
                              "metric_name": self.metric_name, "examples": len(acc.predictions)}  # fmt: skip
                    self.evals.append(record)
                    log.write(record)
                    shown = "- (unlabelled split)" if metric is None else f"{metric:.4f}"
                    log.console(f"eval epoch {epoch} (step {self.step}/{self.total_steps}): {self.metric_name} {shown} "
                                f"| train loss {last:.4f}")  # fmt: skip
                    self._keep_if_best(metric, epoch, acc)
                    window_start += time.perf_counter() - tick
                if self.step > started_at:
                    self.save()
            samples_total += window_samples
            if self.eval_store is None and (self.best is None or self.step > started_at):
                self.best = {"score": -math.inf, "epoch": epoch, "step": self.step, "submission": None,
                             "model": str(self._export(self.output_dir / "best") or "")}  # fmt: skip
        finally:
            log.close()
        plots = write_run_plots(log.path, self.output_dir / "plots") if self.rank == 0 else []
        seconds = time.perf_counter() - run_start
        best = self.best or {}
        best_score = best.get("score")
        return {
            "task": self.task, "steps": self.step, "steps_this_run": self.step - started_at, "epochs": epoch,
            "first_loss": first, "last_loss": last, "skipped_steps": self.skipped_steps, "eval": self.evals,
            "best_metric": None if best_score is None or best_score == -math.inf else best_score,
            "best_epoch": best.get("epoch"), "metric": self.metric_name,
            "samples_per_s": samples_total / train_seconds if train_seconds > 0 else None, "seconds": seconds,
            "model": best.get("model") or None, "submission": best.get("submission"),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "metrics_log": str(log.path), "plots": [str(p) for p in plots], "init": self.init_report,
        }  # fmt: skip

    @property
    def metric_name(self) -> str:
        return {"vqa": "vqa_score", "gqa": "accuracy", "nlvr2": "accuracy"}[self.task]


def report(summary: dict[str, Any]) -> str:
    epochs = f"{summary['epochs']} epoch{'' if summary['epochs'] == 1 else 's'}"
    lines = [f"fine-tuned {summary['task']}: {summary['steps']} steps, {epochs}, {summary['seconds']:.1f} s"]
    if summary["first_loss"] is not None:
        lines.append(f"  train loss {summary['first_loss']:.4f} (first step) -> {summary['last_loss']:.4f} (last)")
    if summary["samples_per_s"]:
        lines.append(f"  {summary['samples_per_s']:.1f} samples/s (training)")
    for e in summary["eval"]:
        shown = "- (unlabelled split)" if e["metric"] is None else f"{e['metric']:.4f}"
        lines.append(f"  eval epoch {e['epoch']}: {summary['metric']} {shown}")
    if summary["best_metric"] is not None:
        lines.append(f"  best {summary['metric']} {summary['best_metric']:.4f} (epoch {summary['best_epoch']})")
    if summary["init"]:
        lines.append("  init: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["init"].items()))
    lines.append(f"  model {summary['model']}")
    lines.append(f"  submission {summary['submission']}")
    lines.append(f"  log {summary['metrics_log']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lxmert-finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/vqa.yaml, gqa.yaml, nlvr2.yaml)")
    parser.add_argument("--answer-table", help="the pre-training QA head's answer table (see the module doc)")
    parser.add_argument("--from-scratch", action="store_true", help="ignore train.init_from")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="predict data.eval with train.init_from (a fine-tuned model) or the latest checkpoint "
                             "in train.output_dir; writes <output_dir>/evaluate/")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.overrides)
        if args.from_scratch:
            config.train.init_from = ""
        tuner = FineTuner(config, answer_table=args.answer_table, evaluate_only=args.evaluate_only)
    except (ConfigError, FineTuneError) as error:
        print(f"lxmert-finetune: error: {error}", file=sys.stderr)
        return 2
    if tuner.rank == 0:
        print(format_config(tuner.config), flush=True)
        if tuner.adopted:
            print(f"model architecture from {tuner.config.train.init_from}: {', '.join(tuner.adopted)}", flush=True)
    if args.evaluate_only:
        result = tuner.evaluate_only()
        if tuner.rank == 0:
            print(f"{result['task']} {result['metric']} {result['value']} on {result['examples']} examples; "
                  f"submission {result['submission']}", flush=True)  # fmt: skip
        return 0
    summary = tuner.train()
    if tuner.rank == 0:
        print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
