"""Fine-tuning (VQA, GQA, NLVR2) from a pre-trained LXMERT: train, evaluate every epoch, keep the best model,
write the submission file.

    python -m engine.finetune --config configs/vqa.yaml [section.key=value ...] [--answer-table PATH]
                              [--from-scratch]

What it does (single process, plain PyTorch; the pieces are the pre-training Trainer's, imported):
- data: the task stores of engine/data/tasks.py (data.train.text / data.train.features, data.eval.*), batches
  from task_batch + to_torch; each epoch a permutation seeded by (data.seed, epoch) (deterministic, the same
  on every run), the last partial batch dropped (the authors' drop_last); evaluation in store order.
- model: LxmertForQuestionAnswering(config.model, num_answers = the task store's answers) for VQA/GQA,
  LxmertForNLVR2 for NLVR2. model.num_qa_labels is only the *pre-training* QA head's size.
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
  precision fp32 / bf16 / fp16 by autocast (+ GradScaler for fp16) like the Trainer's plain path.
- logs: <output_dir>/metrics.jsonl (engine.metrics_log): a train record every train.log_every steps and an
  "eval" record after each epoch; the resolved config in <output_dir>/config.yaml.
- outputs: <output_dir>/best/model.safetensors + model_config.json (atomic, engine.checkpoint.export_model)
  for the best eval metric (the last epoch when there is no labelled eval split), and the submission file for
  the eval split predicted by that best model: VQA <output_dir>/vqa_submission.json ([{question_id, answer}]),
  GQA gqa_submission.json ([{questionId, prediction}]), NLVR2 nlvr2_submission.csv (identifier,True|False).

DeepSpeed: not in this cut. `FineTuner` keeps the Trainer's split (build / _forward_backward / _optimizer_step)
so a DeepSpeed path can be added the way engine/train.py does it (deepspeed.initialize with our optimizer and
LambdaLR, engine.backward/step); resume is not implemented (fine-tuning runs are short).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from engine import checkpoint as ckpt
from engine.config import ConfigError, RunConfig, load_config, resolve, save_config
from engine.data.store import RegionStore, StoreError
from engine.data.tasks import TaskStore, task_batch, to_torch
from engine.evaluate import Accumulator
from engine.metrics_log import MetricsLog, peak_memory_gib
from engine.optim import make_optimizer, make_scheduler
from engine.train import _precision_dtype, optimizer_step
from lxmert.answers import normalize_answer
from lxmert.convert import read_state_dict, to_ours
from lxmert.finetune import LxmertForNLVR2, LxmertForQuestionAnswering

FINETUNE_TASKS = ("vqa", "gqa", "nlvr2")
SUBMISSION_NAMES = {"vqa": "vqa_submission.json", "gqa": "gqa_submission.json", "nlvr2": "nlvr2_submission.csv"}


class FineTuneError(ValueError):
    """A fine-tuning run that cannot start: a missing or mismatched store, a wrong task, a bad checkpoint."""


# ------------------------------------------------------------------------------------------ inputs


def _open_task_store(text: str, features: str, task: str, what: str) -> tuple[TaskStore, RegionStore]:
    if not text or not features:
        raise FineTuneError(f"data.{what}.text and data.{what}.features must name a task store and its feature store")
    for path, kind in ((text, "task store"), (features, "feature store")):
        if not Path(path).is_dir():
            raise FineTuneError(f"data.{what}: the {kind} {path} does not exist (build it with engine.data.convert)")
    try:
        store, regions = TaskStore(text), RegionStore(features)
    except (StoreError, OSError, KeyError, ValueError) as error:
        raise FineTuneError(f"data.{what}: cannot open {text} / {features}: {error}") from error
    if store.task != task:
        raise FineTuneError(f"data.{what}.text {text} is a {store.task!r} store but train.task is {task!r}")
    try:
        store.check_features(regions)
    except StoreError as error:
        raise FineTuneError(f"data.{what}: {error}") from error
    return store, regions


def _checkpoint_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model_LXRT.pth"):
            if (p / name).is_file():
                return p / name
        raise FineTuneError(f"train.init_from {p} is a directory without model.safetensors (or pytorch_model.bin)")
    if not p.is_file():
        raise FineTuneError(f"train.init_from {p} does not exist")
    return p


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
    """Builds data, model, optimizer from a RunConfig (train.task vqa | gqa | nlvr2); `train()` runs it."""

    def __init__(self, config: RunConfig, answer_table: str | None = None) -> None:
        task = config.train.task
        if task not in FINETUNE_TASKS:
            raise FineTuneError(f"train.task must be one of {FINETUNE_TASKS} for fine-tuning, got {task!r} "
                                "(pre-training runs with engine.main / engine.pretrain)")  # fmt: skip
        self.config = resolve(config, 1)
        self.task = task
        t, d = self.config.train, self.config.data
        self.output_dir = Path(t.output_dir)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.train_store, self.train_regions = _open_task_store(d.train.text, d.train.features, task, "train")
        self.eval_store = self.eval_regions = None
        if d.eval.text:
            self.eval_store, self.eval_regions = _open_task_store(d.eval.text, d.eval.features, task, "eval")
            if task != "nlvr2" and self.eval_store.answers != self.train_store.answers:
                raise FineTuneError(f"data.eval.text {d.eval.text} has another answer list than data.train.text")
        self.answers = self.train_store.answers
        if task != "nlvr2" and not self.answers:
            raise FineTuneError(f"data.train.text {d.train.text} has no answers")
        if self.train_regions.feat_dim != self.config.model.visual_feat_dim:
            raise FineTuneError(f"the feature store has {self.train_regions.feat_dim}-d features but "
                                f"model.visual_feat_dim is {self.config.model.visual_feat_dim}")  # fmt: skip

        torch.manual_seed(t.seed)
        if task == "nlvr2":
            self.model: torch.nn.Module = LxmertForNLVR2(self.config.model)
        else:
            self.model = LxmertForQuestionAnswering(self.config.model, num_answers=len(self.answers))
        self.init_report: dict[str, Any] = {}
        if t.init_from:
            self.init_report = self._init_from(t.init_from, answer_table)
        self.model.to(self.device)

        self.batch_size = t.micro_batch_size  # single process: the micro batch (x accumulation) is the batch
        self.accum = t.grad_accum_steps
        self.steps_per_epoch = len(self.train_store) // (self.batch_size * self.accum)
        if self.steps_per_epoch < 1:
            raise FineTuneError(f"data.train.text has {len(self.train_store)} examples, fewer than one batch of "
                                f"{t.batch_size}")  # fmt: skip
        self.total_steps = t.total_steps(self.steps_per_epoch)
        self.optimizer = make_optimizer(self.model, self.config.optim)
        self.scheduler = make_scheduler(self.optimizer, self.config.optim, self.total_steps)
        self.autocast_dtype = _precision_dtype(t.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        save_config(self.config, self.output_dir / "config.yaml")

    # ------------------------------------------------------------------------------------ initialisation

    def _init_from(self, path: str, answer_table: str | None) -> dict[str, Any]:
        file = _checkpoint_file(path)
        try:
            state = to_ours(read_state_dict(file))
        except (ValueError, KeyError) as error:
            raise FineTuneError(f"train.init_from {file}: {error}") from error
        backbone = {k[len("lxmert."):]: v for k, v in state.items() if k.startswith("lxmert.")}
        if not backbone:
            raise FineTuneError(f"train.init_from {file} holds no LXMERT backbone (lxmert.* weights)")
        try:
            self.model.lxmert.load_state_dict(backbone)
        except RuntimeError as error:
            raise FineTuneError(f"train.init_from {file} does not fit model.*: {error}") from error
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

    # ---------------------------------------------------------------------------------------------- data

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example order of an epoch: a permutation from (data.seed, epoch), whole batches only."""
        rng = np.random.default_rng([self.config.data.seed, epoch])
        order = rng.permutation(len(self.train_store))
        n = self.steps_per_epoch * self.batch_size * self.accum
        return order[:n]

    def _batches(self, store: TaskStore, regions: RegionStore, order: np.ndarray) -> Iterator[tuple[np.ndarray, dict]]:
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, to_torch(task_batch(store, regions, idx), self.device)

    # ---------------------------------------------------------------------------------------------- loop

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            out = self.model(**batch)
        self.scaler.scale(out.loss.float() / self.accum).backward()
        return out.loss.detach().float()

    def _optimizer_step(self) -> tuple[float, bool]:
        return optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.config.optim.grad_clip)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, Accumulator]:
        """Predictions on the eval split (store order) and the task metric (None for an unlabelled split)."""
        assert self.eval_store is not None and self.eval_regions is not None
        store = self.eval_store
        labels: dict[Any, Any] | None = {}
        ids = store.question_ids
        for i in range(len(store)):
            label = store.labels_of(i)
            if label is None:
                labels = None
                break
            key = int(ids[i]) if self.task == "vqa" else ids[i]
            labels[key] = label if self.task == "nlvr2" else {self.answers[k]: s for k, s in label.items()}
        acc = Accumulator(self.task, label2ans=None if self.task == "nlvr2" else self.answers, labels=labels)
        was_training = self.model.training
        self.model.eval()
        for idx, batch in self._batches(store, self.eval_regions, np.arange(len(store))):
            batch.pop("labels", None)
            with self._autocast():
                out = self.model(**batch)
            scores = out.logits if self.task == "nlvr2" else out.question_answering_score
            keys = [int(ids[i]) if self.task == "vqa" else ids[i] for i in idx]
            acc.add(keys, scores.float().cpu())
        self.model.train(was_training)
        return (acc.result() if labels is not None else None), acc

    def _save_best(self) -> Path:
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                 for k, v in self.model.state_dict().items()}  # fmt: skip
        return ckpt.export_model(state, self.config.model, self.output_dir / "best")

    def train(self) -> dict[str, Any]:
        t = self.config.train
        log = MetricsLog(self.output_dir, progress_total=self.total_steps)
        torch.manual_seed(t.seed + 1)  # dropout: the same draws whatever ran between building and training
        self.model.train()
        best: tuple[float, int] | None = None
        best_acc: Accumulator | None = None
        best_path: Path | None = None
        first = last = None
        run_start = time.perf_counter()
        train_seconds = 0.0
        samples_total = 0
        window_start, window_samples = time.perf_counter(), 0
        epoch = 0
        try:
            while self.step < self.total_steps and epoch < t.epochs:
                epoch_start = time.perf_counter()
                batches = self._batches(self.train_store, self.train_regions, self.epoch_order(epoch))
                for _ in range(self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    loss = torch.zeros((), device=self.device)
                    for _ in range(self.accum):
                        _, batch = next(batches)
                        loss += self._forward_backward(batch) / self.accum
                        window_samples += int(batch["input_ids"].shape[0])
                    norm, skipped = self._optimizer_step()
                    self.step += 1
                    value = float(loss)
                    first = value if first is None else first
                    last = value
                    log.advance(1)
                    if self.step % t.log_every == 0 or self.step == self.total_steps or skipped:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        record = {
                            "kind": "train", "step": self.step, "total_steps": self.total_steps,
                            "epoch": epoch + (self.step - epoch * self.steps_per_epoch) / self.steps_per_epoch,
                            "loss": value, "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": norm,
                            "skipped": skipped, "samples_per_s": window_samples / elapsed,
                            "peak_memory_gib": peak_memory_gib(self.device),
                        }  # fmt: skip
                        self.history.append(record)
                        log.write(record)
                        samples_total += window_samples
                        window_start, window_samples = time.perf_counter(), 0
                train_seconds += time.perf_counter() - epoch_start
                epoch += 1
                if self.eval_store is not None:
                    metric, acc = self.evaluate()
                    record = {"kind": "eval", "step": self.step, "epoch": epoch, "metric": metric,
                              "examples": len(acc.predictions)}  # fmt: skip
                    self.evals.append(record)
                    log.write(record)
                    log.console(f"epoch {epoch}: step {self.step}/{self.total_steps} | train loss {last:.4f} | "
                                f"eval {self.metric_name} {metric if metric is None else round(metric, 4)}")  # fmt: skip
                    score = metric if metric is not None else -math.inf
                    if best is None or score > best[0] or metric is None:
                        best, best_acc = (score, epoch), acc
                        best_path = self._save_best()
            samples_total += window_samples
            if self.eval_store is None:
                best_path = self._save_best()
            submission = None
            if best_acc is not None:
                submission = self.output_dir / SUBMISSION_NAMES[self.task]
                best_acc.write_submission(submission)
        finally:
            log.close()
        seconds = time.perf_counter() - run_start
        return {
            "task": self.task, "steps": self.step, "epochs": epoch, "first_loss": first, "last_loss": last,
            "eval": self.evals, "best_metric": None if best is None or best[0] == -math.inf else best[0],
            "best_epoch": None if best is None else best[1], "metric": self.metric_name,
            "samples_per_s": samples_total / train_seconds if train_seconds > 0 else None, "seconds": seconds,
            "model": str(best_path) if best_path else None, "submission": str(submission) if submission else None,
            "metrics_log": str(self.output_dir / "metrics.jsonl"), "init": self.init_report,
        }  # fmt: skip

    @property
    def metric_name(self) -> str:
        return {"vqa": "vqa_score", "gqa": "accuracy", "nlvr2": "accuracy"}[self.task]


def report(summary: dict[str, Any]) -> str:
    lines = [f"fine-tuned {summary['task']}: {summary['steps']} steps, {summary['epochs']} epochs, "
             f"{summary['seconds']:.1f} s"]  # fmt: skip
    if summary["first_loss"] is not None:
        lines.append(f"  train loss {summary['first_loss']:.4f} (first step) -> {summary['last_loss']:.4f} (last)")
    if summary["samples_per_s"]:
        lines.append(f"  {summary['samples_per_s']:.1f} samples/s (training)")
    for e in summary["eval"]:
        lines.append(f"  eval epoch {e['epoch']}: {summary['metric']} {e['metric']}")
    if summary["best_metric"] is not None:
        lines.append(f"  best {summary['metric']} {summary['best_metric']:.4f} (epoch {summary['best_epoch']})")
    if summary["init"]:
        lines.append(f"  init: {summary['init']}")
    lines.append(f"  model {summary['model']}")
    lines.append(f"  submission {summary['submission']}")
    lines.append(f"  log {summary['metrics_log']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML recipe (configs/vqa.yaml, gqa.yaml, nlvr2.yaml)")
    parser.add_argument("--answer-table", help="the pre-training QA head's answer table (see the module doc)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="ignore train.init_from (an override cannot set it to an empty string)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.from_scratch:
            config.train.init_from = ""
        tuner = FineTuner(config, answer_table=args.answer_table)
    except (ConfigError, FineTuneError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report(tuner.train()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
