"""The run's records, typed: a train record (TrainRecord), an evaluation record (EvalRecord) and the run's
summary (RunSummary). The Trainer (engine/train.py) fills them; `to_json()` is the line engine/metrics_log.py writes
to metrics.jsonl (the keys and their order are that file's format: the plots, the trackers, resume and the tests
read it), `from_json()` reads such a line back (engine/main.py's report reads the logs through it, after
engine.metrics_log.read_metrics). The console report (engine.train.report) reads a RunSummary.

An evaluation measures what its task decides (engine/tasks: pre-training's losses and accuracies, fine-tuning's
metric), so an EvalRecord is the step and the task's values in the task's order; a summary carries the task's own
entries (Task.summary) the same way. Nothing here imports torch or the rest of the engine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}  # metrics.jsonl's names for them


def _number(value: Any) -> Any:
    """A float metrics.jsonl wrote as its name ("inf", "-inf", "nan") back to the float."""
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


@dataclass(frozen=True)
class TrainRecord:
    """One log step's train record (engine/train.py's module docstring says what each field measures; the
    throughput fields are over the window since the previous record). `losses`: the loss's components, in the
    model's order ({} for a model without them, and then not written)."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    losses: dict[str, float]
    lr: float
    grad_norm: float
    loss_scale: float | None
    skipped: bool  # a step since the previous record had a non-finite gradient
    skipped_steps: int
    samples_per_s: float
    tokens_per_s: float
    tflops: float
    mfu: float | None  # None where the device's peak is unknown (the CPU)
    data_wait_share: float
    peak_memory_gib: float
    threads: int
    step_time_s: float
    eta_s: float

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl line: {"kind": "train", the fields in order}, "losses" only when there are any."""
        record = {"kind": "train", **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        record["losses"] = dict(self.losses)
        if not self.losses:
            del record["losses"]
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> TrainRecord:
        """A metrics.jsonl train line as written by to_json; a field an older log lacks is None."""
        values = {f.name: _number(record.get(f.name)) for f in dataclasses.fields(cls)}
        values["losses"] = {k: _number(v) for k, v in (record.get("losses") or {}).items()}
        return cls(**values)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: the step it evaluates and what the task measured (Task.evaluate's entries but "kind" and
    "step", in its order: e.g. pre-training's loss, losses, qa_accuracy; fine-tuning's epoch, metric)."""

    step: int
    values: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "eval", "step": self.step, **self.values}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> EvalRecord:
        return cls(int(record["step"]), {k: v for k, v in record.items() if k not in ("kind", "step")})


@dataclass(frozen=True)
class RunSummary:
    """What Trainer.train returns: the run's counts, time and paths. A run stopped before its end (a signal,
    train.time_limit, train.max_skipped_steps) has `stopped` ({"reason", "status": its exit status, "line": what
    the CLI prints}) and no eval_seconds, samples_per_s, plots or task entries; a run that ended has those, and
    `task` holds what its task adds (Task.summary: e.g. the first and last losses, the last evaluation, the
    exported model)."""

    steps: int
    steps_this_run: int
    skipped_steps: int
    seconds: float
    checkpoint: str | None
    metrics_log: str
    stopped: dict[str, Any] | None = None
    eval_seconds: float | None = None
    samples_per_s: float | None = None  # over the training time (evaluation excluded); None when no step ran
    plots: list[str] = field(default_factory=list)
    task: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        """The CLI's exit status: 0, or the stop's (engine/stopping.py lists them)."""
        return self.stopped["status"] if self.stopped is not None else 0
