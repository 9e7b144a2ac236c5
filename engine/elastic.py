"""Elastic resume: a DeepSpeed checkpoint written by N ranks, resumed on M (ZeRO 0-3).

DeepSpeed refuses it ("The checkpoint being loaded used a DP world size of 2 but the current world size is 1 ...")
because ZeRO 1-3 keep the fp32 master weights and the optimizer's moments split in one file per rank. Here every
rank reads all N optimizer files (engine.checkpoint.load_deepspeed_file: weights_only and the allow-list, no other
pickle), puts each parameter's fp32 weight and moments back together in memory, and writes its own share of them
into the engine:
- ZeRO 1/2: each parameter's fragments in rank order (the files' param_slice_mappings: where a parameter lies in a
  rank's flat partition) make the parameter. The new partitions are filled where DeepSpeed linked each parameter's
  fragment on this rank (param._hp_mapping: where it lies in the parameter and in the partition, the addresses its
  safe_get_full_* functions use), and the whole weight goes into the module (every rank holds all of it).
- ZeRO-3: a parameter is cut into ceil(numel / N) elements a rank, in the order of the model states' param_shapes;
  the M-rank partitions are cut the same way (param.partition_numel()) into the optimizer's flat fp32 groups and
  moments, and into the module's partitions.
- ZeRO-0: DeepSpeed's files hold the whole optimizer state once (the same on every rank): DeepSpeed loads it.
The moments go in through the wrapped optimizer's own load_state_dict, with the saved scalars (Adam's step count) and
groups' settings (lr, betas, ...), which are the same on every rank; the schedule, DeepSpeed's step counters and the
run's own state come from rank 0's model states, as on a resume at the same size. RNG states: rank r takes rank r's
where the checkpoint has them, rank 0's otherwise (a fresh run seeds every rank alike too). Tested in fp32 without
offload (tests/test_elastic_resume.py); bf16 without ZeRO (per-rank BF16_Optimizer files) and ZeRO-3 with its
parameters offloaded are refused with a message.

Nothing is written: the checkpoint stays as it was, so a resume killed while it reshards loses nothing. Memory: every
rank holds the whole fp32 state (weights and moments) once while it loads. The global batch must stay the same
(train.batch_size); the loaders cut each global batch into ranks' slices, so the samples and their order do not
depend on the world size, and fp32 losses continue as the uninterrupted run's up to summation order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import (
    CheckpointError,
    install_checkpoint_engine,
    load_deepspeed_file,
    read_rng,
    saved_world_size,
)

logger = logging.getLogger(__name__)

# what DeepSpeed's engine keeps for itself in the model states (engine._load_checkpoint): the rest is the client's
_DEEPSPEED_KEYS = (
    "module",
    "skipped_steps",
    "global_steps",
    "dp_world_size",
    "mp_world_size",
    "data_sampler",
    "random_ltd",
    "lr_scheduler",
    "optimizer",
)


def load_resharded(engine: Any, path: Path, rank: int, world: int, report: Callable[[str], Any] = logger.info) -> dict:
    """Load the checkpoint at `path`, written by another number of ranks, into `engine` (this rank of `world`);
    returns the client state with this rank's RNG states ("rng"). `report` gets the one line saying what was done."""
    saved = saved_world_size(path)
    stage = int(engine.zero_optimization_stage())
    if engine.bfloat16_enabled() and stage == 0:
        raise CheckpointError(
            f"{path}: written by {saved} ranks, this run has {world}: bf16 without ZeRO keeps "
            "per-rank optimizer files this resume cannot reshard (ZeRO 1-3 can)"
        )
    rng = read_rng(path, rank if rank < saved else 0)
    if stage == 0:
        install_checkpoint_engine(engine)
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint there")
        what = "ZeRO-0's optimizer state is whole in the model states file: loaded as saved"
    else:
        model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
        states = load_deepspeed_file(path / model_file, "cpu")
        shards = [
            load_deepspeed_file(path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", "cpu") for r in range(saved)
        ]
        shards = [shard["optimizer_state_dict"] for shard in shards]
        shapes = {name: shape for group in states["param_shapes"] for name, shape in group.items()}
        if stage == 3:
            full, base = _consolidate_zero3(shards, states["param_shapes"], path), shards[0]["optimizer_state_dict"]
            keys = _tensor_keys(_group_states(base)[0])
            partitions = _partitions_zero3(engine, full, keys, rank, world)
        else:
            full, base = _consolidate_zero12(shards, shapes, path), shards[0]["base_optimizer_state"]
            keys = _tensor_keys(_group_states(base)[0])
            partitions = _partitions_zero12(engine, full, keys)
        _load_base_optimizer(engine, base, partitions)
        _load_loss_scaler(engine, shards[0])
        _load_buffers(engine, states["module"])
        if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
            engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
        engine.global_steps = states["global_steps"]
        engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
        engine.skipped_steps = states["skipped_steps"]
        client = {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
        what = f"ZeRO-{stage}'s fp32 weights and optimizer state put together from every rank's files and repartitioned"
    if world > saved:
        rng_note = f"rank {saved} starts" if world - saved == 1 else f"ranks {saved}-{world - 1} start"
        rng_note += " from rank 0's RNG states"
    else:
        rng_note = f"the RNG states of rank{f' {world}' if saved - world == 1 else f's {world}-{saved - 1}'} are unused"
    report(
        f"resume: {path}: the world size changed from {saved} to {world} ranks: {what}; the global batch and the "
        f"sample order are kept; {rng_note}"
    )
    client["rng"] = rng
    return client


def zero3_fp32_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights in the ZeRO-3 checkpoint at `path` (this tag, every rank's optimizer file),
    with its buffers and the names of tied parameters: what DeepSpeed's get_fp32_state_dict_from_zero_checkpoint
    gives a weights-only load, which would read the tag `latest` names instead and unpickle without the
    allow-list."""
    states = load_deepspeed_file(path / "zero_pp_rank_0_mp_rank_00_model_states.pt", "cpu")
    files = sorted(path.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))
    if not files:
        raise CheckpointError(f"{path}: no ZeRO-3 optimizer files (zero_pp_rank_*_mp_rank_00_optim_states.pt)")
    if any(states.get("frozen_param_shapes") or []):
        raise CheckpointError(f"{path}: frozen parameters in a ZeRO-3 checkpoint are not read here")
    shards = [load_deepspeed_file(f, "cpu")["optimizer_state_dict"] for f in files]
    weights = {name: entry["fp32"] for name, entry in _consolidate_zero3(shards, states["param_shapes"], path).items()}
    module = states.get("module") or {}
    for name in states.get("buffer_names") or []:
        if name in module:
            weights[name] = module[name].float() if module[name].is_floating_point() else module[name]
    for alias, source in (states.get("shared_params") or {}).items():
        weights[alias] = weights[source]
    return weights


# ------------------------------------------------------------------------------ putting the shards together


def _tensor_keys(state: dict[str, Any]) -> list[str]:
    """The optimizer state entries laid out like the flat fp32 partition (Adam's moments; not its step count). A
    saved ZeRO-1/2 partition drops the group's end padding, its moments keep it: they are longer on the last rank."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def _flat_indices(base: dict[str, Any]) -> list[int]:
    """The wrapped optimizer's parameters in its state_dict: ZeRO's flat partitions, one per (sub) group, in order."""
    return [index for group in base["param_groups"] for index in group["params"]]


def _group_states(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The wrapped optimizer's state of each flat partition, in order."""
    return [base["state"][index] for index in _flat_indices(base)]


def _consolidate_zero12(shards: list[dict], shapes: dict[str, torch.Size], path: Path) -> dict[str, dict]:
    """{parameter name: {"fp32": weight, moment name: moment}} from ZeRO-1/2 optimizer files, in rank order."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for shard in shards:
        states = _group_states(shard["base_optimizer_state"])
        flats, mappings = shard["single_partition_of_fp32_groups"], shard["param_slice_mappings"]
        for flat, state, mapping in zip(flats, states, mappings):
            sources = {"fp32": flat, **{k: state[k] for k in _tensor_keys(state)}}
            for name, fragment in mapping.items():
                entry = pieces.setdefault(name, {k: [] for k in sources})
                for key, source in sources.items():
                    entry[key].append(source.narrow(0, fragment.start, fragment.numel))
    full = {}
    for name, entry in pieces.items():
        full[name] = {key: torch.cat(parts) for key, parts in entry.items()}
        if name not in shapes or any(t.numel() != math.prod(shapes[name]) for t in full[name].values()):
            raise CheckpointError(f"{path}: the optimizer files' fragments of {name} do not make its shape")
        full[name] = {key: t.view(shapes[name]) for key, t in full[name].items()}
    return full


def _consolidate_zero3(shards: list[dict], param_shapes: list[dict], path: Path) -> dict[str, dict]:
    """The same from ZeRO-3 files: each parameter ceil(numel / ranks) elements a rank, in param_shapes' order."""
    world = len(shards)
    full = {}
    for group, shapes in enumerate(param_shapes):
        flats = [shard["fp32_flat_groups"][group] for shard in shards]
        states = [_group_states(shard["optimizer_state_dict"])[group] for shard in shards]
        sources = [{"fp32": flat, **{k: state[k] for k in _tensor_keys(state)}} for flat, state in zip(flats, states)]
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            share = math.ceil(numel / world)
            full[name] = {
                key: torch.cat([s[key].narrow(0, offset, share) for s in sources])[:numel].view(shape)
                for key in sources[0]
            }
            offset += share
        if any(offset > flat.numel() for flat in flats):
            raise CheckpointError(f"{path}: ZeRO-3 optimizer files smaller than their param_shapes say")
    return full


# ---------------------------------------------------------------------------------- into the new partitions


def _names(engine: Any, full: dict[str, dict]) -> dict[int, str]:
    """id(parameter) -> its name, for every trainable parameter (each must be in the checkpoint)."""
    named = list(engine.module.named_parameters())
    missing = [name for name, p in named if p.requires_grad and name not in full]
    if missing:
        raise CheckpointError(f"the checkpoint's optimizer files hold no {missing[0]} (a different model?)")
    return {id(p): name for name, p in named}


@torch.no_grad()
def _partitions_zero12(engine: Any, full: dict[str, dict], keys: list[str]) -> list[dict[str, torch.Tensor]]:
    """This rank's flat partition of each group for "fp32" and each moment: every parameter's fragment where
    DeepSpeed linked it (param._hp_mapping: where it lies in the parameter and in the partition); padding zero. The
    module's parameters get their whole fp32 value (every rank holds the whole module at ZeRO 1/2)."""
    optimizer = engine.optimizer
    names = _names(engine, full)
    partitions = []
    for params, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
        mine = {key: torch.zeros(flat.shape, dtype=torch.float32) for key in ("fp32", *keys)}
        for param in params:
            state = full[names[id(param)]]
            param.copy_(state["fp32"].to(param.device, param.dtype))
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is None:  # no fragment of it in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key, target in mine.items():
                target.narrow(0, hp.start, hp.numel).copy_(state[key].flatten().narrow(0, lp.start, lp.numel))
        flat.copy_(mine.pop("fp32").to(flat.device, flat.dtype))
        partitions.append(mine)
    return partitions


@torch.no_grad()
def _partitions_zero3(engine: Any, full: dict[str, dict], keys: list[str], rank: int, world: int) -> list[dict]:
    """The same at ZeRO-3: each parameter cut as ZeRO-3 cuts it for `world` ranks (ceil(numel / world) elements a
    rank, the last padded), this rank's pieces in the group's order; the module's partitions get the fp32 ones."""
    optimizer = engine.optimizer
    if any(p is None for p in optimizer.fp16_partitioned_groups_flat):  # parameters offloaded (swapped out)
        raise CheckpointError(
            "ZeRO-3 with offloaded parameters: a checkpoint of another world size cannot be "
            "resharded into it (resume on the ranks that wrote it)"
        )
    names = _names(engine, full)
    partitions = []
    for group, params in enumerate(optimizer.fp16_groups):
        flat = optimizer.fp32_partitioned_groups_flat[group]
        mine = {key: torch.zeros(flat.shape, dtype=torch.float32) for key in ("fp32", *keys)}
        for key, target in mine.items():
            offset = 0
            for param in params:
                share = param.partition_numel()
                value = full[names[id(param)]][key].flatten()
                piece = value[share * rank : share * (rank + 1)]
                if offset + share > target.numel():
                    raise CheckpointError(f"ZeRO-3 group {group}: the parameters do not fit this rank's partition")
                target.narrow(0, offset, piece.numel()).copy_(piece)
                offset += share
        flat.copy_(mine.pop("fp32").to(flat.device, flat.dtype))
        optimizer.fp16_partitioned_groups_flat[group].copy_(flat)  # the module's partitions
        partitions.append(mine)
    return partitions


def _load_base_optimizer(engine: Any, base: dict[str, Any], partitions: list[dict[str, torch.Tensor]]) -> None:
    """The wrapped optimizer's state_dict as saved, its moments replaced by this rank's new partitions: its
    groups' settings (lr, betas, ...) and scalar state (Adam's step count) are the same on every rank."""
    indices = _flat_indices(base)
    if len(indices) != len(partitions):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(indices)} flat groups, this run's {len(partitions)}"
        )
    state = {}
    for index, mine in zip(indices, partitions):
        saved = base["state"][index]
        state[index] = {k: v for k, v in saved.items() if not (isinstance(v, torch.Tensor) and v.dim() > 0)}
        state[index].update(mine)
    zero3 = hasattr(engine.optimizer, "_set_fp32_optimizer_param_groups")  # ZeRO-3 lends its groups the flat
    if zero3:  # fp32 partitions around each step only, as its own load does (_rigid_load_state_dict)
        engine.optimizer._set_fp32_optimizer_param_groups()
    try:
        engine.optimizer.optimizer.load_state_dict({"state": state, "param_groups": base["param_groups"]})
    finally:
        if zero3:
            engine.optimizer._clear_fp32_optimizer_param_groups()


def _load_loss_scaler(engine: Any, shard: dict[str, Any]) -> None:
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if key in shard and hasattr(engine.optimizer, key):
            setattr(engine.optimizer, key, shard[key])


@torch.no_grad()
def _load_buffers(engine: Any, module_state: dict[str, torch.Tensor]) -> None:
    for name, buffer in engine.module.named_buffers():
        if name in module_state and module_state[name].numel() == buffer.numel():
            buffer.copy_(module_state[name].view_as(buffer))
