"""One loader interface for pre-training, several implementations; every one yields the same PretrainBatches.

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
"""

from __future__ import annotations

import abc
import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from engine.data.batch import PretrainBatch
from engine.data.sampling import BatchPlan, PretrainSampler, SamplingConfig, mask_regions, mask_tokens
from engine.data.store import RegionStore, TextStore, region_mask

Tensor = torch.Tensor
KINDS = ("torch", "gpu", "dali")  # engine.config's DataConfig.loader
_REGION_LABELS = ("boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf")


# ------------------------------------------------------------------------------ host-side pieces


def text_arrays(text: TextStore, plan: BatchPlan) -> dict[str, np.ndarray]:
    """The text side of a batch in compact dtypes, padded to the batch's longest sentence; plus the plan's
    per-sample targets. Shared by every loader (a few KB a batch)."""
    unique, inverse = np.unique(plan.sentence_index, return_inverse=True)
    length = plan.max_length
    token_ids = text.arrays["token_ids"][unique][inverse, :length]  # int16, rows read in order
    input_ids, labels = mask_tokens(token_ids, plan.token_action[:, :length], plan.random_tokens[:, :length])
    out = {
        "input_ids": input_ids,
        "attention_mask": (np.arange(length) < plan.lengths[:, None]).astype(np.uint8),
        "token_type_ids": np.zeros_like(input_ids),
        "labels": labels,
        "matched": plan.matched,
        "ans": plan.ans.astype(np.int16),
    }
    regions = plan.region_action.shape[1]
    if (plan.num_boxes < regions).any():  # images with padding regions: keep attention off them
        out["visual_attention_mask"] = region_mask(plan.num_boxes, regions).astype(np.uint8)
    return out


def assemble(plan: BatchPlan, t: dict[str, Tensor]) -> PretrainBatch:
    """A PretrainBatch from named tensors (text_arrays' names plus the region arrays)."""
    return PretrainBatch(
        input_ids=t["input_ids"], attention_mask=t["attention_mask"], token_type_ids=t["token_type_ids"],
        visual_feats=t["visual_feats"], visual_pos=t["boxes"], visual_attention_mask=t.get("visual_attention_mask"),
        labels=t["labels"],
        obj_labels={
            "obj": (t["obj_ids"], t["obj_conf"]), "attr": (t["attr_ids"], t["attr_conf"]),
            "feat": (t["features"], t["feat_mask"]),
        },
        matched_label=t["matched"], ans=t["ans"], sample_index=plan.sample_index,
        sentence_index=plan.sentence_index, image_index=plan.image_index, epoch=plan.epoch, step=plan.step,
    )  # fmt: skip


class HostBatchBuilder:
    """Builds a whole batch on the host from the memory-mapped stores, in compact dtypes (CPU tensors)."""

    def __init__(self, sampler: PretrainSampler) -> None:
        self.sampler, self.text, self.regions = sampler, sampler.text, sampler.regions

    def build(self, epoch: int, step: int) -> PretrainBatch:
        plan = self.sampler.plan(epoch, step)
        arrays = text_arrays(self.text, plan)
        gathered = self.regions.gather(plan.image_index)  # the plan orders samples by image: sorted reads
        for name in ("features", *_REGION_LABELS):
            arrays[name] = getattr(gathered, name)
        replacement = self.regions.arrays["features"][plan.replace_image, plan.replace_region]
        arrays["visual_feats"], arrays["feat_mask"] = mask_regions(
            arrays["features"], plan.region_action, plan.blank_at, plan.replace_at, replacement
        )
        return assemble(plan, {name: torch.from_numpy(a) for name, a in arrays.items()})


# ------------------------------------------------------------------------------------ interface


class PretrainLoader(abc.ABC):
    """An iterable of PretrainBatch (on `device`, widened) over one epoch of one rank, resumable at a step.

    `step` counts the batches of `epoch` already yielded; state_dict() taken after the training step on a
    batch resumes with the next one. Subclasses implement `_batches(epoch, start_step)`.
    """

    kind = ""

    def __init__(self, sampler: PretrainSampler, device: torch.device | str = "cpu") -> None:
        self.sampler = sampler
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.epoch = 0
        self.step = 0
        self._resume = False  # a loaded position that the next pass starts from

    def __len__(self) -> int:
        """Steps an epoch (the same on every rank)."""
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step on the next pass; a position just loaded for this epoch is kept."""
        if self._resume and epoch == self.epoch:
            return
        self.epoch, self.step, self._resume = epoch, 0, False

    def _identity(self) -> dict[str, Any]:
        cfg = self.sampler.config
        return {
            "seed": cfg.seed, "global_batch_size": cfg.global_batch_size, "num_samples": self.sampler.num_samples,
            "drop_last": cfg.drop_last, "bucket_batches": cfg.bucket_batches,
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """(epoch, step) and what must match for the position to mean the same batches on resume.

        The world size may change if the global batch size does not (batches are cut from global ones)."""
        return {"epoch": self.epoch, "step": self.step, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {value!r}: not the same order")
        if not 0 <= state["step"] <= len(self):
            raise ValueError(f"loader state step {state['step']} out of range for {len(self)} steps")
        self.epoch, self.step, self._resume = int(state["epoch"]), int(state["step"]), True

    def __iter__(self) -> Iterator[PretrainBatch]:
        start = self.step if self._resume else 0
        self._resume, self.step = False, start
        for batch in self._batches(self.epoch, start):
            self.step += 1
            yield batch

    @abc.abstractmethod
    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        """This rank's batches of `epoch` from `start_step` to the end, on self.device, widened."""


# ----------------------------------------------------------------------------- torch DataLoader


class _Steps(Sampler[tuple[int, int]]):
    """(epoch, step) keys of one pass; read in the main process at each new iterator (persistent workers too)."""

    def __init__(self) -> None:
        self.epoch, self.start, self.stop = 0, 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _BatchDataset(Dataset[PretrainBatch]):
    def __init__(self, builder: HostBatchBuilder) -> None:
        self.builder = builder

    def __getitem__(self, key: tuple[int, int]) -> PretrainBatch:
        return self.builder.build(*key)


def _as_is(batch: PretrainBatch) -> PretrainBatch:
    return batch


class TorchLoader(PretrainLoader):
    """torch DataLoader over the memory-mapped stores; one worker builds one whole batch."""

    kind = "torch"

    def __init__(
        self, sampler: PretrainSampler, device: torch.device | str = "cpu", *, num_workers: int = 0,
        pin_memory: bool | None = None, prefetch_factor: int = 2,
    ) -> None:  # fmt: skip
        super().__init__(sampler, device)
        self._steps = _Steps()
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.dataloader = DataLoader(
            _BatchDataset(HostBatchBuilder(sampler)), batch_size=None, sampler=self._steps, collate_fn=_as_is,
            num_workers=num_workers, pin_memory=pin, prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=num_workers > 0,
            # A DataLoader draws its workers' base seed from a generator at every new iterator (each epoch, and
            # on resume); by default torch's global one, which would shift the model's dropout stream by where
            # a run resumed. Its own generator keeps the global stream the trainer's alone. (Batches never
            # depend on it: every draw is keyed by (seed, epoch, position).)
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        self._steps.epoch, self._steps.start, self._steps.stop = epoch, start_step, len(self)
        for batch in self.dataloader:
            yield batch.to(self.device)


# ------------------------------------------------------------------------------ device-resident


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class DeviceRegionTable:
    """A region store's per-region arrays as tensors on one device, copied once (in chunks of images)."""

    ARRAYS = ("features", *_REGION_LABELS)

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
        self, sampler: PretrainSampler, device: torch.device | str = "cpu", *, prefetch: int = 2,
        table: DeviceRegionTable | None = None,
    ) -> None:  # fmt: skip
        super().__init__(sampler, device)
        self.prefetch = prefetch
        self.table = table if table is not None else DeviceRegionTable(sampler.regions, self.device)
        if self.table.device != self.device:
            raise ValueError(f"the region table is on {self.table.device}, the loader on {self.device}")
        self._pin = self.device.type == "cuda"

    def _host_part(self, epoch: int, step: int) -> tuple[BatchPlan, dict[str, Tensor]]:
        plan = self.sampler.plan(epoch, step)
        arrays = text_arrays(self.sampler.text, plan)
        arrays.update(
            image_index=plan.image_index, region_action=plan.region_action, blank_at=plan.blank_at,
            replace_at=plan.replace_at, replace_image=plan.replace_image, replace_region=plan.replace_region,
        )  # fmt: skip
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        if self._pin:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return plan, tensors

    def _device_part(self, plan: BatchPlan, host: dict[str, Tensor]) -> PretrainBatch:
        t = {name: v.to(self.device, non_blocking=True) for name, v in host.items()}
        t.update(self.table.gather(t.pop("image_index")))
        features = self.table.tensors["features"]
        replacement = features[t.pop("replace_image"), t.pop("replace_region")]
        t["visual_feats"], t["feat_mask"] = mask_regions(
            t["features"], t.pop("region_action"), t.pop("blank_at"), t.pop("replace_at"), replacement
        )
        return assemble(plan, t).to(self.device)

    def _batches(self, epoch: int, start_step: int) -> Iterator[PretrainBatch]:
        steps = range(start_step, len(self))
        if self.prefetch <= 0:
            for step in steps:
                yield self._device_part(*self._host_part(epoch, step))
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lxmert-plan")
        pending: deque[Future[tuple[BatchPlan, dict[str, Tensor]]]] = deque()
        todo = iter(steps)
        try:
            for step in itertools.islice(todo, self.prefetch):
                pending.append(pool.submit(self._host_part, epoch, step))
            while pending:
                plan, host = pending.popleft().result()
                step = next(todo, None)
                if step is not None:
                    pending.append(pool.submit(self._host_part, epoch, step))
                yield self._device_part(plan, host)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------- factory


def make_loader(
    kind: str, text: TextStore | str | Path, regions: RegionStore | str | Path, config: SamplingConfig,
    device: torch.device | str = "cpu", **options: Any,
) -> PretrainLoader:  # fmt: skip
    """A loader of `kind` ("torch", "gpu", "dali") over the stores; `options` go to its class."""
    classes: dict[str, type[PretrainLoader]] = {"torch": TorchLoader, "gpu": GpuResidentLoader}
    if kind == "dali":  # imported here: DALI is an optional extra, and engine/data/dali.py imports this module
        from engine.data.dali import DaliLoader

        classes["dali"] = DaliLoader
    if kind not in classes:
        raise ValueError(f"unknown loader kind {kind!r}; one of {KINDS}")
    text = text if isinstance(text, TextStore) else TextStore(text)
    regions = regions if isinstance(regions, RegionStore) else RegionStore(regions)
    return classes[kind](PretrainSampler(text, regions, config), device, **options)
