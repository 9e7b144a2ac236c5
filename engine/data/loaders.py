"""One loader interface (engine/data/batching.Loader), for pre-training in several implementations that yield
the same PretrainBatches, and for fine-tuning (TaskLoader: TaskBatches).

    loader = make_loader("torch", "data/text_train", "data/feats_train",
                         SamplingConfig(seed=0, batch_size=64, world_size=4, rank=rank), device="cuda", num_workers=6)
    loader.load_state_dict(checkpoint["loader"])          # resume at (epoch, step), if any
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                           # keeps a loaded position within that epoch
        for batch in loader:                              # PretrainBatch on the device, widened
            loss = model(**batch.model_inputs()).loss
            ...
            checkpoint["loader"] = loader.state_dict()    # {"epoch", "step": batches consumed}, + identity

What is drawn is decided by PretrainSampler.plan(epoch, step) (engine/data/sampling.py, keyed by seed,
epoch and position); a loader only decides where the arrays are gathered and masked, so the kinds agree
bit for bit (tests compare them) and a batch does not depend on num_workers or prefetching:
- "torch": torch.utils.data.DataLoader over the memory-mapped stores. One item is one whole batch
  (a batch-level Dataset keyed by (epoch, step)): the plan, one store gather on its sorted image rows,
  masking in numpy, compact tensors. Workers share the stores' pages (the stores and the sampler
  pickle as paths: no per-worker copy); persistent workers keep their per-epoch order cache.
- "gpu": the region store (float16 features, boxes, labels, confidences: 12 GB for COCO train2014)
  copied once into device memory; per batch the host draws the plan and builds the text (a few KB, in a
  prefetch thread), the device gathers the regions by index and applies the region masking there.
- "dali" (engine/data/dali.py, needs the [data] extra): NVIDIA DALI's fn.readers.numpy over the same .npy
  files (roi_start slices of the stores, store.array_path) at the plan's image rows, fed through an
  external source; masking on the loader's device.
Fine-tuning's TaskLoader is the "torch" kind over a task store: a TrainOrder (the epoch's permutation cut into
each rank's micro batches) or an EvalOrder (each rank's interleaved slice) says which rows; workers build the
TaskBatch from the memory-mapped stores (engine.data.tasks.task_arrays) and it is widened on the device.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.data.batch import PretrainBatch, TaskBatch
from engine.data.batching import HostBatchBuilder, Loader, PretrainLoader, assemble, host_unpadding, text_arrays
from engine.data.sampling import BatchPlan, PretrainSampler, SamplingConfig, mask_regions
from engine.data.store import REGION_LABELS, RegionStore, TextStore
from engine.data.tasks import TaskStore, task_arrays
from engine.stopping import shield_worker
from lxmert.attention import Unpadding

Tensor = torch.Tensor
KINDS = ("torch", "gpu", "dali")  # engine.config's DataConfig.loader
__all__ = [
    "KINDS",
    "DeviceRegionTable",
    "EvalOrder",
    "GpuResidentLoader",
    "HostBatchBuilder",
    "Loader",
    "PretrainLoader",
    "TaskLoader",
    "TorchLoader",
    "TrainOrder",
    "make_loader",
]


# ----------------------------------------------------------------------------- torch DataLoader


class _Steps(Sampler[tuple[int, int]]):
    """(epoch, step) keys of one pass; read in the main process at each new iterator (persistent workers too)."""

    def __init__(self) -> None:
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _BatchDataset(Dataset[Any]):
    def __init__(self, builder: Any) -> None:
        self.builder = builder

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.builder.build(*key)


def _as_is(batch: Any) -> Any:
    return batch


class BatchDataLoader:
    """A torch DataLoader over `builder.build(epoch, step)`: one item is one whole batch, built by a worker
    (the builder pickles small: stores travel as their paths), pinned on CUDA, `prefetch_factor` ahead."""

    def __init__(
        self,
        builder: Any,
        device: torch.device,
        *,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        self._steps = _Steps()
        pin = device.type == "cuda" if pin_memory is None else pin_memory
        self.dataloader = DataLoader(
            _BatchDataset(builder),
            batch_size=None,
            sampler=self._steps,
            collate_fn=_as_is,
            worker_init_fn=shield_worker,  # a scheduler's stop signals are the main process's (engine/stopping.py)
            num_workers=num_workers,
            pin_memory=pin,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=num_workers > 0,
            # A DataLoader draws its workers' base seed from a generator at every new iterator (each epoch, and
            # on resume); by default torch's global one, which would shift the model's dropout stream by where
            # a run resumed. Its own generator keeps the global stream the trainer's alone. (Batches never
            # depend on it: every draw is keyed by (seed, epoch, position).)
            generator=torch.Generator().manual_seed(0),
        )

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[Any]:
        self._steps.epoch, self._steps.start, self._steps.stop = epoch, start, stop
        yield from self.dataloader


class TorchLoader(PretrainLoader):
    """torch DataLoader over the memory-mapped stores; one worker builds one whole batch."""

    kind = "torch"

    def __init__(
        self,
        sampler: PretrainSampler,
        device: torch.device | str = "cpu",
        *,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        unpadding: bool = False,
    ) -> None:
        super().__init__(sampler, device, unpadding)
        self.workers = BatchDataLoader(
            HostBatchBuilder(sampler, unpadding),
            self.device,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
        )

    @property
    def dataloader(self) -> DataLoader:
        return self.workers.dataloader

    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        for batch in self.workers.batches(epoch, start_step, len(self)):
            yield batch.to(self.device)


# --------------------------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True)
class TrainOrder:
    """Which task-store rows fine-tuning's micro batch k of an epoch holds on one rank.

    Each epoch is a permutation seeded by (seed, epoch), cut to whole global batches (micro x accumulation x
    ranks: the authors' drop_last); global batch s is cut into accumulation x ranks chunks of `micro`, and rank r's
    micro batch k = s * accumulation + m is chunk m * ranks + r: a run's losses do not depend on the split."""

    num_examples: int
    seed: int
    micro: int
    accum: int
    world: int = 1
    rank: int = 0

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(self.num_examples)[: self.steps_per_epoch * self.global_batch]

    def indices(self, epoch: int, k: int, order: np.ndarray | None = None) -> np.ndarray:
        order = self.epoch_order(epoch) if order is None else order
        step, micro_step = divmod(k, self.accum)
        start = step * self.global_batch + (micro_step * self.world + self.rank) * self.micro
        return order[start : start + self.micro]


@dataclass(frozen=True)
class EvalOrder:
    """Evaluation's rows on one rank: an interleaved slice (rank, rank + ranks, ...), padded by wrapping to the
    same length on every rank (ZeRO-3's forward is a collective), in chunks of `micro`."""

    num_examples: int
    micro: int
    world: int = 1
    rank: int = 0

    @property
    def rows(self) -> np.ndarray:
        per_rank = -(-self.num_examples // self.world)
        return (self.rank + self.world * np.arange(per_rank)) % self.num_examples

    def __len__(self) -> int:
        return -(-len(self.rows) // self.micro)

    def indices(self, epoch: int, k: int) -> np.ndarray:
        return self.rows[k * self.micro : (k + 1) * self.micro]


class TaskBatchBuilder:
    """A TaskBatch (compact CPU tensors) for micro batch k of an epoch, with its masks' Unpadding if `unpadding`;
    caches the epoch's order."""

    def __init__(
        self, store: TaskStore, regions: RegionStore, order: TrainOrder | EvalOrder, labels: bool, unpadding: bool
    ) -> None:
        self.store, self.regions, self.order, self.labels = store, regions, order, labels
        self.unpadding = unpadding
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int, k: int) -> np.ndarray:
        if isinstance(self.order, EvalOrder):
            return self.order.indices(epoch, k)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, self.order.epoch_order(epoch))
        return self.order.indices(epoch, k, self._epoch_order[1])

    def build(self, epoch: int, k: int) -> TaskBatch:
        idx = self.indices(epoch, k)
        arrays = task_arrays(self.store, self.regions, idx, labels=self.labels)
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        batch = TaskBatch(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            visual_feats=tensors["visual_feats"],
            visual_pos=tensors["visual_pos"],
            visual_attention_mask=tensors.get("visual_attention_mask"),
            labels=tensors.get("labels"),
            indices=idx,
        )
        return batch.with_unpadding() if self.unpadding else batch


class TaskLoader(Loader):
    """Fine-tuning's TaskBatches (VQA/GQA, NLVR2) through the loader interface: torch DataLoader workers build
    them from the memory-mapped stores (data.num_workers), pinned on CUDA, prefetched; widened on the device.
    Training passes follow a TrainOrder (resumable at a micro batch), evaluation passes an EvalOrder. With
    `unpadding` (attn_backend "flash") each batch carries its masks' Unpadding, found by the workers."""

    kind = "torch"

    def __init__(
        self,
        store: TaskStore,
        regions: RegionStore,
        order: TrainOrder | EvalOrder,
        device: torch.device | str = "cpu",
        *,
        labels: bool = True,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        unpadding: bool = False,
    ) -> None:
        super().__init__(device)
        self.store, self.order = store, order
        self.builder = TaskBatchBuilder(store, regions, order, labels, unpadding)
        self.workers = BatchDataLoader(
            self.builder, self.device, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor
        )

    def __len__(self) -> int:
        return len(self.order)

    def _identity(self) -> dict[str, Any]:
        order = self.order
        seed = order.seed if isinstance(order, TrainOrder) else None
        return {
            "seed": seed,
            "global_batch_size": order.micro * getattr(order, "accum", 1) * order.world,
            "num_samples": order.num_examples,
            "drop_last": isinstance(order, TrainOrder),
        }

    def _micro_step_samples(self) -> int:
        return self.order.micro * self.order.world

    def _batches(self, epoch: int, start_step: int) -> Iterator[TaskBatch]:
        for batch in self.workers.batches(epoch, start_step, len(self)):
            yield batch.to(self.device)


# ------------------------------------------------------------------------------ device-resident


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class DeviceRegionTable:
    """A region store's per-region arrays as tensors on one device, copied once (in chunks of images)."""

    ARRAYS = ("features", *REGION_LABELS)

    def __init__(self, regions: RegionStore, device: torch.device | str, chunk_images: int = 4096) -> None:
        self.device = torch.device(device)
        self.tensors: dict[str, Tensor] = {}
        for name in self.ARRAYS:
            source = regions.arrays[name]
            table = torch.empty(source.shape, dtype=_torch_dtype(source.dtype), device=self.device)
            for start in range(0, source.shape[0], chunk_images):
                chunk = torch.from_numpy(np.array(source[start : start + chunk_images]))  # a writable copy
                table[start : start + chunk.shape[0]].copy_(chunk)
            self.tensors[name] = table

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def gather(self, image_index: Tensor) -> dict[str, Tensor]:
        """[B, ...] rows of every array for the images `image_index` (a device tensor)."""
        return {name: t.index_select(0, image_index) for name, t in self.tensors.items()}


class GpuResidentLoader(PretrainLoader):
    """Regions gathered and masked on the device from a resident table; text drawn and built on the host
    (in a prefetch thread, `prefetch` batches ahead; 0: inline) and copied."""

    kind = "gpu"

    def __init__(
        self,
        sampler: PretrainSampler,
        device: torch.device | str = "cpu",
        *,
        prefetch: int = 2,
        table: DeviceRegionTable | None = None,
        unpadding: bool = False,
    ) -> None:
        super().__init__(sampler, device, unpadding)
        self.prefetch = prefetch
        self.table = table if table is not None else DeviceRegionTable(sampler.regions, self.device)
        if self.table.device != self.device:
            raise ValueError(f"the region table is on {self.table.device}, the loader on {self.device}")
        self._pin = self.device.type == "cuda"

    def _host_part(self, epoch: int, step: int) -> tuple[BatchPlan, dict[str, Tensor], Unpadding | None]:
        plan = self.sampler.plan(epoch, step)
        arrays = text_arrays(self.sampler.text, plan, self.sampler.config.vocab_size)
        arrays.update(
            image_index=plan.image_index,
            region_action=plan.region_action,
            blank_at=plan.blank_at,
            replace_at=plan.replace_at,
            replace_image=plan.replace_image,
            replace_region=plan.replace_region,
        )
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        unpadding = host_unpadding(plan, tensors, self._pin) if self.unpadding else None
        if self._pin:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return plan, tensors, unpadding

    def _device_part(self, plan: BatchPlan, host: dict[str, Tensor], unpadding: Unpadding | None) -> PretrainBatch:
        t = {name: v.to(self.device, non_blocking=True) for name, v in host.items()}
        t.update(self.table.gather(t.pop("image_index")))
        features = self.table.tensors["features"]
        replacement = features[t.pop("replace_image"), t.pop("replace_region")]
        t["visual_feats"], t["feat_mask"] = mask_regions(
            t["features"], t.pop("region_action"), t.pop("blank_at"), t.pop("replace_at"), replacement
        )
        return assemble(plan, t, unpadding).to(self.device)

    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        steps = range(start_step, len(self))
        if self.prefetch <= 0:
            for step in steps:
                yield self._device_part(*self._host_part(epoch, step))
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lxmert-plan")
        pending: deque[Future[tuple[BatchPlan, dict[str, Tensor], Unpadding | None]]] = deque()
        todo = iter(steps)
        try:
            for step in itertools.islice(todo, self.prefetch):
                pending.append(pool.submit(self._host_part, epoch, step))
            while pending:
                plan, host, unpadding = pending.popleft().result()
                step = next(todo, None)
                if step is not None:
                    pending.append(pool.submit(self._host_part, epoch, step))
                yield self._device_part(plan, host, unpadding)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------- factory


def make_loader(
    kind: str,
    text: TextStore | str | Path,
    regions: RegionStore | str | Path,
    config: SamplingConfig,
    device: torch.device | str = "cpu",
    **options: Any,
) -> PretrainLoader:
    """A loader of `kind` ("torch", "gpu", "dali") over the stores; `options` go to its class."""
    classes: dict[str, type[PretrainLoader]] = {"torch": TorchLoader, "gpu": GpuResidentLoader}
    if kind == "dali":  # imported here: DALI is an optional extra
        from engine.data.dali import DaliLoader

        classes["dali"] = DaliLoader
    if kind not in classes:
        raise ValueError(f"unknown loader kind {kind!r}; one of {KINDS}")
    text = text if isinstance(text, TextStore) else TextStore(text)
    regions = regions if isinstance(regions, RegionStore) else RegionStore(regions)
    return classes[kind](PretrainSampler(text, regions, config), device, **options)
