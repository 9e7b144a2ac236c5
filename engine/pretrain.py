"""Pre-train LXMERT: `lxmert-pretrain --config configs/<recipe>.yaml [section.field=value ...]` (or
`python -m engine.pretrain ...`).

Alone it runs one process (the plain PyTorch path, or DeepSpeed on a world of one when train.zero_stage > 0 and
DeepSpeed is installed: engine/launch.py); under a launcher every rank runs it:
    deepspeed --num_gpus 8 --module engine.pretrain --config configs/pretrain.yaml
    torchrun --nproc_per_node 8 -m engine.pretrain --config configs/pretrain.yaml train.zero_stage=1
(LOCAL_RANK / RANK / WORLD_SIZE come from the environment; DeepSpeed's --local_rank argument is accepted.)
Every store and the config are checked before anything is written: a mistake is one line on stderr naming the
key or file, exit 2. Prints the resolved config (also saved as <output_dir>/config.yaml), logs to <output_dir>/metrics.jsonl (and
TensorBoard when installed), and ends with a short report: first and last losses per component, samples/s, the
last validation, the checkpoint, model, log and plot paths.
"""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import ConfigError, format_config, load_config
from engine.train import Trainer


def report(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps ({summary['steps_this_run']} in this run, "
             f"{summary['skipped_steps']} skipped) in {summary['seconds']:.1f} s"]  # fmt: skip
    first, last = summary.get("first"), summary.get("last")
    if first and last:
        lines.append(f"  {'loss':<10} {'first':>10} {'last':>10}")
        for name in first:
            lines.append(f"  {name:<10} {first[name]:>10.4f} {last.get(name, float('nan')):>10.4f}")
    if summary.get("samples_per_s"):
        lines.append(f"  samples/s {summary['samples_per_s']:.1f}")
    evaluation = summary.get("eval")
    if evaluation:
        parts = " ".join(f"{k} {v:.4f}" for k, v in evaluation["losses"].items())
        qa = evaluation["qa_accuracy"]
        lines.append(f"  eval (step {evaluation['step']}, {evaluation['samples']} samples): loss {evaluation['loss']:.4f}"
                     f" ({parts}); QA accuracy {'-' if qa is None else f'{qa:.4f}'}; matching accuracy "
                     f"{evaluation['matched_accuracy']:.4f}")  # fmt: skip
    lines.append(f"  checkpoint {summary['checkpoint']}")
    lines.append(f"  model      {summary['model']}")
    lines.append(f"  log        {summary['metrics_log']}")
    for plot in summary.get("plots", []):
        lines.append(f"  plot       {plot}")
    return "\n".join(lines)


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
            raise ConfigError(f"train.task is {config.train.task!r}: lxmert-pretrain pre-trains (lxmert-finetune "
                              "fine-tunes)")  # fmt: skip
        trainer = Trainer(config, export_hf=args.export_hf)
    except ConfigError as error:
        print(f"lxmert-pretrain: error: {error}", file=sys.stderr)
        return 2
    if trainer.rank == 0:
        print(format_config(trainer.config), flush=True)
    summary = trainer.train()
    if trainer.rank == 0:
        print(report(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
