"""The LXMERT backbone, as the authors' code computes it (airsplay/lxmert, src/lxrt/modeling.py).

    text  -> embeddings (word + position + token type, LN) -> 9 language layers -----------\
    boxes -> (LN(W_f feats) + LN(W_p boxes)) / 2           -> 5 object-relationship layers -> 5 cross layers -> pooler
Language and object-relationship layers are the same post-LN BERT layer. A cross layer runs ONE shared
attention module both ways (language over regions, regions over language), then a self-attention and a
feed-forward block per stream. Every attention projects Q, K and V with one fused matrix and calls the
backend chosen by `config.attn_backend` (with the flash backend's unpadding where the caller found it ahead:
the keyword `unpadding`, an lxmert.attention.Unpadding, which other backends ignore); with
output_attentions=True every attention of that forward takes eager's probability-forming path instead
(lxmert.attention), and the probabilities come back as transformers returns them: one [B, heads, L, L] per
language layer, one [B, heads, R, R] per region layer, and the cross layers' language-over-regions
probabilities [B, heads, L, R] (transformers returns neither the regions-over-
language direction nor the cross layers' self-attentions).

Names differ from the authors' and transformers' (see lxmert.convert for the mapping); the arithmetic does not.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PackedKeys, Unpadding, eager_attention_with_probs, eager_bidirectional_with_probs, get_backend
from .config import LxmertConfig
from .pretrained import PretrainedMixin

Tensor = torch.Tensor


def activation(name: str):
    return {
        "gelu": F.gelu,  # the erf form, as the authors' gelu
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[name]


class ModelOutput:
    """Dataclass outputs readable by attribute, by name (out["loss"]) and as a tuple of the non-None fields
    (transformers' return_dict=False tuple; LxmertForPreTrainingOutput keeps fixed slots, see there)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]


@dataclass
class LxmertModelOutput(ModelOutput):
    language_output: Tensor  # [B, L, H] after the last cross layer
    vision_output: Tensor  # [B, R, H]
    pooled_output: Tensor  # [B, H] tanh(dense(language [CLS]))
    language_hidden_states: tuple[Tensor, ...] | None = None  # one per language layer, then per cross layer
    vision_hidden_states: tuple[Tensor, ...] | None = None  # one per region layer, then per cross layer
    language_attentions: tuple[Tensor, ...] | None = None  # one [B, heads, L, L] per language layer
    vision_attentions: tuple[Tensor, ...] | None = None  # one [B, heads, R, R] per region layer
    cross_encoder_attentions: tuple[Tensor, ...] | None = None  # one [B, heads, L, R] per cross layer


class TextEmbeddings(nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        # padding_idx=0 on all three tables as in the authors' code: row 0 of each never receives a gradient.
        self.word = nn.Embedding(config.vocab_size, h, padding_idx=0)
        self.position = nn.Embedding(config.max_position_embeddings, h, padding_idx=0)
        self.token_type = nn.Embedding(config.type_vocab_size, h, padding_idx=0)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


class VisualEmbeddings(nn.Module):
    """v = (LN(W_f f + b) + LN(W_p box + b)) / 2: two separate LayerNorms, averaged."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.feat_proj = nn.Linear(config.visual_feat_dim, h)
        self.feat_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.box_proj = nn.Linear(config.visual_pos_dim, h)
        self.box_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, visual_feats: Tensor, visual_pos: Tensor) -> Tensor:
        x = (self.feat_norm(self.feat_proj(visual_feats)) + self.box_norm(self.box_proj(visual_pos))) / 2
        return self.dropout(x)


class Attention(nn.Module):
    """Multi-head attention with its output block: LN(x + dropout(W_o attend(x W_qkv))).

    `forward` is self-attention; `bidirectional` is the cross layer's shared module run both ways, with the
    language and region tokens projected by one matrix multiplication. with_probs=True runs eager's path and
    also returns the probabilities (see the module header). `keys`: the mask's real keys found ahead (a part of
    an Unpadding), for a backend that unpads.
    """

    def __init__(self, config: LxmertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(h, 3 * h)  # rows: query, key, value
        self.out = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.backend = get_backend(config.attn_backend)

    def _heads(self, x_BLH: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, l, h = x_BLH.shape
        qkv = self.qkv(x_BLH).view(b, l, 3, self.num_heads, h // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: [B, heads, L, D]

    def _finish(self, ctx_BhLD: Tensor, residual_BLH: Tensor) -> Tensor:
        ctx = ctx_BhLD.transpose(1, 2).reshape(residual_BLH.shape)
        return self.norm(self.dropout(self.out(ctx)) + residual_BLH)

    def _dropout_p(self) -> float:
        return self.attn_dropout if self.training else 0.0

    def forward(
        self, x: Tensor, mask: Tensor | None, with_probs: bool = False, keys: PackedKeys | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, L, H] -> [B, L, H]; with_probs: (that, probabilities [B, heads, L, L])."""
        q, k, v = self._heads(x)
        if with_probs:
            ctx, probs = eager_attention_with_probs(q, k, v, mask, self._dropout_p())
            return self._finish(ctx, x), probs
        if keys is not None:
            return self._finish(self.backend.attend_packed(q, k, v, mask, self._dropout_p(), keys), x)
        return self._finish(self.backend.attend(q, k, v, mask, self._dropout_p()), x)

    def bidirectional(
        self,
        lang: Tensor,
        vis: Tensor,
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        with_probs: bool = False,
        keys: PackedKeys | None = None,
    ) -> tuple[Tensor, ...]:
        """(language, regions) after each attended to the other; with_probs: then the language-over-regions
        probabilities [B, heads, L, R] and the regions-over-language ones [B, heads, R, L]."""
        n_lang = lang.shape[1]
        both = torch.cat([lang, vis], dim=1)
        q, k, v = self._heads(both)
        lang_qkv = tuple(t[:, :, :n_lang] for t in (q, k, v))
        vis_qkv = tuple(t[:, :, n_lang:] for t in (q, k, v))
        if with_probs:
            lang_ctx, vis_ctx, *probs = eager_bidirectional_with_probs(
                lang_qkv, vis_qkv, lang_mask, vis_mask, self._dropout_p()
            )
        elif keys is not None:  # the real keys of [regions; language], found ahead
            lang_ctx, vis_ctx = self.backend.bidirectional_packed(
                lang_qkv, vis_qkv, lang_mask, vis_mask, self._dropout_p(), keys
            )
            probs = []
        else:
            lang_ctx, vis_ctx = self.backend.bidirectional(lang_qkv, vis_qkv, lang_mask, vis_mask, self._dropout_p())
            probs = []
        out = self._finish(torch.cat([lang_ctx, vis_ctx], dim=2), both)
        return out[:, :n_lang], out[:, n_lang:], *probs


class FeedForward(nn.Module):
    """LN(x + dropout(W_down act(W_up x)))."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.dropout(self.down(self.act(self.up(x)))) + x)


class BertLayer(nn.Module):
    """The post-LN BERT layer shared by the language and the object-relationship encoders."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.ffn = FeedForward(config)

    def forward(
        self, x: Tensor, mask: Tensor | None, output_attentions: bool = False, keys: PackedKeys | None = None
    ) -> Tensor | tuple[Tensor, ...]:
        """x [B, L, H] -> [B, L, H]; output_attentions: (that, the self-attention probabilities)."""
        if output_attentions:
            x, probs = self.attention(x, mask, with_probs=True)
            return self.ffn(x), probs
        return self.ffn(self.attention(x, mask, keys=keys))


class CrossLayer(nn.Module):
    """Shared bi-directional cross-attention, then per-stream self-attention and feed-forward."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.cross_attention = Attention(config)
        self.lang_attention = Attention(config)
        self.vis_attention = Attention(config)
        self.lang_ffn = FeedForward(config)
        self.vis_ffn = FeedForward(config)

    def forward(
        self,
        lang: Tensor,
        vis: Tensor,
        lang_mask: Tensor | None,
        vis_mask: Tensor | None,
        output_attentions: bool = False,
        unpadding: Unpadding | None = None,
    ) -> tuple[Tensor, ...]:
        """(language, regions); output_attentions: then the language-over-regions cross-attention probabilities
        [B, heads, L, R], the ones transformers returns (every attention of the layer runs eager's path).
        unpadding: the masks' real keys found ahead, for a backend that unpads."""
        if output_attentions:
            lang, vis, lang_over_regions, _ = self.cross_attention.bidirectional(
                lang, vis, lang_mask, vis_mask, with_probs=True
            )
            lang = self.lang_ffn(self.lang_attention(lang, lang_mask, with_probs=True)[0])
            vis = self.vis_ffn(self.vis_attention(vis, vis_mask, with_probs=True)[0])
            return lang, vis, lang_over_regions
        cross_keys, lang_keys, vis_keys = (None, None, None)
        if unpadding is not None:
            cross_keys, lang_keys, vis_keys = unpadding.cross, unpadding.language, unpadding.regions
        lang, vis = self.cross_attention.bidirectional(lang, vis, lang_mask, vis_mask, keys=cross_keys)
        lang = self.lang_ffn(self.lang_attention(lang, lang_mask, keys=lang_keys))
        vis = self.vis_ffn(self.vis_attention(vis, vis_mask, keys=vis_keys))
        return lang, vis


class HeadTransform(nn.Module):
    """dense + activation + LayerNorm, in front of the MLM decoder and the object decoders."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class AnswerHead(nn.Module):
    """Linear(in, hidden) -> GELU -> LN -> Linear(hidden, labels): the QA, VQA/GQA and NLVR2 classifiers."""

    def __init__(self, in_dim: int, hidden_dim: int, num_labels: int, eps: float = 1e-12):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc2 = nn.Linear(hidden_dim, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def init_weights(module: nn.Module, std: float) -> None:
    """The authors' init_bert_weights: N(0, std) for Linear and Embedding weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_inputs(
    config: LxmertConfig,
    input_ids: Tensor,
    visual_feats: Tensor,
    visual_pos: Tensor,
    attention_mask: Tensor | None,
    token_type_ids: Tensor | None,
    visual_attention_mask: Tensor | None,
) -> None:
    """Clear errors for malformed inputs, before they turn into an index error deep inside a layer."""
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    batch, n_tokens = input_ids.shape
    if n_tokens > config.max_position_embeddings:
        raise ValueError(f"{n_tokens} tokens exceed max_position_embeddings {config.max_position_embeddings}")
    if visual_feats.dim() != 3 or visual_feats.shape[0] != batch or visual_feats.shape[2] != config.visual_feat_dim:
        raise ValueError(
            f"visual_feats must be [batch={batch}, regions, visual_feat_dim={config.visual_feat_dim}], "
            f"got {tuple(visual_feats.shape)}"
        )
    n_regions = visual_feats.shape[1]
    if tuple(visual_pos.shape) != (batch, n_regions, config.visual_pos_dim):
        raise ValueError(
            f"visual_pos (boxes) must be [batch={batch}, regions={n_regions}, {config.visual_pos_dim}], "
            f"got {tuple(visual_pos.shape)}"
        )
    for name, mask, shape in (
        ("attention_mask", attention_mask, (batch, n_tokens)),
        ("token_type_ids", token_type_ids, (batch, n_tokens)),
        ("visual_attention_mask", visual_attention_mask, (batch, n_regions)),
    ):
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    for name, ids, limit in (
        ("input_ids", input_ids, config.vocab_size),
        ("token_type_ids", token_type_ids, config.type_vocab_size),
    ):
        if ids is not None and ids.numel():
            # asserted on the device: a CPU tensor raises RuntimeError here, a CUDA one fails the step with this
            # message, and neither makes the host wait (the engine's loaders check ids on the host first)
            torch._assert_async(((ids >= 0) & (ids < limit)).all(), f"{name} must lie in [0, {limit})")


class LxmertModel(PretrainedMixin, nn.Module):
    """The backbone: forward keywords and outputs named as transformers' LxmertModel."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.visual_embeddings = VisualEmbeddings(config)
        self.lang_layers = nn.ModuleList(BertLayer(config) for _ in range(config.l_layers))
        self.region_layers = nn.ModuleList(BertLayer(config) for _ in range(config.r_layers))
        self.cross_layers = nn.ModuleList(CrossLayer(config) for _ in range(config.x_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        init_weights(self, config.initializer_range)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        unpadding: Unpadding | None = None,
    ) -> LxmertModelOutput | tuple:
        """Keywords and outputs as transformers' LxmertModel. output_attentions=True: the probabilities of every
        language, region and cross layer (the module header says which), formed on eager's path whatever
        config.attn_backend is: that call runs eager's attention throughout.

        unpadding (ours): Unpadding.from_masks(attention_mask, visual_attention_mask, regions), found ahead (the
        engine's loaders make it on the host for attn_backend "flash"), so the flash backend never waits for the
        device to unpad the keys; without it the flash backend finds the same itself. Other backends ignore it."""
        check_inputs(
            self.config, input_ids, visual_feats, visual_pos, attention_mask, token_type_ids, visual_attention_mask
        )
        if unpadding is not None:
            unpadding.check(
                *input_ids.shape, visual_feats.shape[1], attention_mask is not None, visual_attention_mask is not None
            )
        lang_mask = None if attention_mask is None else attention_mask.bool()
        vis_mask = None if visual_attention_mask is None else visual_attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)

        lang = self.embeddings(input_ids, token_type_ids)
        vis = self.visual_embeddings(visual_feats, visual_pos)
        lang_keys, vis_keys = (None, None) if unpadding is None else (unpadding.language, unpadding.regions)
        lang_states, vis_states = [], []
        lang_probs, vis_probs, cross_probs = [], [], []
        for layer in self.lang_layers:
            if output_attentions:
                lang, probs = layer(lang, lang_mask, output_attentions=True)
                lang_probs.append(probs)
            else:
                lang = layer(lang, lang_mask, keys=lang_keys)
            lang_states.append(lang)
        for layer in self.region_layers:
            if output_attentions:
                vis, probs = layer(vis, vis_mask, output_attentions=True)
                vis_probs.append(probs)
            else:
                vis = layer(vis, vis_mask, keys=vis_keys)
            vis_states.append(vis)
        for layer in self.cross_layers:
            if output_attentions:
                lang, vis, probs = layer(lang, vis, lang_mask, vis_mask, output_attentions=True)
                cross_probs.append(probs)
            else:
                lang, vis = layer(lang, vis, lang_mask, vis_mask, unpadding=unpadding)
            lang_states.append(lang)
            vis_states.append(vis)
        pooled = torch.tanh(self.pooler(lang[:, 0]))

        out = LxmertModelOutput(
            language_output=lang,
            vision_output=vis,
            pooled_output=pooled,
            language_hidden_states=tuple(lang_states) if output_hidden_states else None,
            vision_hidden_states=tuple(vis_states) if output_hidden_states else None,
            language_attentions=tuple(lang_probs) if output_attentions else None,
            vision_attentions=tuple(vis_probs) if output_attentions else None,
            cross_encoder_attentions=tuple(cross_probs) if output_attentions else None,
        )
        return out if return_dict else out.to_tuple()
