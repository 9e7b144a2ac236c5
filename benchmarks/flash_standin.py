"""A stand-in for flash-attn on the CPU: flash_attn_varlen_func (flash-attn 2) as its documented contract, in float64.

q [total_q, H, D], k / v [total_k, H_k, D], int32 cu_seqlens with cu[-1] = total, max_seqlen = the longest
sequence (a host int), per-sequence softmax(q k^T * softmax_scale) v (scale 1 / sqrt(D) by default,
causal=False), dropout on the probabilities, zeros for a query with no key ("if the row of the mask is all zero,
the output will be zero"); computed in float64, returned in q's dtype. It asserts every part of that contract it
is handed, so what passes it proves the flash backend's unpad / pack / pad plumbing. The flash tests
(tests/test_attention_flash.py) and the host-wait count of the flash path (benchmarks/host_waits.py) run the
backend on it: `flash_attn_module` is what they put in sys.modules["flash_attn"].

The backend refuses the CPU and dtypes other than fp16 / bf16 from the real package; `installed` widens
lxmert.attention.FLASH_DEVICES / FLASH_DTYPES while the stand-in is in place (the tests do so with monkeypatch).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F


def reference_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash_attn.flash_attn_varlen_func (flash-attn 2), its documented contract in float64."""
    if causal or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("the stand-in covers full non-causal attention only")
    if return_attn_probs:
        raise NotImplementedError("the stand-in returns the output only")
    (total_q, heads, dim), (total_k, heads_k, _) = q.shape, k.shape
    assert q.dim() == 3 and k.dim() == 3 and v.shape == k.shape and k.shape[2] == dim, (q.shape, k.shape, v.shape)
    assert heads % heads_k == 0 and q.dtype == k.dtype == v.dtype
    for cu, total, longest in ((cu_seqlens_q, total_q, max_seqlen_q), (cu_seqlens_k, total_k, max_seqlen_k)):
        assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.device == q.device, (cu.dtype, cu.shape)
        offsets = cu.tolist()
        assert offsets[0] == 0 and offsets[-1] == total, f"cu_seqlens {offsets} for {total} packed tokens"
        lengths = [end - start for start, end in zip(offsets, offsets[1:])]
        assert min(lengths) >= 0 and isinstance(longest, int) and longest == max(lengths), (lengths, longest)
    assert cu_seqlens_q.shape == cu_seqlens_k.shape, "one key sequence per query sequence"
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    k, v = (t.repeat_interleave(heads // heads_k, dim=1) for t in (k, v))  # MQA / GQA: head h reads h // groups
    out = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q_i = q[bounds_q[i] : bounds_q[i + 1]].double()
        k_i, v_i = (t[bounds_k[i] : bounds_k[i + 1]].double() for t in (k, v))
        if k_i.shape[0] == 0:
            out.append(torch.zeros_like(q_i))
            continue
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q_i, k_i) * scale, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, dropout_p)
        out.append(torch.einsum("hqk,khd->qhd", probs, v_i))
    return torch.cat(out).to(q.dtype)


def flash_attn_module(
    calls: list[dict[str, Any]] | None = None,
    launch: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> types.ModuleType:
    """A module `flash_attn` whose flash_attn_varlen_func is the stand-in. calls: each call's arguments, bound by
    name, are appended to it; launch: a context each call runs in (host_waits: one kernel launch, as flash-attn's,
    whose own reads of the offsets are the stand-in's, not the backend's)."""
    signature = inspect.signature(reference_varlen)

    def flash_attn_varlen_func(*args, **kwargs):
        if calls is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append(bound.arguments)
        with launch():
            return reference_varlen(*args, **kwargs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


@contextlib.contextmanager
def installed(
    dtypes: tuple[torch.dtype, ...],
    launch: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Iterator[None]:
    """attn_backend "flash" runs on the stand-in while inside, on the CPU in `dtypes`; restored after (the flash
    backend is loaded afresh on its next use, from the real package if there is one)."""
    from lxmert import attention

    saved = sys.modules.get("flash_attn"), attention.FLASH_DEVICES, attention.FLASH_DTYPES
    sys.modules["flash_attn"] = flash_attn_module(launch=launch)
    attention.FLASH_DEVICES, attention.FLASH_DTYPES = ("cpu",), dtypes
    attention.BACKENDS.pop("flash", None)
    try:
        yield
    finally:
        module, attention.FLASH_DEVICES, attention.FLASH_DTYPES = saved
        if module is None:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = module
        attention.BACKENDS.pop("flash", None)
