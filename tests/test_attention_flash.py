"""The "flash" attention backend (lxmert/attention.py, FlashAttentionBackend) without flash-attn and without a GPU.

flash-attn is not installable here, so `flash_attn` is replaced in sys.modules by the project's stand-in
(benchmarks/flash_standin.py): flash_attn_varlen_func is flash-attn 2's documented contract written out in
float64, asserting every part of that contract it is handed, so these tests prove the unpad / pack / pad
plumbing against it. The stand-in runs on the CPU in float64, which the backend refuses from the real package:
the fixture widens attention.FLASH_DEVICES / FLASH_DTYPES to let it through, the one place they change.

Reference: the eager backend in float64, with zeros for a query whose row has no real key (what flash-attn,
sdpa on the CPU and triton give; eager gives the mean of the values there). Tolerance 1e-12, relative.
The unpadding found ahead (Unpadding, as the loaders make it on the host) must give exactly the outputs and
gradients of the backend's own. The last tests need a CUDA GPU with flash-attn installed: the real kernels in
bf16 against sdpa.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
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
from benchmarks import flash_standin
from lxmert import attention
from lxmert.attention import (
    BACKENDS,
    FlashAttentionBackend,
    PackedKeys,
    Unpadding,
    available_backends,
    eager_attention,
    get_backend,
)
from lxmert.modeling import Attention

TOL = 1e-12  # float64 against float64
HEADS, DIM = 12, 64  # LXMERT's heads


@pytest.fixture
def fake_flash(monkeypatch):
    """flash_attn is the float64 stand-in (the backend re-imports it); returns the list of its calls."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", flash_standin.flash_attn_module(calls))
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


# ------------------------------------------------------------------ the unpadding found ahead


def random_key_mask(batch: int, keys: int, first_real: bool = True) -> torch.Tensor:
    """Fresh random real keys: a padded tail per row, or scattered, with some rows fully real."""
    mask = torch.rand(batch, keys) < torch.rand(batch, 1)
    if torch.rand(()) < 0.5:  # a padded tail, as the loaders' masks
        mask = torch.arange(keys)[None, :] < torch.randint(1, keys + 1, (batch, 1))
    mask[torch.rand(batch) < 0.3] = True
    if first_real:
        mask[:, 0] = True
    return mask


def same_call(a: dict, b: dict) -> bool:
    """The same tensors and numbers handed to flash_attn_varlen_func."""
    return a.keys() == b.keys() and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in ((a[k], b[k]) for k in a)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("draw", range(4))
def test_keys_found_ahead_give_exactly_what_the_backend_finds_itself(fake_flash, monkeypatch, dtype, draw):
    """Language self-attention, regions self-attention and the cross layer's both directions, over fresh random
    masks: with the host's Unpadding the flash backend hands flash-attn the very same tensors and gives the same
    outputs and gradients, bit for bit."""
    monkeypatch.setattr(attention, "FLASH_DTYPES", (torch.float64, torch.bfloat16))
    torch.manual_seed(30 + draw)
    batch, tokens, regions = int(torch.randint(1, 5, ())), int(torch.randint(1, 21, ())), int(torch.randint(1, 38, ()))
    lang_mask = random_key_mask(batch, tokens)
    vis_mask = random_key_mask(batch, regions, first_real=False) if draw % 2 else None
    unpadding = Unpadding.from_masks(lang_mask.to(torch.uint8), vis_mask, regions)  # as a loader: compact masks
    both = projection(batch, tokens + regions).detach().to(dtype).requires_grad_()
    backend = get_backend("flash")

    def run(keys_ahead: bool):
        q, k, v = heads(both)
        lang_qkv = tuple(t[:, :, :tokens] for t in (q, k, v))
        vis_qkv = tuple(t[:, :, tokens:] for t in (q, k, v))
        u = unpadding if keys_ahead else None
        outs = [
            backend.attend_packed(*lang_qkv, lang_mask, 0.0, u.language)
            if u
            else backend.attend(*lang_qkv, lang_mask, 0.0),
            *(
                backend.bidirectional_packed(lang_qkv, vis_qkv, lang_mask, vis_mask, 0.0, u.cross)
                if u
                else backend.bidirectional(lang_qkv, vis_qkv, lang_mask, vis_mask, 0.0)
            ),
        ]
        if vis_mask is not None:
            outs.append(
                backend.attend_packed(*vis_qkv, vis_mask, 0.0, u.regions)
                if u
                else backend.attend(*vis_qkv, vis_mask, 0.0)
            )
        grads = torch.autograd.grad(outs, both, [torch.ones_like(o) for o in outs])
        return outs, grads

    fake_flash.clear()
    found_here, grads_here = run(False)
    calls_here = list(fake_flash)
    fake_flash.clear()
    found_ahead, grads_ahead = run(True)
    assert len(fake_flash) == len(calls_here) == 2 + (vis_mask is not None)
    assert all(same_call(a, b) for a, b in zip(fake_flash, calls_here))
    for got, expected in zip((*found_ahead, *grads_ahead), (*found_here, *grads_here), strict=True):
        assert got.dtype == dtype and torch.equal(got, expected)
    assert unpadding.language.max_seqlen == int(lang_mask.sum(1).max())  # host ints
    assert isinstance(unpadding.cross.max_seqlen, int) and unpadding.cross.cu_seqlens.dtype == torch.int32


def test_packed_keys_are_the_documented_layout():
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    keys = PackedKeys.from_mask(mask, (2, 3))  # segments of 2 and 3 keys
    assert keys.indices.tolist() == [0, 2, 3, 9] and keys.indices.dtype == torch.int64
    assert keys.cu_seqlens.tolist() == [0, 1, 3, 3, 4] and keys.cu_seqlens.dtype == torch.int32
    assert keys.max_seqlen == 2 and keys.shape == (2, 5)
    u = Unpadding.from_masks(torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.uint8), None, 2)
    assert u.regions is None and u.language.cu_seqlens.tolist() == [0, 2, 3]
    assert u.cross.indices.tolist() == [0, 1, 2, 3, 5, 6, 7] and u.cross.cu_seqlens.tolist() == [0, 2, 4, 6, 7]


def flash_and_eager(model_class, **overrides):
    torch.manual_seed(31)
    eager = randomize_(model_class(small_config(attn_backend="eager", **overrides))).double().eval()
    flash = model_class(small_config(attn_backend="flash", **overrides)).double().eval()
    flash.load_state_dict(eager.state_dict())
    return flash, eager


def outputs_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = out.loss if out.loss is not None else out.to_tuple()[0].sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]  # NLVR2 leaves some unused
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)], grads


def assert_same_run(a, b):
    for got, expected in zip((*a[0], *a[1]), (*b[0], *b[1]), strict=True):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("regions_padded", [False, True])
def test_a_pretraining_batch_with_its_unpadding_runs_exactly_as_without(fake_flash, regions_padded):
    """LxmertForPreTraining: the same losses, outputs and gradients with the unpadding as without (the backend then
    finds it itself); the flash backend gets it on every masked call; eager ignores it."""
    flash, eager = flash_and_eager(lxmert.LxmertForPreTraining)
    torch.manual_seed(32)
    batch, tokens, regions = 3, 11, 7
    inputs = cast_floats(random_inputs(flash.config, batch, tokens, regions), torch.float64)
    inputs |= cast_floats(random_pretraining_labels(flash.config, batch, tokens, regions), torch.float64)
    if regions_padded:
        inputs["visual_attention_mask"] = random_key_mask(batch, regions).long()
    unpadding = Unpadding.from_masks(inputs["attention_mask"], inputs.get("visual_attention_mask"), regions)
    without = outputs_and_grads(flash, inputs)
    assert_same_run(outputs_and_grads(flash, {**inputs, "unpadding": unpadding}), without)
    assert_same_run(outputs_and_grads(eager, {**inputs, "unpadding": unpadding}), outputs_and_grads(eager, inputs))


def test_an_nlvr2_batch_unpads_its_two_images_per_statement(fake_flash):
    from engine.data.batch import TaskBatch

    flash, _ = flash_and_eager(lxmert.LxmertForNLVR2)
    torch.manual_seed(33)
    batch, tokens, regions = 3, 9, 6
    single = cast_floats(random_inputs(flash.config, 2 * batch, tokens, regions), torch.float64)
    task = TaskBatch(
        input_ids=single["input_ids"][:batch],
        attention_mask=single["attention_mask"][:batch],
        visual_feats=single["visual_feats"].view(batch, 2, regions, -1),
        visual_pos=single["visual_pos"].view(batch, 2, regions, 4),
        visual_attention_mask=random_key_mask(2 * batch, regions).view(batch, 2, regions).to(torch.uint8),
        labels=torch.tensor([0, 1, 1]),
        indices=np.arange(batch),
    ).with_unpadding()
    assert task.unpadding.language.shape == (2 * batch, tokens)  # each statement once per image
    without = outputs_and_grads(flash, {k: v for k, v in task.model_inputs().items() if k != "unpadding"})
    fake_flash.clear()
    assert_same_run(outputs_and_grads(flash, task.model_inputs()), without)
    config = flash.config
    assert len(fake_flash) == config.l_layers + config.r_layers + 3 * config.x_layers
    assert all(call["cu_seqlens_k"].numel() in (2 * batch + 1, 4 * batch + 1) for call in fake_flash)


def test_an_unpadding_of_other_masks_is_refused(fake_flash):
    flash, _ = flash_and_eager(lxmert.LxmertModel)
    inputs = cast_floats(random_inputs(flash.config, 2, 5, 4), torch.float64)
    for wrong in (
        Unpadding.from_masks(torch.ones(2, 6), None, 4),  # other lengths
        Unpadding.from_masks(inputs["attention_mask"], torch.ones(2, 4), 4),  # a visual mask the batch has not
    ):
        with pytest.raises(ValueError, match="unpadding does not belong to this batch's masks"):
            flash(**inputs, unpadding=wrong)
    with pytest.raises(ValueError, match="an attention_mask"):
        flash(
            **{k: v for k, v in inputs.items() if k != "attention_mask"},
            unpadding=Unpadding.from_masks(torch.ones(2, 5), None, 4),
        )


dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI is not installed")


@pytest.mark.parametrize(
    ("kind", "regions"), [("torch", 36), ("torch", 33), ("gpu", 33), pytest.param("dali", 33, marks=dali)]
)
def test_the_loaders_unpadding_is_the_one_of_the_batch_on_the_device(tmp_path, kind, regions):
    """Found on the host from the compact masks, carried by `.to` (int32 offsets kept), equal to the unpadding
    found from the widened masks on the device; off by default. 33 regions: padding regions in every image."""
    from test_data_loaders import build

    from engine.data.loaders import make_loader
    from engine.data.sampling import SamplingConfig

    text, feats = build(tmp_path, 12, regions=regions)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sampling = SamplingConfig(seed=3, batch_size=5)
    loader = make_loader(kind, text, feats, sampling, device, unpadding=True)
    plain = make_loader(kind, text, feats, sampling, device)
    loader.set_epoch(0), plain.set_epoch(0)
    batches = 0
    for batch, without in zip(loader, plain):
        assert (batch.visual_attention_mask is None) == (regions == 36) == (batch.unpadding.regions is None)
        found = Unpadding.from_masks(batch.attention_mask, batch.visual_attention_mask, batch.visual_feats.shape[1])
        assert batch.unpadding.cross.indices.device == batch.attention_mask.device
        assert batch.unpadding.cross.cu_seqlens.dtype == torch.int32
        assert batch.equal(dataclasses.replace(batch, unpadding=found))
        assert without.unpadding is None and batch.equal(dataclasses.replace(without, unpadding=batch.unpadding))
        assert "unpadding" in batch.model_inputs() and "unpadding" not in without.model_inputs()
        batches += 1
    assert batches > 1


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
