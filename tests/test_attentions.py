"""output_attentions=True: the attention probabilities, exactly as transformers returns them.

Against transformers' LXMERT on the same weights (conftest.randomize_, converted with lxmert.convert):
language_attentions (one [B, heads, L, L] per language layer), vision_attentions (one [B, heads, R, R] per region
layer) and cross_encoder_attentions (the language-over-regions probabilities [B, heads, L, R] of each cross
layer), in the same tuples, order and shapes, equal to 1e-6 in float32; padded keys (language tokens and,
with a visual mask, regions) get exactly 0. return_dict=False tuples hold the same things at the same positions
as transformers', with and without labels. The fused backends switch to eager's probability-forming path for the
call: their probabilities and outputs are eager's, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, hf_to_ours, random_inputs, random_pretraining_labels, randomize_, small_config

import lxmert
from lxmert.attention import BACKENDS, AttentionBackend, register_backend

transformers = pytest.importorskip("transformers")

PROB_TOL = 1e-6  # float32 probabilities (at most 1) against transformers'
STREAMS = ("language_attentions", "vision_attentions", "cross_encoder_attentions")

# name -> (config overrides, batch, tokens, regions)
CONFIGS = {
    "small": ({}, 3, 11, 37),
    "no_region_layers": (dict(l_layers=1, r_layers=0, x_layers=1), 2, 7, 5),
    "real_shapes_batch_1": (dict(l_layers=2, r_layers=2, x_layers=3), 1, 20, 36),
}
configs = pytest.mark.parametrize("name", list(CONFIGS))


def with_visual_mask(inputs: dict, regions: int) -> dict:
    """The inputs plus a visual_attention_mask padding the last regions of every row but the first."""
    mask = torch.ones(inputs["input_ids"].shape[0], regions, dtype=torch.long)
    if regions > 2:
        mask[1:, -(regions // 3) :] = 0
    return {**inputs, "visual_attention_mask": mask}


def hf_model(cls_name: str, **overrides):
    from conftest import small_hf_config

    return randomize_(getattr(transformers, cls_name)(small_hf_config(**overrides))).eval()


def assert_same_attentions(got, expected, config) -> None:
    depths = {
        "language_attentions": config.l_layers,
        "vision_attentions": config.r_layers,
        "cross_encoder_attentions": config.x_layers,
    }
    for stream in STREAMS:
        mine, theirs = got[stream], expected[stream]
        assert isinstance(mine, tuple) and len(mine) == len(theirs) == depths[stream], stream
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert a.shape == b.shape, f"{stream}[{i}]: {tuple(a.shape)} vs {tuple(b.shape)}"
            assert_close(a, b, PROB_TOL, f"{stream}[{i}]")


def assert_padded_keys_are_zero(out, inputs) -> None:
    lang_pad = inputs["attention_mask"] == 0  # [B, L]
    vis_mask = inputs.get("visual_attention_mask")
    vis_pad = None if vis_mask is None else vis_mask == 0
    for stream, pad in (
        ("language_attentions", lang_pad),
        ("vision_attentions", vis_pad),
        ("cross_encoder_attentions", vis_pad),
    ):
        if pad is None or not pad.any():
            continue
        for i, probs in enumerate(out[stream]):
            keys = pad[:, None, None, :].expand_as(probs)
            assert torch.count_nonzero(probs[keys]) == 0, f"{stream}[{i}]: a padded key has weight"
            assert (probs[~keys] > 0).any(), f"{stream}[{i}]: the real keys have none"


@configs
def test_backbone_attentions_equal_transformers(name):
    torch.manual_seed(30)
    overrides, batch, tokens, regions = CONFIGS[name]
    hf = hf_model("LxmertModel", **overrides)
    ours = hf_to_ours(hf, lxmert.LxmertModel)
    inputs = with_visual_mask(random_inputs(hf.config, batch, tokens, regions), regions)
    with torch.no_grad():
        expected = hf(**inputs, output_attentions=True)
        got = ours(**inputs, output_attentions=True)
    assert_same_attentions(got, expected, hf.config)
    assert got.language_attentions[0].shape == (batch, hf.config.num_attention_heads, tokens, tokens)
    if hf.config.r_layers:
        assert got.vision_attentions[0].shape == (batch, hf.config.num_attention_heads, regions, regions)
    assert got.cross_encoder_attentions[0].shape == (batch, hf.config.num_attention_heads, tokens, regions)
    assert_padded_keys_are_zero(got, inputs)
    assert_padded_keys_are_zero(expected, inputs)
    for probs in got.language_attentions + got.vision_attentions + got.cross_encoder_attentions:
        assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), 1e-6, "rows sum to 1")


def test_attentions_leave_the_outputs_as_they_are():
    """The probability-forming path is eager's arithmetic: the same outputs, bit for bit, with or without it."""
    torch.manual_seed(31)
    model = randomize_(lxmert.LxmertModel(small_config())).eval()
    inputs = with_visual_mask(random_inputs(model.config, 3, 9, 6), 6)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
        probed = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert plain.language_attentions is None and plain.vision_attentions is None
    assert plain.cross_encoder_attentions is None
    for key in ("language_output", "vision_output", "pooled_output"):
        assert torch.equal(plain[key], probed[key]), key
    for key in ("language_hidden_states", "vision_hidden_states"):
        assert all(torch.equal(a, b) for a, b in zip(plain[key], probed[key])), key


@pytest.mark.parametrize("head", ["LxmertForPreTraining", "LxmertForQuestionAnswering"])
def test_heads_return_the_backbones_attentions_as_transformers(head):
    torch.manual_seed(32)
    hf = hf_model(head)
    ours = hf_to_ours(hf, getattr(lxmert, head))
    inputs = with_visual_mask(random_inputs(hf.config, 2, 8, 7), 7)
    with torch.no_grad():
        expected = hf(**inputs, output_attentions=True)
        got = ours(**inputs, output_attentions=True)
    assert_same_attentions(got, expected, hf.config)


# ---------------------------------------------------------------------------------- return_dict=False


def assert_same_tuple(got: tuple, expected: tuple, skip: tuple[int, ...] = ()) -> None:
    """Position by position: a tensor equal to transformers' (1e-5), or a tuple of them."""
    assert len(got) == len(expected), f"{len(got)} entries against transformers' {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected)):
        if i in skip:
            continue
        if isinstance(b, tuple):
            assert isinstance(a, tuple) and len(a) == len(b), f"position {i}"
            for j, (x, y) in enumerate(zip(a, b)):
                assert_close(x, y, 1e-5, f"position {i}[{j}]")
        else:
            assert isinstance(a, torch.Tensor) and a.shape == b.shape, f"position {i}"
            assert_close(a, b, 1e-5, f"position {i}")


FLAGS = pytest.mark.parametrize(
    "hidden, attentions", [(False, False), (True, False), (False, True), (True, True)], ids=lambda x: str(x)
)


@FLAGS
def test_backbone_tuple_is_transformers(hidden, attentions):
    torch.manual_seed(33)
    hf = hf_model("LxmertModel")
    ours = hf_to_ours(hf, lxmert.LxmertModel)
    inputs = random_inputs(hf.config, 3, 9, 5)
    flags = dict(output_hidden_states=hidden, output_attentions=attentions, return_dict=False)
    with torch.no_grad():
        assert_same_tuple(ours(**inputs, **flags), hf(**inputs, **flags))


@FLAGS
@pytest.mark.parametrize("labelled", [False, True], ids=["no_labels", "labels"])
def test_pretraining_tuple_is_transformers(labelled, hidden, attentions):
    """With MLM labels the full prediction_logits are still in the tuple (position 1, after the loss)."""
    torch.manual_seed(34)
    hf = hf_model("LxmertForPreTraining")
    ours = hf_to_ours(hf, lxmert.LxmertForPreTraining)
    inputs = random_inputs(hf.config, 3, 9, 5)
    labels = random_pretraining_labels(hf.config, 3, 9, 5) if labelled else {}
    flags = dict(output_hidden_states=hidden, output_attentions=attentions, return_dict=False)
    with torch.no_grad():
        got, expected = ours(**inputs, **labels, **flags), hf(**inputs, **labels, **flags)
    assert_same_tuple(got, expected)
    assert (got[0].dim() == 0) == labelled  # the loss leads the tuple exactly when labels are given


def test_pretraining_tuple_keeps_its_slots_without_a_qa_head_and_without_logits():
    """Where transformers puts pooled_output[0][0] (no QA head) or we were told not to form the logits, the
    slot holds None: every later entry stays where transformers has it. With labels whose tasks are all off,
    the loss is 0 and leads the tuple, as transformers'."""
    torch.manual_seed(35)
    hf = hf_model("LxmertForPreTraining", task_qa=False, task_mask_lm=False)
    ours = hf_to_ours(hf, lxmert.LxmertForPreTraining)
    inputs = random_inputs(hf.config, 2, 6, 4)
    flags = dict(output_attentions=True, return_dict=False)
    with torch.no_grad():
        expected = hf(**inputs, labels=torch.zeros(2, 6, dtype=torch.long), **flags)
        got = ours(**inputs, labels=torch.zeros(2, 6, dtype=torch.long), **flags)
        declined = ours(**inputs, return_prediction_logits=False, **flags)
    assert got[0].item() == expected[0].item() == 0.0
    assert got[3] is None and expected[3].dim() == 0  # transformers' stand-in scalar
    assert_same_tuple(got, expected, skip=(3,))
    assert declined[0] is None and len(declined) == len(expected) - 1  # no labels: no loss slot
    assert_close(declined[1], expected[2], 1e-5, "cross_relationship_score")


@FLAGS
@pytest.mark.parametrize("labelled", [False, True], ids=["no_labels", "labels"])
def test_question_answering_tuple_is_transformers(labelled, hidden, attentions):
    """The loss slot: ours is the authors' soft-score BCE, transformers' a cross-entropy; the rest is equal."""
    torch.manual_seed(36)
    hf = hf_model("LxmertForQuestionAnswering")
    ours = hf_to_ours(hf, lxmert.LxmertForQuestionAnswering)
    inputs = random_inputs(hf.config, 3, 9, 5)
    labels = dict(labels=torch.tensor([3, 0, 12])) if labelled else {}
    flags = dict(output_hidden_states=hidden, output_attentions=attentions, return_dict=False)
    with torch.no_grad():
        got, expected = ours(**inputs, **labels, **flags), hf(**inputs, **labels, **flags)
    assert_same_tuple(got, expected, skip=(0,) if labelled else ())
    if labelled:
        assert got[0].dim() == 0 and expected[0].dim() == 0


# ------------------------------------------------------------------------------------------ backends


class RefusingBackend(AttentionBackend):
    """A stand-in for a fused backend that never forms probabilities: counts and answers like eager when used,
    so a call that needs probabilities must not reach it."""

    def __init__(self):
        from lxmert.attention import eager_attention

        super().__init__("refusing", self._attend)
        self._eager = eager_attention
        self.calls = 0

    def _attend(self, *args):
        self.calls += 1
        return self._eager(*args)


@pytest.mark.parametrize("backend", ["sdpa", "triton", "refusing"])
def test_fused_backends_switch_to_eagers_probabilities_for_the_call(backend):
    torch.manual_seed(37)
    refusing = RefusingBackend()
    register_backend(refusing)
    try:
        config = small_config(l_layers=2, r_layers=2, x_layers=2)
        eager = randomize_(lxmert.LxmertForPreTraining(config)).eval()
        other = lxmert.LxmertForPreTraining(small_config(l_layers=2, r_layers=2, x_layers=2, attn_backend=backend))
        other.load_state_dict(eager.state_dict())
        other.eval()
    finally:
        del BACKENDS["refusing"]
    inputs = with_visual_mask(random_inputs(config, 3, 10, 6), 6)
    with torch.no_grad():
        expected = eager(**inputs, output_attentions=True)
        got = other(**inputs, output_attentions=True)
    for stream in STREAMS:
        assert len(got[stream]) == len(expected[stream])
        for i, (a, b) in enumerate(zip(got[stream], expected[stream])):
            assert torch.equal(a, b), f"{backend} {stream}[{i}]"
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        assert torch.equal(got[key], expected[key]), key
    if backend == "refusing":
        assert refusing.calls == 0  # the whole forward ran on eager's path
        with torch.no_grad():
            other(**inputs)
        assert refusing.calls > 0  # and a plain call still goes through the configured backend


def test_training_mode_returns_the_probabilities_after_dropout_as_transformers():
    """transformers returns the dropped-out probabilities the values were weighted with: each entry is 0 or the
    eval probability / (1 - p) (hidden dropout off, so the first layer's input is the same in both modes)."""
    torch.manual_seed(38)
    p = 0.5
    model = randomize_(lxmert.LxmertModel(small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=p)))
    inputs = random_inputs(model.config, 2, 9, 5)
    with torch.no_grad():
        kept = model.eval()(**inputs, output_attentions=True).language_attentions[0]
        dropped = model.train()(**inputs, output_attentions=True).language_attentions[0]
    zero = dropped == 0
    assert zero.any() and (~zero).any()
    assert_close(dropped[~zero], kept[~zero] / (1 - p), 1e-6, "kept entries scaled by 1 / (1 - p)")


def test_attentions_under_activation_checkpointing_carry_gradients():
    from engine.parallelize import apply_activation_checkpointing

    torch.manual_seed(39)
    model = randomize_(lxmert.LxmertForQuestionAnswering(small_config())).eval()
    reference = lxmert.LxmertForQuestionAnswering(small_config()).eval()
    reference.load_state_dict(model.state_dict())
    assert apply_activation_checkpointing(model) == 5
    inputs = random_inputs(model.config, 2, 7, 5)
    got, expected = model(**inputs, output_attentions=True), reference(**inputs, output_attentions=True)
    for stream in STREAMS:
        assert all(torch.equal(a, b) for a, b in zip(got[stream], expected[stream])), stream
    got.cross_encoder_attentions[-1][:, :, 0, 0].sum().backward()
    expected.cross_encoder_attentions[-1][:, :, 0, 0].sum().backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if reference_grads[name].grad is not None:
            assert_close(param.grad, reference_grads[name].grad, 1e-6, f"grad {name}")
