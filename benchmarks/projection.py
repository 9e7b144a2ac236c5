"""Projected multi-GPU step time and scaling efficiency of LXMERT pre-training under DeepSpeed ZeRO: a model in
code, not a measurement.

    python -m benchmarks.projection [--gpus 8 64] [--micro-batch 64] [--assumed-mfu 0.3 | --step-time-ms T]
                                    [--nvlink-gbs 360] [--ib-gbs 45] [--overlap 0 0.5] [--deepspeed-default]

What one optimizer step communicates (data parallelism over N ranks; Psi parameters; b_g, b_p bytes a gradient,
a parameter element on the wire; ZeRO, Rajbhandari et al. 2020, section 7):
    ZeRO-0 (DDP)  all-reduce of the gradients                                          S = Psi b_g
    ZeRO-1, 2     reduce-scatter of the gradients, all-gather of the updated parameters  Psi b_g, Psi b_p
    ZeRO-3        reduce-scatter of the gradients, all-gather of the parameters in the forward and again in
                  the backward                                                          Psi b_g, 2 x Psi b_p
Bytes each rank sends (ring algorithms; nccl-tests' "bus bytes"):
    all-reduce 2 (N-1)/N S,   reduce-scatter and all-gather (N-1)/N S      (S: the whole tensor's bytes)
so with b_g = b_p = b, ZeRO-0, 1 and 2 send 2 Psi b (N-1)/N a rank and step and ZeRO-3 3 Psi b (N-1)/N: 1.5x.
ZeRO-3 gathers a parameter at each use by a module, so a weight two modules share (the word embeddings, tied to
the MLM decoder: T = vocab x hidden = 23.4M of LXMERT-base's 228M) is gathered twice a pass: 3 Psi b + 2 T b.
These are the textbook counts, which DeepSpeed 0.19.8 sends exactly when configured for them. With its defaults
ZeRO-1/2 all-reduce the gradient buckets, 3 Psi b (N-1)/N (`gradient_all_reduce`, --deepspeed-default), and ZeRO-3
keeps the parameters the forward gathered for the backward, so the ZeRO-3 count here is an upper bound (both
measured on 2 CPU ranks: benchmarks/README.md, "Multi-GPU scaling").

Time of one collective over N = n nodes x g GPUs a node, two levels (NVLink inside a node, each GPU's own NIC
across nodes, as NCCL's rail-aligned rings do):
    reduce-scatter or all-gather of S:  (g-1)/g S / B_nvlink + (n-1)/n (S/g) / B_ib + calls x latency
    all-reduce of S:                    twice the bandwidth terms (a reduce-scatter, then an all-gather)
B is the achieved bandwidth per GPU in one direction (nccl-tests' bus bandwidth), not a datasheet's
bidirectional total; the latency is a per-call constant (intra-node, or inter-node once n > 1).

Step time on N GPUs, weak scaling (the per-GPU micro batch stays fixed):
    t_N = t_1 - (1 - 1/N) t_opt + (1 - overlap) t_comm           efficiency = t_1 / t_N
t_opt: the optimizer's share of t_1, which ZeRO >= 1 shards N ways (0 by default: no credit taken); overlap: the
share of communication hidden behind computation (0: none, the conservative bound; DeepSpeed overlaps the
gradient reduce-scatter with the backward, overlap_comm, and ZeRO-3 prefetches parameters).

t_1 is the single-GPU step time. Measured (--step-time-ms, from benchmarks.throughput on a GPU) where there is a
measurement; until then it is an ASSUMPTION, labelled so wherever it is printed: the step's model FLOPs
(engine.flops.step_flops) / (H100 SXM dense bf16 peak, 989.4 TFLOP/s, x an assumed MFU).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from lxmert.config import LxmertConfig

AUTHORS_SAMPLES = 171.5e6  # 20 epochs of the authors' 9.18M image-sentence pairs (LXMERT paper, section 4)
H100_BF16_PEAK = 989.4e12  # dense, engine.flops.PEAK_TFLOPS["H100 SXM"]["bf16"]
ASSUMED_MFU = 0.30  # a guess for a BERT-base-sized model at 56 tokens a sample; replace by a measurement
BUS_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}  # x (N-1)/N x S


@dataclass(frozen=True)
class Links:
    """Achieved per-GPU bandwidth in one direction (GB/s = 1e9 bytes/s) and per-call latency (microseconds)."""

    nvlink_gbs: float = 360.0  # H100 SXM NVLink 4: 450 GB/s a direction on paper; ~80% achieved
    ib_gbs: float = 45.0  # one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s on paper)
    gpus_per_node: int = 8
    nvlink_latency_us: float = 15.0
    ib_latency_us: float = 30.0


@dataclass(frozen=True)
class Collective:
    kind: str  # "all_reduce", "reduce_scatter", "all_gather"
    nbytes: float  # S: the whole tensor (the gathered or the to-be-scattered one), bytes
    calls: int = 1  # how many launches move it (buckets; ZeRO-3 gathers module by module)
    phase: str = ""  # where in the step (for the reader)


def zero_collectives(
    stage: int,
    params: int,
    grad_bytes: float = 2,
    param_bytes: float = 2,
    gather_calls: int = 1,
    gradient_all_reduce: bool = False,
    tied_params: int = 0,
) -> list[Collective]:
    """The collectives of one optimizer step at ZeRO `stage` (the module docstring's counts). gradient_all_reduce:
    ZeRO-1/2 all-reduce the gradient buckets instead of reduce-scattering them (DeepSpeed's default); tied_params:
    elements two modules share, which ZeRO-3 gathers twice a pass."""
    grads, weights = params * grad_bytes, params * param_bytes
    if stage == 0:
        return [Collective("all_reduce", grads, phase="backward: gradients")]
    if stage in (1, 2):
        return [
            Collective("all_reduce" if gradient_all_reduce else "reduce_scatter", grads, phase="backward: gradients"),
            Collective("all_gather", weights, phase="after the optimizer: updated parameters"),
        ]
    if stage == 3:
        return [
            Collective("all_gather", weights + tied_params * param_bytes, gather_calls, phase="forward: parameters"),
            Collective("all_gather", weights + tied_params * param_bytes, gather_calls, phase="backward: parameters"),
            Collective("reduce_scatter", grads, phase="backward: gradients"),
        ]
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def wire_bytes(collectives: Sequence[Collective], world: int) -> float:
    """Bytes each rank sends in a step: sum of bus factor x (N-1)/N x S."""
    return sum(BUS_FACTOR[c.kind] * (world - 1) / world * c.nbytes for c in collectives)


def collective_time(c: Collective, world: int, links: Links) -> float:
    """Seconds of one collective over `world` GPUs (two-level ring model of the module docstring)."""
    if world <= 1:
        return 0.0
    g = min(world, links.gpus_per_node)
    n = math.ceil(world / g)
    seconds = (g - 1) / g * c.nbytes / (links.nvlink_gbs * 1e9)
    seconds += (n - 1) / n * (c.nbytes / g) / (links.ib_gbs * 1e9)
    seconds *= BUS_FACTOR[c.kind]
    latency = links.ib_latency_us if n > 1 else links.nvlink_latency_us
    return seconds + c.calls * latency * 1e-6


@dataclass
class Projection:
    world: int
    step_time_1_s: float
    step_time_s: float
    comm_s: float  # all collectives, back to back
    exposed_comm_s: float  # what overlap does not hide
    wire_bytes_per_rank: float
    efficiency: float  # t_1 / t_N
    samples_per_s_per_gpu: float
    samples_per_s: float
    collectives: list[dict] = field(default_factory=list)


def project(
    step_time_1_s: float,
    micro_batch: int,
    world: int,
    collectives: Sequence[Collective],
    links: Links = Links(),
    overlap: float = 0.0,
    optimizer_time_s: float = 0.0,
    sharded_optimizer: bool = True,
) -> Projection:
    """Step time and scaling efficiency on `world` GPUs from the single-GPU step time and the step's collectives
    (zero_collectives); sharded_optimizer: ZeRO >= 1 (each rank updates 1/N of the parameters)."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap is a share in [0, 1], got {overlap}")
    if not 0.0 <= optimizer_time_s <= step_time_1_s:
        raise ValueError(f"optimizer_time_s must be within the step time, got {optimizer_time_s}")
    comm = sum(collective_time(c, world, links) for c in collectives)
    saved = optimizer_time_s * (1 - 1 / world) if sharded_optimizer else 0.0
    exposed = (1.0 - overlap) * comm
    step = step_time_1_s - saved + exposed
    per_gpu = micro_batch / step
    times = [{**asdict(c), "seconds": collective_time(c, world, links)} for c in collectives]
    sent, efficiency = wire_bytes(collectives, world), step_time_1_s / step
    return Projection(world, step_time_1_s, step, comm, exposed, sent, efficiency, per_gpu, per_gpu * world, times)


def assumed_step_time(
    config: LxmertConfig, micro_batch: int, mfu: float = ASSUMED_MFU, peak: float = H100_BF16_PEAK
) -> float:
    """ASSUMED single-GPU step time: model FLOPs of a pre-training step at 20 tokens and 36 regions over
    peak x mfu. Not a measurement."""
    from engine.flops import step_flops

    return step_flops(config, "pretrain", micro_batch, 20, 36).total / (peak * mfu)


def parameterised_modules(config: LxmertConfig) -> int:
    """Modules that own parameters directly: ZeRO-3 gathers each one's parameters when it runs."""
    import torch

    from lxmert import LxmertForPreTraining

    with torch.device("meta"):
        model = LxmertForPreTraining(config)
    return sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))


# ------------------------------------------------------------------------------------------------ CLI

COLUMNS = (
    "gpus=GPUs; stage=ZeRO; overlap; wire_gb=GB sent/GPU/step; comm_ms=comm ms; step_ms=step ms; efficiency; "
    "samples_per_s=samples/s; hours=20 epochs, hours"
)


def table(args: argparse.Namespace) -> str:
    """The projection table (Markdown, with its assumptions in a header)."""
    from benchmarks.harness import markdown_table
    from engine.flops import parameter_count

    config = LxmertConfig()
    params = parameter_count(config)
    tied = config.vocab_size * config.hidden_size  # word embeddings = MLM decoder
    links = Links(**{link.name: getattr(args, link.name) for link in fields(Links)})
    if args.step_time_ms is not None:
        t1, source = args.step_time_ms / 1e3, f"MEASURED single-GPU step time {args.step_time_ms:g} ms (given)"
    else:
        t1 = assumed_step_time(config, args.micro_batch, args.assumed_mfu)
        source = (
            f"ASSUMED single-GPU step time {t1 * 1e3:.2f} ms = model FLOPs / (989.4 TFLOP/s bf16 x "
            f"{args.assumed_mfu:g} MFU): no GPU measurement yet"
        )
    gather_calls = parameterised_modules(config)
    rows = []
    for world in [1, *args.gpus]:
        for stage in args.stages if world > 1 else args.stages[:1]:  # one GPU communicates nothing
            collectives = zero_collectives(
                stage, params, args.grad_bytes, args.param_bytes, gather_calls, args.deepspeed_default, tied
            )
            for overlap in args.overlap if world > 1 else [0.0]:
                optimizer_s = args.optimizer_ms / 1e3
                p = project(t1, args.micro_batch, world, collectives, links, overlap, optimizer_s, stage >= 1)
                row = dict(gpus=world, stage=stage if world > 1 else "any", overlap=overlap)
                row.update(wire_gb=round(p.wire_bytes_per_rank / 1e9, 3), comm_ms=round(p.comm_s * 1e3, 2))
                row.update(step_ms=round(p.step_time_s * 1e3, 2), efficiency=round(p.efficiency, 3))
                hours = round(AUTHORS_SAMPLES / p.samples_per_s / 3600, 2)  # the authors' 20 epochs
                rows.append(row | {"samples_per_s": round(p.samples_per_s), "hours": hours})
    zero12 = (
        "all-reduce of the gradients (DeepSpeed 0.19.8's default, 3 Psi b (N-1)/N)"
        if args.deepspeed_default
        else "reduce-scatter of the gradients (textbook, 2 Psi b (N-1)/N)"
    )
    header = (
        f"PROJECTION, not a measurement. LXMERT-base ({params:,} parameters), pre-training, micro batch "
        f"{args.micro_batch} per GPU (20 tokens, 36 regions), {args.grad_bytes:g} B a gradient and "
        f"{args.param_bytes:g} B a parameter on the wire. {source}. ZeRO-1/2: {zero12}. Links: NVLink "
        f"{args.nvlink_gbs:g} GB/s, InfiniBand {args.ib_gbs:g} GB/s per GPU a direction, {args.gpus_per_node} GPUs a "
        f"node, latency {args.nvlink_latency_us:g} / {args.ib_latency_us:g} us a call; ZeRO-3 gathers in "
        f"{gather_calls} calls a pass, the tied word embeddings twice. Hours: {AUTHORS_SAMPLES / 1e6:g}M samples "
        f"(the authors' 20 epochs).\n"
    )
    return header + "\n" + markdown_table(rows, COLUMNS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.projection", description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="GPU counts projected (default 8 64)")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--micro-batch", type=int, default=64, help="samples per GPU and step (default 64)")
    parser.add_argument("--step-time-ms", type=float, help="a measured single-GPU step time (else the assumption)")
    parser.add_argument("--assumed-mfu", type=float, default=ASSUMED_MFU, help="used without --step-time-ms")
    parser.add_argument("--optimizer-ms", type=float, default=0.0, help="optimizer share of the step (ZeRO shards it)")
    parser.add_argument("--overlap", type=float, nargs="+", default=[0.0, 0.5], help="communication hidden (0-1)")
    parser.add_argument("--deepspeed-default", action="store_true", help="ZeRO-1/2 all-reduce gradients (DeepSpeed's)")
    for link in fields(Links):  # --nvlink-gbs, --ib-gbs, --gpus-per-node, --nvlink-latency-us, --ib-latency-us
        parser.add_argument(f"--{link.name.replace('_', '-')}", type=type(link.default), default=link.default)
    parser.add_argument("--grad-bytes", type=float, default=2, help="bytes a gradient element on the wire")
    parser.add_argument("--param-bytes", type=float, default=2, help="bytes a parameter element on the wire")
    args = parser.parse_args(argv)
    print(table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
