"""The error measures the tests and benchmarks.kernels judge results by: relative to the reference, in float64.

rel_err (max-norm) is the attention kernel's and the model's measure; norm_rel_err (Frobenius) the
feature-regression kernel's and the losses'.
"""

from __future__ import annotations

import math

import torch


def rel_err(actual: torch.Tensor, reference: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - reference| / max(max |reference|, floor), in float64 (0 when both are all zero).

    `floor` is for a reference that is exactly zero in exact arithmetic (the gradient of a softmax over
    one key, of a key bias): then rounding noise is judged against the size of its neighbours."""
    actual, reference = actual.detach().double(), reference.detach().double()
    assert actual.shape == reference.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(reference.shape)}"
    diff = (actual - reference).abs().max().item() if actual.numel() else 0.0
    scale = max(reference.abs().max().item() if reference.numel() else 0.0, floor)
    if scale == 0.0:
        return diff if diff == 0.0 else math.inf
    return diff / scale


def norm_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()
