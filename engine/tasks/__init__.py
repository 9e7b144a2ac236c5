"""What the one training loop (engine/train.py) trains: a task supplies the model, the loaders, the evaluation
and its outputs; the loop does everything else the same way for every task. A task sees the run through a
TaskContext (engine/context.py), never the Trainer; the caller builds the task and hands it to the Trainer.

    base.py      the Task interface and what every task needs (opening a store named by a config key)
    pretrain.py  LXMERT's five pre-training tasks on text and region stores
    finetune.py  VQA / GQA (LxmertForQuestionAnswering) and NLVR2 (LxmertForNLVR2) on task stores
"""

from __future__ import annotations

from engine.config import RunConfig
from engine.tasks.base import Task
from engine.tasks.finetune import FINETUNE_TASKS, FinetuneTask
from engine.tasks.pretrain import PretrainTask


def make_task(config: RunConfig, export_hf: bool = False) -> Task:
    """The task train.task names, with its defaults (the CLIs build theirs with their options)."""
    if config.train.task in FINETUNE_TASKS:
        return FinetuneTask(config.train.task)
    return PretrainTask(export_hf=export_hf)
