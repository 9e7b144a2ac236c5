"""How the tests and benchmarks.kernels judge a kernel: its outputs and gradients against a float64 reference.

rel_err (max-norm) is the attention kernel's and the model's measure; norm_rel_err (Frobenius) the
feature-regression kernel's and the losses'. against_float64 is the rule: the kernel on inputs rounded to the
dtype, against the reference in float64 on the same rounded inputs; fp32 within FP32_TOL, fp16 / bf16 within twice
the reference's own error when run in that dtype, plus a constant (the kernel's SLACK).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

FP32_TOL = 1e-5
ATTENTION_SLACK = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
FEATURE_SLACK = {torch.float16: 1e-4, torch.bfloat16: 5e-4}


def rel_err(actual: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - reference| / max(max |reference|, floor), in float64 (0 when both are all zero).

    `floor` is for a reference that is exactly zero in exact arithmetic (the gradient of a softmax over
    one key, of a key bias): then rounding noise is judged against the size of its neighbours."""
    actual, reference = actual.detach().double(), reference.detach().double()
    assert actual.shape == reference.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(reference.shape)}"
    diff = (actual - reference).abs().max().item() if actual.numel() else 0.0
    scale = max(reference.abs().max().item() if reference.numel() else 0.0, floor)
    if scale == 0.0:
        return diff if diff == 0.0 else math.inf
    return diff / scale


def norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def outputs_and_grads(fn: Callable, inputs: Sequence[Any], grad_outs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """fn's outputs, then the gradient of every floating-point input (fresh leaves; other inputs, None included,
    are passed as they are)."""
    leaves = [t.detach().clone().requires_grad_() if _floating(t) else t for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    diff = [t for t in leaves if _floating(t)]
    grads = torch.autograd.grad(outs, diff, [g.to(o.dtype) for o, g in zip(outs, grad_outs)])
    return [o.detach() for o in outs] + list(grads)


def against_float64(
    kernel_fn: Callable,
    ref_fn: Callable,
    inputs: Sequence[Any],
    grad_outs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    names: Sequence[str],
    err: Callable[[torch.Tensor, torch.Tensor], float],
    slack: dict[torch.dtype, float],
) -> dict[str, Any]:
    """kernel_fn on `inputs` rounded to dtype against ref_fn in float64 on the same rounded inputs (and, in
    fp16 / bf16, ref_fn in dtype: its own error is the yardstick). Returns the kernel's outputs and gradients
    ("kernel"), each one's error, the reference's own error, the tolerance and whether every one passed; a
    non-finite value has error inf."""
    low = [t.to(dtype) if _floating(t) else t for t in inputs]
    truth = outputs_and_grads(ref_fn, [t.double() if _floating(t) else t for t in low], grad_outs)
    if low and isinstance(low[0], torch.Tensor) and low[0].is_cuda:
        # NaN in the caching allocator's free blocks: an element the kernel never writes is not stale plausible data
        torch.empty(512 * 2**20 // 4, device=low[0].device).fill_(float("nan"))
    kernel = outputs_and_grads(kernel_fn, low, grad_outs)
    errors = [err(k, t) if torch.isfinite(k).all() else math.inf for k, t in zip(kernel, truth)]
    if dtype == torch.float32:
        own, tolerances = [None] * len(errors), [FP32_TOL] * len(errors)
    else:
        own = [err(o, t) for o, t in zip(outputs_and_grads(ref_fn, low, grad_outs), truth)]
        tolerances = [2 * o + slack[dtype] for o in own]
    return {
        "kernel": dict(zip(names, kernel)),
        "errors": dict(zip(names, errors)),
        "torch_errors": dict(zip(names, own)),
        "tolerances": dict(zip(names, tolerances)),
        "passed": all(e <= tol for e, tol in zip(errors, tolerances)),
    }


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()
