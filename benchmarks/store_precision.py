"""What float16 region stores (the converter's default; the authors keep float32) do to features and to training.

    python -m benchmarks.store_precision              # 300 steps of the tiny model on each store (~2 min on 2 cores)
    python -m benchmarks.store_precision --steps 20   # quicker

1. Rounding on real-scale values: Faster R-CNN pool5 features are ReLU outputs, mostly 0-10 with a tail to a
   few tens (the converter refuses values beyond float16's 65504); drawn here as relu(N(0, 2)) + an exponential
   tail to 64, and rounded through float16 as the converter stores them: the largest absolute and relative error.
2. Training: the synthetic set converted twice (float16 and --fp32 stores from the same TSVs), then the same
   fixed-seed tiny pre-training run on each; the loss curves side by side and their largest relative gap.
Writes runs/benchmarks/store_precision.md (or --out). CPU figures: a measurement of numerics, not of speed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks import harness


def rounding_error(seed: int = 0, n: int = 2_000_000) -> dict[str, float]:
    """The float16 store's largest errors on pool5-like values (float32 in, float16 stored, float32 read)."""
    rng = np.random.default_rng(seed)
    values = np.maximum(rng.normal(0.0, 2.0, n), 0.0)
    tail = rng.random(n) < 0.01
    values[tail] += np.minimum(rng.exponential(8.0, tail.sum()), 64.0)
    values = values.astype(np.float32)
    stored = values.astype(np.float16).astype(np.float32)
    error = np.abs(stored - values)
    normal = values >= 2.0**-14  # float16's normal range; below it the error is absolute, at most 2^-25
    return {
        "max_value": float(values.max()),
        "max_abs": float(error.max()),
        "max_rel": float((error[normal] / values[normal]).max()),
        "max_abs_subnormal": float(error[~normal].max()),
        "mean_abs": float(error.mean()),
    }


def stores(work: Path, images: int, feat_dim: int) -> dict[str, tuple[Path, Path]]:
    """{"fp16": (text, feats), "fp32": (text, feats)} converted from one synthetic set."""
    from benchmarks.dataloader import convert_synthetic
    from engine.data import synthetic

    syn = work / "synthetic"
    synthetic.generate(syn, images, feat_dim=feat_dim, seed=0)
    for name in ("fp16", "fp32"):
        convert_synthetic(syn, work / name, feat_dim, ["mscoco_train"], fp32=name == "fp32")
    shutil.rmtree(syn)
    return {name: (work / name / "text", work / name / "feats") for name in ("fp16", "fp32")}


def losses(text: Path, feats: Path, out: Path, steps: int, log_every: int) -> list[tuple[int, float]]:
    from benchmarks.host_waits import tiny_config
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    config = tiny_config("sdpa", out, steps, log_every, stores=(text, feats))
    trainer = Trainer(config, PretrainTask(), use_deepspeed=False)
    trainer.train()
    return [(r["step"], r["loss"]) for r in trainer.history]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--feat-dim", type=int, default=64)
    parser.add_argument("--out", default="runs/benchmarks/store_precision.md")
    args = parser.parse_args(argv)
    from engine.logs import configure_logging

    configure_logging()  # the runs' console lines, as lxmert-pretrain shows them
    error = rounding_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = stores(work, args.images, args.feat_dim)
        curves = {name: losses(*made[name], work / f"run_{name}", args.steps, args.log_every) for name in made}
    gaps = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(curves["fp16"], curves["fp32"])]
    lines = [
        "# float16 against float32 region stores",
        "",
        "Measured on the CPU by benchmarks/store_precision.py (numerics, not speed).",
        "",
        "## Rounding of pool5-like values (relu(N(0, 2)) with a tail to 64, 2M values)",
        "",
        f"largest value {error['max_value']:.2f}: largest absolute error {error['max_abs']:.2e}, largest relative "
        f"error {error['max_rel']:.2e} at or above 2^-14 (float16's half ulp is 2^-11 = 4.9e-4), largest absolute "
        f"error below it {error['max_abs_subnormal']:.1e}, mean absolute error {error['mean_abs']:.2e}.",
        "",
        f"## Tiny pre-training, {args.steps} steps, the same seed, on each store ({args.images} synthetic images, "
        f"{args.feat_dim}-d features)",
        "",
        "| step | loss, float16 store | loss, float32 store | relative gap |",
        "|---|---|---|---|",
        *(f"| {s} | {a:.5f} | {b:.5f} | {g:.2e} |" for (s, a), (_, b), g in zip(curves["fp16"], curves["fp32"], gaps)),
        "",
        f"largest relative gap {max(gaps):.2e}; final losses {curves['fp16'][-1][1]:.5f} (float16) and "
        f"{curves['fp32'][-1][1]:.5f} (float32).",
    ]
    harness.write_summary(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
