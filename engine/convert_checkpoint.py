"""`lxmert-convert SRC DST`: a checkpoint from one LXMERT layout to another (lxmert/convert.py maps the names).

    lxmert-convert model_LXRT.pth out.safetensors --from authors         # the authors' weights, our layout
    lxmert-convert runs/pretrain/model.safetensors out_hf --to hf         # a directory transformers loads
    lxmert-convert hf_model_dir/ ours/                                    # transformers' directory -> ours

SRC is a weights file (.safetensors, or .pth / .bin / .pt read with weights_only: no pickle runs) or a model
directory (transformers': config.json + model.safetensors or pytorch_model.bin; ours: model_config.json +
model.safetensors). DST is a file (the weights only) or a directory: the weights and the config that fits them
(transformers' config.json for --to hf, model_config.json for ours).

The config is never guessed: it is the one beside SRC (model_config.json, else config.json; or --config),
checked against the weights' shapes. The head count is not visible in the weights, so without a config a
directory DST needs --num-attention-heads, except for the authors' layout, whose code fixes BERT-base's heads
of 64 (hidden_size / 64).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.atomic import write_text_atomic
from engine.checkpoint import write_state_dict
from lxmert.config import LxmertConfig
from lxmert.convert import StateDict, detect_layout, infer_config, read_state_dict, to_hf_state_dict, to_ours

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model_LXRT.pth")
CONFIG_FILES = ("model_config.json", "config.json")  # ours first: our export may sit beside an hf/ directory
# The sizes a config must share with the weights it describes (all of infer_config's but the head count).
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "visual_feat_dim",
    "visual_pos_dim",
    "l_layers",
    "r_layers",
    "x_layers",
    "num_object_labels",
    "num_attr_labels",
)  # (not num_qa_labels: a fine-tuned model's answer head has the task's)


class ConvertError(ValueError):
    """A conversion that cannot be done as asked: a missing file, a config that does not fit the weights."""


def weights_file(src: Path) -> Path:
    """SRC itself, or the weights file inside a model directory."""
    if src.is_dir():
        for name in WEIGHT_FILES:
            if (src / name).is_file():
                return src / name
        raise ConvertError(f"{src} is a directory without {' or '.join(WEIGHT_FILES)}")
    if not src.is_file():
        raise ConvertError(f"{src} does not exist")
    return src


def find_config(weights: Path, explicit: str | None) -> Path | None:
    if explicit:
        if not Path(explicit).is_file():
            raise ConvertError(f"--config {explicit} does not exist")
        return Path(explicit)
    return next((weights.parent / n for n in CONFIG_FILES if (weights.parent / n).is_file()), None)


def read_model_config(path: Path) -> LxmertConfig:
    """Our model_config.json or transformers' config.json."""
    try:
        return LxmertConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise ConvertError(f"{path}: not an LXMERT config ({error})") from None


def model_config(state: StateDict, layout: str, config_path: Path | None, heads: int | None) -> LxmertConfig:
    """The config of `state` (our layout): the file's, checked against the weights; or read off the weights with
    a head count the user or the layout states."""
    if config_path is not None:
        config = read_model_config(config_path)
        if heads is not None and heads != config.num_attention_heads:
            raise ConvertError(
                f"--num-attention-heads {heads} contradicts {config_path} "
                f"(num_attention_heads {config.num_attention_heads})"
            )
        seen = infer_config(state, num_attention_heads=config.num_attention_heads)
        wrong = [
            f"{name} {getattr(config, name)} (weights: {getattr(seen, name)})"
            for name in SHAPE_FIELDS
            if getattr(config, name) != getattr(seen, name) and _present(name, state)
        ]
        if wrong:
            raise ConvertError(f"{config_path} does not describe these weights: {', '.join(wrong)}")
        return config
    if heads is None and layout != "authors":
        raise ConvertError(
            "no model_config.json or config.json beside the checkpoint, and the head count is not "
            "in the weights: pass --config PATH or --num-attention-heads N"
        )
    try:
        return infer_config(state, num_attention_heads=heads)  # the authors' heads are 64 wide: hidden / 64
    except ValueError as error:
        raise ConvertError(f"{error} (--num-attention-heads N)") from None


def _present(field: str, state: StateDict) -> bool:
    """Whether the weights show `field` (a model without a QA head says nothing about num_qa_labels)."""
    needs = {"num_object_labels": "obj_head.decoders.obj.weight", "num_attr_labels": "obj_head.decoders.attr.weight"}
    key = needs.get(field)
    return key is None or key in state or f"lxmert.{key}" in state


def convert(
    src: str,
    dst: str,
    src_layout: str = "auto",
    dst_layout: str = "ours",
    config: str | None = None,
    heads: int | None = None,
) -> Path:
    """Convert; returns the weights file written."""
    weights = weights_file(Path(src))
    try:
        raw = read_state_dict(weights)
        layout = detect_layout(raw) if src_layout == "auto" else src_layout
        ours = to_ours(raw, layout)
    except (KeyError, ValueError) as error:
        raise ConvertError(f"{weights}: {error}") from None
    state = to_hf_state_dict(ours) if dst_layout == "hf" else ours
    out = Path(dst)
    if out.suffix in WEIGHT_SUFFIXES:
        write_state_dict(state, out)
        return out
    found = model_config(ours, layout, find_config(weights, config), heads)  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_state_dict(state, out / "model.safetensors")
    if dst_layout == "hf":
        write_text_atomic(out / "config.json", json.dumps(found.to_hf_dict(), indent=2) + "\n")
    else:
        write_text_atomic(out / "model_config.json", json.dumps(found.to_dict(), indent=2) + "\n")
    return out / "model.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lxmert-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a weights file (.safetensors, .pth, .bin, .pt) or a model directory")
    parser.add_argument("dst", help="a weights file, or a directory (weights + the config that fits them)")
    parser.add_argument("--from", dest="src_layout", default="auto", choices=("auto", "hf", "authors", "ours"))
    parser.add_argument("--to", dest="dst_layout", default="ours", choices=("ours", "hf"))
    parser.add_argument("--config", help="the model's config (default: model_config.json or config.json beside SRC)")
    parser.add_argument("--num-attention-heads", type=int, help="the head count, where no config is beside SRC")
    args = parser.parse_args(argv)
    try:
        path = convert(args.src, args.dst, args.src_layout, args.dst_layout, args.config, args.num_attention_heads)
    except ConvertError as error:
        print(f"lxmert-convert: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (layout {args.dst_layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
