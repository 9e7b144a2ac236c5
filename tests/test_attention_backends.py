"""The attention switch (lxmert/attention.py): every backend against a float64 reference, sdpa against eager
in a whole model, and the cross layer's shared module run both ways against two separate attentions.

Reference: softmax(q k^T / sqrt(d), padded keys removed) v in float64, gradients by autograd in float64.
Tolerances (float32 against float64): 1e-5 forward, 1e-4 gradients, relative to the largest reference value.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_inputs, random_pretraining_labels, randomize_, small_config

import lxmert
from lxmert.attention import BACKENDS, AttentionBackend, eager_attention, get_backend, register_backend, sdpa_attention
from lxmert.modeling import Attention

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
ATTEND = {"eager": eager_attention, "sdpa": sdpa_attention}


def reference_attention(q, k, v, kv_mask):
    """float64 softmax((q k^T) / sqrt(d)) v; masked keys get exactly zero weight."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if kv_mask is not None:
        scores = scores.masked_fill(~kv_mask[:, None, None, :], -math.inf)
    return torch.softmax(scores, dim=-1) @ v


def key_mask(kind: str, batch: int, keys: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_real":
        return torch.ones(batch, keys, dtype=torch.bool)
    if kind == "all_but_one_padded":  # one real key per row, at a random place
        mask = torch.zeros(batch, keys, dtype=torch.bool)
        mask[torch.arange(batch), torch.randint(0, keys, (batch,))] = True
        return mask
    if kind == "padded_tail":  # random lengths >= 1, the last row full
        lengths = torch.randint(1, keys + 1, (batch,))
        lengths[-1] = keys
        return torch.arange(keys)[None, :] < lengths[:, None]
    raise ValueError(kind)


# name -> (batch, heads, queries, keys, head_dim, mask kind)
CASES = {
    "all_but_one_key_padded": (3, 2, 5, 9, 8, "all_but_one_padded"),
    "one_key": (2, 3, 4, 1, 16, "all_real"),
    "37_keys_padded": (2, 4, 20, 37, 12, "padded_tail"),
    "batch_1_real_shapes": (1, 12, 36, 20, 64, "padded_tail"),
    "no_mask": (2, 2, 7, 11, 8, "none"),
}


@pytest.mark.parametrize("backend", list(ATTEND))
@pytest.mark.parametrize("case", list(CASES))
def test_attend_matches_float64_reference_forward_and_gradients(backend, case):
    torch.manual_seed(10)
    batch, heads, queries, keys, dim, kind = CASES[case]
    q = (2 * torch.randn(batch, heads, queries, dim)).requires_grad_()  # scores of std ~2: peaked softmax
    k = torch.randn(batch, heads, keys, dim).requires_grad_()
    v = torch.randn(batch, heads, keys, dim).requires_grad_()
    mask = key_mask(kind, batch, keys)
    grad_out = torch.randn(batch, heads, queries, dim)

    out = ATTEND[backend](q, k, v, mask, 0.0)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())

    assert out.dtype == torch.float32
    assert_close(out, ref, FWD_TOL, f"{backend} output")
    # dq is exactly 0 where a row has one real key (softmax of one score): judge its rounding noise by dk, dv
    one_real_key = keys == 1 or (mask is not None and bool((mask.sum(-1) <= 1).all()))
    floor = max(g.abs().max().item() for g in ref_grads) if one_real_key else 0.0
    for name, got, expected in zip("qkv", grads, ref_grads):
        assert_close(got, expected, GRAD_TOL, f"{backend} d{name}", floor=floor)
    if mask is not None and not mask.all():  # a padded key gets exactly no gradient, as in the reference
        padded = ~mask[:, None, :, None].expand_as(k)
        assert torch.count_nonzero(grads[1][padded]) == 0 and torch.count_nonzero(grads[2][padded]) == 0


def test_unknown_backend_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown attn_backend 'nope'") as error:
        get_backend("nope")
    for name in BACKENDS:
        assert repr(name) in str(error.value)


def test_default_bidirectional_is_two_attend_calls_one_per_direction():
    torch.manual_seed(11)
    calls = []

    def recording(q, k, v, kv_mask, dropout_p):
        calls.append((q, k, v, kv_mask, dropout_p))
        return eager_attention(q, k, v, kv_mask, dropout_p)

    lang = tuple(torch.randn(2, 3, 13, 8) for _ in range(3))
    vis = tuple(torch.randn(2, 3, 37, 8) for _ in range(3))
    lang_mask, vis_mask = key_mask("padded_tail", 2, 13), key_mask("padded_tail", 2, 37)
    lang_ctx, vis_ctx = AttentionBackend("recording", recording).bidirectional(lang, vis, lang_mask, vis_mask, 0.0)

    # language queries over region keys / values with the region mask, then the reverse with the language mask
    assert [tuple(map(id, c[:4])) for c in calls] == [
        (id(lang[0]), id(vis[1]), id(vis[2]), id(vis_mask)),
        (id(vis[0]), id(lang[1]), id(lang[2]), id(lang_mask)),
    ]
    assert torch.equal(lang_ctx, eager_attention(lang[0], vis[1], vis[2], vis_mask, 0.0))
    assert torch.equal(vis_ctx, eager_attention(vis[0], lang[1], lang[2], lang_mask, 0.0))
    for name in ("eager", "sdpa"):  # and the registered backends keep the default
        lang_ctx, vis_ctx = get_backend(name).bidirectional(lang, vis, lang_mask, vis_mask, 0.0)
        assert torch.equal(lang_ctx, ATTEND[name](lang[0], vis[1], vis[2], vis_mask, 0.0))
        assert torch.equal(vis_ctx, ATTEND[name](vis[0], lang[1], lang[2], lang_mask, 0.0))


def separate_attention_float64(params, x, ctx, ctx_mask, heads):
    """transformers' LxmertCrossAttentionLayer by hand: queries from x, keys / values from ctx, then
    LN(dense(context) + x). Everything float64, with the fused qkv split back into query, key, value."""
    wq, wk, wv = params["qkv.weight"].chunk(3)
    bq, bk, bv = params["qkv.bias"].chunk(3)

    def split(t):  # [B, L, H] -> [B, heads, L, H / heads]
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    context = reference_attention(split(x @ wq.T + bq), split(ctx @ wk.T + bk), split(ctx @ wv.T + bv), ctx_mask)
    context = context.transpose(1, 2).reshape(x.shape)
    out = context @ params["out.weight"].T + params["out.bias"] + x
    return F.layer_norm(out, out.shape[-1:], params["norm.weight"], params["norm.bias"], eps=1e-12)


@pytest.mark.parametrize("backend", list(ATTEND))
@pytest.mark.parametrize("masks", ["language_padded", "both_padded"])
def test_cross_attention_bidirectional_equals_two_separate_attentions(backend, masks):
    torch.manual_seed(12)
    config = small_config(attn_backend=backend)
    module = randomize_(Attention(config)).eval()
    lang = torch.randn(3, 13, config.hidden_size, requires_grad=True)
    vis = torch.randn(3, 37, config.hidden_size, requires_grad=True)
    lang_mask = key_mask("padded_tail", 3, 13)
    vis_mask = key_mask("padded_tail", 3, 37) if masks == "both_padded" else None
    lang_out, vis_out = module.bidirectional(lang, vis, lang_mask, vis_mask)

    params = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    lang64, vis64 = lang.detach().double().requires_grad_(), vis.detach().double().requires_grad_()
    ref_lang = separate_attention_float64(params, lang64, vis64, vis_mask, config.num_attention_heads)
    ref_vis = separate_attention_float64(params, vis64, lang64, lang_mask, config.num_attention_heads)
    assert_close(lang_out, ref_lang, FWD_TOL, "language over regions")
    assert_close(vis_out, ref_vis, FWD_TOL, "regions over language")

    g_lang, g_vis = torch.randn_like(lang_out), torch.randn_like(vis_out)
    names = list(params)
    grads = torch.autograd.grad(
        (lang_out, vis_out), [lang, vis, *(dict(module.named_parameters())[n] for n in names)], (g_lang, g_vis)
    )
    ref_grads = torch.autograd.grad(
        (ref_lang, ref_vis), [lang64, vis64, *params.values()], (g_lang.double(), g_vis.double())
    )
    for name, got, expected in zip(["lang", "vis", *names], grads, ref_grads):
        assert_close(got, expected, GRAD_TOL, f"d/d {name}")


@pytest.mark.parametrize(
    "backend, shape",
    [
        ("sdpa", (2, 20, 36)),
        ("sdpa", (3, 13, 37)),
        ("sdpa", (1, 1, 1)),
        ("triton", (2, 20, 36)),  # the Triton kernels, interpreted on the CPU: LXMERT's shapes and odd ones
        ("triton", (1, 1, 37)),
    ],
)
def test_backend_model_matches_eager_model_forward_and_every_gradient(backend, shape):
    """sdpa, and triton with the fused feature-regression loss too, against eager: outputs, losses, grads."""
    torch.manual_seed(13)
    batch, tokens, regions = shape
    eager = randomize_(lxmert.LxmertForPreTraining(small_config(attn_backend="eager"))).eval()
    feat_loss_backend = "triton" if backend == "triton" else "torch"
    other = lxmert.LxmertForPreTraining(small_config(attn_backend=backend, feat_loss_backend=feat_loss_backend)).eval()
    other.load_state_dict(eager.state_dict())
    assert {m.backend.name for m in other.modules() if isinstance(m, Attention)} == {backend}
    if backend == "triton":  # the kernels themselves, never their PyTorch fallback
        from kernels import feature_regression, fused_attention

        probe = torch.empty(0)
        assert fused_attention.triton_runs_on(probe) and feature_regression.triton_runs_on(probe)
    inputs = random_inputs(eager.config, batch, tokens, regions)
    labels = random_pretraining_labels(eager.config, batch, tokens, regions)

    outs = {}
    for name, model in (("eager", eager), ("other", other)):
        outs[name] = model(**inputs, **labels, output_hidden_states=True, return_prediction_logits=True)
        outs[name].loss.backward()
    got, expected = outs["other"], outs["eager"]
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score", "loss"):
        assert_close(got[key], expected[key], FWD_TOL, key)
    for key in ("language_hidden_states", "vision_hidden_states"):
        assert len(got[key]) == len(expected[key])
        for i, (a, b) in enumerate(zip(got[key], expected[key])):
            assert_close(a, b, FWD_TOL, f"{key}[{i}]")
    for name in got.losses:
        assert_close(got.losses[name], expected.losses[name], FWD_TOL, f"loss {name}")
    eager_params = dict(eager.named_parameters())
    for name, param in other.named_parameters():
        assert param.grad is not None and eager_params[name].grad is not None, name
        assert_close(param.grad, eager_params[name].grad, GRAD_TOL, f"grad {name}")


class CountingBackend(AttentionBackend):
    """eager, counting the calls of each entry point."""

    def __init__(self):
        super().__init__("counting", self._attend)
        self.attend_calls = 0
        self.bidirectional_calls = 0

    def _attend(self, *args):
        self.attend_calls += 1
        return eager_attention(*args)

    def bidirectional(self, *args):
        self.bidirectional_calls += 1
        return super().bidirectional(*args)


def test_every_attention_of_the_model_goes_through_the_configured_backend():
    torch.manual_seed(14)
    counting = CountingBackend()
    register_backend(counting)
    try:
        config = small_config(l_layers=2, r_layers=3, x_layers=2, attn_backend="counting")
        model = randomize_(lxmert.LxmertModel(config)).eval()
    finally:
        del BACKENDS["counting"]
    reference = lxmert.LxmertModel(small_config(l_layers=2, r_layers=3, x_layers=2)).eval()
    reference.load_state_dict(model.state_dict())
    inputs = random_inputs(config, 2, 9, 5)
    got, expected = model(**inputs), reference(**inputs)
    # self-attention: one per language and region layer, two per cross layer; cross: two directions a layer
    assert counting.bidirectional_calls == config.x_layers
    assert counting.attend_calls == config.l_layers + config.r_layers + 2 * config.x_layers + 2 * config.x_layers
    for key in ("language_output", "vision_output", "pooled_output"):
        assert torch.equal(got[key], expected[key]), key
