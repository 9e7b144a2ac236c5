"""lxmert.losses and LxmertForPreTraining's loss components against hand-written float64 formulas.

Every reference below is written out with plain torch ops in float64 (log-softmax, SmoothL1 with beta 1,
BCE-with-logits), never with the torch loss function under test. Float32 models are compared at float32
tolerance; float64 inputs keep float64 losses, checked by gradcheck and finite differences at 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import norm_rel_err as rel_err
from torch import nn

import lxmert
from lxmert import losses

F32_REL = 1e-5  # comparisons of float32 losses with the float64 references


# ----------------------------------------------------------------------------------------------------------
# float64 references, written out by hand


def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last dim of a [N, C] float64 matrix, max-shifted."""
    m = z.max(dim=-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ref_ce_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label) per row, 0 for a negative (ignored) label. logits [N, C], labels [N]."""
    logp = ref_log_softmax(logits.double())
    rows = [-logp[i, y] if y >= 0 else logp.new_zeros(()) for i, y in enumerate(labels.tolist())]
    return torch.stack(rows)


def ref_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    kept = sum(1 for y in labels.tolist() if y >= 0)
    per_row = ref_ce_per_row(logits, labels)
    return per_row.sum() / kept if kept else per_row.sum() * 0.0


def ref_weighted_region_ce(logits, labels, weights, normalizer) -> torch.Tensor:
    logits, labels, weights = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weights.reshape(-1)
    per_row = ref_ce_per_row(logits, labels)
    return normalizer * (per_row * weights.double()).sum() / labels.numel()  # mean over ALL regions


def ref_smooth_l1(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d.abs() < 1, 0.5 * d * d, d.abs() - 0.5)


def ref_feature_regression(x, weight, bias, target, row_weight, normalizer) -> torch.Tensor:
    """normalizer / N * sum_i w_i * mean_f SmoothL1(x_i W^T + b - t_i), every row projected."""
    x, weight, target, row_weight = x.double(), weight.double(), target.double(), row_weight.double().reshape(-1)
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        if row_weight[i] == 0:
            continue
        prediction = weight @ x[i] + (bias.double() if bias is not None else 0.0)
        total = total + row_weight[i] * ref_smooth_l1(prediction - target[i]).mean()
    return total * normalizer / x.shape[0]


def ref_soft_score_bce(logits, scores) -> torch.Tensor:
    """mean over all entries of max(z, 0) - z y + log(1 + exp(-|z|)), times the number of answers."""
    z, y = logits.double(), scores.double()
    per_entry = z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    return per_entry.mean() * z.shape[-1]


def grads(loss: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs, allow_unused=False))


def assert_close_with_grads(loss, ref, inputs, rel=F32_REL):
    """Values and every gradient of `loss` against the float64 reference, by relative error."""
    assert torch.isfinite(loss)
    assert rel_err(loss, ref) <= rel, (loss.item(), ref.item())
    for got, want in zip(grads(loss, inputs), grads(ref, inputs)):
        assert got.shape == want.shape
        assert rel_err(got, want) <= rel


# ----------------------------------------------------------------------------------------------------------
# cross_entropy


def test_cross_entropy_ignores_every_negative_label():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 7) * 3).requires_grad_()
    labels = torch.randint(0, 7, (3, 4))
    labels[0, 1], labels[1, 3], labels[2, 0] = -1, -100, -1  # both conventions: authors -1, transformers -100
    loss = losses.cross_entropy(logits, labels)
    ref = ref_cross_entropy(logits, labels)
    assert_close_with_grads(loss, ref, [logits])
    # the ignored rows get no gradient at all
    (g,) = grads(losses.cross_entropy(logits, labels), [logits])
    assert torch.all(g[0, 1] == 0) and torch.all(g[1, 3] == 0) and torch.all(g[2, 0] == 0)
    assert torch.all(g[0, 0] != 0)


@pytest.mark.parametrize("n_rows", [1, 37])
def test_cross_entropy_awkward_sizes(n_rows):
    torch.manual_seed(n_rows)
    logits = torch.randn(n_rows, 5, requires_grad=True)
    labels = torch.randint(0, 5, (n_rows,))
    assert_close_with_grads(losses.cross_entropy(logits, labels), ref_cross_entropy(logits, labels), [logits])


def test_cross_entropy_all_ignored_is_zero_and_differentiable():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([-1, -100, -1, -100])
    loss = losses.cross_entropy(logits, labels)
    assert not torch.isnan(loss) and loss.item() == 0.0
    (g,) = grads(loss, [logits])
    assert torch.equal(g, torch.zeros_like(logits))


# ----------------------------------------------------------------------------------------------------------
# masked_token_loss


class RecordingHead(nn.Module):
    """A vocabulary head that remembers how many rows each call received."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, vocab))
        self.rows_seen: list[int] = []

    def forward(self, x):
        self.rows_seen.append(x.shape[0] if x.dim() == 2 else x[..., 0].numel())
        return self.inner(x)


def test_masked_token_loss_equals_full_head_and_runs_only_labelled_rows():
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = RecordingHead(8, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 0], labels[1, 4] = 3, 10, 0
    labels[0, 3] = -1  # the authors' ignore label

    loss = losses.masked_token_loss(hidden, labels, head)
    assert head.rows_seen == [3]

    full = losses.cross_entropy(head(hidden), labels)  # the reference path: every row through the head
    ref = ref_cross_entropy(head(hidden).double(), labels)
    params = [hidden, *head.parameters()]
    assert rel_err(loss, ref) <= F32_REL
    assert rel_err(loss, full) <= 1e-6
    for got, want in zip(grads(loss, params), grads(ref, params)):
        assert rel_err(got, want) <= F32_REL
    (g_hidden,) = grads(losses.masked_token_loss(hidden, labels, head), [hidden])
    assert torch.all(g_hidden[0, 0] == 0) and torch.all(g_hidden[0, 3] == 0)  # unlabelled positions untouched


def test_masked_token_loss_without_masked_token_is_zero_but_connected():
    torch.manual_seed(3)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    head = RecordingHead(8, 11)
    labels = torch.full((3, 4), -100)
    labels[1, 2] = -1
    loss = losses.masked_token_loss(hidden, labels, head)
    assert loss.item() == 0.0 and head.rows_seen == [0]
    # still a function of the head's parameters (same gradient structure on every rank), gradients zero
    for g in grads(loss, [hidden, *head.parameters()]):
        assert torch.equal(g, torch.zeros_like(g))


# ----------------------------------------------------------------------------------------------------------
# weighted_region_cross_entropy


def test_weighted_region_cross_entropy_mean_over_all_regions():
    torch.manual_seed(4)
    b, r, c = 2, 37, 9
    logits = (torch.randn(b, r, c) * 2).requires_grad_()
    labels = torch.randint(0, c, (b, r))
    labels[0, :5] = -1  # ignored regions: contribute 0 but still count in the mean
    labels[1, 7] = -100
    conf = torch.rand(b, r)
    loss = losses.weighted_region_cross_entropy(logits, labels, conf, 1 / 0.15)
    ref = ref_weighted_region_ce(logits, labels, conf, 1 / 0.15)
    assert_close_with_grads(loss, ref, [logits])
    # the mean counts all b * r regions: ignoring more regions can only lower the loss
    labels_more = labels.clone()
    labels_more[1, :10] = -1
    smaller = losses.weighted_region_cross_entropy(logits, labels_more, conf, 1 / 0.15)
    assert rel_err(smaller, ref_weighted_region_ce(logits, labels_more, conf, 1 / 0.15)) <= F32_REL
    assert smaller < loss


# ----------------------------------------------------------------------------------------------------------
# masked_feature_regression


def _regression_inputs(n=37, h=6, f=10, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(f, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(f, generator=g, dtype=dtype).requires_grad_()
    target = torch.randn(n, f, generator=g, dtype=dtype) * 1.5
    return x, weight, bias, target


def test_masked_feature_regression_formula_and_gradients():
    x, weight, bias, target = _regression_inputs()
    mask = (torch.rand(x.shape[0], generator=torch.Generator().manual_seed(6)) < 0.3).float()
    mask[0], mask[1] = 1.0, 0.0
    loss = losses.masked_feature_regression(x, weight, bias, target, mask)  # default normalizer: 1 / 0.15
    ref = ref_feature_regression(x, weight, bias, target, mask, 1 / 0.15)
    # both SmoothL1 branches are exercised by the masked rows
    d = (x.double() @ weight.double().T + bias.double() - target.double())[mask.bool()]
    assert (d.abs() < 1).any() and (d.abs() > 1).any()
    assert_close_with_grads(loss, ref, [x, weight, bias])


def test_masked_feature_regression_weighted_rows_and_all_masked():
    x, weight, bias, target = _regression_inputs(n=7, seed=7)
    row_weight = torch.tensor([0.3, 2.5, 0.0, -0.7, 1.0, 0.0, 0.05])
    loss = losses.masked_feature_regression(x, weight, bias, target, row_weight, 2.0)
    assert_close_with_grads(loss, ref_feature_regression(x, weight, bias, target, row_weight, 2.0), [x, weight, bias])

    everything = torch.ones(7)
    loss = losses.masked_feature_regression(x, weight, bias, target, everything, 2.0)
    assert_close_with_grads(loss, ref_feature_regression(x, weight, bias, target, everything, 2.0), [x, weight, bias])


def test_masked_feature_regression_without_bias():
    x, weight, _, target = _regression_inputs(n=5, seed=8)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    loss = losses.masked_feature_regression(x, weight, None, target, mask, 3.0)
    assert_close_with_grads(loss, ref_feature_regression(x, weight, None, target, mask, 3.0), [x, weight])


def test_masked_feature_regression_no_masked_region_is_zero_with_zero_grads():
    x, weight, bias, target = _regression_inputs(n=6, seed=9)
    loss = losses.masked_feature_regression(x, weight, bias, target, torch.zeros(6))
    assert loss.item() == 0.0
    for g in grads(loss, [x, weight, bias]):
        assert torch.equal(g, torch.zeros_like(g))


def test_masked_feature_regression_never_touches_unmasked_rows():
    """NaN in the rows that are not masked cannot reach the loss or any gradient: they are never projected."""
    x, weight, bias, target = _regression_inputs(n=9, seed=10)
    mask = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0, 0])
    clean = losses.masked_feature_regression(x, weight, bias, target, mask)
    clean_grads = grads(clean, [x, weight, bias])

    poisoned_x = x.detach().clone()
    poisoned_t = target.clone()
    poisoned_x[~mask.bool()] = float("nan")
    poisoned_t[~mask.bool()] = float("nan")
    poisoned_x.requires_grad_()
    loss = losses.masked_feature_regression(poisoned_x, weight, bias, poisoned_t, mask)
    assert torch.isfinite(loss) and loss.item() == clean.item()
    g_x, g_w, g_b = grads(loss, [poisoned_x, weight, bias])
    assert torch.equal(g_x, clean_grads[0]) and torch.equal(g_w, clean_grads[1]) and torch.equal(g_b, clean_grads[2])
    assert torch.all(g_x[~mask.bool()] == 0)
    ref = ref_feature_regression(x, weight, bias, target, mask, 1 / 0.15)
    assert rel_err(loss, ref) <= F32_REL


def test_masked_feature_regression_gradcheck_float64():
    x, weight, bias, target = _regression_inputs(n=5, h=3, f=4, seed=11, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    fn = lambda x, w, b: losses.masked_feature_regression(x, w, b, target, mask, 2.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# soft_score_bce


def test_soft_score_bce_formula():
    torch.manual_seed(12)
    logits = (torch.randn(3, 11) * 4).requires_grad_()
    scores = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0]).repeat(7)[: 3 * 11].reshape(3, 11)
    loss = losses.soft_score_bce(logits, scores)
    assert_close_with_grads(loss, ref_soft_score_bce(logits, scores), [logits])


# ----------------------------------------------------------------------------------------------------------
# float64 stays float64 (the brief's float64 checks need it)


def _float64_cases():
    g = torch.Generator().manual_seed(13)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 4, -1, 2, -100, 1])
    x, w, b, t = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 3), (4, 3), (4,), (6, 4)))
    m = torch.tensor([1.0, 0, 1, 1, 0, 1], dtype=torch.float64)
    head = nn.Linear(3, 5).double()
    scores = torch.rand(6, 5, generator=g, dtype=torch.float64)
    conf = torch.rand(6, generator=g, dtype=torch.float64)
    return {
        "cross_entropy": (lambda: losses.cross_entropy(z, y), lambda: ref_cross_entropy(z, y)),
        "masked_token_loss": (lambda: losses.masked_token_loss(x, y, head), lambda: ref_cross_entropy(head(x), y)),
        "weighted_region_cross_entropy": (
            lambda: losses.weighted_region_cross_entropy(z, y, conf, 1 / 0.15),
            lambda: ref_weighted_region_ce(z, y, conf, 1 / 0.15),
        ),
        "masked_feature_regression": (
            lambda: losses.masked_feature_regression(x, w, b, t, m, 1 / 0.15),
            lambda: ref_feature_regression(x, w, b, t, m, 1 / 0.15),
        ),
        "soft_score_bce": (lambda: losses.soft_score_bce(z, scores), lambda: ref_soft_score_bce(z, scores)),
    }


@pytest.mark.parametrize("name", list(_float64_cases()))
def test_float64_inputs_give_a_float64_loss(name):
    loss_fn, ref_fn = _float64_cases()[name]
    loss = loss_fn()
    assert loss.dtype == torch.float64
    assert rel_err(loss, ref_fn()) <= 1e-12


# ----------------------------------------------------------------------------------------------------------
# LxmertForPreTraining: each component against a float64 recomputation from the model's own head outputs


def tiny_config(**overrides) -> lxmert.LxmertConfig:
    values = dict(
        vocab_size=40,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=24,
        l_layers=1,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=12,
        num_qa_labels=6,
        num_object_labels=7,
        num_attr_labels=5,
    )
    values.update(overrides)
    return lxmert.LxmertConfig(**values)


def tiny_model(seed=0, dtype=torch.float32, **overrides) -> lxmert.LxmertForPreTraining:
    torch.manual_seed(seed)
    model = lxmert.LxmertForPreTraining(tiny_config(**overrides))
    with torch.no_grad():  # move every parameter off its init (LayerNorm ones, zero biases) so each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def tiny_batch(config, seed=0, b=3, l=6, r=5, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (b, l), generator=g)
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[1, 4:] = 0  # padded text
    input_ids[1, 4:] = 0
    labels = torch.full((b, l), -100)
    labels[0, 1], labels[0, 3], labels[2, 2] = 5, 17, 0
    labels[1, 1] = -1
    obj_ids = torch.randint(0, config.num_object_labels, (b, r), generator=g)
    obj_ids[2, 0] = -1
    attr_ids = torch.randint(0, config.num_attr_labels, (b, r), generator=g)
    feat_mask = torch.zeros(b, r)
    feat_mask[0, 1], feat_mask[1, 3], feat_mask[2, 0], feat_mask[2, 4] = 1, 1, 1, 1
    return dict(
        input_ids=input_ids,
        visual_feats=torch.randn(b, r, config.visual_feat_dim, generator=g, dtype=dtype),
        visual_pos=torch.rand(b, r, config.visual_pos_dim, generator=g, dtype=dtype),
        attention_mask=attention_mask,
        labels=labels,
        obj_labels={
            "obj": (obj_ids, torch.rand(b, r, generator=g, dtype=dtype)),
            "attr": (attr_ids, torch.rand(b, r, generator=g, dtype=dtype)),
            "feat": (torch.randn(b, r, config.visual_feat_dim, generator=g, dtype=dtype) * 1.5, feat_mask.to(dtype)),
        },
        matched_label=torch.tensor([1, 0, 1]),
        ans=torch.tensor([2, -1, 5]),  # the mismatched pair carries -1
    )


def reference_losses(model: lxmert.LxmertForPreTraining, batch: dict) -> dict[str, torch.Tensor]:
    """Every enabled loss, recomputed in float64 by hand from the model's own head outputs."""
    cfg = model.config
    inputs = {k: batch[k] for k in ("input_ids", "visual_feats", "visual_pos", "attention_mask")}
    out = model(**inputs, return_prediction_logits=True)
    backbone = model.lxmert(**inputs)
    ref = {}
    if cfg.task_mask_lm:
        ref["mlm"] = ref_cross_entropy(out.prediction_logits.double(), batch["labels"])
    if cfg.task_matched:
        ref["matched"] = ref_cross_entropy(out.cross_relationship_score.double(), batch["matched_label"])
    if cfg.task_obj_predict:
        states = model.obj_head.transform(backbone.vision_output).double()
        for name in ("obj", "attr"):
            if name in model.obj_head.decoders:
                dec = model.obj_head.decoders[name]
                logits = states @ dec.weight.double().T + dec.bias.double()
                ids, conf = batch["obj_labels"][name]
                ref[name] = ref_weighted_region_ce(logits, ids, conf, cfg.visual_loss_normalizer)
        if "feat" in model.obj_head.decoders:
            dec = model.obj_head.decoders["feat"]
            target, mask = batch["obj_labels"]["feat"]
            ref["feat"] = ref_feature_regression(
                states.reshape(-1, states.shape[-1]),
                dec.weight,
                dec.bias,
                target.reshape(-1, target.shape[-1]),
                mask.reshape(-1),
                cfg.visual_loss_normalizer,
            )
    if cfg.task_qa:
        ref["qa"] = ref_cross_entropy(out.question_answering_score.double(), batch["ans"])
    return ref


def test_authors_normalizer_is_the_default():
    assert lxmert.LxmertConfig().visual_loss_normalizer == 1 / 0.15


def test_pretraining_components_equal_float64_recomputation():
    model = tiny_model(seed=1)
    batch = tiny_batch(model.config, seed=1)
    out = model(**batch, return_prediction_logits=True)
    ref = reference_losses(model, batch)
    assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"} == set(ref)
    for name, value in out.losses.items():
        assert value.dim() == 0 and torch.isfinite(value)
        assert rel_err(value, ref[name]) <= F32_REL, name
    assert rel_err(out.loss, sum(ref.values())) <= F32_REL
    assert rel_err(out.loss, torch.stack(list(out.losses.values())).sum()) <= 1e-7
    # the prediction logits are the full MLM head; the loss only ran it on the 3 labelled tokens
    assert out.prediction_logits.shape == (3, 6, model.config.vocab_size)
    # gradients of every component agree with the float64 recomputation's
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    want = torch.autograd.grad(sum(reference_losses(model, batch).values()), params, allow_unused=True)
    for p, g, w in zip(params, got, want):
        g = torch.zeros_like(p) if g is None else g
        w = torch.zeros_like(p) if w is None else w
        assert rel_err(g, w) <= 1e-4 if w.norm() > 0 else torch.equal(g, w)


def test_pretraining_without_masked_token_or_region():
    model = tiny_model(seed=2)
    batch = tiny_batch(model.config, seed=2)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch["obj_labels"]["feat"] = (batch["obj_labels"]["feat"][0], torch.zeros(3, 5))
    out = model(**batch)
    assert out.losses["mlm"].item() == 0.0
    assert out.losses["feat"].item() == 0.0
    ref = reference_losses(model, batch)
    for name in ("matched", "obj", "attr", "qa"):
        assert rel_err(out.losses[name], ref[name]) <= F32_REL
    assert torch.isfinite(out.loss)
    g = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    assert all(t is None or torch.isfinite(t).all() for t in g)


def test_pretraining_all_mismatched_pairs_without_answers():
    model = tiny_model(seed=3)
    batch = tiny_batch(model.config, seed=3)
    batch["matched_label"] = torch.zeros(3, dtype=torch.long)
    batch["ans"] = torch.full((3,), -1)
    out = model(**batch)
    assert out.losses["qa"].item() == 0.0
    assert torch.isfinite(out.loss)
    ref = reference_losses(model, batch)
    assert rel_err(out.loss, sum(ref.values())) <= F32_REL
    # the QA head is still in the graph, with zero gradient
    head_grads = torch.autograd.grad(out.loss, list(model.answer_head.parameters()))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in head_grads)


def test_pretraining_qa_ignores_minus_one_among_others():
    model = tiny_model(seed=4)
    batch = tiny_batch(model.config, seed=4)
    batch["ans"] = torch.tensor([3, -1, 0])
    out = model(**batch)
    scores = out.question_answering_score.double()
    by_hand = (-ref_log_softmax(scores)[0, 3] - ref_log_softmax(scores)[2, 0]) / 2
    assert rel_err(out.losses["qa"], by_hand) <= F32_REL


@pytest.mark.parametrize(
    "flags, absent",
    [
        ({"task_qa": False}, {"qa"}),
        ({"visual_feat_loss": False}, {"feat"}),
        ({"task_mask_lm": False}, {"mlm"}),
        ({"task_matched": False}, {"matched"}),
        ({"task_obj_predict": False}, {"obj", "attr", "feat"}),
    ],
)
def test_loss_switches(flags, absent):
    model = tiny_model(seed=5, **flags)
    batch = tiny_batch(model.config, seed=5)
    out = model(**batch)
    assert set(out.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"} - absent
    ref = reference_losses(model, batch)
    assert set(ref) == set(out.losses)
    for name, value in out.losses.items():
        assert rel_err(value, ref[name]) <= F32_REL, name
    assert rel_err(out.loss, sum(out.losses.values())) <= 1e-6
    if "qa" in absent:
        assert model.answer_head is None and out.question_answering_score is None
    if "feat" in absent and model.obj_head is not None:
        assert "feat" not in model.obj_head.decoders
    if "obj" in absent:
        assert model.obj_head is None


# ----------------------------------------------------------------------------------------------------------
# the whole pre-training loss against central finite differences on a tiny float64 model

FD_PARAMS = (
    "lxmert.embeddings.word.weight",  # tied with the MLM decoder: both uses contribute
    "lxmert.visual_embeddings.feat_proj.weight",
    "lxmert.lang_layers.0.attention.qkv.weight",
    "lxmert.region_layers.0.ffn.up.weight",
    "lxmert.cross_layers.0.cross_attention.qkv.weight",
    "lxmert.pooler.bias",
    "mlm_head.bias",
    "obj_head.decoders.feat.weight",
    "obj_head.transform.dense.weight",
    "answer_head.fc1.weight",
)


def _finite_difference_check(loss_fn, model, autograd_grads, rel, eps=1e-6):
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    for name in FD_PARAMS:
        p, grad = params[name], autograd_grads[name]
        flat = grad.reshape(-1)
        picks = {int(flat.abs().argmax())} | {int(i) for i in torch.randint(0, flat.numel(), (2,), generator=g)}
        got, want = [], []
        for i in sorted(picks):
            with torch.no_grad():
                original = p.view(-1)[i].item()
                p.view(-1)[i] = original + eps
                up = loss_fn().item()
                p.view(-1)[i] = original - eps
                down = loss_fn().item()
                p.view(-1)[i] = original
            got.append(flat[i].item())
            want.append((up - down) / (2 * eps))
        assert rel_err(torch.tensor(got), torch.tensor(want, dtype=torch.float64)) <= rel, (name, got, want)


def _float64_setup():
    model = tiny_model(seed=6, dtype=torch.float64)
    batch = tiny_batch(model.config, seed=6, dtype=torch.float64)
    params = dict(model.named_parameters())
    out = model(**batch)
    autograd = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)))
    return model, batch, autograd


def test_pretraining_loss_gradient_finite_differences_float64():
    model, batch, autograd = _float64_setup()
    with torch.no_grad():
        _finite_difference_check(lambda: model(**batch).loss, model, autograd, rel=1e-6)


def test_pretraining_loss_gradient_against_float64_finite_differences():
    """The model's autograd gradient against central differences of the loss recomputed by the float64
    references (not by the model), so the references and the model's loss code are checked against each other."""
    model, batch, autograd = _float64_setup()
    with torch.no_grad():
        _finite_difference_check(lambda: sum(reference_losses(model, batch).values()), model, autograd, rel=1e-5)
    # and the float64 recomputation is the model's loss
    assert rel_err(model(**batch).loss, sum(reference_losses(model, batch).values())) <= F32_REL


def test_reference_feature_regression_is_not_trivially_zero():
    """Guards the references themselves: a broken formula returning 0 would make the comparisons vacuous."""
    x = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    weight = torch.eye(2, dtype=torch.float64)
    target = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    # d = (-0.5, 2.0): SmoothL1 = (0.125, 1.5), mean 0.8125
    assert math.isclose(ref_feature_regression(x, weight, None, target, torch.ones(1), 1.0).item(), 0.8125)
    assert math.isclose(ref_soft_score_bce(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item(), 2 * math.log(2))
