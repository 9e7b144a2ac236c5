"""from_pretrained / save_pretrained (lxmert/pretrained.py): transformers' directories give transformers' outputs,
our directory round-trips bit for bit, overrides and new heads say so in one line, and every place without a
model is a one-line error naming it. No test touches the network."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from conftest import assert_close, random_inputs, random_pretraining_labels, randomize_, small_config, small_hf_config

import lxmert
from lxmert.pretrained import PretrainedError

transformers = pytest.importorskip("transformers")

OUT_TOL = 1e-5
CLASSES = {
    "LxmertModel": ("language_output", "vision_output", "pooled_output"),
    "LxmertForPreTraining": ("prediction_logits", "cross_relationship_score", "question_answering_score", "loss"),
    "LxmertForQuestionAnswering": ("question_answering_score",),
}


def hf_directory(tmp_path, cls_name: str, fmt: str, **overrides):
    """A random transformers model of the small config, written as transformers writes it: save_pretrained's
    config.json + model.safetensors, or (fmt "bin") config.json + pytorch_model.bin as older versions wrote."""
    hf = randomize_(getattr(transformers, cls_name)(small_hf_config(**overrides))).eval()
    directory = tmp_path / f"hf_{cls_name}_{fmt}"
    if fmt == "bin":
        hf.config.save_pretrained(directory)
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    else:
        hf.save_pretrained(directory)
    return hf, directory


def inputs_for(model, config, batch: int = 3, tokens: int = 9, regions: int = 6) -> dict[str, torch.Tensor]:
    inputs = random_inputs(config, batch, tokens, regions)
    if isinstance(model, lxmert.LxmertForNLVR2):  # a pair of images per sentence
        pair = random_inputs(config, 2 * batch, tokens, regions)
        inputs["visual_feats"] = pair["visual_feats"].unflatten(0, (batch, 2))
        inputs["visual_pos"] = pair["visual_pos"].unflatten(0, (batch, 2))
    return inputs


def assert_state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def the_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "lxmert.pretrained"]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "file"])
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_a_transformers_directory_gives_transformers_outputs(tmp_path, cls_name, fmt, caplog):
    torch.manual_seed(1)
    hf, directory = hf_directory(tmp_path, cls_name, "bin" if fmt == "bin" else "safetensors")
    path = directory / "model.safetensors" if fmt == "file" else directory  # a weights file, config beside it
    with caplog.at_level(logging.WARNING):
        ours = getattr(lxmert, cls_name).from_pretrained(path)
    assert not caplog.records  # every weight came from the checkpoint
    assert not ours.training
    inputs = random_inputs(hf.config, 3, 11, 7)
    if cls_name == "LxmertForPreTraining":
        inputs |= random_pretraining_labels(hf.config, 3, 11, 7)
    with torch.no_grad():
        expected = hf(**inputs)
        got = ours(**inputs, **({"return_prediction_logits": True} if cls_name == "LxmertForPreTraining" else {}))
    for key in CLASSES[cls_name]:
        assert_close(got[key], expected[key], OUT_TOL, key)


@pytest.mark.parametrize(
    "cls_name", ["LxmertModel", "LxmertForPreTraining", "LxmertForQuestionAnswering", "LxmertForNLVR2"]
)
def test_save_then_load_is_exact(tmp_path, cls_name, caplog):
    torch.manual_seed(2)
    cls = getattr(lxmert, cls_name)
    model = randomize_(cls(small_config(hidden_act="gelu_new", attn_backend="sdpa"))).eval()
    assert model.save_pretrained(tmp_path / "out") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "model_config.json"]
    with caplog.at_level(logging.WARNING):
        loaded = cls.from_pretrained(tmp_path / "out")
    assert not caplog.records
    assert loaded.config == model.config
    assert_state_equal(loaded, model)
    inputs = inputs_for(model, model.config)
    with torch.no_grad():
        a, b = model(**inputs).to_tuple(), loaded(**inputs).to_tuple()
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_fine_tuned_qa_export_keeps_its_answer_count(tmp_path):
    """The engine builds QA with num_answers = the task's answers and exports config.num_qa_labels = the
    pre-training table's size: the answer count is read off the head."""
    torch.manual_seed(3)
    model = randomize_(lxmert.LxmertForQuestionAnswering(small_config(), num_answers=5))
    model.save_pretrained(tmp_path)
    loaded = lxmert.LxmertForQuestionAnswering.from_pretrained(tmp_path)
    assert loaded.num_answers == 5 and loaded.config.num_qa_labels == small_config().num_qa_labels
    assert_state_equal(loaded, model)


def test_num_qa_labels_makes_a_new_head_and_says_so_in_one_line(tmp_path, caplog):
    torch.manual_seed(4)
    hf, directory = hf_directory(tmp_path, "LxmertForQuestionAnswering", "safetensors")
    with caplog.at_level(logging.WARNING):
        ours = lxmert.LxmertForQuestionAnswering.from_pretrained(directory, num_qa_labels=7, attn_backend="sdpa")
    line = the_line(caplog)
    assert "answer_head" in line and str(directory) in line
    assert ours.config.attn_backend == "sdpa" and ours.config.num_qa_labels == ours.num_answers == 7
    assert ours.answer_head.fc2.weight.shape == (7, 2 * ours.config.hidden_size)
    hf_backbone = lxmert.LxmertModel.from_pretrained(directory)
    assert_state_equal(ours.lxmert, hf_backbone)
    with pytest.raises(TypeError, match="num_answer_labels not LxmertConfig fields"):
        lxmert.LxmertForQuestionAnswering.from_pretrained(directory, num_answer_labels=7)


@pytest.mark.parametrize("cls_name", ["LxmertForQuestionAnswering", "LxmertForNLVR2"])
def test_a_fine_tuning_model_from_a_pretraining_directory_inits_its_head(tmp_path, cls_name, caplog):
    torch.manual_seed(5)
    cls = getattr(lxmert, cls_name)
    pretrained = randomize_(lxmert.LxmertForPreTraining(small_config()))
    pretrained.save_pretrained(tmp_path)
    torch.manual_seed(6)
    fresh = cls(small_config())  # what the model's own init draws from this seed
    torch.manual_seed(6)
    with caplog.at_level(logging.WARNING):
        model = cls.from_pretrained(tmp_path)
    line = the_line(caplog)
    assert line.startswith(f"{cls_name}: backbone loaded from {tmp_path}") and "answer_head" in line
    assert_state_equal(model.lxmert, pretrained.lxmert)
    assert_state_equal(model.answer_head, fresh.answer_head)
    if cls_name == "LxmertForQuestionAnswering":  # the same shape as the pre-training QA head, yet not taken
        assert model.answer_head.fc2.weight.shape == pretrained.answer_head.fc2.weight.shape
        assert not torch.equal(model.answer_head.fc2.weight, pretrained.answer_head.fc2.weight)


def test_pretraining_keeps_the_heads_that_fit(tmp_path, caplog):
    torch.manual_seed(7)
    pretrained = randomize_(lxmert.LxmertForPreTraining(small_config()))
    pretrained.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = lxmert.LxmertForPreTraining.from_pretrained(tmp_path, num_qa_labels=4)
    line = the_line(caplog)
    assert "answer_head" in line and "mlm_head" not in line and "obj_head" not in line
    for name in ("lxmert", "mlm_head", "match_head", "obj_head"):
        assert_state_equal(getattr(model, name), getattr(pretrained, name))
    assert model.mlm_head.decoder.weight is model.lxmert.embeddings.word.weight  # still tied


def test_a_directory_without_weights_or_config_is_one_line(tmp_path):
    torch.manual_seed(8)
    lxmert.LxmertModel(small_config()).save_pretrained(tmp_path / "ours")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "model_config.json").write_bytes((tmp_path / "ours/model_config.json").read_bytes())
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "model.safetensors").write_bytes((tmp_path / "ours/model.safetensors").read_bytes())
    cases = {
        tmp_path / "config_only": "is a directory without model.safetensors or pytorch_model.bin",
        tmp_path / "weights_only": "has no model_config.json or config.json",
        tmp_path / "weights_only" / "model.safetensors": "no model_config.json or config.json beside",
        tmp_path / "nothing_here": "does not exist",
    }
    for path, words in cases.items():
        with pytest.raises(PretrainedError) as caught:
            lxmert.LxmertModel.from_pretrained(path)
        message = str(caught.value)
        assert "\n" not in message and str(path) in message and words in message, message
    with pytest.raises(ValueError) as caught:  # sizes that do not fit the weights
        lxmert.LxmertModel.from_pretrained(tmp_path / "ours", intermediate_size=54)
    assert "\n" not in str(caught.value) and str(tmp_path / "ours") in str(caught.value)
    assert "shape mismatches" in str(caught.value)
    (tmp_path / "weights_only" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="config.json: not an LXMERT config .model_type is 'bert'"):
        lxmert.LxmertModel.from_pretrained(tmp_path / "weights_only")
    # with the config given, the bare weights file loads
    model = lxmert.LxmertModel.from_pretrained(tmp_path / "weights_only/model.safetensors", config=small_config())
    assert_state_equal(model, lxmert.LxmertModel.from_pretrained(tmp_path / "ours"))


HUB_ID = "no-such-org/no-such-lxmert"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and a working directory where the hub id is no path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def test_a_hub_id_without_huggingface_hub_is_one_line(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(PretrainedError) as caught:
        lxmert.LxmertForQuestionAnswering.from_pretrained(HUB_ID)
    message = str(caught.value)
    assert "\n" not in message and HUB_ID in message and "pip install huggingface_hub" in message


def test_an_unreachable_hub_is_one_line(offline, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError(f"cannot reach the Hub for {repo_id}\nand nothing in the cache\nthird line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(PretrainedError) as caught:
        lxmert.LxmertForQuestionAnswering.from_pretrained(HUB_ID)
    message = str(caught.value)
    assert "\n" not in message and HUB_ID in message and "LocalEntryNotFoundError" in message


def test_a_hub_id_loads_what_huggingface_hub_downloads(offline, monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    torch.manual_seed(9)
    hf, directory = hf_directory(tmp_path, "LxmertForPreTraining", "bin")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: asked.append(repo_id) or directory)
    model = lxmert.LxmertForPreTraining.from_pretrained(HUB_ID)
    assert asked == [HUB_ID]
    inputs = random_inputs(hf.config, 2, 5, 4)
    with torch.no_grad():
        assert_close(model(**inputs).cross_relationship_score, hf(**inputs).cross_relationship_score, OUT_TOL)
