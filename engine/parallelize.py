"""What is applied to a built model for speed or memory, never inside lxmert/ (the model stays pure
architecture, as torchtitan keeps it): activation checkpointing and torch.compile (engine/runtime.py calls them).

- activation checkpointing (train.activation_checkpointing): every encoder layer's forward is recomputed in the
  backward (torch.utils.checkpoint, non-reentrant, RNG state preserved: the same dropout masks, so the losses and
  gradients are those of a run without it). The layer's `forward` is replaced on the instance, so parameter
  names, checkpoints and ZeRO-3's per-module hooks stay as they are.
- torch.compile (train.compile; train.cuda_graphs: mode "reduce-overhead"): nn.Module.compile on the plain path
  (in place: parameter names unchanged), DeepSpeed's engine.compile on the DeepSpeed path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every language, region and cross-modality layer of an LXMERT model (pre-training or fine-tuning)."""
    backbone = model.lxmert
    return [*backbone.lang_layers, *backbone.region_layers, *backbone.cross_layers]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each encoder layer in the backward pass; returns how many layers were wrapped."""
    layers = encoder_layers(model)
    for layer in layers:
        if getattr(layer, "_checkpointed", False):
            continue
        forward = layer.forward

        @functools.wraps(forward)
        def recomputed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

        layer.forward = recomputed
        layer._checkpointed = True
    return len(layers)


def compile_model(module: Any, backend: str, cuda_graphs: bool = False, deepspeed: bool = False) -> None:
    """torch.compile in place: an nn.Module, or a DeepSpeed engine (its own compile, which passes compile_kwargs
    on); cuda_graphs: mode "reduce-overhead" (train.cuda_graphs)."""
    kwargs = {"mode": "reduce-overhead"} if cuda_graphs else {}
    if deepspeed:
        module.compile(backend=backend, compile_kwargs=kwargs)
    else:
        module.compile(backend=backend, **kwargs)
