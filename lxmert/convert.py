"""Checkpoint conversion between three layouts of the same weights.

  ours     this package's module names, Q/K/V fused into one `qkv` matrix per attention
  hf       transformers' LxmertForPreTraining / LxmertForQuestionAnswering / LxmertModel (`lxmert.`,
           `cls.`, `obj_predict_head.`, `answer_head.`), separate query/key/value
  authors  airsplay/lxmert snapshots: pre-training `bert.` (+ `module.` from DataParallel), fine-tuned
           `lxrt_encoder.model.bert.` + `logit_fc.`; module names otherwise as transformers'

Files are read with safetensors or torch.load(weights_only=True): a checkpoint never executes a pickle.
The command line is `lxmert-convert` (engine/convert_checkpoint.py).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import LxmertConfig

StateDict = dict[str, torch.Tensor]
QKV = ("query", "key", "value")


def _attention(hf_qkv: str, hf_out: str, ours: str) -> list[tuple[str, str]]:
    return [
        (f"{hf_qkv}.QKV", f"{ours}.qkv"),
        (f"{hf_out}.dense", f"{ours}.out"),
        (f"{hf_out}.LayerNorm", f"{ours}.norm"),
    ]


def _ffn(hf_up: str, hf_down: str, ours: str) -> list[tuple[str, str]]:
    return [
        (f"{hf_up}.dense", f"{ours}.up"),
        (f"{hf_down}.dense", f"{ours}.down"),
        (f"{hf_down}.LayerNorm", f"{ours}.norm"),
    ]


_BERT_LAYER = _attention("attention.self", "attention.output", "attention") + _ffn("intermediate", "output", "ffn")
_CROSS_LAYER = (
    _attention("visual_attention.att", "visual_attention.output", "cross_attention")
    + _attention("lang_self_att.self", "lang_self_att.output", "lang_attention")
    + _attention("visn_self_att.self", "visn_self_att.output", "vis_attention")
    + _ffn("lang_inter", "lang_output", "lang_ffn")
    + _ffn("visn_inter", "visn_output", "vis_ffn")
)

# (transformers' module path, ours); '#' stands for a layer index, 'QKV' for query/key/value (fused in ours).
_MODULES: list[tuple[str, str]] = [
    ("lxmert.embeddings.word_embeddings", "lxmert.embeddings.word"),
    ("lxmert.embeddings.position_embeddings", "lxmert.embeddings.position"),
    ("lxmert.embeddings.token_type_embeddings", "lxmert.embeddings.token_type"),
    ("lxmert.embeddings.LayerNorm", "lxmert.embeddings.norm"),
    ("lxmert.encoder.visn_fc.visn_fc", "lxmert.visual_embeddings.feat_proj"),
    ("lxmert.encoder.visn_fc.visn_layer_norm", "lxmert.visual_embeddings.feat_norm"),
    ("lxmert.encoder.visn_fc.box_fc", "lxmert.visual_embeddings.box_proj"),
    ("lxmert.encoder.visn_fc.box_layer_norm", "lxmert.visual_embeddings.box_norm"),
    *((f"lxmert.encoder.layer.#.{hf}", f"lxmert.lang_layers.#.{ours}") for hf, ours in _BERT_LAYER),
    *((f"lxmert.encoder.r_layers.#.{hf}", f"lxmert.region_layers.#.{ours}") for hf, ours in _BERT_LAYER),
    *((f"lxmert.encoder.x_layers.#.{hf}", f"lxmert.cross_layers.#.{ours}") for hf, ours in _CROSS_LAYER),
    ("lxmert.pooler.dense", "lxmert.pooler"),
    ("cls.predictions.transform.dense", "mlm_head.transform.dense"),
    ("cls.predictions.transform.LayerNorm", "mlm_head.transform.norm"),
    ("cls.predictions.decoder", "mlm_head.decoder"),
    ("cls.predictions", "mlm_head"),  # its output bias
    ("cls.seq_relationship", "match_head"),
    ("obj_predict_head.transform.dense", "obj_head.transform.dense"),
    ("obj_predict_head.transform.LayerNorm", "obj_head.transform.norm"),
    *((f"obj_predict_head.decoder_dict.{k}", f"obj_head.decoders.{k}") for k in ("obj", "attr", "feat")),
    ("answer_head.logit_fc.0", "answer_head.fc1"),
    ("answer_head.logit_fc.2", "answer_head.norm"),
    ("answer_head.logit_fc.3", "answer_head.fc2"),
]


def _pattern(path: str) -> re.Pattern:
    body = re.escape(path).replace(r"\#", r"(\d+)").replace("QKV", "(query|key|value)")
    return re.compile(f"^{body}\\.(weight|bias)$")


_RULES = [(_pattern(hf), _pattern(ours), hf, ours, hf.endswith("QKV")) for hf, ours in _MODULES]
_TIED = ("mlm_head.decoder.weight", "lxmert.embeddings.word.weight")


def _fill(template: str, numbers: list[str], part: str | None, leaf: str) -> str:
    for n in numbers:
        template = template.replace("#", n, 1)
    if part is not None:
        template = template.replace("QKV", part)
    return f"{template}.{leaf}"


def _as_full(state: Mapping[str, torch.Tensor], backbone_keys: tuple[str, ...]) -> tuple[StateDict, bool]:
    """A bare backbone (LxmertModel) state dict gets the 'lxmert.' prefix for conversion; report whether it did."""
    bare = not any(k.startswith("lxmert.") for k in state) and any(k.startswith(backbone_keys) for k in state)
    return ({f"lxmert.{k}": v for k, v in state.items()} if bare else dict(state)), bare


def _strip(state: StateDict, bare: bool) -> StateDict:
    return {k[len("lxmert.") :]: v for k, v in state.items()} if bare else state


def from_hf_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers' LXMERT state dict -> ours (Q/K/V concatenated into qkv)."""
    state, bare = _as_full(state, ("embeddings.", "encoder.", "pooler."))
    out: StateDict = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown = []
    for key, value in state.items():
        if key.endswith("position_ids"):  # a buffer older transformers versions saved
            continue
        for hf_re, _, _, ours, fused in _RULES:
            m = hf_re.match(key)
            if m is None:
                continue
            groups = list(m.groups())
            leaf = groups.pop()
            if fused:
                part = groups.pop()
                qkv_parts[_fill(ours, groups, None, leaf)][part] = value
            else:
                out[_fill(ours, groups, None, leaf)] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of transformers' LXMERT layout, e.g. {unknown[:5]}")
    for key, parts in qkv_parts.items():
        if set(parts) != set(QKV):
            raise KeyError(f"{key}: needs query, key and value; the checkpoint has only {sorted(parts)}")
        out[key] = torch.cat([parts[p] for p in QKV], dim=0)
    if "mlm_head.bias" in out and _TIED[0] not in out:  # tied weight saved once
        out[_TIED[0]] = out[_TIED[1]]
    return _strip(out, bare)


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Ours -> transformers' LXMERT state dict (qkv split into query, key, value)."""
    state, bare = _as_full(state, ("embeddings.", "visual_embeddings.", "lang_layers.", "pooler."))
    out: StateDict = {}
    unknown = []
    for key, value in state.items():
        for _, ours_re, hf, _, fused in _RULES:
            m = ours_re.match(key)
            if m is None:
                continue
            groups = list(m.groups())
            leaf = groups.pop()
            if fused:
                for part, chunk in zip(QKV, value.chunk(3, dim=0)):
                    out[_fill(hf, groups, part, leaf)] = chunk.clone()
            else:
                out[_fill(hf, groups, None, leaf)] = value
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of this package's layout, e.g. {unknown[:5]}")
    return _strip(out, bare)


def authors_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """airsplay/lxmert snapshot -> transformers' names (they kept the authors' module names)."""
    out: StateDict = {}
    for key, value in state.items():
        key = re.sub(r"(^|\.)module\.", r"\1", key)  # DataParallel wrappers, at any depth
        key = re.sub(r"^(lxrt_encoder\.model\.)?bert\.", "lxmert.", key)
        key = re.sub(r"^logit_fc\.", "answer_head.logit_fc.", key)  # fine-tuned VQA / GQA / NLVR2 head
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))  # old-style LayerNorm names
        out[key] = value
    return out


def from_authors_state_dict(state: Mapping[str, torch.Tensor]) -> StateDict:
    """airsplay/lxmert snapshot (pre-training or fine-tuned) -> ours."""
    return from_hf_state_dict(authors_to_hf_state_dict(state))


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(re.search(r"(^|\.)(lang_layers|cross_layers|visual_embeddings)\.", k) for k in keys):
        return "ours"
    if any(re.match(r"^(module\.|bert\.|lxrt_encoder\.|logit_fc\.)", k) for k in keys):
        return "authors"
    if any(re.search(r"(^|\.)encoder\.(layer|x_layers|r_layers|visn_fc)\.", k) for k in keys):
        return "hf"
    raise ValueError(f"cannot tell which LXMERT layout these {len(keys)} keys follow, e.g. {keys[:5]}")


def to_ours(state: Mapping[str, torch.Tensor], layout: str = "auto") -> StateDict:
    layout = detect_layout(state) if layout == "auto" else layout
    converters = {"ours": dict, "hf": from_hf_state_dict, "authors": from_authors_state_dict}
    if layout not in converters:
        raise ValueError(f"unknown layout {layout!r}; one of auto, {', '.join(converters)}")
    return converters[layout](state)


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a .safetensors file or a torch checkpoint (weights only; no pickle is executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return state


def state_dict_problems(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading where `expected` (a module's state dict) is: missing and unexpected keys,
    shape mismatches, each summarised with a few examples; [] when it fits."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    if extra:
        problems.append(f"{len(extra)} unexpected keys, e.g. {extra[:5]}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches, e.g. {wrong[:3]}")
    return problems


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], layout: str = "auto") -> None:
    """Load a checkpoint of any layout into one of this package's models, naming every mismatch."""
    state = to_ours(state, layout)
    expected = model.state_dict()
    if _TIED[0] in expected and _TIED[0] not in state and _TIED[1] in state:
        state[_TIED[0]] = state[_TIED[1]]
    if _TIED[0] in state and _TIED[1] in state and not torch.equal(state[_TIED[0]], state[_TIED[1]]):
        raise ValueError(
            f"{_TIED[0]} and {_TIED[1]} are one tied weight in LXMERT, but the checkpoint holds two different tensors"
        )
    problems = state_dict_problems(expected, state)
    if problems:
        raise KeyError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state)


def infer_config(state: Mapping[str, torch.Tensor], num_attention_heads: int | None = None) -> LxmertConfig:
    """Model sizes read off a state dict in our layout.

    The head count is not visible in the weights: by default it is hidden_size / 64 (BERT's and LXMERT's
    head width), and must be given for a hidden size that is not a multiple of 64.
    """
    state, _ = _as_full(state, ("embeddings.", "visual_embeddings."))

    def count(prefix: str) -> int:
        found = {int(m.group(1)) for k in state if (m := re.match(rf"^lxmert\.{prefix}\.(\d+)\.", k))}
        return max(found) + 1 if found else 0

    word = state["lxmert.embeddings.word.weight"]
    if num_attention_heads is None:
        if word.shape[1] % 64:
            raise ValueError(f"hidden size {word.shape[1]} is not a multiple of 64: give the number of attention heads")
        num_attention_heads = word.shape[1] // 64
    values = dict(
        vocab_size=word.shape[0],
        hidden_size=word.shape[1],
        num_attention_heads=num_attention_heads,
        max_position_embeddings=state["lxmert.embeddings.position.weight"].shape[0],
        type_vocab_size=state["lxmert.embeddings.token_type.weight"].shape[0],
        visual_feat_dim=state["lxmert.visual_embeddings.feat_proj.weight"].shape[1],
        visual_pos_dim=state["lxmert.visual_embeddings.box_proj.weight"].shape[1],
        l_layers=count("lang_layers"),
        r_layers=count("region_layers"),
        x_layers=count("cross_layers"),
    )
    ffn = next((v for k, v in state.items() if k.endswith("ffn.up.weight")), None)
    if ffn is not None:
        values["intermediate_size"] = ffn.shape[0]
    if "answer_head.fc2.weight" in state:
        values["num_qa_labels"] = state["answer_head.fc2.weight"].shape[0]
    for name, field in (("obj", "num_object_labels"), ("attr", "num_attr_labels")):
        if f"obj_head.decoders.{name}.weight" in state:
            values[field] = state[f"obj_head.decoders.{name}.weight"].shape[0]
    values["task_obj_predict"] = any(k.startswith("obj_head.") for k in state)
    values["task_qa"] = "answer_head.fc2.weight" in state
    for name in ("obj", "attr", "feat"):
        values[f"visual_{name}_loss"] = f"obj_head.decoders.{name}.weight" in state
    return LxmertConfig(**values)


if __name__ == "__main__":  # the command line moved to engine/ (lxmert/ is the model only)
    raise SystemExit(
        "python -m lxmert.convert is now `lxmert-convert` (engine/convert_checkpoint.py): "
        "lxmert-convert SRC DST [--from ...] [--to ...]"
    )
