"""The one switch every attention of the model goes through.

A backend computes softmax(q k^T * scale + mask) v for q [B, H, Lq, D] and k, v [B, H, Lk, D], with an
optional key mask kv_mask bool [B, Lk] (True = real key). LXMERT only pads the language side, so a mask
hides keys, never queries. Backends also offer `bidirectional`, the cross-modality layer's two directions
(language queries over region keys, region queries over language keys) in one call; the default runs the
two directions one after the other, and a fused kernel can replace it.

"eager" is the reference: the authors' additive -10000 mask, softmax, dropout on the probabilities.
"sdpa" is torch.nn.functional.scaled_dot_product_attention with a boolean mask.
"triton" is kernels/fused_attention.py: one fused kernel per attention, both cross directions in one launch
(imported on first use; on the CPU it runs under TRITON_INTERPRET=1, else falls back to its reference).
A query row with no real key (never the case in LXMERT: [CLS] is always real) gets the mean of the values
from "eager" and zeros from "sdpa" on the CPU and from "triton".
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
AttendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


def eager_attention(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if kv_mask is not None:
        scores = scores + (~kv_mask[:, None, None, :]).to(scores.dtype) * -10000.0
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float) -> Tensor:
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class AttentionBackend:
    """A named attention implementation; `bidirectional` may be overridden by a fused kernel."""

    def __init__(self, name: str, attend: AttendFn):
        self.name = name
        self.attend = attend

    def bidirectional(
        self,
        lang_qkv: tuple[Tensor, Tensor, Tensor],
        vis_qkv: tuple[Tensor, Tensor, Tensor],
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        dropout_p: float,
    ) -> tuple[Tensor, Tensor]:
        """Language queries over region keys and region queries over language keys, one shared module."""
        (lq, lk, lv), (vq, vk, vv) = lang_qkv, vis_qkv
        return self.attend(lq, vk, vv, vis_mask, dropout_p), self.attend(vq, lk, lv, lang_mask, dropout_p)


BACKENDS: dict[str, AttentionBackend] = {
    "eager": AttentionBackend("eager", eager_attention),
    "sdpa": AttentionBackend("sdpa", sdpa_attention),
}


def register_backend(backend: AttentionBackend) -> None:
    """Make a backend selectable by name (kernels register theirs when they import)."""
    BACKENDS[backend.name] = backend


def _triton_backend() -> AttentionBackend:
    from kernels import fused_attention

    backend = AttentionBackend("triton", fused_attention.attend)
    backend.bidirectional = fused_attention.bidirectional_from_views
    return backend


_ON_FIRST_USE = {"triton": _triton_backend}  # backends whose import is deferred until one is asked for


def available_backends() -> list[str]:
    """Every selectable backend name, without importing the ones loaded on first use."""
    return sorted({*BACKENDS, *_ON_FIRST_USE})


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS and name in _ON_FIRST_USE:
        register_backend(_ON_FIRST_USE[name]())
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attn_backend {name!r}; available: {available_backends()}") from None
