"""The "flash" attention backend (lxmert/attention.py, FlashAttentionBackend) without flash-attn and without a GPU.

flash-attn is not installable here, so `flash_attn` is replaced in sys.modules by a stand-in whose
flash_attn_varlen_func is flash-attn 2's documented contract written out in float64: q [total_q, H, D],
k / v [total_k, H_k, D], int32 cu_seqlens with cu[-1] = total, max_seqlen = the longest sequence, per-sequence
softmax(q k^T * softmax_scale) v (scale 1 / sqrt(D) by default, causal=False), dropout on the probabilities,
zeros for a query with no key ("if the row of the mask is all zero, the output will be zero"). It asserts
every part of that contract it is handed, so these tests prove the unpad / pack / pad plumbing against it.
The stand-in runs on the CPU in float64, which the backend refuses from the real package: the fixture widens
attention.FLASH_DEVICES / FLASH_DTYPES to let it through, the one place they change.

Reference: the eager backend in float64, with zeros for a query whose row has no real key (what flash-attn,
sdpa on the CPU and triton give; eager gives the mean of the values there). Tolerance 1e-12, relative.
The last tests need a CUDA GPU with flash-attn installed: the real kernels in bf16 against sdpa.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    cast_floats,
    random_inputs,
    random_pretraining_labels,
    randomize_,
    rel_err,
    small_config,
)

import lxmert
from lxmert import attention
from lxmert.attention import BACKENDS, FlashAttentionBackend, available_backends, eager_attention, get_backend
from lxmert.modeling import Attention

TOL = 1e-12  # float64 against float64
HEADS, DIM = 12, 64  # LXMERT's heads


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


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn is the float64 stand-in (the backend re-imports it); returns the list of its calls."""
    calls = []
    signature = inspect.signature(reference_varlen)

    def flash_attn_varlen_func(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments)
        return reference_varlen(*args, **kwargs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cpu",))
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float64,))
    BACKENDS.pop("flash", None)
    yield calls
    BACKENDS.pop("flash", None)


@pytest.fixture
def unloaded_flash():
    """The flash backend is loaded afresh by the test, and forgotten after it."""
    BACKENDS.pop("flash", None)
    yield
    BACKENDS.pop("flash", None)


def projection(batch: int, tokens: int, device: str = "cpu") -> torch.Tensor:
    """A [B, L, 3, H, D] float64 leaf standing for the model's fused qkv projection."""
    return (torch.randn(batch, tokens, 3, HEADS, DIM, dtype=torch.float64, device=device) * 1.5).requires_grad_()


def heads(qkv_BL3HD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, L, D] as Attention._heads makes them: strided views of one projection."""
    return qkv_BL3HD.permute(2, 0, 3, 1, 4).unbind(0)


def key_mask(batch: int, keys: int, lengths) -> torch.Tensor | None:
    """None, "scattered" (random real keys, the first always real) or per-row lengths (a padded tail)."""
    if lengths is None:
        return None
    if lengths == "scattered":
        mask = torch.rand(batch, keys) < 0.4
        mask[:, 0] = True
        return mask
    return torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]


def reference_attend(q, k, v, kv_mask):
    """eager, with zeros for the queries of a row without a real key."""
    out = eager_attention(q, k, v, kv_mask, 0.0)
    if kv_mask is None:
        return out
    return out * kv_mask.any(1)[:, None, None, None]


# name -> (batch, queries, keys, self-attention, key lengths)
ATTEND_CASES = {
    "language_self_20_tokens_padded": (4, 20, 20, True, [20, 12, 3, 1]),
    "regions_self_36": (2, 36, 36, True, None),
    "language_over_36_regions": (2, 20, 36, False, None),
    "regions_over_padded_language": (3, 36, 20, False, [20, 5, 1]),
    "one_token_over_37_regions_batch_1": (1, 1, 37, False, None),
    "37_regions_over_one_token_batch_1": (1, 37, 1, False, [1]),
    "scattered_real_keys": (3, 13, 13, True, "scattered"),
    "fully_padded_row": (3, 20, 20, True, [20, 0, 7]),
}


@pytest.mark.parametrize("case", list(ATTEND_CASES))
def test_attend_matches_eager_in_float64_forward_and_every_gradient(fake_flash, case):
    torch.manual_seed(20)
    batch, queries, keys, is_self, lengths = ATTEND_CASES[case]
    sources = [projection(batch, queries)] if is_self else [projection(batch, queries), projection(batch, keys)]
    q = heads(sources[0])[0]
    k, v = heads(sources[-1])[1:]
    mask = key_mask(batch, keys, lengths)
    grad_out = torch.randn(batch, HEADS, queries, DIM, dtype=torch.float64)

    out = get_backend("flash").attend(q, k, v, mask, 0.0)
    grads = torch.autograd.grad(out, sources, grad_out)
    ref = reference_attend(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref, sources, grad_out)

    assert out.shape == (batch, HEADS, queries, DIM) and out.dtype == torch.float64
    assert_close(out, ref, TOL, "output")
    for source, (got, expected) in enumerate(zip(grads, ref_grads)):
        for i, name in enumerate("qkv"):
            if got[:, :, i].abs().sum() or expected[:, :, i].abs().sum():  # what this source feeds
                assert_close(got[:, :, i], expected[:, :, i], TOL, f"d{name} of source {source}")
    (call,) = fake_flash
    assert call["softmax_scale"] == 1 / math.sqrt(DIM) and call["dropout_p"] == 0.0 and call["causal"] is False
    if mask is not None:
        dk_dv = grads[-1][:, :, 1:]  # [B, L, 2, H, D]
        assert torch.count_nonzero(dk_dv[~mask]) == 0, "a padded key got a gradient"
        empty_rows = ~mask.any(1)
        assert torch.count_nonzero(out[empty_rows]) == 0 and torch.count_nonzero(grads[0][empty_rows, :, 0]) == 0


# name -> (batch, tokens, regions, language lengths, region lengths)
BIDIRECTIONAL_CASES = {
    "lxmert_20_tokens_36_regions": (4, 20, 36, [20, 12, 3, 1], None),
    "one_token_37_regions_batch_1": (1, 1, 37, [1], None),
    "both_sides_padded": (3, 13, 37, [13, 6, 1], [37, 20, 2]),
    "fully_padded_language_row": (3, 20, 36, [20, 0, 4], None),
    "no_masks": (2, 20, 36, None, None),
}


@pytest.mark.parametrize("case", list(BIDIRECTIONAL_CASES))
def test_bidirectional_matches_eager_in_float64_in_one_varlen_call(fake_flash, case):
    torch.manual_seed(21)
    batch, tokens, regions, lang_lengths, vis_lengths = BIDIRECTIONAL_CASES[case]
    both = projection(batch, tokens + regions)  # the cross layer projects [language; regions] at once
    qkv = heads(both)
    lang_qkv = tuple(t[:, :, :tokens] for t in qkv)
    vis_qkv = tuple(t[:, :, tokens:] for t in qkv)
    lang_mask, vis_mask = key_mask(batch, tokens, lang_lengths), key_mask(batch, regions, vis_lengths)
    g_lang = torch.randn(batch, HEADS, tokens, DIM, dtype=torch.float64)
    g_vis = torch.randn(batch, HEADS, regions, DIM, dtype=torch.float64)

    lang_ctx, vis_ctx = get_backend("flash").bidirectional(lang_qkv, vis_qkv, lang_mask, vis_mask, 0.0)
    (grad,) = torch.autograd.grad((lang_ctx, vis_ctx), both, (g_lang, g_vis))
    (lq, lk, lv), (vq, vk, vv) = lang_qkv, vis_qkv
    ref_lang, ref_vis = reference_attend(lq, vk, vv, vis_mask), reference_attend(vq, lk, lv, lang_mask)
    (ref_grad,) = torch.autograd.grad((ref_lang, ref_vis), both, (g_lang, g_vis))

    assert_close(lang_ctx, ref_lang, TOL, "language over regions")
    assert_close(vis_ctx, ref_vis, TOL, "regions over language")
    for i, name in enumerate("qkv"):
        assert_close(grad[:, :tokens, i], ref_grad[:, :tokens, i], TOL, f"language d{name}")
        assert_close(grad[:, tokens:, i], ref_grad[:, tokens:, i], TOL, f"region d{name}")
    (call,) = fake_flash  # both directions, 2B sequences: row b's language, then its regions
    q_lengths = call["cu_seqlens_q"].diff().tolist()
    assert q_lengths == [tokens, regions] * batch and call["max_seqlen_q"] == max(tokens, regions)
    real_regions = [regions] * batch if vis_mask is None else vis_mask.sum(1).tolist()
    real_tokens = [tokens] * batch if lang_mask is None else lang_mask.sum(1).tolist()
    assert call["cu_seqlens_k"].diff().tolist() == [n for pair in zip(real_regions, real_tokens) for n in pair]


def test_packed_layout_is_the_documented_varlen_layout(fake_flash):
    """The exact tensors handed to flash-attn: queries whole (a view, no copy), real keys in order."""
    torch.manual_seed(22)
    qkv = projection(2, 5)
    q, k, v = heads(qkv)
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    get_backend("flash").attend(q, k, v, mask, 0.0)
    (call,) = fake_flash
    assert call["q"].shape == (10, HEADS, DIM) and call["q"].data_ptr() == qkv.data_ptr()  # a view of [B, L]
    assert torch.equal(call["q"], qkv[:, :, 0].reshape(10, HEADS, DIM))
    assert torch.equal(call["k"], qkv[:, :, 1][mask]) and torch.equal(call["v"], qkv[:, :, 2][mask])
    assert call["cu_seqlens_q"].tolist() == [0, 5, 10] and call["cu_seqlens_k"].tolist() == [0, 3, 4]
    assert (call["max_seqlen_q"], call["max_seqlen_k"]) == (5, 3)


def test_dropout_reaches_flash_attn_in_training_only(fake_flash):
    torch.manual_seed(23)
    config = small_config(attn_backend="flash", attention_probs_dropout_prob=0.25)
    module = Attention(config).double()
    lang = torch.randn(2, 7, config.hidden_size, dtype=torch.float64)
    vis = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    lang_mask = key_mask(2, 7, [7, 3])
    for training, expected in ((True, 0.25), (False, 0.0)):
        fake_flash.clear()
        module.train(training)
        module(lang, lang_mask)
        module.bidirectional(lang, vis, lang_mask, None)
        assert [call["dropout_p"] for call in fake_flash] == [expected, expected]


@pytest.mark.parametrize("shape", [(4, 20, 36), (1, 1, 37), (3, 13, 37)])
def test_flash_model_matches_eager_model_forward_and_every_gradient(fake_flash, shape):
    """LxmertForPreTraining, dropout off, float64: every attention through the stand-in against eager."""
    torch.manual_seed(24)
    batch, tokens, regions = shape
    eager = randomize_(lxmert.LxmertForPreTraining(small_config(attn_backend="eager"))).double().eval()
    flash = lxmert.LxmertForPreTraining(small_config(attn_backend="flash")).double().eval()
    flash.load_state_dict(eager.state_dict())
    assert {m.backend.name for m in flash.modules() if isinstance(m, Attention)} == {"flash"}
    inputs = cast_floats(random_inputs(eager.config, batch, tokens, regions), torch.float64)
    labels = cast_floats(random_pretraining_labels(eager.config, batch, tokens, regions), torch.float64)

    outs = {}
    for name, model in (("eager", eager), ("flash", flash)):
        outs[name] = model(**inputs, **labels, output_hidden_states=True, return_prediction_logits=True)
        outs[name].loss.backward()
    got, expected = outs["flash"], outs["eager"]
    config = flash.config
    assert len(fake_flash) == config.l_layers + config.r_layers + 3 * config.x_layers  # 2 self + 1 cross a layer
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score", "loss"):
        assert_close(got[key], expected[key], TOL, key)
    for key in ("language_hidden_states", "vision_hidden_states"):  # padded positions included
        for i, (a, b) in enumerate(zip(got[key], expected[key], strict=True)):
            assert_close(a, b, TOL, f"{key}[{i}]")
    eager_params = dict(eager.named_parameters())
    for name, param in flash.named_parameters():
        assert param.grad is not None, name
        assert_close(param.grad, eager_params[name].grad, TOL, f"grad {name}")


def test_flash_is_listed_and_imported_on_first_use(fake_flash):
    assert "flash" in available_backends() and "flash" not in BACKENDS
    backend = get_backend("flash")
    assert isinstance(backend, FlashAttentionBackend) and backend.name == "flash"
    assert backend.varlen_fn is sys.modules["flash_attn"].flash_attn_varlen_func
    assert get_backend("flash") is backend


def test_without_flash_attn_selecting_flash_says_how_to_install(monkeypatch, unloaded_flash):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` fails, installed or not
    assert "flash" in available_backends()  # so configs naming it still validate
    lxmert.LxmertConfig(attn_backend="flash")
    for build in (lambda: get_backend("flash"), lambda: lxmert.LxmertModel(small_config(attn_backend="flash"))):
        with pytest.raises(ImportError, match="attn_backend 'flash' needs the flash-attn package") as error:
            build()
        assert "pip install flash-attn" in str(error.value)
    assert "flash" not in BACKENDS  # nothing half-registered: installing it later works


def test_flash_refuses_what_flash_attn_cannot_run_and_says_why(monkeypatch, fake_flash):
    backend = get_backend("flash")
    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cuda",))  # flash-attn's own limits
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float16, torch.bfloat16))
    x = torch.randn(1, 2, 3, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="runs on CUDA GPUs only .*no cpu kernels"):
        backend.attend(x, x, x, None, 0.0)
    with pytest.raises(ValueError, match="runs on CUDA GPUs only"):
        backend.bidirectional((x, x, x), (x, x, x), None, None, 0.0)

    monkeypatch.setattr(attention, "FLASH_DEVICES", ("cpu",))  # past the device: dtypes and head size
    fp32 = x.float()
    with pytest.raises(ValueError, match="takes float16 or bfloat16 .*got float32: .*autocast"):
        backend.attend(fp32, fp32, fp32, None, 0.0)
    with pytest.raises(ValueError, match="got bfloat16 and float16"):
        backend.bidirectional((x, x, x), (x, x.bfloat16(), x), None, None, 0.0)
    wide = torch.randn(1, 2, 3, 264, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim <= 256, got 264"):
        backend.attend(wide, wide, wide, None, 0.0)
    assert fake_flash == []  # refused before flash-attn is called


# ------------------------------------------------------------------ the real flash-attn, on a GPU

needs_flash_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA GPU with flash-attn installed",
)


@needs_flash_gpu
@pytest.mark.parametrize("entry", ["attend", "bidirectional"])
def test_real_flash_attn_bf16_error_within_twice_sdpa_error(unloaded_flash, entry):
    """bf16 on LXMERT's shapes: flash's error against float64 at most 2x sdpa's bf16 error + 1e-3 (relative)."""
    torch.manual_seed(25)
    flash, sdpa = get_backend("flash"), get_backend("sdpa")
    assert flash.varlen_fn.__module__.startswith("flash_attn"), "the real package, not a stand-in"
    tokens, regions = 20, 36
    both64 = projection(4, tokens + regions, device="cuda")
    lang_mask = key_mask(4, tokens, [20, 12, 3, 1]).cuda()

    def run(backend, both):
        q, k, v = heads(both)
        lq, lk, lv = (t[:, :, :tokens] for t in (q, k, v))
        vq, vk, vv = (t[:, :, tokens:] for t in (q, k, v))
        if entry == "attend":  # language self-attention, regions over language
            return backend.attend(lq, lk, lv, lang_mask, 0.0), backend.attend(vq, lk, lv, lang_mask, 0.0)
        return backend.bidirectional((lq, lk, lv), (vq, vk, vv), lang_mask, None, 0.0)

    grads_out = [torch.randn(4, HEADS, n, DIM, dtype=torch.float64, device="cuda") for n in (tokens, regions)]
    results = {}
    for name, backend, both in (
        ("reference", get_backend("eager"), both64),
        ("flash", flash, both64.detach().bfloat16().requires_grad_()),
        ("sdpa", sdpa, both64.detach().bfloat16().requires_grad_()),
    ):
        outs = run(backend, both)
        (grad,) = torch.autograd.grad(outs, both, [g.to(both.dtype) for g in grads_out])
        results[name] = (*outs, grad)
    for i, what in enumerate(("first output", "second output", "d qkv")):
        reference = results["reference"][i]
        flash_err, sdpa_err = rel_err(results["flash"][i], reference), rel_err(results["sdpa"][i], reference)
        assert flash_err <= 2 * sdpa_err + 1e-3, f"{entry} {what}: flash {flash_err:.3g}, sdpa {sdpa_err:.3g}"


@needs_flash_gpu
def test_real_flash_attn_gives_zeros_to_a_row_without_real_keys(unloaded_flash):
    torch.manual_seed(26)
    both = projection(3, 20, device="cuda").detach().bfloat16().requires_grad_()
    q, k, v = heads(both)
    mask = key_mask(3, 20, [20, 0, 5]).cuda()
    out = get_backend("flash").attend(q, k, v, mask, 0.0)
    (grad,) = torch.autograd.grad(out, both, torch.randn_like(out))
    assert torch.count_nonzero(out[1]) == 0 and torch.isfinite(out).all()
    assert torch.count_nonzero(grad[1, :, 0]) == 0 and torch.isfinite(grad).all()
