"""kernels/fused_attention.py: outputs and every gradient against a float64 reference, per dtype.

Errors are relative: max |kernel - ref| / max |ref|, with ref the float64 reference on the same (rounded)
inputs. fp32 must be within 1e-5. fp16 / bf16 must be within 2x PyTorch's own error (reference_attention run
by plain torch ops in that dtype, measured against the same float64 reference) plus ATTENTION_SLACK[dtype]
(kernels/errors.py's against_float64).

On a machine without CUDA the kernels run in the Triton interpreter (slow: shapes stay small).
"""

import pytest
import torch

import kernels.fused_attention as ca
from kernels.errors import ATTENTION_SLACK, against_float64, rel_err
from kernels.errors import outputs_and_grads as run  # outputs, then every input's gradient

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# conftest.py turns the interpreter on before triton is imported when there is no GPU; never test the
# PyTorch fallback by accident
TRITON_READY = ca.triton_runs_on(torch.empty(0, device=DEVICE))
NOT_READY = "the Triton kernels cannot run here: TRITON_INTERPRET=1 was not set before triton was imported"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _kernels_must_run():
    if not TRITON_READY:
        pytest.fail(NOT_READY)


# ---------------------------------------------------------------------------------------------- helpers


def key_mask(kind: str, batch: int, length: int, g: torch.Generator):
    """None, or bool [B, L]: "lengths" (random real prefixes, the last row full), "one" (a single real key
    per row, anywhere), "one_empty" (like lengths, but row 0 has no real key at all)."""
    if kind == "none":
        return None
    if kind == "one":
        return torch.nn.functional.one_hot(torch.randint(0, length, (batch,), generator=g), length).bool()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[-1] = length
    if kind == "one_empty":
        lengths[0] = 0
    return torch.arange(length)[None, :] < lengths[:, None]


def check_against_float64(kernel_fn, ref_fn, inputs64, grad_outs, dtype, names):
    """kernels.errors' rule (the one benchmarks.kernels applies at LXMERT's sizes), with rel_err."""
    result = against_float64(kernel_fn, ref_fn, inputs64, grad_outs, dtype, names, rel_err, ATTENTION_SLACK)
    for name, k in result["kernel"].items():
        assert k.dtype == dtype and torch.isfinite(k).all(), name
    assert result["passed"], {k: (e, result["tolerances"][k]) for k, e in result["errors"].items()}


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE)


def on_device(t):
    return None if t is None else t.to(DEVICE)


# -------------------------------------------------------------------------------- one direction, per dtype

# name: (batch, heads, Lq, Lk, head_dim, key mask)
CASES = {
    "lang_over_regions": (2, 2, 20, 36, 64, "none"),
    "regions_over_padded_lang": (2, 2, 36, 20, 64, "lengths"),
    "lang_self_d32_b4": (4, 2, 20, 20, 32, "lengths"),
    "d128": (2, 1, 36, 20, 128, "lengths"),
    "one_token_over_37_regions": (2, 2, 1, 37, 64, "none"),
    "37_regions_over_one_token": (2, 2, 37, 1, 64, "none"),
    "all_but_one_key_padded": (2, 2, 20, 36, 32, "one"),
    "fully_padded_row": (3, 2, 20, 20, 32, "one_empty"),
    "batch1": (1, 2, 20, 36, 64, "lengths"),
    "100_queries_128_keys": (1, 1, 100, 128, 32, "lengths"),  # two query blocks, the largest key tile
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_attention_against_float64(case, dtype):
    batch, heads, len_q, len_k, dim, mask_kind = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    mask = on_device(key_mask(mask_kind, batch, len_k, g))
    q = randn(batch, heads, len_q, dim, g=g)
    k, v = randn(batch, heads, len_k, dim, g=g), randn(batch, heads, len_k, dim, g=g)
    grad_out = randn(batch, heads, len_q, dim, g=g)
    check_against_float64(
        lambda q, k, v: ca.cross_attention(q, k, v, mask),
        lambda q, k, v: ca.reference_attention(q, k, v, mask),
        [q, k, v],
        [grad_out],
        dtype,
        ["out", "dq", "dk", "dv"],
    )


def test_fully_padded_row_gives_zero_output_and_zero_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (randn(2, 2, 5, 16, g=g).float() for _ in range(3))
    mask = on_device(torch.tensor([[False] * 5, [True, True, False, True, False]]))
    out, dq, dk, dv = run(lambda q, k, v: ca.cross_attention(q, k, v, mask), [q, k, v], [torch.ones_like(q)])
    assert not out[0].any() and not dq[0].any() and not dk[0].any() and not dv[0].any()
    assert out[1].abs().min() > 0 and not dk[1][:, mask[1] == 0].any() and not dv[1][:, mask[1] == 0].any()


def test_noncontiguous_views_of_one_qkv_projection():
    """Self-attention on q, k, v = slices of a permuted [B, L, 3, H, D] tensor, as the model passes them."""
    g = torch.Generator().manual_seed(1)
    batch, length, heads, dim = 2, 37, 2, 32
    qkv = randn(batch, length, 3, heads, dim, g=g)
    mask = on_device(key_mask("lengths", batch, length, g))
    grad_out = randn(batch, heads, length, dim, g=g)

    def split(fn):
        return lambda x: fn(*x.permute(2, 0, 3, 1, 4).unbind(0), mask)

    q = qkv.float().permute(2, 0, 3, 1, 4)[0]
    assert not q.is_contiguous() and q.stride(-1) == 1
    out, dqkv = run(split(ca.cross_attention), [qkv.float()], [grad_out])
    ref_out, ref_dqkv = run(split(ca.reference_attention), [qkv.float().double()], [grad_out])
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(dqkv, ref_dqkv) <= 1e-5
    # the output is laid out [B, L, H, D], so the model's transpose(1, 2).reshape is a view
    assert out.transpose(1, 2).is_contiguous()


def test_strided_last_dim_and_expanded_grad_are_copied_not_misread():
    g = torch.Generator().manual_seed(2)
    q = randn(1, 2, 20, 64, g=g).float()[..., ::2]  # head-dim stride 2
    k, v = randn(1, 2, 36, 32, g=g).float(), randn(1, 2, 36, 32, g=g).float()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ca.cross_attention(*leaves).sum().backward()  # grad_out is an expanded (all-zero-stride) tensor
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ca.reference_attention(*ref).sum().backward()
    for a, b in zip(leaves, ref):
        assert rel_err(a.grad, b.grad) <= 1e-5


# ------------------------------------------------------------------------------------------ bidirectional


def model_views(x, n_lang):
    """(lang q, k, v), (vis q, k, v): slices of x [B, L+R, 3, H, D] as lxmert.modeling.Attention makes them."""
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(t[:, :, :n_lang] for t in (q, k, v)), tuple(t[:, :, n_lang:] for t in (q, k, v))


def bidirectional_reference(x, n_lang, lang_mask, vis_mask):
    (lq, lk, lv), (vq, vk, vv) = model_views(x, n_lang)
    return ca.reference_attention(lq, vk, vv, vis_mask), ca.reference_attention(vq, lk, lv, lang_mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bidirectional_equals_two_reference_directions(dtype):
    """LXMERT's cross layer: 20 tokens (padded) and 36 regions from one qkv projection, both ways."""
    g = torch.Generator().manual_seed(3)
    batch, n_lang, n_vis, heads, dim = 3, 20, 36, 2, 64
    x = randn(batch, n_lang + n_vis, 3, heads, dim, g=g)
    lang_mask = on_device(key_mask("lengths", batch, n_lang, g))
    vis_mask = on_device(key_mask("lengths", batch, n_vis, g))
    grads = [randn(batch, heads, n_lang, dim, g=g), randn(batch, heads, n_vis, dim, g=g)]
    check_against_float64(
        lambda x: ca.bidirectional_from_views(*model_views(x, n_lang), lang_mask, vis_mask, 0.0),
        lambda x: bidirectional_reference(x, n_lang, lang_mask, vis_mask),
        [x],
        grads,
        dtype,
        ["lang_ctx", "vis_ctx", "dqkv"],
    )


def test_bidirectional_attention_awkward_and_equal_to_two_kernel_calls():
    """One token, 37 regions, batch 1, no language mask, some regions padded; q, k, v given separately."""
    g = torch.Generator().manual_seed(4)
    n_lang, n_vis = 1, 37
    q, k, v = (randn(1, 2, n_lang + n_vis, 32, g=g).float() for _ in range(3))
    vis_mask = on_device(key_mask("lengths", 1, n_vis, g))
    vis_mask[0, 5] = False  # a hole, not only a padded tail
    grads = [randn(1, 2, n_lang, 32, g=g), randn(1, 2, n_vis, 32, g=g)]
    fused = run(lambda q, k, v: ca.bidirectional_attention(q, k, v, n_lang, None, vis_mask), [q, k, v], grads)

    def two_calls(fn, q, k, v):
        lang = fn(q[:, :, :n_lang], k[:, :, n_lang:], v[:, :, n_lang:], vis_mask)
        return lang, fn(q[:, :, n_lang:], k[:, :, :n_lang], v[:, :, :n_lang], None)

    truth = run(lambda *t: two_calls(ca.reference_attention, *t), [t.double() for t in (q, k, v)], grads)
    separate = run(lambda *t: two_calls(ca.cross_attention, *t), [q, k, v], grads)
    for name, f, t, s in zip(["lang_ctx", "vis_ctx", "dq", "dk", "dv"], fused, truth, separate):
        assert rel_err(f, t) <= 1e-5 and rel_err(f, s) <= 1e-6, name


def test_bidirectional_one_output_unused():
    g = torch.Generator().manual_seed(5)
    x = randn(1, 20 + 36, 3, 1, 16, g=g).float().requires_grad_()
    lang_ctx, _ = ca.bidirectional_from_views(*model_views(x, 20), None, None, 0.0)
    lang_ctx.sum().backward()
    ref = x.detach().double().requires_grad_()
    bidirectional_reference(ref, 20, None, None)[0].sum().backward()
    assert rel_err(x.grad, ref.grad) <= 1e-5


# ------------------------------------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_float64(dropout_p):
    g = torch.Generator().manual_seed(6)
    q, k, v = randn(1, 1, 3, 16, g=g), randn(1, 1, 5, 16, g=g), randn(1, 1, 5, 16, g=g)
    mask = on_device(torch.tensor([[True, True, False, True, True]]))

    def single(q, k, v):
        torch.manual_seed(0)  # the same dropout seed for every evaluation
        return ca.cross_attention(q, k, v, mask, dropout_p=dropout_p)

    x = randn(1, 3 + 5, 3, 1, 16, g=g)
    lang_mask = on_device(torch.tensor([[True, True, False]]))

    def both(x):
        torch.manual_seed(0)
        return ca.bidirectional_from_views(*model_views(x, 3), lang_mask, None, dropout_p)

    assert torch.autograd.gradcheck(single, [t.requires_grad_() for t in (q, k, v)], fast_mode=True)
    assert torch.autograd.gradcheck(both, [x.requires_grad_()], fast_mode=True)


# ------------------------------------------------------------------------------------------------ dropout

P = 0.1


def test_dropout_matches_reference_with_the_kernels_mask():
    g = torch.Generator().manual_seed(7)
    batch, heads, len_q, len_k, dim = 2, 2, 20, 36, 32
    q = randn(batch, heads, len_q, dim, g=g)
    k, v = randn(batch, heads, len_k, dim, g=g), randn(batch, heads, len_k, dim, g=g)
    mask = on_device(key_mask("lengths", batch, len_k, g))
    grad_out = randn(batch, heads, len_q, dim, g=g)

    def kernel(q, k, v):
        torch.manual_seed(11)
        return ca.cross_attention(q, k, v, mask, dropout_p=P)

    torch.manual_seed(11)
    keep = ca.dropout_keep_mask(ca.draw_dropout_seed(DEVICE), batch, heads, len_q, len_k, P, DEVICE)
    assert 0 < (~keep).sum() < keep.numel()
    got = run(kernel, [t.float() for t in (q, k, v)], [grad_out])
    want = run(lambda q, k, v: ca.reference_attention(q, k, v, mask, None, keep, P), [q, k, v], [grad_out])
    for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
        assert rel_err(a, b) <= 1e-5, name
    no_dropout = ca.reference_attention(q, k, v, mask)
    assert rel_err(got[0], no_dropout) > 1e-2  # the mask did something


def test_bidirectional_dropout_matches_reference_with_the_kernels_masks():
    g = torch.Generator().manual_seed(8)
    batch, n_lang, n_vis, heads, dim = 2, 20, 36, 2, 32
    x = randn(batch, n_lang + n_vis, 3, heads, dim, g=g)
    lang_mask = on_device(key_mask("lengths", batch, n_lang, g))
    grads = [randn(batch, heads, n_lang, dim, g=g), randn(batch, heads, n_vis, dim, g=g)]

    def kernel(x):
        torch.manual_seed(12)
        return ca.bidirectional_from_views(*model_views(x, n_lang), lang_mask, None, P)

    torch.manual_seed(12)
    seed = ca.draw_dropout_seed(DEVICE)
    lang_keep = ca.dropout_keep_mask(seed, batch, heads, n_lang, n_vis, P, DEVICE)
    vis_keep = ca.dropout_keep_mask(seed, batch, heads, n_vis, n_lang, P, DEVICE, first_program=batch * heads)

    def reference(x):
        (lq, lk, lv), (vq, vk, vv) = model_views(x, n_lang)
        return (
            ca.reference_attention(lq, vk, vv, None, None, lang_keep, P),
            ca.reference_attention(vq, lk, lv, lang_mask, None, vis_keep, P),
        )

    got, want = run(kernel, [x.float()], grads), run(reference, [x], grads)
    for name, a, b in zip(["lang_ctx", "vis_ctx", "dqkv"], got, want):
        assert rel_err(a, b) <= 1e-5, name


def test_dropout_seed_reproducibility_and_keep_rate():
    g = torch.Generator().manual_seed(9)
    q, k, v = (randn(2, 1, 20, 16, g=g).float() for _ in range(3))

    def attend(seed):
        torch.manual_seed(seed)
        return ca.cross_attention(q, k, v, dropout_p=P)

    assert torch.equal(attend(1), attend(1)) and not torch.equal(attend(1), attend(2))

    batch, heads, len_q, len_k = 4, 3, 64, 128
    keep = ca.dropout_keep_mask(1234, batch, heads, len_q, len_k, P, DEVICE)
    assert abs(keep.float().mean().item() - (1 - P)) < 0.01  # 98304 draws: sd 0.001
    other = ca.dropout_keep_mask(1234, batch, heads, len_q, len_k, P, DEVICE, first_program=batch * heads)
    assert (keep != other).float().mean() > 0.1  # the second direction's stream is not the first one's
    assert (keep[0, 0] != keep[0, 1]).any() and (keep[0, 0, 0] != keep[0, 0, 1]).any()


# -------------------------------------------------------------------------------------- limits and fallback


def test_limits_raise():
    q = torch.zeros(1, 1, 4, 16, device=DEVICE)
    k = torch.zeros(1, 1, ca.MAX_KEYS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError):
        ca.cross_attention(q, k, k)
    with pytest.raises(ValueError):
        ca.cross_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError):
        ca.cross_attention(q, q, q, torch.ones(1, 5, dtype=torch.bool, device=DEVICE))


def test_bad_key_masks_raise_before_any_op(monkeypatch):
    """The masks are checked by the entry points (the ops' fake impls do not look at them), on both paths."""
    g = torch.Generator().manual_seed(15)
    lang, vis = model_views(randn(2, 4 + 6, 3, 1, 16, g=g).float(), 4)
    good_lang, good_vis = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    for interpreted in (True, False):
        monkeypatch.setattr(ca, "_INTERPRETED", interpreted and ca._INTERPRETED)
        for lang_mask, vis_mask in ((good_lang[:, :3], good_vis), (good_lang, good_vis[:1]), (good_vis, good_vis)):
            with pytest.raises(ValueError, match="key mask must be"):
                ca.bidirectional_from_views(lang, vis, on_device(lang_mask), on_device(vis_mask), 0.0)
        with pytest.raises(ValueError, match="key mask must be"):
            ca.cross_attention(*lang, on_device(good_vis))


def test_cpu_without_interpreter_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(ca, "_INTERPRETED", False)
    g = torch.Generator().manual_seed(10)
    x = randn(2, 20 + 36, 3, 2, 16, g=g).cpu()
    lang_mask = key_mask("lengths", 2, 20, g)
    views = model_views(x.float(), 20)
    assert not ca.triton_runs_on(x)
    lang_ctx, vis_ctx = ca.bidirectional_from_views(*views, lang_mask, None, 0.0)
    ref_lang, ref_vis = bidirectional_reference(x, 20, lang_mask, None)
    assert rel_err(lang_ctx, ref_lang) <= 1e-5 and rel_err(vis_ctx, ref_vis) <= 1e-5
    (lq, lk, lv), _ = views
    assert rel_err(ca.cross_attention(lq, lk, lv, lang_mask), ca.reference_attention(lq, lk, lv, lang_mask)) == 0
    dropped = ca.cross_attention(lq, lk, lv, lang_mask, dropout_p=0.5)
    assert torch.isfinite(dropped).all() and rel_err(dropped, ca.reference_attention(lq, lk, lv, lang_mask)) > 1e-2


# ---------------------------------------------------------------------------------------- in the model


def test_in_lxmert_attention_module_matches_sdpa():
    """attend / bidirectional_from_views as the model's backend (head dim 12: a masked head-dim tail)."""
    from lxmert.attention import AttentionBackend, get_backend
    from lxmert.config import LxmertConfig
    from lxmert.modeling import Attention

    config = LxmertConfig(hidden_size=36, num_attention_heads=3, attn_backend="sdpa")
    torch.manual_seed(13)
    sdpa = Attention(config).eval().to(DEVICE)
    ours = Attention(config).eval().to(DEVICE)
    ours.load_state_dict(sdpa.state_dict())
    ours.backend = AttentionBackend("triton-test", ca.attend)
    ours.backend.bidirectional = ca.bidirectional_from_views
    assert sdpa.backend is get_backend("sdpa")
    g = torch.Generator().manual_seed(14)
    lang, vis = randn(2, 20, 36, g=g).float(), randn(2, 36, 36, g=g).float()
    lang_mask = on_device(key_mask("lengths", 2, 20, g))
    # random weights on the outputs: a plain sum of a LayerNorm output has (almost) no gradient
    w_lang, w_vis, w_self = randn(2, 20, 36, g=g).float(), randn(2, 36, 36, g=g).float(), randn(2, 20, 36, g=g).float()
    outs = {}
    for name, module in (("sdpa", sdpa), ("ours", ours)):
        lang_out, vis_out = module.bidirectional(lang, vis, lang_mask, None)
        self_out = module(lang, lang_mask)
        ((lang_out * w_lang).sum() + (vis_out * w_vis).sum() + (self_out * w_self).sum()).backward()
        outs[name] = [lang_out, vis_out, self_out, module.qkv.weight.grad, module.qkv.bias.grad]
    for a, b in zip(outs["ours"], outs["sdpa"]):
        assert rel_err(a, b) <= 1e-5
