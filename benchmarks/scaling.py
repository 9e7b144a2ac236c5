"""Multi-GPU scaling of the pre-training step under DeepSpeed ZeRO 0/1/2/3: step time, samples/s, bytes sent.

    deepspeed --num_gpus 1 --module benchmarks.scaling            # the single-GPU baseline rows first
    deepspeed --num_gpus 8 --module benchmarks.scaling [--stages 0 1 2 3] [--micro-batch 64] [--precision bf16]
    deepspeed --num_gpus 2 --module benchmarks.scaling --model tiny --precision fp32 --micro-batch 4 --steps 3   # CPUs

Method, the analytic byte counts and the two DeepSpeed configurations ("engine", "textbook"): benchmarks/README.md.
Every rank builds the engine's own Trainer per stage; batches are drawn by the engine's loader before timing and
kept on the device. Scaling efficiency is against the latest 1-rank row of the same config in --out. Bytes are
counted twice: DeepSpeed's communication logger (its message sizes turned into bytes sent by SEND_FACTOR) and a
wrapper around torch.distributed's collectives installed before DeepSpeed starts. Rank 0 appends one row per
(configuration, stage) to --out; on CPU ranks (gloo) the bytes are the measurement, not the step times.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from benchmarks import harness
from benchmarks.projection import wire_bytes, zero_collectives

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CPU_NOTE = "CPU ranks (gloo): the byte counts are the measurement; step times are not GPU numbers"
# zero_optimization entries of the "textbook" configuration (module docstring), by stage
TEXTBOOK = {
    0: {},
    1: {"use_multi_rank_bucket_allreduce": False},
    2: {"use_multi_rank_bucket_allreduce": False},
    3: {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
}
# bytes a rank sends for one call, as a multiple of the logged message size, in a world of n ranks: all-reduce
# 2 (N-1)/N; reduce-scatter (N-1)/N (logged: the whole input); all-gather N-1 (logged: this rank's shard); reduce
# and broadcast (N-1)/N averaged over the ranks (the root sends nothing)
SEND_FACTOR: dict[str, Callable[[int], float]] = {
    **dict.fromkeys(("all_reduce", "all_reduce_coalesced", "inference_all_reduce"), lambda n: 2 * (n - 1) / n),
    **dict.fromkeys(("reduce_scatter_tensor", "reduce_scatter", "_reduce_scatter_base"), lambda n: (n - 1) / n),
    **dict.fromkeys(
        ("all_gather_into_tensor", "all_gather", "_all_gather_base", "all_gather_coalesced"), lambda n: n - 1
    ),
    **dict.fromkeys(("reduce", "broadcast"), lambda n: (n - 1) / n),
}


# ----------------------------------------------------------------------------------- counting collectives


class TorchCollectiveCounter:
    """Counts the calls and message bytes of torch.distributed collectives while `active`.

    Installed before DeepSpeed starts (its torch backend keeps references to all_gather_into_tensor and
    reduce_scatter_tensor from then on). The message is the tensor argument DeepSpeed's logger would report:
    all_gather_into_tensor's input shard, reduce_scatter_tensor's whole input, a list's summed sizes."""

    # name -> index of the positional argument holding the message: gathers and scatters take their output first
    WATCHED = {name: int("gather" in name or "scatter" in name) for name in SEND_FACTOR}
    KEYWORDS = ("tensor", "input_tensor", "input_list", "tensors", "input_tensor_list")

    def __init__(self) -> None:
        self.active = False
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        for name, position in self.WATCHED.items():
            original = getattr(tdist, name, None)
            if original is not None and not getattr(original, "_counted", False):
                setattr(tdist, name, self._wrap(name, position, original))

    def _wrap(self, name: str, position: int, original: Callable) -> Callable:
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.active:
                keyword = next((kwargs[k] for k in self.KEYWORDS if k in kwargs), None)
                message = args[position] if len(args) > position else keyword
                self.calls[name] += 1
                self.bytes[name] += _nbytes(message)
            return original(*args, **kwargs)

        counted._counted = True
        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


def _nbytes(message: Any) -> int:
    if isinstance(message, torch.Tensor):
        return message.numel() * message.element_size()
    if isinstance(message, (list, tuple)):
        return sum(_nbytes(m) for m in message)
    return 0


def sent_bytes(message_bytes: dict[str, float], world: int) -> float:
    """Bytes a rank sends for the logged messages {op name: summed message bytes} (SEND_FACTOR)."""
    total = 0.0
    for name, nbytes in message_bytes.items():
        op = next((op for op in sorted(SEND_FACTOR, key=len, reverse=True) if name.startswith(op)), None)
        if op is None:
            raise ValueError(f"no send factor for collective {name!r}")
        total += SEND_FACTOR[op](world) * nbytes
    return total


def logger_messages() -> dict[str, dict[str, float]]:
    """{record name: {"calls", "bytes"}} from DeepSpeed's communication logger since its last reset."""
    from deepspeed.comm import comms_logger

    out = {}
    for name, sizes in comms_logger.get_raw_data().items():
        out[name] = {"calls": sum(v[0] for v in sizes.values()), "bytes": sum(size * v[0] for size, v in sizes.items())}
    return out


# ---------------------------------------------------------------------------------------------- the run


def run_config(args: argparse.Namespace, stores: tuple[Path, Path], mode: str, stage: int, world: int, out_dir: Path):
    """The engine's RunConfig for one stage: model size, data, optimizer, precision, ZeRO, a DeepSpeed template."""
    from engine.config import load_config
    from engine.data.store import TextStore

    text, feats = stores
    template = out_dir / f"deepspeed_{mode}_zero{stage}_rank{tdist.get_rank()}.json"
    template.write_text(json.dumps({"zero_optimization": TEXTBOOK[stage] if mode == "textbook" else {}}))
    overrides = harness.tiny_model_overrides(TextStore(text), harness.TINY_FEAT_DIM) if args.model == "tiny" else []
    overrides += [f"model.attn_backend={args.attn}", f"data.train.text={text}", f"data.train.features={feats}"]
    overrides += ["data.num_workers=0", "optim.name=adamw", "train.epochs=1000", "train.resume=none", "train.seed=0"]
    overrides += [f"train.batch_size={args.micro_batch * world}", f"train.micro_batch_size={args.micro_batch}"]
    overrides += [f"train.precision={args.precision}", f"train.zero_stage={stage}", f"deepspeed.config={template}"]
    overrides.append(f"train.output_dir={out_dir / f'{mode}_zero{stage}'}")
    return load_config(None, overrides)


def draw_batches(trainer, count: int) -> list:
    """`count` batches from the engine's loader, on the device in the precision DeepSpeed runs the model in."""
    from benchmarks.dataloader import endless

    float_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[trainer.config.train.precision]
    return [batch.to(trainer.device, float_dtype=float_dtype) for batch in islice(endless(trainer.loader), count)]


def measure_stage(
    args: argparse.Namespace, stores, mode: str, stage: int, world: int, rank: int, counter, out_dir: Path
) -> dict[str, Any]:
    """One rank's step times and byte counts at one ZeRO stage in one configuration."""
    import deepspeed.comm as dscomm

    from engine.tasks.pretrain import PretrainTask
    from engine.train import Trainer

    config = run_config(args, stores, mode, stage, world, out_dir)
    trainer = Trainer(config, PretrainTask(), use_deepspeed=True)
    ds_engine = trainer.engine
    ds_engine.train()
    batches = draw_batches(trainer, args.warmup + args.steps + args.count_steps)
    losses = []

    def step(batch) -> None:
        out = ds_engine(**batch.model_inputs())
        ds_engine.backward(out.loss)
        ds_engine.step()
        losses.append(out.loss.detach())

    dscomm.configure(enabled=False)
    for batch in batches[: args.warmup]:
        step(batch)
    times = []
    for batch in batches[args.warmup : args.warmup + args.steps]:
        clock = harness.StepClock(trainer.device)
        step(batch)
        clock.mark("step")
        times.append(clock.total * 1e3)

    dscomm.configure(enabled=True, prof_all=True, verbose=False, debug=False)
    dscomm.reset_log()
    counter.reset()
    counter.active = True
    for batch in batches[args.warmup + args.steps :]:
        step(batch)
    harness.synchronize(trainer.device)
    counter.active = False
    dscomm.configure(enabled=False)
    logged = logger_messages()
    dscomm.reset_log()

    params = sum(numel(p) for p in trainer.model.parameters())
    n = max(args.count_steps, 1)
    result = {
        "rank": rank,
        "step_ms": times,
        "loss_last": losses[-1].float().item(),
        "params": int(params),
        "tied_params": shared_elements(trainer.model),
        "logger": {k: {"calls": v["calls"] / n, "bytes": v["bytes"] / n} for k, v in logged.items()},
        "logger_sent_bytes": sent_bytes({k: v["bytes"] for k, v in logged.items()}, world) / n,
        "torch": {k: {"calls": counter.calls[k] / n, "bytes": counter.bytes[k] / n} for k in counter.calls},
        "torch_sent_bytes": sent_bytes(dict(counter.bytes), world) / n,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if trainer.device.type == "cuda" else None,
    }
    ds_engine.destroy()
    del trainer, batches
    gc.collect()  # DeepSpeed's engine and optimizer hold reference cycles: free them before the next stage
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def numel(p: torch.nn.Parameter) -> int:
    """Elements of a parameter, a ZeRO-3 partitioned one's whole size too."""
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def shared_elements(model: torch.nn.Module) -> int:
    """Elements of parameters registered in more than one module (the tied word embeddings / MLM decoder)."""
    owners = Counter(p for module in model.modules() for p in module.parameters(recurse=False))
    return sum(numel(p) * (count - 1) for p, count in owners.items())


def summarize_stage(args, env, mode: str, stage: int, world: int, per_rank: list[dict]) -> dict[str, Any]:
    slowest = max(harness.summarize(r["step_ms"])["median_ms"] for r in per_rank)  # the step waits for every rank
    params, tied = per_rank[0]["params"], per_rank[0]["tied_params"]
    # the formulas' bytes: textbook, or DeepSpeed's gradient all-reduce for ZeRO-1/2 in the engine's configuration
    # (its ZeRO-3: the textbook count, an upper bound)
    element, engine = DTYPE_BYTES[args.precision], mode == "engine"
    collectives = zero_collectives(stage, params, element, element, gradient_all_reduce=engine, tied_params=tied)
    analytic = wire_bytes(collectives, world)
    key = dict(benchmark="scaling", device=env["device"], model=args.model, attn=args.attn, precision=args.precision)
    key.update(micro_batch=args.micro_batch, zero_config=mode, zero_stage=stage)
    per_gpu = args.micro_batch / (slowest / 1e3)
    ones = [r for r in harness.read_rows(args.out) if r.get("world_size") == 1 and r.items() >= key.items()]
    base = ones[-1] if ones and world > 1 else None  # the latest 1-rank row of the same config
    efficiency = 1.0 if world == 1 else (per_gpu / base["samples_per_s_per_gpu"] if base else None)
    sent = {how: sum(r[f"{how}_sent_bytes"] for r in per_rank) / world for how in ("logger", "torch")}
    return {
        **env,
        **key,
        "world_size": world,
        "global_batch": args.micro_batch * world,
        "params": params,
        "tied_params": tied,
        "warmup": args.warmup,
        "steps": args.steps,
        "count_steps": args.count_steps,
        "zero_optimization_overrides": TEXTBOOK[stage] if mode == "textbook" else {},
        "step_median_ms": slowest,
        "step_all_ranks": harness.summarize([t for r in per_rank for t in r["step_ms"]]),
        "samples_per_s_per_gpu": per_gpu,
        "samples_per_s": per_gpu * world,
        "scaling_efficiency": efficiency,
        "efficiency_baseline": base and {k: base[k] for k in ("commit", "date", "samples_per_s_per_gpu")},
        "sent_bytes_logger": sent["logger"],
        "sent_bytes_torch": sent["torch"],
        "sent_bytes_analytic": analytic,
        "logger_over_analytic": sent["logger"] / analytic if analytic else None,
        "torch_over_analytic": sent["torch"] / analytic if analytic else None,
        "per_rank": per_rank,
        "loss_last": per_rank[0]["loss_last"],
        "note": None if torch.cuda.is_available() else CPU_NOTE,
    }


COLUMNS = (
    "zero_config=config; zero_stage=ZeRO; world_size=ranks; measured_on=on; params; step_median_ms=step ms; "
    "samples_per_s_per_gpu=samples/s/GPU; samples_per_s=samples/s; scaling_efficiency=efficiency; "
    "sent_mb_logger=MB sent/rank/step (DS logger); sent_mb_torch=(torch.distributed); sent_mb_analytic=(analytic)"
)


def report(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    where = (
        f"GPU measurements on {first['device']}"
        if first["measured_on"] == "gpu"
        else f"CPU ranks (gloo, host {first.get('host_cpu')}, {first['cpu_count']} cores): bytes measured, times NOT GPU numbers"  # noqa: E501
    )
    in_mb = [
        r | {f"sent_mb_{how}": r[f"sent_bytes_{how}"] / 1e6 for how in ("logger", "torch", "analytic")} for r in rows
    ]
    return (
        f"# Scaling benchmark: {where}\n\nmodel {first['model']} ({first['params']:,} parameters), {first['precision']}, "  # noqa: E501
        f"micro batch {first['micro_batch']} per rank, attention {first['attn']}; torch {first['torch']}, deepspeed "
        f"{first['deepspeed']}, commit {', '.join(sorted({r['commit'] or '?' for r in rows}))}, "
        f"{min(r['date'] for r in rows)} to {max(r['date'] for r in rows)}. Analytic bytes a rank sends a step (Psi "
        f"parameters, T = {first['tied_params']:,} of them tied, b bytes an element): textbook ZeRO-0/1/2 "
        f"2 Psi b (N-1)/N, ZeRO-3 (3 Psi + 2 T) b (N-1)/N; the engine's DeepSpeed configuration all-reduces ZeRO-1/2 "
        f"gradients, 3 Psi b (N-1)/N (its ZeRO-3 count is the textbook upper bound).\n\n"
        f"{harness.markdown_table(in_mb, COLUMNS)}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deepspeed --num_gpus N --module benchmarks.scaling", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    modes = ["engine", "textbook"]
    parser.add_argument("--zero-configs", nargs="+", default=modes, choices=modes, help="DeepSpeed configurations")
    parser.add_argument("--model", choices=["base", "tiny"], default="base", help="LXMERT-base, or a tiny one (CPUs)")
    parser.add_argument("--precision", choices=[*DTYPE_BYTES], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--attn", default="sdpa", help="attention backend (lxmert.attention)")
    parser.add_argument("--micro-batch", type=int, default=64, help="samples per rank and step")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--count-steps", type=int, default=2, help="steps with the communication logger on")
    parser.add_argument("--images", type=int, default=200, help="images in the synthetic data set")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "lxmert-scaling-bench")
    parser.add_argument("--out", type=Path, default=harness.RUNS_DIR / "scaling.jsonl")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    counter = TorchCollectiveCounter()  # before DeepSpeed keeps references to torch.distributed's functions
    from benchmarks.dataloader import dataset
    from engine.launch import Launch, init_distributed, pick_device
    from engine.logs import configure_logging

    launch = Launch.from_env()
    configure_logging(launch.rank)  # the runs' console lines, as lxmert-pretrain shows them
    rank, world = launch.rank, launch.world_size
    init_distributed(pick_device(launch.local_rank), launch)
    feat_dim = harness.TINY_FEAT_DIM if args.model == "tiny" else 2048
    # the runs' output directories are the ranks' common ones (each run's lock is rank 0's), beside the data set
    work = args.data_dir / "runs"
    if rank == 0:
        dataset(args.data_dir, args.images, feat_dim)  # built once and cached
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    tdist.barrier()
    text, regions = dataset(args.data_dir, args.images, feat_dim)
    stores = (text.path, regions.path)
    env = harness.environment()
    rows = []
    for mode, stage in [(mode, stage) for mode in args.zero_configs for stage in args.stages]:
        start = time.perf_counter()
        mine = measure_stage(args, stores, mode, stage, world, rank, counter, work)
        gathered: list[Any] = [None] * world
        tdist.all_gather_object(gathered, mine)
        if rank == 0:
            row = summarize_stage(args, env, mode, stage, world, gathered)
            harness.append_rows(args.out, [row])
            rows.append(row)
            print(
                f"{mode} ZeRO-{stage}, {world} ranks: step {row['step_median_ms']:.1f} ms, "
                f"{row['samples_per_s']:.1f} samples/s, sent {row['sent_bytes_logger'] / 1e6:.3f} MB/rank/step "
                f"(torch {row['sent_bytes_torch'] / 1e6:.3f}, analytic {row['sent_bytes_analytic'] / 1e6:.3f}); "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
    if rank == 0:
        md = harness.write_summary(args.out.with_suffix(".md"), [report(rows)])
        print(f"{len(rows)} rows appended to {args.out}; table in {md}", flush=True)
    tdist.barrier()
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
