"""Host waits of the training step, counted on any machine: the operations that would make a CUDA host wait for
the device, per step of a tiny pre-training run through the engine's own Trainer (benchmarks/README.md).

    python -m benchmarks.host_waits                 # eager, sdpa, triton, flash; DeepSpeed ZeRO-1 / -2 in one process
    python -m benchmarks.host_waits --paths eager   # one path

Counted by a TorchDispatchMode (HostWaitCounter), plus .tolist(), .numpy() and .cpu() calls. Not counted: the
host-side loader, checkpoints, tensors created explicitly on the CPU (device="cpu": the Triton kernels' dropout
seeds) and anything inside one dispatched operation (a custom op is one launch). Not visible on the CPU: a copy
from pageable host memory to the device; the step makes none, by reading. Each step's count runs from the start
of its train_step to the start of the next, so a log step's count includes the log line's reads.

flash: attn_backend "flash" in bf16 on benchmarks/flash_standin.py's stand-in for flash-attn (the one the tests
use; the backend let onto the CPU), counted as one launch each call as flash-attn's kernel is: the count is the
backend's own, with the unpadding the loader finds on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

aten = torch.ops.aten
WAITING_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}
READING_METHODS = ("tolist", "numpy", "cpu")  # host reads that do not dispatch for CPU tensors
PATHS = ("eager", "sdpa", "triton", "flash", "zero1", "zero2")
ATTENTION_PATHS = ("eager", "sdpa", "triton", "flash")


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


class HostWaitCounter(TorchDispatchMode):
    """Counts host waits by kind into `self.counts[self.phase]` while `self.phase` is not None."""

    def __init__(self) -> None:
        super().__init__()
        self.phase: Any = None
        self.counts: dict[Any, Counter] = {}
        self._host = weakref.WeakSet()  # tensors made on the CPU on purpose (device="cpu")
        self._inside = 0  # > 0 while one dispatched op runs (its Python internals are not ours)
        self._saved: dict[str, Callable] = {}

    def count(self, kind: str) -> None:
        if self.phase is not None and self._inside == 0:
            self.counts.setdefault(self.phase, Counter())[kind] += 1

    def _kind(self, func, args, kwargs) -> str | None:
        if func in WAITING_OPS:
            if func is aten._local_scalar_dense.default and args[0] in self._host:
                return None
            return WAITING_OPS[func]
        if func is aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1] if isinstance(i, torch.Tensor)
        ):
            return "bool_index"
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst = kwargs.get("device", src.device) if func is aten._to_copy.default else args[0].device
            if src.device.type != "cpu" and torch.device(dst).type == "cpu":
                return "to_host"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self.count(kind)
        self._inside += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self._inside -= 1
        if str(kwargs.get("device", "")) == "cpu":
            for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
                self._host.add(t)
        return out

    def __enter__(self):
        for name in READING_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            @functools.wraps(original)
            def reading(t, *args, _original=original, _name=name, **kwargs):
                if t not in self._host:
                    self.count(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, reading)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def one_launch(self) -> Iterator[None]:
        """What runs inside counts as one dispatched operation: nothing in it is counted."""
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        phase, self.phase = self.phase, None
        try:
            yield
        finally:
            self.phase = phase


def watch(trainer, counter: HostWaitCounter) -> None:
    """Attribute the counter's events to the trainer's steps: from the start of each train_step to the next one's,
    the loader and checkpoints excluded; nothing after the run's last checkpoint."""
    step_fn, save_fn, micro_fn = trainer.train_step.train_step, trainer.save, trainer._micro_batches

    def train_step(micro, clock=None):
        counter.phase = trainer.step + 1
        return step_fn(micro, clock)

    def save():
        with counter.paused():
            path = save_fn()
        if trainer.step >= trainer.total_steps:
            counter.phase = None  # the run is over: the export and the summary are not steps
        return path

    def micro_batches():
        batches = micro_fn()
        while True:
            with counter.paused():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    trainer.train_step.train_step, trainer.save, trainer._micro_batches = train_step, save, micro_batches


def tiny_config(path: str, work: Path, steps: int, log_every: int, stores: tuple[Path, Path] | None = None):
    """The engine's RunConfig of a tiny pre-training run on a synthetic store (or `stores`: text, features);
    path: an attention backend (flash: bf16, the stand-in installed by count_run) or a DeepSpeed ZeRO stage
    (zero1, zero2: one process, bf16)."""
    from benchmarks.dataloader import dataset
    from engine.config import load_config
    from engine.data.store import RegionStore, TextStore

    if stores is None:
        text, regions = dataset(work / "data", 64, harness.TINY_FEAT_DIM)
    else:
        text, regions = TextStore(stores[0]), RegionStore(stores[1])
    backend = path if path in ATTENTION_PATHS else "sdpa"
    overrides = harness.tiny_model_overrides(text, regions.feat_dim)
    overrides += [
        f"model.attn_backend={backend}",
        f"model.feat_loss_backend={'triton' if backend == 'triton' else 'torch'}",
    ]
    overrides += [f"data.train.text={text.path}", f"data.train.features={regions.path}", "data.num_workers=0"]
    overrides += ["train.batch_size=4", "train.epochs=100", f"train.max_steps={steps}", f"train.log_every={log_every}"]
    overrides += ["train.save_every=1000", f"train.output_dir={work / path}", "train.seed=0"]
    overrides.append(f"train.zero_stage={int(path[-1]) if path.startswith('zero') else 0}")
    if path.startswith("zero") or path == "flash":  # flash-attn takes bf16 / fp16 only
        overrides.append("train.precision=bf16")
    return load_config(None, overrides)


def count_run(path: str, work: Path, steps: int = 20, log_every: int = 10) -> dict[int, Counter]:
    """{step: Counter(kind -> waits)} of a `steps`-step run logging every `log_every` steps."""
    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    counter = HostWaitCounter()
    standin = contextlib.nullcontext()
    if path == "flash":
        from benchmarks import flash_standin

        standin = flash_standin.installed((torch.float16, torch.bfloat16), launch=counter.one_launch)
    with standin:
        config = tiny_config(path, work, steps, log_every)
        trainer = Trainer(config, PretrainTask(), use_deepspeed=path.startswith("zero"))
        watch(trainer, counter)
        with counter:
            trainer.train()
    return {step: counter.counts.get(step, Counter()) for step in range(1, steps + 1)}


def summarise(path: str, counts: dict[int, Counter], log_every: int) -> dict[str, Any]:
    log_steps = {s for s in counts if s % log_every == 0 or s == max(counts)}
    other = [sum(c.values()) for s, c in counts.items() if s not in log_steps]
    logged = [sum(c.values()) for s, c in counts.items() if s in log_steps]
    kinds = sum(counts.values(), Counter())
    return {
        "path": path,
        "steps": len(counts),
        "max_other": max(other, default=0),
        "max_log": max(logged, default=0),
        "total": sum(kinds.values()),
        "kinds": dict(kinds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", default="runs/benchmarks/host_waits.md")
    args = parser.parse_args(argv)
    from engine.logs import configure_logging

    configure_logging()  # the runs' console lines, as lxmert-pretrain shows them
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            rows.append(summarise(path, count_run(path, Path(tmp), args.steps, args.log_every), args.log_every))
    for r in rows:
        r["by_kind"] = ", ".join(f"{k} {n}" for k, n in sorted(r["kinds"].items())) or "-"
    columns = "path; max_other=max on a step without a log line; max_log=max on a log step; total; by_kind=by kind"
    harness.write_summary(
        args.out,
        [
            f"# Host waits per training step ({args.steps} steps, a log line every {args.log_every})",
            "",
            "Counted by benchmarks/host_waits.py on the CPU (a count, not a timing: it holds on any device).",
            "",
            "flash: bf16 on benchmarks/flash_standin.py's float64 stand-in for flash-attn (one launch a call, as",
            "flash-attn's kernel), with the unpadding the loader finds on the host; no GPU has run the real one.",
            "",
            harness.markdown_table(rows, columns),
            "",
            "zero1 / zero2: bf16, one process, DeepSpeed's overflow check off (`bf16.check_grad_overflow` false,",
            "engine/config.py deepspeed_config); the engine's gradient-norm read waits for the log line. The one wait",
            "left a step is DeepSpeed's: with gradient clipping on, ZeRO-1/2's `unscale_and_clip_grads` reads",
            "`is_invalid_grad_norm(clip_norm)` (deepspeed 0.19.8 runtime/zero/stage_1_and_2.py:3203 ->",
            "runtime/utils.py:233, `bool(...any())`), and no configuration option skips it.",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
