"""`from_pretrained` / `save_pretrained` for the four models, as transformers names them.

from_pretrained(path, **config_overrides) reads
  ours          a directory with model_config.json + model.safetensors (what training exports, what
                save_pretrained writes)
  transformers  a directory with config.json + model.safetensors or pytorch_model.bin (save_pretrained's output)
  a file        a weights file (any layout lxmert.convert reads) with model_config.json or config.json beside it
  a hub id      "unc-nlp/lxmert-base-uncased": a string that is not a local path, fetched with huggingface_hub
Keywords override config fields. The backbone must fit; a head is taken from the checkpoint when it fits and is
otherwise this model's own init, which one logged line reports. A fine-tuning model (QA, NLVR2) never takes a head
from a pre-training checkpoint. Weights files are read with safetensors or torch.load(weights_only=True).

save_pretrained(path) writes our directory: model.safetensors then model_config.json, each atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from .config import LxmertConfig
from .convert import StateDict, load_into, read_state_dict, to_ours

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model_LXRT.pth")
CONFIG_FILES = ("model_config.json", "config.json")  # ours first: our export may sit beside transformers' files
PRETRAINING_HEADS = ("mlm_head.", "match_head.", "obj_head.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

M = TypeVar("M", bound="PretrainedMixin")


class PretrainedError(OSError):
    """A model that cannot be found where from_pretrained was pointed; the message is one line naming it."""


class PretrainedMixin:
    """from_pretrained / save_pretrained for an nn.Module with `config`, built as cls(config)."""

    config: LxmertConfig
    takes_pretraining_heads = False
    """Whether the heads of a pre-training checkpoint are this model's heads (LxmertForPreTraining only)."""

    @classmethod
    def from_pretrained(
        cls: type[M], path: str | os.PathLike, config: LxmertConfig | None = None, **overrides: Any
    ) -> M:
        """The model of `path` (module header), in eval mode as transformers returns it. `config` replaces the one
        beside the weights; keywords (config fields) override either."""
        weights, config_file = _locate(path, need_config=config is None)
        if config is None:
            config = read_config(config_file)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LxmertConfig)})
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained: {', '.join(unknown)} not LxmertConfig fields")
        config = dataclasses.replace(config, **overrides)
        try:
            state = to_ours(read_state_dict(weights))
        except KeyError as error:  # a key that fits no layout
            raise ValueError(f"{weights}: {error.args[0]}") from None
        state = _full(state)
        model = cls(config, **cls.checkpoint_kwargs(config, state, overrides))
        model.load_checkpoint_state(state, str(path))
        return model.eval()

    @classmethod
    def checkpoint_kwargs(cls, config: LxmertConfig, state: StateDict, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments besides the config that the checkpoint decides (none but for QA's answer count)."""
        return {}

    def load_checkpoint_state(self, state: StateDict, source: str) -> None:
        """Load `state` (our layout, with the `lxmert.` prefix): the backbone must fit, each head loads where it fits
        and keeps this model's init otherwise (one logged line names those)."""
        backbone = {k: v for k, v in state.items() if k.startswith("lxmert.")}
        if not backbone:
            raise ValueError(f"{source} holds no LXMERT backbone (lxmert.* weights)")
        if not hasattr(self, "lxmert"):  # the backbone itself
            _load(self, {k[len("lxmert.") :]: v for k, v in backbone.items()}, source)
            return
        own = self.state_dict()
        tied = {t.data_ptr() for k, t in own.items() if k.startswith("lxmert.")}
        pretraining = any(k.startswith(PRETRAINING_HEADS) for k in state)
        load, fresh = dict(backbone), []
        for name, _ in self.named_children():
            if name == "lxmert":
                continue
            theirs = {k: v for k, v in state.items() if k.startswith(f"{name}.")}
            mine = {k: v for k, v in own.items() if k.startswith(f"{name}.")}
            if pretraining and not self.takes_pretraining_heads:
                fresh.append((name, "the checkpoint is a pre-training one"))
            elif not theirs:
                fresh.append((name, "not in the checkpoint"))
            elif set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
                fresh.append((name, "its shapes differ from the checkpoint's"))
            else:
                load |= theirs
                continue
            # keep the init; a weight tied to the backbone (the MLM decoder) comes with the backbone
            load |= {k: v for k, v in mine.items() if v.data_ptr() not in tied}
        _load(self, load, source)
        if fresh:
            heads = "; ".join(f"{name} ({why})" for name, why in fresh)
            logger.warning("%s: backbone loaded from %s; newly initialised: %s", type(self).__name__, source, heads)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write `path`/model.safetensors (this model's state dict) and model_config.json; returns the directory."""
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        seen: set[int] = set()
        tensors = {}
        for key, value in self.state_dict().items():  # safetensors refuses shared memory (the tied decoder)
            value = value.detach().cpu()
            tensors[key] = (
                value.clone().contiguous() if value.data_ptr() in seen or not value.is_contiguous() else value
            )
            seen.add(value.data_ptr())
        _write_atomic(directory / WEIGHT_FILES[0], lambda name: save_file(tensors, name, metadata={"format": "pt"}))
        text = json.dumps(self.config.to_dict(), indent=2) + "\n"
        _write_atomic(directory / CONFIG_FILES[0], lambda name: Path(name).write_text(text, encoding="utf-8"))
        return directory


def read_config(path: Path) -> LxmertConfig:
    """Our model_config.json or transformers' config.json."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError("not a JSON object")
        if values.get("model_type", "lxmert") != "lxmert":
            raise ValueError(f"model_type is {values['model_type']!r}")
        return LxmertConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: not an LXMERT config ({error})") from None


def _locate(path: str | os.PathLike, need_config: bool) -> tuple[Path, Path | None]:
    """(weights file, config file) of a directory, a weights file or a hub id."""
    local = Path(path).expanduser()
    if not local.exists():
        if not _is_hub_id(str(path)):
            raise PretrainedError(f"{path} does not exist")
        local = _download(str(path))
        path = f"{path} ({local})"
    if local.is_dir():
        weights = next((local / n for n in WEIGHT_FILES if (local / n).is_file()), None)
        if weights is None:
            raise PretrainedError(f"{path} is a directory without {' or '.join(WEIGHT_FILES)}")
    else:
        weights = local
    config = next((weights.parent / n for n in CONFIG_FILES if (weights.parent / n).is_file()), None)
    if config is None and need_config:
        files = " or ".join(CONFIG_FILES)
        where = f"{path} has no {files}" if local.is_dir() else f"no {files} beside {path}"
        raise PretrainedError(f"{where}: pass config= to give the model's sizes")
    return weights, config


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".json", ".safetensors", ".bin"))


def _download(repo_id: str) -> Path:
    """The hub repository's config and weights, downloaded (or from huggingface_hub's cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(
            f"{repo_id} is not a local path, and huggingface_hub is not installed to download it: "
            "pip install huggingface_hub, or pass a local directory"
        ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[*CONFIG_FILES, *WEIGHT_FILES]))
    except Exception as error:  # huggingface_hub's network, HTTP and validation errors alike
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise PretrainedError(
            f"{repo_id} is not a local path, and the Hugging Face hub did not give it ({type(error).__name__}: "
            f"{first}): check the path or id, and the network"
        ) from error


def _load(model: torch.nn.Module, state: StateDict, source: str) -> None:
    try:
        load_into(model, state, layout="ours")
    except KeyError as error:  # the backbone does not fit: the message names the keys and shapes
        raise ValueError(f"{source}: {error.args[0]}") from None


def _full(state: StateDict) -> StateDict:
    """A bare backbone state dict (an LxmertModel's) under the `lxmert.` prefix the other models use."""
    if any(k.startswith("lxmert.") for k in state):
        return state
    return {f"lxmert.{k}": v for k, v in state.items()}


def _write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """write(name) fills a temporary file beside `path`, which is fsynced and renamed over it: a crash leaves the
    old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # open()'s mode, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
