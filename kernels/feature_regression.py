"""Fused masked RoI-feature regression (LXMERT pre-training loss 3), Liger-style: gradient in the forward.

    loss = normalizer / N * sum_i w_i * mean_f SmoothL1_beta=1(x_i W^T + b - t_i)

x [N, H] region states (N = B x 36, every region, weighted or not), weight [F, H], bias [F] or None,
target [N, F], row_weight [N] (the 0/1 mask; any weights work). Same semantics as
lxmert.losses.masked_feature_regression.

Design
- Rows: the caller's `rows` [M], the flat indices of the weighted rows padded with -1 to a size it picks
  (the engine's loaders know them on the host): no host sync and a static shape, so a training step never
  waits. Without them, rows = nonzero(row_weight): ONE host sync, the count sizes the buffers.
- Forward: pred [M, F] = x[rows] @ W^T + b by torch (cuBLAS), in the compute dtype (the autocast dtype under
  autocast, else x's dtype, as F.linear). One Triton kernel then walks pred in [BLOCK_M, BLOCK_F] tiles,
  gathers target rows and weights by index inside the kernel (no gathered copy of target), accumulates the
  loss in fp32 (fp64 for fp64 inputs) to one partial sum per program (summed by torch: deterministic, no
  atomics), and overwrites pred in place with the unit gradient w_i * clamp(pred - t, -1, 1). Unweighted
  rows of x and target are never read and their prediction is never formed, except row 0 of x, which the
  padding entries project (the kernel reads nothing for them and leaves G = 0 there).
- Backward is matmuls only: with s = grad_output * normalizer / (N * F) (kept as a tensor: no sync),
  dX[rows] = s * G @ W (index_add_ into zeros: the real rows are unique and padding adds exact zeros, so
  it is deterministic), dW = s * G^T @ x[rows], db = s * sum_rows G. The scale is applied to the matmul
  outputs in fp32, not stored in G: at LXMERT's size (N = 256 x 36, F = 2048) s is ~3.5e-7, subnormal in
  fp16 (a few significant bits), while |G| <= w_i is well represented. G lives in pred's dtype (fp16 / bf16
  under autocast, as torch's own grad of the prediction would).
- F is a constexpr, NUM_FEATURES (one compile per head width; LXMERT has one): a constant trip count for
  the loop over feature tiles, and no runtime-bound loop for the interpreter (which breaks on numpy 2.4).
- Gradients for target and row_weight are not produced (None): both are data, not parameters.
- torch.compile: the launch is a torch.library custom op, lxmert::feature_regression_fwd (a fake impl
  allocates its outputs: the loss, G and x[rows]; autograd registered, the backward's matmuls traced as
  torch ops). With rows given the whole loss traces without a graph break; nonzero (rows=None) is
  data-dependent and breaks the graph.

Limits
- dtypes: x / weight fp32, fp16, bf16 (the same dtype, or any under autocast), fp64 (for gradcheck);
  target and row_weight any float dtype (bool/int row_weight is converted). The loss is an fp32 scalar
  (fp64 when the compute dtype is fp64). In fp16, |w_i| must stay below 65504 (G holds w_i * clamp(.)).
- Any strides for x, weight, target and row_weight; leading dims of x / target / row_weight are flattened.
- rows: unique real entries that list every row with w_i != 0 (a row left out is silently dropped); int32 or
  int64, on x's device. M is static: M = 0 (or rows None and nothing weighted) gives loss 0, still attached
  to the graph, zero gradients and no kernel launch; so do M entries all -1 (with a launch).
- Device: CUDA tensors run the Triton kernel; CPU tensors run it only under TRITON_INTERPRET=1 set before
  triton is first imported (@triton.jit picks the interpreter at decoration, for triton's tl.sum / tl.zeros
  as well as ours), else the PyTorch reference below, differentiated by autograd (and traced by dynamo:
  the choice rests on the device type and the module's _INTERPRETED); triton_runs_on(t) says which.
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
    rows_ptr,  # [M] int64 indices of the weighted regions into target / row_weight; -1 = padding
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
    region = tl.load(rows_ptr + offs_m, mask=mask_m, other=-1)
    listed = region >= 0  # a padding entry (or a lane past M) reads nothing: d = 0, w = 0, so G = 0
    # bf16 must become fp32 right after the load (the interpreter keeps bf16 as raw bits)
    w = tl.load(row_weight_ptr + region * stride_w, mask=listed, other=0).to(acc_dtype)
    pred_rows = pred_ptr + offs_m.to(tl.int64)[:, None] * stride_pred_m
    target_rows = target_ptr + region[:, None] * stride_target_n
    row_loss = tl.zeros([BLOCK_M], dtype=acc_dtype)
    for f0 in range(0, NUM_FEATURES, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        in_f = (offs_f < NUM_FEATURES)[None, :]
        read = listed[:, None] & in_f
        p = tl.load(pred_rows + offs_f[None, :], mask=read, other=0).to(acc_dtype)
        t = tl.load(target_rows + offs_f[None, :] * stride_target_f, mask=read, other=0).to(acc_dtype)
        d = p - t
        ad = tl.abs(d)
        small = ad < 1.0
        row_loss += tl.sum(tl.where(small, 0.5 * d * d, ad - 0.5), axis=1)  # unread lanes have d = 0
        grad = tl.where(small, d, tl.where(d > 0, 1.0, -1.0)) * w[:, None]
        tl.store(pred_rows + offs_f[None, :], grad, mask=mask_m[:, None] & in_f)  # implicit cast to pred's dtype
    tl.store(partial_ptr + pid, tl.sum(row_loss * w, axis=0) * scale)


def _block_sizes(num_features: int) -> tuple[int, int]:
    # memory-bound elementwise work: ~4K elements a tile keeps registers modest on the GPU and the
    # interpreter (numpy over whole tiles) fast; F = 2048 -> 4 x 1024, F = 128 -> 16 x 128
    block_f = min(1024, triton.next_power_of_2(num_features))
    block_m = max(1, min(16, 4096 // block_f))
    return block_m, block_f


def _loss_and_unit_grad(pred: Tensor, target: Tensor, rows: Tensor, row_weight: Tensor, scale: float) -> Tensor:
    """Launcher: returns the loss and leaves w_i * clamp(pred - target[rows], -1, 1) in pred (0 where rows is -1)."""
    m, f = pred.shape
    acc_dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    block_m, block_f = _block_sizes(f)
    grid = (triton.cdiv(m, block_m),)
    partials = torch.empty(grid[0], dtype=acc_dtype, device=pred.device)
    _feature_regression_fwd_kernel[grid](
        pred,
        target,
        rows,
        row_weight,
        partials,
        m,
        pred.stride(0),
        target.stride(0),
        target.stride(1),
        row_weight.stride(0),
        scale,
        NUM_FEATURES=f,
        BLOCK_M=block_m,
        BLOCK_F=block_f,
        ACC_FP64=acc_dtype == torch.float64,
    )
    return partials.sum()


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _feature_regression_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    rows: Tensor,
    scale: float,
    compute_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, the unit gradient G [M, F], x[rows] [M, H]); G and x[rows] in the compute dtype, for the backward."""
    x_rows = x.index_select(0, rows.clamp(min=0)).to(compute_dtype)  # padding entries project row 0 (G = 0)
    with torch.autocast(x.device.type, enabled=False):
        pred = F.linear(x_rows, weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
    if rows.shape[0] == 0:  # nothing weighted (M is a static size): no launch
        return torch.zeros((), dtype=_acc_dtype(compute_dtype), device=x.device), pred, x_rows
    loss = _loss_and_unit_grad(pred, target, rows, row_weight, scale)  # pred now holds G
    return loss, pred, x_rows


# A torch.library custom op, so torch.compile traces the launch as one opaque node (G and x[rows] are outputs
# that are not differentiable: saved for the backward).
_feature_regression_fwd_op = torch.library.custom_op(
    "lxmert::feature_regression_fwd", _feature_regression_fwd, mutates_args=()
)


@_feature_regression_fwd_op.register_fake
def _feature_regression_fwd_fake(x, weight, bias, target, row_weight, rows, scale, compute_dtype):
    m = rows.shape[0]
    loss = x.new_empty((), dtype=_acc_dtype(compute_dtype))
    grad_unit = x.new_empty((m, weight.shape[0]), dtype=compute_dtype)
    return loss, grad_unit, x.new_empty((m, x.shape[1]), dtype=compute_dtype)


def _feature_regression_setup(ctx, inputs, output):
    x, weight, bias, _target, _row_weight, rows, scale, _compute_dtype = inputs
    _loss, grad_unit, x_rows = output
    ctx.mark_non_differentiable(grad_unit, x_rows)
    ctx.set_materialize_grads(False)  # no [M, *] zeros as their gradients
    ctx.save_for_backward(grad_unit, x_rows, weight, rows)
    ctx.x_meta = (x.shape, x.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.scale = scale


def _feature_regression_backward(ctx, grad_loss, _grad_unit, _x_rows):
    """Matmuls only (torch.compile traces them): G and x[rows] came from the forward."""
    if grad_loss is None:  # not materialised: a zero gradient
        return (None,) * 8
    grad_unit, x_rows, weight, rows = ctx.saved_tensors
    x_shape, x_dtype = ctx.x_meta
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    s = grad_loss * ctx.scale  # a 0-dim tensor in the loss's (accumulation) dtype: no host sync
    acc_dtype = s.dtype
    dx = dw = db = None
    if need_x:
        dx_rows = (grad_unit @ weight.to(grad_unit.dtype)).to(acc_dtype).mul_(s).to(x_dtype)
        # rows are unique but padding entries (-1 -> row 0) add exact zeros: deterministic
        dx = torch.zeros(x_shape, dtype=x_dtype, device=x_rows.device).index_add_(0, rows.clamp(min=0), dx_rows)
    if need_w:
        dw = (grad_unit.t() @ x_rows).to(acc_dtype).mul_(s).to(weight.dtype)
    if need_b:
        db = grad_unit.sum(0, dtype=acc_dtype).mul_(s).to(ctx.bias_dtype)
    return dx, dw, db, None, None, None, None, None


_feature_regression_fwd_op.register_autograd(_feature_regression_backward, setup_context=_feature_regression_setup)


def reference_masked_feature_regression(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    normalizer: float = 1 / 0.15,
    rows: Tensor | None = None,
    acc_dtype: torch.dtype | None = None,
) -> Tensor:
    """The PyTorch formula (tests' ground truth in float64, and the CPU path): lxmert.losses' semantics,
    accumulated in fp32, or in fp64 when the compute dtype is fp64; `acc_dtype=x.dtype` runs it all in the
    inputs' dtype (the yardstick of a low-precision kernel's error). rows as masked_feature_regression's."""
    x = x.reshape(-1, x.shape[-1])
    n = x.shape[0]
    row_weight = row_weight.reshape(-1)
    acc_dtype = acc_dtype or _acc_dtype(_compute_dtype(x))
    if rows is None:
        rows = (row_weight != 0).nonzero().squeeze(1)
        picked_weight = row_weight.index_select(0, rows)
    else:  # padding entries project row 0 with weight 0
        picked_weight = torch.where(rows >= 0, row_weight.index_select(0, rows.clamp(min=0)), 0)
        rows = rows.clamp(min=0)
    prediction = F.linear(x.index_select(0, rows), weight, bias).to(acc_dtype)
    picked = target.reshape(n, -1).index_select(0, rows).to(acc_dtype)
    per_row = F.smooth_l1_loss(prediction, picked, reduction="none", beta=1.0).mean(1)
    return (per_row * picked_weight.to(acc_dtype)).sum() * (normalizer / max(n, 1))


_INTERPRETED = all_interpreted(_feature_regression_fwd_kernel, tl.standard.sum, tl.standard.zeros)
warn_if_imported_too_early(_INTERPRETED, "the feature-regression kernel")


def triton_runs_on(t: Tensor) -> bool:
    """Whether tensors on t's device run the Triton kernel (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or _INTERPRETED


_ROW_DTYPES = (torch.int32, torch.int64)


def masked_feature_regression(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    normalizer: float = 1 / 0.15,
    rows: Tensor | None = None,
) -> Tensor:
    """normalizer / N * sum_i w_i * mean_f SmoothL1(x_i W^T + b - t_i), projecting only rows with w_i != 0.

    x [N, H] (or [..., H]), weight [F, H], bias [F] or None, target [N, F], row_weight [N]. Returns a 0-dim
    fp32 loss (fp64 for fp64 inputs) with gradients for x, weight and bias. rows [M]: the flat indices of every
    row with w_i != 0, unique, padded with -1 (padding contributes nothing), on x's device; None: found by
    nonzero, a host sync.
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
    if rows is not None and (rows.dim() != 1 or rows.device != x.device or rows.dtype not in _ROW_DTYPES):
        raise ValueError(
            f"rows must be int32 / int64 indices [M] on {x.device}, got {rows.dtype} "
            f"{tuple(rows.shape)} on {rows.device}"
        )
    if not triton_runs_on(x):
        return reference_masked_feature_regression(x, weight, bias, target, row_weight, normalizer, rows)
    if not row_weight.is_floating_point():
        row_weight = row_weight.float()
    if rows is None:
        rows = (row_weight != 0).nonzero().squeeze(1)  # the one host sync: the count sizes the buffers
    scale = normalizer / (max(n, 1) * weight.shape[0])
    fwd = torch.ops.lxmert.feature_regression_fwd
    return fwd(x, weight, bias, target, row_weight, rows.long(), scale, _compute_dtype(x))[0]
