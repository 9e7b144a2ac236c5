"""Checkpoints: complete only when their manifest says so, loaded without pickle, resumed from the newest one that
loads; and the consolidated model export.

Layout under <output_dir>/checkpoints/ (the same for both paths, so `resume="auto"` reads either):
    latest                 the tag of the newest checkpoint saved (one line, written atomically after it; for people
                           and tools: resume goes by the manifests, newest step first)
    step_00000100/         one checkpoint:
        manifest.json      written last: {"format": 1, "step", "path": "plain" | "deepspeed", "parts": {file name:
                           {"bytes", "sha256"}}}. A checkpoint is complete when its manifest is there and every part
                           it lists is present with that size; it loads when the parts also match their checksums.
        plain path:        model.safetensors (the model's state dict), state.json (the rest: optimizer, schedule,
                           scaler, RNG states, the loop's and the task's state) and state.safetensors (the tensors
                           state.json names: the optimizer's moments, ...)
        DeepSpeed path:    DeepSpeed's own files (engine.save_checkpoint; the client state is in its model states)
                           plus rng_rank<r>.json, each rank's RNG states
    step_00000100.tmp/     a save in progress: renamed to step_00000100/ once its manifest is on disk

A save (either path) writes every part into step_X.tmp/, fsynced, then manifest.json (atomically), renames the
directory into place and moves `latest`. A crash at any point leaves the earlier checkpoints as they were, plus at
most a .tmp directory (removed by the next save of that step, or by prune). Under DeepSpeed every rank hashes the
files it wrote (our checkpoint engine records them, below) and rank 0 writes the manifest once all are done. A write
that fails on one rank (a full disk on one node) fails the save on every rank, with that rank's OSError: the writer
keeps the error and writes nothing more, so the rank still reaches DeepSpeed's own barriers and the ranks' exchange
of what they wrote, which carries it; no manifest is written and no rank waits for one that gave up.
train.keep_checkpoints = N deletes all but the N newest complete checkpoints after each save (`prune`).

Where a run resumes (resolve_resume; engine/runtime.resume_point): the step directories newest first. One that is
not complete or does not match its checksums is skipped with one line saying which and why, and the next older one
is tried. None left: a fresh start if none of them ever had a manifest (the first save was killed); else a
CheckpointError naming the damaged file (a run that had checkpoints never silently starts over).

Nothing loaded runs a pickle. Our files are safetensors and JSON (a tensor in JSON is {"__tensor__": its name in
the .safetensors file}; tuples and dicts with non-string keys are tagged too, so state dicts round-trip exactly).
DeepSpeed's files are torch pickles: its checkpoint engine is swapped for ours (install_checkpoint_engine, on the
first save or load), which loads them with torch.load(weights_only=True) and an explicit allow-list of the classes
DeepSpeed puts in them (deepspeed_safe_globals), and getattr only as enum_member_by_name (a member of one of those
enum classes by its name, as some Pythons pickle enums): a file that names anything else is refused, by name, and
runs nothing. So a checkpoint written under one supported Python (3.10-3.13, distributions' builds included) loads
under another. Checkpoints written before manifests (a state.pt, or DeepSpeed's files with rng_rank<r>.pt) are not
loaded, since that would need pickle: resume skips them with a message saying so (start those runs afresh, or load
their weights with lxmert-convert, which reads .pt files with weights_only).

Resume is exact: the loader's position (engine/data/loaders.py: batches are keyed by (seed, epoch, step)), the
optimizer and schedule, the loss scaler, and torch (CPU and CUDA), numpy and Python RNG states are restored, so
a run killed anywhere and resumed gives the losses and weights of an uninterrupted run (bit-identical on CPU fp32;
tests/test_faults_checkpoint.py kills runs at random points, in steps and in saves, until they finish). A DeepSpeed
checkpoint written by another number of ranks (saved_world_size: its rng_rank<r>.json files) is resharded on load by
engine/elastic.py (Runtime.load decides).

Kill points (engine.atomic.kill_point, for those tests): "checkpoint.part" after each part a process writes,
"checkpoint.manifest" after the manifest, "checkpoint.renamed" after the rename (before `latest` moves).

The export: `write_state_dict` (safetensors, atomic and fsynced) and `export_model`, <dir>/model.safetensors +
model_config.json (+ transformers' layout in hf/). A run reaches all of these through engine/runtime.py only;
lxmert-convert (engine/convert_checkpoint.py) writes with write_state_dict too.
"""

from __future__ import annotations

import enum
import errno
import functools
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.atomic import file_sha256, fsync_dir, kill_point, write_file_atomic, write_text_atomic
from lxmert.config import LxmertConfig
from lxmert.convert import to_hf_state_dict

logger = logging.getLogger(__name__)
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 1  # the manifest's format: a reader refuses others
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
TENSORS_FILE = "state.safetensors"
STAGING = ".tmp"
RNG_FILE = "rng_rank{}.json"  # a DeepSpeed checkpoint's RNG states of one rank
LEGACY_FILES = ("state.pt", "rng_rank*.pt", "*model_states.pt")  # what checkpoints held before manifests
_TAG = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"step_(\d+)\.(tmp|old)")


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or resumed from; the message is one line naming the file and why."""


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from: torch CPU (dropout on CPU), CUDA, numpy, Python; as JSON
    values (lists of ints), exactly."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "python": [version, list(internal), python_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ------------------------------------------------------------------------ state without pickle: JSON + tensors

_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = (_TENSOR, _TUPLE, _ITEMS)  # a one-key dict with one of these keys is a tagged value


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON values; each tensor goes into `tensors` under its place in the tree (`name`)."""
    if isinstance(value, torch.Tensor):
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _MARKERS):
            return {k: _encode(v, f"{name}/{k}" if name else k, tensors) for k, v in value.items()}
        return {
            _ITEMS: [[_encode(k, f"{name}/key", tensors), _encode(v, f"{name}/{k}", tensors)] for k, v in value.items()]
        }
    raise CheckpointError(
        f"{name or 'the state'}: a {type(value).__name__} cannot be stored in a checkpoint "
        "without pickle (tensors, numbers, strings, lists, tuples and dicts can)"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor], file: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, file) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _MARKERS:
        ((marker, inner),) = value.items()
        if marker == _TENSOR:
            if inner not in tensors:
                raise CheckpointError(f"{file}: names the tensor {inner!r}, which {TENSORS_FILE} does not hold")
            return tensors[inner]
        if marker == _TUPLE:
            return tuple(_decode(v, tensors, file) for v in inner)
        return {_hashable(_decode(k, tensors, file)): _decode(v, tensors, file) for k, v in inner}
    return {k: _decode(v, tensors, file) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{file}: not readable as JSON ({_one_line(error)})") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file}: not readable as safetensors ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ------------------------------------------------------------------------------------- parts and manifests


def _part(file: Path) -> dict[str, Any]:
    """A part's manifest entry (its size and checksum), once it is on disk."""
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": file.stat().st_size, "sha256": file_sha256(file)}


def _write_manifest(directory: Path, step: int, path: str, parts: dict[str, dict[str, Any]]) -> None:
    manifest = {"format": FORMAT, "step": step, "path": path, "parts": dict(sorted(parts.items()))}
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    kill_point("checkpoint.manifest")


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest, checked for its form (CheckpointError naming the file otherwise)."""
    file = path / MANIFEST
    manifest = _read_json(file)
    parts = manifest.get("parts") if isinstance(manifest, dict) else None
    if not isinstance(parts, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a format-{FORMAT} checkpoint manifest")
    for name, entry in parts.items():
        if Path(name).name != name or name in (".", "..", MANIFEST):
            raise CheckpointError(f"{file}: lists {name!r}, which is not a file of the checkpoint directory")
        if not (
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{file}: the entry of {name} has no size and checksum")
    return manifest


def _stage(root: Path, step: int) -> Path:
    """An empty staging directory for checkpoint `step` (a stale one, from a killed save, is removed)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{tag_of(step)}{STAGING}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _install(staging: Path, final: Path) -> None:
    """Rename the finished staging directory into place (swapping out a checkpoint of the same step), then
    point `latest` at it."""
    root = final.parent
    fsync_dir(staging)
    if final.exists():  # the same step saved again (after a resume from an older one): swap, never delete first
        old = root / f"{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    fsync_dir(root)
    kill_point("checkpoint.renamed")
    write_text_atomic(root / LATEST, final.name + "\n")


# ----------------------------------------------------------------------------------- plain (no DeepSpeed)


def save_plain(output_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as checkpoint `step`: state["model"] (a state dict) as model.safetensors, the rest as
    state.json + state.safetensors, then the manifest; atomically (module docstring)."""
    root = checkpoint_root(output_dir)
    staging = _stage(root, step)
    try:
        rest = dict(state)
        model = rest.pop("model", None)
        tensors: dict[str, torch.Tensor] = {}
        tree = _encode(rest, "", tensors)
        parts = {}
        if model is not None:
            write_state_dict(model, staging / MODEL_FILE)
            parts[MODEL_FILE] = _part(staging / MODEL_FILE)
            kill_point("checkpoint.part")
        write_state_dict(tensors, staging / TENSORS_FILE)
        parts[TENSORS_FILE] = _part(staging / TENSORS_FILE)
        kill_point("checkpoint.part")
        write_text_atomic(staging / STATE_FILE, json.dumps(tree) + "\n")
        parts[STATE_FILE] = _part(staging / STATE_FILE)
        kill_point("checkpoint.part")
        _write_manifest(staging, step, "plain", parts)
        final = root / tag_of(step)
        _install(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_plain(path: str | Path) -> dict[str, Any]:
    """The state save_plain wrote (state["model"]: the model's state dict); CheckpointError naming the file when
    the checkpoint is incomplete or a part does not parse. (resolve_resume has verified the checksums.)"""
    path = Path(path)
    reason = problem(path)
    if reason is not None:
        raise CheckpointError(f"{path}: {reason}")
    parts = read_manifest(path)["parts"]
    if STATE_FILE not in parts or TENSORS_FILE not in parts:
        raise CheckpointError(
            f"{path / MANIFEST}: lists no {STATE_FILE} and {TENSORS_FILE}: not a checkpoint of the plain path"
        )
    tree, tensors = _read_json(path / STATE_FILE), _read_tensors(path / TENSORS_FILE)
    try:
        state = _decode(tree, tensors, path / STATE_FILE)
    except (TypeError, ValueError) as error:  # a tagged value of the wrong shape
        raise CheckpointError(f"{path / STATE_FILE}: not a checkpoint's state ({_one_line(error)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: holds no state dict")
    if MODEL_FILE in parts:
        state["model"] = _read_tensors(path / MODEL_FILE)
    return state


# ------------------------------------------------------------------------------------- which checkpoint


def _inspect(path: Path) -> tuple[str | None, bool]:
    """(why `path` is not a complete checkpoint, or None; whether it has a manifest, i.e. was complete once)."""
    if not path.is_dir():
        return "not a directory", False
    if not (path / MANIFEST).is_file():
        legacy = sorted(p.name for pattern in LEGACY_FILES for p in path.glob(pattern))
        if legacy:
            return (
                f"no {MANIFEST}: a save that did not finish, or a checkpoint from before manifests ({legacy[0]}), "
                "which is not loaded because that would need pickle"
            ), False
        return f"no {MANIFEST}: a save that did not finish", False
    try:
        parts = read_manifest(path)["parts"]
    except CheckpointError as error:
        return str(error).removeprefix(f"{path}/"), True
    for name, entry in parts.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing (the manifest lists it)", True
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}", True
    return None, True


def problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint (None when it is: a manifest, every part present at its size)."""
    return _inspect(Path(path))[0]


def is_complete(path: str | Path) -> bool:
    return _inspect(Path(path))[0] is None


def verify(path: str | Path) -> None:
    """CheckpointError naming the first part whose checksum is not the manifest's (reads every byte)."""
    path = Path(path)
    for name, entry in read_manifest(path)["parts"].items():
        if file_sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"{path / name}: its checksum is not the manifest's (changed after the save)")


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_* directory under a checkpoints root, complete or not, oldest first."""
    return sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _TAG.fullmatch(p.name)))


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (checksums unread: resolve_resume reads them)."""
    found = [path for _, path in _step_dirs(checkpoint_root(output_dir)) if is_complete(path)]
    return found[-1] if found else None


def newest_loadable(output_dir: str | Path, report: Callable[[str], Any] = logger.info) -> Path | None:
    """The newest complete checkpoint whose parts match their checksums; `report` gets one line for each newer
    one skipped. None when there is none and none had a manifest; CheckpointError when one had (module docstring)."""
    root = checkpoint_root(output_dir)
    damaged = None  # the newest checkpoint that had a manifest but does not load: the file and why
    for _, path in reversed(_step_dirs(root)):
        reason, had_manifest = _inspect(path)
        if reason is None:
            try:
                verify(path)
                return path
            except CheckpointError as error:
                reason = str(error).removeprefix(f"{path}/")
        report(f"resume: skipped {path}: {reason}")
        if had_manifest and damaged is None:
            damaged = f"{path}/{reason}"  # such a reason starts with the name of the part (or the manifest)
    if damaged is not None:
        raise CheckpointError(
            f"{damaged}; no older checkpoint in {root} loads (train.resume=none starts afresh, "
            "train.resume=<path> names one)"
        )
    return None


def prune(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete the checkpoints older than the `keep` newest complete ones (never the newest, nor the one `latest`
    names); incomplete step directories and leftover .tmp / .old ones older than those go too. Returns what was
    deleted."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = checkpoint_root(output_dir)
    steps = _step_dirs(root)
    complete = [(step, p) for step, p in steps if is_complete(p)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[-keep][0]
    protected = {complete[-1][1]}
    if (root / LATEST).is_file():
        protected.add(root / (root / LATEST).read_text().strip())
    leftovers = [(int(m.group(1)), p) for p in root.glob("step_*") if (m := _LEFTOVER.fullmatch(p.name))]
    deleted = []
    for step, path in sorted(steps + leftovers):
        if step < oldest_kept and path not in protected:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


def resolve_resume(resume: str, output_dir: str | Path, report: Callable[[str], Any] = logger.info) -> Path | None:
    """train.resume -> the checkpoint directory to load, or None to start afresh. "auto": newest_loadable in
    output_dir; a path: that checkpoint (which must load), or the newest loadable one of a run directory / its
    checkpoints/. FileNotFoundError or CheckpointError, one line naming the file, otherwise."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_loadable(output_dir, report)
    path = Path(resume)
    missing = FileNotFoundError(
        f'train.resume {resume}: no complete checkpoint there ("auto" resumes from '
        'output_dir if it has one, "none" starts afresh)'
    )
    if not path.exists():
        raise missing
    if (path / MANIFEST).exists() or _TAG.fullmatch(path.name):  # one checkpoint: it must load
        reason = problem(path)
        if reason is not None:
            raise CheckpointError(f"train.resume {resume}: not a checkpoint that loads: {reason}")
        verify(path)
        return path
    found = newest_loadable(path.parent if path.name == "checkpoints" else path, report)  # a run or its checkpoints/
    if found is None:
        raise missing
    return found


# -------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_safe_globals() -> list[Any]:
    """What DeepSpeed 0.19's checkpoint files hold besides tensors and containers: the ZeRO optimizers pickle
    their loss scaler object and stage enum, and the fragment addresses of param_slice_mappings. Listed from
    torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3, fp32 / bf16 / fp16, with and without
    offload (tests/test_faults_checkpoint.py checks the list is still enough)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def enum_member_by_name(cls: Any, name: Any) -> enum.Enum:
    """What `getattr` may do in a checkpoint: give a member of an allow-listed enum class by its name.

    Some Pythons pickle an enum member as getattr(ZeroStageEnum, 'gradients') (Debian 12's 3.11.2 does; 3.11.7,
    3.12 and 3.13 pickle it by value, ZeroStageEnum(2)), so a checkpoint written there names builtins.getattr.
    The loader maps that name to this function instead: any other class, a class off the allow-list, an object
    that is not a class, or a name that is not one of the members is refused (an UnpicklingError) and nothing is
    looked up."""
    enums = [c for c in deepspeed_safe_globals() if isinstance(c, type) and issubclass(c, enum.Enum)]
    if any(cls is c for c in enums) and isinstance(name, str) and name in cls.__members__:
        return cls.__members__[name]
    what = f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else f"a {type(cls).__name__}"
    raise pickle.UnpicklingError(f"GLOBAL getattr({what}, {name!r}) is not a member of an allow-listed enum class")


def load_deepspeed_file(path: str | Path, map_location: Any = None) -> Any:
    """One of DeepSpeed's checkpoint files, with torch.load(weights_only=True) and deepspeed_safe_globals (plus
    enum_member_by_name for getattr): no pickled code runs. CheckpointError naming the file when it needs anything
    else or does not parse."""
    allowed = [*deepspeed_safe_globals(), (enum_member_by_name, "builtins.getattr")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message: several paragraphs, the global in one of them
        found = re.search(r"GLOBAL (getattr\(.*?\)(?= is not)|[\w.]+)", str(error))
        lines = [
            line.strip()
            for line in str(error).splitlines()
            if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))
        ]
        what = f"it names {found.group(1)}" if found else lines[0] if lines else _one_line(error)
        raise CheckpointError(
            f"{path}: refused: {what}, which is not on the allow-list of what a checkpoint may "
            "hold (loading it could run code)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: not readable as a torch file ({_one_line(error)})") from None


@functools.cache
def _checkpoint_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class ManifestCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save writer, every file fsynced and recorded for the manifest; its reader
        load_deepspeed_file (weights_only, the allow-list)."""

        def __init__(self, zipfile_serialization: bool) -> None:
            super().__init__(None)
            self.zipfile_serialization = zipfile_serialization
            self.written: list[Path] = []
            self.failure: OSError | None = None  # this save's first failed write: nothing is written after it

        def makedirs(self, path: str, exist_ok: bool = False) -> None:
            if self.failure is None:
                try:
                    super().makedirs(path, exist_ok=exist_ok)
                except OSError as error:
                    self.failure = _bare(error)

        def save(self, state_dict: Any, path: str) -> None:
            if self.failure is not None:
                return
            try:
                torch.save(state_dict, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            except (OSError, RuntimeError) as error:  # kept, not raised: the other ranks go on to DeepSpeed's barriers
                self.failure = (
                    _save_error(error, Path(path), state_dict) if isinstance(error, RuntimeError) else _bare(error)
                )
                return
            self.record(Path(path))

        def record(self, file: Path) -> None:
            self.written.append(file)
            kill_point("checkpoint.part")

        def load(self, path: str, map_location: Any = None) -> Any:
            return load_deepspeed_file(path, map_location)

    return ManifestCheckpointEngine


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _save_error(error: RuntimeError, path: Path, state: Any) -> OSError:
    """torch.save's RuntimeError as the OSError it stands for, naming the file: ENOSPC when the filesystem has no
    room for what it was writing (its writer says only "[enforce fail at inline_container.cc:...] unexpected pos
    ..."), else EIO with torch's message."""
    needed = _tensor_bytes(state)
    try:
        full = shutil.disk_usage(path.parent).free < needed
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"torch.save failed: {' '.join(str(error).split())[:300]}", str(path))


def install_checkpoint_engine(engine: Any) -> Any:
    """Swap the DeepSpeed engine's checkpoint engine (its default TorchCheckpointEngine) for ours; idempotent."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ours = _checkpoint_engine_class()
    current = engine.checkpoint_engine
    if isinstance(current, ours):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(
            f'DeepSpeed\'s {type(current).__name__} (the deepspeed.config "checkpoint" section) '
            "is not supported: checkpoints need the default writer (manifests, loading without "
            "pickle)"
        )
    engine.checkpoint_engine = ours(current.zipfile_serialization)
    return engine.checkpoint_engine


def _world() -> tuple[Any, int]:
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    return dist, dist.get_world_size() if ready else 1


def save_deepspeed(engine: Any, output_dir: str | Path, step: int, client_state: dict[str, Any], rank: int) -> Path:
    """Checkpoint `step` from every rank (ZeRO shards are per rank): this rank's RNG states, then
    engine.save_checkpoint into the staging directory; rank 0 writes the manifest of every rank's parts and
    renames it into place (module docstring)."""
    dist, world = _world()
    root = checkpoint_root(output_dir)
    writer = install_checkpoint_engine(engine)
    staging = root / f"{tag_of(step)}{STAGING}"
    if rank == 0:
        _stage(root, step)
    if world > 1:
        dist.barrier()
    writer.written.clear()
    writer.failure = None
    rng_file = staging / RNG_FILE.format(rank)
    try:
        write_text_atomic(rng_file, json.dumps(rng_state()) + "\n")
        writer.record(rng_file)
    except OSError as error:
        writer.failure = _bare(error)
    engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    mine: dict[str, Any] = {"parts": {}, "failure": writer.failure}  # a bare OSError pickles as it is
    if writer.failure is None:
        mine["parts"] = {file.name: _part(file) for file in writer.written}
    every = [mine]
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    failed = [(r, theirs["failure"]) for r, theirs in enumerate(every) if theirs["failure"] is not None]
    if failed:  # every rank raises the first failing rank's error: none writes or waits any further
        r, error = failed[0]
        raise error if world == 1 else OSError(error.errno, f"{error.strerror} on rank {r}", error.filename)
    final = root / tag_of(step)
    if rank == 0:
        parts: dict[str, dict[str, Any]] = {}
        for theirs in every:
            parts.update(theirs["parts"])
        _write_manifest(staging, step, "deepspeed", parts)
        _install(staging, final)
    if world > 1:
        dist.barrier()
    return final


def _bare(error: OSError) -> OSError:
    """The error without its traceback, whose frames would keep the file it failed on open."""
    return OSError(error.errno, error.strerror or str(error), error.filename)


def read_rng(path: Path, rank: int) -> Any:
    """Rank `rank`'s RNG states in the DeepSpeed checkpoint at `path` (CheckpointError naming the file otherwise)."""
    rng_file = path / RNG_FILE.format(rank)
    if not rng_file.is_file():
        raise CheckpointError(
            f"{rng_file} is missing: the checkpoint holds no RNG states for rank {rank} (it was written by fewer ranks)"
        )
    return _read_json(rng_file)


def saved_world_size(path: Path) -> int:
    """How many ranks wrote the DeepSpeed checkpoint at `path`: each writes its RNG file, listed in the manifest."""
    parts = read_manifest(path)["parts"]
    return sum(RNG_FILE.format(r) in parts for r in range(len(parts)))


def load_deepspeed(engine: Any, path: Path, rank: int, module_only: bool = False) -> dict[str, Any]:
    """Model, optimizer, scheduler (and loss scaler) into the engine (module_only: the model's weights), through
    our checkpoint engine; returns the client state with this rank's RNG states ("rng"; not for module_only)."""
    install_checkpoint_engine(engine)
    rng = None if module_only else read_rng(path, rank)
    _, client_state = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_only=module_only,
        load_optimizer_states=not module_only,
        load_lr_scheduler_states=not module_only,
    )
    if client_state is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint there")
    if rng is not None:
        client_state["rng"] = rng
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
        write_file_atomic(path, lambda name: _save_safetensors(tensors, name, path))
    else:
        write_file_atomic(path, lambda name: torch.save(tensors, name))


def _save_safetensors(tensors: dict[str, torch.Tensor], name: str, path: Path) -> None:
    """safetensors' save_file into the temporary file `name`; its I/O errors as the OSError they are, naming
    `path` (it raises SafetensorError "I/O error: No space left on device (os error 28)": a full disk would not
    read as one)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, name, metadata={"format": "pt"})
    except SafetensorError as error:
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1) or found.group(2))
        raise OSError(code, os.strerror(code), str(path)) from None


def export_model(
    state: Mapping[str, torch.Tensor], config: LxmertConfig, output_dir: str | Path, hf: bool = False
) -> Path:
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
