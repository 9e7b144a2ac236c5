"""The main job: a small LXMERT pre-trained and fine-tuned on the CPU, end to end, with the project's own parts.

    python -m engine.main [--workdir runs/main] [--steps N] [--seed S] [--fresh]

1. data: engine.data.synthetic writes its learnable world in the authors' public layout (<workdir>/data:
   lxmert/*.json, mscoco_imgfeat/*.tsv, vqa/*.json; with places=True, see there), and engine.data.convert /
   engine.data.tasks turn it into verified stores (<workdir>/stores: the region features, the pre-training
   text of the train and minival splits, the VQA train and minival questions).
2. pre-training: engine.train.Trainer on configs/tiny_cpu.yaml's model (hidden 128, 2/1/1 layers; MODEL's
   initialisation and no dropout) with AdamW and this job's steps, batch, learning rate and seed, all tasks on
   (masked words; masked objects: labels, attributes and features; image-sentence matching; QA), evaluated on
   minival four times, into <workdir>/pretrain.
3. fine-tuning: engine.finetune.FineTuner on the synthetic VQA stores from the pre-training export (the QA
   head's rows matched by answer string; the recipe's BertAdam at lr 1e-4), evaluated every epoch, into
   <workdir>/vqa.
4. the report, its numbers read back from the two metrics.jsonl files (as engine/records.py's records): per loss
   component the mean of the first and of the last logged steps, samples/s, the validations, the VQA score
   against two baselines (the best single answer, and the best answer per question type), the wall time of each
   phase, the paths (checkpoint, models, submission, logs, plots); also written to <workdir>/report.json. The
   runs' console lines are logged (engine/logs.py); the report and the job's last line are printed.

The check: the job fails (exit 1, naming them) when the total or a loss component in REQUIRED did not fall by
MIN_FALL, as that means something is broken; image-sentence matching ("matched") must also end below chance
(ln 2) by MIN_FALL: its first steps sit above chance while the untrained head settles, and falling from there to
chance is not learning. Matching asks LXMERT to compare what a sentence says with what it sees (no text-only or
image-only signal: an XOR of the two), and a small model sits on a plateau at ln 2 before it finds that; three
things end the plateau within a CPU-minutes run, and the job uses them: a world in which every sentence names the
image's place (synthetic, places=True), initializer_range 0.05 with dropout off (MODEL), and AdamW (what was
measured: NOTES.md, "Main job"). --no-require-matched drops matching from the check for runs too short to learn it.

Reruns are cheap and never destroy finished work: data and stores that exist and verify are reused (an
interrupted store build resumes); pre-training and fine-tuning resume from their latest checkpoints, and a
finished run is only reported again. A rerun whose settings differ from those the work dir was made with is
refused, naming the differences: --fresh deletes this job's outputs in the work dir first (only those), or
pick another --workdir. One job at a time per work dir: a second one is refused in one line naming the holder
(<workdir>/run.lock, engine/output_dir.py), exit 2. A run stopped early (SIGTERM, train.preempt_signal,
train.time_limit, ^C, only skipped steps: engine/stopping.py) ends the job with its one line and exit status (75,
130, 3) after its checkpoint; the same command goes on from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.atomic import write_text_atomic
from engine.config import ConfigError, RunConfig, load_config, parse_overrides, updated
from engine.logs import configure_logging
from engine.output_dir import RunError, RunLock, write_failure
from engine.records import EvalRecord, RunSummary, TrainRecord
from engine.stopping import interrupt_in_one_line

TINY_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
MODEL = {"initializer_range": 0.05, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # docstring


def tiny_recipe() -> RunConfig:
    return load_config(TINY_RECIPE)


FEAT_DIM = tiny_recipe().model.visual_feat_dim  # what the synthetic data is written with: the recipe's
COMPONENTS = ("mlm", "matched", "obj", "attr", "feat", "qa")  # LxmertForPreTraining's loss components
REQUIRED = ("loss", *COMPONENTS)  # must fall (matching unless --no-require-matched)
MIN_FALL = 0.02  # a loss "fell" when its last steps' mean is at least 2% below its first steps'
CHANCE = {"matched": math.log(2)}  # where a required loss must also end below (by MIN_FALL)
STORES = ("feats", "text_train", "text_minival", "vqa_train", "vqa_minival")


class JobError(RuntimeError):
    """The job cannot go on: a work dir made with other settings, a store that fails verification."""


class JobStopped(Exception):
    """A run of the job stopped early (a signal, train.time_limit, only skipped steps) with a checkpoint: the job
    ends with that run's line and exit status, and a rerun of the same command resumes it."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(summary.stopped["line"])
        self.status = summary.exit_status


@dataclass
class JobOptions:
    workdir: Path = Path("runs/main")
    images: int = 400
    """Synthetic images (10% of them the minival split)."""
    data_seed: int = 0
    """Seed of the synthetic world."""
    steps: int = 1200
    """Pre-training optimizer steps."""
    batch_size: int = 32
    lr: float = 1e-3
    finetune_epochs: int = 4
    finetune_batch_size: int = 32
    finetune_lr: float = 1e-4
    seed: int = 0
    """Seed of initialisation, dropout and data order (pre-training and fine-tuning)."""
    log_every: int = 0
    """Pre-training steps between log lines; 0: steps / 50."""
    model: list[str] = field(default_factory=list)
    """model.* overrides (field=value) for both runs (the tests' tiny sizes)."""
    threads: int = 1
    """torch's intra-op threads (train.threads of both runs); 0: cores / ranks. One: the model is small, and on a
    shared 2-core machine a second spinning OpenMP thread made steps 15x slower (7 against 116 samples/s)."""
    optimizer: str = "adamw"
    """Pre-training's optim.name (the recipe's bertadam escapes the matching plateau later: module docstring)."""
    require_matched: bool = True
    """Fail the job when image-sentence matching did not learn; off for runs too short to learn it."""
    fresh: bool = False


@dataclass(frozen=True)
class Layout:
    """Where the job puts everything under its work dir."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def stores(self) -> Path:
        return self.root / "stores"

    def store(self, name: str) -> Path:
        return self.stores / name

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def finetune(self) -> Path:
        return self.root / "vqa"

    @property
    def report(self) -> Path:
        return self.root / "report.json"


# ------------------------------------------------------------------------------------------------- data


def prepare_data(layout: Layout, options: JobOptions) -> str:
    """Generate and convert what is missing, verify what exists; returns what was done."""
    from engine.data import convert, synthetic
    from engine.data.store import RegionStore, StoreError, TextStore
    from engine.data.tasks import TaskStore, convert_task

    feat_dim = FEAT_DIM
    spec = {
        "images": options.images,
        "seed": options.data_seed,
        "feat_dim": feat_dim,
        "places": synthetic.PLACES_VERSION,
    }
    marker = layout.data / "synthetic.json"  # generate() writes it last: its presence means the files are whole
    generated = not marker.is_file()
    if generated:
        synthetic.generate(layout.data, options.images, feat_dim=feat_dim, seed=options.data_seed, places=True)
    written = json.loads(marker.read_text())
    version = written.get("places_version", 1 if "places" in written else None)  # no version: the first world
    found = {
        "images": sum(s["images"] for s in written["splits"].values()),
        "seed": written["seed"],
        "feat_dim": written["feat_dim"],
        "places": version,
    }
    if found != spec:
        raise JobError(
            f"{layout.data} holds synthetic data made with {found}, not {spec}: pass --fresh to "
            "regenerate it, or use another --workdir"
        )

    raw, feats = layout.data, layout.store("feats")
    answers, ans2label = raw / "lxmert" / "all_ans.json", raw / "vqa" / "trainval_ans2label.json"
    tsvs = [raw / "mscoco_imgfeat" / "train2014_obj36.tsv", raw / "mscoco_imgfeat" / "val2014_obj36.tsv"]
    build = {
        "feats": lambda out: convert.convert_features(tsvs, out, feat_dim=feat_dim, progress=False),
        "text_train": lambda out: convert.convert_text(
            [raw / "lxmert" / "mscoco_train.json"], feats, out, answers=answers, progress=False
        ),
        "text_minival": lambda out: convert.convert_text(
            [raw / "lxmert" / "mscoco_minival.json"], feats, out, answers=answers, progress=False
        ),
        "vqa_train": lambda out: convert_task("vqa", [raw / "vqa" / "train.json"], feats, ans2label, out),
        "vqa_minival": lambda out: convert_task("vqa", [raw / "vqa" / "minival.json"], feats, ans2label, out),
    }
    kind = {
        "feats": RegionStore,
        "text_train": TextStore,
        "text_minival": TextStore,
        "vqa_train": TaskStore,
        "vqa_minival": TaskStore,
    }
    built = []
    for name in STORES:
        path = layout.store(name)
        if not (path / "meta.json").is_file():
            build[name](path)  # resumes an interrupted build of the same inputs; verified before it is renamed
            built.append(name)
            continue
        try:
            store = kind[name](path)
            store.verify()
            if name == "feats" and (len(store) != options.images or store.feat_dim != feat_dim):
                raise StoreError(
                    f"{len(store)} images of {store.feat_dim}-d features, not {options.images} of {feat_dim}-d"
                )
        except (StoreError, OSError, ValueError, KeyError) as error:
            raise JobError(f"the store {path} does not verify ({error}): pass --fresh to rebuild it") from error
    done = ["generated" if generated else "reused"]
    done.append(f"converted {', '.join(built)}" if built else "stores reused (verified)")
    return "; ".join(done)


def _scores(questions: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """key value -> answer -> the summed soft scores of the questions with that value."""
    out: dict[str, dict[str, float]] = {}
    for q in questions:
        totals = out.setdefault(q.get(key, ""), {})
        for answer, score in (q.get("label") or {}).items():
            totals[answer] = totals.get(answer, 0.0) + score
    return out


def baselines(train_json: Path, eval_json: Path) -> dict[str, Any]:
    """The VQA scores on the eval split of answers chosen without the image, from the public files:
    - chance: the single answer that scores best on the eval split itself (the majority-answer baseline);
    - prior: per question type (the files' question_type), the answer that scores best on the train split."""
    train = json.loads(train_json.read_text())
    evals = [q for q in json.loads(eval_json.read_text()) if q.get("label") is not None]
    overall = _scores(evals, "")[""] if evals else {}
    answer = max(overall, key=lambda a: overall[a]) if overall else ""
    by_type = {
        t: max(totals, key=lambda a: totals[a]) for t, totals in _scores(train, "question_type").items() if totals
    }
    prior = [q["label"].get(by_type.get(q.get("question_type", ""), ""), 0.0) for q in evals]
    n = max(len(evals), 1)
    return {"chance": overall.get(answer, 0.0) / n, "chance_answer": answer, "prior": sum(prior) / n}


# ----------------------------------------------------------------------------------------------- configs


def job_recipe(options: JobOptions) -> RunConfig:
    """The tiny recipe with the job's model (MODEL, then the --model overrides) and threads, for both runs
    (fine-tuning loads the pre-training export: the same model)."""
    user_model = parse_overrides([f"model.{kv}" for kv in options.model]).get("model", {})
    return updated(tiny_recipe(), model={**MODEL, **user_model}, train={"threads": options.threads})


def pretrain_config(layout: Layout, options: JobOptions) -> RunConfig:
    steps = options.steps
    stores = {"features": str(layout.store("feats"))}
    return updated(
        job_recipe(options),
        data={
            "train": {**stores, "text": str(layout.store("text_train"))},
            "eval": {**stores, "text": str(layout.store("text_minival"))},
            "seed": options.seed,
        },
        optim={"name": options.optimizer, "lr": options.lr},
        train={
            "seed": options.seed,
            "max_steps": steps,
            "epochs": 1_000_000,
            "batch_size": options.batch_size,
            "log_every": options.log_every or max(1, steps // 50),
            "save_every": max(1, steps // 4),
            "eval_every": max(1, steps // 4),
            "output_dir": str(layout.pretrain),
            "resume": "auto",
        },
    )


def finetune_config(layout: Layout, options: JobOptions) -> RunConfig:
    from engine.data.tasks import TaskStore

    steps_per_epoch = len(TaskStore(layout.store("vqa_train"))) // options.finetune_batch_size
    stores = {"features": str(layout.store("feats"))}
    return updated(
        job_recipe(options),
        data={
            "train": {**stores, "text": str(layout.store("vqa_train"))},
            "eval": {**stores, "text": str(layout.store("vqa_minival"))},
            "seed": options.seed,
        },
        optim={"lr": options.finetune_lr, "warmup_ratio": 0.1, "grad_clip": 5.0},
        train={
            "task": "vqa",
            "seed": options.seed,
            "max_steps": None,
            "epochs": options.finetune_epochs,
            "batch_size": options.finetune_batch_size,
            "log_every": max(1, steps_per_epoch // 5),
            "save_every": 0,
            "eval_every": 0,
            "output_dir": str(layout.finetune),
            "init_from": str(layout.pretrain / "model.safetensors"),
        },
    )


# What a rerun may change: the thread count, and what the loop derives from the batch and the launch.
FREE_FIELDS = ("threads", "micro_batch_size", "grad_accum_steps", "world_size")


def _config_dict(config: RunConfig) -> dict[str, Any]:
    """The settings a rerun must share with the run it continues."""
    values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    for name in FREE_FIELDS:
        values["train"].pop(name, None)
    return values


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _refuse_if_changed(saved_config: Path, config: RunConfig, what: str) -> None:
    """Raise when the run in saved_config's directory was made with other settings."""
    if not saved_config.is_file():
        return
    saved = _config_dict(load_config(saved_config))
    changed = _differences(saved, _config_dict(config))
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise JobError(
            f"the {what} run in {saved_config.parent} was made with other settings ({shown}): pass "
            "--fresh to start over, or use another --workdir"
        )


# --------------------------------------------------------------------------------------------- the runs


def run_pretraining(layout: Layout, options: JobOptions) -> RunSummary:
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    config = pretrain_config(layout, options)
    _refuse_if_changed(layout.pretrain / "config.yaml", config, "pre-training")
    return Trainer(config, PretrainTask()).train()


def run_finetuning(layout: Layout, options: JobOptions) -> RunSummary:
    from engine.finetune import FineTuner

    config = finetune_config(layout, options)
    _refuse_if_changed(layout.finetune / "config.yaml", config, "fine-tuning")
    return FineTuner(config, answer_table=str(layout.store("text_train"))).train()


# --------------------------------------------------------------------------------------------- metrics


def read_records(metrics_path: Path) -> tuple[list[TrainRecord], list[EvalRecord]]:
    """(train records, eval records) in step order, a resumed run resolved: engine.metrics_log's reader, the one
    the plots are drawn from, typed (engine/records.py)."""
    from engine.metrics_log import read_metrics

    train, evals = read_metrics(metrics_path)
    return [TrainRecord.from_json(r) for r in train], [EvalRecord.from_json(r) for r in evals]


@dataclass
class Trend:
    first: float
    last: float

    def fell(self, min_fall: float = MIN_FALL) -> bool:
        return math.isfinite(self.first) and math.isfinite(self.last) and self.last < (1 - min_fall) * self.first


def window_of(n_records: int) -> int:
    """How many logged steps make "the first" and "the last": a tenth of them, 1 to 10."""
    return max(1, min(10, n_records // 10))


def loss_trends(records: list[TrainRecord]) -> dict[str, Trend]:
    """Per loss component (and "loss", the total) the mean of the first and of the last window_of(n) records."""
    if not records:
        return {}
    k = window_of(len(records))

    def mean(rs: list[TrainRecord], name: str) -> float:
        values = [float(r.loss if name == "loss" else r.losses[name]) for r in rs]
        return sum(values) / len(values)

    names = ["loss", *records[0].losses]
    return {name: Trend(mean(records[:k], name), mean(records[-k:], name)) for name in names}


def check_falling(
    trends: dict[str, Trend], required: tuple[str, ...] = REQUIRED, min_fall: float = MIN_FALL
) -> list[str]:
    """What did not fall: each required loss must be logged, fall by min_fall, and end below its CHANCE level."""
    problems = []
    for name in required:
        trend = trends.get(name)
        if trend is None:
            problems.append(f"{name}: not logged")
        elif not trend.fell(min_fall):
            problems.append(f"{name} did not fall by {min_fall:.0%}: {trend.first:.4f} -> {trend.last:.4f}")
        elif name in CHANCE and not trend.last < (1 - min_fall) * CHANCE[name]:
            problems.append(
                f"{name} did not fall below chance ({CHANCE[name]:.4f}) by {min_fall:.0%}: "
                f"{trend.first:.4f} -> {trend.last:.4f}"
            )
    return problems


def throughput(records: list[TrainRecord], batch_size: int) -> float | None:
    """Samples/s of the training loop over the logged windows (each window's samples over its time)."""
    samples = seconds = 0.0
    previous = 0
    for r in records:
        window = (r.step - previous) * batch_size
        previous = r.step
        if r.samples_per_s:
            samples += window
            seconds += window / r.samples_per_s
    return samples / seconds if seconds else None


# ----------------------------------------------------------------------------------------------- report


def _eval_summary(record: EvalRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    keep = ("loss", "losses", "qa_accuracy", "matched_accuracy")
    return {"step": record.step, **{k: record.values[k] for k in keep if k in record.values}}


def build_report(
    layout: Layout,
    options: JobOptions,
    pre: RunSummary,
    fine: RunSummary,
    seconds: dict[str, float],
    data_status: str,
) -> dict[str, Any]:
    """The report's numbers, read from the runs' metrics.jsonl files (the summaries give the paths)."""
    pre_metrics, fine_metrics = layout.pretrain / "metrics.jsonl", layout.finetune / "metrics.jsonl"
    pre_train, pre_evals = read_records(pre_metrics)
    trends = loss_trends(pre_train)
    fine_train, fine_evals = read_records(fine_metrics)
    scored = [e.values for e in fine_evals if e.values.get("metric") is not None]
    best = max(scored, key=lambda e: e["metric"]) if scored else None  # the first of equals, as the FineTuner
    required = REQUIRED if options.require_matched else tuple(n for n in REQUIRED if n != "matched")
    base = baselines(layout.data / "vqa" / "train.json", layout.data / "vqa" / "minival.json")
    return {
        "workdir": str(layout.root),
        "data": data_status,
        "seconds": seconds,
        "pretrain": {
            "steps": pre_train[-1].step if pre_train else 0,
            "steps_this_run": pre.steps_this_run,
            "batch_size": options.batch_size,
            "window": window_of(len(pre_train)),
            "losses": {
                name: {
                    "first": t.first,
                    "last": t.last,
                    "fell": not check_falling({name: t}, (name,)),
                    "required": name in required,
                }
                for name, t in trends.items()
            },
            "samples_per_s": throughput(pre_train, options.batch_size),
            "first_eval": _eval_summary(pre_evals[0] if pre_evals else None),
            "last_eval": _eval_summary(pre_evals[-1] if pre_evals else None),
            "checkpoint": pre.checkpoint,
            "model": pre.task.get("model"),
            "metrics": str(pre_metrics),
            "plots": pre.plots,
        },
        "finetune": {
            "steps": fine_train[-1].step if fine_train else 0,
            "steps_this_run": fine.steps_this_run,
            "batch_size": options.finetune_batch_size,
            "epochs": len(fine_evals),
            "first_loss": fine_train[0].loss if fine_train else None,
            "last_loss": fine_train[-1].loss if fine_train else None,
            "samples_per_s": throughput(fine_train, options.finetune_batch_size),
            "metric": fine.task.get("metric", "vqa_score"),
            "by_epoch": [e.values["metric"] for e in fine_evals],
            "best": best["metric"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            **base,
            "model": fine.task.get("model"),
            "submission": fine.task.get("submission"),
            "checkpoint": fine.checkpoint,
            "metrics": str(fine_metrics),
            "plots": fine.plots,
        },
        "problems": check_falling(trends, required),
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def format_report(report: dict[str, Any]) -> str:
    pre, fine = report["pretrain"], report["finetune"]
    lines = [f"== LXMERT main job ({report['workdir']}) ==", f"data: {report['data']}"]
    resumed = "" if pre["steps_this_run"] == pre["steps"] else f", {pre['steps_this_run']} of them in this run"
    lines.append(
        f"pre-training: {pre['steps']} steps at batch {pre['batch_size']}{resumed}; per loss the mean of "
        f"the first and of the last {pre['window']} logged steps, and whether it fell (last at least "
        f"{MIN_FALL:.0%} below first):"
    )
    lines.append(f"  {'loss':<8} {'first':>9} {'last':>9}  fell")
    for name, t in pre["losses"].items():
        note = (
            f"  (also to below chance, ln 2 = {CHANCE[name]:.4f}{'' if t['required'] else '; not required'})"
            if (name in CHANCE)
            else ""
        )
        lines.append(f"  {name:<8} {t['first']:>9.4f} {t['last']:>9.4f}  {'yes' if t['fell'] else 'NO'}{note}")
    if pre["samples_per_s"]:
        lines.append(f"  {pre['samples_per_s']:.1f} samples/s (training steps, from the log)")
    for label, e in (("first", pre["first_eval"]), ("last", pre["last_eval"])):
        if e:
            parts = " ".join(f"{k} {v:.3f}" for k, v in e.get("losses", {}).items())
            lines.append(
                f"  eval, {label} (step {e['step']}): loss {_fmt(e.get('loss'))} ({parts}); QA accuracy "
                f"{_fmt(e.get('qa_accuracy'))}, matching accuracy {_fmt(e.get('matched_accuracy'))}"
            )
    resumed = "" if fine["steps_this_run"] == fine["steps"] else f", {fine['steps_this_run']} of them in this run"
    epochs = f"{fine['epochs']} epoch{'' if fine['epochs'] == 1 else 's'}"
    lines.append(f"fine-tuning (VQA): {fine['steps']} steps at batch {fine['batch_size']}, {epochs}{resumed}")
    if fine["first_loss"] is not None:
        lines.append(f"  train loss {fine['first_loss']:.4f} (first logged step) -> {fine['last_loss']:.4f} (last)")
    if fine["samples_per_s"]:
        lines.append(f"  {fine['samples_per_s']:.1f} samples/s (training steps, from the log)")
    lines.append(f"  eval {fine['metric']} by epoch: " + ", ".join(_fmt(a) for a in fine["by_epoch"]))
    lines.append(
        f"  best {_fmt(fine['best'])} (epoch {fine['best_epoch']}); without the image: chance "
        f"{fine['chance']:.4f} (always {fine['chance_answer']!r}, the best single answer on the eval split), "
        f"question-type prior {fine['prior']:.4f} (the best train answer per question type)"
    )
    lines.append("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items()))
    lines.append("paths:")
    for label, path in (
        ("pre-training checkpoint", pre["checkpoint"]),
        ("pre-trained model", pre["model"]),
        ("pre-training log", pre["metrics"]),
        ("fine-tuned best model", fine["model"]),
        ("submission", fine["submission"]),
        ("fine-tuning log", fine["metrics"]),
        *(("plot", p) for p in pre["plots"] + fine["plots"]),
        ("this report", report.get("path")),
    ):
        lines.append(f"  {label:<24} {path}")
    if report["problems"]:
        lines.append("FAILED: " + "; ".join(report["problems"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the job


def clean(layout: Layout) -> None:
    """--fresh: delete what this job wrote in the work dir (its own entries only)."""
    for path in (layout.data, layout.stores, layout.pretrain, layout.finetune, layout.report):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_job(options: JobOptions) -> dict[str, Any]:
    """Data, pre-training, fine-tuning; returns the report (also written to <workdir>/report.json)."""
    layout = Layout(Path(options.workdir))
    lock = RunLock.take(layout.root, elsewhere="another --workdir")  # one job per work dir, before anything is written
    try:
        return _run_job(layout, options)
    finally:
        lock.release()


def _run_job(layout: Layout, options: JobOptions) -> dict[str, Any]:
    if options.fresh:
        clean(layout)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    data_status = prepare_data(layout, options)
    seconds["data"] = time.perf_counter() - tick
    tick = time.perf_counter()
    pre = run_pretraining(layout, options)
    if pre.stopped is not None:
        raise JobStopped(pre)
    seconds["pre-training"] = time.perf_counter() - tick
    tick = time.perf_counter()
    fine = run_finetuning(layout, options)
    if fine.stopped is not None:
        raise JobStopped(fine)
    seconds["fine-tuning"] = time.perf_counter() - tick
    seconds["total"] = sum(seconds.values())
    report = build_report(layout, options, pre, fine, seconds, data_status)
    report["path"] = str(layout.report)
    write_text_atomic(layout.report, json.dumps(report, indent=1) + "\n")
    return report


def parse_args(argv: list[str] | None = None) -> JobOptions:
    d = JobOptions()
    parser = argparse.ArgumentParser(prog="python -m engine.main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=d.workdir, help="where everything goes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="pre-training steps (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="pre-training batch (default %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="pre-training peak lr (default %(default)s)")
    parser.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs, help="default %(default)s")
    parser.add_argument("--finetune-batch-size", type=int, default=d.finetune_batch_size, help="default %(default)s")
    parser.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=d.seed, help="training seed (default %(default)s)")
    parser.add_argument("--images", type=int, default=d.images, help="synthetic images (default %(default)s)")
    parser.add_argument("--data-seed", type=int, default=d.data_seed, help="synthetic world (default %(default)s)")
    parser.add_argument("--log-every", type=int, default=d.log_every, help="0: steps / 50 (default)")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a model.* override for both runs, e.g. --model hidden_size=64 (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads, 0: one a core (default 1)")
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "bertadam"),
        default=d.optimizer,
        help="pre-training optimizer (default %(default)s)",
    )
    parser.add_argument(
        "--require-matched",
        action=argparse.BooleanOptionalAction,
        default=d.require_matched,
        help="fail when image-sentence matching did not learn (default on; off for short runs)",
    )
    parser.add_argument("--fresh", action="store_true", help="delete this job's outputs in the work dir first")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.images < 2:
        parser.error("--steps must be >= 1 and --images >= 2")
    return JobOptions(**vars(args))  # one option a field, named alike


@interrupt_in_one_line("engine.main")
def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    configure_logging(rank=0)  # the runs' console lines (one process)
    try:
        report = run_job(options)
    except (JobError, ConfigError, RunError) as error:  # a second job on the work dir, a changed setting, ...
        print(f"engine.main: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or an unwritable work dir
        print(f"engine.main: {write_failure(error, options.workdir, 'the job')}", file=sys.stderr)
        return 2
    except JobStopped as stopped:
        print(f"engine.main: {stopped}", flush=True)
        return stopped.status
    print(format_report(report), flush=True)
    if report["problems"]:
        problems = report["problems"]
        if all(p.startswith("matched") for p in problems):  # a short run, more likely than a broken one
            print(
                f"engine.main: FAILED: image-sentence matching did not learn: {'; '.join(problems)}. It leaves "
                f"its plateau at ln 2 only after some hundred steps (the default {JobOptions.steps} steps learn "
                "it: engine/main.py's docstring); for shorter runs pass --no-require-matched",
                file=sys.stderr,
            )
        else:
            print(
                "engine.main: FAILED: a pre-training loss did not fall, so something is broken: " + "; ".join(problems),
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
