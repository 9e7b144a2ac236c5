"""The Task interface of the training loop (engine/train.py), and what every task shares.

A task is built by its caller (a CLI, engine.tasks.make_task) and handed to Trainer(config, task); the Trainer
sets task.config to the resolved config and then asks it, in this order, each time with a ctx (engine/context.py:
the run as the task may see it at that call, never the Trainer):
    check(ctx)                  every input the run reads exists and fits, before anything is built or written
    build_model(ctx)            the model, initialised (the Trainer has seeded torch with train.seed)
    train_loader(ctx)           micro batches of one rank (engine/data loaders: epochs, resume, workers)
    eval_loader(ctx)            or None
    start(ctx, resumed)         just before the first step (a task may reseed dropout here)
    flops(batch) / tokens(batch)  per micro batch, for TFLOP/s, MFU and tokens/s
    evaluate(ctx)               an "eval" record, on every rank (evaluation may be a collective)
    after_evaluation(ctx, record)   keep the best model, write a submission
    finish(ctx)                 the outputs of a finished run (exports), on every rank
    summary(ctx, run)           the task's part of the run's summary
and for checkpoints state_dict() / load_state_dict(state, path) of what the task keeps across a resume;
resume_setting() is train.resume as the task reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config import ConfigError, RunConfig
from engine.context import TaskContext
from engine.data.store import StoreError

STORE_KINDS = {"RegionStore": "feature store", "TextStore": "text store", "TaskStore": "task store"}


def open_store(path: str, key: str, kind: type, build: str):
    """A store named by config key `key`, opened; any problem is a ConfigError naming the key and the path."""
    what = STORE_KINDS.get(kind.__name__, "store")
    if not path:
        raise ConfigError(
            f"{key} is empty: it must name a {what} directory (built by {build}), or pass --config "
            "configs/<recipe>.yaml"
        )
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: the {what} {path} does not exist (build it with {build})")
    try:
        return kind(path)
    except (StoreError, OSError, KeyError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None


class Task:
    """The interface (see the module docstring); these defaults are what a task without the concern does."""

    name = ""
    evaluate_only = False  # fine-tuning's --evaluate-only: no training data, weights only
    config: RunConfig  # the resolved config, set by the Trainer before check()

    def resume_setting(self) -> str:
        """train.resume as this task reads it ("auto", "none" or a path)."""
        return self.config.train.resume

    def check(self, ctx: TaskContext) -> None:
        pass

    def build_model(self, ctx: TaskContext) -> Any:
        raise NotImplementedError

    def train_loader(self, ctx: TaskContext) -> Any:
        raise NotImplementedError

    def eval_loader(self, ctx: TaskContext) -> Any:
        return None

    def start(self, ctx: TaskContext, resumed: bool) -> None:
        pass

    def flops(self, batch: Any) -> int:
        raise NotImplementedError

    def tokens(self, batch: Any) -> int:
        """Text tokens plus regions the model read (padding included)."""
        raise NotImplementedError

    def evaluate(self, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def eval_line(self, record: dict[str, Any]) -> str:
        return f"eval step {record['step']}"

    def after_evaluation(self, ctx: TaskContext, record: dict[str, Any]) -> None:
        pass

    def finish(self, ctx: TaskContext) -> dict[str, Any]:
        return {}

    def summary(self, ctx: TaskContext, run: dict[str, Any]) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """`state`: the checkpoint's client state (the task's keys and the loop's); `path`: the checkpoint."""
