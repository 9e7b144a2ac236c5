"""The batches that cross from the data loaders to the model: PretrainBatch and fine-tuning's TaskBatch.

Their model fields are named exactly as the model's forward keywords (LxmertForPreTraining; LxmertForQuestion-
Answering and LxmertForNLVR2), so a training step is `model(**batch.to(device).model_inputs())`; the bookkeeping
(which samples, sentences and images, the (epoch, step) it was drawn for) rides along for logging and checks
and never reaches the model.

Compact on the host, wide on the device: a loader builds the batch in the store's dtypes (token ids and
labels int16, attention masks uint8, features and confidences float16 from a float16 store, the feature
mask float16), which halves to quarters what is pinned and sent over PCIe; `.to(device)` copies those bytes
and then widens on the device: every integer tensor to int64 (what embeddings and cross-entropy index with)
and every floating tensor to float32 (`float_dtype`). float16 -> float32 is exact, so the widened batch is
the same numbers the store holds; the GPU-resident loader produces the same widened batch directly.

For attn_backend "flash" the loaders also find the keys' unpadding on the host from the masks they build
(`unpadding`, lxmert.attention.Unpadding: indices, cu_seqlens and the longest lengths), as they find the masked
rows, so the flash backend never waits for the device to unpad; `.to` moves it as it is (its int32 cu_seqlens
stay int32). Other backends ignore it, and the loaders leave it None for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from lxmert.attention import Unpadding
from lxmert.finetune import nlvr2_unpadding

Tensor = torch.Tensor
VISUAL_LOSSES = ("obj", "attr", "feat")

# LxmertForPreTraining.forward keywords, in its order (tests check them against the signature).
MODEL_FIELDS = (
    "input_ids",
    "visual_feats",
    "visual_pos",
    "attention_mask",
    "visual_attention_mask",
    "token_type_ids",
    "labels",
    "obj_labels",
    "matched_label",
    "ans",
    "mlm_rows",
    "feat_rows",
    "unpadding",
)


class ModelBatch:
    """What both batches do: hand the model its keywords, move to a device and widen there, pin."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])  # type: ignore[attr-defined]

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of the model's forward (None fields left out)."""
        inputs = {name: getattr(self, name) for name in self.MODEL_FIELDS}
        return {name: value for name, value in inputs.items() if value is not None}

    def _unpadding(self) -> Unpadding:
        return Unpadding.from_masks(self.attention_mask, self.visual_attention_mask, self.visual_feats.shape[1])  # type: ignore[attr-defined]

    def with_unpadding(self) -> Any:
        """This batch with the flash backend's Unpadding of its masks, found where they are (a loader: on the
        host, before `.to`, so that finding it waits for nothing)."""
        return dataclasses.replace(self, unpadding=self._unpadding())  # type: ignore[type-var]

    def _map(self, fn: Callable[[Tensor], Tensor], unpadding_fn: Callable[[Tensor], Tensor] | None = None) -> Any:
        """fn applied to every model tensor; unpadding_fn (default fn) to the unpadding's, which keep their dtypes."""
        changes: dict[str, Any] = {}
        for name in self.MODEL_FIELDS:
            value = getattr(self, name)
            if isinstance(value, Tensor):
                changes[name] = fn(value)
            elif isinstance(value, dict):
                changes[name] = {k: (fn(ids), fn(weights)) for k, (ids, weights) in value.items()}
            elif isinstance(value, Unpadding):
                changes[name] = value.map(unpadding_fn or fn)
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to(
        self, device: torch.device | str, non_blocking: bool = True, float_dtype: torch.dtype = torch.float32
    ) -> Any:
        """The batch on `device`, widened there: integers -> int64, floating point -> `float_dtype`.

        The compact bytes are copied first (non_blocking from pinned memory), the widening runs on the device."""

        def move(t: Tensor) -> Tensor:
            wide = float_dtype if t.is_floating_point() else torch.int64
            return t.to(device, non_blocking=non_blocking).to(wide)

        return self._map(move, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Any:
        """Page-locked host copies (what DataLoader(pin_memory=True) calls), for asynchronous copies."""
        return self._map(lambda t: t if t.is_pinned() else t.pin_memory())

    def equal(self, other: Any) -> bool:
        """Exactly the same values, dtypes and bookkeeping (for tests and loader cross-checks)."""

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                return (
                    isinstance(a, Tensor)
                    and isinstance(b, Tensor)
                    and a.dtype == b.dtype
                    and a.shape == b.shape
                    and bool(torch.equal(a.cpu(), b.cpu()))
                )
            if isinstance(a, dict):
                return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
            if dataclasses.is_dataclass(a):  # the unpadding and its parts
                return type(a) is type(b) and all(
                    same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
                )
            if isinstance(a, tuple):
                return isinstance(b, tuple) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            if isinstance(a, np.ndarray):
                return isinstance(b, np.ndarray) and np.array_equal(a, b)
            return a == b

        return type(self) is type(other) and all(
            same(getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)  # type: ignore
        )


@dataclass
class PretrainBatch(ModelBatch):
    """One data-parallel rank's batch: B samples, L tokens (the longest sentence of the batch), R regions."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = MODEL_FIELDS

    input_ids: Tensor  # [B, L] [CLS] wordpieces [SEP] [PAD].., after word masking
    attention_mask: Tensor  # [B, L] 1 = real token
    token_type_ids: Tensor  # [B, L] all 0 (one segment)
    visual_feats: Tensor  # [B, R, D] after region masking
    visual_pos: Tensor  # [B, R, 4] boxes (x1, y1, x2, y2) / (w, h, w, h)
    visual_attention_mask: Tensor | None  # [B, R] 1 = real region; None when every region is real (obj36)
    labels: Tensor  # [B, L] MLM targets: the original id at masked tokens, -1 elsewhere
    obj_labels: dict[str, tuple[Tensor, Tensor]]  # obj/attr: (ids, confidences) [B, R], -1 / 0 on padding;
    #                                               feat: (original features [B, R, D], mask [B, R] 1 = masked)
    matched_label: Tensor  # [B] 1 = the image's own sentence, 0 = a sentence of another image
    ans: Tensor  # [B] QA answer-table row, -1 = none (no label or mismatched)
    mlm_rows: Tensor  # [M] int32 flat b * L + l of the tokens with a label, padded with -1 (batching.row_bucket)
    feat_rows: Tensor  # [K] int32 flat b * R + r of the masked regions (feat mask 1), padded with -1
    # bookkeeping, host numpy arrays that `.to` leaves where they are
    sample_index: np.ndarray  # [B] the samples (the authors' uids: text-store rows) drawn
    sentence_index: np.ndarray  # [B] the text-store rows fed (another image's sentence where matched_label 0)
    image_index: np.ndarray  # [B] region-store rows
    epoch: int
    step: int
    masked_tokens: int  # the real entries of mlm_rows and feat_rows (the FLOP count's, read on the host)
    masked_regions: int
    unpadding: Unpadding | None = None  # attn_backend "flash": the masks' unpadding, found on the host


# LxmertForQuestionAnswering / LxmertForNLVR2 forward keywords the task batches fill
TASK_FIELDS = (
    "input_ids",
    "visual_feats",
    "visual_pos",
    "attention_mask",
    "visual_attention_mask",
    "labels",
    "unpadding",
)


@dataclass
class TaskBatch(ModelBatch):
    """One rank's fine-tuning batch (engine.data.tasks.task_arrays, compact until `.to`): B questions or
    statements, L tokens (the batch's longest), R regions; NLVR2 has two images a statement ([B, 2, R, ...])."""

    MODEL_FIELDS: ClassVar[tuple[str, ...]] = TASK_FIELDS

    input_ids: Tensor  # [B, L] [CLS] wordpieces [SEP] [PAD]..
    attention_mask: Tensor  # [B, L] 1 = real token
    visual_feats: Tensor  # [B, R, D] or [B, 2, R, D]
    visual_pos: Tensor  # [B, R, 4] or [B, 2, R, 4]
    visual_attention_mask: Tensor | None  # 1 = real region; None when every region is real
    labels: Tensor | None  # VQA/GQA [B, answers] soft scores; NLVR2 [B] 0 / 1; None: unlabelled or not asked
    indices: np.ndarray  # [B] task-store rows (bookkeeping: the predictions' question ids)
    unpadding: Unpadding | None = None  # attn_backend "flash": the masks' unpadding (NLVR2: of the 2B image rows)

    def _unpadding(self) -> Unpadding:
        if self.visual_feats.dim() == 4:  # NLVR2: the backbone sees each statement with each of its two images
            return nlvr2_unpadding(self.attention_mask, self.visual_attention_mask, self.visual_feats.shape[2])
        return super()._unpadding()
