"""Pre-train LXMERT: `lxmert-pretrain --config configs/<recipe>.yaml [section.field=value ...]` (or
`python -m engine.pretrain ...`).

Alone it runs one process (the plain PyTorch path, or DeepSpeed on a world of one when train.zero_stage > 0 and
DeepSpeed is installed: engine/launch.py); under a launcher every rank runs it:
    deepspeed --num_gpus 8 --module engine.pretrain --config configs/pretrain.yaml
    torchrun --nproc_per_node 8 -m engine.pretrain --config configs/pretrain.yaml train.zero_stage=1
(LOCAL_RANK / RANK / WORLD_SIZE come from the environment; DeepSpeed's --local_rank argument is accepted.)
Every store and the config are checked before anything is written: a mistake is one line on stderr naming the
key or file, exit 2 (so is a second run into a train.output_dir in use, a resume the config cannot take, and a
write that fails: engine/output_dir.py). The loop is engine/train.py's, the task engine/tasks/pretrain.py.
Prints the resolved config (also saved as <output_dir>/config.yaml), logs to <output_dir>/metrics.jsonl (and
to the trackers train.report_to names: TensorBoard, W&B), and ends with a short report: first and last losses per
component, samples/s, the last validation, the checkpoint, model, log and plot paths.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import ConfigError, format_config, load_config
from engine.launch import error_line
from engine.output_dir import RunError
from engine.stopping import interrupt_in_one_line
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer, exit_status, report, run_cli


@interrupt_in_one_line("lxmert-pretrain")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lxmert-pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a recipe YAML (configs/)")
    parser.add_argument("--export-hf", action="store_true", help="also write transformers' layout + config.json")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.overrides)
        if config.train.task != "pretrain":
            raise ConfigError(
                f"train.task is {config.train.task!r}: lxmert-pretrain pre-trains (lxmert-finetune fine-tunes)"
            )
        trainer = Trainer(config, PretrainTask(export_hf=args.export_hf))
    except (ConfigError, RunError) as error:
        return error_line("lxmert-pretrain", error)

    def run() -> int:
        if trainer.rank == 0:
            print(format_config(trainer.config), flush=True)
        summary = trainer.train()
        if trainer.rank == 0:
            print(report(summary), flush=True)
        return exit_status(summary)  # 0, or a stop's (75 preempted or out of time, 130 ^C, 3 only skipping steps)

    return run_cli("lxmert-pretrain", trainer, run)


if __name__ == "__main__":
    sys.exit(main())
