"""Fused masked RoI-feature regression (LXMERT pre-training loss 3), Liger-style: gradient in the forward.

    loss = normalizer / N * sum_i w_i * mean_f SmoothL1_beta=1(x_i W^T + b - t_i)

x [N, H] region states (N = B x 36, every region, weighted or not), weight [F, H], bias [F] or None,
target [N, F], row_weight [N] (the 0/1 mask; any weights work). Same semantics as
lxmert.losses.masked_feature_regression.

Design
- Forward: rows = nonzero(row_weight) (ONE host sync: the number of weighted rows sizes the buffers);
  pred [M, F] = x[rows] @ W^T + b by torch (cuBLAS), in the compute dtype (the autocast dtype under
  autocast, else x's dtype, as F.linear). One Triton kernel then walks pred in [BLOCK_M, BLOCK_F] tiles,
  gathers target rows and weights by index inside the kernel (no gathered copy of target), accumulates the
  loss in fp32 (fp64 for fp64 inputs) to one partial sum per program (summed by torch: deterministic, no
  atomics), and overwrites pred in place with the unit gradient w_i * clamp(pred - t, -1, 1). Unweighted
  rows of x and target are never read; their prediction is never formed.
- Backward is matmuls only: with s = grad_output * normalizer / (N * F) (kept as a tensor: no sync),
  dX[rows] = s * G @ W (index_copy into zeros; rows are unique), dW = s * G^T @ x[rows],
  db = s * sum_rows G. The scale is applied to the matmul outputs in fp32, not stored in G: at
  LXMERT's size (N = 256 x 36, F = 2048) s is ~3.5e-7, subnormal in fp16 (a few significant bits), while
  |G| <= w_i is well represented. G lives in pred's dtype (fp16 / bf16 under autocast, as torch's own
  grad of the prediction would).
- F is a constexpr, NUM_FEATURES (one compile per head width; LXMERT has one): a constant trip count for
  the loop over feature tiles, and no runtime-bound loop for the interpreter (which breaks on numpy 2.4).
- Gradients for target and row_weight are not produced (None): both are data, not parameters.

Limits
- dtypes: x / weight fp32, fp16, bf16 (the same dtype, or any under autocast), fp64 (for gradcheck);
  target and row_weight any float dtype (bool/int row_weight is converted). The loss is an fp32 scalar
  (fp64 when the compute dtype is fp64). In fp16, |w_i| must stay below 65504 (G holds w_i * clamp(.)).
- Any strides for x, weight, target and row_weight; leading dims of x / target / row_weight are flattened.
- No rows weighted: loss 0 (still attached to the graph), zero gradients, no kernel launch.
- Device: CUDA tensors run the Triton kernel; CPU tensors run it only under TRITON_INTERPRET=1 set before
  triton is first imported (@triton.jit picks the interpreter at decoration, for triton's tl.sum / tl.zeros
  as well as ours), else the PyTorch reference below, differentiated by autograd; triton_runs_on(t) says
  which. torch.compile does not trace into it (compiler.disable: nonzero is data-dependent anyway).
- Versus lxmert.losses: equal to fp32 rounding (a different summation order); fp64 inputs give an fp64 loss
  (losses.py casts to fp32), so gradcheck can run through the kernel. No double backward.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._mode import all_interpreted, warn_if_imported_too_early

Tensor = torch.Tensor


@triton.jit(do_not_specialize=["M"])  # M, the masked rows, changes every batch: one binary for every count
def _feature_regression_fwd_kernel(
    pred_ptr,  # [M, F] x[rows] @ W^T + b, unit stride in F; overwritten in place with the unit gradient G
    target_ptr,  # [N, F] targets of all regions (any strides); only the rows listed in rows_ptr are read
    rows_ptr,  # [M] int64 indices of the weighted regions into target / row_weight
    row_weight_ptr,  # [N] per-region weights (any float dtype, stride stride_w); only listed rows are read
    partial_ptr,  # [cdiv(M, BLOCK_M)] fp32 or fp64: each program's scaled share of the loss
    M,
    stride_pred_m,
    stride_target_n,
    stride_target_f,
    stride_w,
    scale,  # normalizer / (N * F)
    NUM_FEATURES: tl.constexpr,  # F (2048 in LXMERT): a constant trip count, one compile per head width
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
    ACC_FP64: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_FP64 else tl.float32
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    region = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    # bf16 must become fp32 right after the load (the interpreter keeps bf16 as raw bits)
    w = tl.load(row_weight_ptr + region * stride_w, mask=mask_m, other=0).to(acc_dtype)
    pred_rows = pred_ptr + offs_m.to(tl.int64)[:, None] * stride_pred_m
    target_rows = target_ptr + region[:, None] * stride_target_n
    row_loss = tl.zeros([BLOCK_M], dtype=acc_dtype)
    for f0 in range(0, NUM_FEATURES, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask = mask_m[:, None] & (offs_f < NUM_FEATURES)[None, :]
        p = tl.load(pred_rows + offs_f[None, :], mask=mask, other=0).to(acc_dtype)
        t = tl.load(target_rows + offs_f[None, :] * stride_target_f, mask=mask, other=0).to(acc_dtype)
        d = p - t
        ad = tl.abs(d)
        small = ad < 1.0
        row_loss += tl.sum(tl.where(small, 0.5 * d * d, ad - 0.5), axis=1)  # masked lanes have d = 0
        grad = tl.where(small, d, tl.where(d > 0, 1.0, -1.0)) * w[:, None]
        tl.store(pred_rows + offs_f[None, :], grad, mask=mask)  # implicit cast to pred's dtype
    tl.store(partial_ptr + pid, tl.sum(row_loss * w, axis=0) * scale)


def _block_sizes(num_features: int) -> tuple[int, int]:
    # memory-bound elementwise work: ~4K elements a tile keeps registers modest on the GPU and the
    # interpreter (numpy over whole tiles) fast; F = 2048 -> 4 x 1024, F = 128 -> 16 x 128
    block_f = min(1024, triton.next_power_of_2(num_features))
    block_m = max(1, min(16, 4096 // block_f))
    return block_m, block_f


@torch.compiler.disable
def _loss_and_unit_grad(pred: Tensor, target: Tensor, rows: Tensor, row_weight: Tensor, scale: float) -> Tensor:
    """Launcher: returns the loss and leaves w_i * clamp(pred - target[rows], -1, 1) in pred."""
    m, f = pred.shape
    acc_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    block_m, block_f = _block_sizes(f)
    grid = (triton.cdiv(m, block_m),)
    partials = torch.empty(grid[0], dtype=acc_dtype, device=pred.device)
    _feature_regression_fwd_kernel[grid](
        pred, target, rows, row_weight, partials,
        m,
        pred.stride(0), target.stride(0), target.stride(1), row_weight.stride(0),
        scale,
        NUM_FEATURES=f, BLOCK_M=block_m, BLOCK_F=block_f, ACC_FP64=acc_dtype == torch.float64,
    )  # fmt: skip
    return partials.sum()


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class FeatureRegressionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, target, row_weight, normalizer):
        n, h = x.shape
        num_features = weight.shape[0]
        compute_dtype = _compute_dtype(x)
        acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        if not row_weight.is_floating_point():
            row_weight = row_weight.float()
        rows = (row_weight != 0).nonzero().squeeze(1)  # the one host sync
        ctx.x_meta = (x.shape, x.dtype, x.device)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.acc_dtype = acc_dtype
        ctx.scale = normalizer / (max(n, 1) * num_features)
        ctx.empty = rows.numel() == 0
        if ctx.empty:
            ctx.save_for_backward(weight)
            return torch.zeros((), dtype=acc_dtype, device=x.device)
        x_rows = x.index_select(0, rows).to(compute_dtype)
        weight_c = weight.to(compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            pred = F.linear(x_rows, weight_c, None if bias is None else bias.to(compute_dtype))
        loss = _loss_and_unit_grad(pred, target, rows, row_weight, ctx.scale)
        ctx.save_for_backward(pred, x_rows, weight_c, rows)  # pred now holds the unit gradient G
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        x_shape, x_dtype, device = ctx.x_meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.empty:
            (weight,) = ctx.saved_tensors
            dx = torch.zeros(x_shape, dtype=x_dtype, device=device) if need_x else None
            dw = torch.zeros_like(weight, dtype=ctx.weight_dtype) if need_w else None
            db = torch.zeros(weight.shape[0], dtype=ctx.bias_dtype, device=device) if need_b else None
            return dx, dw, db, None, None, None
        grad_unit, x_rows, weight_c, rows = ctx.saved_tensors
        s = grad_output.to(ctx.acc_dtype) * ctx.scale  # a 0-dim tensor: no host sync
        dx = dw = db = None
        if need_x:
            dx_rows = (grad_unit @ weight_c).to(ctx.acc_dtype).mul_(s).to(x_dtype)
            dx = torch.zeros(x_shape, dtype=x_dtype, device=device).index_copy_(0, rows, dx_rows)
        if need_w:
            dw = (grad_unit.t() @ x_rows).to(ctx.acc_dtype).mul_(s).to(ctx.weight_dtype)
        if need_b:
            db = grad_unit.sum(0, dtype=ctx.acc_dtype).mul_(s).to(ctx.bias_dtype)
        return dx, dw, db, None, None, None


def reference_masked_feature_regression(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, row_weight: Tensor, normalizer: float = 1 / 0.15
) -> Tensor:
    """The PyTorch formula (tests' ground truth in float64, and the CPU path): lxmert.losses' semantics,
    accumulated in fp32, or in fp64 when the compute dtype is fp64."""
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    row_weight = row_weight.reshape(-1)
    acc_dtype = torch.float64 if _compute_dtype(x) == torch.float64 else torch.float32
    rows = (row_weight != 0).nonzero().squeeze(1)
    prediction = F.linear(x.index_select(0, rows), weight, bias).to(acc_dtype)
    picked = target.reshape(n, -1).index_select(0, rows).to(acc_dtype)
    per_row = F.smooth_l1_loss(prediction, picked, reduction="none", beta=1.0).mean(1)
    return (per_row * row_weight.index_select(0, rows).to(acc_dtype)).sum() * (normalizer / max(n, 1))


_INTERPRETED = all_interpreted(_feature_regression_fwd_kernel, tl.standard.sum, tl.standard.zeros)
warn_if_imported_too_early(_INTERPRETED, "the feature-regression kernel")


def triton_runs_on(t: Tensor) -> bool:
    """Whether tensors on t's device run the Triton kernel (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or _INTERPRETED


@torch.compiler.disable
def masked_feature_regression(
    x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, row_weight: Tensor, normalizer: float = 1 / 0.15
) -> Tensor:
    """normalizer / N * sum_i w_i * mean_f SmoothL1(x_i W^T + b - t_i), projecting only rows with w_i != 0.

    x [N, H] (or [..., H]), weight [F, H], bias [F] or None, target [N, F], row_weight [N]. Returns a 0-dim
    fp32 loss (fp64 for fp64 inputs) with gradients for x, weight and bias.
    """
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    target = target.reshape(n, -1) if target.dim() != 2 else target
    row_weight = row_weight.reshape(-1)
    if target.shape != (n, weight.shape[0]) or row_weight.shape[0] != n or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"target {tuple(target.shape)}, row_weight {tuple(row_weight.shape)}"
        )
    if not triton_runs_on(x):
        return reference_masked_feature_regression(x, weight, bias, target, row_weight, normalizer)
    return FeatureRegressionFunction.apply(x, weight, bias, target, row_weight, float(normalizer))
