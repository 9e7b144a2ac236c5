"""The pre-training loop: the Trainer owns data, model, optimizer, precision, checkpoints and logs.

    trainer = Trainer(load_config("configs/tiny_cpu.yaml"))
    summary = trainer.train()          # until train.max_steps or train.epochs; resumes per train.resume

Two paths with the same semantics (global batch = micro x accumulation x ranks, clipping, one schedule step
per optimizer step, a non-finite step skipped and logged, never applied):
- DeepSpeed (deepspeed.initialize with our optimizer and LambdaLR, config from engine.config.deepspeed_config):
  when DeepSpeed imports and train.zero_stage > 0 or a launcher started us (WORLD_SIZE set).
- plain PyTorch, one process (debugging, machines without DeepSpeed): autocast for bf16 / fp16, and for fp16
  torch.amp.GradScaler's dynamic loss scaling.

Each optimizer step times the wait for data, forward+backward, and the optimizer; every train.log_every steps a
JSON line goes to <output_dir>/metrics.jsonl (engine/metrics_log.py) with the loss components, lr, gradient
norm, loss scale, samples/s, tokens/s (text tokens + regions, padding included), TFLOP/s and MFU (engine/flops.py,
model FLOPs of this rank over this rank's peak; null where the peak is unknown, e.g. the CPU), the share of
time spent waiting for data and peak memory. The host syncs once per step (the gradient norm decides a skip).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

from engine import checkpoint as ckpt
from engine.config import RunConfig, deepspeed_config, resolve, save_config
from engine.data.batch import PretrainBatch
from engine.data.loaders import make_loader
from engine.data.sampling import SamplingConfig
from engine.flops import mfu, peak_flops, step_flops
from engine.metrics_log import MetricsLog, console_line, peak_memory_gib
from engine.optim import make_optimizer, make_scheduler
from lxmert.pretraining import LxmertForPreTraining

BUCKET_BATCHES = 100  # data.length_bucketing: sort by length within windows of this many global batches


def launch_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment (deepspeed, torchrun); 0, 0, 1 alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, int(os.environ.get("LOCAL_RANK", str(rank))), world


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def _precision_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def optimizer_step(model, optimizer, scheduler, scaler, clip: float) -> tuple[float, bool]:
    """Unscale, clip, step unless the gradient is non-finite, schedule: (gradient norm before clipping, skipped).

    The plain (non-DeepSpeed) step of pre-training and fine-tuning alike.
    """
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    else:
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    skipped = not math.isfinite(norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips by itself when it found inf/nan
        scaler.update()
    elif not skipped:
        optimizer.step()
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


class Trainer:
    """Builds everything from a RunConfig; `train()` runs the loop and returns a summary dict."""

    def __init__(self, config: RunConfig, use_deepspeed: bool | None = None, export_hf: bool = False) -> None:
        self.rank, self.local_rank, world = launch_env()
        if use_deepspeed is None:
            use_deepspeed = deepspeed_available() and (config.train.zero_stage > 0 or "WORLD_SIZE" in os.environ)
        if not use_deepspeed and world > 1:
            raise RuntimeError(f"WORLD_SIZE={world} needs the DeepSpeed path (pip install deepspeed)")
        self.use_deepspeed = use_deepspeed
        self.world_size = world
        self.config = resolve(config, world)
        self.export_hf = export_hf
        t = self.config.train
        self.output_dir = Path(t.output_dir)
        self.device = self._pick_device()
        if self.rank == 0:
            save_config(self.config, self.output_dir / "config.yaml")

        torch.manual_seed(t.seed)  # initialisation, then dropout
        self.model = LxmertForPreTraining(self.config.model).to(self.device)
        self.loader = self._make_loader()
        self.accum = t.grad_accum_steps
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"an epoch has {len(self.loader)} micro batches, fewer than grad_accum_steps {self.accum}")
        self.total_steps = t.total_steps(self.steps_per_epoch)
        self.optimizer = make_optimizer(self.model, self.config.optim)
        self.scheduler = make_scheduler(self.optimizer, self.config.optim, self.total_steps)
        self.autocast_dtype = _precision_dtype(t.precision)
        self.engine = None
        if use_deepspeed:
            self._init_deepspeed()
            self.scaler = None
        else:
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.step = 0  # optimizer steps done (skipped ones included, as DeepSpeed counts them)
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []  # every logged record
        self.last_checkpoint: Path | None = None
        self._resume()

    # ------------------------------------------------------------------------------------------- building

    def _pick_device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _make_loader(self):
        c, d = self.config, self.config.data
        sampling = SamplingConfig(
            seed=d.seed, batch_size=c.train.micro_batch_size, world_size=self.world_size, rank=self.rank,
            bucket_batches=BUCKET_BATCHES if d.length_bucketing else 0, word_mask_prob=d.word_mask_prob,
            region_mask_prob=d.region_mask_prob, negative_prob=d.negative_prob, vocab_size=c.model.vocab_size,
            sources=tuple(d.sources),
        )  # fmt: skip
        options: dict[str, Any] = {}
        if d.loader in ("torch", "dali"):
            options["num_workers"] = d.num_workers
        return make_loader(d.loader, d.train.text, d.train.features, sampling, device=self.device, **options)

    def _init_deepspeed(self) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        ds_config = deepspeed_config(self.config, self.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config
        )

    # -------------------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        path = ckpt.resolve_resume(self.config.train.resume, self.output_dir)
        if path is None:
            return
        if self.use_deepspeed:
            state = ckpt.load_deepspeed(self.engine, path, self.rank)
        else:
            state = ckpt.load_plain(path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        if "rng" in state:
            ckpt.set_rng_state(state["rng"])
        self.last_checkpoint = path
        self._print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        client = {"loader": self.loader.state_dict(), "step": self.step, "skipped_steps": self.skipped_steps}
        if self.use_deepspeed:
            path = ckpt.save_deepspeed(self.engine, self.output_dir, self.step, client, self.rank)
        else:
            state = {
                **client, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(), "config": dataclasses.asdict(self.config),
            }  # fmt: skip
            path = ckpt.save_plain(self.output_dir, self.step, state)
        self.last_checkpoint = path
        return path

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU (ZeRO-3 gathers the shards)."""
        if self.use_deepspeed and self.config.train.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective; None on ranks > 0
            if state is None:
                return {}
        else:
            state = (self.engine.module if self.engine is not None else self.model).state_dict()
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}

    def export(self) -> Path | None:
        state = self.consolidated_state_dict()
        if self.rank != 0:
            return None
        return ckpt.export_model(state, self.config.model, self.output_dir, hf=self.export_hf)

    # ---------------------------------------------------------------------------------------------- loop

    def _micro_batches(self) -> Iterator[PretrainBatch]:
        """Micro batches from the loaded position on, epoch after epoch."""
        for epoch in range(self.loader.epoch, self.config.train.epochs):
            self.loader.set_epoch(epoch)
            yield from self.loader

    def _autocast(self):
        if self.use_deepspeed or self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_backward(self, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.use_deepspeed:
            if self.autocast_dtype is not None:  # DeepSpeed cast the model; the features follow
                batch = batch.to(self.device, float_dtype=self.autocast_dtype)
            out = self.engine(**batch.model_inputs())
            self.engine.backward(out.loss)  # DeepSpeed divides by the accumulation steps itself
            self.engine.step()  # an optimizer step only at the accumulation boundary
        else:
            with self._autocast():
                out = self.model(**batch.model_inputs())
            self.scaler.scale(out.loss.float() / self.accum).backward()
        return out.loss.detach().float(), {k: v.detach().float() for k, v in out.losses.items()}

    def _optimizer_step(self) -> tuple[float, bool]:
        return optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.config.optim.grad_clip)

    def _loss_scale(self) -> float | None:
        if self.use_deepspeed:
            scale = getattr(self.engine.optimizer, "cur_scale", None)
            return float(scale) if scale is not None and self.config.train.precision == "fp16" else None
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        precision = self.config.train.precision
        dtype = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        return peak_flops(torch.cuda.get_device_name(self.device), dtype)

    def _print(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def train(self) -> dict[str, Any]:
        t = self.config.train
        save_every = t.save_every or self.steps_per_epoch
        log = MetricsLog(self.output_dir, enabled=self.rank == 0, progress_total=self.total_steps,
                         progress_initial=self.step)  # fmt: skip
        self.model.train()
        peak = self._peak()
        micro = self._micro_batches()
        window = defaultdict(float)  # sums since the last log line
        window_start = time.perf_counter()
        first: dict[str, float] | None = None
        last: dict[str, float] | None = None
        started_at = self.step
        run_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                loss_sum = torch.zeros((), device=self.device)
                parts_sum: dict[str, torch.Tensor] = {}
                wait = 0.0
                flops = 0
                tokens = 0
                samples = 0
                got = 0
                for _ in range(self.accum):
                    tick = time.perf_counter()
                    batch = next(micro, None)
                    wait += time.perf_counter() - tick
                    if batch is None:
                        break
                    got += 1
                    loss, parts = self._forward_backward(batch)
                    loss_sum += loss / self.accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / self.accum
                    b, length = batch.input_ids.shape
                    regions = batch.visual_feats.shape[1]
                    masked_tokens = int((batch.labels >= 0).sum())
                    masked_regions = int((batch.obj_labels["feat"][1] != 0).sum()) if "feat" in batch.obj_labels else 0
                    flops += step_flops(self.config.model, "pretrain", b, length, regions, masked_tokens,
                                        masked_regions).total  # fmt: skip
                    tokens += b * (length + regions)
                    samples += b
                if got < self.accum:  # the data ran out (epochs done) mid-step: nothing more to apply
                    if got:
                        self._zero_grad()
                    break
                norm, skipped = self._ds_step_info() if self.use_deepspeed else self._optimizer_step()
                if self.world_size > 1:  # log the global batch's loss, not rank 0's share of it
                    loss_sum, parts_sum = self._mean_over_ranks(loss_sum, parts_sum)
                self.step += 1
                self.skipped_steps += int(skipped)
                losses = {k: float(v) for k, v in parts_sum.items()}
                total = float(loss_sum)
                first = first or {"loss": total, **losses}
                last = {"loss": total, **losses}
                window["steps"] += 1
                window["wait"] += wait
                window["flops"] += flops
                window["tokens"] += tokens
                window["samples"] += samples
                window["skipped"] += int(skipped)
                log.advance(1)
                if skipped:
                    log.console(f"step {self.step}: non-finite gradient (norm {norm}): step skipped, not applied")
                if self.step % t.log_every == 0 or self.step == self.total_steps or skipped:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    elapsed = max(now - window_start, 1e-9)
                    achieved = window["flops"] / elapsed  # this rank's model FLOP/s
                    record = {
                        "step": self.step, "total_steps": self.total_steps,
                        "epoch": self.loader.epoch + self.loader.step / max(len(self.loader), 1),
                        "loss": total, "losses": losses, "lr": self._lr(), "grad_norm": norm,
                        "loss_scale": self._loss_scale(), "skipped": skipped, "skipped_steps": self.skipped_steps,
                        "samples_per_s": window["samples"] * self.world_size / elapsed,
                        "tokens_per_s": window["tokens"] * self.world_size / elapsed,
                        "tflops": achieved / 1e12,
                        "mfu": mfu(window["flops"], elapsed, peak) if peak else None,
                        "data_wait_share": window["wait"] / elapsed,
                        "peak_memory_gib": peak_memory_gib(self.device),
                        "step_time_s": elapsed / window["steps"],
                    }  # fmt: skip
                    self.history.append(record)
                    log.write(record)
                    log.console(console_line(record))
                    window = defaultdict(float)
                    window_start = time.perf_counter()
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
            if self.step > started_at or self.last_checkpoint is None:
                self.save()
            model_path = self.export()
        finally:
            log.close()
        seconds = time.perf_counter() - run_start
        done = self.step - started_at
        summary = {
            "steps": self.step, "steps_this_run": done, "skipped_steps": self.skipped_steps,
            "first": first, "last": last, "seconds": seconds,
            "samples_per_s": done * self.config.train.batch_size / seconds if seconds > 0 else None,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "model": str(model_path) if model_path else None,
        }  # fmt: skip
        return summary

    def _mean_over_ranks(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """The step's loss and components averaged over the ranks (every rank computes the same keys)."""
        import torch.distributed as dist

        names = sorted(parts)
        packed = torch.stack([loss.float().reshape(()), *(parts[k].float().reshape(()) for k in names)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed /= self.world_size
        return packed[0], {k: packed[i + 1] for i, k in enumerate(names)}

    def _zero_grad(self) -> None:
        if not self.use_deepspeed:
            self.optimizer.zero_grad(set_to_none=True)

    def _ds_step_info(self) -> tuple[float, bool]:
        """After the accumulation boundary's engine.step(): the norm DeepSpeed measured, and whether it skipped."""
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        skipped = self.engine.skipped_steps > self.skipped_steps
        return norm, skipped
