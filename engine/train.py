"""The one training loop: every task (engine/tasks: pre-training, VQA / GQA, NLVR2) is stepped, logged,
evaluated, checkpointed and resumed by it in the same way.

    config = load_config("configs/tiny_cpu.yaml")
    trainer = Trainer(config, make_task(config))     # engine.tasks.make_task: the task train.task names
    summary = trainer.train()          # until train.max_steps or train.epochs; resumes per train.resume

A task sees the run only through a TaskContext (engine/context.py) that the Trainer builds for each call into it;
this module and engine/tasks/ never import each other.

TrainStep.forward_backward (one micro batch) -> TrainStep.train_step (train.grad_accum_steps micro batches, one
optimizer step; the Trainer holds one as trainer.train_step and calls it) -> Trainer.train (the steps, with logs,
evaluations and checkpoints). The runtime (engine/runtime.py) steps the model on one of two paths with the same
semantics (DeepSpeed when it is installed and train.zero_stage > 0 or a launcher started us; plain PyTorch
otherwise: engine/launch.py): global batch = micro x accumulation x ranks, clipping, one schedule step per
optimizer step, a non-finite step skipped and logged. The config is resolved once, here.

Every train.log_every steps a train record (engine/records.py's TrainRecord) goes to <output_dir>/metrics.jsonl
(engine/metrics_log.py) and to the console (Python logging: engine/logs.py), the same fields for every task: the
loss (and its components where the model has them), lr, gradient norm, loss scale, samples/s, tokens/s (text tokens
+ regions, padding included), TFLOP/s and MFU (engine/flops.py model FLOPs of this rank over this rank's peak; null
where the peak is unknown, e.g. the CPU), the share of time spent waiting for data, peak memory, this rank's
threads and the time left; "skipped" says whether a step since the last record had a non-finite gradient. The
trackers train.report_to names (TensorBoard, W&B) get the same train and eval records; one that is not installed
stops the run before anything is written. On the plain path a step that does not log never waits for the device:
the loader hands over the masked rows and counts, the losses and the gradient norm stay on the device (read_step
reads them at a log step, in one copy) and the optimizer takes the non-finite decision there (Runtime.settle reads
the skips at log lines and checkpoints). benchmarks/host_waits.py counts the waits; tests/test_host_waits.py keeps
them at 0.

Evaluation (an eval split set): every train.eval_every steps (0: at the end of every epoch) and at the end, as
{"kind": "eval", ...} records (the task decides what is measured). Checkpoints every train.save_every steps (0:
every epoch), at every epoch's end and at the end, holding the loader's position, the step, the evaluations and
the task's state; a restarted run writes {"kind": "resume", ...} and goes on from the newest. At the end, the
task's outputs (exports) and the loss / throughput plots (engine/plots.py) in <output_dir>/plots/.

Stopping early (engine/stopping.py has the exit statuses): SIGTERM, ^C and train.preempt_signal only set a flag;
at each step boundary before the last step (after that step's evaluation) the ranks agree whether to stop, with
rank 0's clock adding train.time_limit (a one-integer all-reduce in host memory, never a device wait; nothing at
all in one process). A stop writes the stop step's train record if it had none, saves a checkpoint there, writes
{"kind": "stop", ...} and returns a RunSummary with `stopped` (its line, its exit status): no plots, no exports. A run
whose last train.max_skipped_steps steps were all skipped stops the same way, noticed at a log step (the streak
and the last applied step's loss are kept on the device and read with the log line's values).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from engine import checkpoint as ckpt
from engine.config import (
    ARCHITECTURE,
    ConfigError,
    RunConfig,
    StorePaths,
    format_config,
    load_config,
    resolve,
    save_config,
    to_dict,
)
from engine.context import TaskContext
from engine.flops import mfu, peak_flops
from engine.launch import Launch, all_reduce_sum, choose_deepspeed, error_line, pick_device, set_threads
from engine.logs import configure_logging
from engine.metrics_log import MetricsLog, WandbRun, check_trackers, console_line, peak_memory_gib
from engine.output_dir import WEIGHTS_KEYS, RunError, RunLock, flatten, resume_conflicts, set_aside, write_failure
from engine.records import EvalRecord, RunSummary, TrainRecord
from engine.runtime import Runtime, resume_point
from engine.stopping import (
    EXIT_DIVERGED,
    SIGINT_CODE,
    TIME_LIMIT,
    StopRequests,
    TimeLimit,
    agree,
    agreement_group,
    reason_name,
    status_of,
)

WEIGHTS = "weights:"  # train.resume=weights:<checkpoint>: its weights, a new optimizer, schedule and loader
logger = logging.getLogger(__name__)


def write_run_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    """engine.plots.write_plots, never failing a finished run: a problem is logged (a warning) and the run goes
    on."""
    try:
        from engine.plots import write_plots

        return write_plots(metrics_path, out_dir)
    except Exception as error:  # the run's results are written; a plot is a convenience
        logger.warning(f"plots not written: {type(error).__name__}: {error}")
        return []


def _mark(clock: Any, phase: str) -> None:
    if clock is not None:
        clock.mark(phase)


class TrainStep:
    """One optimizer step of the engine: the Trainer's (trainer.train_step), and what benchmarks.throughput times
    (the same code, so its samples/s are what the loop achieves, per-micro-batch bookkeeping included). `task` is
    anything with flops(batch) and tokens(batch) (engine/tasks/base.py's Task)."""

    def __init__(self, runtime: Runtime, task: Any, accum: int, world_size: int, device: torch.device) -> None:
        self.runtime, self.task, self.accum, self.world_size, self.device = runtime, task, accum, world_size, device

    def __call__(self, micro: Iterator[Any], clock: Any = None) -> dict[str, Any] | None:
        return self.train_step(micro, clock)  # looked up on the instance: a test or benchmark may wrap it

    def inputs(self, batch: Any) -> Any:
        """DeepSpeed casts the model to the training precision; the floating-point inputs follow."""
        if self.runtime.input_dtype != torch.float32:
            batch = batch.to(self.device, float_dtype=self.runtime.input_dtype)
        return batch

    def forward_backward(self, batch: Any, clock: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro batch: the loss and its components (detached, fp32) after accumulating its gradient."""
        if self.runtime.compiled:  # a new iteration for CUDA graphs (mode or backend): no-op otherwise
            torch.compiler.cudagraph_mark_step_begin()
        out = self.runtime.forward(**self.inputs(batch).model_inputs())
        _mark(clock, "forward")
        self.runtime.backward(out.loss)
        _mark(clock, "backward")
        parts = getattr(out, "losses", None) or {}
        return out.loss.detach().float(), {k: v.detach().float() for k, v in parts.items()}

    def optimizer_step(self) -> tuple[float, bool]:
        return self.runtime.step()

    def train_step(self, micro: Iterator[Any], clock: Any = None) -> dict[str, Any] | None:
        """train.grad_accum_steps micro batches and the optimizer step; None when the data ran out first.
        `clock` (benchmarks.harness.StepClock) marks the phases: data, forward, backward, optimizer.

        loss, losses, grad_norm and skipped are 0-dim tensors left on the device: the step never waits for it
        (read_step reads them, at log steps); wait, flops, tokens and samples are host numbers."""
        loss_sum = torch.zeros((), device=self.device)
        parts_sum: dict[str, torch.Tensor] = {}
        counts = {"wait": 0.0, "flops": 0, "tokens": 0, "samples": 0}
        got = 0
        for _ in range(self.accum):
            tick = time.perf_counter()
            batch = next(micro, None)
            counts["wait"] += time.perf_counter() - tick
            _mark(clock, "data")
            if batch is None:
                break
            got += 1
            loss, parts = self.forward_backward(batch, clock)
            loss_sum += loss / self.accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / self.accum
            counts["flops"] += self.task.flops(batch)
            counts["tokens"] += self.task.tokens(batch)
            counts["samples"] += batch.batch_size
        if got < self.accum:  # the data ran out (epochs done) mid-step: nothing more to apply
            if got:
                self.runtime.zero_grad()
            return None
        norm, skipped = self.optimizer_step()
        _mark(clock, "optimizer")
        if self.world_size > 1:  # log the global batch's loss, not this rank's share of it
            loss_sum, parts_sum = self._mean_over_ranks(loss_sum, parts_sum)
        return {"loss": loss_sum, "losses": parts_sum, "grad_norm": norm, "skipped": skipped, **counts}

    def _mean_over_ranks(
        self, loss: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and components averaged over the ranks (every rank computes the same keys, in the
        model's order, which the log keeps)."""
        names = list(parts)
        packed = torch.stack([loss.float().reshape(()), *(parts[k].float().reshape(()) for k in names)])
        all_reduce_sum(packed)
        packed /= self.world_size
        return packed[0], {k: packed[i + 1] for i, k in enumerate(names)}


def read_step(step: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """A train_step result's loss, components and gradient norm as floats, read from the device in one copy (with
    the 0-dim tensors of `extra`, returned as floats under "extra")."""
    names, extra_names = list(step["losses"]), list(extra or {})
    device = step["loss"].device
    values = [step["loss"], *(step["losses"][k] for k in names), step["grad_norm"], *(extra[k] for k in extra_names)]
    packed = torch.stack([v.detach().to(device, torch.float32).reshape(()) for v in values]).tolist()
    n = len(names)
    return {
        "loss": packed[0],
        "losses": dict(zip(names, packed[1 : n + 1])),
        "grad_norm": packed[n + 1],
        "extra": dict(zip(extra_names, packed[n + 2 :])),
    }


class Trainer:
    """Builds the run from a RunConfig and a task (engine/tasks: engine.tasks.make_task, or a CLI's); `train()`
    runs the loop and returns its RunSummary (engine/records.py). The task is asked through self.context(), never
    given the Trainer."""

    def __init__(self, config: RunConfig, task: Any, use_deepspeed: bool | None = None) -> None:
        self.launch = Launch.from_env()
        self.rank, self.local_rank, world = self.launch.rank, self.launch.local_rank, self.launch.world_size
        self.use_deepspeed = choose_deepspeed(config.train.zero_stage, use_deepspeed, self.launch)
        self.world_size = world
        self.config = resolve(config, world)
        self.task = task
        self.task.config = self.config
        t = self.config.train
        self.output_dir = Path(t.output_dir)
        self.device = pick_device(self.local_rank)
        self.threads = set_threads(t.threads, self.launch)
        # what the context reads before _start builds it
        self.resume_from: Path | None = None
        self.runtime: Runtime | None = None
        self.train_step: TrainStep | None = None
        self.eval_loader: Any = None
        self.steps_per_epoch = 1
        self.step = 0  # optimizer steps done (skipped ones included, as DeepSpeed counts them)
        self.started_at = 0
        self.evals: list[dict[str, Any]] = []  # every evaluation record
        self.task.check(self.context())  # every input, before anything is built or written
        if not self.task.evaluate_only:
            check_trackers(t.report_to)  # every rank: one that is missing stops them all here, rank 0 says it
        # one run per output directory (engine/output_dir.py): rank 0 holds the lock, the other ranks learn of it
        lock = RunLock.take(self.output_dir, self.rank, report=self._log)
        self._unlock = weakref.finalize(self, lock.release) if lock else None  # also when the Trainer is collected
        try:
            self._start()
        except BaseException:
            self.release_output_dir()
            raise

    def _start(self) -> None:
        """The run from its checked inputs, under the output directory's lock: where it resumes (checked against
        the checkpoint's config), the model, loaders and runtime, the resumed state, config.yaml."""
        t = self.config.train
        setting = self.task.resume_setting()
        self.resume_from, self.weights_only_resume = self._resume_point(setting)
        if self.resume_from is not None:
            self._check_resume(self.resume_from)
        if setting == "none" and self.rank == 0 and not self.task.evaluate_only:
            try:
                previous = set_aside(self.output_dir)  # a fresh start: an earlier run's files are kept, not mixed in
            except OSError as error:
                raise RunError(
                    write_failure(error, self.output_dir, "train.resume=none: moving the previous run")
                ) from None
            if previous is not None:
                self._log(f"train.resume=none: what {self.output_dir} held is now in {previous}")

        torch.manual_seed(t.seed)  # initialisation, then dropout
        self.model = self.task.build_model(self.context())
        self.loader = self.task.train_loader(self.context())
        self.eval_loader = self.task.eval_loader(self.context())
        self.accum = t.grad_accum_steps
        self.steps_per_epoch = len(self.loader) // self.accum if self.loader is not None else 1
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"data.train: an epoch has {len(self.loader)} micro batches, fewer than "
                f"train.grad_accum_steps {self.accum}"
            )
        self.total_steps = t.total_steps(self.steps_per_epoch)
        self.runtime = Runtime(self.model, self.config, self.total_steps, self.device, self.use_deepspeed, self.launch)
        self.train_step = TrainStep(self.runtime, self.task, self.accum, self.world_size, self.device)
        self.skipped_steps = 0
        self.unlogged_skips = 0  # skipped steps since the last train record
        self.history: list[dict[str, Any]] = []  # every train record, as metrics.jsonl got it (TrainRecord.to_json)
        self.last_checkpoint: Path | None = None
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.rank == 0 and not self.task.evaluate_only:  # only once everything the run reads has been checked
            save_config(self.config, self.output_dir / "config.yaml")

    @property
    def engine(self):
        """The DeepSpeed engine (None on the plain path)."""
        return self.runtime.engine

    def context(self) -> TaskContext:
        """The run as the task sees it now (engine/context.py): built afresh for every call into the task, so
        that its step, evaluations and ranks are those of the call."""
        return TaskContext(
            config=self.config,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            output_dir=self.output_dir,
            resume_from=self.resume_from,
            runtime=self.runtime,
            inputs=self.train_step.inputs if self.train_step is not None else None,
            eval_loader=self.eval_loader,
            steps_per_epoch=self.steps_per_epoch,
            step=self.step,
            started_at=self.started_at,
            evals=tuple(self.evals),
        )

    def _make_loader(self, stores: StorePaths, split: str = "train"):
        """Pre-training's loader of one split (tests build a rank's eval loader with it)."""
        return self.task.make_loader(self.context(), stores, split)

    # -------------------------------------------------------------------------------------- checkpoints

    def _resume_point(self, setting: str) -> tuple[Path | None, bool]:
        """(the checkpoint to load, whether for its weights only) from train.resume as the task reads it:
        "auto", "none", a path, or "weights:<checkpoint or run>" (a new optimizer, schedule and loader from that
        checkpoint's weights; once this run has a checkpoint of its own, a rerun resumes from that instead)."""
        if not setting.startswith(WEIGHTS):
            return resume_point(setting, self.output_dir), False
        source = setting[len(WEIGHTS) :]
        own = ckpt.checkpoint_root(self.output_dir).resolve()
        if Path(source).resolve() in (own, own.parent) or own in Path(source).resolve().parents:
            raise ConfigError(
                f"train.resume={setting}: that checkpoint is in this run's own train.output_dir "
                f"{self.output_dir}; a new schedule goes into a new train.output_dir (its checkpoints "
                "would mix with these)"
            )
        mine = resume_point("auto", self.output_dir)
        if mine is not None:
            return mine, False
        return resume_point(source, self.output_dir), True

    def _check_resume(self, path: Path) -> None:
        """Refuse, in one line naming each key with both values, a config that the checkpoint's run (its
        <run>/config.yaml) differs from where resume cannot absorb it (engine.output_dir.ABSORBED); a weights-only
        start (train.resume=weights:..., --evaluate-only) compares the architecture and the task. A checkpoint
        without its run's config.yaml is not checked."""
        run = path.parent.parent
        saved = run / "config.yaml"
        if not saved.is_file():
            return
        try:
            old = flatten(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(
                f"train.resume: cannot read {saved}, the config of the run that wrote {path}: {error}"
            ) from None
        new = flatten(to_dict(self.config))
        weights_only = self.weights_only_resume or self.task.evaluate_only
        only = (*(f"model.{name}" for name in ARCHITECTURE), *WEIGHTS_KEYS) if weights_only else None
        conflicts, stretched = resume_conflicts(old, new, only)
        if conflicts:
            if weights_only:
                what = f"train.resume={WEIGHTS}{path}" if self.weights_only_resume else f"{path} (evaluate-only)"
                raise ConfigError(
                    f"{what}: its weights do not fit this run: "
                    f"{'; '.join(conflicts)} (checkpoint's run {saved} -> this config)"
                )
            raise ConfigError(
                f"train.resume: {path} was written with settings a resume cannot take in: "
                f"{'; '.join(conflicts)} (its run's {saved} -> this config); to start a new "
                f"schedule from its weights use a new train.output_dir with "
                f"train.resume={WEIGHTS}{path}"
            )
        if stretched:
            self._log(f"resume: {'; '.join(stretched)}: the learning-rate schedule now spans the new total")

    def release_output_dir(self) -> None:
        """Drop this run's lock on its output directory (engine/output_dir.py); the CLIs call it at the end, and
        it happens anyway when the Trainer is collected or the process exits."""
        if self._unlock is not None:
            self._unlock()

    def _resume(self, path: Path) -> None:
        if self.weights_only_resume:  # train.resume=weights:...: a new schedule from the checkpoint's weights
            self.runtime.load(path, self.rank, weights_only=True)
            self._log(
                f"weights from {path}; a new optimizer, schedule and loader from step 0 (train.resume=weights:...)"
            )
            return
        state = self.runtime.load(path, self.rank, weights_only=self.task.evaluate_only)
        batch = self.config.train.batch_size
        if not self.task.evaluate_only and state.get("batch_size", batch) != batch:  # older checkpoints have none
            raise ConfigError(
                f"resume: {path} was written with train.batch_size {state['batch_size']}, this run has "
                f"{batch}: a resumed run keeps the global batch (the ranks may change)"
            )
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        if self.loader is not None:
            # a checkpoint from before the loaders kept fine-tuning's position: its step says where
            loader_state = state.get("loader") or {
                "epoch": self.step // self.steps_per_epoch,
                "step": (self.step % self.steps_per_epoch) * self.accum,
            }
            self.loader.load_state_dict(loader_state)
        self.evals = list(state.get("evals", []))
        self.task.load_state_dict(state, path)
        self.last_checkpoint = path
        self._log(f"resumed from {path} at step {self.step}")

    def _settle(self) -> None:
        """Read the steps skipped since the last settle (Runtime.settle: one device read) into the counts."""
        skipped = self.runtime.settle()
        self.skipped_steps += skipped
        self.unlogged_skips += skipped

    def save(self) -> Path:
        """A checkpoint of this step. A write that fails (a full disk, an unwritable directory) is a RunError in
        one line: the file, the bytes the checkpoint needs where known; the last complete checkpoint stays latest."""
        self._settle()
        client = {
            "loader": self.loader.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "batch_size": self.config.train.batch_size,
            "evals": self.evals,
            **self.task.state_dict(),
        }
        try:
            self.last_checkpoint = self.runtime.save(self.output_dir, self.step, client, self.rank)
        except OSError as error:
            line = write_failure(
                error,
                ckpt.checkpoint_root(self.output_dir),
                f"checkpoint {ckpt.tag_of(self.step)}",
                self._checkpoint_bytes(),
            )
            kept = f"{self.last_checkpoint} stays the latest" if self.last_checkpoint else "no earlier checkpoint"
            raise RunError(f"{line}; {kept}") from None
        return self.last_checkpoint

    def _checkpoint_bytes(self) -> int | None:
        """About what a checkpoint takes: the last one's parts, or the plain path's model and optimizer tensors."""
        if self.last_checkpoint is not None:
            try:
                return sum(part["bytes"] for part in ckpt.read_manifest(self.last_checkpoint)["parts"].values())
            except ckpt.CheckpointError:
                pass
        if self.use_deepspeed:
            return None
        tensors = [
            *self.model.state_dict().values(),
            *(v for s in self.runtime.optimizer.state_dict()["state"].values() for v in s.values()),
        ]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU (ZeRO-3 gathers the shards; {} on ranks > 0 then)."""
        return self.runtime.consolidated_state_dict()

    def _micro_batches(self) -> Iterator[Any]:
        """Micro batches from the loaded position on, epoch after epoch."""
        for epoch in range(self.loader.epoch, self.config.train.epochs):
            self.loader.set_epoch(epoch)
            yield from self.loader

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """The task's evaluation of the current model (every rank takes part)."""
        was_training = self.runtime.training
        self.runtime.train(False)
        try:
            return self.task.evaluate(self.context())
        finally:
            self.runtime.train(was_training)

    def _evaluate_and_log(self, log: MetricsLog) -> None:
        record = self.evaluate()
        self.evals.append(record)
        log.write(record)
        log.console(self.task.eval_line(record))
        self.task.after_evaluation(self.context(), record)

    def _eval_due(self, epoch_ended: bool) -> bool:
        every = self.config.train.eval_every
        if self.eval_loader is None:
            return False
        return (every > 0 and self.step % every == 0) or (every == 0 and epoch_ended)

    def _peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        precision = self.config.train.precision
        dtype = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        return peak_flops(torch.cuda.get_device_name(self.device), dtype)

    def _log(self, line: str) -> None:
        """A line the whole run says once: logged (INFO) on rank 0."""
        if self.rank == 0:
            logger.info(line)

    # ----------------------------------------------------------------------------------------------- loop

    def _record(
        self, step: dict[str, Any], window: dict[str, float], elapsed: float, peak: float | None, skipped: int
    ) -> TrainRecord:
        """The train record of a log step (step: read_step's floats; skipped: steps skipped since the last log
        line): the same fields for every task (module docstring)."""
        return TrainRecord(
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.loader.epoch + self.loader.step / max(len(self.loader), 1),
            loss=step["loss"],
            losses=step["losses"],
            lr=self.runtime.lr(),
            grad_norm=step["grad_norm"],
            loss_scale=self.runtime.loss_scale(),
            skipped=skipped > 0,
            skipped_steps=self.skipped_steps,
            samples_per_s=window["samples"] * self.world_size / elapsed,
            tokens_per_s=window["tokens"] * self.world_size / elapsed,
            tflops=window["flops"] / elapsed / 1e12,
            mfu=mfu(window["flops"], elapsed, peak) if peak else None,
            data_wait_share=window["wait"] / elapsed,
            peak_memory_gib=peak_memory_gib(self.device),
            threads=self.threads,
            step_time_s=elapsed / window["steps"],
            eta_s=elapsed / window["steps"] * (self.total_steps - self.step),
        )

    def _log_step(
        self,
        step: dict[str, Any],
        window: dict[str, float],
        elapsed: float,
        peak: float | None,
        log: MetricsLog,
        extra: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """A log line of `step`: its values read (with `extra`, in the same copy), the skips settled, the train
        record written and logged. Returns read_step's values."""
        values = read_step(step, extra)
        self._settle()
        skipped, self.unlogged_skips = self.unlogged_skips, 0
        if skipped:
            log.console(
                f"step {self.step}: {skipped} of the last {int(window['steps'])} steps had a non-finite "
                "gradient: skipped, not applied"
            )
        record = self._record(values, window, max(elapsed, 1e-9), peak, skipped).to_json()
        self.history.append(record)
        log.write(record)
        log.console(console_line(record))
        log.advance(0, samples_per_s=record["samples_per_s"])
        return values

    def _diverged(self, values: dict[str, Any]) -> dict[str, Any] | None:
        """The stop of a run that only skips steps (train.max_skipped_steps), from a log step's values: None to go on.
        The plain path decides skips on the device, so the streak is read with the log line's values: the stop comes
        at the first log step that finds the limit reached (at most train.log_every - 1 steps late)."""
        limit, streak = self.config.train.max_skipped_steps, int(values["extra"]["skip_streak"])
        if not limit or streak < limit:
            return None
        applied, loss = self.step - streak, values["extra"]["applied_loss"]
        last = f"last finite loss {loss:.4f} at step {applied}"
        if not math.isfinite(loss):  # no step of this run was applied
            last = f"none applied since step {applied}"
        return {
            "reason": "diverged",
            "status": EXIT_DIVERGED,
            "line": (
                f"stopped at step {self.step}: the last {streak} steps had a non-finite gradient (train.max_skipped_steps "  # noqa: E501
                f"{limit}); {last}: checkpoint {{checkpoint}} (the weights of step {applied})"
            ),
        }

    def _requested_stop(self, requests: StopRequests, clock: TimeLimit, group: Any) -> dict[str, Any] | None:
        """A stop the ranks agree on at this step boundary (a signal on any rank, or rank 0's clock): None to go on."""
        code = requests.code or (TIME_LIMIT if self.rank == 0 and clock.due() else 0)
        code = agree(code, group)
        if not code:
            return None
        preempt = self.config.train.preempt_signal
        reason = reason_name(code, preempt)
        if code == SIGINT_CODE:
            line = f"interrupted (^C) at step {self.step}: checkpoint {{checkpoint}}; the same command resumes it"
        elif code == TIME_LIMIT:
            line = (
                f"stopped at step {self.step} by train.time_limit {self.config.train.time_limit}: checkpoint "
                "{checkpoint}; the same command resumes it"
            )
        else:
            line = f"preempted at step {self.step}: checkpoint {{checkpoint}} ({reason}); the same command resumes it"
        return {"reason": reason, "status": status_of(code), "line": line}

    def train(self) -> RunSummary:
        """The loop (module docstring). A stop before the end (a signal, train.time_limit, train.max_skipped_steps)
        saves a checkpoint at the step it happens and returns a summary with `stopped` (reason, exit status, the
        one line to print); the end of the run (final evaluation, checkpoint, export) is not interrupted by signals:
        they are asked for at step boundaries before the last step."""
        t = self.config.train
        save_every = t.save_every or self.steps_per_epoch
        log = MetricsLog(
            self.output_dir,
            enabled=self.rank == 0,
            progress_total=self.total_steps,
            progress_initial=self.step,
            report_to=t.report_to,
            wandb=WandbRun(
                project=t.wandb_project,
                name=t.wandb_name,
                dir=t.wandb_dir,
                config=to_dict(self.config),
                resume=self.last_checkpoint is not None,
            ),
        )
        if self.last_checkpoint is not None and self.step < self.total_steps:
            log.write({"kind": "resume", "step": self.step, "checkpoint": str(self.last_checkpoint)})
        self.task.start(self.context(), resumed=self.last_checkpoint is not None)
        self.runtime.train(True)
        peak = self._peak()
        micro = self._micro_batches()
        window: dict[str, float] = defaultdict(float)  # sums since the last log line
        window_start = time.perf_counter()
        run: dict[str, Any] = {"first": None, "last": None}
        self.started_at = self.step
        run_start = time.perf_counter()
        eval_seconds = 0.0
        streak = SkipStreak()
        clock = TimeLimit(t.time_limit)
        group = agreement_group(self.world_size)
        stop: dict[str, Any] | None = None
        requests = StopRequests(t.preempt_signal)
        requests.install()
        status = 1  # the trackers' record of how the run ended: 1 unless it gets to the end of the try
        try:
            while self.step < self.total_steps:
                step = self.train_step(micro)
                if step is None:
                    break
                self.step += 1
                streak.update(step)
                run["first"] = run["first"] or step  # device tensors: read at the end
                run["last"] = step
                window["steps"] += 1
                for name in ("wait", "flops", "tokens", "samples"):
                    window[name] += step[name]
                logged = self.step % t.log_every == 0 or self.step == self.total_steps
                if logged:  # the only reads of the device
                    values = self._log_step(
                        step, window, time.perf_counter() - window_start, peak, log, streak.values()
                    )
                    window = defaultdict(float)
                    window_start = time.perf_counter()
                    stop = self._diverged(values)
                log.advance(1)
                epoch_ended = self.step % self.steps_per_epoch == 0
                if stop is None and self.step < self.total_steps and self._eval_due(epoch_ended):
                    tick = time.perf_counter()
                    self._evaluate_and_log(log)
                    eval_seconds += time.perf_counter() - tick
                    window_start += time.perf_counter() - tick  # evaluation time is not training throughput
                clock.boundary()
                if stop is None and self.step < self.total_steps:
                    stop = self._requested_stop(requests, clock, group)
                if stop is not None:
                    if not logged:  # the stop step's record, so that the log reaches the checkpoint
                        self._log_step(step, window, time.perf_counter() - window_start, peak, log, {})
                    break
                if self.step < self.total_steps and (self.step % save_every == 0 or epoch_ended):
                    tick = time.perf_counter()
                    self.save()
                    clock.saved(time.perf_counter() - tick)
            if stop is not None:
                stop["line"] = stop["line"].format(checkpoint=self.save())
                log.write(
                    {
                        "kind": "stop",
                        "step": self.step,
                        "reason": stop["reason"],
                        "status": stop["status"],
                        "checkpoint": str(self.last_checkpoint),
                    }
                )
            else:
                if self.eval_loader is not None and self.step > self.started_at:
                    tick = time.perf_counter()
                    self._evaluate_and_log(log)  # the final model's evaluation, before the last checkpoint
                    eval_seconds += time.perf_counter() - tick
                if self.step > self.started_at or self.last_checkpoint is None:
                    self.save()
                self._settle()
                for end in ("first", "last"):
                    if run[end] is not None:
                        values = read_step(run[end])
                        run[end] = {"loss": values["loss"], **values["losses"]}
                run |= self.task.finish(self.context())
            status = 0 if stop is None else stop["status"]
        finally:
            requests.restore()
            log.close(status)
        seconds = time.perf_counter() - run_start
        done = self.step - self.started_at
        summary = RunSummary(
            steps=self.step,
            steps_this_run=done,
            skipped_steps=self.skipped_steps,
            seconds=seconds,
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            metrics_log=str(log.path),
        )
        if stop is not None:  # no plots or task outputs: the run is not over, and a scheduler is waiting
            return dataclasses.replace(summary, stopped=stop)
        plots = write_run_plots(log.path, self.output_dir / "plots") if self.rank == 0 else []
        train_seconds = seconds - eval_seconds  # checkpoints and the export included
        return dataclasses.replace(
            summary,
            eval_seconds=eval_seconds,
            samples_per_s=done * self.config.train.batch_size / train_seconds if train_seconds > 0 else None,
            plots=[str(p) for p in plots],
            task=self.task.summary(self.context(), run),
        )


class SkipStreak:
    """Consecutive skipped steps and the loss of the last applied step, kept on the device: updated every step
    without a host wait, read with a log line's values (train.max_skipped_steps)."""

    def __init__(self) -> None:
        self.streak: torch.Tensor | None = None
        self.applied_loss: torch.Tensor | None = None

    def update(self, step: dict[str, Any]) -> None:
        loss = step["loss"]
        skipped = step["skipped"].to(loss.device)  # DeepSpeed's decision is a host tensor
        if self.streak is None:
            self.streak = torch.zeros((), dtype=torch.int64, device=loss.device)
            self.applied_loss = torch.full((), math.nan, device=loss.device)
        self.streak = torch.where(skipped, self.streak + 1, 0)
        self.applied_loss = torch.where(skipped, self.applied_loss, loss.float())

    def values(self) -> dict[str, torch.Tensor]:
        return {"skip_streak": self.streak, "applied_loss": self.applied_loss}


# -------------------------------------------------------------------------------------------- the report


def training_cli(
    prog: str,
    description: str,
    argv: list[str] | None,
    build: Callable[[RunConfig, argparse.Namespace], Trainer],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    preface: Callable[[Trainer], list[str]] | None = None,
    instead: Callable[[Trainer, argparse.Namespace], int | None] | None = None,
) -> int:
    """The body of lxmert-pretrain and lxmert-finetune. Arguments: --config, the CLI's own `options`, the
    section.field=value overrides (and the deepspeed launcher's --local_rank); `build` makes the Trainer from the
    config and the arguments. Console lines go through logging (engine/logs.py: configured here, rank 0 at INFO).
    Rank 0 logs the resolved config and `preface`'s lines; then `instead` may take the run (fine-tuning's
    --evaluate-only: its exit status), else the run trains and rank 0 logs its report. Exit
    status: 0, a stop's (engine/stopping.py: 75 preempted or out of time, 130 ^C, 3 only skipping steps), or 2 with
    one line for a user's failure (a config or run error, a write of the run's outputs that failed). The output
    directory's lock is released either way."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="a recipe YAML (configs/)")
    if options is not None:
        options(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        configure_logging()  # the launcher's rank (a srun without MASTER_ADDR is a ConfigError)
        trainer = build(load_config(args.config, args.overrides), args)
    except (ConfigError, RunError) as error:
        return error_line(prog, error)
    try:
        if trainer.rank == 0:
            for line in [format_config(trainer.config), *(preface(trainer) if preface else [])]:
                logger.info(line)
        status = instead(trainer, args) if instead is not None else None
        if status is not None:
            return status
        summary = trainer.train()
        if trainer.rank == 0:
            logger.info(report(summary))
        return summary.exit_status
    except (ConfigError, RunError) as error:
        return error_line(prog, error)
    except OSError as error:
        return error_line(prog, write_failure(error, trainer.output_dir, "writing the run's outputs"))
    finally:
        trainer.release_output_dir()


def report(summary: RunSummary) -> str:
    """The console report of a run's summary, for every task: steps, losses, throughput, evaluations, paths; for a
    run stopped early, its one line."""
    if summary.stopped is not None:
        return summary.stopped["line"]
    task = summary.task
    lines = [
        f"done: {summary.steps} steps ({summary.steps_this_run} in this run, "
        f"{summary.skipped_steps} skipped) in {summary.seconds:.1f} s"
    ]
    if "task" in task:
        epochs = task["epochs"]
        lines[0] = f"fine-tuned {task['task']}: {epochs} epoch{'' if epochs == 1 else 's'}, " + lines[0]
    first, last = task.get("first"), task.get("last")
    if first is None and task.get("first_loss") is not None:
        first, last = {"loss": task["first_loss"]}, {"loss": task["last_loss"]}
    if first and last:
        lines.append(f"  train loss {'first':>10} {'last':>10}")
        for name in first:
            lines.append(f"  {name:<10} {first[name]:>10.4f} {last.get(name, float('nan')):>10.4f}")
    if summary.samples_per_s:
        lines.append(f"  samples/s {summary.samples_per_s:.1f}")
    evaluation = task.get("eval")
    if isinstance(evaluation, dict):  # pre-training: the last validation
        last_eval = EvalRecord.from_json(evaluation)
        e = last_eval.values
        parts = " ".join(f"{k} {v:.4f}" for k, v in e["losses"].items())
        qa = e["qa_accuracy"]
        lines.append(
            f"  eval (step {last_eval.step}, {e['samples']} samples): loss {e['loss']:.4f}"
            f" ({parts}); QA accuracy {'-' if qa is None else f'{qa:.4f}'}; matching accuracy "
            f"{e['matched_accuracy']:.4f}"
        )
    for e in map(EvalRecord.from_json, evaluation if isinstance(evaluation, list) else []):  # fine-tuning's epochs
        shown = "- (unlabelled split)" if e.values["metric"] is None else f"{e.values['metric']:.4f}"
        lines.append(f"  eval epoch {e.values['epoch']}: {task['metric']} {shown}")
    if task.get("best_metric") is not None:
        lines.append(f"  best {task['metric']} {task['best_metric']:.4f} (epoch {task['best_epoch']})")
    if task.get("init"):
        lines.append("  init: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in task["init"].items()))
    paths = {"checkpoint": summary.checkpoint, **{k: task[k] for k in ("model", "submission") if k in task}}
    for label, path in (*paths.items(), ("log", summary.metrics_log), *(("plot", p) for p in summary.plots)):
        lines.append(f"  {label:<10} {path}")
    return "\n".join(lines)
