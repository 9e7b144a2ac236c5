"""Malformed inputs, labels, configs and checkpoints fail early with an error that says what is wrong.

Each case checks the exception type and its message (pytest.raises(match=...)), never only that
something raised.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import random_inputs, random_pretraining_labels, randomize_, small_config

import lxmert
from lxmert.convert import from_hf_state_dict, load_into, read_state_dict, to_hf_state_dict, to_ours

BATCH, TOKENS, REGIONS = 2, 7, 5


@pytest.fixture
def model():
    torch.manual_seed(20)
    return randomize_(lxmert.LxmertModel(small_config())).eval()


@pytest.fixture
def inputs(model):
    torch.manual_seed(21)
    return random_inputs(model.config, BATCH, TOKENS, REGIONS)


def test_valid_inputs_run(model, inputs):
    """The baseline every case below breaks in one place."""
    out = model(**inputs)
    assert out.language_output.shape == (BATCH, TOKENS, model.config.hidden_size)
    assert torch.isfinite(out.pooled_output).all()


# case -> (input replaced, its malformed value, the message); the value is built inside the seeded test
MALFORMED = {
    "feature_dim_30": (
        "visual_feats",
        lambda: torch.randn(BATCH, REGIONS, 30),
        r"visual_feats must be \[batch=2, regions, visual_feat_dim=29\], got \(2, 5, 30\)",
    ),
    "feats_batch_3": (
        "visual_feats",
        lambda: torch.randn(BATCH + 1, REGIONS, 29),
        r"visual_feats must be \[batch=2, .*got \(3, 5, 29\)",
    ),
    "feats_2d": ("visual_feats", lambda: torch.randn(BATCH * REGIONS, 29), r"visual_feats must be .*got \(10, 29\)"),
    "boxes_of_5": (
        "visual_pos",
        lambda: torch.rand(BATCH, REGIONS, 5),
        r"visual_pos \(boxes\) must be \[batch=2, regions=5, 4\], got \(2, 5, 5\)",
    ),
    "boxes_for_6_regions": (
        "visual_pos",
        lambda: torch.rand(BATCH, REGIONS + 1, 4),
        r"visual_pos \(boxes\) must be \[batch=2, regions=5, 4\], got \(2, 6, 4\)",
    ),
    "id_equal_to_vocab": ("input_ids", lambda: torch.full((BATCH, TOKENS), 101), r"input_ids must lie in \[0, 101\)"),
    "negative_id": ("input_ids", lambda: torch.full((BATCH, TOKENS), -1), r"input_ids must lie in \[0, 101\)"),
    "ids_1d": (
        "input_ids",
        lambda: torch.ones(TOKENS, dtype=torch.long),
        r"input_ids must be an integer tensor \[batch, tokens\], got torch.int64 \(7,\)",
    ),
    "ids_float": (
        "input_ids",
        lambda: torch.ones(BATCH, TOKENS),
        r"input_ids must be an integer tensor \[batch, tokens\], got torch.float32",
    ),
    "41_tokens": (
        "input_ids",
        lambda: torch.ones(BATCH, 41, dtype=torch.long),
        r"41 tokens exceed max_position_embeddings 40",
    ),
    "mask_8_tokens": (
        "attention_mask",
        lambda: torch.ones(BATCH, TOKENS + 1),
        r"attention_mask must have shape \(2, 7\), got \(2, 8\)",
    ),
    "mask_1d": ("attention_mask", lambda: torch.ones(TOKENS), r"attention_mask must have shape \(2, 7\), got \(7,\)"),
    "segment_2_of_2": (
        "token_type_ids",
        lambda: torch.full((BATCH, TOKENS), 2),
        r"token_type_ids must lie in \[0, 2\)",
    ),
    "segments_6_tokens": (
        "token_type_ids",
        lambda: torch.zeros(BATCH, TOKENS - 1, dtype=torch.long),
        r"token_type_ids must have shape \(2, 7\), got \(2, 6\)",
    ),
    "visual_mask_4_regions": (
        "visual_attention_mask",
        lambda: torch.ones(BATCH, REGIONS - 1),
        r"visual_attention_mask must have shape \(2, 5\), got \(2, 4\)",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_model_inputs_raise_value_error(model, inputs, case):
    key, make, message = MALFORMED[case]
    if case == "41_tokens":  # a longer sentence: drop the 7-token mask and segments
        inputs["attention_mask"] = inputs["token_type_ids"] = None
    inputs[key] = make()
    # id ranges are asserted on the device (no host wait): RuntimeError on the CPU; shapes are ValueErrors
    error = RuntimeError if "must lie in" in message else ValueError
    with pytest.raises(error, match=message):
        model(**inputs)


@pytest.mark.parametrize("case", ["feature_dim_30", "mask_8_tokens", "segment_2_of_2"])
def test_malformed_inputs_are_refused_with_output_attentions_too(model, inputs, case):
    """The probability-forming path (tests/test_attentions.py) is checked like the plain one, before any layer."""
    key, make, message = MALFORMED[case]
    inputs[key] = make()
    error = RuntimeError if "must lie in" in message else ValueError
    with pytest.raises(error, match=message):
        model(**inputs, output_attentions=True)


@pytest.mark.parametrize("head", ["LxmertForPreTraining", "LxmertForQuestionAnswering"])
def test_output_attentions_is_accepted_by_the_heads_on_every_backend(head, inputs):
    """No backend refuses it: a fused one switches to eager's probabilities for the call (flash needs CUDA)."""
    for backend in ("eager", "sdpa", "triton"):
        model = getattr(lxmert, head)(small_config(attn_backend=backend)).eval()
        out = model(**inputs, output_attentions=True)
        assert len(out.language_attentions) == model.config.l_layers, backend
        assert model(**inputs).language_attentions is None, backend


# ------------------------------------------------------------------------------------------------ labels


@pytest.fixture
def pretraining():
    torch.manual_seed(22)
    return randomize_(lxmert.LxmertForPreTraining(small_config())).eval()


def test_obj_labels_without_an_enabled_loss_raise_key_error(pretraining, inputs):
    labels = random_pretraining_labels(pretraining.config, BATCH, TOKENS, REGIONS)
    del labels["obj_labels"]["attr"]
    with pytest.raises(KeyError, match="obj_labels has no 'attr' entry, but the attr loss is enabled"):
        pretraining(**inputs, **labels)


@pytest.mark.parametrize("name, which", [("obj", "ids"), ("attr", "conf"), ("feat", "target"), ("feat", "mask")])
def test_obj_labels_not_per_region_raise_value_error(pretraining, inputs, name, which):
    labels = random_pretraining_labels(pretraining.config, BATCH, TOKENS, REGIONS)
    target, weight = labels["obj_labels"][name]
    if which in ("ids", "target"):
        target = target[:, :-1]  # one region short
    else:
        weight = weight.reshape(-1)  # flattened
    labels["obj_labels"][name] = (target, weight)
    with pytest.raises(ValueError, match=rf"obj_labels\['{name}'\] must be per region \[batch, regions=5, \.\.\.\]"):
        pretraining(**inputs, **labels)


def test_question_answering_labels_of_the_wrong_width_raise_value_error(inputs):
    model = lxmert.LxmertForQuestionAnswering(small_config(), num_answers=11).eval()
    with pytest.raises(ValueError, match=r"labels must be soft scores of shape \(2, 11\), got \(2, 12\)"):
        model(**inputs, labels=torch.rand(BATCH, 12))


# ----------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=10, num_attention_heads=3), "hidden_size 10 is not a multiple of num_attention_heads 3"),
        (dict(hidden_act="tanh"), "hidden_act 'tanh' is not one of"),
        (dict(r_layers=-1), "r_layers must be >= 0, got -1"),
    ],
)
def test_bad_config_raises_value_error(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lxmert.LxmertConfig(**fields)


def test_unknown_attention_backend_raises_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown attn_backend 'nope'; available: \[.*'eager'.*'sdpa'.*\]"):
        lxmert.LxmertModel(small_config(attn_backend="nope"))


@pytest.mark.parametrize(
    "feats_shape, message",
    [
        ((BATCH, REGIONS, 29), r"got \(2, 5, 29\)"),  # one image, not a pair
        ((BATCH, 3, REGIONS, 29), r"got \(2, 3, 5, 29\)"),  # three images
        ((BATCH + 1, 2, REGIONS, 29), r"got \(3, 2, 5, 29\)"),  # batch differs from the sentences'
    ],
)
def test_nlvr2_needs_a_pair_of_images_per_sentence(inputs, feats_shape, message):
    model = lxmert.LxmertForNLVR2(small_config()).eval()
    with pytest.raises(
        ValueError, match=r"NLVR2 visual_feats must be \[batch=2, 2 images, regions, \.\.\.\], " + message
    ):
        model(
            inputs["input_ids"],
            torch.randn(feats_shape),
            torch.rand(*feats_shape[:-1], 4),
            attention_mask=inputs["attention_mask"],
        )


def test_nlvr2_needs_a_pair_of_boxes_per_sentence(inputs):
    model = lxmert.LxmertForNLVR2(small_config()).eval()
    with pytest.raises(
        ValueError, match=r"NLVR2 visual_pos must be \[batch=2, 2 images, regions, \.\.\.\], got \(4, 5, 4\)"
    ):
        model(inputs["input_ids"], torch.randn(BATCH, 2, REGIONS, 29), torch.rand(2 * BATCH, REGIONS, 4))


# ------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def state(pretraining):
    return pretraining.state_dict()


def fresh_pretraining():
    return lxmert.LxmertForPreTraining(small_config())


def test_checkpoint_whose_tied_weights_differ_is_refused(state):
    state = dict(state)
    state["mlm_head.decoder.weight"] = state["mlm_head.decoder.weight"] + 1.0
    with pytest.raises(
        ValueError, match=r"mlm_head\.decoder\.weight and lxmert\.embeddings\.word\.weight are one tied"
    ):
        load_into(fresh_pretraining(), state)


def test_checkpoint_with_missing_keys_names_them(state):
    del state["lxmert.pooler.weight"], state["match_head.bias"]
    with pytest.raises(KeyError, match=r"2 missing keys, e\.g\. \['lxmert\.pooler\.weight', 'match_head\.bias'\]"):
        load_into(fresh_pretraining(), state)


def test_checkpoint_with_extra_keys_names_them(state):
    state["lxmert.pooler.extra"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"1 unexpected keys, e\.g\. \['lxmert\.pooler\.extra'\]"):
        load_into(fresh_pretraining(), state)


def test_checkpoint_with_wrong_shapes_names_them(state):
    state["match_head.weight"] = torch.zeros(3, 36)
    with pytest.raises(
        KeyError, match=r"1 shape mismatches, e\.g\. \['match_head\.weight: checkpoint \(3, 36\) vs model \(2, 36\)'\]"
    ):
        load_into(fresh_pretraining(), state)


def test_checkpoint_with_every_problem_names_all_of_them(state):
    del state["lxmert.pooler.bias"]
    state["answer_head.extra.weight"] = torch.zeros(1)
    state["answer_head.fc2.bias"] = torch.zeros(14)
    with pytest.raises(KeyError) as error:
        load_into(fresh_pretraining(), state)
    message = str(error.value)
    assert "does not fit LxmertForPreTraining" in message
    for expected in (
        "1 missing keys",
        "lxmert.pooler.bias",
        "1 unexpected keys",
        "answer_head.extra.weight",
        "1 shape mismatches",
        "answer_head.fc2.bias: checkpoint (14,) vs model (13,)",
    ):
        assert expected in message


def test_transformers_checkpoint_of_another_size_names_the_mismatches(state):
    """A transformers-layout checkpoint of a model with a wider FFN: the error names our keys."""
    torch.manual_seed(23)
    wider = randomize_(lxmert.LxmertForPreTraining(small_config(intermediate_size=64)))
    hf_state = to_hf_state_dict(wider.state_dict())
    with pytest.raises(
        KeyError,
        match=r"shape mismatches, e\.g\. \['lxmert\.lang_layers\.0\.ffn\.up\.weight: checkpoint \(64, 36\) vs model \(53, 36\)'",  # noqa: E501
    ):
        load_into(fresh_pretraining(), hf_state)


def test_unrecognised_key_in_a_transformers_checkpoint_raises_key_error(state):
    hf_state = to_hf_state_dict(state)
    hf_state["lxmert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(1)
    with pytest.raises(
        KeyError,
        match=r"1 keys are not part of transformers' LXMERT layout, e\.g\. \['lxmert\.encoder\.layer\.0\.attention\.self\.rotary\.weight'\]",  # noqa: E501
    ):
        from_hf_state_dict(hf_state)
    with pytest.raises(KeyError, match="not part of transformers' LXMERT layout"):
        load_into(fresh_pretraining(), hf_state)


def test_transformers_checkpoint_missing_a_value_projection_raises_key_error(state):
    hf_state = to_hf_state_dict(state)
    del hf_state["lxmert.encoder.x_layers.1.visual_attention.att.value.bias"]
    with pytest.raises(
        KeyError,
        match=r"lxmert\.cross_layers\.1\.cross_attention\.qkv\.bias: needs query, key and value; the checkpoint has only \['key', 'query'\]",  # noqa: E501
    ):
        from_hf_state_dict(hf_state)


def test_unrecognised_key_in_our_layout_raises_key_error(state):
    state["lxmert.lang_layers.0.attention.rotary.weight"] = torch.zeros(1)
    with pytest.raises(
        KeyError,
        match=r"1 keys are not part of this package's layout, e\.g\. \['lxmert\.lang_layers\.0\.attention\.rotary\.weight'\]",  # noqa: E501
    ):
        to_hf_state_dict(state)


def test_unknown_layout_raises_value_error():
    with pytest.raises(
        ValueError, match=r"cannot tell which LXMERT layout these 2 keys follow, e\.g\. \['conv1\.weight', 'fc\.bias'\]"
    ):
        to_ours({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown layout 'onnx'"):
        to_ours({"conv1.weight": torch.zeros(1)}, layout="onnx")


def test_unreadable_checkpoint_files_name_the_path(tmp_path, state):
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {tmp_path / 'absent.pth'} does not exist")):
        read_state_dict(tmp_path / "absent.pth")
    good = tmp_path / "model.pth"
    torch.save(state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read checkpoint {truncated}")):
        read_state_dict(truncated)
    not_tensors = tmp_path / "config.pth"
    torch.save({"lr": 1e-4}, not_tensors)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {not_tensors} is not a state dict of tensors")):
        read_state_dict(not_tensors)
