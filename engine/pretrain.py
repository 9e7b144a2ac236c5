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

import sys

from engine.config import ConfigError
from engine.stopping import interrupt_in_one_line
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer, training_cli


def _options(parser) -> None:
    parser.add_argument("--export-hf", action="store_true", help="also write transformers' layout + config.json")


def _build(config, args) -> Trainer:
    if config.train.task != "pretrain":
        raise ConfigError(
            f"train.task is {config.train.task!r}: lxmert-pretrain pre-trains (lxmert-finetune fine-tunes)"
        )
    return Trainer(config, PretrainTask(export_hf=args.export_hf))


@interrupt_in_one_line("lxmert-pretrain")
def main(argv: list[str] | None = None) -> int:
    return training_cli("lxmert-pretrain", __doc__.split("\n")[0], argv, _build, _options)


if __name__ == "__main__":
    sys.exit(main())
