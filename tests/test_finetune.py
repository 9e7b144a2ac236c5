"""Fine-tuning: answer normalisation, the VQA/GQA head started from the pre-trained QA head, the
LxmertForQuestionAnswering loss and LxmertForNLVR2, against float64 formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import norm_rel_err as rel_err
from conftest import perturb_ as randomise

import lxmert
from lxmert.answers import answer_rows, init_answer_head, normalize_answer

F32_REL = 1e-5  # losses are computed in float32


def tiny_config(**overrides) -> lxmert.LxmertConfig:
    values = dict(
        vocab_size=40,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=24,
        l_layers=1,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=12,
        num_qa_labels=6,
        num_object_labels=7,
        num_attr_labels=5,
    )
    values.update(overrides)
    return lxmert.LxmertConfig(**values)


def inputs(seed=0, b=3, l=7, r=5, feat=12, images=None):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 40, (b, l), generator=g)
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[1, 3:] = 0  # padded text
    input_ids[1, 3:] = 0
    shape = (b, r) if images is None else (b, images, r)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=torch.randn(*shape, feat, generator=g),
        visual_pos=torch.rand(*shape, 4, generator=g),
    )


def grads_or_zeros(loss, params) -> list[torch.Tensor]:
    """d loss / d p, zeros for parameters the loss does not use (the last cross layer's vision stream feeds
    no head of the fine-tuning models)."""
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found)]


def ref_soft_score_bce(logits, scores) -> torch.Tensor:
    """mean over all entries of max(z, 0) - z y + log(1 + exp(-|z|)), times the number of answers."""
    z, y = logits.double(), scores.double()
    return (z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean() * z.shape[-1]


def ref_cross_entropy(logits, labels) -> torch.Tensor:
    z = logits.double()
    logp = z - z.max(-1, keepdim=True).values
    logp = logp - torch.log(torch.exp(logp).sum(-1, keepdim=True))
    return torch.stack([-logp[i, y] for i, y in enumerate(labels.tolist())]).mean()


def ref_answer_head(x, head) -> torch.Tensor:
    """fc2(LN(gelu_erf(fc1 x))) in float64, eps 1e-12."""
    z = x.double() @ head.fc1.weight.double().T + head.fc1.bias.double()
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-12)
    z = z * head.norm.weight.double() + head.norm.bias.double()
    return z @ head.fc2.weight.double().T + head.fc2.bias.double()


# ----------------------------------------------------------------------------------------------------------
# answer strings


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("The Man.", "man"),
        ("Two", "2"),
        ("two.", "2"),
        ("the two", "2"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only one .. ten are converted
        ("a dog", "dog"),
        ("an apple.", "apple"),
        ("A Woman", "woman"),
        ("grey", "gray"),
        ("Grey.", "gray"),
        ("grey cat", "grey cat"),  # whole answers only
        ("", ""),
        ("the", "the"),  # an article needs a word after it
        ("an", "an"),
        ("another", "another"),
        ("theater", "theater"),
        ("a the man", "man"),  # a, then an, then the, in that order
        ("the a man", "man"),  # "a man" is itself in the conversion table
        ("a  cat", "cat"),
        ("3.5", "3.5"),
        ("1.", "1"),
        ("..", "."),  # one trailing '.' only
        ("yes", "yes"),
    ],
)
def test_normalize_answer(answer, normalised):
    assert normalize_answer(answer) == normalised


def test_answer_rows():
    table = ["yes", "2", "gray", "no", "dog", "man"]
    assert answer_rows(["Two", "a dog", "cat", "Grey", "the man.", "yes"], table) == [1, 4, None, 2, 5, 0]


# ----------------------------------------------------------------------------------------------------------
# the fine-tuning head started from the pre-training QA head

TABLE = ["yes", "2", "gray", "no", "dog", "man"]
TASK = ["Two", "a dog", "cat", "Grey"]
ROWS = [1, 4, None, 2]


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return randomise(lxmert.LxmertForPreTraining(tiny_config()), seed=1)


def test_init_from_pretraining(pretrained):
    torch.manual_seed(2)
    qa = randomise(lxmert.LxmertForQuestionAnswering(tiny_config(), num_answers=len(TASK)), seed=3)
    assert qa.answer_head.fc2.bias.abs().min() > 0  # so a zeroed row is visible
    assert qa.init_from_pretraining(pretrained.state_dict(), TABLE, TASK) == (3, 1)

    src, dst = pretrained.answer_head, qa.answer_head
    for name in ("fc1.weight", "fc1.bias", "norm.weight", "norm.bias"):
        assert torch.equal(dst.get_parameter(name), src.get_parameter(name)), name
    for i, row in enumerate(ROWS):
        if row is None:
            assert torch.all(dst.fc2.weight[i] == 0) and dst.fc2.bias[i] == 0
        else:
            assert torch.equal(dst.fc2.weight[i], src.fc2.weight[row]) and dst.fc2.bias[i] == src.fc2.bias[row]
    backbone = pretrained.lxmert.state_dict()
    for key, value in qa.lxmert.state_dict().items():
        assert torch.equal(value, backbone[key]), key

    # what it means: the fine-tuning model starts out scoring the found answers as the pre-trained one did
    x = inputs(seed=4)
    with torch.no_grad():
        got = qa(**x).question_answering_score
        want = pretrained(**x).question_answering_score
    found = [i for i, r in enumerate(ROWS) if r is not None]
    assert rel_err(got[:, found], want[:, [ROWS[i] for i in found]]) <= 1e-6
    assert torch.all(got[:, 2] == 0)


def test_init_answer_head_from_an_authors_style_head(pretrained):
    """init_answer_head works on any AnswerHead parameter mapping (fc1.*, norm.*, fc2.*)."""
    head = {k[len("answer_head.") :]: v for k, v in pretrained.state_dict().items() if k.startswith("answer_head.")}
    qa = lxmert.LxmertForQuestionAnswering(tiny_config(), num_answers=2)
    assert init_answer_head(qa.answer_head, head, TABLE, ["no", "giraffe"]) == (1, 1)
    assert torch.equal(qa.answer_head.fc2.weight[0], head["fc2.weight"][3])
    assert torch.all(qa.answer_head.fc2.weight[1] == 0)


def test_init_from_pretraining_errors(pretrained):
    state = pretrained.state_dict()
    qa = lxmert.LxmertForQuestionAnswering(tiny_config(), num_answers=len(TASK))
    with pytest.raises(ValueError, match="answer table"):
        qa.init_from_pretraining(state, TABLE[:5], TASK)  # 5 table answers for a 6-row head
    with pytest.raises(ValueError, match="outputs"):
        lxmert.LxmertForQuestionAnswering(tiny_config(), num_answers=5).init_from_pretraining(state, TABLE, TASK)
    no_qa = lxmert.LxmertForPreTraining(tiny_config(task_qa=False)).state_dict()
    with pytest.raises(KeyError, match="answer_head"):
        qa.init_from_pretraining(no_qa, TABLE, TASK)


# ----------------------------------------------------------------------------------------------------------
# VQA / GQA loss


@pytest.fixture(scope="module")
def qa_model():
    torch.manual_seed(5)
    return randomise(lxmert.LxmertForQuestionAnswering(tiny_config(), num_answers=5), seed=6)


def test_qa_loss_is_soft_score_bce_times_answers(qa_model):
    x = inputs(seed=7)
    g = torch.Generator().manual_seed(7)
    scores = torch.tensor([0.0, 0.3, 0.6, 0.9, 1.0])[torch.randint(0, 5, (3, 5), generator=g)]
    out = qa_model(**x, labels=scores)
    assert out.question_answering_score.shape == (3, 5)
    ref = ref_soft_score_bce(out.question_answering_score, scores)
    assert rel_err(out.loss, ref) <= F32_REL
    # every gradient, backbone included, agrees with the float64 formula's
    params = list(qa_model.parameters())
    got = grads_or_zeros(out.loss, params)
    want = grads_or_zeros(ref, params)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4 if b.norm() > 0 else torch.equal(a, b)
    assert any(a.norm() > 0 for a in got[: len(list(qa_model.lxmert.parameters()))])


def test_qa_integer_labels_are_one_hot(qa_model):
    x = inputs(seed=8)
    labels = torch.tensor([4, 0, 2])
    out = qa_model(**x, labels=labels)
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), labels] = 1.0
    assert rel_err(out.loss, ref_soft_score_bce(out.question_answering_score, one_hot)) <= F32_REL
    assert rel_err(out.loss, qa_model(**x, labels=one_hot).loss) <= 1e-6


@pytest.mark.parametrize(
    "labels",
    [torch.rand(3, 6), torch.rand(3, 4), torch.rand(3), torch.tensor([[1, 2], [0, 1], [3, 4]])],
    ids=["too-many-answers", "too-few-answers", "float-vector", "integer-matrix"],
)
def test_qa_wrong_label_shape(qa_model, labels):
    with pytest.raises(ValueError, match="labels"):
        qa_model(**inputs(seed=9), labels=labels)


# ----------------------------------------------------------------------------------------------------------
# NLVR2


@pytest.fixture(scope="module")
def nlvr2():
    torch.manual_seed(10)
    return randomise(lxmert.LxmertForNLVR2(tiny_config()), seed=11)


def nlvr2_reference(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """(module head, float64 hand head) on cat(pooled(sentence, img0), pooled(sentence, img1))."""
    pooled = [
        model.lxmert(
            input_ids=x["input_ids"],
            attention_mask=x["attention_mask"],
            visual_feats=x["visual_feats"][:, i],
            visual_pos=x["visual_pos"][:, i],
        ).pooled_output
        for i in range(2)
    ]
    both = torch.cat(pooled, dim=-1)
    return model.answer_head(both), ref_answer_head(both, model.answer_head)


def test_nlvr2_logits_and_loss(nlvr2):
    x = inputs(seed=12, images=2)
    labels = torch.tensor([0, 1, 1])
    out = nlvr2(**x, labels=labels)
    module_ref, hand_ref = nlvr2_reference(nlvr2, x)
    assert out.logits.shape == (3, 2)
    assert rel_err(out.logits, module_ref) <= 1e-6
    assert rel_err(out.logits, hand_ref) <= F32_REL
    ref_loss = ref_cross_entropy(hand_ref, labels)
    assert rel_err(out.loss, ref_loss) <= F32_REL

    # gradients reach the backbone and equal the float64 two-pass reference's
    backbone = list(nlvr2.lxmert.named_parameters())
    got = grads_or_zeros(out.loss, [p for _, p in backbone])
    want = grads_or_zeros(ref_loss, [p for _, p in backbone])
    for (name, _), a, b in zip(backbone, got, want):
        assert rel_err(a, b) <= 1e-4 if b.norm() > 0 else torch.equal(a, b), name
    named = dict(zip([n for n, _ in backbone], got))
    reached = (
        "embeddings.word.weight",
        "visual_embeddings.feat_proj.weight",
        "lang_layers.0.attention.qkv.weight",
        "region_layers.0.ffn.up.weight",
        "cross_layers.0.cross_attention.qkv.weight",
    )
    for name in reached:
        assert named[name].norm() > 0, name


def test_nlvr2_images_are_not_swapped(nlvr2):
    """Swapping the two images swaps the halves of the head's input: the logits must change."""
    x = inputs(seed=13, images=2)
    swapped = dict(x, visual_feats=x["visual_feats"].flip(1), visual_pos=x["visual_pos"].flip(1))
    with torch.no_grad():
        a, b = nlvr2(**x).logits, nlvr2(**swapped).logits
        _, hand_swapped = nlvr2_reference(nlvr2, swapped)
    assert rel_err(b, hand_swapped) <= F32_REL
    assert rel_err(a, b) > 1e-3


def test_nlvr2_needs_two_images(nlvr2):
    x = inputs(seed=14)  # one image per sentence
    with pytest.raises(ValueError, match="2 images"):
        nlvr2(**x)
