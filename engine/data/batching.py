"""What every loader shares: the loader interface (resumable passes over (epoch, step)), and the pre-training
batch built on the host from the plan (engine/data/sampling.py). engine/data/loaders.py and engine/data/dali.py
build on it; neither imports the other's internals.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from engine.data.batch import PretrainBatch
from engine.data.sampling import NOT_MASKED, BatchPlan, PretrainSampler, mask_regions, mask_tokens
from engine.data.store import REGION_LABELS, StoreError, TextStore, region_mask
from lxmert.attention import Unpadding

Tensor = torch.Tensor


# ------------------------------------------------------------------------------ host-side pieces


def row_bucket(count: int) -> int:
    """The padded length of `count` masked rows: the next of 8 sizes an octave (8, 9, .., 16, 18, .., 32, 36, ..),
    at least 8. An epoch's masked-token and masked-region counts cluster around 15% of the batch, so its steps
    take a handful of shapes (graphs and compiled kernels are reused), and the padding stays under 1/8."""
    step = 1 << max(0, count.bit_length() - 4)
    return max(8, -(-count // step) * step)


def padded_rows(mask: np.ndarray) -> np.ndarray:
    """The flat indices of mask's True entries, padded with -1 to row_bucket(count): int32 (the losses' `rows`)."""
    found = np.flatnonzero(mask).astype(np.int32)
    rows = np.full(row_bucket(found.size), -1, dtype=np.int32)
    rows[: found.size] = found
    return rows


def text_arrays(text: TextStore, plan: BatchPlan, vocab_size: int) -> dict[str, np.ndarray]:
    """The text side of a batch in compact dtypes, padded to the batch's longest sentence; plus the plan's
    per-sample targets and the masked rows the losses take (mlm_rows, feat_rows: known here on the host, so the
    step never waits for the device to find them). Shared by every loader (a few KB a batch).

    Token ids at or beyond vocab_size (a store tokenized with another vocabulary) are a StoreError naming the
    store and the row; the model only asserts ids on the device."""
    unique, inverse = np.unique(plan.sentence_index, return_inverse=True)
    length = plan.max_length
    token_ids = text.arrays["token_ids"][unique][inverse, :length]  # int16, rows read in order
    if token_ids.size and (token_ids.max() >= vocab_size or token_ids.min() < 0):
        bad = int(np.flatnonzero(((token_ids >= vocab_size) | (token_ids < 0)).any(1))[0])
        raise StoreError(
            f"text store {text.path}: row {int(plan.sentence_index[bad])} holds token ids "
            f"{token_ids[bad].tolist()} outside [0, model.vocab_size {vocab_size})"
        )
    token_action = plan.token_action[:, :length]
    input_ids, labels = mask_tokens(token_ids, token_action, plan.random_tokens[:, :length])
    out = {
        "input_ids": input_ids,
        "attention_mask": (np.arange(length) < plan.lengths[:, None]).astype(np.uint8),
        "token_type_ids": np.zeros_like(input_ids),
        "labels": labels,
        "mlm_rows": padded_rows(token_action != NOT_MASKED),  # where labels >= 0
        "feat_rows": padded_rows(plan.region_action != NOT_MASKED),  # where the feature mask is 1
        "matched": plan.matched,
        "ans": plan.ans.astype(np.int16),
    }
    regions = plan.region_action.shape[1]
    if (plan.num_boxes < regions).any():  # images with padding regions: keep attention off them
        out["visual_attention_mask"] = region_mask(plan.num_boxes, regions).astype(np.uint8)
    return out


def host_unpadding(plan: BatchPlan, text: dict[str, Tensor], pin: bool = False) -> Unpadding:
    """The flash backend's Unpadding of a batch from text_arrays' masks as host tensors (attention_mask,
    visual_attention_mask when there is one): found on the host, it waits for nothing; pinned with `pin`."""
    regions = plan.region_action.shape[1]
    unpadding = Unpadding.from_masks(text["attention_mask"], text.get("visual_attention_mask"), regions)
    return unpadding.map(lambda t: t.pin_memory()) if pin else unpadding


def assemble(plan: BatchPlan, t: dict[str, Tensor], unpadding: Unpadding | None = None) -> PretrainBatch:
    """A PretrainBatch from named tensors (text_arrays' names plus the region arrays), with `unpadding`."""
    return PretrainBatch(
        input_ids=t["input_ids"],
        attention_mask=t["attention_mask"],
        token_type_ids=t["token_type_ids"],
        visual_feats=t["visual_feats"],
        visual_pos=t["boxes"],
        visual_attention_mask=t.get("visual_attention_mask"),
        labels=t["labels"],
        mlm_rows=t["mlm_rows"],
        feat_rows=t["feat_rows"],
        obj_labels={
            "obj": (t["obj_ids"], t["obj_conf"]),
            "attr": (t["attr_ids"], t["attr_conf"]),
            "feat": (t["features"], t["feat_mask"]),
        },
        matched_label=t["matched"],
        ans=t["ans"],
        sample_index=plan.sample_index,
        sentence_index=plan.sentence_index,
        image_index=plan.image_index,
        epoch=plan.epoch,
        step=plan.step,
        masked_tokens=int(np.count_nonzero(plan.token_action[:, : plan.max_length] != NOT_MASKED)),
        masked_regions=int(np.count_nonzero(plan.region_action != NOT_MASKED)),
        unpadding=unpadding,
    )


class HostBatchBuilder:
    """Builds a whole batch on the host from the memory-mapped stores, in compact dtypes (CPU tensors); with
    `unpadding`, the flash backend's Unpadding of its masks too."""

    def __init__(self, sampler: PretrainSampler, unpadding: bool = False) -> None:
        self.sampler, self.text, self.regions = sampler, sampler.text, sampler.regions
        self.unpadding = unpadding

    def build(self, epoch: int, step: int) -> PretrainBatch:
        plan = self.sampler.plan(epoch, step)
        arrays = text_arrays(self.text, plan, self.sampler.config.vocab_size)
        gathered = self.regions.gather(plan.image_index)  # the plan orders samples by image: sorted reads
        for name in ("features", *REGION_LABELS):
            arrays[name] = getattr(gathered, name)
        replacement = self.regions.arrays["features"][plan.replace_image, plan.replace_region]
        arrays["visual_feats"], arrays["feat_mask"] = mask_regions(
            arrays["features"], plan.region_action, plan.blank_at, plan.replace_at, replacement
        )
        tensors = {name: torch.from_numpy(a) for name, a in arrays.items()}
        return assemble(plan, tensors, host_unpadding(plan, tensors) if self.unpadding else None)


# ------------------------------------------------------------------------------------ interface


class Loader(abc.ABC):
    """An iterable of batches (on `device`, widened) over one epoch of one rank, resumable at a step.

    `step` counts the batches of `epoch` already yielded; state_dict() taken after the training step on a
    batch resumes with the next one. Subclasses implement `__len__`, `_identity` and `_batches(epoch, start)`.
    """

    kind = ""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.epoch = 0
        self.step = 0
        self._resume = False  # a loaded position that the next pass starts from

    @abc.abstractmethod
    def __len__(self) -> int:
        """Batches an epoch (the same on every rank)."""

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first step on the next pass; a position just loaded for this epoch is kept."""
        if self._resume and epoch == self.epoch:
            return
        self.epoch, self.step, self._resume = epoch, 0, False

    @abc.abstractmethod
    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same batches."""

    def _micro_step_samples(self) -> int | None:
        """The samples one step of this loader takes over all ranks (micro batch x ranks), when known."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """(epoch, step) and what must match for the position to mean the same batches on resume.

        The world size may change if the global batch size does not (batches are cut from global ones): `step`
        is then converted through micro_step_samples (the samples a step of the saving loader took)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "micro_step_samples": self._micro_step_samples(),
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._identity().items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {value!r}: not the same order")
        step, saved, mine = int(state["step"]), state.get("micro_step_samples"), self._micro_step_samples()
        if saved and mine and saved != mine:  # another micro batch x ranks: the same samples taken, in other steps
            if step * saved % mine:
                raise ValueError(f"loader state step {step} of {saved} samples is no whole number of steps of {mine}")
            step = step * saved // mine
        if not 0 <= step <= len(self):
            raise ValueError(f"loader state step {step} out of range for {len(self)} steps")
        self.epoch, self.step, self._resume = int(state["epoch"]), step, True

    def __iter__(self) -> Iterator[Any]:
        start = self.step if self._resume else 0
        self._resume, self.step = False, start
        for batch in self._batches(self.epoch, start):
            self.step += 1
            yield batch

    @abc.abstractmethod
    def _batches(self, epoch: int, start_step: int) -> Iterator[Any]:
        """This rank's batches of `epoch` from `start_step` to the end, on self.device, widened."""


class PretrainLoader(Loader):
    """A Loader of PretrainBatch whose order and masking a PretrainSampler plans; with `unpadding` (for
    attn_backend "flash") its batches carry their masks' Unpadding, found on the host (host_unpadding)."""

    def __init__(self, sampler: PretrainSampler, device: torch.device | str = "cpu", unpadding: bool = False) -> None:
        super().__init__(device)
        self.sampler = sampler
        self.unpadding = unpadding

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def _identity(self) -> dict[str, Any]:
        cfg = self.sampler.config
        identity = {
            "seed": cfg.seed,
            "num_samples": self.sampler.num_samples,
            "drop_last": cfg.drop_last,
            "bucket_batches": cfg.bucket_batches,
        }
        if cfg.bucket_batches > 1:  # length buckets are drawn per window of global batches: the order depends on it
            identity["global_batch_size"] = cfg.global_batch_size
        return identity

    def _micro_step_samples(self) -> int:
        return self.sampler.config.global_batch_size  # micro batch x ranks

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "micro_step_samples" not in state and "global_batch_size" in state:  # saved before micro_step_samples
            state = {**state, "micro_step_samples": state["global_batch_size"]}
        super().load_state_dict(state)
