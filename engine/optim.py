"""Optimizers and learning-rate schedules: the authors' BertAdam, torch's AdamW, warm-up schedules.

BertAdam is airsplay/lxmert src/lxrt/optimization.py (pytorch-pretrained-bert 0.6's class). Per parameter p:
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g^2
    p = p - lr * (m / (sqrt(v) + eps) + weight_decay * p)
with NO bias correction (the first step moves p by about lr * (1 - b1) / sqrt(1 - b2) = 3.16 lr per unit
gradient sign, not lr) and the weight decay added to the update, on every parameter the optimizer holds
(the authors pass model.parameters(): biases and LayerNorms decay too). Defaults: b1 0.9, b2 0.999, eps 1e-6,
weight decay 0.01. Parameters whose .grad is None are skipped; a zero gradient still decays m, v and p.
Two deliberate changes to the authors' class, neither touching the arithmetic:
- the schedule lives outside (`make_schedule`, a LambdaLR function); the authors' class multiplied lr by
  warmup_linear(k / t_total) at its k-th step (k from 0, so the first update has lr 0), which is exactly
  LambdaLR stepped after every optimizer step;
- no max_grad_norm: the authors had commented its clipping out ("LXRT: grad is clipped outside"); the engine
  clips (optim.grad_clip, DeepSpeed's gradient_clipping).
Under DeepSpeed the engine hands this optimizer and the LambdaLR to deepspeed.initialize; DeepSpeed's own
"Adam" config would be bias-corrected. The same rule is FusedAdam(bias_correction=False, adam_w_mode=True) and
DeepSpeedCPUAdam(bias_correction=False, adamw_mode=True) (decoupled decay applied to p first: equal up to
rounding), should the engine want DeepSpeed's fused kernels for offload.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from engine.config import OptimConfig


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, weight decay added to the update (see the module docstring).

    foreach: update all tensors of a (device, dtype) with torch._foreach_* ops (default: on CUDA); the
    arithmetic is the same as the per-tensor loop.

    found_inf: as torch's fused optimizers, a 0-dim float tensor attribute set before step() (by GradScaler or
    engine.runtime.step_unless); where it is 1 the step applies nothing (m, v and p keep their values, whatever
    the gradients hold), decided on the device. Where it is 0 the arithmetic is exactly the plain step's.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        foreach: bool | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}: must be >= 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, ms, vs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            update = _foreach_update if foreach else _loop_update
            skip = _Skip(getattr(self, "found_inf", None), group["betas"])
            update(params, grads, ms, vs, group["lr"], *group["betas"], group["eps"], group["weight_decay"], skip)
        return loss


class _Skip:
    """found_inf as the update uses it: where it is 1 the gradient reads as 0, the betas as 1 and the update is
    scaled by 0, so m, v and p keep their values exactly; where it is 0 every factor is the plain step's value
    (x * 1 and torch.where are exact), so the arithmetic does not change. None: no skipping, no extra op."""

    def __init__(self, found_inf: torch.Tensor | None, betas: tuple[float, float]) -> None:
        self.on = found_inf is not None
        if self.on:
            skip = found_inf.reshape(()) != 0
            self.mask, self.keep = skip, (~skip).to(torch.float32)
            # Python scalars, not tensors made from them: a host-to-device copy would wait for the device
            self.beta1, self.beta2 = (torch.where(skip, 1.0, b).to(torch.float32) for b in betas)

    def betas(self, beta1: float, beta2: float) -> tuple[Any, Any]:
        return (self.beta1, self.beta2) if self.on else (beta1, beta2)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, 0.0, g) if self.on else g  # inf / nan gradients never reach m and v


def _loop_update(params, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, skip: _Skip) -> None:
    b1, b2 = skip.betas(beta1, beta2)
    for p, g, m, v in zip(params, grads, ms, vs):
        g = skip.grad(g)
        m.mul_(b1).add_(g, alpha=1 - beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - beta2)
        update = m / v.sqrt().add_(eps)
        if weight_decay > 0.0:
            update.add_(p, alpha=weight_decay)
        if skip.on:
            update.mul_(skip.keep)
        p.add_(update, alpha=-lr)


def _foreach_update(params, grads, ms, vs, lr, beta1, beta2, eps, weight_decay, skip: _Skip) -> None:
    b1, b2 = skip.betas(beta1, beta2)
    by_kind = defaultdict(list)  # foreach ops take tensors of one device and dtype
    for i, p in enumerate(params):
        by_kind[(p.device, p.dtype)].append(i)
    for index in by_kind.values():
        p, m, v = ([t[i] for i in index] for t in (params, ms, vs))
        g = [skip.grad(grads[i]) for i in index]
        torch._foreach_mul_(m, b1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        if weight_decay > 0.0:
            torch._foreach_add_(update, p, alpha=weight_decay)
        if skip.on:
            torch._foreach_mul_(update, skip.keep)
        torch._foreach_add_(p, update, alpha=-lr)


# -------------------------------------------------------------------------------------------- schedules


def make_schedule(kind: str, warmup_ratio: float, total_steps: int) -> Callable[[int], float]:
    """The lr multiplier at optimizer step `step` (0-based), for torch.optim.lr_scheduler.LambdaLR.

    With x = step / total_steps and w = warmup_ratio, all three warm up as x / w for x < w (the authors'), then:
      linear    max((x - 1) / (w - 1), 0): 1 at the end of the warm-up, 0 at total_steps and beyond
                (pytorch-pretrained-bert's warmup_linear, used by the authors for every run)
      constant  1 (warmup_constant)
      cosine    0.5 * (1 + cos(pi * (x - w) / (1 - w))), 0 beyond the end. The authors' warmup_cosine,
                0.5 * (1 + cos(pi * x)), jumps down at the end of the warm-up (and calls torch.cos on a
                float, so it never ran): this is the usual warm-up-aware cosine instead.
    """
    if kind not in ("linear", "constant", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; one of 'linear', 'constant', 'cosine'")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")

    def lr_lambda(step: int) -> float:
        x = step / total_steps
        if x < warmup_ratio:
            return x / warmup_ratio
        if kind == "linear":
            return max((x - 1.0) / (warmup_ratio - 1.0), 0.0)
        if kind == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (x - warmup_ratio) / (1.0 - warmup_ratio))) if x < 1.0 else 0.0

    return lr_lambda


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """LambdaLR over `optimizer` with optim.schedule; call its step() after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, make_schedule(optim.schedule, optim.warmup_ratio, total_steps))


# -------------------------------------------------------------------------------------------- optimizers


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str] | None) -> list[dict]:
    """Trainable parameters in a "decay" and a "no_decay" group (empty groups left out).

    no_decay: fnmatch patterns of exempt parameter names (model.named_parameters(); a tied weight once, under
    its first name); a pattern that matches nothing is an error, it is a typo. None: exempt every bias and
    every LayerNorm parameter, by module type (the usual AdamW practice, BERT's "bias", "LayerNorm.weight").
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if no_decay is None:
        exempt_ids = {
            id(p)
            for m in model.modules()
            for local, p in m.named_parameters(recurse=False)
            if local == "bias" or isinstance(m, nn.LayerNorm)
        }
        exempt = [id(p) in exempt_ids for _, p in named]
    else:
        unused = [pat for pat in no_decay if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named)]
        if unused:
            raise ValueError(f"optim.no_decay patterns {unused} match no parameter (names look like {named[0][0]!r})")
        exempt = [any(fnmatch.fnmatchcase(n, pat) for pat in no_decay) for n, _ in named]
    groups = [
        {"name": "decay", "params": [p for (_, p), e in zip(named, exempt) if not e], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for (_, p), e in zip(named, exempt) if e], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """bertadam: BertAdam, weight decay on every parameter unless optim.no_decay says otherwise (the authors').
    adamw: torch AdamW (bias-corrected, decoupled decay), biases and LayerNorm parameters exempt unless
    optim.no_decay says otherwise; fused where every parameter is a float tensor on CUDA or CPU, else foreach."""
    if optim.name == "bertadam":
        groups = param_groups(model, optim.weight_decay, optim.no_decay or [])
        return BertAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw":
        groups = param_groups(model, optim.weight_decay, optim.no_decay)
        params = [p for g in groups for p in g["params"]]
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            groups,
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=fused or None,
            foreach=None if fused else True,
        )
    raise ValueError(f"unknown optimizer {optim.name!r}; one of 'bertadam', 'adamw'")
