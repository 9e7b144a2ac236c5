"""The pre-training loop: the Trainer owns data, model, the runtime (engine/runtime.py), checkpoints and logs.

    trainer = Trainer(load_config("configs/tiny_cpu.yaml"))
    summary = trainer.train()          # until train.max_steps or train.epochs; resumes per train.resume

The runtime steps the model on one of two paths with the same semantics (DeepSpeed when it imports and
train.zero_stage > 0 or a launcher started us (WORLD_SIZE set); plain PyTorch otherwise): global batch = micro x
accumulation x ranks, clipping, one schedule step per optimizer step, a non-finite step skipped and logged.

Each optimizer step times the wait for data, forward+backward, and the optimizer; every train.log_every steps a
JSON line goes to <output_dir>/metrics.jsonl (engine/metrics_log.py) with the loss components, lr, gradient
norm, loss scale, samples/s, tokens/s (text tokens + regions, padding included), TFLOP/s and MFU (engine/flops.py,
model FLOPs of this rank over this rank's peak; null where the peak is unknown, e.g. the CPU), the share of
time spent waiting for data, peak memory, this rank's threads and the time left. The host still waits for the
device several times a step (each loss component, the masked counts for the FLOP figure, the gradient norm that
decides a skip). The stores are opened and checked against each other and the model before anything is built
or written (open_pretrain_stores): a problem is a ConfigError naming the data.* key.

Evaluation (data.eval stores set): every train.eval_every steps (0: at the end of every epoch) and at the end,
the validation losses (each component, averaged over the split's samples and the ranks) and the QA and
image-text matching accuracies, as records {"kind": "eval", ...} in metrics.jsonl. The validation masks and
negatives are drawn as in training with epoch 0 of the eval sampler: the same every time, so evaluations are
comparable. At the end, loss / throughput plots (engine/plots.py) go to <output_dir>/plots/.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch

from engine import checkpoint as ckpt
from engine.config import ConfigError, RunConfig, StorePaths, resolve, save_config
from engine.data.batch import PretrainBatch
from engine.data.loaders import make_loader
from engine.data.sampling import SamplingConfig
from engine.data.store import RegionStore, StoreError, TextStore
from engine.flops import mfu, peak_flops, step_flops
from engine.launch import Launch, all_reduce_sum, choose_deepspeed, pick_device, set_threads
from engine.metrics_log import MetricsLog, console_line, peak_memory_gib
from engine.runtime import Runtime
from lxmert.config import LxmertConfig
from lxmert.pretraining import LxmertForPreTraining

BUCKET_BATCHES = 100  # data.length_bucketing: sort by length within windows of this many global batches


def write_run_plots(metrics_path: Path, out_dir: Path) -> list[Path]:
    """engine.plots.write_plots, never failing a finished run: a problem is printed and the run goes on."""
    try:
        from engine.plots import write_plots

        return write_plots(metrics_path, out_dir)
    except Exception as error:  # the run's results are written; a plot is a convenience
        print(f"plots not written: {type(error).__name__}: {error}", flush=True)
        return []


STORE_KINDS = {"RegionStore": "feature store", "TextStore": "text store", "TaskStore": "task store"}


def open_store(path: str, key: str, kind: type, build: str):
    """A store named by config key `key`, opened; any problem is a ConfigError naming the key and the path."""
    what = STORE_KINDS.get(kind.__name__, "store")
    if not path:
        raise ConfigError(f"{key} is empty: it must name a {what} directory (built by {build}), or pass --config "
                          "configs/<recipe>.yaml")  # fmt: skip
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: the {what} {path} does not exist (build it with {build})")
    try:
        return kind(path)
    except (StoreError, OSError, KeyError, ValueError) as error:
        raise ConfigError(f"{key}: {error}") from None


def open_pretrain_stores(stores: StorePaths, split: str, model: LxmertConfig) -> tuple[TextStore, RegionStore]:
    """The text and feature stores of data.<split>, checked against each other and against the model."""
    regions = open_store(stores.features, f"data.{split}.features", RegionStore, "engine.data.convert --tsv")
    text = open_store(stores.text, f"data.{split}.text", TextStore, "engine.data.convert --text")
    try:
        text.check_features(regions)
    except StoreError as error:
        raise ConfigError(f"data.{split}: {error}") from None
    if regions.feat_dim != model.visual_feat_dim:
        raise ConfigError(f"data.{split}.features {regions.path} holds {regions.feat_dim}-d features but "
                          f"model.visual_feat_dim is {model.visual_feat_dim}")  # fmt: skip
    if model.task_qa and len(text.answers) != model.num_qa_labels:  # the head is the table, as the authors size it
        raise ConfigError(f"data.{split}.text {text.path} has {len(text.answers)} answers but the QA head has "
                          f"model.num_qa_labels {model.num_qa_labels}: make them equal")  # fmt: skip
    return text, regions


class Trainer:
    """Builds everything from a RunConfig; `train()` runs the loop and returns a summary dict."""

    def __init__(self, config: RunConfig, use_deepspeed: bool | None = None, export_hf: bool = False) -> None:
        self.launch = Launch.from_env()
        self.rank, self.local_rank, world = self.launch.rank, self.launch.local_rank, self.launch.world_size
        self.use_deepspeed = choose_deepspeed(config.train.zero_stage, use_deepspeed, self.launch)
        self.world_size = world
        self.config = resolve(config, world)
        self.export_hf = export_hf
        t = self.config.train
        self.output_dir = Path(t.output_dir)
        self.device = pick_device(self.local_rank)
        self.threads = set_threads(t.threads, self.launch)
        for split in ("train", "eval") if self.config.data.eval.text else ("train",):
            open_pretrain_stores(getattr(self.config.data, split), split, self.config.model)  # before the build

        torch.manual_seed(t.seed)  # initialisation, then dropout
        self.model = LxmertForPreTraining(self.config.model).to(self.device)
        self.loader = self._make_loader(self.config.data.train, "train")
        self.eval_loader = self._make_loader(self.config.data.eval, "eval") if self.config.data.eval.text else None
        self.accum = t.grad_accum_steps
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.train: an epoch has {len(self.loader)} micro batches, fewer than "
                              f"train.grad_accum_steps {self.accum}")  # fmt: skip
        self.total_steps = t.total_steps(self.steps_per_epoch)
        self.runtime = Runtime(self.model, self.config, self.total_steps, self.device, self.use_deepspeed, self.launch)
        self.step = 0  # optimizer steps done (skipped ones included, as DeepSpeed counts them)
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []  # every logged training record
        self.evals: list[dict[str, Any]] = []  # every evaluation record
        self.last_checkpoint: Path | None = None
        self._resume()
        if self.rank == 0:  # only once everything the run reads has been checked
            save_config(self.config, self.output_dir / "config.yaml")

    @property
    def engine(self):
        """The DeepSpeed engine (None on the plain path)."""
        return self.runtime.engine

    # ------------------------------------------------------------------------------------------- building

    def _make_loader(self, stores: StorePaths, split: str = "train"):
        """The loader of one split's stores; a missing, unfinished or mismatched store is a ConfigError naming
        the data.<split> key."""
        c, d = self.config, self.config.data
        text, regions = open_pretrain_stores(stores, split, c.model)
        sampling = SamplingConfig(
            seed=d.seed, batch_size=c.train.micro_batch_size, world_size=self.world_size, rank=self.rank,
            bucket_batches=BUCKET_BATCHES if d.length_bucketing else 0, word_mask_prob=d.word_mask_prob,
            region_mask_prob=d.region_mask_prob, negative_prob=d.negative_prob, vocab_size=c.model.vocab_size,
            sources=tuple(d.sources),
        )  # fmt: skip
        options: dict[str, Any] = {}
        if d.loader in ("torch", "dali"):
            options["num_workers"] = d.num_workers
        unknown = set(d.sources) - set(text.sources)
        if unknown:
            raise ConfigError(f"data.sources: {sorted(unknown)} are not in the data.{split}.text store {text.path} "
                              f"(it has {text.sources}; [] takes every source)")  # fmt: skip
        try:
            return make_loader(d.loader, text, regions, sampling, device=self.device, **options)
        except (ValueError, StoreError) as error:
            raise ConfigError(f"data.{split}: {error}") from None

    # -------------------------------------------------------------------------------------------- resume

    def _resume(self) -> None:
        try:
            path = ckpt.resolve_resume(self.config.train.resume, self.output_dir)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        if path is None:
            return
        state = self.runtime.load(path, self.rank)
        self.loader.load_state_dict(state["loader"])
        self.step, self.skipped_steps = int(state["step"]), int(state.get("skipped_steps", 0))
        self.evals = list(state.get("evals", []))
        self.last_checkpoint = path
        self._print(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        client = {"loader": self.loader.state_dict(), "step": self.step, "skipped_steps": self.skipped_steps,
                  "evals": self.evals}  # fmt: skip
        self.last_checkpoint = self.runtime.save(self.output_dir, self.step, client, self.rank)
        return self.last_checkpoint

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in fp32 on the CPU (ZeRO-3 gathers the shards; {} on ranks > 0 then)."""
        return self.runtime.consolidated_state_dict()

    def export(self) -> Path | None:
        state = self.consolidated_state_dict()
        if self.rank != 0:
            return None
        return ckpt.export_model(state, self.config.model, self.output_dir, hf=self.export_hf)

    # ---------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation losses and accuracies over the whole eval split (every rank takes its slice)."""
        assert self.eval_loader is not None, "data.eval.text is not set"
        was_training = self.runtime.training
        self.runtime.train(False)
        self.eval_loader.set_epoch(0)
        names: list[str] = []
        sums: torch.Tensor | None = None  # [loss, components..., samples, qa right, qa asked, match right]
        for batch in self.eval_loader:
            out = self.runtime.forward(**self._inputs(batch).model_inputs())
            n = batch.input_ids.shape[0]
            if not names:
                names = list(out.losses)  # the model's order, as the training records list them
            ans = batch.ans.to(self.device)
            asked = ans >= 0
            qa_right = (out.question_answering_score.argmax(-1) == ans) & asked
            match_right = out.cross_relationship_score.argmax(-1) == batch.matched_label.to(self.device)
            row = torch.stack([
                out.loss.detach().float() * n, *(out.losses[k].detach().float() * n for k in names),
                torch.tensor(float(n), device=self.device), qa_right.sum().float(), asked.sum().float(),
                match_right.sum().float(),
            ])  # fmt: skip
            sums = row if sums is None else sums + row
        self.runtime.train(was_training)
        if sums is None:
            raise ValueError(f"data.eval stores {self.config.data.eval.text} gave no batch")
        sums = all_reduce_sum(sums).cpu().double()
        samples, qa_right, qa_asked, match_right = (float(v) for v in sums[-4:])
        return {
            "kind": "eval", "step": self.step, "samples": int(samples), "loss": float(sums[0]) / samples,
            "losses": {k: float(sums[i + 1]) / samples for i, k in enumerate(names)},
            "qa_accuracy": qa_right / qa_asked if qa_asked else None, "qa_questions": int(qa_asked),
            "matched_accuracy": match_right / samples,
        }  # fmt: skip

    def _evaluate_and_log(self, log: MetricsLog) -> None:
        record = self.evaluate()
        self.evals.append(record)
        log.write(record)
        parts = " ".join(f"{k} {v:.3f}" for k, v in record["losses"].items())
        qa = record["qa_accuracy"]
        log.console(f"eval step {self.step}: loss {record['loss']:.4f} ({parts}) | QA accuracy "
                    f"{'-' if qa is None else f'{qa:.3f}'} | matching accuracy {record['matched_accuracy']:.3f}")  # fmt: skip

    # ---------------------------------------------------------------------------------------------- loop

    def _micro_batches(self) -> Iterator[PretrainBatch]:
        """Micro batches from the loaded position on, epoch after epoch."""
        for epoch in range(self.loader.epoch, self.config.train.epochs):
            self.loader.set_epoch(epoch)
            yield from self.loader

    def _inputs(self, batch: PretrainBatch) -> PretrainBatch:
        """DeepSpeed casts the model to the training precision; the floating-point inputs follow."""
        if self.runtime.input_dtype != torch.float32:
            batch = batch.to(self.device, float_dtype=self.runtime.input_dtype)
        return batch

    def _forward_backward(self, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.runtime.forward(**self._inputs(batch).model_inputs())
        self.runtime.backward(out.loss)
        return out.loss.detach().float(), {k: v.detach().float() for k, v in out.losses.items()}

    def _optimizer_step(self) -> tuple[float, bool]:
        return self.runtime.step()

    def _peak(self) -> float | None:
        if self.device.type != "cuda":
            return None
        precision = self.config.train.precision
        dtype = precision if precision != "fp32" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        return peak_flops(torch.cuda.get_device_name(self.device), dtype)

    def _print(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)

    def _eval_due(self, epoch_ended: bool) -> bool:
        every = self.config.train.eval_every
        if self.eval_loader is None:
            return False
        return (every > 0 and self.step % every == 0) or (every == 0 and epoch_ended)

    def train(self) -> dict[str, Any]:
        t = self.config.train
        save_every = t.save_every or self.steps_per_epoch
        log = MetricsLog(self.output_dir, enabled=self.rank == 0, progress_total=self.total_steps,
                         progress_initial=self.step)  # fmt: skip
        if self.last_checkpoint is not None and self.step < self.total_steps:
            log.write({"kind": "resume", "step": self.step, "checkpoint": str(self.last_checkpoint)})
        self.runtime.train(True)
        peak = self._peak()
        micro = self._micro_batches()
        window = defaultdict(float)  # sums since the last log line
        window_start = time.perf_counter()
        first: dict[str, float] | None = None
        last: dict[str, float] | None = None
        started_at = self.step
        run_start = time.perf_counter()
        plots: list[Path] = []
        eval_seconds = 0.0
        try:
            while self.step < self.total_steps:
                loss_sum = torch.zeros((), device=self.device)
                parts_sum: dict[str, torch.Tensor] = {}
                wait = 0.0
                flops = 0
                tokens = 0
                samples = 0
                got = 0
                for _ in range(self.accum):
                    tick = time.perf_counter()
                    batch = next(micro, None)
                    wait += time.perf_counter() - tick
                    if batch is None:
                        break
                    got += 1
                    loss, parts = self._forward_backward(batch)
                    loss_sum += loss / self.accum
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v / self.accum
                    b, length = batch.input_ids.shape
                    regions = batch.visual_feats.shape[1]
                    masked_tokens = int((batch.labels >= 0).sum())
                    masked_regions = int((batch.obj_labels["feat"][1] != 0).sum()) if "feat" in batch.obj_labels else 0
                    flops += step_flops(self.config.model, "pretrain", b, length, regions, masked_tokens,
                                        masked_regions).total  # fmt: skip
                    tokens += b * (length + regions)
                    samples += b
                if got < self.accum:  # the data ran out (epochs done) mid-step: nothing more to apply
                    if got:
                        self.runtime.zero_grad()
                    break
                norm, skipped = self._optimizer_step()
                if self.world_size > 1:  # log the global batch's loss, not rank 0's share of it
                    loss_sum, parts_sum = self._mean_over_ranks(loss_sum, parts_sum)
                self.step += 1
                self.skipped_steps += int(skipped)
                losses = {k: float(v) for k, v in parts_sum.items()}
                total = float(loss_sum)
                first = first or {"loss": total, **losses}
                last = {"loss": total, **losses}
                window["steps"] += 1
                window["wait"] += wait
                window["flops"] += flops
                window["tokens"] += tokens
                window["samples"] += samples
                if skipped:
                    log.console(f"step {self.step}: non-finite gradient (norm {norm}): step skipped, not applied")
                if self.step % t.log_every == 0 or self.step == self.total_steps or skipped:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    elapsed = max(now - window_start, 1e-9)
                    achieved = window["flops"] / elapsed  # this rank's model FLOP/s
                    record = {
                        "kind": "train", "step": self.step, "total_steps": self.total_steps,
                        "epoch": self.loader.epoch + self.loader.step / max(len(self.loader), 1),
                        "loss": total, "losses": losses, "lr": self.runtime.lr(), "grad_norm": norm,
                        "loss_scale": self.runtime.loss_scale(), "skipped": skipped,
                        "skipped_steps": self.skipped_steps,
                        "samples_per_s": window["samples"] * self.world_size / elapsed,
                        "tokens_per_s": window["tokens"] * self.world_size / elapsed,
                        "tflops": achieved / 1e12,
                        "mfu": mfu(window["flops"], elapsed, peak) if peak else None,
                        "data_wait_share": window["wait"] / elapsed,
                        "peak_memory_gib": peak_memory_gib(self.device), "threads": self.threads,
                        "step_time_s": elapsed / window["steps"],
                        "eta_s": elapsed / window["steps"] * (self.total_steps - self.step),
                    }  # fmt: skip
                    self.history.append(record)
                    log.write(record)
                    log.console(console_line(record))
                    log.advance(0, samples_per_s=record["samples_per_s"])
                    window = defaultdict(float)
                    window_start = time.perf_counter()
                log.advance(1)
                epoch_ended = self.step % self.steps_per_epoch == 0
                if self.step < self.total_steps and self._eval_due(epoch_ended):
                    tick = time.perf_counter()
                    self._evaluate_and_log(log)
                    eval_seconds += time.perf_counter() - tick
                    window_start += time.perf_counter() - tick  # evaluation time is not training throughput
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
            if self.eval_loader is not None and self.step > started_at:
                tick = time.perf_counter()
                self._evaluate_and_log(log)  # the final model's validation, before the last checkpoint
                eval_seconds += time.perf_counter() - tick
            if self.step > started_at or self.last_checkpoint is None:
                self.save()
            model_path = self.export()
        finally:
            log.close()
        if self.rank == 0:
            plots = write_run_plots(log.path, self.output_dir / "plots")
        seconds = time.perf_counter() - run_start
        done = self.step - started_at
        train_seconds = seconds - eval_seconds  # checkpoints and the export included
        summary = {
            "steps": self.step, "steps_this_run": done, "skipped_steps": self.skipped_steps,
            "first": first, "last": last, "seconds": seconds, "eval_seconds": eval_seconds,
            "samples_per_s": done * self.config.train.batch_size / train_seconds if train_seconds > 0 else None,
            "eval": self.evals[-1] if self.evals else None,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "model": str(model_path) if model_path else None,
            "metrics_log": str(log.path), "plots": [str(p) for p in plots],
        }  # fmt: skip
        return summary

    def _mean_over_ranks(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """The step's loss and components averaged over the ranks (every rank computes the same keys, in the
        model's order, which the log keeps)."""
        names = list(parts)
        packed = torch.stack([loss.float().reshape(()), *(parts[k].float().reshape(()) for k in names)])
        all_reduce_sum(packed)
        packed /= self.world_size
        return packed[0], {k: packed[i + 1] for i, k in enumerate(names)}
