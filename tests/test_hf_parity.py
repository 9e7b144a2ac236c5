"""Parity with transformers' LXMERT: outputs, hidden states, losses, gradients and checkpoint round trips.

transformers' models get random weights (conftest.randomize_) and are converted into ours with
lxmert.convert.load_into; everything runs in eval mode (no dropout) on padded language tokens with
token_type_ids. Outputs and losses must agree to a relative error of 1e-5 in float32. Parameter gradients
are compared with both models in float64, where rounding no longer hides a wrong term (in float32 the
key-projection gradients, sums of terms that cancel, differ by ~2e-4 between two correct implementations);
transformers accumulates its total loss in a float32 tensor even then, hence 1e-5 rather than ~1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close,
    cast_floats,
    hf_to_ours,
    random_inputs,
    random_pretraining_labels,
    randomize_,
    small_config,
    small_hf_config,
)

import lxmert
from lxmert.convert import from_hf_state_dict, load_into, to_hf_state_dict

transformers = pytest.importorskip("transformers")

OUT_TOL = 1e-5
GRAD_TOL = 1e-5  # float64 models, transformers' float32 loss accumulation (see the header)

# name -> (config overrides, batch, tokens, regions)
ODD_CONFIGS = {
    "no_region_layers_one_cross_layer": (dict(l_layers=2, r_layers=0, x_layers=1), 3, 13, 37),
    "gelu_new_one_token_one_region": (
        dict(
            hidden_size=24,
            num_attention_heads=4,
            intermediate_size=37,
            l_layers=1,
            r_layers=2,
            x_layers=2,
            visual_feat_dim=7,
            hidden_act="gelu_new",
        ),
        2,
        1,
        1,
    ),
    "relu_three_segments_real_shapes": (
        dict(
            hidden_size=20,
            num_attention_heads=5,
            intermediate_size=16,
            l_layers=3,
            r_layers=1,
            x_layers=3,
            visual_feat_dim=11,
            type_vocab_size=3,
            hidden_act="relu",
        ),
        1,
        20,
        36,
    ),
}
odd_configs = pytest.mark.parametrize("name", list(ODD_CONFIGS))


def hf_model(cls_name: str, **overrides):
    """A transformers LXMERT model of the small config with random weights, in eval mode."""
    return randomize_(getattr(transformers, cls_name)(small_hf_config(**overrides))).eval()


def assert_hidden_states_equal(ours, hf, config) -> None:
    for stream, depth in (("language", config.l_layers), ("vision", config.r_layers)):
        mine, theirs = getattr(ours, f"{stream}_hidden_states"), getattr(hf, f"{stream}_hidden_states")
        assert len(mine) == len(theirs) == depth + config.x_layers
        for i, (a, b) in enumerate(zip(mine, theirs)):
            assert_close(a, b, OUT_TOL, f"{stream}_hidden_states[{i}]")


@odd_configs
def test_backbone_matches_transformers(name):
    torch.manual_seed(1)
    overrides, batch, tokens, regions = ODD_CONFIGS[name]
    hf = hf_model("LxmertModel", **overrides)
    ours = hf_to_ours(hf, lxmert.LxmertModel)
    inputs = random_inputs(hf.config, batch, tokens, regions)
    with torch.no_grad():
        expected = hf(**inputs, output_hidden_states=True)
        got = ours(**inputs, output_hidden_states=True)
    for key in ("language_output", "vision_output", "pooled_output"):
        assert_close(got[key], expected[key], OUT_TOL, key)
    assert_hidden_states_equal(got, expected, hf.config)


@odd_configs
def test_pretraining_outputs_loss_and_gradients_match_transformers(name):
    torch.manual_seed(2)
    overrides, batch, tokens, regions = ODD_CONFIGS[name]
    hf = hf_model("LxmertForPreTraining", **overrides)
    ours = hf_to_ours(hf, lxmert.LxmertForPreTraining)
    assert ours.config.visual_loss_normalizer == 6.67  # transformers' rounded 1 / 0.15 is carried over
    inputs = random_inputs(hf.config, batch, tokens, regions)
    labels = random_pretraining_labels(hf.config, batch, tokens, regions)

    expected = hf(**inputs, **labels, output_hidden_states=True)
    got = ours(**inputs, **labels, output_hidden_states=True, return_prediction_logits=True)
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        assert_close(got[key], expected[key], OUT_TOL, key)
    assert_hidden_states_equal(got, expected, hf.config)
    assert set(got.losses) == {"mlm", "matched", "obj", "attr", "feat", "qa"}
    assert_close(got.loss, expected.loss, OUT_TOL, "total loss")
    assert_close(sum(got.losses.values()), got.loss, 1e-6, "sum of the components")

    hf.double()
    ours.double()
    inputs, labels = cast_floats(inputs, torch.float64), cast_floats(labels, torch.float64)
    hf(**inputs, **labels).loss.backward()
    ours(**inputs, **labels).loss.backward()
    ours_grads = to_hf_state_dict({k: p.grad for k, p in ours.named_parameters()})
    hf_params = dict(hf.named_parameters())
    assert set(ours_grads) == set(hf_params)
    for key, param in hf_params.items():
        # softmax ignores a shift shared by all keys of a query: a key-bias gradient is 0 but for rounding
        floor = hf_params[key[: -len("bias")] + "weight"].grad.abs().max().item() if key.endswith("key.bias") else 0.0
        assert_close(ours_grads[key], param.grad, GRAD_TOL, f"grad {key}", floor=floor)


def test_default_size_pretraining_matches_transformers():
    """The real sizes once (228M parameters): 20 tokens, 36 regions of 2048-d features, batch 2."""
    from transformers.initialization import no_init_weights

    torch.manual_seed(3)
    # randomize_ and load_into set every parameter: skip both models' own (slow) initialisation
    with no_init_weights():
        hf = transformers.LxmertForPreTraining(transformers.LxmertConfig())
        ours = lxmert.LxmertForPreTraining(lxmert.LxmertConfig.from_hf(hf.config))
    hf.tie_weights()  # no_init_weights also skips the tying that post_init does
    assert hf.cls.predictions.decoder.weight is hf.lxmert.embeddings.word_embeddings.weight
    randomize_(hf).eval()
    load_into(ours, hf.state_dict())
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == 228_051_752
    inputs = random_inputs(hf.config, 2, 20, 36)
    labels = random_pretraining_labels(hf.config, 2, 20, 36)
    with torch.no_grad():
        expected = hf(**inputs, **labels)
        got = ours(**inputs, **labels, return_prediction_logits=True)
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        assert_close(got[key], expected[key], OUT_TOL, key)
    assert_close(got.loss, expected.loss, OUT_TOL, "total loss")


FLAG_SETS = {
    "no_qa": (dict(task_qa=False), {"mlm", "matched", "obj", "attr", "feat"}),
    "no_mlm_no_attr": (dict(task_mask_lm=False, visual_attr_loss=False), {"matched", "obj", "feat", "qa"}),
    "no_objects_no_matching": (dict(task_obj_predict=False, task_matched=False), {"mlm", "qa"}),
    "attr_only_visual_loss": (dict(visual_obj_loss=False, visual_feat_loss=False), {"mlm", "matched", "attr", "qa"}),
}


@pytest.mark.parametrize("flags", list(FLAG_SETS))
def test_disabled_tasks_skip_the_same_losses_as_transformers(flags):
    torch.manual_seed(4)
    overrides, components = FLAG_SETS[flags]
    hf = hf_model("LxmertForPreTraining", **overrides)
    ours = hf_to_ours(hf, lxmert.LxmertForPreTraining)  # also: the same heads exist (load_into is strict)
    inputs = random_inputs(hf.config, 3, 11, 37)
    labels = random_pretraining_labels(hf.config, 3, 11, 37)  # every label given, enabled or not
    with torch.no_grad():
        expected = hf(**inputs, **labels)
        got = ours(**inputs, **labels, return_prediction_logits=True)
    assert set(got.losses) == components
    assert_close(got.loss, expected.loss, OUT_TOL, "total loss")
    assert_close(sum(got.losses.values()), got.loss, 1e-6, "sum of the components")
    assert_close(got.prediction_logits, expected.prediction_logits, OUT_TOL, "prediction_logits")
    if hf.config.task_qa:
        assert_close(got.question_answering_score, expected.question_answering_score, OUT_TOL, "qa score")
    else:
        assert got.question_answering_score is None and ours.answer_head is None


@pytest.mark.parametrize("dtype, loss_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_losses_are_at_least_float32_and_never_narrowed(dtype, loss_dtype):
    """Half-precision logits are widened to float32 for the losses; float64 stays float64 (float64 checks)."""
    torch.manual_seed(9)
    config = small_config()
    model = randomize_(lxmert.LxmertForPreTraining(config)).eval().to(dtype)
    inputs = cast_floats(random_inputs(config, 2, 7, 5), dtype)
    labels = cast_floats(random_pretraining_labels(config, 2, 7, 5), dtype)
    out = model(**inputs, **labels)
    assert out.loss.dtype == loss_dtype
    assert {name: loss.dtype for name, loss in out.losses.items()} == dict.fromkeys(out.losses, loss_dtype)


def test_question_answering_scores_match_and_loss_is_the_authors_soft_bce():
    torch.manual_seed(5)
    hf = hf_model("LxmertForQuestionAnswering", num_qa_labels=29)
    ours = hf_to_ours(hf, lxmert.LxmertForQuestionAnswering)
    assert ours.num_answers == 29
    inputs = random_inputs(hf.config, 4, 13, 37)
    with torch.no_grad():
        expected = hf(**inputs, output_hidden_states=True)

    # soft VQA scores: a few answers per question with scores in {0.3, 0.6, 0.9, 1}, the rest 0
    scores = torch.tensor([0.3, 0.6, 0.9, 1.0])[torch.randint(0, 4, (4, 29))]
    soft = torch.where(torch.rand(4, 29) < 0.15, scores, torch.zeros(4, 29))
    soft[0, 3] = 1.0
    hard = torch.tensor([3, 0, 28, 17])
    for labels, targets in ((soft, soft), (hard, F.one_hot(hard, 29).float())):
        got = ours(**inputs, labels=labels, output_hidden_states=True)
        score = got.question_answering_score
        assert_close(score, expected.question_answering_score, OUT_TOL, "question_answering_score")
        assert_hidden_states_equal(got, expected, hf.config)
        reference = F.binary_cross_entropy_with_logits(score.detach().double(), targets.double()) * 29
        assert_close(got.loss, reference, 1e-6, "soft-score BCE x num_answers")
        # d loss / d score = (sigmoid(score) - target) / batch: mean over B x answers, times answers
        (grad,) = torch.autograd.grad(got.loss, score)
        assert_close(grad, (torch.sigmoid(score.detach().double()) - targets.double()) / 4, 1e-5, "d loss / d score")
    # not transformers' cross-entropy over the hard labels
    assert not math.isclose(got.loss.item(), F.cross_entropy(score.detach(), hard).item(), rel_tol=1e-3)


def test_round_trip_ours_to_transformers_and_back():
    torch.manual_seed(6)
    config = small_config(visual_loss_normalizer=6.67)
    ours = randomize_(lxmert.LxmertForPreTraining(config)).eval()
    original = ours.state_dict()

    hf_state = to_hf_state_dict(original)
    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**config.to_hf_dict())).eval()
    hf.load_state_dict(hf_state, strict=True)
    back = from_hf_state_dict(hf.state_dict())
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key

    inputs = random_inputs(config, 3, 13, 37)
    labels = random_pretraining_labels(config, 3, 13, 37)
    with torch.no_grad():
        expected = hf(**inputs, **labels)
        got = ours(**inputs, **labels, return_prediction_logits=True)
    for key in ("prediction_logits", "cross_relationship_score", "question_answering_score", "loss"):
        assert_close(got[key], expected[key], OUT_TOL, key)

    # and loading the round-tripped weights keeps the MLM decoder tied to the word embeddings
    reloaded = lxmert.LxmertForPreTraining(config)
    load_into(reloaded, hf.state_dict())
    assert reloaded.mlm_head.decoder.weight is reloaded.lxmert.embeddings.word.weight
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_bare_backbone_state_dict_converts_both_ways():
    """LxmertModel state dicts carry no 'lxmert.' prefix, in either layout."""
    torch.manual_seed(7)
    config = small_config(r_layers=0, x_layers=1)
    ours = randomize_(lxmert.LxmertModel(config)).eval()
    original = ours.state_dict()
    hf_state = to_hf_state_dict(original)
    assert not any(k.startswith("lxmert.") for k in hf_state)
    hf = transformers.LxmertModel(transformers.LxmertConfig(**config.to_hf_dict())).eval()
    hf.load_state_dict(hf_state, strict=True)
    back = from_hf_state_dict(hf.state_dict())
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key
    inputs = random_inputs(config, 2, 9, 5)
    with torch.no_grad():
        expected, got = hf(**inputs), ours(**inputs)
    for key in ("language_output", "vision_output", "pooled_output"):
        assert_close(got[key], expected[key], OUT_TOL, key)


def test_train_mode_loss_is_finite_and_every_parameter_gets_a_gradient():
    torch.manual_seed(8)
    config = small_config()
    model = randomize_(lxmert.LxmertForPreTraining(config)).train()
    inputs = random_inputs(config, 4, 13, 37)
    labels = random_pretraining_labels(config, 4, 13, 37)
    out = model(**inputs, **labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient"
    # padding_idx=0 on the position and token-type tables (the authors' quirk): row 0 never learns
    embeddings = model.lxmert.embeddings
    for table in (embeddings.position, embeddings.token_type):
        assert torch.count_nonzero(table.weight.grad[0]) == 0
        assert torch.count_nonzero(table.weight.grad[1]) > 0
