"""How a model is stepped, for every task the training loop (engine/train.py) runs: pre-training and fine-tuning.

    runtime = Runtime(model, config, total_steps, device, use_deepspeed=..., launch=Launch.from_env())
    out = runtime.forward(**inputs)       # autocast (plain path) or the DeepSpeed engine (it casts the model)
    runtime.backward(out.loss)            # every micro batch
    norm, skipped = runtime.step()        # once per accumulation boundary: clip, skip if non-finite, schedule
    skipped_steps = runtime.settle()      # at log lines and checkpoints: reads the skips, fixes the schedule
    path = runtime.save(output_dir, step, client_state)   # engine/checkpoint.py layout
    client_state = runtime.load(path)
    runtime.export(output_dir, rank)      # model.safetensors + model_config.json (every rank calls it)

Two paths with the same semantics (global batch = micro x accumulation x ranks, clipping, one schedule step per
optimizer step, a non-finite step skipped and counted, never applied):
- DeepSpeed: deepspeed.initialize with our optimizer (engine/optim.py) and LambdaLR, its config derived by
  engine.config.deepspeed_config (ZeRO stage, offload, bf16 / fp16 with dynamic loss scaling), on the process
  group engine.launch.init_distributed sets up (a world of one without a launcher). At ZeRO-0 in fp32 DeepSpeed
  steps our optimizer without keeping the gradient norm and would apply a non-finite step: the runtime measures
  the all-reduced norm at the accumulation boundary and, when it is not finite, lets the step apply nothing and
  puts the schedule back.
- plain PyTorch, one process: torch.autocast for bf16 / fp16, torch.amp.GradScaler for fp16.

Activation checkpointing and torch.compile (engine/parallelize.py) are applied to the model here. Every
checkpoint call goes through the runtime: where a run resumes (resume_point), save, load, and the consolidated
export (export: model.safetensors + model_config.json, engine/checkpoint.py's layout).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import checkpoint as ckpt
from engine import elastic
from engine.config import ConfigError, RunConfig, deepspeed_config
from engine.launch import Launch, import_deepspeed, init_distributed
from engine.optim import BertAdam, make_optimizer, make_scheduler
from engine.parallelize import apply_activation_checkpointing, compile_model

logger = logging.getLogger(__name__)
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str) -> torch.dtype | None:
    """The autocast / DeepSpeed compute dtype of train.precision (None for fp32)."""
    return PRECISION_DTYPES[precision]


def optimizer_step(model: nn.Module, optimizer, scheduler, scaler, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, clip, step unless the gradient is non-finite, schedule: (gradient norm before clipping, skipped),
    0-dim tensors on the device. Nothing here waits for the device.

    The plain path's step for pre-training and fine-tuning alike. The non-finite decision stays on the device
    (step_unless). The schedule steps every time: Runtime.settle takes a skipped step's schedule step back at the
    next log line or checkpoint, so between a skipped step and the next log line the learning rate runs one
    schedule step ahead per skip (with fp16's rare overflow skips, a few steps of a 1/total_steps shift).
    """
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    skipped = ~torch.isfinite(norm)
    step_unless(optimizer, skipped)
    if scaler.is_enabled():
        scaler.update()  # from the inf checks of unscale_: halves the scale after an overflow, on the device
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped


def takes_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer applies nothing where its `found_inf` attribute is 1 (decided on the device): BertAdam
    and torch's fused AdamW / Adam (what GradScaler hands its inf checks to)."""
    return isinstance(optimizer, BertAdam) or bool(optimizer.defaults.get("fused"))


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor, step: Callable[[], Any] | None = None) -> None:
    """optimizer.step() (or `step`, the optimizer's own step where a wrapper replaced it), applying nothing where
    the 0-dim bool `skip` is true. Optimizers that cannot take the decision on the device (takes_found_inf) read
    it: one host wait."""
    step = step or optimizer.step
    if not takes_found_inf(optimizer):
        if not bool(skip):
            step()
        return
    optimizer.found_inf = skip.to(torch.float32)
    try:
        step()
    finally:
        del optimizer.found_inf


class Runtime:
    """Model + optimizer + schedule + precision (+ DeepSpeed engine) of one run; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        total_steps: int,
        device: torch.device,
        use_deepspeed: bool,
        launch: Launch = Launch(),  # noqa: B008 (frozen: one shared default is fine)
    ) -> None:
        t = config.train
        self.config = config
        self.device = device
        self.use_deepspeed = use_deepspeed
        self.world_size = launch.world_size
        self.accum = t.grad_accum_steps
        self.clip = config.optim.grad_clip
        self.dtype = precision_dtype(t.precision)
        self.compiled = t.compile
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.model = model  # the unwrapped module: parameters, state dicts, export
        self.optimizer = make_optimizer(model, config.optim)
        self.scheduler = make_scheduler(self.optimizer, config.optim, total_steps)
        self.engine = None
        self.scaler = None
        self._ds_skipped_seen = 0
        self._measure_norm = False
        self._device_skip = False
        self._skip_step = False
        self._boundary_norm: float | None = None  # measured here where DeepSpeed reports none (see backward)
        self._unsettled = torch.zeros((), dtype=torch.int64, device=device)  # skipped steps not yet settled
        if use_deepspeed:
            init_distributed(device, launch)
            self.engine, self.optimizer, _, self.scheduler = import_deepspeed().initialize(
                model=model,
                optimizer=self.optimizer,
                lr_scheduler=self.scheduler,
                config=deepspeed_config(config, launch.world_size),
            )
            # Without ZeRO and 16-bit wrappers DeepSpeed steps our optimizer itself, clips without keeping the
            # norm (get_global_grad_norm() is None) and applies a non-finite step: both are done here instead.
            self._measure_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
            if self._measure_norm:
                self._guard_optimizer_step()
            # bf16 ZeRO-1/2 without DeepSpeed's overflow check (deepspeed_config): a non-finite step is skipped on
            # the device, as on the plain path, and settle() takes its schedule step back
            self._device_skip = getattr(self.engine.optimizer, "check_grad_overflow", True) is False
            if self._device_skip:
                self._guard_zero_step()
            if t.compile:
                compile_model(self.engine, t.compile_backend, t.cuda_graphs, deepspeed=True)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
            if t.compile:
                compile_model(model, t.compile_backend, t.cuda_graphs)

    # --------------------------------------------------------------------------------------------- steps

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of floating-point inputs: DeepSpeed casts the model to the training precision, autocast
        does not (its inputs stay fp32)."""
        return self.dtype if self.use_deepspeed and self.dtype is not None else torch.float32

    def autocast(self):
        if self.use_deepspeed or self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward(self, **inputs: Any) -> Any:
        if self.use_deepspeed:
            return self.engine(**inputs)
        with self.autocast():
            return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate one micro batch's gradient (each micro batch's loss weighs 1 / accumulation steps)."""
        if self.use_deepspeed:
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            if self._measure_norm and self.engine.is_gradient_accumulation_boundary():
                self._boundary_norm = self._norm_or_skip()
            self.engine.step()  # an optimizer step only at the accumulation boundary
        else:
            self.scaler.scale(loss.float() / self.accum).backward()

    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """At the accumulation boundary: (gradient norm before clipping, whether the step was skipped), 0-dim
        tensors. The plain path leaves both on the device (no host wait); settle() reads the skips."""
        if not self.use_deepspeed:
            norm, skipped = optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.clip)
            self._unsettled += skipped
            return norm, skipped
        norm, skipped = self._deepspeed_step()
        self._unsettled += skipped
        return norm, skipped

    def _deepspeed_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._measure_norm:
            norm, self._boundary_norm = self._boundary_norm, None
            skipped = self._skip_step
            if skipped:
                self._undo_schedule_step()
                self._skip_step = False
            return torch.tensor(norm), torch.tensor(skipped)
        norm = self.engine.get_global_grad_norm()  # DeepSpeed stepped in backward() at the boundary
        # kept on the device: read at the log line (read_step), as the plain path's
        norm = torch.tensor(math.nan) if norm is None else torch.as_tensor(norm, dtype=torch.float32).detach()
        if self._device_skip:
            return norm, ~torch.isfinite(norm)  # what _guard_zero_step decided
        skipped = self.engine.skipped_steps > self._ds_skipped_seen  # DeepSpeed's overflow check decided
        self._ds_skipped_seen = self.engine.skipped_steps
        return norm, torch.tensor(skipped)

    def settle(self) -> int:
        """The steps skipped since the last settle: one read of the device, for log lines and checkpoints. The
        plain path's schedule stepped for them (optimizer_step cannot know on the host): taken back here, so the
        schedule has counted applied steps only, as DeepSpeed's does."""
        skipped = int(self._unsettled)
        if skipped:
            self._unsettled.zero_()
            if not self.use_deepspeed or self._device_skip:
                self.scheduler.last_epoch -= skipped + 1
                self.scheduler.step()  # recomputes every group's lr at the step count taken back
        return skipped

    def _norm_or_skip(self) -> float:
        """The all-reduced gradient's norm before DeepSpeed's step; a non-finite one makes that step apply
        nothing (the optimizer's step is guarded, see _guard_optimizer_step)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self._skip_step = not math.isfinite(norm)
        if self._skip_step:
            self._schedule_before = self.scheduler.state_dict()
        return norm

    def _guard_optimizer_step(self) -> None:
        """DeepSpeed calls optimizer.step() itself on this path: wrap it so a step flagged non-finite is not taken."""
        optimizer = self.engine.optimizer
        step = optimizer.step

        @functools.wraps(step)  # keeps the LR scheduler's marker on the step it wrapped
        def step_unless_skipped(*args: Any, **kwargs: Any) -> Any:
            return None if self._skip_step else step(*args, **kwargs)

        optimizer.step = step_unless_skipped

    def _guard_zero_step(self) -> None:
        """ZeRO-1/2 calls the client optimizer's step() after computing the global norm (stage_1_and_2.py:3071):
        wrap it so a non-finite norm applies nothing, decided on the device where the optimizer takes found_inf
        (takes_found_inf), else read (one host wait). DeepSpeed then steps the schedule; settle() takes it back."""
        zero = self.engine.optimizer
        inner = zero.optimizer
        step = inner.step

        @functools.wraps(step)
        def step_unless_non_finite(*args: Any, **kwargs: Any) -> Any:
            norm = zero._global_grad_norm
            if norm is None:
                return step(*args, **kwargs)
            skip = ~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32))
            step_unless(inner, skip, functools.partial(step, *args, **kwargs))

        inner.step = step_unless_non_finite

    def _undo_schedule_step(self) -> None:
        """DeepSpeed stepped the schedule for the step that applied nothing: put it back, as the plain path
        never steps it for a skipped step."""
        self.scheduler.load_state_dict(self._schedule_before)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr

    def zero_grad(self) -> None:
        """Drop gradients accumulated for a step that will not happen (the data ran out mid-step)."""
        if self.use_deepspeed:
            self.engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def train(self, mode: bool = True) -> None:
        (self.engine if self.engine is not None else self.model).train(mode)

    @property
    def training(self) -> bool:
        return self.model.training

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def loss_scale(self) -> float | None:
        """The dynamic loss scale (fp16 only)."""
        if self.use_deepspeed:
            scale = getattr(self.engine.optimizer, "cur_scale", None)
            return float(scale) if scale is not None and self.config.train.precision == "fp16" else None
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    # ---------------------------------------------------------------------------------------- checkpoints

    def save(self, output_dir: str | Path, step: int, client: dict[str, Any], rank: int = 0) -> Path:
        """A checkpoint of the model, optimizer, schedule, loss scaler and RNG states, plus `client`; then rank 0
        deletes the checkpoints beyond train.keep_checkpoints (older ones only: the other ranks may still be
        writing this one)."""
        if self.use_deepspeed:
            path = ckpt.save_deepspeed(self.engine, output_dir, step, client, rank)
        else:
            state = {
                **client,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": ckpt.rng_state(),
            }
            path = ckpt.save_plain(output_dir, step, state)
        if self.config.train.keep_checkpoints and rank == 0:
            ckpt.prune(output_dir, self.config.train.keep_checkpoints)
        return path

    def load(self, path: Path, rank: int = 0, weights_only: bool = False) -> dict[str, Any]:
        """Restore a checkpoint written by `save` (weights_only: the model's weights, for evaluation); returns
        its client state (RNG states already restored). A part that does not parse, or a DeepSpeed file that
        needs more than the allow-list (engine/checkpoint.py), is a ConfigError naming the file."""
        try:
            if self.use_deepspeed:
                saved = ckpt.saved_world_size(path)
                if not weights_only and saved not in (0, self.world_size):  # 0: its RNG files are missing
                    state = elastic.load_resharded(self.engine, path, rank, self.world_size, _rank0_log(rank))
                elif weights_only and self.engine.zero_optimization_partition_weights():
                    with _zero3_weights_from(path):
                        state = ckpt.load_deepspeed(self.engine, path, rank, module_only=True)
                else:
                    state = ckpt.load_deepspeed(self.engine, path, rank, module_only=weights_only)
                self._ds_skipped_seen = self.engine.skipped_steps
            else:
                state = ckpt.load_plain(path)
        except ckpt.CheckpointError as error:
            raise ConfigError(f"resume: {error}") from None
        if not self.use_deepspeed:
            self.model.load_state_dict(state["model"])
            if weights_only:
                return state
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        if "rng" in state:
            ckpt.set_rng_state(state["rng"])
        return state

    def export(self, directory: str | Path, rank: int = 0, hf: bool = False) -> Path | None:
        """The consolidated fp32 weights as <directory>/model.safetensors + model_config.json (hf: also
        transformers' layout in hf/). Every rank calls it (ZeRO-3 gathers); rank 0 writes and gets the path."""
        state = self.consolidated_state_dict()
        if rank != 0:
            return None
        return ckpt.export_model(state, self.config.model, directory, hf=hf)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU: under DeepSpeed the fp32 master weights (gathered under
        ZeRO-3: every rank must call this; ranks > 0 get {}), not the 16-bit copies the forward uses."""
        if not self.use_deepspeed:
            return {k: _fp32_cpu(v) for k, v in self.model.state_dict().items()}
        from deepspeed.utils import safe_get_full_fp32_param

        wrapper_masters = _wrapper_fp32_masters(self.engine.optimizer)
        state: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):  # the same order on every rank
            master = safe_get_full_fp32_param(param)  # a collective under ZeRO-3
            if master is None:
                master = wrapper_masters.get(id(param), param)
            state[name] = _fp32_cpu(master)
        for name, buffer in self.model.named_buffers(remove_duplicate=False):
            state[name] = _fp32_cpu(buffer)
        import torch.distributed as dist

        if self.config.train.zero_stage == 3 and dist.is_initialized() and dist.get_rank() > 0:
            return {}
        expected = self.model.state_dict().keys()  # ZeRO-3's are placeholders, but the names are right
        return {k: state[k] for k in expected}


def resume_point(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint a run continues from (train.resume: "auto", "none" or a path), or None to start afresh:
    the newest one that loads (engine/checkpoint.py resolve_resume; rank 0 logs a line for each one skipped). A
    path without a complete checkpoint, or a run whose checkpoints are all damaged, is a ConfigError naming the
    file."""
    try:
        return ckpt.resolve_resume(resume, output_dir, _rank0_log(Launch.from_env().rank))
    except (FileNotFoundError, ckpt.CheckpointError) as error:
        raise ConfigError(str(error)) from None


def _rank0_log(rank: int) -> Callable[[str], None]:
    """Logged (INFO) on rank 0, nothing elsewhere: lines the whole run says once."""
    return logger.info if rank == 0 else (lambda line: None)


def _wrapper_fp32_masters(optimizer: Any) -> dict[int, torch.Tensor]:
    """Without ZeRO, DeepSpeed's 16-bit optimizer wrappers keep the fp32 masters per parameter group: one flat
    tensor (FP16_Optimizer: fp32_groups_flat) or one per parameter (FP16_UnfusedOptimizer: fp32_groups), the
    group's parameters (fp16_groups) in order. Returns id(parameter) -> its fp32 master."""
    groups = getattr(optimizer, "fp16_groups", None) or []
    masters: dict[int, torch.Tensor] = {}
    if getattr(optimizer, "fp32_groups_flat", None):
        for params, flat in zip(groups, optimizer.fp32_groups_flat):
            offset = 0
            for param in params:
                masters[id(param)] = flat.narrow(0, offset, param.numel()).view_as(param)
                offset += param.numel()
    elif getattr(optimizer, "fp32_groups", None):
        for params, fp32 in zip(groups, optimizer.fp32_groups):
            masters.update((id(p), m) for p, m in zip(params, fp32))
    return masters


def _fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.float().cpu() if tensor.is_floating_point() else tensor.cpu()


@contextlib.contextmanager
def _zero3_weights_from(path: Path):
    """DeepSpeed's weights-only ZeRO-3 load consolidates the shards with get_fp32_state_dict_from_zero_checkpoint(
    load_dir): the tag `latest` names, read with torch.load(weights_only=False). Within this block it gets
    engine.elastic's consolidation of `path` itself, through the allow-list."""
    from deepspeed.runtime import engine as deepspeed_engine

    original = deepspeed_engine.get_fp32_state_dict_from_zero_checkpoint
    deepspeed_engine.get_fp32_state_dict_from_zero_checkpoint = lambda *args, **kwargs: elastic.zero3_fp32_state_dict(
        path
    )
    try:
        yield
    finally:
        deepspeed_engine.get_fp32_state_dict_from_zero_checkpoint = original
