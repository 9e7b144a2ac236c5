"""End-to-end pre-training throughput: our LXMERT against Hugging Face's, per backend, precision, batch and loader.

    python -m benchmarks.throughput [--quick] [--out runs/benchmarks/throughput.jsonl]
    python -m benchmarks.throughput --smoke          # CPU: a tiny model, two steps; rows say cpu, smoke

What a variant is and what each row reports: benchmarks/README.md. Ours is timed through the engine's own step
(engine.train.TrainStep on engine.runtime.Runtime, what lxmert-pretrain runs); transformers' through a bare loop
with the same optimizer (HfStep). Both start from the same weights and read the same batches; transformers gets
its labels with ignore index -100 and runs the MLM and feature heads on every row, ours on the masked ones only:
the same model FLOPs. Throughput steps run freely (one synchronisation at the end); breakdown steps synchronise
between phases (harness.StepClock), so they are slower. No variant starts after --time-budget seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# triton picks interpreter or compiler when it is imported: without a GPU the triton backend runs interpreted
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks import harness  # noqa: E402
from benchmarks.dataloader import dataset, endless  # noqa: E402
from engine.config import OptimConfig  # noqa: E402
from engine.data.batch import PretrainBatch  # noqa: E402
from engine.flops import peak_flops, step_flops  # noqa: E402
from engine.optim import make_optimizer, make_scheduler  # noqa: E402
from engine.plots import save_figure  # noqa: E402
from engine.runtime import optimizer_step  # noqa: E402
from lxmert import LxmertConfig, LxmertForPreTraining  # noqa: E402
from lxmert import attention as attention_backends  # noqa: E402
from lxmert.attention import PackedKeys  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TEXT_LEN, REGIONS = 20, 36  # the authors pad every sentence to 20 tokens; 36 regions an image
AUTHORS_SAMPLES = 171.5e6  # 20 epochs of the authors' 9.18M pairs
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OURS_ATTENTION = ("eager", "sdpa", "triton", "flash")
RESIDENT_BATCHES = 4  # distinct batches cycled by the "resident" data
CLIP = 1.0
# the synthetic data has 54 answers, 49 object and 19 attribute classes: the heads cover them
SMOKE_MODEL = dict(harness.TINY_MODEL, num_qa_labels=60, num_object_labels=50, num_attr_labels=20)
NOT_GPU = "smoke run on the CPU: a tiny model, not a GPU measurement"


# -------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    impl: str  # "hf" (transformers) or "ours"
    attn: str  # ours: eager / sdpa / triton / flash; hf: "hf" (transformers' own attention)
    precision: str  # fp32 / tf32 / bf16 / fp16
    batch: int
    compile: bool = False
    cudagraphs: bool = False  # with compile: mode "reduce-overhead" (ours: train.cuda_graphs)
    loader: str = "resident"
    workers: int = 0  # torch DataLoader workers / DALI threads
    zero: int = 0  # ours: a DeepSpeed ZeRO stage (train.zero_stage) in one process; 0: the plain path

    @property
    def name(self) -> str:
        impl = "hf" if self.impl == "hf" else f"ours-{self.attn}"
        extra = "+cudagraphs" if self.cudagraphs else "+compile" if self.compile else ""
        extra += f"+zero{self.zero}" if self.zero else ""
        data = "" if self.loader == "resident" else f" {self.loader}" + (f"x{self.workers}" if self.workers else "")
        return f"{impl}{extra} {self.precision} b{self.batch}{data}"


def plan(args: argparse.Namespace) -> tuple[list[Variant], list[Variant]]:
    """The headline group (the first precision at the headline batch, every implementation, transformers first:
    the ratio's denominator), then the rest of the sweep: every batch size for bf16 / fp16, the headline batch for
    fp32 / tf32 (their steps are slow). The loader and compiled rows of the headline's best
    run between the two (extra_variants), so a time budget cuts the least telling rows."""

    def group(precision: str, batch: int) -> list[Variant]:
        return [Variant("hf", "hf", precision, batch)] + [Variant("ours", a, precision, batch) for a in args.attn]

    first, head = args.precisions[0], args.headline_batch
    rest = []
    for precision in args.precisions:
        batches = args.batch_sizes if precision in ("bf16", "fp16") else [head]
        rest += [v for b in batches if (precision, b) != (first, head) for v in group(precision, b)]
    return group(first, head), rest


# ------------------------------------------------------------------------------------------------ data


def pad_text(batch: PretrainBatch, length: int) -> PretrainBatch:
    """The batch with its text padded to `length` tokens (the authors' fixed 20): pad id 0, mask 0, label -1."""
    extra = length - batch.input_ids.shape[1]
    if extra <= 0:
        return batch
    pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    old, rows = batch.input_ids.shape[1], batch.mlm_rows  # flat b * L + l: re-spread over the longer rows
    rows = torch.where(rows >= 0, rows // old * length + rows % old, rows)
    unpadding = batch.unpadding
    if unpadding is not None:  # the padded keys are not real: every real one keeps its place in a longer row
        unpadding = replace(unpadding, language=wider(unpadding.language, extra), cross=wider(unpadding.cross, extra))
    return replace(
        batch,
        input_ids=pad(batch.input_ids, 0),
        attention_mask=pad(batch.attention_mask, 0),
        token_type_ids=pad(batch.token_type_ids, 0),
        labels=pad(batch.labels, -1),
        mlm_rows=rows,
        unpadding=unpadding,
    )


def wider(keys: PackedKeys, extra: int) -> PackedKeys:
    """`keys` of a key mask whose rows get `extra` padded keys at their end (device arithmetic: no wait)."""
    rows, width = keys.shape
    indices = keys.indices // width * (width + extra) + keys.indices % width
    return replace(keys, indices=indices, shape=(rows, width + extra))


def hf_inputs(batch: PretrainBatch) -> dict[str, Any]:
    """transformers' keyword arguments: every ignored label (negative here) becomes its ignore index, -100."""
    ignore = lambda t: torch.where(t < 0, torch.full_like(t, -100), t)  # noqa: E731
    inputs = batch.model_inputs()
    for ours_only in ("mlm_rows", "feat_rows", "unpadding"):  # transformers finds these itself
        inputs.pop(ours_only, None)
    inputs["labels"] = ignore(inputs["labels"])
    inputs["ans"] = ignore(inputs["ans"])
    obj = dict(inputs["obj_labels"])
    for key in ("obj", "attr"):
        ids, conf = obj[key]
        obj[key] = (ignore(ids), conf)
    inputs["obj_labels"] = obj
    return inputs


def model_inputs(impl: str, batch: PretrainBatch) -> dict[str, Any]:
    return hf_inputs(batch) if impl == "hf" else batch.model_inputs()


@dataclass
class Data:
    """Batches for one variant: `next_batch()` returns (the batch, the model's keyword arguments)."""

    next_batch: Callable[[], tuple[PretrainBatch, dict[str, Any]]]
    close: Callable[[], None]


class Stores:
    """The synthetic store every variant reads, and the resident batches drawn from it once per batch size."""

    def __init__(self, data_dir: Path, images: int, feat_dim: int, device: torch.device, vocab_size: int) -> None:
        self.text, self.regions = dataset(data_dir, images, feat_dim)
        self.device, self.vocab_size = device, vocab_size
        self._resident: dict[int, list[PretrainBatch]] = {}

    def sampling(self, batch: int):
        from engine.data.sampling import SamplingConfig

        return SamplingConfig(seed=0, batch_size=batch, vocab_size=self.vocab_size)

    def resident(self, batch: int) -> list[PretrainBatch]:
        if batch not in self._resident:
            from engine.data.loaders import make_loader

            sampling = self.sampling(batch)  # with the flash backend's unpadding, which the other backends ignore
            loader = make_loader("torch", self.text, self.regions, sampling, self.device, num_workers=0, unpadding=True)
            batches = []
            for b in endless(loader):
                batches.append(pad_text(b, TEXT_LEN))
                if len(batches) == RESIDENT_BATCHES:
                    break
            self._resident[batch] = batches
        return self._resident[batch]

    def data(self, variant: Variant) -> Data:
        if variant.loader == "resident":
            prepared = itertools.cycle([(b, model_inputs(variant.impl, b)) for b in self.resident(variant.batch)])
            return Data(lambda: next(prepared), lambda: None)
        from engine.data.loaders import make_loader

        options = {} if variant.loader == "gpu" else {"num_workers": variant.workers}
        options["unpadding"] = variant.attn == "flash"  # found by the loader, as lxmert-pretrain's loaders do
        loader = make_loader(
            variant.loader, self.text, self.regions, self.sampling(variant.batch), self.device, **options
        )
        batches = endless(loader)

        def next_batch():
            batch = pad_text(next(batches), TEXT_LEN)
            return batch, model_inputs(variant.impl, batch)

        return Data(next_batch, lambda: batches.close())


def batch_flops(config: LxmertConfig, batch: PretrainBatch) -> int:
    """Model FLOPs of one step on `batch` (engine.flops: its shape, masked tokens and regions)."""
    samples, tokens = batch.input_ids.shape
    regions = batch.visual_feats.shape[1]
    return step_flops(config, "pretrain", samples, tokens, regions, batch.masked_tokens, batch.masked_regions).total


# ---------------------------------------------------------------------------------------------- models


class Skip(Exception):
    """A variant that cannot run here; its message becomes the row's note."""


def model_config(args: argparse.Namespace) -> LxmertConfig:
    return LxmertConfig(**SMOKE_MODEL, visual_feat_dim=harness.TINY_FEAT_DIM) if args.smoke else LxmertConfig()


def check_runnable(variant: Variant, device: torch.device) -> None:
    """Raise Skip with the reason when a variant cannot run on this machine."""
    if variant.impl == "ours" and variant.attn not in attention_backends.available_backends():
        raise Skip(
            f"lxmert.attention has no {variant.attn!r} backend (available: "
            f"{', '.join(attention_backends.available_backends())})"
        )
    if variant.attn == "flash":
        if variant.precision in ("fp32", "tf32"):
            raise Skip("flash attention runs in bf16 / fp16 only")
        if device.type != "cuda":
            raise Skip("flash-attn runs on CUDA GPUs only")
        try:
            attention_backends.get_backend("flash")
        except ImportError as error:
            raise Skip(f"flash-attn not importable ({error.__cause__ or error})") from None
    if variant.zero:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise Skip("DeepSpeed is not installed")
    if variant.compile and device.type != "cuda":
        raise Skip("torch.compile rows run on a GPU only (a CPU compile takes ~20 s and says nothing of GPU speed)")
    if variant.precision == "tf32" and device.type != "cuda":
        raise Skip("TF32 is a GPU matmul mode")
    if variant.loader == "dali":
        import importlib.util

        if importlib.util.find_spec("nvidia.dali") is None:
            raise Skip("DALI is not installed (the [data] extra)")


def build_model(variant: Variant, config: LxmertConfig, master: dict[str, torch.Tensor], device: torch.device):
    """The variant's model on the device with the master weights (ours' layout), in train mode; transformers'
    compiled here, ours by the engine's Runtime (train.compile, train.cuda_graphs)."""
    if variant.impl == "hf":
        import transformers
        from transformers.initialization import no_init_weights

        from lxmert.convert import to_hf_state_dict

        with torch.device(device), no_init_weights():
            model = transformers.LxmertForPreTraining(transformers.LxmertConfig(**config.to_hf_dict()))
        model.tie_weights()
        model.load_state_dict(to_hf_state_dict(master), strict=True)
    else:
        feat_loss = "triton" if variant.attn == "triton" else "torch"
        ours = LxmertConfig(**{**config.to_dict(), "attn_backend": variant.attn, "feat_loss_backend": feat_loss})
        with torch.device(device):
            model = LxmertForPreTraining(ours)
        model.load_state_dict(master)
    model.train()
    if variant.compile and variant.impl == "hf":
        model = torch.compile(model, mode="reduce-overhead" if variant.cudagraphs else None)
    return model


def master_weights(config: LxmertConfig, device: torch.device) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with torch.device(device):
        model = LxmertForPreTraining(config)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cudagraph_skips() -> int:
    """Graphs inductor has so far declined to capture in a CUDA graph (TORCH_LOGS=cudagraphs prints why)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


# ----------------------------------------------------------------------------------------------- steps


OPTIM = OptimConfig(name="adamw", lr=1e-5, warmup_ratio=0.0, schedule="constant", grad_clip=CLIP)


class HfStep:
    """transformers' model stepped as a bare training loop would: forward, backward, the optimizer (the same
    fused AdamW, clipping and non-finite check as the engine's plain path); `step` marks its phases."""

    def __init__(self, variant: Variant, model, device: torch.device) -> None:
        self.variant, self.model, self.device = variant, model, device
        self.optimizer = make_optimizer(model, OPTIM)
        self.scheduler = make_scheduler(self.optimizer, OPTIM, total_steps=10**9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
        self.dtype = PRECISIONS[variant.precision]
        self.skipped = 0

    def step(self, data: Data, clock: harness.StepClock) -> tuple[PretrainBatch, torch.Tensor]:
        batch, inputs = data.next_batch()
        clock.mark("data")
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.model(**inputs).loss
        clock.mark("forward")
        self.scaler.scale(loss.float()).backward()
        clock.mark("backward")
        _, skipped = optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, CLIP)
        self.skipped += skipped  # a device tensor: read once, after the timing
        clock.mark("optimizer")
        return batch, loss.detach().clone()


class EngineStep:
    """Ours: the engine's own step, engine.train.TrainStep over engine.runtime.Runtime (what lxmert-pretrain
    runs each step: autocast and the loss scaler, the per-micro-batch loss and FLOP bookkeeping, the optimizer
    step with clipping and the non-finite check), so its samples/s are the loop's. The Runtime applies the
    variant's train.compile / train.cuda_graphs and, with `zero`, runs DeepSpeed in a world of one."""

    def __init__(self, variant: Variant, model, device: torch.device) -> None:
        from engine.config import RunConfig, TrainConfig, resolve
        from engine.runtime import Runtime
        from engine.tasks.pretrain import PretrainTask
        from engine.train import TrainStep

        self.variant = variant
        precision = "fp32" if variant.precision == "tf32" else variant.precision  # TF32: a matmul mode of fp32
        train = TrainConfig(batch_size=variant.batch, precision=precision, zero_stage=variant.zero)
        train.compile, train.cuda_graphs = variant.compile, variant.cudagraphs
        config = resolve(RunConfig(optim=OPTIM, train=train), 1)
        config.model = model.config
        runtime = Runtime(model, config, total_steps=10**9, device=device, use_deepspeed=variant.zero > 0)
        task = PretrainTask()
        task.config = config
        self.engine = TrainStep(runtime, task, accum=1, world_size=1, device=device)
        self.skipped = 0

    def step(self, data: Data, clock: harness.StepClock) -> tuple[PretrainBatch, torch.Tensor]:
        drawn: list[PretrainBatch] = []

        def micro() -> Iterator[PretrainBatch]:
            batch, _ = data.next_batch()
            drawn.append(batch)
            yield batch

        result = self.engine.train_step(micro(), clock)
        self.skipped += result["skipped"]  # device tensors: read once, after the timing
        return drawn[0], result["loss"]


def step_runner(variant: Variant, model, device: torch.device) -> HfStep | EngineStep:
    return HfStep(variant, model, device) if variant.impl == "hf" else EngineStep(variant, model, device)


def matmul_precision(precision: str) -> str:
    return "high" if precision == "tf32" else "highest"


def peak_for(variant: Variant, device: torch.device, given_tflops: float | None) -> tuple[float | None, str]:
    """Peak FLOP/s used for MFU, and where it comes from."""
    if given_tflops:
        return given_tflops * 1e12, f"given: --peak-tflops {given_tflops:g}"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    kind = variant.precision  # engine.flops' names: fp32, tf32, bf16, fp16
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, kind)
    if peak is None:
        return None, f"{name} is not in engine.flops.PEAK_TFLOPS (pass --peak-tflops)"
    return peak, f"engine.flops.PEAK_TFLOPS, {kind} dense, for {name}"


@contextlib.contextmanager
def warmed_up(variant: Variant, args, config, master, stores: Stores, device) -> Iterator[tuple]:
    """(step runner, data, warm-up losses) of the variant after its warm-up steps; the data closed on exit."""
    torch.set_float32_matmul_precision(matmul_precision(variant.precision))
    data = None
    try:
        trainer = step_runner(variant, build_model(variant, config, master, device), device)
        data = stores.data(variant)
        losses = []
        for _ in range(args.warmup + (args.compile_warmup if variant.compile else 0)):
            losses.append(trainer.step(data, harness.StepClock(device, sync=False))[1])
        harness.synchronize(device)
        yield trainer, data, losses
    finally:
        if data is not None:
            data.close()


def measure(variant: Variant, args, config, master, stores: Stores, device) -> dict[str, Any]:
    """The variant's numbers (benchmarks/README.md); raises Skip or an exception when it cannot run."""
    check_runnable(variant, device)
    skips_before = cudagraph_skips()
    with warmed_up(variant, args, config, master, stores, device) as (trainer, data, losses):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # throughput: free-running steps, one synchronisation at the end (FLOPs are host arithmetic on the shapes)
        flops, waits = 0, 0.0
        start = time.perf_counter()
        for _ in range(args.steps):
            clock = harness.StepClock(device, sync=False)
            batch, loss = trainer.step(data, clock)
            waits += clock.phases["data"]
            flops += batch_flops(config, batch)
            losses.append(loss)
        harness.synchronize(device)
        elapsed = time.perf_counter() - start
        peak_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

        # breakdown: the device synchronised between phases
        phases: dict[str, list[float]] = {p: [] for p in ("data", "forward", "backward", "optimizer")}
        totals = []
        for _ in range(args.breakdown_steps):
            clock = harness.StepClock(device, sync=True)
            trainer.step(data, clock)
            for phase, seconds in clock.phases.items():
                phases[phase].append(seconds * 1e3)
            totals.append(clock.total * 1e3)

    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    step_s = elapsed / args.steps
    samples_per_s = variant.batch / step_s
    flops_per_step = flops / args.steps
    peak, peak_source = peak_for(variant, device, args.peak_tflops)
    achieved = flops_per_step / step_s
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    return {
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * (TEXT_LEN + REGIONS),
        "step_ms": step_s * 1e3,
        "flops_per_step": flops_per_step,
        "tflops": achieved / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "peak_source": peak_source,
        "mfu": None if peak is None else achieved / peak,
        "data_wait_share": waits / elapsed,
        "peak_memory_gib": peak_memory,
        "breakdown_ms": {p: mean(v) for p, v in phases.items()},
        "breakdown_step_ms": mean(totals),
        "loss_first": loss_values[0],
        "loss_last": loss_values[-1],
        "losses_finite": all(math.isfinite(x) for x in loss_values),
        "skipped_steps": int(trainer.skipped),
        "cudagraph_skips": cudagraph_skips() - skips_before if variant.cudagraphs else None,
    }


# ---------------------------------------------------------------------------------------------- parity


@torch.no_grad()
def parity(precision: str, config: LxmertConfig, master, batch: PretrainBatch, device) -> dict[str, Any]:
    """transformers' and our loss on one batch with the same weights, eval mode (no dropout)."""
    dtype = PRECISIONS[precision]
    torch.set_float32_matmul_precision(matmul_precision(precision))
    out = {}
    for impl, attn in (("hf", "hf"), ("ours", "eager")):
        variant = Variant(impl, attn, precision, batch.batch_size)
        model = build_model(variant, config, master, device).eval()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            result = model(**model_inputs(variant.impl, batch))
        out[variant.impl] = float(result.loss)
        if variant.impl == "ours":
            out["components"] = {k: float(v) for k, v in result.losses.items()}
        del model
    row = dict(kind="parity", precision=precision, batch=batch.batch_size, loss_hf=out["hf"], loss_ours=out["ours"])
    return row | {"loss_components_ours": out["components"], "rel_diff": abs(out["ours"] - out["hf"]) / abs(out["hf"])}


# ----------------------------------------------------------------------------------------------- profile


KERNEL_KINDS = [  # (kind, substrings of kernel or op names), first match wins
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("attention", ("flash", "fmha", "attention", "bidirectional", "_attn", "attn_")),  # ours: *_attention_*, *bidir*
    ("feature regression (ours)", ("feature_regression",)),
    ("torch.compile (inductor)", ("triton_",)),
    ("matmul", tuple("gemm cutlass xmma cublas matmul wgmma sm90_ sm80_ ::mm addmm bmm".split())),
    ("copies", ("memcpy", "memset", "copy")),
    (
        "norm / softmax / elementwise",
        tuple("norm softmax elementwise vectorized reduce gelu dropout index gather scatter nonzero cat fill".split())
        + ("where", "mul", "add"),
    ),
]


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def profile(variant: Variant, args, config, master, stores: Stores, device) -> str:
    """Top kernels by GPU time (CPU time without a GPU) over a few steps of `variant`, as Markdown."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    with warmed_up(variant, args, config, master, stores, device) as (trainer, data, _):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                trainer.step(data, harness.StepClock(device, sync=False))
            harness.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    if cuda:  # the kernels (and copies) themselves: the CPU ops that launched them report the same time again
        from torch.autograd import DeviceType

        timed = [
            (e.key, e.self_device_time_total, e.count)
            for e in events
            if e.device_type != DeviceType.CPU and e.self_device_time_total > 0
        ]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events if e.self_cpu_time_total > 0]
    timed.sort(key=lambda t: -t[1])
    total = sum(t[1] for t in timed) or 1.0
    what = "GPU kernels" if cuda else "CPU ops (self time; no GPU)"
    n = args.profile_steps
    top = [
        dict(rank=i + 1, name=name[:110], kind=kernel_kind(name), ms=us / 1e3 / n, share=us / total, calls=count // n)
        for i, (name, us, count) in enumerate(timed[: args.profile_top])
    ]
    kinds: dict[str, float] = {}
    for name, us, _ in timed:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    kind_rows = [
        dict(kind=k, ms=us / 1e3 / n, share=us / total) for k, us in sorted(kinds.items(), key=lambda x: -x[1])
    ]
    busy = total / wall_us
    env = harness.environment()
    header = f"# Profile of {variant.name}: top {what} by time\n\n"
    if not cuda:
        header += f"**{NOT_GPU}.** CPU op times say nothing about where GPU time goes.\n\n"
    return (
        header + f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {env['date']}; {args.profile_steps} "
        f"steps after {args.warmup} warm-up steps; per-step times. {'Device' if cuda else 'Op'} time summed over "
        f"kernels is {busy:.0%} of the wall time (below 100%: the {'GPU' if cuda else 'CPU'} waits for the host or "
        f"for data).\n\n## By kind\n\n{harness.markdown_table(kind_rows, 'kind; ms=ms a step; share')}\n"
        f"## Top {len(top)}\n\n{harness.markdown_table(top, 'rank; name; kind; ms=ms a step; share; calls')}\n"
        f"## What would make it faster\n\n{speedup_notes(kind_rows, busy, cuda)}"
    )


def speedup_notes(kind_rows: list[dict], busy: float, cuda: bool) -> str:
    """Where the time went, as leads for the next change (each from the profile's shares)."""
    share = {r["kind"]: r["share"] for r in kind_rows}
    lines = []
    if cuda and busy < 0.9:
        lines.append(
            f"- The GPU is busy {busy:.0%} of the wall time: launch and host overhead shows (the step makes "
            "no host wait between log lines, so it is the many small kernels). CUDA graphs (torch.compile "
            "mode reduce-overhead) or fusing them would cut it: the masked rows already come in a handful "
            "of bucket sizes."
        )
    memory_bound = share.get("norm / softmax / elementwise", 0.0) + share.get("copies", 0.0)
    lines.append(
        f"- Memory-bound work (norms, softmax, GELU, dropout, residual adds, copies): {memory_bound:.0%}. "
        "Fusing each LayerNorm with its dropout and residual add, and GELU into the FFN matmul's epilogue "
        "(torch.compile, or Triton kernels), removes passes over the activations."
    )
    lines.append(
        f"- Matmuls: {share.get('matmul', 0.0):.0%}. They are the model FLOPs MFU counts; at hidden 768 and "
        "56 tokens a sample, a larger batch keeps them efficient."
    )
    attention = share.get("attention", 0.0)
    worth = (
        "a faster attention kernel cannot move the step by more than that"
        if attention < 0.15
        else "worth a faster kernel"
    )
    lines.append(f"- Attention: {attention:.0%}: {worth}.")
    lines.append(
        f"- Optimizer: {share.get('optimizer', 0.0):.0%} (one fused AdamW pass over every parameter; ZeRO-1 "
        "and up divide it by the GPU count)."
    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ report

COLUMNS = (
    "name=variant; samples_per_s=samples/s; tokens_per_s=tokens/s; tflops=TFLOP/s; mfu=MFU; speedup_vs_hf=x HF; "
    "step_ms=step ms; data_wait_share=data wait; peak_memory_gib=peak GiB; note"
)
BREAKDOWN_COLUMNS = (
    "name=variant; bd_data=data ms; bd_forward=forward ms; bd_backward=backward ms; bd_optimizer=optimizer ms; "
    "breakdown_step_ms=synced step ms; step_ms=free-running step ms"
)
PARITY_COLUMNS = "precision; batch; loss_hf=transformers; loss_ours=ours; rel_diff=rel. diff"


def fastest(rows: list[dict[str, Any]], impl: str) -> dict[str, Any] | None:
    """The fastest row of `impl` on resident data (the model's speed; the loader rows say what data costs)."""
    timed = [r for r in rows if r.get("impl") == impl and r.get("samples_per_s") and r["loader"] == "resident"]
    return max(timed, key=lambda r: r["samples_per_s"], default=None)


def report(rows: list[dict[str, Any]], parity_rows: list[dict[str, Any]], smoke: bool) -> str:
    env = rows[0] if rows else harness.environment()
    where = f"**{NOT_GPU}.**" if smoke else f"GPU measurements on {env['device']}."
    lines = [
        f"# Pre-training throughput: {where}\n",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, deepspeed "
        f"{env['deepspeed']}, DALI {env['dali']}, CUDA {env['cuda']}; commit {env['commit']}, {env['date']}.\n",
    ]
    best, hf_best = fastest(rows, "ours"), fastest(rows, "hf")
    if best:
        mfu = f"{best['mfu']:.1%}" if best.get("mfu") is not None else "n/a"
        ratio = f"{best['speedup_vs_hf']:.2f}x" if best.get("speedup_vs_hf") else "n/a"
        rate = lambda r: f"{r['samples_per_s']:.1f} samples/s"  # noqa: E731
        times = lambda r: f"{best['samples_per_s'] / r['samples_per_s']:.2f}x"  # noqa: E731
        vs_best = f"; {times(hf_best)} transformers' best ({hf_best['name']}, {rate(hf_best)})" if hf_best else ""
        lines.append(
            f"Best of ours: **{best['name']}**, {rate(best)}, {best['tflops']:.1f} TFLOP/s, MFU {mfu} (peak: "
            f"{best['peak_source']}); {ratio} transformers' LxmertForPreTraining at the same precision, batch and "
            f"data{vs_best}. The authors' 20 epochs ({AUTHORS_SAMPLES / 1e6:g}M samples) at this rate on one device: "
            f"{AUTHORS_SAMPLES / best['samples_per_s'] / 3600:.1f} hours.\n"
        )
    lines.append(f"## Every variant\n\n{harness.markdown_table(rows, COLUMNS)}")
    timed = [
        {**r, **{f"bd_{phase}": ms for phase, ms in r["breakdown_ms"].items()}} for r in rows if r.get("breakdown_ms")
    ]
    lines.append(
        "## Step-time breakdown (device synchronised between phases, so slower than free-running)\n\n"
        + harness.markdown_table(timed, BREAKDOWN_COLUMNS)
    )
    if parity_rows:
        lines.append(
            "## Same weights, same batch: transformers' loss and ours (eval mode)\n\n"
            + harness.markdown_table(parity_rows, PARITY_COLUMNS)
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], smoke: bool) -> Figure:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get("samples_per_s") and r["loader"] == "resident" and not r["compile"]:
            zero = f"+zero{r['zero']}" if r.get("zero") else ""
            label = ("hf (AMP)" if r["impl"] == "hf" else f"ours-{r['attn']}{zero}") + f" {r['precision']}"
            series.setdefault(label, []).append((r["batch"], r["samples_per_s"]))
    device = rows[0]["device"] if rows else "?"
    title = f"LXMERT pre-training step, {device}" + (" (CPU smoke: not GPU numbers)" if smoke else "")
    return harness.line_chart(series, title, "batch size", "samples/s", log2_x=True)


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a couple of steps: the CPU check")
    parser.add_argument("--quick", action="store_true", help="bf16 at batch 128 only, fewer steps")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 64 128 256 (smoke: 2)")
    parser.add_argument("--headline-batch", type=int, default=256, help="the batch every variant runs at")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), help="default bf16 fp16 fp32 tf32")
    parser.add_argument("--attn", nargs="+", default=[*OURS_ATTENTION], choices=OURS_ATTENTION, help="ours (all)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; smoke 1)")
    parser.add_argument("--compile-warmup", type=int, default=10, help="more warm-up steps for torch.compile")
    parser.add_argument("--steps", type=int, help="free-running timed steps (default 20; smoke 2)")
    parser.add_argument("--breakdown-steps", type=int, help="synchronised steps (default 10; smoke 2)")
    parser.add_argument("--loader-workers", type=int, default=4, help="torch workers / DALI threads of the loader rows")
    parser.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: engine.flops' table)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of the best configuration")
    parser.add_argument("--time-budget", type=float, default=420.0, help="no variant starts after this many seconds")
    parser.add_argument("--images", type=int, help="images in the synthetic store (default 512; smoke 12)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "lxmert-throughput-bench")
    parser.add_argument("--out", type=Path, help="rows (default runs/benchmarks/throughput[_smoke_cpu].jsonl)")
    args = parser.parse_args(argv)
    quick = dict(batch_sizes=[128], precisions=["bf16"], warmup=3, steps=10, breakdown_steps=5, images=512)
    smoke = dict(batch_sizes=[2], precisions=["fp32"], warmup=1, steps=2, breakdown_steps=2, images=12)
    full = dict(batch_sizes=[64, 128, 256], precisions="bf16 fp16 fp32 tf32".split(), warmup=5, steps=20)
    full.update(breakdown_steps=10, images=512)
    defaults = smoke if args.smoke else quick if args.quick else full
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick or args.smoke:
        args.headline_batch = args.batch_sizes[0]
    if args.out is None:
        args.out = harness.RUNS_DIR / ("throughput_smoke_cpu.jsonl" if args.smoke else "throughput.jsonl")
    args.profile_steps = min(args.profile_steps, 2) if args.smoke else args.profile_steps
    return args


def extra_variants(best: Variant, args: argparse.Namespace) -> list[Variant]:
    """After the headline group, its best of ours: under DeepSpeed ZeRO-1 in bf16 (the multi-GPU recipe's step, in
    one process) and with CUDA graphs (train.cuda_graphs) first, so a time budget keeps them; then with every
    loader, then compiled without graphs."""
    loaders = [
        replace(best, loader="torch", workers=0 if args.smoke else args.loader_workers),
        replace(best, loader="gpu"),
        replace(best, loader="dali", workers=2 if args.smoke else args.loader_workers),
    ]
    first = [replace(best, precision="bf16", zero=1), replace(best, compile=True, cudagraphs=True)]
    return first + loaders + [replace(best, compile=True)]


def run(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no GPU: the throughput sweep only runs on a GPU; `--smoke` checks the script on the CPU")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:  # tiny ops: a second thread gains nothing, and spinning threads on a busy machine cost seconds
        torch.set_num_threads(1)
    start = time.perf_counter()
    config = model_config(args)
    env = harness.environment()
    common = dict(env, benchmark="throughput", smoke=args.smoke, text_len=TEXT_LEN, regions=REGIONS)
    common.update(hidden_size=config.hidden_size, layers=[config.l_layers, config.r_layers, config.x_layers])
    common.update(warmup=args.warmup, steps=args.steps, breakdown_steps=args.breakdown_steps)
    common.update(optimizer="adamw (fused)", grad_clip=CLIP, note=NOT_GPU if args.smoke else None)
    where = "smoke run, CPU" if args.smoke else env["device"]
    print(f"{where}: model hidden {config.hidden_size}, rows to {args.out}", flush=True)
    stores = Stores(args.data_dir, args.images, config.visual_feat_dim, device, config.vocab_size)
    master = master_weights(config, device)

    parity_rows = []
    for precision in args.precisions:
        if precision == "tf32" and not cuda:
            continue
        row = {**common, **parity(precision, config, master, stores.resident(args.batch_sizes[0])[0], device)}
        parity_rows.append(row)
        harness.append_rows(args.out, [row])
        print(
            f"parity {precision}: transformers {row['loss_hf']:.6f}, ours {row['loss_ours']:.6f} "
            f"(rel. diff {row['rel_diff']:.2g})",
            flush=True,
        )

    headline_group, rest = plan(args)
    rows: list[dict[str, Any]] = []
    hf_rate: dict[tuple, float] = {}

    def one(variant: Variant) -> None:
        if time.perf_counter() - start > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: {variant.name} not run", flush=True)
            return
        base = {**common, **asdict(variant), "name": variant.name, "kind": "throughput"}
        t0 = time.perf_counter()
        try:
            numbers = measure(variant, args, config, master, stores, device)
        except Skip as reason:
            row = {**base, "note": f"skipped: {reason}"}
        except Exception as error:  # out of memory, a backend refusing a shape: a row saying so, the sweep goes on
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            row = {**base, "note": f"failed: {type(error).__name__}: {first[:300]}"}
            traceback.print_exc(limit=3)
        else:
            row = {**base, **numbers}
            key = (variant.precision, variant.batch, variant.loader)
            if variant.impl == "hf":
                hf_rate[key] = numbers["samples_per_s"]
            elif key in hf_rate:
                row["speedup_vs_hf"] = numbers["samples_per_s"] / hf_rate[key]
        if cuda:
            torch.cuda.empty_cache()
        harness.append_rows(args.out, [row])
        rows.append(row)
        rate = f"{row['samples_per_s']:.1f} samples/s" if row.get("samples_per_s") else row["note"]
        print(f"  {variant.name}: {rate} ({time.perf_counter() - t0:.1f} s)", flush=True)

    for variant in headline_group:
        one(variant)
    top = fastest(rows, "ours")
    if top:
        for variant in extra_variants(Variant("ours", top["attn"], top["precision"], top["batch"]), args):
            if variant.loader != "resident":  # transformers with the same loader: the ratio's denominator
                one(replace(variant, impl="hf", attn="hf"))
            one(variant)
    for variant in rest:
        one(variant)

    md = args.out.with_suffix(".md")
    md.write_text(report(rows, parity_rows, args.smoke), encoding="utf-8")
    if any(r.get("samples_per_s") for r in rows):
        figure = plot(rows, args.smoke)
        for suffix in (".svg", ".png"):
            save_figure(figure, args.out.with_suffix(suffix))
    top = fastest(rows, "ours")
    if top and top["compile"] and time.perf_counter() - start > args.time_budget:  # a profile would compile again
        top = fastest([r for r in rows if not r["compile"]], "ours")
        print(f"time budget spent: the profile is of {top['name'] if top else 'nothing'}, not compiled", flush=True)
    if top and not args.no_profile:
        fields = ("compile", "cudagraphs", "zero")
        variant = Variant("ours", top["attn"], top["precision"], top["batch"], **{k: top[k] for k in fields})
        text = profile(variant, args, config, master, stores, device)
        args.out.with_name(args.out.stem + "_profile.md").write_text(text, encoding="utf-8")
    print(harness.markdown_table(rows, COLUMNS))
    print(
        f"{len(rows) + len(parity_rows)} rows to {args.out}; summary {md}; {time.perf_counter() - start:.0f} s in all"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
