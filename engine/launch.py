"""How a run is launched: ranks, device, threads, the DeepSpeed or plain path, and the process group.

    launch = Launch.from_env()           # rank, local rank, world size from deepspeed / torchrun / srun (0, 0, 1 alone)
    device = pick_device(launch.local_rank)
    set_threads(config.train.threads, launch)
    init_distributed(device)             # before deepspeed.initialize; one process needs no launcher

One process with ZeRO (`lxmert-pretrain --config configs/pretrain.yaml`, zero_stage 1) runs without a launcher:
DeepSpeed's own init_distributed would look for an MPI job when the launcher's variables are missing (and fail
without mpi4py), so a world of one is set up here on an in-memory store (no port; only LOCAL_RANK=0 is set,
which deepspeed.initialize insists on).

SLURM: `srun python -m engine.pretrain ...` (one task per GPU) starts every rank itself, with no launcher in
between: where no launcher's variables are set, the ranks come from the step srun started (SLURM_PROCID,
SLURM_LOCALID, SLURM_STEP_NUM_TASKS, SLURM_NODEID and SLURM_STEP_TASKS_PER_NODE; the batch script's own shell has
no SLURM_STEP_* and stays a world of one), and init_distributed exports them as RANK, LOCAL_RANK, WORLD_SIZE for
DeepSpeed (which would otherwise go looking for MPI). The address of rank 0 is the job script's to give
(MASTER_ADDR, e.g. the first of `scontrol show hostnames "$SLURM_JOB_NODELIST"`; MASTER_PORT defaults to 29500):
resolving a node list needs scontrol, and guessing it wrong hangs every rank.

Threads: each rank runs torch's intra-op pool; by default this is the cores this process may use divided by the
ranks on this node (the deepspeed launcher sets no OMP_NUM_THREADS on the CPU: two CPU ranks with a pool of every
core each ran 5-10x slower than torchrun's). `train.threads` fixes it; an OMP_NUM_THREADS the user set is kept.

DeepSpeed is imported only where it is used, quietly: on a machine without CUDA it is told it runs on the CPU
(DS_ACCELERATOR, no "Setting accelerator to CPU" warning), and a few of its log lines that the engine knows to be
fine (the client BertAdam under ZeRO is "untested", torch's deprecation of two collectives DeepSpeed calls every
step) are dropped.

On the CPU, DeepSpeed's shared-memory comm op stays off (it serves only inference_all_reduce; training's
collectives go through gloo either way). With it on, every process group JIT-built a C++ extension under a file
lock (a process killed during that build left the lock, and every later run on the machine waited on it forever),
mapped 69 MB of /dev/shm per rank that nothing unlinks (named by master port: a test suite or a kill-and-resume
loop filled the RAM-backed /dev/shm with them), and spun on the CPU waiting for a peer that had died.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from engine.config import ConfigError

# DeepSpeed log lines that describe what the engine does on purpose (engine/config.py deepspeed_config)
_KNOWN_FINE = ("untested optimizer",)
# torch's deprecation of collectives DeepSpeed 0.19.8 calls under ZeRO (theirs to change, repeated every step)
_DEEPSPEED_DEPRECATIONS = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
_SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's name of its CPU shared-memory comm op (module docstring)


@dataclass(frozen=True)
class Launch:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launched: bool = False
    """A launcher (deepspeed, torchrun) or srun started this process: its variables are set."""
    slurm: bool = False
    """The ranks come from srun's variables (no launcher in between): init_distributed exports them."""

    @classmethod
    def from_env(cls) -> Launch:
        if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
            return cls.from_slurm()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world))))
        return cls(rank, local_rank, world, max(1, local_world), "WORLD_SIZE" in os.environ)

    @classmethod
    def from_slurm(cls) -> Launch:
        """The ranks of a task srun started: SLURM_PROCID of SLURM_STEP_NUM_TASKS, SLURM_LOCALID on its node, and
        the node's share of SLURM_STEP_TASKS_PER_NODE ("8(x2)" or "4,3": counts per node, in SLURM_NODEID order)."""
        env = os.environ
        counts = []
        for part in env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")).split(","):
            count, _, repeat = part.partition("(x")
            if count.strip():
                counts += [int(count)] * int(repeat.rstrip(")") or 1)
        node = int(env.get("SLURM_NODEID", "0"))
        world = int(env["SLURM_STEP_NUM_TASKS"])
        local_world = counts[node] if node < len(counts) else world
        if not env.get("MASTER_ADDR"):
            raise ConfigError(
                f"srun started rank {env['SLURM_PROCID']} of {world}, but MASTER_ADDR is not set: export "
                "the address of the first node in the job script, e.g. MASTER_ADDR=$(scontrol show "
                'hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            )
        return cls(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), world, max(1, local_world), True, slurm=True
        )

    def export_ranks(self) -> None:
        """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (and MASTER_PORT 29500 unless set) in the environment, for
        the env:// rendezvous DeepSpeed and torch read (from_slurm made sure MASTER_ADDR is there)."""
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
        )


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(launch: Launch) -> int:
    """The cores this process may use, shared by the ranks on this node (at least 1)."""
    return max(1, available_cores() // launch.local_world_size)


def set_threads(threads: int, launch: Launch) -> int:
    """torch's intra-op threads for this rank: `threads` if > 0, else OMP_NUM_THREADS if the user set it, else
    default_threads. Returns the count in use."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads(launch))
    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_available() -> bool:
    """Whether DeepSpeed is installed (looked up, not imported: importing it costs seconds and logs)."""
    return importlib.util.find_spec("deepspeed") is not None


class _DropKnownFine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _KNOWN_FINE)


def import_deepspeed():
    """deepspeed, imported without the warnings the engine knows to be fine (see the module docstring)."""
    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger

    if not any(isinstance(f, _DropKnownFine) for f in logger.filters):
        logger.addFilter(_DropKnownFine())
        warnings.filterwarnings("ignore", message=_DEEPSPEED_DEPRECATIONS, category=FutureWarning)
    return deepspeed


def choose_deepspeed(train_zero_stage: int, use_deepspeed: bool | None, launch: Launch) -> bool:
    """The DeepSpeed path when asked, or by default when it is installed and ZeRO or a launcher asks for it."""
    if use_deepspeed is None:
        use_deepspeed = deepspeed_available() and (train_zero_stage > 0 or launch.launched)
    if not use_deepspeed and launch.world_size > 1:  # plain PyTorch runs one process (no DDP path)
        n = launch.world_size
        why = (
            "DeepSpeed, which is not installed (pip install deepspeed)"
            if not deepspeed_available()
            else ("the DeepSpeed path, and use_deepspeed=False was asked for")
        )
        raise ConfigError(f"WORLD_SIZE={n}: a launch of {n} ranks needs {why}; without it run one process")
    return use_deepspeed


def error_line(prog: str, error: BaseException | str) -> int:
    """A user's mistake, as every CLI reports it: one line on stderr, exit status 2. Every rank runs the same
    checks on the same files, so rank 0 says it once; another rank only when the line names that rank."""
    rank, message = Launch.from_env().rank, " ".join(str(error).split("\n"))
    if rank == 0 or f"rank {rank}" in message:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def init_distributed(device: torch.device, launch: Launch) -> None:
    """The process group DeepSpeed runs on: the launcher's (env://), or a world of one without a launcher."""
    deepspeed = import_deepspeed()
    if device.type == "cpu":
        # its probe's dict, cached in deepspeed.ops, is what TorchBackend asks before building the op
        deepspeed.ops.__compatible_ops__[_SHM_COMM_OP] = False
    backend = "nccl" if device.type == "cuda" else "gloo"
    import torch.distributed as dist

    if launch.slurm:
        launch.export_ranks()
    if not launch.launched:
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize asserts it is set
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op alone)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
