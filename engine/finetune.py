"""Fine-tune LXMERT (VQA, GQA, NLVR2): `lxmert-finetune --config configs/vqa.yaml [section.key=value ...]`
(or `python -m engine.finetune ...`), [--answer-table PATH] [--from-scratch] [--evaluate-only].

Alone it runs one process; under a launcher every rank runs it (`deepspeed --num_gpus 8 --module engine.finetune
--config configs/vqa.yaml train.zero_stage=2`). The training loop is pre-training's (engine/train.py: DeepSpeed or
plain PyTorch, precision, ZeRO, activation checkpointing, compile, logs, checkpoints, resume); what is fine-tuned
and how (data, the architecture and weights from train.init_from, the answer tables, evaluation, the best model
and the submission file) is the task's: engine/tasks/finetune.py says it all.

Every input is checked before anything is written: a mistake is one line on stderr naming the key or file,
exit 2 (so is a second run into a train.output_dir in use, a resume the config cannot take, and a write that
fails: engine/output_dir.py). Prints the resolved config, the architecture taken from the checkpoint, and a
report at the end.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from engine.config import RunConfig
from engine.stopping import interrupt_in_one_line
from engine.tasks.finetune import FINETUNE_TASKS, SUBMISSION_NAMES, FineTuneError, FinetuneTask
from engine.train import Trainer, training_cli

__all__ = ["FINETUNE_TASKS", "SUBMISSION_NAMES", "FineTuneError", "FineTuner", "main"]


class FineTuner(Trainer):
    """The training loop with a fine-tuning task (train.task vqa | gqa | nlvr2); `evaluate_only()` predicts the
    eval split with the weights as loaded."""

    def __init__(
        self,
        config: RunConfig,
        answer_table: str | None = None,
        use_deepspeed: bool | None = None,
        evaluate_only: bool = False,
    ) -> None:
        task = FinetuneTask(config.train.task, answer_table=answer_table, evaluate_only=evaluate_only)
        super().__init__(config, task, use_deepspeed=use_deepspeed)

    @property
    def init_report(self) -> dict[str, Any]:
        return self.task.init_report

    @property
    def adopted(self) -> list[str]:
        """The model.* fields taken from train.init_from's config."""
        return self.task.adopted

    @property
    def best(self) -> dict[str, Any] | None:
        return self.task.best

    @property
    def metric_name(self) -> str:
        return self.task.metric_name

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Example order of an epoch: a permutation from (data.seed, epoch), whole global batches only."""
        return self.loader.order.epoch_order(epoch)

    def evaluate_only(self) -> dict[str, Any]:
        """Predict the eval split with the loaded weights: <output_dir>/evaluate/{submission, result.json}."""
        return self.task.evaluate_only_run(self.context())


def _options(parser) -> None:
    parser.add_argument("--answer-table", help="the pre-training QA head's answer table (engine/tasks/finetune.py)")
    parser.add_argument("--from-scratch", action="store_true", help="ignore train.init_from")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="predict data.eval with train.init_from (a fine-tuned model) or the latest checkpoint "
        "in train.output_dir; writes <output_dir>/evaluate/",
    )


def _build(config: RunConfig, args) -> FineTuner:
    if args.from_scratch:
        config.train.init_from = ""
    # FineTuneError is a ConfigError: one line, exit 2
    return FineTuner(config, answer_table=args.answer_table, evaluate_only=args.evaluate_only)


def _preface(tuner: FineTuner) -> list[str]:
    adopted = tuner.adopted
    return [f"model architecture from {tuner.config.train.init_from}: {', '.join(adopted)}"] if adopted else []


def _evaluate_only(tuner: FineTuner, args) -> int | None:
    if not args.evaluate_only:
        return None
    result = tuner.evaluate_only()
    if tuner.rank == 0:
        print(
            f"{result['task']} {result['metric']} {result['value']} on {result['examples']} examples; "
            f"submission {result['submission']}",
            flush=True,
        )
    return 0


@interrupt_in_one_line("lxmert-finetune")
def main(argv: list[str] | None = None) -> int:
    return training_cli("lxmert-finetune", __doc__.split("\n\n")[0], argv, _build, _options, _preface, _evaluate_only)


if __name__ == "__main__":
    sys.exit(main())
