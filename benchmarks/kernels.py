"""Kernel benchmarks: the fused attention and feature-regression kernels against their PyTorch alternatives.

    python -m benchmarks.kernels [--quick] [--check-only] [--out runs/benchmarks/kernels.jsonl]

Run it as a module from the repository root (run as a file, `import kernels` would find this file). On a GPU it
first checks correctness at LXMERT's sizes by the tests' rule (kernels.errors.against_float64: fp32 within
1e-5, bf16 / fp16 within 2x PyTorch's own error in that dtype plus a constant), then times three modes in Liger's
sense with harness.time_cuda: forward (autograd recording), backward (over a fresh graph, its forward untimed)
and full, with peak memory. Attention TFLOP/s counts 4*B*H*Lq*Lk*D forward and 2.5x that backward (padded keys
counted); GB/s the least traffic. The cross layer's baseline is two single-direction calls of each provider ("x2").
A provider that refuses a mask, dtype or shape gets a row with a note. No config starts after TIME_BUDGET_S.
Without a GPU nothing is timed: the checks run at tiny sizes in the Triton interpreter, which this module turns on
before triton is imported. The exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# triton picks interpreter or compiler when it is imported (for its own tl.* helpers too), so this must come
# before anything imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from benchmarks import harness  # noqa: E402
from kernels import feature_regression, fused_attention  # noqa: E402
from kernels.errors import ATTENTION_SLACK, FEATURE_SLACK, against_float64, norm_rel_err, rel_err  # noqa: E402
from lxmert import attention, losses  # noqa: E402

Tensor = torch.Tensor

NO_GPU = "no GPU: kernel timings are only meaningful on a GPU; the Triton interpreter is not kernel speed"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
N_LANG, N_VIS, HEADS, HEAD_DIM = 20, 36, 12, 64
PAD_FRACTION = 0.15  # of language positions; regions are never padded
HIDDEN, FEATURES = 768, 2048
MASK_FRACTION = 0.15  # of regions, for feature regression
NORMALIZER = 1 / 0.15
WARMUP, REPS = 10, 50
QUICK_WARMUP, QUICK_REPS = 5, 20
TIME_BUDGET_S = 400.0  # no new config starts after this much timing: the run and its summary fit 10 minutes


# ---------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class AttentionConfig:
    batch: int
    len_q: int  # bidirectional: the language tokens
    len_k: int  # bidirectional: the regions
    masked: bool  # language keys padded (~15%): keys of length len_k, or the language side of the pair
    bidirectional: bool = False
    head_dim: int = HEAD_DIM
    heads: int = HEADS
    dtype: str = "bf16"

    @property
    def name(self) -> str:
        shape = f"{self.len_q}+{self.len_k} both ways" if self.bidirectional else f"{self.len_q}x{self.len_k}"
        return f"B{self.batch} {shape} d{self.head_dim}" + (" masked" if self.masked else "")

    def flops(self, mode: str) -> float:
        pairs = (2 if self.bidirectional else 1) * self.len_q * self.len_k
        factor = {"forward": 1.0, "backward": 2.5, "full": 3.5}[mode]
        return 4.0 * self.batch * self.heads * pairs * self.head_dim * factor

    def min_bytes(self, mode: str) -> float:
        """Each input read once, each output written once (forward q, k, v -> o; backward q, k, v, do -> dq,
        dk, dv). Both ways, every token is a query and a key."""
        q_rows, kv_rows = (self.len_q + self.len_k,) * 2 if self.bidirectional else (self.len_q, self.len_k)
        per_q, per_kv = {"forward": (2, 2), "backward": (3, 4), "full": (4, 4)}[mode]
        itemsize = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return float(self.batch * self.heads * self.head_dim * itemsize * (per_q * q_rows + per_kv * kv_rows))


@dataclass(frozen=True)
class FeatureConfig:
    batch: int  # images; N = batch x regions
    dtype: str  # "fp32", or "bf16" under autocast (fp32 inputs and parameters, as in mixed precision)
    regions: int = N_VIS
    hidden: int = HIDDEN
    features: int = FEATURES

    @property
    def name(self) -> str:
        return f"N{self.batch * self.regions} H{self.hidden} F{self.features}"


SINGLE_PROVIDERS = ["triton", "eager", "sdpa_flash", "sdpa_efficient", "compile", "flash_attn"]
BIDIRECTIONAL_PROVIDERS = ["triton_bidirectional"] + [f"{p} x2" for p in SINGLE_PROVIDERS]
FEATURE_PROVIDERS = ["triton_fused", "torch_masked", "torch_all_rows"]
OURS = {"triton", "triton_bidirectional", "triton_fused"}  # the summary compares these with the best other


def lxmert_shapes(batch: int, dtype: str = "bf16", heads: int = HEADS) -> list[AttentionConfig]:
    return [
        AttentionConfig(batch, N_LANG, N_VIS, False, heads=heads, dtype=dtype),  # language over regions
        AttentionConfig(batch, N_VIS, N_LANG, True, heads=heads, dtype=dtype),  # regions over padded language
        AttentionConfig(batch, N_LANG, N_LANG, True, heads=heads, dtype=dtype),  # language self-attention
        AttentionConfig(batch, N_VIS, N_VIS, False, heads=heads, dtype=dtype),  # region self-attention
        AttentionConfig(batch, N_LANG, N_VIS, True, bidirectional=True, heads=heads, dtype=dtype),  # the cross layer
    ]


def attention_configs(quick: bool) -> list[AttentionConfig]:
    if quick:
        return [c for c in lxmert_shapes(256, "bf16") if c.bidirectional or c.len_q == N_VIS and c.masked]
    configs = [c for batch in (64, 128, 256, 512) for c in lxmert_shapes(batch, "bf16")]
    configs += lxmert_shapes(256, "fp32")
    configs += [
        AttentionConfig(64, 64, 64, True, head_dim=64),  # the longest the kernel takes on a GPU
        AttentionConfig(64, 64, 64, True, head_dim=128),  # (fused_attention.GPU_MAX_KEYS)
        AttentionConfig(256, 64, 64, True, head_dim=128),
    ]
    return configs


def feature_configs(quick: bool) -> list[FeatureConfig]:
    if quick:
        return [FeatureConfig(256, "bf16")]
    return [FeatureConfig(batch, dtype) for dtype in ("fp32", "bf16") for batch in (64, 256, 512)]


# ----------------------------------------------------------------------------------------------- inputs


def padded_mask(batch: int, length: int, g: torch.Generator, device) -> Tensor:
    """bool [B, L], True = real: each row loses 0..2*15% of its positions at the end (~15% on average), >= 1 kept."""
    pads = torch.randint(0, round(2 * PAD_FRACTION * length) + 1, (batch,), generator=g)
    lengths = (length - pads).clamp(min=1)
    return (torch.arange(length)[None, :] < lengths[:, None]).to(device)


@dataclass
class AttentionInputs:
    leaves: list[Tensor]  # q, k, v; both ways: language q, k, v then region q, k, v
    mask: Tensor | None  # key mask of one direction; both ways: the language mask
    grad_outs: list[Tensor]


def attention_inputs(cfg: AttentionConfig, device: torch.device, g: torch.Generator) -> AttentionInputs:
    """The model's layouts: one direction gets q, k, v [B, H, L, D] stored [B, L, H, D] (a projection viewed
    per head); both ways gets the six slices of one [B, L+R, 3, H, D] projection, as lxmert/modeling.py."""
    dtype, b, h, d = DTYPES[cfg.dtype], cfg.batch, cfg.heads, cfg.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    if cfg.bidirectional:
        lang, n = cfg.len_q, cfg.len_q + cfg.len_k
        q, k, v = randn(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        parts = (slice(None, lang), slice(lang, None))
        leaves = [t[:, :, part].detach().requires_grad_() for part in parts for t in (q, k, v)]
        mask = padded_mask(b, lang, g, device) if cfg.masked else None
        grad_outs = [randn(b, cfg.len_q, h, d).transpose(1, 2), randn(b, cfg.len_k, h, d).transpose(1, 2)]
        return AttentionInputs(leaves, mask, grad_outs)
    leaves = [randn(b, length, h, d).transpose(1, 2).requires_grad_() for length in (cfg.len_q, cfg.len_k, cfg.len_k)]
    mask = padded_mask(b, cfg.len_k, g, device) if cfg.masked else None
    return AttentionInputs(leaves, mask, [randn(b, cfg.len_q, h, d).transpose(1, 2)])


# -------------------------------------------------------------------------------------------- providers


class Skip(Exception):
    """A provider that cannot run a config; its message becomes the row's note."""


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v, mask):
        with sdpa_kernel(backend):
            return attention.sdpa_attention(q, k, v, mask, 0.0)

    return attend


def _compiled_eager() -> Callable:
    import torch._dynamo

    # one static graph per shape, dtype, mask and layout: ~30 in the full sweep, past dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = 256
    torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(attention.eager_attention, dynamic=False)
    return lambda q, k, v, mask: compiled(q, k, v, mask, 0.0)


def _flash_attn() -> Callable:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as e:
        raise Skip(f"flash-attn not importable ({e})") from None

    def attend(q, k, v, mask):  # flash-attn wants [B, L, H, D]
        q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
        if mask is None:
            return flash_attn_func(q_, k_, v_).transpose(1, 2)
        b, len_q, heads, dim = q_.shape
        cu_q = torch.arange(0, (b + 1) * len_q, len_q, dtype=torch.int32, device=q.device)
        cu_k = F.pad(mask.sum(1).cumsum(0).to(torch.int32), (1, 0))
        out = flash_attn_varlen_func(
            q_.reshape(b * len_q, heads, dim), k_[mask], v_[mask], cu_q, cu_k, len_q, mask.shape[1]
        )  # k_[mask]: the unpadding (a host sync and a gather) is part of this provider's cost
        return out.view(b, len_q, heads, dim).transpose(1, 2)

    return attend


def single_direction(provider: str) -> Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]:
    from torch.nn.attention import SDPBackend

    if provider == "triton":
        return lambda q, k, v, mask: kernels.cross_attention(q, k, v, mask)
    if provider == "eager":
        return lambda q, k, v, mask: attention.eager_attention(q, k, v, mask, 0.0)
    if provider == "sdpa_flash":
        return _sdpa(SDPBackend.FLASH_ATTENTION)
    if provider == "sdpa_efficient":
        return _sdpa(SDPBackend.EFFICIENT_ATTENTION)
    if provider == "compile":
        return _compiled_eager()
    if provider == "flash_attn":
        return _flash_attn()
    raise ValueError(f"unknown attention provider {provider!r}")


def attention_call(provider: str, cfg: AttentionConfig, inputs: AttentionInputs) -> Callable[[], tuple]:
    """A closure computing the config's outputs (a tuple) from the input leaves with one provider."""
    if cfg.bidirectional:
        lq, lk, lv, vq, vk, vv = inputs.leaves
        lang_mask = inputs.mask
        if provider == "triton_bidirectional":
            return lambda: fused_attention.bidirectional_from_views((lq, lk, lv), (vq, vk, vv), lang_mask, None, 0.0)
        attend = single_direction(provider.removesuffix(" x2"))
        return lambda: (attend(lq, vk, vv, None), attend(vq, lk, lv, lang_mask))
    q, k, v = inputs.leaves
    attend = single_direction(provider)
    return lambda: (attend(q, k, v, inputs.mask),)


def all_rows_feature_regression(x, weight, bias, target, row_weight, normalizer):
    """transformers' LxmertForPreTraining: predict all N regions, SmoothL1 per region, mask and mean after."""
    prediction = F.linear(x, weight, bias)
    per_region = F.smooth_l1_loss(prediction, target, reduction="none").mean(1)
    return (per_region * row_weight).mean() * normalizer


FEATURE_FNS = {
    "triton_fused": kernels.masked_feature_regression,
    "torch_masked": losses.masked_feature_regression,
    "torch_all_rows": all_rows_feature_regression,
}


@dataclass
class FeatureInputs:
    leaves: list[Tensor]  # x [N, H], weight [F, H], bias [F]
    target: Tensor  # [N, F]
    row_weight: Tensor  # [N] 0/1
    grad_outs: list[Tensor]


def feature_inputs(cfg: FeatureConfig, device: torch.device, g: torch.Generator) -> FeatureInputs:
    n, h, f = cfg.batch * cfg.regions, cfg.hidden, cfg.features
    x = torch.randn(n, h, generator=g).to(device)
    weight = (torch.randn(f, h, generator=g) / math.sqrt(h)).to(device)
    bias = (0.1 * torch.randn(f, generator=g)).to(device)
    target = torch.randn(n, f, generator=g).to(device)
    row_weight = (torch.rand(n, generator=g) < MASK_FRACTION).float().to(device)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    return FeatureInputs(leaves, target, row_weight, [torch.ones((), device=device)])


def feature_call(provider: str, cfg: FeatureConfig, inputs: FeatureInputs) -> Callable[[], tuple]:
    fn = FEATURE_FNS[provider]
    autocast = cfg.dtype != "fp32"

    def call():
        with torch.autocast(inputs.target.device.type, dtype=DTYPES[cfg.dtype], enabled=autocast):
            return (fn(*inputs.leaves, inputs.target, inputs.row_weight, NORMALIZER),)

    return call


# ------------------------------------------------------------------------------------------------ timing


def _note(error: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    """Why a provider refused: the error, then the warnings raised meanwhile (SDPA's say why no kernel fit)."""
    first_line = lambda text: (str(text).strip().splitlines() or [""])[0]  # noqa: E731
    reasons = [first_line(error) or type(error).__name__] + [first_line(w.message) for w in caught]
    return "; ".join(dict.fromkeys(r for r in reasons if r))[:400]


def measure(
    build: Callable[[], Callable[[], tuple]],
    leaves: list[Tensor],
    grad_outs: list[Tensor],
    timer: Callable,
    warmup: int,
    reps: int,
) -> dict[str, dict[str, Any]] | str:
    """{mode: numbers} for forward / backward / full, or the note of a provider that cannot run.

    The provider runs fwd + bwd once first (a probe, and torch.compile's compile). Backward times one
    backward over a fresh graph each call (the forward untimed). Peak memory is taken on CUDA only, over one
    more call of each mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn = build()
            torch.autograd.grad(fn(), leaves, grad_outs)
        except Exception as e:  # a backend refusing a mask / dtype / shape, or a missing package
            return _note(e, caught)

    def run(call: Callable, setup: Callable | None = None) -> dict[str, Any]:
        numbers = timer(call, warmup, reps, setup=setup)
        if leaves[0].is_cuda:  # what was live before (inputs, their grads), and the peak over one call
            numbers["base_memory_mb"] = torch.cuda.memory_allocated() / 2**20
            numbers["peak_memory_mb"] = harness.peak_memory(call, setup=setup) / 2**20
        return numbers

    try:  # one failure (out of memory, say) costs this provider's numbers, not the whole run
        forward = run(fn)
        # backward alone: a fresh graph from an untimed forward each call (no retain_graph, which compiled
        # backwards with donated buffers refuse and which would keep the graph's memory alive)
        backward = run(lambda outs: torch.autograd.grad(outs, leaves, grad_outs), setup=fn)
        full = run(lambda: torch.autograd.grad(fn(), leaves, grad_outs))
    except Exception as e:
        return f"failed while timing: {_note(e, [])}"
    return {"forward": forward, "backward": backward, "full": full}


def time_attention(cfg: AttentionConfig, providers: Sequence[str], device, timer, warmup, reps) -> list[dict]:
    g = torch.Generator().manual_seed(cfg.batch * 1000 + cfg.len_q * 10 + cfg.len_k)
    inputs = attention_inputs(cfg, torch.device(device), g)
    rows = []
    for provider in providers:
        build = functools.partial(attention_call, provider, cfg, inputs)
        result = measure(build, inputs.leaves, inputs.grad_outs, timer, warmup, reps)
        base = {"bench": "attention", "config": cfg.name, **asdict(cfg), "provider": provider}
        if isinstance(result, str):
            rows.append({**base, "mode": None, "note": result})
            continue
        for mode, numbers in result.items():
            seconds = numbers["median_ms"] * 1e-3
            flops, nbytes = cfg.flops(mode), cfg.min_bytes(mode)
            rates = dict(flops=flops, tflops=flops / seconds / 1e12, min_bytes=nbytes, gbps=nbytes / seconds / 1e9)
            rows.append({**base, "mode": mode, **numbers, **rates, "note": None})
    return rows


def time_feature_regression(cfg: FeatureConfig, providers: Sequence[str], device, timer, warmup, reps) -> list[dict]:
    g = torch.Generator().manual_seed(cfg.batch)
    inputs = feature_inputs(cfg, torch.device(device), g)
    rows = []
    for provider in providers:
        build = functools.partial(feature_call, provider, cfg, inputs)
        result = measure(build, inputs.leaves, inputs.grad_outs, timer, warmup, reps)
        base = {"bench": "feature_regression", "config": cfg.name, **asdict(cfg), "provider": provider}
        base["masked_rows"] = int(inputs.row_weight.sum().item())
        if isinstance(result, str):
            rows.append({**base, "mode": None, "note": result})
            continue
        rows += [{**base, "mode": mode, **numbers, "note": None} for mode, numbers in result.items()]
    return rows


# ------------------------------------------------------------------------------------------------ checks


def attention_check_cases(tiny: bool) -> list[AttentionConfig]:
    """LXMERT's shapes at batch 64 (tiny: batch 2, 2 heads), and one 64 x 64 problem (the longest the kernel
    takes on a GPU, in every dtype)."""
    batch, heads = (2, 2) if tiny else (64, HEADS)
    return lxmert_shapes(batch, heads=heads) + [
        AttentionConfig(1 if tiny else 8, 64, 64, True, heads=1 if tiny else HEADS)
    ]


def check_attention(cfg: AttentionConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.batch + cfg.len_q * 7 + cfg.len_k * 13 + cfg.head_dim)
    b, h, d, lq, lk = cfg.batch, cfg.heads, cfg.head_dim, cfg.len_q, cfg.len_k

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device)

    if cfg.bidirectional:
        mask = padded_mask(b, lq, g, device) if cfg.masked else None
        q, k, v = (randn(b, h, lq + lk, d) for _ in range(3))
        grad_outs = [randn(b, h, lq, d), randn(b, h, lk, d)]
        kernel_fn = lambda q, k, v: kernels.bidirectional_attention(q, k, v, lq, mask, None)  # noqa: E731
        ref_fn = (
            lambda q, k, v: (  # noqa: E731
                kernels.reference_attention(q[:, :, :lq], k[:, :, lq:], v[:, :, lq:], None),
                kernels.reference_attention(q[:, :, lq:], k[:, :, :lq], v[:, :, :lq], mask),
            )
        )
        names = ["lang_out", "vis_out", "dq", "dk", "dv"]
    else:
        mask = padded_mask(b, lk, g, device) if cfg.masked else None
        q, k, v = randn(b, h, lq, d), randn(b, h, lk, d), randn(b, h, lk, d)
        grad_outs = [randn(b, h, lq, d)]
        kernel_fn = lambda q, k, v: kernels.cross_attention(q, k, v, mask)  # noqa: E731
        ref_fn = lambda q, k, v: kernels.reference_attention(q, k, v, mask)  # noqa: E731
        names = ["out", "dq", "dk", "dv"]
    return against_float64(kernel_fn, ref_fn, [q, k, v], grad_outs, dtype, names, rel_err, ATTENTION_SLACK)


def check_feature_regression(n: int, hidden: int, features: int, dtype: torch.dtype, device) -> dict[str, Any]:
    """As tests/test_kernel_feature_regression.py: x, weight, bias in dtype; targets fp32, or fp16 (as stored)."""
    g = torch.Generator().manual_seed(n + hidden + features)
    x = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    weight = torch.randn(features, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    bias = 0.1 * torch.randn(features, generator=g, dtype=torch.float64)
    target = torch.randn(n, features, generator=g).to(torch.float32 if dtype == torch.float32 else torch.float16)
    row_weight = (torch.rand(n, generator=g) < MASK_FRACTION).float()
    row_weight[n // 2] = 1.0  # never empty
    target, row_weight = target.to(device), row_weight.to(device)
    call = lambda fn: lambda x, w, b: fn(x, w, b, target, row_weight, NORMALIZER)  # noqa: E731
    kernel_fn = call(kernels.masked_feature_regression)
    # the float64 reference on the rounded inputs; the yardstick in dtype
    ref_fn = lambda x, w, b: kernels.reference_masked_feature_regression(  # noqa: E731
        x, w, b, target.to(x.dtype), row_weight, NORMALIZER, acc_dtype=x.dtype
    )
    inputs = [t.to(device) for t in (x, weight, bias)]
    grad_outs = [torch.ones((), device=device)]
    names = ["loss", "dx", "dweight", "dbias"]
    return against_float64(kernel_fn, ref_fn, inputs, grad_outs, dtype, names, norm_rel_err, FEATURE_SLACK)


def run_checks(device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    """Every check, printed as it completes; a check that raises counts as failed."""
    probe = torch.empty(0, device=device)
    if not (fused_attention.triton_runs_on(probe) and feature_regression.triton_runs_on(probe)):
        print("FAIL: the Triton kernels cannot run here (TRITON_INTERPRET=1 must be set before triton is imported)")
        return [{"bench": "check", "check": "kernels run", "passed": False}]
    n_feat, hidden, features = (2 * N_VIS, 64, 128) if tiny else (64 * N_VIS, HIDDEN, FEATURES)
    jobs = [
        (f"attention {c.name} h{c.heads}", lambda c=c, dt=dt: check_attention(c, dt, device), dt)
        for c in attention_check_cases(tiny)
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    ]
    jobs += [
        (
            f"feature_regression N{n_feat} H{hidden} F{features}",
            lambda dt=dt: check_feature_regression(n_feat, hidden, features, dt, device),
            dt,
        )
        for dt in (torch.float32, torch.bfloat16, torch.float16)
    ]
    results = []
    for name, job, dtype in jobs:
        dtype_name = str(dtype).removeprefix("torch.")
        try:
            result = job()
            del result["kernel"]  # tensors: the rows keep the errors
        except Exception as e:
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        status = "ok  " if result["passed"] else "FAIL"
        detail = result.get("error") or "  ".join(
            f"{k} {e:.2e}"
            + ("" if result["torch_errors"][k] is None else f" (torch {result['torch_errors'][k]:.1e})")
            + ("" if e <= result["tolerances"][k] else f" > tol {result['tolerances'][k]:.1e}")
            for k, e in result["errors"].items()
        )
        print(f"{status} {name} {dtype_name}: {detail}", flush=True)
        results.append({"bench": "check", "check": name, "dtype": dtype_name, **result})
    return results


# ----------------------------------------------------------------------------------------------- summary


def pivot(rows: list[dict]) -> list[dict]:
    """One line per (config, dtype, provider): the three modes' medians, full-mode TFLOP/s, GB/s, peak memory."""
    lines: dict[tuple, dict] = {}
    for row in rows:
        key = (row["bench"], row["config"], row["dtype"], row["provider"])
        line = lines.setdefault(key, dict(zip(("bench", "config", "dtype", "provider"), key), note=row.get("note")))
        if row.get("mode"):
            line[f"{row['mode']}_ms"] = row["median_ms"]
        if row.get("mode") == "full":
            line.update(tflops=row.get("tflops"), gbps=row.get("gbps"), peak_mb=row.get("peak_memory_mb"))
    return list(lines.values())


def speedups(lines: list[dict]) -> list[dict]:
    """Per config: our kernel's full fwd+bwd time against the fastest other provider that ran."""
    out = []
    for key in dict.fromkeys((line["bench"], line["config"], line["dtype"]) for line in lines):
        group = [ln for ln in lines if (ln["bench"], ln["config"], ln["dtype"]) == key and ln.get("full_ms")]
        for ours in (line for line in group if line["provider"] in OURS):
            others = [line for line in group if line["provider"] not in OURS]
            best = min(others, key=lambda line: line["full_ms"], default=None)
            line = dict(bench=key[0], config=key[1], dtype=key[2], ours=ours["provider"], ours_ms=ours["full_ms"])
            line.update(best_other=best and best["provider"], other_ms=best and best["full_ms"])
            out.append(line | {"speedup": best and best["full_ms"] / ours["full_ms"]})
    return out


PIVOT_COLUMNS = (
    "bench; config; dtype; provider; forward_ms=fwd ms; backward_ms=bwd ms; full_ms=full ms; tflops=full TFLOP/s; "
    "gbps=full GB/s; peak_mb=full peak MB; note"
)
SPEEDUP_COLUMNS = "bench; config; dtype; ours; ours_ms=ours ms; best_other; other_ms=other ms; speedup=speedup x"
DETAIL_COLUMNS = (
    "bench; config; dtype; provider; mode; median_ms=median ms; p20_ms=p20 ms; p80_ms=p80 ms; tflops=TFLOP/s; "
    "gbps=GB/s; peak_memory_mb=peak MB; note"
)


def sweep(quick: bool, device, timer, warmup: int, reps: int, out: Path, common: dict) -> list[dict]:
    """Time every config (attention, then feature regression), appending its rows to `out` as it finishes.
    No config starts after TIME_BUDGET_S."""
    jobs = [
        (cfg, time_attention, BIDIRECTIONAL_PROVIDERS if cfg.bidirectional else SINGLE_PROVIDERS)
        for cfg in attention_configs(quick)
    ]
    jobs += [(cfg, time_feature_regression, FEATURE_PROVIDERS) for cfg in feature_configs(quick)]
    start, rows = time.perf_counter(), []
    for i, (cfg, time_fn, providers) in enumerate(jobs):
        if time.perf_counter() - start > TIME_BUDGET_S:
            print(f"time budget of {TIME_BUDGET_S:.0f} s spent: the last {len(jobs) - i} configs were not timed")
            break
        config_start = time.perf_counter()
        new = [{**common, **row} for row in time_fn(cfg, providers, device, timer, warmup, reps)]
        harness.append_rows(out, new)
        rows += new
        print(f"  [{i + 1}/{len(jobs)}] {cfg.name} {cfg.dtype}: {time.perf_counter() - config_start:.1f} s", flush=True)
    return rows


def report(rows: list[dict], env: dict, warmup: int, reps: int, checks_passed: bool) -> str:
    """The Markdown summary: speed-ups, one line per provider, then every measurement."""
    lines = pivot(rows)
    return (
        f"# Kernel benchmarks\n\n{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"commit {env['commit']}, {env['date']}; warm-up {warmup}, median of {reps}, L2 flushed; correctness checks "
        f"{'passed' if checks_passed else 'FAILED'}.\n\n## Fused kernel vs the fastest alternative (fwd + bwd)\n\n"
        f"{harness.markdown_table(speedups(lines), SPEEDUP_COLUMNS)}\n"
        f"## Per provider\n\n{harness.markdown_table(lines, PIVOT_COLUMNS)}\n"
        f"## Every measurement\n\n{harness.markdown_table(rows, DETAIL_COLUMNS)}"
    )


# ------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset: batch 256, two attention shapes, bf16")
    parser.add_argument("--check-only", action="store_true", help="correctness checks only, no timing, no files")
    parser.add_argument("--out", type=Path, default=harness.RUNS_DIR / "kernels.jsonl", help="rows; .md beside them")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # no TF32 in torch's own matmuls: the references are IEEE fp32 (our kernel's fp32 dots are tf32x3)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
    else:
        print(NO_GPU)
    print(f"correctness checks ({'real sizes' if cuda else 'tiny sizes, Triton interpreter'}):", flush=True)
    checks = run_checks(device, tiny=not cuda)
    failed = [c for c in checks if not c["passed"]]
    print(f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.1f} s)")
    if not cuda or args.check_only:
        return 1 if failed else 0

    env = harness.environment()
    common = {**env, "checks_passed": not failed, "float32_matmul_precision": torch.get_float32_matmul_precision()}
    harness.append_rows(args.out, [{**common, **c} for c in checks])
    warmup, reps = (QUICK_WARMUP, QUICK_REPS) if args.quick else (WARMUP, REPS)
    print(f"timing on {env['device']} (warm-up {warmup}, median of {reps}), rows to {args.out}")
    rows = sweep(args.quick, device, harness.time_cuda, warmup, reps, args.out, {**common, "warmup": warmup})
    lines = pivot(rows)
    md_path = args.out.with_suffix(".md")
    md_path.write_text(report(rows, env, warmup, reps, checks_passed=not failed), encoding="utf-8")
    print(harness.markdown_table(lines, PIVOT_COLUMNS))
    print(harness.markdown_table(speedups(lines), SPEEDUP_COLUMNS))
    print(f"{len(rows)} rows appended to {args.out}; summary in {md_path}; {time.perf_counter() - start:.0f} s in all")
    if failed:
        print(f"FAILED checks: {', '.join(c['check'] + ' ' + c.get('dtype', '') for c in failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
