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
"flash" is flash-attn's flash_attn_varlen_func (imported on first use; CUDA, fp16 / bf16 only): see
FlashAttentionBackend. It unpads the keys by their mask; the model can hand it that unpadding found ahead, on
the host (Unpadding, one PackedKeys per key mask), which every other backend ignores.
A query row with no real key (never the case in LXMERT: [CLS] is always real) gets the mean of the values
from "eager" and zeros from "sdpa" on the CPU, from "triton" and from "flash".

Attention probabilities (the model's output_attentions=True): the fused backends never form them, so for such a
call every attention of the forward runs eager's probability-forming path (`eager_attention_with_probs`,
`eager_bidirectional_with_probs`), whatever the configured backend; a call without them never touches it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
AttendFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


def eager_attention_with_probs(
    q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float
) -> tuple[Tensor, Tensor]:
    """The reference: (context [B, H, Lq, D], probabilities [B, H, Lq, Lk]). The probabilities are those the
    values were weighted with, after dropout, as transformers returns them; a padded key's is exactly 0 (its
    -10000 underflows exp in every float dtype)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if kv_mask is not None:
        scores = scores + (~kv_mask[:, None, None, :]).to(scores.dtype) * -10000.0
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v), probs


def eager_attention(q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float) -> Tensor:
    return eager_attention_with_probs(q, k, v, kv_mask, dropout_p)[0]


def eager_bidirectional_with_probs(
    lang_qkv: tuple[Tensor, Tensor, Tensor],
    vis_qkv: tuple[Tensor, Tensor, Tensor],
    lang_mask: Tensor | None,
    vis_mask: Tensor | None,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cross layer's two directions on the eager path: (language context, region context, language-over-
    regions probabilities [B, H, L, R], regions-over-language probabilities [B, H, R, L])."""
    (lq, lk, lv), (vq, vk, vv) = lang_qkv, vis_qkv
    lang_ctx, lang_probs = eager_attention_with_probs(lq, vk, vv, vis_mask, dropout_p)
    vis_ctx, vis_probs = eager_attention_with_probs(vq, lk, lv, lang_mask, dropout_p)
    return lang_ctx, vis_ctx, lang_probs, vis_probs


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

    def attend_packed(
        self, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float, keys: PackedKeys
    ) -> Tensor:
        """`attend`, with kv_mask's real keys found ahead (`keys`); a backend that does not unpad ignores them."""
        return self.attend(q, k, v, kv_mask, dropout_p)

    def bidirectional_packed(
        self,
        lang_qkv: tuple[Tensor, Tensor, Tensor],
        vis_qkv: tuple[Tensor, Tensor, Tensor],
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        dropout_p: float,
        keys: PackedKeys,
    ) -> tuple[Tensor, Tensor]:
        """`bidirectional`, with the real keys of [regions; language] found ahead (Unpadding.cross); a backend
        that does not unpad ignores them."""
        return self.bidirectional(lang_qkv, vis_qkv, lang_mask, vis_mask, dropout_p)


BACKENDS: dict[str, AttentionBackend] = {
    "eager": AttentionBackend("eager", eager_attention),
    "sdpa": AttentionBackend("sdpa", sdpa_attention),
}


def register_backend(backend: AttentionBackend) -> None:
    """Make a backend selectable by name (get_backend registers "triton" and "flash" on their first use)."""
    BACKENDS[backend.name] = backend


def _triton_backend() -> AttentionBackend:
    from kernels import fused_attention

    backend = AttentionBackend("triton", fused_attention.attend)
    backend.bidirectional = fused_attention.bidirectional_from_views
    return backend


# ------------------------------------------------------------------------------------------ flash-attn

FLASH_DEVICES = ("cuda",)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
"""What flash-attn's kernels take. The flash tests widen both, to run a float64 stand-in for flash_attn on
the CPU; nothing else changes them."""
FLASH_MAX_HEAD_DIM = 256  # flash-attn 2 (its wrapper pads other sizes to a multiple of 8 itself)


def _check_flash_inputs(*tensors: Tensor) -> None:
    """Refuse what flash-attn cannot run, by name, instead of falling back to another backend silently."""
    first = tensors[0]
    if first.device.type not in FLASH_DEVICES:
        raise ValueError(
            f"attn_backend 'flash' runs on CUDA GPUs only (flash-attn has no {first.device.type} kernels); "
            "use attn_backend 'sdpa' or 'eager' there"
        )
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 or first.dtype not in FLASH_DTYPES:
        allowed = " or ".join(str(d).removeprefix("torch.") for d in FLASH_DTYPES)
        got = " and ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"attn_backend 'flash' takes {allowed} queries, keys and values (flash-attn's kernels), got {got}: "
            "run the model under bf16 autocast or in half precision, or use attn_backend 'sdpa' for float32"
        )
    if first.shape[-1] > FLASH_MAX_HEAD_DIM:
        raise ValueError(f"attn_backend 'flash' supports head_dim <= {FLASH_MAX_HEAD_DIM}, got {first.shape[-1]}")


def _segment_lengths(mask_BN: Tensor, segments: tuple[int, ...]) -> Tensor:
    """Real tokens of each segment of each batch row, [B * S] int32 in (row, segment) order."""
    bounds = [0, *itertools.accumulate(segments)]
    per_segment = [mask_BN[:, start:end].sum(1, dtype=torch.int32) for start, end in zip(bounds, bounds[1:])]
    return torch.stack(per_segment, dim=1).flatten()


def _mask_or_all_real(mask_BL: Tensor | None, x_BHLD: Tensor) -> Tensor:
    if mask_BL is not None:
        return mask_BL
    return torch.ones(x_BHLD.shape[0], x_BHLD.shape[2], dtype=torch.bool, device=x_BHLD.device)


def _cu_seqlens(lengths: Tensor) -> Tensor:
    """flash-attn's offsets of the packed sequences: 0, l0, l0 + l1, ..., int32."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


@dataclass(frozen=True)
class PackedKeys:
    """The real keys of a key mask [B, N] whose N keys split into consecutive segments (one packed sequence per
    (row, segment)), as flash_attn_varlen_func takes them; made by `from_mask` on the mask's device."""

    indices: Tensor  # [total] int64: the flat b * N + n of the real keys, in order
    cu_seqlens: Tensor  # [B * S + 1] int32: 0, then the running count of real keys per (row, segment)
    max_seqlen: int  # the most real keys of one (row, segment), a host int
    shape: tuple[int, int]  # the mask's (B, N)

    @classmethod
    def from_mask(cls, mask_BN: Tensor, segments: tuple[int, ...]) -> PackedKeys:
        """mask_BN bool, True = real. On a GPU this waits for it twice (nonzero's count, then the max), as
        flash-attn's own bert_padding.unpad_input does; on the host it waits for nothing."""
        real = mask_BN.flatten().nonzero().squeeze(1)
        lengths = _segment_lengths(mask_BN, segments)
        return cls(real, _cu_seqlens(lengths), int(lengths.max()), (mask_BN.shape[0], mask_BN.shape[1]))

    def map(self, fn: Callable[[Tensor], Tensor]) -> PackedKeys:
        """The same keys with fn applied to both tensors (moving or pinning: fn must keep their dtypes)."""
        return dataclasses.replace(self, indices=fn(self.indices), cu_seqlens=fn(self.cu_seqlens))


@dataclass(frozen=True)
class Unpadding:
    """The flash backend's unpadding of one batch, found ahead: one PackedKeys per key mask the model attends with.

    A loader makes it on the host from the masks it builds (`from_masks`, before the batch goes to the device),
    so the flash backend's masked calls wait for nothing; the model's forward takes it as the keyword
    `unpadding` and hands each attention its part. Without it the backend finds the same on the device, waiting
    twice a masked call. Other backends ignore it."""

    language: PackedKeys  # language keys [B, L] (attention_mask), one segment
    regions: PackedKeys | None  # region keys [B, R] (visual_attention_mask); None without one: every region real
    cross: PackedKeys  # the cross layers' keys [regions; language] [B, R + L], segments (R, L)

    @classmethod
    def from_masks(cls, attention_mask: Tensor, visual_attention_mask: Tensor | None, regions: int) -> Unpadding:
        """From the model's masks (nonzero = real), on their device: attention_mask [B, L], visual_attention_mask
        [B, R] or None; `regions` is R."""
        lang = attention_mask.bool()
        batch, tokens = lang.shape
        vis = None if visual_attention_mask is None else visual_attention_mask.bool()
        vis_or_all = vis if vis is not None else torch.ones(batch, regions, dtype=torch.bool, device=lang.device)
        return cls(
            language=PackedKeys.from_mask(lang, (tokens,)),
            regions=None if vis is None else PackedKeys.from_mask(vis, (regions,)),
            cross=PackedKeys.from_mask(torch.cat([vis_or_all, lang], dim=1), (regions, tokens)),
        )

    def map(self, fn: Callable[[Tensor], Tensor]) -> Unpadding:
        """fn applied to every tensor (moving or pinning: fn must keep their dtypes)."""
        regions = None if self.regions is None else self.regions.map(fn)
        return Unpadding(self.language.map(fn), regions, self.cross.map(fn))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Unpadding:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def check(self, batch: int, tokens: int, regions: int, lang_mask: bool, vis_mask: bool) -> None:
        """A ValueError unless this unpads key masks of these sizes, with or without a visual mask as the model's
        inputs (a language mask is needed: an unpadding is made from one)."""
        expected = {
            "language": (batch, tokens) if lang_mask else "an attention_mask",
            "regions": (batch, regions) if vis_mask else None,
            "cross": (batch, regions + tokens),
        }
        got = {name: None if keys is None else keys.shape for name, keys in vars(self).items()}
        if got != expected:
            raise ValueError(
                f"unpadding does not belong to this batch's masks: it unpads key masks of the shapes {got}, the "
                f"batch has {expected} (None: no mask); make it with Unpadding.from_masks from the same masks"
            )


def varlen_attention(
    varlen_fn: Callable[..., Tensor],
    q_BMHD: Tensor,
    k_BNHD: Tensor,
    v_BNHD: Tensor,
    kv_mask_BN: Tensor | None,
    q_segments: tuple[int, ...],
    k_segments: tuple[int, ...],
    dropout_p: float,
    keys: PackedKeys | None = None,
) -> Tensor:
    """Segment i of each batch row's queries over the real keys of segment i of its keys: one varlen call.

    The M queries of a row split into consecutive segments of the sizes q_segments, its N keys into as many
    segments of the sizes k_segments. Every query is kept (LXMERT masks keys, never queries; the padded
    language positions get the same attention over the real keys as from eager); keys and values are
    unpadded, in order, by kv_mask (True = real), so each (row, segment) is one packed sequence. `keys`: that
    unpadding found ahead (PackedKeys.from_mask of kv_mask with k_segments), used instead of kv_mask, which is
    then not read; None: found here from kv_mask. Returns [B, M, H, D], a view of flash-attn's packed output.
    """
    batch, n_queries, heads, dim = q_BMHD.shape
    n_keys = k_BNHD.shape[1]
    q_packed = q_BMHD.reshape(batch * n_queries, heads, dim)  # a view for the model's self-attention
    k_packed = k_BNHD.reshape(batch * n_keys, heads, dim)
    v_packed = v_BNHD.reshape(batch * n_keys, heads, dim)
    every_query = torch.ones(batch, n_queries, dtype=torch.bool, device=q_BMHD.device)
    cu_seqlens_q = _cu_seqlens(_segment_lengths(every_query, q_segments))
    if keys is None and kv_mask_BN is not None:
        keys = PackedKeys.from_mask(kv_mask_BN, k_segments)  # waits for the device: the packed size is data's
    if keys is None:
        every_key = torch.ones(batch, n_keys, dtype=torch.bool, device=k_BNHD.device)
        cu_seqlens_k, max_seqlen_k = _cu_seqlens(_segment_lengths(every_key, k_segments)), max(k_segments)
    else:
        if keys.shape != (batch, n_keys) or keys.cu_seqlens.shape != (batch * len(k_segments) + 1,):
            raise ValueError(
                f"the keys' unpadding is for a key mask {keys.shape} with {keys.cu_seqlens.numel() - 1} sequences, "
                f"the keys are {(batch, n_keys)} in {batch * len(k_segments)} sequences"
            )
        k_packed, v_packed = k_packed.index_select(0, keys.indices), v_packed.index_select(0, keys.indices)
        cu_seqlens_k, max_seqlen_k = keys.cu_seqlens, keys.max_seqlen
    out = varlen_fn(
        q_packed,
        k_packed,
        v_packed,
        cu_seqlens_q,
        cu_seqlens_k,
        max(q_segments),
        max_seqlen_k,
        dropout_p=dropout_p,
        softmax_scale=1.0 / math.sqrt(dim),
        causal=False,
    )
    return out.view(batch, n_queries, heads, dim)


class FlashAttentionBackend(AttentionBackend):
    """flash-attn's flash_attn_varlen_func (flash-attn >= 2), wrapped for LXMERT's key-padding masks.

    - Unpad / pad: the queries go in whole, [B, H, Lq, D] -> [B*Lq, H, D] (a view for self-attention);
      the keys and values are gathered by the key mask into packed sequences with int32 cu_seqlens and the
      exact longest length. The output [B*Lq, H, D] is viewed back as [B, H, Lq, D] (strides [B, Lq, H, D],
      as triton's), so there is nothing to scatter. A padded language position is a query like any other
      and gets what eager, sdpa and triton give it; a query whose row has no real key gets zeros (flash-
      attn: "if the row of the mask is all zero, the output will be zero") and zero gradients.
    - bidirectional: one varlen call over 2B sequences. The queries are [language; regions] of each row;
      the keys and values [regions; language], masked by [vis_mask; lang_mask], so sequence 2b is row b's
      language over its regions and sequence 2b + 1 its regions over its language.
    - Scale 1 / sqrt(head_dim), causal=False, dropout_p on the probabilities as given (the model passes 0
      outside training); flash-attn draws its dropout mask from torch's CUDA generator (a different stream
      from the other backends').
    - No fallback: CPU tensors, dtypes other than fp16 / bf16 and head_dim > 256 raise a ValueError saying
      why (FLASH_DEVICES, FLASH_DTYPES); flash-attn itself refuses GPUs older than Ampere.
    - Unpadding the keys by a mask takes the packed key count (nonzero) and the longest key sequence (.max())
      on the host: found on the GPU, as flash-attn's own bert_padding.unpad_input does, each masked call waits
      for it twice. The `_packed` entries take them found ahead (PackedKeys, from the loader's Unpadding) and
      wait for nothing, with the same tensors handed to flash-attn; an unmasked call (region self-attention
      without a visual mask) never waits.
    """

    def __init__(self, varlen_fn: Callable[..., Tensor]):
        super().__init__("flash", self._attend)
        self.varlen_fn = varlen_fn

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float, keys: PackedKeys | None = None
    ) -> Tensor:
        _check_flash_inputs(q, k, v)
        out = varlen_attention(
            self.varlen_fn,
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            kv_mask,
            (q.shape[2],),
            (k.shape[2],),
            dropout_p,
            keys,
        )
        return out.transpose(1, 2)

    def attend_packed(
        self, q: Tensor, k: Tensor, v: Tensor, kv_mask: Tensor | None, dropout_p: float, keys: PackedKeys
    ) -> Tensor:
        return self._attend(q, k, v, kv_mask, dropout_p, keys)

    def bidirectional(
        self,
        lang_qkv: tuple[Tensor, Tensor, Tensor],
        vis_qkv: tuple[Tensor, Tensor, Tensor],
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        dropout_p: float,
        keys: PackedKeys | None = None,
    ) -> tuple[Tensor, Tensor]:
        (lq, lk, lv), (vq, vk, vv) = lang_qkv, vis_qkv
        _check_flash_inputs(lq, lk, lv, vq, vk, vv)
        n_lang, n_vis = lq.shape[2], vq.shape[2]

        def tokens(first: Tensor, second: Tensor) -> Tensor:  # two [B, H, L, D] -> [B, L1 + L2, H, D]
            return torch.cat([first.transpose(1, 2), second.transpose(1, 2)], dim=1)

        kv_mask = None  # over the keys [regions; language]; not needed where `keys` unpads them
        if keys is None and (lang_mask is not None or vis_mask is not None):
            kv_mask = torch.cat([_mask_or_all_real(vis_mask, vk), _mask_or_all_real(lang_mask, lk)], dim=1)
        out = varlen_attention(
            self.varlen_fn,
            tokens(lq, vq),
            tokens(vk, lk),
            tokens(vv, lv),
            kv_mask,
            (n_lang, n_vis),
            (n_vis, n_lang),
            dropout_p,
            keys,
        )
        return out[:, :n_lang].transpose(1, 2), out[:, n_lang:].transpose(1, 2)

    def bidirectional_packed(
        self,
        lang_qkv: tuple[Tensor, Tensor, Tensor],
        vis_qkv: tuple[Tensor, Tensor, Tensor],
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        dropout_p: float,
        keys: PackedKeys,
    ) -> tuple[Tensor, Tensor]:
        return self.bidirectional(lang_qkv, vis_qkv, lang_mask, vis_mask, dropout_p, keys)


def _flash_backend() -> AttentionBackend:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as error:
        raise ImportError(
            "attn_backend 'flash' needs the flash-attn package (>= 2, CUDA GPUs of the Ampere generation or "
            f"newer), which could not be imported ({error}): pip install flash-attn --no-build-isolation "
            "on a CUDA machine, or pick attn_backend 'sdpa' or 'triton'"
        ) from error
    return FlashAttentionBackend(flash_attn_varlen_func)


_ON_FIRST_USE = {  # backends whose import is deferred until one is asked for
    "triton": _triton_backend,
    "flash": _flash_backend,
}


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
