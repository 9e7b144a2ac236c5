"""What a task (engine/tasks) sees of the run: a TaskContext, never the Trainer (engine/train.py). Neither side
imports the other; both import this.

The Trainer builds a fresh, frozen context for each call into the task, so every field is the run's value at that
call (step and evals included) and a task cannot change the run through it. The fields after output_dir fill in as
the run is built: check() gets only the first five; build_model() and the loaders also resume_from; from start()
on every field is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from engine.config import RunConfig
    from engine.runtime import Runtime


@dataclass(frozen=True)
class TaskContext:
    config: RunConfig  # resolved for this world size
    device: torch.device
    rank: int
    world_size: int
    output_dir: Path
    resume_from: Path | None = None  # the checkpoint the run loads (weights only or whole), or None
    runtime: Runtime | None = None  # forward, export, train(mode): engine/runtime.py
    inputs: Callable[[Any], Any] | None = None  # a batch as the model takes it (TrainStep.inputs: precision)
    eval_loader: Any = None  # this rank's eval micro batches, or None
    steps_per_epoch: int = 1  # optimizer steps
    step: int = 0  # optimizer steps done
    started_at: int = 0  # the step this process started training from (a resumed run's checkpoint step)
    evals: tuple[dict[str, Any], ...] = ()  # the eval records so far, resumed ones included
