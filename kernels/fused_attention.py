"""Fused short-sequence attention: LXMERT's shared cross-attention both ways in one launch, and self-attention.

    out = softmax(q k^T * scale, keys masked) [* keep / (1 - p)] @ v      (per batch row b and head h)

Entry points
- cross_attention(q, k, v, kv_mask, scale, dropout_p): one direction. q [B, H, Lq, D], k / v [B, H, Lk, D],
  kv_mask bool [B, Lk] (True = real key) or None. Self-attention is the same call with k, v from the same
  tokens (the self mask is the key mask), so one kernel serves every attention of the model.
- bidirectional_from_views(lang_qkv, vis_qkv, lang_mask, vis_mask, dropout_p): the cross-modality layer.
  Language queries attend to region keys (masked by vis_mask), region queries to language keys (masked by
  lang_mask), with the same projections. ONE forward launch, grid (B*H, 2 directions), and ONE backward
  launch computing dq, dk, dv of both directions. It has the model's `AttentionBackend.bidirectional`
  signature; `attend` has its `AttendFn` signature. bidirectional_attention(q, k, v, n_lang, ...) takes
  q, k, v [B, H, L+R, D] over the concatenated [language; regions] tokens and slices them.

Design
- A whole (b, h) problem per program: K and V ([Lk, D], Lk <= 128) stay in registers and the full
  [BLOCK_M, Lk] score tile is formed at once, so there is no online softmax; a loop over query blocks of at
  most 64 rows makes Lq unbounded. Its trip count cdiv(Lq, 64) is a constexpr (one compiled variant per
  value; LXMERT's 20 tokens and 36 regions need one iteration), which also keeps the interpreter off
  runtime loop bounds, which newer numpy breaks.
- Both directions in one launch: the kernel takes the language and the region q / k / v as two separate
  sets of pointers and strides (not one concatenated tensor): the model hands us slices of one permuted qkv
  projection, which are views with arbitrary strides, and recovering their common base would be fragile.
  program_id(1) picks the direction, and both branches call the same tile function with the roles swapped.
  In the backward, the (b, h, lang-query) program writes dq of the language rows and dk / dv of the region
  rows, the region-query program the other three: disjoint rows, no atomics, one launch.
- Nothing but the inputs and the dropout seed tensor is saved for the backward: it recomputes the probabilities
  (cheap at this size) and takes delta_i = sum_j P_ij dP_ij from the tile itself, so no O or LSE is stored
  and no preprocessing kernel is needed.
- Softmax in base 2 with log2(e) folded into the scale; accumulation in fp32 (fp64 for fp64 inputs, for
  gradcheck). Dot operands are the input dtype (fp16 / bf16 on tensor cores, P and dS rounded to it as
  flash-attention does); fp32 dots are "tf32x3": three TF32 products (hi*hi + hi*lo + lo*hi) on tensor cores,
  fp32-level error (tests/test_kernels_sm90.py emulates it against float64), where IEEE fp32 dots lowered to
  FMA loops that spilled in 39 of 48 variants on sm_90. fp32's backward runs 8 warps over 16-row query blocks
  (fewer spill at 255 registers). benchmarks/kernels_sm90.py compiles every variant for sm_90 and checks it.
  Outputs are in the input dtype. The output is allocated [B, Lq, H, D] in memory (returned as the
  [B, H, Lq, D] tensor with those strides) so the model's ctx.transpose(1, 2).reshape(B, Lq, H*D) is free.
- A row without a real key outputs zeros and gets zero gradients (softmax over nothing = 0, not NaN).
- Dropout on the attention probabilities, in-kernel: keep_ij = tl.rand(seed, offset_ij) > p with
  offset_ij = (program * Lq + i) * Lk + j, program = b*H + h (bidirectional: the region-query direction
  continues after the language one, program = B*H + b*H + h). Each forward draws its seed as an int64 [1]
  tensor on the inputs' device with torch.randint, i.e. from torch's generator of that device
  (draw_dropout_seed), and the kernels tl.load it: no host read, no host-to-device copy. So torch.manual_seed
  and torch's RNG state decide the masks (reproducible runs; checkpoint resume and activation recomputation,
  which restore that state, redraw the same masks), and inside a captured CUDA graph the draw is a node of
  the graph whose Philox offset torch advances at each replay, so a replay draws new masks (a test checks it
  where there is a GPU; it has not run yet). The forward saves that tensor for the backward, which loads it
  and regenerates the same mask. dropout_keep_mask() materialises the mask with a tiny Triton kernel using
  the same scheme, so the reference can reproduce the kernel exactly.
- torch.compile: each launch is a torch.library custom op, lxmert::attention_fwd / attention_bwd and
  lxmert::bidirectional_fwd / bidirectional_bwd, with a fake impl (the same output shapes and strides, no
  launch) and its autograd registered, so dynamo traces the entry points without a graph break and the
  graph holds one node per launch. The seed is an op input (a tensor: an int would need .item(), a graph
  break). Compiled, its torch.randint is traced and drawn by inductor's generator (still seeded by
  torch.manual_seed, a different stream from eager).

Limits
- On a GPU (sm_90): at most GPU_MAX_KEYS = 64 keys a direction and head dim 128 (fp16 / bf16) or 64 (fp32),
  what compiles with no spill (benchmarks/kernels_sm90.py; LXMERT needs 36 keys of dim 64); beyond, a
  ValueError names attn_backend 'sdpa'. The interpreter keeps the design limits below.
- dtypes fp32, fp16, bf16 (q, k, v the same); fp64 in the interpreter only (gradcheck; a GPU refuses it:
  its masked MMA does not compile on sm_90); any D <= 256 (blocks padded to a power of two >= 16
  with masks: 32 / 64 / 128 are the intended sizes); Lk <= 128 per direction (ValueError beyond); any Lq
  and batch; lengths need not be multiples of anything (every block is masked). Empty inputs take the
  reference path.
  The dropout offsets are int32: B*H*Lq*Lk (x2 for bidirectional) must stay below 2**31.
- Any strides for q, k, v, masks and gradients, except that the last (head) dimension must be unit-stride
  (a copy is made otherwise).
- Device: CUDA tensors run the Triton kernels. CPU tensors run them only under the Triton interpreter,
  i.e. with TRITON_INTERPRET=1 set before triton is first imported (triton 3.6 decides at @triton.jit
  decoration time, for its own tl.sum / tl.max / tl.rand as well as ours). Otherwise CPU tensors fall back
  to reference_attention, differentiated by autograd, with a torch.rand dropout mask (same keep rate, a
  different random stream from the kernel's). triton_runs_on(tensor) says which path a tensor takes.
  The path is picked from facts dynamo guards on (the device type and the module's _INTERPRETED), and the
  fallback is plain torch ops, traced like the rest of the model.
- The interpreter keeps bf16 as raw bits, so there bf16 is converted to fp32 right after each load and
  the dots run in fp32 (the GPU path keeps bf16 dot operands).
- No double backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._mode import all_interpreted, warn_if_imported_too_early

Tensor = torch.Tensor

MAX_KEYS = 128  # the whole key tile lives in registers
GPU_MAX_KEYS = 64  # on sm_90 a 128-key tile spills or overflows shared memory (benchmarks/kernels_sm90.py)
GPU_MAX_HEAD_DIM = 128  # fp16 / bf16
GPU_MAX_HEAD_DIM_FP32 = 64
MAX_BLOCK_M = 64  # query rows per loop iteration
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
# Starting points for an H100; untuned (no GPU was available when this was written).
_NUM_WARPS_FWD = 4
_NUM_WARPS_BWD = 4  # try 8 when BLOCK_M * BLOCK_N >= 64 * 128
_NUM_WARPS_BWD_FP32 = 8
_BWD_BLOCK_M_FP32 = 16  # fp32 backward query blocks: 64 (and 32) rows spill at 255 registers on sm_90


# ----------------------------------------------------------------------------------------- tile functions


@triton.jit
def _load_rows(ptr, stride_l, offs_l, len_l, offs_d, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """[len(offs_l), BLOCK_D] rows of a [L, D] matrix (unit stride in D), zeros outside; cast right away."""
    mask = (offs_l < len_l)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptr + offs_l[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0).to(DOT_DTYPE)


@triton.jit
def _store_rows(ptr, stride_l, offs_l, len_l, offs_d, value, HEAD_DIM: tl.constexpr):
    mask = (offs_l < len_l)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptr + offs_l[:, None] * stride_l + offs_d[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_ok(kv_mask_ptr, stride_mask_l, offs_n, len_k, HAS_MASK: tl.constexpr):
    """[BLOCK_N] True for real keys (inside len_k and, with a mask, marked real)."""
    ok = offs_n < len_k
    if HAS_MASK:
        ok = ok & (tl.load(kv_mask_ptr + offs_n * stride_mask_l, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _dropout_keep(seed, rng_offset, offs_m, offs_n, len_k, dropout_p):
    """[BLOCK_M, BLOCK_N] keep mask of one (program, query block): Philox at offset rng_offset + i*Lk + j."""
    rng = rng_offset + offs_m[:, None] * len_k + offs_n[None, :]
    return tl.rand(seed, rng) > dropout_p


@triton.jit
def _softmax_probs(q, k, key_ok, qk_scale, DOT_PRECISION: tl.constexpr):
    """softmax over the real keys of (q k^T * scale), in base 2; a row with no real key is all zeros."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N] log2 units
    s = tl.where(key_ok[None, :], s, float("-inf"))
    row_max = tl.max(s, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp2(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    return p / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]


@triton.jit
def _attention_fwd_tile(
    q_ptr,  # [Lq, D] queries of one (b, h), row stride stride_ql
    k_ptr,  # [Lk, D] keys of the same (b, h), row stride stride_kl
    v_ptr,  # [Lk, D] values, row stride stride_vl
    o_ptr,  # [Lq, D] output, row stride stride_ol; written
    kv_mask_ptr,  # [Lk] key mask of batch row b (nonzero = real key), stride stride_mask_l; read if HAS_MASK
    stride_ql,
    stride_kl,
    stride_vl,
    stride_ol,
    stride_mask_l,
    len_q,
    len_k,
    qk_scale,
    dropout_p,
    dropout_scale,
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    rng_offset,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr,  # cdiv(Lq, BLOCK_M)
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)  # drawn on this device (draw_dropout_seed): no host value to replay
    k = _load_rows(k_ptr, stride_kl, offs_n, len_k, offs_d, HEAD_DIM, DOT_DTYPE)
    v = _load_rows(v_ptr, stride_vl, offs_n, len_k, offs_d, HEAD_DIM, DOT_DTYPE)
    key_ok = _key_ok(kv_mask_ptr, stride_mask_l, offs_n, len_k, HAS_MASK)
    for m_block in range(NUM_M_BLOCKS):  # a constexpr trip count (1 for LXMERT)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr, stride_ql, offs_m, len_q, offs_d, HEAD_DIM, DOT_DTYPE)
        p = _softmax_probs(q, k, key_ok, qk_scale, DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, offs_m, offs_n, len_k, dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        o = tl.dot(p.to(DOT_DTYPE), v, input_precision=DOT_PRECISION)
        _store_rows(o_ptr, stride_ol, offs_m, len_q, offs_d, o, HEAD_DIM)


@triton.jit
def _attention_bwd_tile(
    q_ptr,  # [Lq, D] queries of one (b, h), row stride stride_ql
    k_ptr,  # [Lk, D] keys, row stride stride_kl
    v_ptr,  # [Lk, D] values, row stride stride_vl
    do_ptr,  # [Lq, D] gradient of the output, row stride stride_dol
    dq_ptr,  # [Lq, D] gradient of q, row stride stride_dql; written
    dk_ptr,  # [Lk, D] gradient of k, row stride stride_dkl; written (this program owns these rows)
    dv_ptr,  # [Lk, D] gradient of v, row stride stride_dvl; written (this program owns these rows)
    kv_mask_ptr,  # [Lk] key mask of batch row b (nonzero = real key), stride stride_mask_l; read if HAS_MASK
    stride_ql,
    stride_kl,
    stride_vl,
    stride_dol,
    stride_dql,
    stride_dkl,
    stride_dvl,
    stride_mask_l,
    len_q,
    len_k,
    qk_scale,
    sm_scale,
    dropout_p,
    dropout_scale,
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    rng_offset,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr,  # cdiv(Lq, BLOCK_M)
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)  # drawn on this device (draw_dropout_seed): no host value to replay
    k = _load_rows(k_ptr, stride_kl, offs_n, len_k, offs_d, HEAD_DIM, DOT_DTYPE)
    v = _load_rows(v_ptr, stride_vl, offs_n, len_k, offs_d, HEAD_DIM, DOT_DTYPE)
    key_ok = _key_ok(kv_mask_ptr, stride_mask_l, offs_n, len_k, HAS_MASK)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for m_block in range(NUM_M_BLOCKS):  # a constexpr trip count (1 for LXMERT)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_ptr, stride_ql, offs_m, len_q, offs_d, HEAD_DIM, DOT_DTYPE)
        do = _load_rows(do_ptr, stride_dol, offs_m, len_q, offs_d, HEAD_DIM, DOT_DTYPE)  # 0 on padded rows
        p = _softmax_probs(q, k, key_ok, qk_scale, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # d loss / d (dropped probabilities)
        p_used = p
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, offs_m, offs_n, len_k, dropout_p)
            p_used = tl.where(keep, p * dropout_scale, 0.0)
            dp = tl.where(keep, dp * dropout_scale, 0.0)  # now d loss / d p
        dv += tl.dot(tl.trans(p_used.to(DOT_DTYPE)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # d loss / d (q k^T * scale); 0 where p = 0
        dq = tl.dot(ds.to(DOT_DTYPE), k, input_precision=DOT_PRECISION) * sm_scale
        _store_rows(dq_ptr, stride_dql, offs_m, len_q, offs_d, dq, HEAD_DIM)
        dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=DOT_PRECISION)
    _store_rows(dk_ptr, stride_dkl, offs_n, len_k, offs_d, dk * sm_scale, HEAD_DIM)
    _store_rows(dv_ptr, stride_dvl, offs_n, len_k, offs_d, dv, HEAD_DIM)


# ---------------------------------------------------------------------------------------------- kernels


# One attention in one direction (language or region self-attention, one side of a cross attention): a program
# per (batch, head). _bidirectional_* run both directions of the cross layer's shared attention in one launch.
@triton.jit
def _attention_fwd_kernel(
    q_ptr,  # [B, H, Lq, D] queries (strides stride_q*, unit stride in D)
    k_ptr,  # [B, H, Lk, D] keys
    v_ptr,  # [B, H, Lk, D] values
    o_ptr,  # [B, H, Lq, D] output; written
    kv_mask_ptr,  # [B, Lk] uint8 view of the bool key mask (1 = real key); a dummy when not HAS_MASK
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_ob,
    stride_oh,
    stride_ol,
    stride_mask_b,
    stride_mask_l,
    num_heads,
    len_q,
    len_k,
    qk_scale,  # scale * log2(e)
    dropout_p,
    dropout_scale,  # 1 / (1 - dropout_p)
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr,  # cdiv(Lq, BLOCK_M)
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    _attention_fwd_tile(
        q_ptr + b * stride_qb + h * stride_qh,
        k_ptr + b * stride_kb + h * stride_kh,
        v_ptr + b * stride_vb + h * stride_vh,
        o_ptr + b * stride_ob + h * stride_oh,
        kv_mask_ptr + b * stride_mask_b,
        stride_ql,
        stride_kl,
        stride_vl,
        stride_ol,
        stride_mask_l,
        len_q,
        len_k,
        qk_scale,
        dropout_p,
        dropout_scale,
        seed_ptr,
        bh * len_q * len_k,
        HAS_MASK,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_M,
        NUM_M_BLOCKS,
        BLOCK_N,
        DOT_DTYPE,
        DOT_PRECISION,
    )


@triton.jit
def _attention_bwd_kernel(
    q_ptr,  # [B, H, Lq, D] queries
    k_ptr,  # [B, H, Lk, D] keys
    v_ptr,  # [B, H, Lk, D] values
    do_ptr,  # [B, H, Lq, D] gradient of the output
    dq_ptr,  # [B, H, Lq, D] gradient of q; written
    dk_ptr,  # [B, H, Lk, D] gradient of k; written
    dv_ptr,  # [B, H, Lk, D] gradient of v; written
    kv_mask_ptr,  # [B, Lk] uint8 view of the bool key mask; a dummy when not HAS_MASK
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_dob,
    stride_doh,
    stride_dol,
    stride_dqb,
    stride_dqh,
    stride_dql,
    stride_dkb,
    stride_dkh,
    stride_dkl,
    stride_dvb,
    stride_dvh,
    stride_dvl,
    stride_mask_b,
    stride_mask_l,
    num_heads,
    len_q,
    len_k,
    qk_scale,  # scale * log2(e)
    sm_scale,  # scale
    dropout_p,
    dropout_scale,
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr,  # cdiv(Lq, BLOCK_M)
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    _attention_bwd_tile(
        q_ptr + b * stride_qb + h * stride_qh,
        k_ptr + b * stride_kb + h * stride_kh,
        v_ptr + b * stride_vb + h * stride_vh,
        do_ptr + b * stride_dob + h * stride_doh,
        dq_ptr + b * stride_dqb + h * stride_dqh,
        dk_ptr + b * stride_dkb + h * stride_dkh,
        dv_ptr + b * stride_dvb + h * stride_dvh,
        kv_mask_ptr + b * stride_mask_b,
        stride_ql,
        stride_kl,
        stride_vl,
        stride_dol,
        stride_dql,
        stride_dkl,
        stride_dvl,
        stride_mask_l,
        len_q,
        len_k,
        qk_scale,
        sm_scale,
        dropout_p,
        dropout_scale,
        seed_ptr,
        bh * len_q * len_k,
        HAS_MASK,
        HAS_DROPOUT,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_M,
        NUM_M_BLOCKS,
        BLOCK_N,
        DOT_DTYPE,
        DOT_PRECISION,
        ACC_DTYPE,
    )


@triton.jit
def _bidirectional_fwd_kernel(
    lq_ptr,  # [B, H, L, D] language queries (strides stride_lq*, unit stride in D)
    lk_ptr,  # [B, H, L, D] language keys
    lv_ptr,  # [B, H, L, D] language values
    vq_ptr,  # [B, H, R, D] region queries
    vk_ptr,  # [B, H, R, D] region keys
    vv_ptr,  # [B, H, R, D] region values
    lo_ptr,  # [B, H, L, D] language context (language queries over region keys); written
    vo_ptr,  # [B, H, R, D] region context (region queries over language keys); written
    lang_mask_ptr,  # [B, L] uint8 language key mask (1 = real token); a dummy when not HAS_LANG_MASK
    vis_mask_ptr,  # [B, R] uint8 region key mask; a dummy when not HAS_VIS_MASK
    stride_lqb,
    stride_lqh,
    stride_lql,
    stride_lkb,
    stride_lkh,
    stride_lkl,
    stride_lvb,
    stride_lvh,
    stride_lvl,
    stride_vqb,
    stride_vqh,
    stride_vql,
    stride_vkb,
    stride_vkh,
    stride_vkl,
    stride_vvb,
    stride_vvh,
    stride_vvl,
    stride_lob,
    stride_loh,
    stride_lol,
    stride_vob,
    stride_voh,
    stride_vol,
    stride_lmask_b,
    stride_lmask_l,
    stride_vmask_b,
    stride_vmask_l,
    num_heads,
    len_lang,
    len_vis,
    qk_scale,
    dropout_p,
    dropout_scale,
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    HAS_LANG_MASK: tl.constexpr,
    HAS_VIS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_LANG_Q: tl.constexpr,  # query rows per iteration when the language side queries
    NUM_LANG_Q_BLOCKS: tl.constexpr,  # cdiv(L, BLOCK_LANG_Q)
    BLOCK_LANG_K: tl.constexpr,  # the whole (padded) language side as keys
    BLOCK_VIS_Q: tl.constexpr,
    NUM_VIS_Q_BLOCKS: tl.constexpr,
    BLOCK_VIS_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    if tl.program_id(1) == 0:  # language queries over region keys
        _attention_fwd_tile(
            lq_ptr + b * stride_lqb + h * stride_lqh,
            vk_ptr + b * stride_vkb + h * stride_vkh,
            vv_ptr + b * stride_vvb + h * stride_vvh,
            lo_ptr + b * stride_lob + h * stride_loh,
            vis_mask_ptr + b * stride_vmask_b,
            stride_lql,
            stride_vkl,
            stride_vvl,
            stride_lol,
            stride_vmask_l,
            len_lang,
            len_vis,
            qk_scale,
            dropout_p,
            dropout_scale,
            seed_ptr,
            bh * len_lang * len_vis,
            HAS_VIS_MASK,
            HAS_DROPOUT,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_LANG_Q,
            NUM_LANG_Q_BLOCKS,
            BLOCK_VIS_K,
            DOT_DTYPE,
            DOT_PRECISION,
        )
    else:  # region queries over language keys; its dropout stream follows the language direction's
        _attention_fwd_tile(
            vq_ptr + b * stride_vqb + h * stride_vqh,
            lk_ptr + b * stride_lkb + h * stride_lkh,
            lv_ptr + b * stride_lvb + h * stride_lvh,
            vo_ptr + b * stride_vob + h * stride_voh,
            lang_mask_ptr + b * stride_lmask_b,
            stride_vql,
            stride_lkl,
            stride_lvl,
            stride_vol,
            stride_lmask_l,
            len_vis,
            len_lang,
            qk_scale,
            dropout_p,
            dropout_scale,
            seed_ptr,
            (tl.num_programs(0) + bh) * len_lang * len_vis,
            HAS_LANG_MASK,
            HAS_DROPOUT,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_VIS_Q,
            NUM_VIS_Q_BLOCKS,
            BLOCK_LANG_K,
            DOT_DTYPE,
            DOT_PRECISION,
        )


@triton.jit
def _bidirectional_bwd_kernel(
    lq_ptr,  # [B, H, L, D] language queries
    lk_ptr,  # [B, H, L, D] language keys
    lv_ptr,  # [B, H, L, D] language values
    vq_ptr,  # [B, H, R, D] region queries
    vk_ptr,  # [B, H, R, D] region keys
    vv_ptr,  # [B, H, R, D] region values
    dlo_ptr,  # [B, H, L, D] gradient of the language context
    dvo_ptr,  # [B, H, R, D] gradient of the region context
    dlq_ptr,  # [B, H, L, D] gradient of lq; written by the language-query program
    dlk_ptr,  # [B, H, L, D] gradient of lk; written by the region-query program
    dlv_ptr,  # [B, H, L, D] gradient of lv; written by the region-query program
    dvq_ptr,  # [B, H, R, D] gradient of vq; written by the region-query program
    dvk_ptr,  # [B, H, R, D] gradient of vk; written by the language-query program
    dvv_ptr,  # [B, H, R, D] gradient of vv; written by the language-query program
    lang_mask_ptr,  # [B, L] uint8 language key mask; a dummy when not HAS_LANG_MASK
    vis_mask_ptr,  # [B, R] uint8 region key mask; a dummy when not HAS_VIS_MASK
    stride_lqb,
    stride_lqh,
    stride_lql,
    stride_lkb,
    stride_lkh,
    stride_lkl,
    stride_lvb,
    stride_lvh,
    stride_lvl,
    stride_vqb,
    stride_vqh,
    stride_vql,
    stride_vkb,
    stride_vkh,
    stride_vkl,
    stride_vvb,
    stride_vvh,
    stride_vvl,
    stride_dlob,
    stride_dloh,
    stride_dlol,
    stride_dvob,
    stride_dvoh,
    stride_dvol,
    stride_dlb,
    stride_dlh,
    stride_dll,  # shared by dlq, dlk, dlv (allocated together)
    stride_dvb,
    stride_dvh,
    stride_dvl,  # shared by dvq, dvk, dvv
    stride_lmask_b,
    stride_lmask_l,
    stride_vmask_b,
    stride_vmask_l,
    num_heads,
    len_lang,
    len_vis,
    qk_scale,
    sm_scale,
    dropout_p,
    dropout_scale,
    seed_ptr,  # int64 [1] dropout seed on this device; read if HAS_DROPOUT
    HAS_LANG_MASK: tl.constexpr,
    HAS_VIS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_LANG_Q: tl.constexpr,
    NUM_LANG_Q_BLOCKS: tl.constexpr,
    BLOCK_LANG_K: tl.constexpr,
    BLOCK_VIS_Q: tl.constexpr,
    NUM_VIS_Q_BLOCKS: tl.constexpr,
    BLOCK_VIS_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    lang_grad = b * stride_dlb + h * stride_dlh
    vis_grad = b * stride_dvb + h * stride_dvh
    if tl.program_id(1) == 0:  # language queries over region keys: dlq, dvk, dvv
        _attention_bwd_tile(
            lq_ptr + b * stride_lqb + h * stride_lqh,
            vk_ptr + b * stride_vkb + h * stride_vkh,
            vv_ptr + b * stride_vvb + h * stride_vvh,
            dlo_ptr + b * stride_dlob + h * stride_dloh,
            dlq_ptr + lang_grad,
            dvk_ptr + vis_grad,
            dvv_ptr + vis_grad,
            vis_mask_ptr + b * stride_vmask_b,
            stride_lql,
            stride_vkl,
            stride_vvl,
            stride_dlol,
            stride_dll,
            stride_dvl,
            stride_dvl,
            stride_vmask_l,
            len_lang,
            len_vis,
            qk_scale,
            sm_scale,
            dropout_p,
            dropout_scale,
            seed_ptr,
            bh * len_lang * len_vis,
            HAS_VIS_MASK,
            HAS_DROPOUT,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_LANG_Q,
            NUM_LANG_Q_BLOCKS,
            BLOCK_VIS_K,
            DOT_DTYPE,
            DOT_PRECISION,
            ACC_DTYPE,
        )
    else:  # region queries over language keys: dvq, dlk, dlv
        _attention_bwd_tile(
            vq_ptr + b * stride_vqb + h * stride_vqh,
            lk_ptr + b * stride_lkb + h * stride_lkh,
            lv_ptr + b * stride_lvb + h * stride_lvh,
            dvo_ptr + b * stride_dvob + h * stride_dvoh,
            dvq_ptr + vis_grad,
            dlk_ptr + lang_grad,
            dlv_ptr + lang_grad,
            lang_mask_ptr + b * stride_lmask_b,
            stride_vql,
            stride_lkl,
            stride_lvl,
            stride_dvol,
            stride_dvl,
            stride_dll,
            stride_dll,
            stride_lmask_l,
            len_vis,
            len_lang,
            qk_scale,
            sm_scale,
            dropout_p,
            dropout_scale,
            seed_ptr,
            (tl.num_programs(0) + bh) * len_lang * len_vis,
            HAS_LANG_MASK,
            HAS_DROPOUT,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_VIS_Q,
            NUM_VIS_Q_BLOCKS,
            BLOCK_LANG_K,
            DOT_DTYPE,
            DOT_PRECISION,
            ACC_DTYPE,
        )


@triton.jit
def _dropout_mask_kernel(
    keep_ptr,  # [P, Lq, Lk] uint8, contiguous: the keep mask of programs first_program .. first_program+P-1
    seed_ptr,  # int64 [1] dropout seed
    first_program,
    len_q,
    len_k,
    dropout_p,
    BLOCK_M: tl.constexpr,
    NUM_M_BLOCKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    seed = tl.load(seed_ptr)
    offs_n = tl.arange(0, BLOCK_N)
    rng_offset = (first_program + pid) * len_q * len_k
    for m_block in range(NUM_M_BLOCKS):  # a constexpr trip count (1 for LXMERT)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        keep = _dropout_keep(seed, rng_offset, offs_m, offs_n, len_k, dropout_p)
        mask = (offs_m < len_q)[:, None] & (offs_n < len_k)[None, :]
        ptrs = keep_ptr + pid.to(tl.int64) * len_q * len_k + offs_m[:, None] * len_k + offs_n[None, :]
        tl.store(ptrs, keep.to(tl.uint8), mask=mask)


# -------------------------------------------------------------------------------------- which path runs


_INTERPRETED = all_interpreted(_attention_fwd_kernel, tl.standard.sum, tl.standard.max, tl.random.rand)
warn_if_imported_too_early(_INTERPRETED, "the attention kernels")


def triton_runs_on(t: Tensor) -> bool:
    """Whether tensors on t's device run the Triton kernels (CUDA, or CPU under the interpreter)."""
    return t.is_cuda or _INTERPRETED


# ------------------------------------------------------------------------------------------- launchers


_FP32_DOT_PRECISION = "tf32x3"  # fp32 dots on tensor cores, three TF32 products: fp32-level error (see header)
_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _dtype_args(dtype: torch.dtype) -> dict:
    """DOT_DTYPE, DOT_PRECISION, ACC_DTYPE for an input dtype (see the header for the interpreter's bf16)."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"attention kernel: unsupported dtype {dtype} (fp32, fp16, bf16, fp64)")
    if dtype == torch.float64 and not _INTERPRETED:
        raise TypeError(
            "attention kernel: fp64 runs in the Triton interpreter only (gradcheck on the CPU); "
            "on a GPU use fp32, bf16 or fp16"
        )
    dot = tl.float32 if (dtype == torch.bfloat16 and _INTERPRETED) else _TL_DTYPES[dtype]
    return dict(
        DOT_DTYPE=dot,
        DOT_PRECISION=_FP32_DOT_PRECISION if dtype == torch.float32 else "ieee" if dtype == torch.float64 else None,
        ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
    )


def _bwd_warps(dtype: torch.dtype) -> int:
    """fp32's tf32x3 dots hold three operand splits: twice the warps share the registers (no spills on sm_90)."""
    return _NUM_WARPS_BWD_FP32 if dtype == torch.float32 else _NUM_WARPS_BWD


def _block(n: int) -> int:
    """The whole length padded to a power of two >= 16 (tl.dot needs >= 16 on the GPU)."""
    return max(16, triton.next_power_of_2(max(n, 1)))


def _query_blocks(len_q: int, cap: int = MAX_BLOCK_M) -> tuple[int, int]:
    """(rows per query block, number of blocks): the trip count is a constexpr, 1 for LXMERT (2-3 for fp32's
    backward, whose blocks are capped at _BWD_BLOCK_M_FP32 rows)."""
    block = min(_block(len_q), cap)
    return block, triton.cdiv(len_q, block)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhl(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(kv_mask: Tensor | None, like: Tensor, batch: int, length: int) -> tuple[Tensor, int, int]:
    """(uint8 view of the mask or a dummy, stride_b, stride_l); the entry points have checked it (_check_mask)."""
    if kv_mask is None:
        return like, 0, 0
    mask = (kv_mask if kv_mask.dtype == torch.bool else kv_mask != 0).view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _empty_bhld(batch: int, heads: int, length: int, dim: int, like: Tensor) -> Tensor:
    """[B, H, L, D] laid out as [B, L, H, D], so that transpose(1, 2).reshape(B, L, H*D) is a view."""
    return torch.empty_strided(
        (batch, heads, length, dim), (length * heads * dim, dim, heads * dim, 1), dtype=like.dtype, device=like.device
    )


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, L, D]")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"shapes do not match: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError("q, k, v must share dtype and device")
    if k.shape[2] > MAX_KEYS:
        raise ValueError(f"attention kernel: {k.shape[2]} keys > MAX_KEYS = {MAX_KEYS}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head dim {q.shape[3]} > {MAX_HEAD_DIM}")
    if q.is_cuda:  # what compiles for sm_90 without spills (benchmarks/kernels_sm90.py); the interpreter is freer
        max_dim = GPU_MAX_HEAD_DIM_FP32 if q.dtype == torch.float32 else GPU_MAX_HEAD_DIM
        if k.shape[2] > GPU_MAX_KEYS or q.shape[3] > max_dim:
            raise ValueError(
                f"attention kernel on a GPU: at most {GPU_MAX_KEYS} keys and head dim {max_dim} "
                f"({q.dtype}), got {k.shape[2]} keys of dim {q.shape[3]}: use attn_backend 'sdpa'"
            )


def _check_mask(kv_mask: Tensor | None, like: Tensor, batch: int, length: int) -> None:
    if kv_mask is None:
        return
    if tuple(kv_mask.shape) != (batch, length):
        raise ValueError(f"key mask must be [B, Lk] = {[batch, length]}, got {list(kv_mask.shape)}")
    if kv_mask.device != like.device:
        raise ValueError(f"key mask is on {kv_mask.device}, q / k / v on {like.device}")


def _check_rng(programs: int, len_q: int, len_k: int) -> None:
    if programs * len_q * len_k >= 2**31:
        raise ValueError("attention dropout: B*H*Lq*Lk is too large for the int32 Philox offsets")


def draw_dropout_seed(device) -> Tensor:
    """int64 [1] on `device`: the seed the entry points draw for one forward, by torch's generator of that device
    (CUDA: its Philox, which a captured graph advances at each replay; CPU: the default generator), so
    torch.manual_seed and torch's RNG state (checkpoint, activation recomputation) decide it. The kernels load it
    with tl.load: no host read, no copy. After torch.manual_seed(s) it is the seed of the first call that
    follows (tests rebuild the kernel's mask with it)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device)


def _dropout_args(dropout_p: float, seed: Tensor | None, like: Tensor) -> dict:
    """The kernels' dropout arguments; without dropout the seed pointer is `like` (never loaded)."""
    if seed is not None and seed.device != like.device:
        raise ValueError(f"dropout seed is on {seed.device}, the inputs on {like.device}")
    return dict(
        dropout_p=float(dropout_p), dropout_scale=1.0 / (1.0 - dropout_p), seed_ptr=like if seed is None else seed
    )


def _attention_fwd(q, k, v, kv_mask, scale, dropout_p, seed) -> Tensor:
    batch, heads, len_q, dim = q.shape
    len_k = k.shape[2]
    block_m, num_m_blocks = _query_blocks(len_q)
    out = _empty_bhld(batch, heads, len_q, dim, q)
    mask, smb, sml = _mask_args(kv_mask, q, batch, len_k)
    dt = _dtype_args(q.dtype)
    _attention_fwd_kernel[(batch * heads,)](
        q,
        k,
        v,
        out,
        mask,
        *_bhl(q),
        *_bhl(k),
        *_bhl(v),
        *_bhl(out),
        smb,
        sml,
        heads,
        len_q,
        len_k,
        scale * _LOG2E,
        **_dropout_args(dropout_p, seed, q),
        HAS_MASK=kv_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        HEAD_DIM=dim,
        BLOCK_D=_block(dim),
        BLOCK_M=block_m,
        NUM_M_BLOCKS=num_m_blocks,
        BLOCK_N=_block(len_k),
        DOT_DTYPE=dt["DOT_DTYPE"],
        DOT_PRECISION=dt["DOT_PRECISION"],
        num_warps=_NUM_WARPS_FWD,
    )
    return out


def _attention_bwd(q, k, v, kv_mask, d_out, scale, dropout_p, seed) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, len_q, dim = q.shape
    len_k = k.shape[2]
    block_m, num_m_blocks = _query_blocks(len_q, _BWD_BLOCK_M_FP32 if q.dtype == torch.float32 else MAX_BLOCK_M)
    d_out = _unit_last(d_out)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, smb, sml = _mask_args(kv_mask, q, batch, len_k)
    _attention_bwd_kernel[(batch * heads,)](
        q,
        k,
        v,
        d_out,
        dq,
        dk,
        dv,
        mask,
        *_bhl(q),
        *_bhl(k),
        *_bhl(v),
        *_bhl(d_out),
        *_bhl(dq),
        *_bhl(dk),
        *_bhl(dv),
        smb,
        sml,
        heads,
        len_q,
        len_k,
        scale * _LOG2E,
        scale,
        **_dropout_args(dropout_p, seed, q),
        HAS_MASK=kv_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        HEAD_DIM=dim,
        BLOCK_D=_block(dim),
        BLOCK_M=block_m,
        NUM_M_BLOCKS=num_m_blocks,
        BLOCK_N=_block(len_k),
        **_dtype_args(q.dtype),
        num_warps=_bwd_warps(q.dtype),
    )
    return dq, dk, dv


def _bidirectional_blocks(len_lang: int, len_vis: int, dim: int) -> dict:
    (block_lang_q, num_lang_q), (block_vis_q, num_vis_q) = _query_blocks(len_lang), _query_blocks(len_vis)
    return dict(
        HEAD_DIM=dim,
        BLOCK_D=_block(dim),
        BLOCK_LANG_Q=block_lang_q,
        NUM_LANG_Q_BLOCKS=num_lang_q,
        BLOCK_LANG_K=_block(len_lang),
        BLOCK_VIS_Q=block_vis_q,
        NUM_VIS_Q_BLOCKS=num_vis_q,
        BLOCK_VIS_K=_block(len_vis),
    )


def _bidirectional_fwd(lang, vis, lang_mask, vis_mask, scale, dropout_p, seed) -> tuple[Tensor, Tensor]:
    (lq, lk, lv), (vq, vk, vv) = lang, vis
    batch, heads, len_lang, dim = lq.shape
    len_vis = vq.shape[2]
    lang_out = _empty_bhld(batch, heads, len_lang, dim, lq)
    vis_out = _empty_bhld(batch, heads, len_vis, dim, vq)
    lmask, slb, sll = _mask_args(lang_mask, lq, batch, len_lang)
    vmask, svb, svl = _mask_args(vis_mask, lq, batch, len_vis)
    dt = _dtype_args(lq.dtype)
    _bidirectional_fwd_kernel[(batch * heads, 2)](
        lq,
        lk,
        lv,
        vq,
        vk,
        vv,
        lang_out,
        vis_out,
        lmask,
        vmask,
        *_bhl(lq),
        *_bhl(lk),
        *_bhl(lv),
        *_bhl(vq),
        *_bhl(vk),
        *_bhl(vv),
        *_bhl(lang_out),
        *_bhl(vis_out),
        slb,
        sll,
        svb,
        svl,
        heads,
        len_lang,
        len_vis,
        scale * _LOG2E,
        **_dropout_args(dropout_p, seed, lq),
        HAS_LANG_MASK=lang_mask is not None,
        HAS_VIS_MASK=vis_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        **_bidirectional_blocks(len_lang, len_vis, dim),
        DOT_DTYPE=dt["DOT_DTYPE"],
        DOT_PRECISION=dt["DOT_PRECISION"],
        num_warps=_NUM_WARPS_FWD,
    )
    return lang_out, vis_out


def _bidirectional_bwd(lang, vis, lang_mask, vis_mask, d_lang, d_vis, scale, dropout_p, seed) -> tuple[Tensor, Tensor]:
    (lq, lk, lv), (vq, vk, vv) = lang, vis
    batch, heads, len_lang, dim = lq.shape
    len_vis = vq.shape[2]
    d_lang, d_vis = _unit_last(d_lang), _unit_last(d_vis)
    lang_grads = torch.empty((3, batch, heads, len_lang, dim), dtype=lq.dtype, device=lq.device)
    vis_grads = torch.empty((3, batch, heads, len_vis, dim), dtype=vq.dtype, device=vq.device)
    lmask, slb, sll = _mask_args(lang_mask, lq, batch, len_lang)
    vmask, svb, svl = _mask_args(vis_mask, lq, batch, len_vis)
    _bidirectional_bwd_kernel[(batch * heads, 2)](
        lq,
        lk,
        lv,
        vq,
        vk,
        vv,
        d_lang,
        d_vis,
        *lang_grads,
        *vis_grads,
        lmask,
        vmask,
        *_bhl(lq),
        *_bhl(lk),
        *_bhl(lv),
        *_bhl(vq),
        *_bhl(vk),
        *_bhl(vv),
        *_bhl(d_lang),
        *_bhl(d_vis),
        *_bhl(lang_grads[0]),
        *_bhl(vis_grads[0]),
        slb,
        sll,
        svb,
        svl,
        heads,
        len_lang,
        len_vis,
        scale * _LOG2E,
        scale,
        **_dropout_args(dropout_p, seed, lq),
        HAS_LANG_MASK=lang_mask is not None,
        HAS_VIS_MASK=vis_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0,
        **_bidirectional_blocks(len_lang, len_vis, dim),
        **_dtype_args(lq.dtype),
        num_warps=_bwd_warps(lq.dtype),
    )
    return lang_grads, vis_grads  # [3, B, H, L, D] and [3, B, H, R, D]: (dq, dk, dv) of each side


# ------------------------------------------------------------------------------------ torch.library ops
# One custom op per launch, so torch.compile traces each as one opaque node. A fake impl allocates what its
# launcher allocates (same shapes and strides: outputs laid out [B, L, H, D]) and launches nothing. The seed is
# draw_dropout_seed's int64 [1] on the inputs' device, or None without dropout; the backward gets the forward's.


@torch.library.custom_op("lxmert::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, scale: float, dropout_p: float, seed: Tensor | None
) -> Tensor:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _attention_fwd(q, k, v, kv_mask, scale, dropout_p, seed)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, kv_mask, scale, dropout_p, seed):
    return _empty_bhld(*q.shape, q)


@torch.library.custom_op("lxmert::attention_bwd", mutates_args=())
def _attention_bwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_mask: Tensor | None,
    d_out: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _attention_bwd(q, k, v, kv_mask, d_out, scale, dropout_p, seed)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(q, k, v, kv_mask, d_out, scale, dropout_p, seed):
    return tuple(torch.empty_like(_unit_last(t)) for t in (q, k, v))


def _attention_setup(ctx, inputs, output):
    q, k, v, kv_mask, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, kv_mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _attention_backward(ctx, d_out):
    q, k, v, kv_mask, seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.lxmert.attention_bwd(q, k, v, kv_mask, d_out, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("lxmert::bidirectional_fwd", mutates_args=())
def _bidirectional_fwd_op(
    lq: Tensor,
    lk: Tensor,
    lv: Tensor,
    vq: Tensor,
    vk: Tensor,
    vv: Tensor,
    lang_mask: Tensor | None,
    vis_mask: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    lang, vis = tuple(_unit_last(t) for t in (lq, lk, lv)), tuple(_unit_last(t) for t in (vq, vk, vv))
    return _bidirectional_fwd(lang, vis, lang_mask, vis_mask, scale, dropout_p, seed)


@_bidirectional_fwd_op.register_fake
def _bidirectional_fwd_fake(lq, lk, lv, vq, vk, vv, lang_mask, vis_mask, scale, dropout_p, seed):
    return _empty_bhld(*lq.shape, lq), _empty_bhld(*vq.shape, vq)


@torch.library.custom_op("lxmert::bidirectional_bwd", mutates_args=())
def _bidirectional_bwd_op(
    lq: Tensor,
    lk: Tensor,
    lv: Tensor,
    vq: Tensor,
    vk: Tensor,
    vv: Tensor,
    lang_mask: Tensor | None,
    vis_mask: Tensor | None,
    d_lang: Tensor,
    d_vis: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(dq, dk, dv of the language side stacked [3, B, H, L, D], the same of the regions [3, B, H, R, D])."""
    lang, vis = tuple(_unit_last(t) for t in (lq, lk, lv)), tuple(_unit_last(t) for t in (vq, vk, vv))
    return _bidirectional_bwd(lang, vis, lang_mask, vis_mask, d_lang, d_vis, scale, dropout_p, seed)


@_bidirectional_bwd_op.register_fake
def _bidirectional_bwd_fake(lq, lk, lv, vq, vk, vv, lang_mask, vis_mask, d_lang, d_vis, scale, dropout_p, seed):
    return lq.new_empty((3, *lq.shape)), vq.new_empty((3, *vq.shape))


def _bidirectional_setup(ctx, inputs, output):
    *qkv, lang_mask, vis_mask, scale, dropout_p, seed = inputs
    ctx.save_for_backward(*qkv, lang_mask, vis_mask, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _bidirectional_backward(ctx, d_lang, d_vis):
    *qkv, lang_mask, vis_mask, seed = ctx.saved_tensors  # an unused output's gradient comes as zeros
    lang_grads, vis_grads = torch.ops.lxmert.bidirectional_bwd(
        *qkv, lang_mask, vis_mask, d_lang, d_vis, ctx.scale, ctx.dropout_p, seed
    )
    return (*lang_grads.unbind(0), *vis_grads.unbind(0), None, None, None, None, None)


_bidirectional_fwd_op.register_autograd(_bidirectional_backward, setup_context=_bidirectional_setup)


# ------------------------------------------------------------------------------------------ entry points


def _default_scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _torch_keep(shape: tuple[int, ...], dropout_p: float, device) -> Tensor | None:
    """The CPU fallback's dropout mask: same keep rate as the kernel's, torch's random stream."""
    return torch.rand(shape, device=device) >= dropout_p if dropout_p > 0.0 else None


def cross_attention(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0
) -> Tensor:
    """softmax(q k^T * scale, keys where kv_mask is False hidden) [dropout] @ v.

    q [B, H, Lq, D], k / v [B, H, Lk, D] (any strides), kv_mask bool [B, Lk] (True = real key) or None,
    scale default 1/sqrt(D). Returns [B, H, Lq, D] in q's dtype; a row with no real key is zeros.
    """
    _check(q, k, v)
    _check_dropout(dropout_p)
    scale = _default_scale(q, scale)
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    _check_mask(kv_mask, q, batch, len_k)
    if not triton_runs_on(q) or q.numel() == 0 or k.numel() == 0:
        keep = _torch_keep((batch, heads, len_q, len_k), dropout_p, q.device)
        return reference_attention(q, k, v, kv_mask, scale, keep, dropout_p)
    if dropout_p > 0.0:
        _check_rng(batch * heads, len_q, len_k)
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else None
    return torch.ops.lxmert.attention_fwd(q, k, v, kv_mask, scale, dropout_p, seed)


def bidirectional_from_views(
    lang_qkv: tuple[Tensor, Tensor, Tensor],
    vis_qkv: tuple[Tensor, Tensor, Tensor],
    lang_mask: Tensor | None,
    vis_mask: Tensor | None,
    dropout_p: float,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The cross layer both ways in one launch: (lang_ctx [B, H, L, D], vis_ctx [B, H, R, D]).

    lang_qkv: (q, k, v) of the language tokens [B, H, L, D]; vis_qkv: of the regions [B, H, R, D]; any
    strides (the model passes slices of one permuted projection). lang_ctx = attention of the language
    queries over the region keys (vis_mask), vis_ctx = region queries over the language keys (lang_mask).
    The signature of lxmert.attention.AttentionBackend.bidirectional.
    """
    (lq, lk, lv), (vq, vk, vv) = lang_qkv, vis_qkv
    _check(lq, vk, vv)
    _check(vq, lk, lv)
    if lq.shape[2] != lk.shape[2] or vq.shape[2] != vk.shape[2]:
        raise ValueError("the language (or region) q, k, v must have the same length")
    _check_dropout(dropout_p)
    scale = _default_scale(lq, scale)
    batch, heads, len_lang, _ = lq.shape
    len_vis = vq.shape[2]
    _check_mask(lang_mask, lq, batch, len_lang)
    _check_mask(vis_mask, lq, batch, len_vis)
    if not triton_runs_on(lq) or lq.numel() == 0 or vq.numel() == 0:
        lang_keep = _torch_keep((batch, heads, len_lang, len_vis), dropout_p, lq.device)
        vis_keep = _torch_keep((batch, heads, len_vis, len_lang), dropout_p, lq.device)
        return (
            reference_attention(lq, vk, vv, vis_mask, scale, lang_keep, dropout_p),
            reference_attention(vq, lk, lv, lang_mask, scale, vis_keep, dropout_p),
        )
    if dropout_p > 0.0:
        _check_rng(2 * batch * heads, len_lang, len_vis)
    seed = draw_dropout_seed(lq.device) if dropout_p > 0.0 else None
    return torch.ops.lxmert.bidirectional_fwd(lq, lk, lv, vq, vk, vv, lang_mask, vis_mask, scale, dropout_p, seed)


def bidirectional_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_lang: int,
    lang_mask: Tensor | None = None,
    vis_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """bidirectional_from_views over q, k, v [B, H, L+R, D] of the concatenated [language; regions] tokens."""
    lang = tuple(t[:, :, :n_lang] for t in (q, k, v))
    vis = tuple(t[:, :, n_lang:] for t in (q, k, v))
    return bidirectional_from_views(lang, vis, lang_mask, vis_mask, dropout_p, scale=scale)


def attend(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float) -> Tensor:
    """cross_attention with the model's AttendFn signature (lxmert.attention)."""
    return cross_attention(q, k, v, kv_mask, dropout_p=dropout_p)


# ------------------------------------------------------------------------------- reference and dropout mask


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """The same function by plain torch ops, in q's dtype (float64 for the tests' ground truth).

    dropout_keep: bool [B, H, Lq, Lk] or None; kept probabilities are divided by (1 - dropout_p).
    A row with no real key outputs zeros (and gets zero gradients).
    """
    scale = _default_scale(q, scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if kv_mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        key_ok = kv_mask[:, None, None, :].to(torch.bool)
        scores = scores.masked_fill(~key_ok, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1) * key_ok  # all-masked rows: uniform * 0
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return torch.matmul(probs, v)


def dropout_keep_mask(
    seed: Tensor | int,
    batch: int,
    heads: int,
    len_q: int,
    len_k: int,
    dropout_p: float,
    device,
    first_program: int = 0,
) -> Tensor:
    """bool [B, H, Lq, Lk]: the keep mask the kernels draw for `seed` (programs from first_program on).

    seed: a draw_dropout_seed tensor (int64 [1] on `device`, read by the kernel as the attention kernels read
    it) or an int. cross_attention uses first_program=0; bidirectional uses 0 for the language-query direction
    ([B, H, L, R]) and B*H for the region-query direction ([B, H, R, L]). Runs a tiny Triton kernel with the
    kernels' own offset scheme, so it needs triton_runs_on(device).
    """
    keep = torch.empty((batch * heads, len_q, len_k), dtype=torch.uint8, device=device)
    if not isinstance(seed, Tensor):
        seed = torch.tensor([seed], dtype=torch.int64, device=device)
    if seed.device != keep.device:
        raise ValueError(f"dropout seed is on {seed.device}, the mask on {keep.device}")
    block_m, num_m_blocks = _query_blocks(len_q)
    if keep.numel():
        _dropout_mask_kernel[(batch * heads,)](
            keep,
            seed,
            first_program,
            len_q,
            len_k,
            float(dropout_p),
            BLOCK_M=block_m,
            NUM_M_BLOCKS=num_m_blocks,
            BLOCK_N=_block(len_k),
        )
    return keep.view(batch, heads, len_q, len_k).bool()
