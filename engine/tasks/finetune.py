"""Fine-tuning as a task of the training loop: VQA and GQA (LxmertForQuestionAnswering) and NLVR2
(LxmertForNLVR2) on task stores (engine/data/tasks.py), from a pre-trained LXMERT.

- data: engine.data.loaders.TaskLoader over data.train (data.num_workers workers, pinned on CUDA): each epoch a
  permutation seeded by (data.seed, epoch), whole global batches only (the authors' drop_last), each global
  batch cut into accumulation x ranks micro batches, so a run's losses do not depend on how it is split;
  evaluation over data.eval, each rank an interleaved slice padded to equal length (ZeRO-3's forward is a
  collective), the ranks sharing their predictions.
- model: the architecture (engine.config.ARCHITECTURE's fields) comes from the config beside train.init_from
  (model_config.json, or transformers' config.json); a recipe or override that sets one of them to another value
  is an error naming both. model.num_qa_labels is the *pre-training* QA head's size.
- init: train.init_from, a pre-training checkpoint in any layout lxmert.convert reads (our model.safetensors
  export, a directory holding one, transformers', the authors' model_LXRT.pth). The backbone is loaded whole
  (a size mismatch is an error summarising the keys); VQA/GQA heads start from the pre-trained QA head's rows
  matched by answer string (lxmert.answers.init_answer_head; unmatched rows zero). The pre-training answer table
  (the QA head's row order) is looked up, first found wins:
    1. --answer-table PATH (a JSON list of answers, the authors' all_ans.json, or a text-store directory);
    2. answers.json beside the checkpoint (in its directory);
    3. the pre-training run's config.yaml beside the checkpoint (the pre-training run writes it into its
       output_dir, where the export lives): its data.train.text store's answers.json.
  A checkpoint with a QA head but no table found is an error (silently dropping the head would be worse); a
  checkpoint without a QA head starts the VQA/GQA head from scratch, with a warning. A checkpoint in output_dir
  takes precedence over init_from (resume).
- outputs: <output_dir>/best/ for the best eval metric (the last epoch when there is no labelled eval split):
  model.safetensors + model_config.json, task.json ({"task": "vqa"}) and, for VQA/GQA, answers.json (the
  head's label -> answer list, the store's answers): all that lxmert-predict needs. And the submission file for
  the eval split predicted by that best model, written when it is found: VQA vqa_submission.json
  ([{question_id, answer}]), GQA gqa_submission.json ([{questionId, prediction}]), NLVR2 nlvr2_submission.csv
  (identifier,True|False).
- evaluate-only (--evaluate-only): the eval split predicted with train.init_from (a fine-tuned
  best/model.safetensors) or the latest checkpoint in output_dir, into <output_dir>/evaluate/; the training
  store is not read (the answers are the eval store's).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.atomic import write_text_atomic
from engine.config import ARCHITECTURE, ConfigError, RunConfig, given_keys
from engine.context import TaskContext
from engine.convert_checkpoint import ConvertError, find_config, read_model_config, weights_file
from engine.data.batch import TaskBatch
from engine.data.loaders import EvalOrder, TaskLoader, TrainOrder
from engine.data.store import RegionStore, StoreError
from engine.data.tasks import TaskStore
from engine.evaluate import Accumulator
from engine.flops import step_flops
from engine.tasks.base import Task, open_store
from lxmert.answers import normalize_answer
from lxmert.config import LxmertConfig
from lxmert.convert import read_state_dict, state_dict_problems, to_ours
from lxmert.finetune import LxmertForNLVR2, LxmertForQuestionAnswering

FINETUNE_TASKS = ("vqa", "gqa", "nlvr2")
SUBMISSION_NAMES = {"vqa": "vqa_submission.json", "gqa": "gqa_submission.json", "nlvr2": "nlvr2_submission.csv"}
TASK_FILE, ANSWERS_FILE = "task.json", "answers.json"  # beside a fine-tuned model's weights (best/)
METRIC_NAMES = {"vqa": "vqa_score", "gqa": "accuracy", "nlvr2": "accuracy"}


class FineTuneError(ConfigError):
    """A fine-tuning run that cannot start: a missing or mismatched store, a wrong task, a bad checkpoint."""


# ------------------------------------------------------------------------------------------ inputs


def open_task_store(text: str, features: str, task: str, what: str) -> tuple[TaskStore, RegionStore]:
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


def checkpoint_file(path: str) -> Path:
    """The weights file train.init_from names (a file, or a model directory holding one)."""
    try:
        return weights_file(Path(path))
    except ConvertError as error:
        raise FineTuneError(f"train.init_from {error}") from None


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


def pretraining_answers(path: str | Path) -> list[str]:
    """The pre-training QA head's answers in row order, normalised: a JSON list of strings (a text store's
    answers.json), the authors' all_ans.json ([{"ans": ..., "dsets": ...}]), or a directory holding answers.json.
    (engine.data.formats.read_answer_table reads all_ans.json into the converter's AnswerTable instead.)"""
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


# -------------------------------------------------------------------------------------------- the task


class FinetuneTask(Task):
    def __init__(self, name: str, answer_table: str | None = None, evaluate_only: bool = False) -> None:
        if name not in FINETUNE_TASKS:
            raise FineTuneError(
                f"train.task must be one of {FINETUNE_TASKS} for fine-tuning, got {name!r} (lxmert-pretrain pre-trains)"
            )
        self.name, self.answer_table, self.evaluate_only = name, answer_table, evaluate_only
        self.metric_name = METRIC_NAMES[name]
        self.checkpoint: Path | None = None
        self.adopted: list[str] = []
        self.init_report: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None  # {"score", "epoch", "step", "model", "submission"}
        self.train_store = self.train_regions = self.eval_store = self.eval_regions = None
        self.eval_labels: dict[Any, Any] | None = None

    # ------------------------------------------------------------------------------------------- building

    def resume_setting(self) -> str:
        """Evaluating a given model needs no checkpoint of the run."""
        t = self.config.train
        return "none" if self.evaluate_only and t.init_from else t.resume

    def check(self, ctx: TaskContext) -> None:
        t, d, task = self.config.train, self.config.data, self.name
        if t.init_from:  # a wrong path is an error even where a checkpoint of the run takes precedence
            self.checkpoint = checkpoint_file(t.init_from)
            self.adopted = adopt_architecture(self.config, self.checkpoint)
        if d.eval.text or self.evaluate_only:
            self.eval_store, self.eval_regions = open_task_store(d.eval.text, d.eval.features, task, "eval")
        if not self.evaluate_only:  # predicting needs only the split predicted
            self.train_store, self.train_regions = open_task_store(d.train.text, d.train.features, task, "train")
        first = self.train_store or self.eval_store
        if (
            self.train_store is not None
            and self.eval_store is not None
            and task != "nlvr2"
            and (self.eval_store.answers != self.train_store.answers)
        ):
            raise FineTuneError(f"data.eval.text {d.eval.text} has another answer list than data.train.text")
        self.answers = first.answers
        if task != "nlvr2" and not self.answers:
            raise FineTuneError(f"data.{'eval' if self.evaluate_only else 'train'}.text {first.path} has no answers")
        for split, regions in (("train", self.train_regions), ("eval", self.eval_regions)):
            if regions is not None and regions.feat_dim != self.config.model.visual_feat_dim:
                raise FineTuneError(
                    f"data.{split}.features {regions.path} holds {regions.feat_dim}-d features but "
                    f"model.visual_feat_dim is {self.config.model.visual_feat_dim}"
                )
        if self.eval_store is not None:
            self.eval_labels = self._labels(self.eval_store)

    def build_model(self, ctx: TaskContext) -> torch.nn.Module:
        if self.name == "nlvr2":
            model: torch.nn.Module = LxmertForNLVR2(self.config.model)
        else:
            model = LxmertForQuestionAnswering(self.config.model, num_answers=len(self.answers))
        if self.checkpoint is not None and ctx.resume_from is None:
            self.init_report = self._init_from(model, self.checkpoint)
        elif self.evaluate_only and ctx.resume_from is None:
            raise FineTuneError(
                f"evaluate-only needs weights: train.init_from (a fine-tuned model.safetensors) or "
                f"a checkpoint in {ctx.output_dir / 'checkpoints'}"
            )
        return model.to(ctx.device)

    def _init_from(self, model: torch.nn.Module, file: Path) -> dict[str, Any]:
        try:
            state = to_ours(read_state_dict(file))
        except (ValueError, KeyError) as error:
            raise FineTuneError(f"train.init_from {file}: {error}") from error
        expected = model.state_dict()
        if set(state) == set(expected):  # a fine-tuned model of this task (a best/model.safetensors export)
            problems = state_dict_problems(expected, state)
            if problems:
                raise FineTuneError(
                    f"train.init_from {file} does not fit this {self.name} model: " + "; ".join(problems)
                )
            model.load_state_dict(state)
            return {"checkpoint": str(file), "fine_tuned": True, "tensors": len(state)}
        backbone = {k[len("lxmert.") :]: v for k, v in state.items() if k.startswith("lxmert.")}
        if not backbone:
            raise FineTuneError(f"train.init_from {file} holds no LXMERT backbone (lxmert.* weights)")
        problems = state_dict_problems(model.lxmert.state_dict(), backbone)
        if problems:
            raise FineTuneError(
                f"train.init_from {file} does not fit model.* (no model_config.json or config.json "
                f"beside it tells its sizes): " + "; ".join(problems)
            )
        model.lxmert.load_state_dict(backbone)
        report: dict[str, Any] = {"checkpoint": str(file), "backbone_tensors": len(backbone)}
        if self.name == "nlvr2":
            return report  # the NLVR2 head (2H -> 2) has no pre-trained counterpart
        if "answer_head.fc2.weight" not in state:
            warnings.warn(f"{file} has no pre-trained QA head: the {self.name} head starts from scratch", stacklevel=2)
            return report
        table_path = find_answer_table(file, self.answer_table)
        if table_path is None:
            raise FineTuneError(
                f"train.init_from {file} has a QA head but its answer table was not found: pass --answer-table "
                "(a text store, its answers.json or the authors' all_ans.json), or put answers.json beside it"
            )
        table = pretraining_answers(table_path)
        assert isinstance(model, LxmertForQuestionAnswering)
        try:
            found, missing = model.init_from_pretraining(state, table, self.answers)
        except (ValueError, KeyError, RuntimeError) as error:
            raise FineTuneError(f"train.init_from {file} with answer table {table_path}: {error}") from error
        report |= {"answer_table": str(table_path), "answers_found": found, "answers_missing": missing}
        return report

    def train_loader(self, ctx: TaskContext) -> TaskLoader | None:
        if self.evaluate_only:
            return None
        t = self.config.train
        order = TrainOrder(
            len(self.train_store),
            self.config.data.seed,
            t.micro_batch_size,
            t.grad_accum_steps,
            ctx.world_size,
            ctx.rank,
        )
        if order.steps_per_epoch < 1:
            raise FineTuneError(
                f"data.train.text has {len(self.train_store)} examples, fewer than one batch of {t.batch_size}"
            )
        return TaskLoader(
            self.train_store,
            self.train_regions,
            order,
            ctx.device,
            num_workers=self.config.data.num_workers,
            unpadding=self._unpadding,
        )

    def eval_loader(self, ctx: TaskContext) -> TaskLoader | None:
        if self.eval_store is None:
            return None
        order = EvalOrder(len(self.eval_store), self.config.train.micro_batch_size, ctx.world_size, ctx.rank)
        return TaskLoader(
            self.eval_store,
            self.eval_regions,
            order,
            ctx.device,
            labels=False,
            num_workers=self.config.data.num_workers,
            unpadding=self._unpadding,
        )

    @property
    def _unpadding(self) -> bool:
        """attn_backend "flash": the loaders find the masks' unpadding on the host (engine/data/batch.py)."""
        return self.config.model.attn_backend == "flash"

    def _labels(self, store: TaskStore) -> dict[Any, Any] | None:
        labels: dict[Any, Any] = {}
        ids = store.question_ids
        for i in range(len(store)):
            label = store.labels_of(i)
            if label is None:
                return None  # an unlabelled (test) split
            key = int(ids[i]) if self.name == "vqa" else ids[i]
            labels[key] = label if self.name == "nlvr2" else {self.answers[k]: s for k, s in label.items()}
        return labels

    # ---------------------------------------------------------------------------------------------- steps

    def start(self, ctx: TaskContext, resumed: bool) -> None:
        if not resumed:
            torch.manual_seed(self.config.train.seed + 1)  # dropout: the same draws whatever ran since the build

    def flops(self, batch: TaskBatch) -> int:
        b, length = batch.input_ids.shape
        regions = batch.visual_feats.shape[-2]
        return step_flops(self.config.model, self.name, b, length, regions, num_answers=len(self.answers)).total

    def tokens(self, batch: TaskBatch) -> int:
        b, length = batch.input_ids.shape
        images = 2 if self.name == "nlvr2" else 1  # NLVR2 reads each statement with each of its two images
        return images * b * (length + batch.visual_feats.shape[-2])

    # ----------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def predict(self, ctx: TaskContext) -> tuple[float | None, Accumulator]:
        """Predictions on the eval split and the task metric (None for an unlabelled split)."""
        assert self.eval_store is not None and ctx.eval_loader is not None
        ids = self.eval_store.question_ids
        acc = Accumulator(self.name, label2ans=None if self.name == "nlvr2" else self.answers, labels=self.eval_labels)
        ctx.eval_loader.set_epoch(0)
        for batch in ctx.eval_loader:
            out = ctx.runtime.forward(**ctx.inputs(batch).model_inputs())
            scores = out.logits if self.name == "nlvr2" else out.question_answering_score
            acc.add([int(ids[i]) if self.name == "vqa" else ids[i] for i in batch.indices], scores.float().cpu())
        if ctx.world_size > 1:
            import torch.distributed as dist

            shares: list[Any] = [None] * ctx.world_size
            dist.all_gather_object(shares, acc.predictions)
            for share in shares:
                acc.predictions.update(share)
        return (acc.result() if self.eval_labels is not None else None), acc

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        metric, self._acc = self.predict(ctx)
        epoch = -(-ctx.step // ctx.steps_per_epoch)
        return {
            "kind": "eval",
            "step": ctx.step,
            "epoch": epoch,
            "metric": metric,
            "metric_name": self.metric_name,
            "examples": len(self._acc.predictions),
        }

    def eval_line(self, record: dict[str, Any]) -> str:
        shown = "- (unlabelled split)" if record["metric"] is None else f"{record['metric']:.4f}"
        return f"eval epoch {record['epoch']} (step {record['step']}): {self.metric_name} {shown}"

    def after_evaluation(self, ctx: TaskContext, record: dict[str, Any]) -> None:
        """A new best (or, unlabelled, the latest) model: its weights and its predictions' submission file."""
        metric = record["metric"]
        score = metric if metric is not None else -math.inf
        if self.best is not None and score <= self.best["score"] and metric is not None:
            return
        model = self.export_best(ctx)
        submission = ctx.output_dir / SUBMISSION_NAMES[self.name]
        if ctx.rank == 0:
            self._acc.write_submission(submission)
        self.best = {
            "score": score,
            "epoch": record["epoch"],
            "step": ctx.step,
            "model": str(model or ""),
            "submission": str(submission),
        }

    def export_best(self, ctx: TaskContext) -> Path | None:
        """<output_dir>/best/: the weights and model_config.json (every rank calls it), then task.json and the
        VQA/GQA answers.json, so that the directory alone says what the head's outputs mean."""
        directory = ctx.output_dir / "best"
        model = ctx.runtime.export(directory, ctx.rank)
        if ctx.rank == 0:
            if self.name != "nlvr2":
                write_text_atomic(directory / ANSWERS_FILE, json.dumps(self.answers) + "\n")
            write_text_atomic(directory / TASK_FILE, json.dumps({"task": self.name}) + "\n")
        return model

    def evaluate_only_run(self, ctx: TaskContext) -> dict[str, Any]:
        """Predict the eval split with the loaded weights: <output_dir>/evaluate/{submission, result.json}."""
        start = time.perf_counter()
        was_training = ctx.runtime.training
        ctx.runtime.train(False)
        metric, acc = self.predict(ctx)
        ctx.runtime.train(was_training)
        out = ctx.output_dir / "evaluate"
        submission = out / SUBMISSION_NAMES[self.name]
        result = {
            "task": self.name,
            "metric": self.metric_name,
            "value": metric,
            "examples": len(acc.predictions),
            "eval_text": self.config.data.eval.text,
            "weights": self.init_report,
            "submission": str(submission),
            "seconds": time.perf_counter() - start,
        }
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            acc.write_submission(submission)
            write_text_atomic(out / "result.json", json.dumps(result, indent=2) + "\n")
        return result

    # -------------------------------------------------------------------------------------------- the end

    def finish(self, ctx: TaskContext) -> dict[str, Any]:
        """Without a labelled eval split the best model is the last one."""
        if self.eval_store is None and (self.best is None or ctx.step > ctx.started_at):
            epoch = -(-ctx.step // ctx.steps_per_epoch)
            model = self.export_best(ctx)
            self.best = {
                "score": -math.inf,
                "epoch": epoch,
                "step": ctx.step,
                "submission": None,
                "model": str(model or ""),
            }
        return {}

    def summary(self, ctx: TaskContext, run: dict[str, Any]) -> dict[str, Any]:
        best = self.best or {}
        score = best.get("score")
        first, last = run["first"], run["last"]
        return {
            "task": self.name,
            "epochs": -(-ctx.step // ctx.steps_per_epoch),
            "first_loss": first["loss"] if first else None,
            "last_loss": last["loss"] if last else None,
            "eval": list(ctx.evals),
            "best_metric": None if score is None or score == -math.inf else score,
            "best_epoch": best.get("epoch"),
            "metric": self.metric_name,
            "model": best.get("model") or None,
            "submission": best.get("submission"),
            "init": self.init_report,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "task": self.name}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        self.best = state.get("best")
        self.init_report = {"resumed_from": str(path), "step": int(state["step"])}
