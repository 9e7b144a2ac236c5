"""The pre-training and fine-tuning losses, with the authors' semantics.

Labels below zero are ignored everywhere (the authors use -1, transformers -100). A loss with nothing to
score (no masked token, every QA label ignored) is 0, not NaN, and still depends on the head's parameters
so that every rank of a data-parallel job produces the same gradient structure. Losses are computed in
at least float32 whatever the autocast dtype.

The two masked losses take the masked positions as `rows`, flat indices padded with -1 to a bucket size, which
the engine's loaders know on the host (engine/data/batching.py): then nothing waits for the device and the step
has a static shape. Without rows they find them with nonzero, a host synchronisation on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
IGNORE = -100  # the ignore_index handed to torch; any negative label is mapped to it


def _wide(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32 for the loss arithmetic; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _ignored_as_torch(labels: Tensor) -> Tensor:
    return torch.where(labels < 0, torch.full_like(labels, IGNORE), labels)


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the labels >= 0 (0 when there are none): MLM, matching, QA, NLVR2."""
    logits = _wide(logits.reshape(-1, logits.shape[-1]))
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, _ignored_as_torch(labels), reduction="sum")
    return total / (labels >= 0).sum().clamp(min=1)


def listed(values: Tensor, rows: Tensor, fill: float) -> tuple[Tensor, Tensor]:
    """(values[rows], with `fill` at the padding entries -1; the rows made safe to index with).

    values [N], rows [M] flat indices into it, -1 = padding. Device ops only: no host synchronisation."""
    safe = rows.clamp(min=0)
    picked = values.index_select(0, safe)
    return torch.where(rows >= 0, picked, torch.full_like(picked, fill)), safe


def masked_token_loss(
    hidden: Tensor, labels: Tensor, head: Callable[[Tensor], Tensor], rows: Tensor | None = None
) -> Tensor:
    """MLM cross-entropy that runs the vocabulary head only on the positions carrying a label.

    hidden [..., H], labels [...] (negative = not masked). Equal to cross_entropy(head(hidden), labels)
    without forming the [tokens, vocabulary] logits of the unmasked positions. rows [M]: the flat indices of
    every labelled position, padded with -1 (padding rows are projected and ignored); None: found by nonzero.
    """
    labels = labels.reshape(-1)
    if rows is None:
        rows = (labels >= 0).nonzero().squeeze(1)
        picked_labels = labels.index_select(0, rows)
    else:
        picked_labels, rows = listed(labels, rows, -1)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return cross_entropy(head(picked), picked_labels)


def weighted_region_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor, normalizer: float) -> Tensor:
    """Detected-label loss: normalizer * mean over ALL regions of weight_i * CE_i (object and attribute heads).

    logits [N, C] (or [B, R, C]), labels [N], weights [N]: the detector's confidences, not the mask.
    """
    logits = _wide(logits.reshape(-1, logits.shape[-1]))
    per_region = F.cross_entropy(logits, _ignored_as_torch(labels.reshape(-1)), reduction="none")
    return (per_region * weights.reshape(-1).to(per_region.dtype)).mean() * normalizer


def masked_feature_regression(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    row_weight: Tensor,
    normalizer: float = 1 / 0.15,
    rows: Tensor | None = None,
) -> Tensor:
    """RoI-feature regression: normalizer / N * sum_i w_i * mean_f SmoothL1(x_i W^T + b - t_i), beta 1.

    x [N, H] transformed region states, weight [F, H], bias [F], target [N, F], row_weight [N] (the 0/1
    region mask). N counts every region, masked or not, as in the authors' mean over B x 36; only rows
    with a non-zero weight are projected, so the [N, F] prediction of unmasked regions is never formed.
    rows [M]: the flat indices of every weighted row, padded with -1 (weight 0); None: found by nonzero.
    """
    n = x.shape[0]
    row_weight = row_weight.reshape(-1)
    if rows is None:
        rows = (row_weight != 0).nonzero().squeeze(1)
        picked_weight = row_weight.index_select(0, rows)
    else:
        picked_weight, rows = listed(row_weight, rows, 0)
    prediction = _wide(F.linear(x.index_select(0, rows), weight, bias))
    target = target.index_select(0, rows).to(prediction.dtype)
    per_row = F.smooth_l1_loss(prediction, target, reduction="none", beta=1.0).mean(1)
    return (per_row * picked_weight.to(per_row.dtype)).sum() * (normalizer / max(n, 1))


def feature_regression(backend: str) -> Callable[..., Tensor]:
    """masked_feature_regression by name: "torch" (above) or "triton" (kernels/feature_regression.py, fused)."""
    if backend == "torch":
        return masked_feature_regression
    if backend == "triton":
        from kernels.feature_regression import masked_feature_regression as fused

        return fused
    raise ValueError(f"unknown feat_loss_backend {backend!r}; one of 'torch', 'triton'")


def soft_score_bce(logits: Tensor, soft_scores: Tensor) -> Tensor:
    """VQA/GQA fine-tuning: mean BCE-with-logits on the soft answer scores, times the number of answers."""
    logits = _wide(logits)
    return F.binary_cross_entropy_with_logits(logits, soft_scores.to(logits.dtype)) * logits.shape[-1]
