"""Checkpoints: atomic saves, a `latest` pointer, exact resume, and the consolidated model export.

Layout under <output_dir>/checkpoints/ (the same for both paths, so `resume="auto"` reads either):
    latest                 the tag of the newest complete checkpoint (one line; written atomically)
    step_00000100/         one checkpoint:
        plain path:        state.pt  {model, optimizer, scheduler, scaler, loader, step, rng, ...}
        DeepSpeed path:    DeepSpeed's own files (engine.save_checkpoint, client_state = loader, step, ...)
                           plus rng_rank<r>.pt, each rank's RNG states

The plain path writes into `step_XXXXXXXX.tmp/` and renames it into place only when every byte is on disk, then
moves `latest`: a crash mid-save leaves the previous checkpoint and pointer as they were (a stale .tmp is
removed by the next save). DeepSpeed's save writes `latest` itself after its files (ours, the RNG states, come
first). train.keep_checkpoints = N deletes all but the N newest complete checkpoints after each save (`prune`).

Resume is exact: the loader's position (engine/data/loaders.py: batches are keyed by (seed, epoch, step)), the
optimizer and schedule, the loss scaler, and torch (CPU and CUDA), numpy and Python RNG states are restored, so
a run killed after step k and resumed gives the losses of an uninterrupted run (bit-identical on CPU fp32).

The export: `write_state_dict` (safetensors, atomic and fsynced) and `export_model`, <dir>/model.safetensors +
model_config.json (+ transformers' layout in hf/). A run reaches all of these through engine/runtime.py only;
lxmert-convert (engine/convert_checkpoint.py) writes with write_state_dict too.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from engine.atomic import fsync_dir, write_file_atomic, write_text_atomic
from lxmert.config import LxmertConfig
from lxmert.convert import to_hf_state_dict

LATEST = "latest"
STATE_FILE = "state.pt"
_TAG = re.compile(r"step_(\d+)")


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from: torch CPU (dropout on CPU), CUDA, numpy, Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------- plain (no DeepSpeed)


def save_plain(output_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` (torch.save-able) as checkpoint `step`, atomically, and point `latest` at it."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag_of(step)
    tmp = root / f"{tag_of(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # a partial save of an earlier, crashed attempt
    tmp.mkdir()
    try:
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run re-saving): swap, never delete first
            old = root / f"{tag_of(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name + "\n")
    return final


def load_plain(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def is_complete(path: Path) -> bool:
    """A checkpoint directory that a save finished: ours has state.pt; DeepSpeed's has its model states."""
    if not path.is_dir() or path.suffix in (".tmp", ".old"):
        return False
    return (path / STATE_FILE).is_file() or any(path.glob("*model_states.pt"))


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_* directory under a checkpoints root, complete or not, oldest first."""
    return sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _TAG.fullmatch(p.name)))


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest complete step directory."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    found = [path for _, path in _step_dirs(root) if is_complete(path)]
    return found[-1] if found else None


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete the checkpoints older than the `keep` newest complete ones (never the one `latest` names);
    incomplete step directories older than those go too (a crashed save). Returns what was deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    steps = _step_dirs(checkpoint_root(output_dir))
    complete = [(step, p) for step, p in steps if is_complete(p)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep][0]
    protected = find_latest(output_dir)
    deleted = []
    for step, path in steps:
        if step < oldest_kept and path != protected:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """train.resume -> the checkpoint directory to load, or None to start afresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(output_dir)
    path = Path(resume)
    if path.is_dir() and not is_complete(path):  # a checkpoints/ root or an output_dir
        path = find_latest(path.parent if path.name == "checkpoints" else path) or path
    if not is_complete(path):
        raise FileNotFoundError(f"train.resume {resume}: no complete checkpoint there (\"auto\" resumes from "
                                "output_dir if it has one, \"none\" starts afresh)")
    return path


# -------------------------------------------------------------------------------------------- DeepSpeed


def save_deepspeed(engine: Any, output_dir: str | Path, step: int, client_state: dict[str, Any], rank: int) -> Path:
    """This rank's RNG states, then engine.save_checkpoint (every rank calls it: ZeRO shards are per rank),
    which moves `latest` after its files: a checkpoint that `latest` names has its RNG states."""
    root = checkpoint_root(output_dir)
    tag = tag_of(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    return root / tag


def load_deepspeed(engine: Any, path: Path, rank: int, module_only: bool = False) -> dict[str, Any]:
    """Model, optimizer, scheduler (and loss scaler) into the engine (module_only: the model's weights);
    returns the client state."""
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=module_only,
                                             load_optimizer_states=not module_only,
                                             load_lr_scheduler_states=not module_only)  # fmt: skip
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        client_state["rng"] = torch.load(rng_file, weights_only=False)
    return client_state


# ------------------------------------------------------------------------------------------------ export


def write_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write .safetensors (or a torch file for other suffixes) atomically: a crash never leaves half a file."""
    path = Path(path)
    # safetensors refuses tensors that share memory (the tied decoder, views of a fused qkv): store copies
    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        tensors[key] = value.clone().contiguous() if value.data_ptr() in seen or not value.is_contiguous() else value
        seen.add(value.data_ptr())
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        write_file_atomic(path, lambda name: save_file(tensors, name, metadata={"format": "pt"}))
    else:
        write_file_atomic(path, lambda name: torch.save(tensors, name))


def export_model(state: Mapping[str, torch.Tensor], config: LxmertConfig, output_dir: str | Path,
                 hf: bool = False) -> Path:  # fmt: skip
    """<output_dir>/model.safetensors in our layout (+ model_config.json of our fields); with hf=True also
    <output_dir>/hf/{model.safetensors, config.json} in transformers' layout."""
    output_dir = Path(output_dir)
    path = output_dir / "model.safetensors"
    write_state_dict(state, path)
    write_text_atomic(output_dir / "model_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    if hf:
        (output_dir / "hf").mkdir(parents=True, exist_ok=True)
        write_state_dict(to_hf_state_dict(state), output_dir / "hf" / "model.safetensors")
        write_text_atomic(output_dir / "hf" / "config.json", json.dumps(config.to_hf_dict(), indent=2) + "\n")
    return path
