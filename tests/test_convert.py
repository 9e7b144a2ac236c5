"""lxmert.convert: the authors' and transformers' layouts, checkpoint files, and the command line.

The authors' layouts are synthesised from a (randomised) transformers model, the way airsplay/lxmert saved
them: pre-training `module.bert.*` (DataParallel), fine-tuned `lxrt_encoder.model.bert.*` + `logit_fc.*`.
Every conversion is checked twice: key by key against the transformers route, and by running the converted
model against transformers' own forward (or a hand-written NLVR2 head) in eval mode.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import norm_rel_err as rel_err
from conftest import perturb_ as randomise

import lxmert
from engine import convert_checkpoint as convert_cli
from engine.checkpoint import write_state_dict
from lxmert import convert

transformers = pytest.importorskip("transformers")

REL = 1e-5
HEADS = 2
MARKER = {"path": None}  # where the malicious pickle below would write, if it ever ran


def hf_config(**overrides):
    values = dict(
        vocab_size=40,
        hidden_size=16,
        num_attention_heads=HEADS,
        intermediate_size=20,
        max_position_embeddings=24,
        l_layers=2,
        r_layers=1,
        x_layers=3,
        visual_feat_dim=12,
        num_qa_labels=6,
        num_object_labels=7,
        num_attr_labels=5,
    )
    values.update(overrides)
    return transformers.LxmertConfig(**values)


@pytest.fixture(scope="module")
def hf_pre():
    torch.manual_seed(0)
    return randomise(transformers.LxmertForPreTraining(hf_config()), seed=1)


@pytest.fixture(scope="module")
def hf_qa():
    torch.manual_seed(2)
    return randomise(transformers.LxmertForQuestionAnswering(hf_config(num_qa_labels=5)), seed=3)


def inputs(seed=0, b=2, l=7, r=5, feat=12, images=None):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 40, (b, l), generator=g)
    attention_mask = torch.ones(b, l, dtype=torch.long)
    attention_mask[-1, 4:] = 0  # padded text
    input_ids[-1, 4:] = 0
    shape = (b, r) if images is None else (b, images, r)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        visual_feats=torch.randn(*shape, feat, generator=g),
        visual_pos=torch.rand(*shape, 4, generator=g),
    )


def authors_pretraining(hf_state) -> dict:
    """airsplay/lxmert's pre-training snapshot: BERT-style `bert.` backbone, DataParallel `module.` prefix."""
    return {"module." + re.sub(r"^lxmert\.", "bert.", k): v for k, v in hf_state.items()}


def authors_finetuned(hf_state, backbone_prefix="lxrt_encoder.model.bert.") -> dict:
    """airsplay/lxmert's fine-tuned snapshot (VQA / GQA / NLVR2): `lxrt_encoder.model.bert.` + `logit_fc.`."""
    out = {}
    for k, v in hf_state.items():
        k = re.sub(r"^lxmert\.", backbone_prefix, k)
        out[re.sub(r"^answer_head\.logit_fc\.", "logit_fc.", k)] = v
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def ours_pretraining(hf_model, state, layout="auto") -> lxmert.LxmertForPreTraining:
    model = lxmert.LxmertForPreTraining(lxmert.LxmertConfig.from_hf(hf_model.config)).eval()
    convert.load_into(model, state, layout)
    return model


def assert_same_pretraining_outputs(ours, hf_model, seed=0):
    x = inputs(seed)
    with torch.no_grad():
        got, want = ours(**x), hf_model(**x)
    for name in ("prediction_logits", "cross_relationship_score", "question_answering_score"):
        assert rel_err(getattr(got, name), getattr(want, name)) <= REL, name


# ----------------------------------------------------------------------------------------------------------
# layouts


def test_hf_round_trip_is_exact(hf_pre):
    hf_state = hf_pre.state_dict()
    ours = convert.from_hf_state_dict(hf_state)
    assert set(ours) == set(lxmert.LxmertForPreTraining(lxmert.LxmertConfig.from_hf(hf_pre.config)).state_dict())
    assert_same_state(convert.to_hf_state_dict(ours), dict(hf_state))


def test_authors_pretraining_snapshot(hf_pre):
    hf_state = hf_pre.state_dict()
    authors = authors_pretraining(hf_state)
    assert all(k.startswith("module.") for k in authors)
    assert any(k.startswith("module.bert.encoder.x_layers.") for k in authors)
    assert_same_state(convert.from_authors_state_dict(authors), convert.from_hf_state_dict(hf_state))
    assert convert.detect_layout(authors) == "authors"
    assert convert.detect_layout({k[len("module.") :]: v for k, v in authors.items()}) == "authors"  # single GPU
    assert convert.detect_layout(hf_state) == "hf"
    assert convert.detect_layout(convert.from_hf_state_dict(hf_state)) == "ours"
    # and the converted weights compute what transformers computes
    assert_same_pretraining_outputs(ours_pretraining(hf_pre, authors), hf_pre)


def test_old_style_layernorm_names(hf_pre):
    hf_state = hf_pre.state_dict()
    authors = authors_pretraining(hf_state)
    renamed = {}
    for k, v in authors.items():
        if re.search(r"(LayerNorm|layer_norm)\.(weight|bias)$", k):
            k = re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta", k))
        renamed[k] = v
    assert sum(k.endswith(".gamma") for k in renamed) == sum(k.endswith(".beta") for k in renamed) > 10
    assert_same_state(convert.from_authors_state_dict(renamed), convert.from_hf_state_dict(hf_state))


@pytest.mark.parametrize("backbone_prefix", ["lxrt_encoder.model.bert.", "lxrt_encoder.model.module.bert."])
def test_authors_vqa_snapshot(hf_qa, backbone_prefix):
    hf_state = hf_qa.state_dict()
    authors = authors_finetuned(hf_state, backbone_prefix)
    head_keys = {k for k in authors if k.startswith("logit_fc.")}
    assert head_keys == {f"logit_fc.{i}.{p}" for i in (0, 2, 3) for p in ("weight", "bias")}
    assert convert.detect_layout(authors) == "authors"
    ours_state = convert.from_authors_state_dict(authors)
    assert_same_state(ours_state, convert.from_hf_state_dict(hf_state))

    config = convert.infer_config(ours_state, num_attention_heads=HEADS)
    assert config.num_qa_labels == 5 and not config.task_obj_predict
    model = lxmert.LxmertForQuestionAnswering(config).eval()
    convert.load_into(model, authors)  # layout "auto"
    x = inputs(seed=4)
    with torch.no_grad():
        got, want = model(**x).question_answering_score, hf_qa(**x).question_answering_score
    assert got.shape == (2, 5) and rel_err(got, want) <= REL


def test_authors_nlvr2_snapshot(hf_pre):
    """NLVR2 head: logit_fc on the 2H concatenation of two pooled vectors, 2 outputs."""
    h = hf_pre.config.hidden_size
    g = torch.Generator().manual_seed(5)
    backbone = {k: v for k, v in hf_pre.state_dict().items() if k.startswith("lxmert.")}
    head = {  # the authors' NLVR2 logit_fc: Linear(2H, 2H), GeLU, LayerNorm(2H), Linear(2H, 2)
        "logit_fc.0.weight": torch.randn(2 * h, 2 * h, generator=g) * 0.2,
        "logit_fc.0.bias": torch.randn(2 * h, generator=g),
        "logit_fc.2.weight": 1 + 0.1 * torch.randn(2 * h, generator=g),
        "logit_fc.2.bias": torch.randn(2 * h, generator=g),
        "logit_fc.3.weight": torch.randn(2, 2 * h, generator=g) * 0.2,
        "logit_fc.3.bias": torch.randn(2, generator=g),
    }
    snapshot = {**authors_finetuned(backbone), **head}
    assert convert.detect_layout(snapshot) == "authors"
    model = lxmert.LxmertForNLVR2(lxmert.LxmertConfig.from_hf(hf_pre.config)).eval()
    convert.load_into(model, snapshot)
    assert torch.equal(model.answer_head.fc1.weight, head["logit_fc.0.weight"])
    assert torch.equal(model.answer_head.fc2.bias, head["logit_fc.3.bias"])

    x = inputs(seed=6, images=2)
    with torch.no_grad():
        logits = model(**x).logits
        pooled = [
            hf_pre.lxmert(
                input_ids=x["input_ids"],
                attention_mask=x["attention_mask"],
                visual_feats=x["visual_feats"][:, i],
                visual_pos=x["visual_pos"][:, i],
            ).pooled_output.double()
            for i in range(2)
        ]
    z = torch.cat(pooled, dim=-1) @ head["logit_fc.0.weight"].double().T + head["logit_fc.0.bias"].double()
    z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-12)
    z = z * head["logit_fc.2.weight"].double() + head["logit_fc.2.bias"].double()
    want = z @ head["logit_fc.3.weight"].double().T + head["logit_fc.3.bias"].double()
    assert logits.shape == (2, 2) and rel_err(logits, want) <= REL


def test_bare_backbone_state_dict(hf_pre):
    """A transformers LxmertModel state dict (no `lxmert.` prefix) converts to a bare LxmertModel's."""
    hf_backbone = hf_pre.lxmert.state_dict()
    assert convert.detect_layout(hf_backbone) == "hf"
    ours = convert.from_hf_state_dict(hf_backbone)
    model = lxmert.LxmertModel(lxmert.LxmertConfig.from_hf(hf_pre.config)).eval()
    assert set(ours) == set(model.state_dict())
    convert.load_into(model, hf_backbone)
    x = inputs(seed=7)
    with torch.no_grad():
        got, want = model(**x), hf_pre.lxmert(**x)
    assert rel_err(got.pooled_output, want.pooled_output) <= REL
    assert rel_err(got.vision_output, want.vision_output) <= REL
    assert_same_state(convert.to_hf_state_dict(ours), dict(hf_backbone))


def test_layout_errors(hf_pre):
    with pytest.raises(ValueError, match="layout"):
        convert.detect_layout({"some.other.model.weight": torch.zeros(1)})
    model = lxmert.LxmertForPreTraining(lxmert.LxmertConfig.from_hf(hf_pre.config))
    state = convert.from_hf_state_dict(hf_pre.state_dict())
    state.pop("match_head.bias")
    state["answer_head.fc2.bias"] = torch.zeros(3)
    with pytest.raises(KeyError, match=r"match_head\.bias[\s\S]*answer_head\.fc2\.bias"):
        convert.load_into(model, state)


# ----------------------------------------------------------------------------------------------------------
# infer_config


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"task_qa": False, "visual_attr_loss": False},
        {"task_obj_predict": False},
        {"l_layers": 0, "x_layers": 1, "r_layers": 3, "visual_feat_loss": False},
    ],
)
def test_infer_config(overrides):
    values = dict(
        vocab_size=43,
        hidden_size=12,
        num_attention_heads=3,
        intermediate_size=20,
        max_position_embeddings=17,
        type_vocab_size=3,
        l_layers=2,
        r_layers=1,
        x_layers=3,
        visual_feat_dim=11,
        visual_pos_dim=5,
        num_qa_labels=9,
        num_object_labels=7,
        num_attr_labels=5,
    )
    values.update(overrides)
    config = lxmert.LxmertConfig(**values)
    state = lxmert.LxmertForPreTraining(config).state_dict()
    inferred = convert.infer_config(state, num_attention_heads=3)
    expected = config.to_dict()
    defaults = lxmert.LxmertConfig()
    if not config.task_obj_predict:  # no object head: no decoder is visible
        expected.update(visual_obj_loss=False, visual_attr_loss=False, visual_feat_loss=False)
    for flag, field in (("visual_obj_loss", "num_object_labels"), ("visual_attr_loss", "num_attr_labels")):
        if not expected[flag]:  # no decoder: its label count cannot be read, the default stays
            expected[field] = getattr(defaults, field)
    if not config.task_qa:
        expected["num_qa_labels"] = defaults.num_qa_labels
    assert inferred.to_dict() == expected
    rebuilt = lxmert.LxmertForPreTraining(inferred).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in state.items()}
    # a bare backbone too
    bare = convert.infer_config(lxmert.LxmertModel(config).state_dict(), num_attention_heads=3)
    sizes = ("hidden_size", "intermediate_size", "visual_feat_dim", "visual_pos_dim")
    for name in (*sizes, "l_layers", "r_layers", "x_layers"):
        assert getattr(bare, name) == getattr(config, name)


# ----------------------------------------------------------------------------------------------------------
# files


def small_ours_model(seed=0) -> lxmert.LxmertForPreTraining:
    torch.manual_seed(seed)
    config = lxmert.LxmertConfig(
        vocab_size=40,
        hidden_size=16,
        num_attention_heads=HEADS,
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
    return randomise(lxmert.LxmertForPreTraining(config), seed)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_write_read_round_trip(tmp_path, suffix):
    model = small_ours_model(seed=8)
    state = model.state_dict()
    assert state["mlm_head.decoder.weight"].data_ptr() == state["lxmert.embeddings.word.weight"].data_ptr()  # tied
    path = tmp_path / f"model{suffix}"
    write_state_dict(state, path)
    back = convert.read_state_dict(path)
    assert_same_state(back, dict(state))
    fresh = lxmert.LxmertForPreTraining(model.config).eval()
    convert.load_into(fresh, back)
    assert fresh.mlm_head.decoder.weight is fresh.lxmert.embeddings.word.weight  # still tied after loading
    x = inputs(seed=9)
    with torch.no_grad():
        assert torch.equal(fresh(**x).prediction_logits, model(**x).prediction_logits)
    # the transformers layout (tied decoder under two names, q/k/v split off one matrix) too
    hf_path = tmp_path / f"hf{suffix}"
    write_state_dict(convert.to_hf_state_dict(state), hf_path)
    assert_same_state(convert.read_state_dict(hf_path), convert.to_hf_state_dict(state))
    assert sorted(os.listdir(tmp_path)) == [f"hf{suffix}", f"model{suffix}"]  # no temp files left


def test_state_dict_wrapper_is_unwrapped(tmp_path):
    state = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3, "optimizer": {"lr": 1e-4}}, path)
    assert_same_state(convert.read_state_dict(path), state)


def _plant_marker(path):
    """What a malicious checkpoint would run on unpickling: leave a file behind."""
    Path(path).write_text("the pickle ran")
    return 0


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _plant_marker, (str(self.marker),)


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"layer.weight": torch.zeros(2), "extra": Payload(marker)}, path)
    # positive control: an unrestricted load does run the payload
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match=re.escape(str(path))):
        convert.read_state_dict(path)
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"layer.weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        convert.read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        convert.read_state_dict(tmp_path / "nowhere.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    write_state_dict({"w": torch.randn(64, 64), "b": torch.randn(64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        convert.read_state_dict(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_write_is_atomic(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"model{suffix}"
    old = {"w": torch.randn(8, 8)}
    write_state_dict(old, path)
    before = path.read_bytes()

    def crash_midway(_tensors, target, *args, **kwargs):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    if suffix == ".safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    else:
        monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_state_dict({"w": torch.randn(8, 8), "v": torch.randn(3)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()

    new = {"w": torch.randn(8, 8), "v": torch.randn(3)}
    write_state_dict(new, path)  # a write that succeeds replaces the file
    assert_same_state(convert.read_state_dict(path), new)
    assert os.listdir(tmp_path) == [path.name]


# ----------------------------------------------------------------------------------------------------------
# command line


@pytest.fixture(scope="module")
def authors_file(hf_pre, tmp_path_factory):
    path = tmp_path_factory.mktemp("authors") / "Epoch20_LXRT.pth"
    torch.save(authors_pretraining(hf_pre.state_dict()), path)
    return path


def test_cli_authors_to_hf_directory(authors_file, hf_pre, tmp_path, capsys):
    out_dir = tmp_path / "hf_model"
    heads = ["--num-attention-heads", str(HEADS)]  # the default, hidden / 64, does not fit hidden 16
    assert convert_cli.main([str(authors_file), str(out_dir), "--from", "authors", "--to", "hf", *heads]) == 0
    assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]
    assert "model.safetensors" in capsys.readouterr().out

    loaded, info = transformers.LxmertForPreTraining.from_pretrained(out_dir, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert len(info[kind]) == 0, (kind, info[kind])
    assert not info.get("error_msgs")
    loaded.eval()
    cfg = loaded.config
    assert (cfg.l_layers, cfg.r_layers, cfg.x_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 1, 3, 16, HEADS)
    assert (cfg.num_qa_labels, cfg.num_object_labels, cfg.num_attr_labels) == (6, 7, 5)
    assert_same_state(dict(loaded.state_dict()), dict(hf_pre.state_dict()))
    ours = ours_pretraining(hf_pre, convert.read_state_dict(authors_file), "authors")
    assert_same_pretraining_outputs(ours, loaded, seed=10)


def test_cli_authors_to_ours(authors_file, hf_pre, tmp_path, capsys):
    dst = tmp_path / "ours.safetensors"
    heads = ["--num-attention-heads", str(HEADS)]
    assert (
        convert_cli.main([str(authors_file), str(dst), "--from", "authors", "--to", "ours"]) == 0
    )  # a file: no config
    state = convert.read_state_dict(dst)
    assert convert.detect_layout(state) == "ours"
    assert_same_state(state, convert.from_authors_state_dict(convert.read_state_dict(authors_file)))
    config = convert.infer_config(state, num_attention_heads=HEADS)
    model = lxmert.LxmertForPreTraining(config).eval()
    convert.load_into(model, state)
    assert_same_pretraining_outputs(model, hf_pre, seed=11)

    # to a directory (layout detected): model_config.json + model.safetensors, the config loads back
    out_dir = tmp_path / "ours_dir"
    assert convert_cli.main([str(authors_file), str(out_dir), *heads]) == 0
    assert sorted(os.listdir(out_dir)) == ["model.safetensors", "model_config.json"]
    assert lxmert.LxmertConfig.from_dict(json.loads((out_dir / "model_config.json").read_text())) == config
    assert_same_state(convert.read_state_dict(out_dir / "model.safetensors"), state)

    # a directory needs the head count when hidden_size is not a multiple of 64: exit 2, one line, nothing written
    assert convert_cli.main([str(authors_file), str(tmp_path / "no_heads")]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    assert not (tmp_path / "no_heads").exists()


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """Our export of a model whose heads are not 64 wide (hidden 128, 4 heads of 32): model.safetensors +
    model_config.json, as engine.checkpoint.export_model writes them. hidden / 64 would say 2 heads."""
    from engine.checkpoint import export_model

    torch.manual_seed(5)
    hf = randomise(transformers.LxmertForPreTraining(hf_config(hidden_size=128, num_attention_heads=4)), seed=6)
    config = lxmert.LxmertConfig.from_hf(hf.config)
    out = tmp_path_factory.mktemp("wide")
    export_model(convert.from_hf_state_dict(hf.state_dict()), config, out)
    return out, hf


def test_cli_uses_the_config_beside_the_checkpoint(wide_heads, tmp_path):
    """`lxmert-convert model.safetensors out --to hf`: the heads come from model_config.json, not hidden / 64,
    and transformers computes what ours computes."""
    src, hf = wide_heads
    out = tmp_path / "hf"
    assert convert_cli.main([str(src / "model.safetensors"), str(out), "--to", "hf"]) == 0
    written = json.loads((out / "config.json").read_text())
    assert written["num_attention_heads"] == 4
    loaded = transformers.LxmertForPreTraining.from_pretrained(out).eval()
    ours = lxmert.LxmertForPreTraining(
        lxmert.LxmertConfig.from_dict(json.loads((src / "model_config.json").read_text()))
    )
    convert.load_into(ours.eval(), convert.read_state_dict(src / "model.safetensors"))
    assert_same_pretraining_outputs(ours, loaded, seed=12)
    assert_same_pretraining_outputs(ours, hf.eval(), seed=12)


def test_cli_refuses_to_guess_the_heads_and_a_config_that_does_not_fit(wide_heads, tmp_path, capsys):
    src, _ = wide_heads
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    assert convert_cli.main([str(bare / "weights.safetensors"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "--num-attention-heads" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # a config whose sizes are not the weights': named, nothing written
    wrong = json.loads((src / "model_config.json").read_text()) | {"intermediate_size": 99}
    (bare / "model_config.json").write_text(json.dumps(wrong))
    assert convert_cli.main([str(bare / "weights.safetensors"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "intermediate_size 99 (weights: 20)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # an explicit head count that contradicts the config
    assert convert_cli.main([str(src), str(tmp_path / "out"), "--num-attention-heads", "2"]) == 2
    assert "contradicts" in capsys.readouterr().err
    # a source that does not exist
    assert convert_cli.main([str(tmp_path / "nothing.safetensors"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reads_a_transformers_directory_both_ways(hf_pre, tmp_path):
    """save_pretrained's directory (config.json + model.safetensors) -> ours -> transformers again."""
    hf_dir = tmp_path / "hf_saved"
    hf_pre.save_pretrained(hf_dir)
    assert convert_cli.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    ours_config = lxmert.LxmertConfig.from_dict(json.loads((tmp_path / "ours/model_config.json").read_text()))
    assert ours_config.num_attention_heads == HEADS  # hidden 16: no guess could give it
    ours = lxmert.LxmertForPreTraining(ours_config).eval()
    convert.load_into(ours, convert.read_state_dict(tmp_path / "ours/model.safetensors"))
    assert_same_pretraining_outputs(ours, hf_pre.eval(), seed=13)
    assert convert_cli.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.LxmertForPreTraining.from_pretrained(tmp_path / "back").eval()
    assert_same_state(dict(back.state_dict()), dict(hf_pre.state_dict()))
