"""LXMERT configuration: field names as transformers' LxmertConfig, defaults as the authors' code.

Unknown keys are ignored by `from_dict` / `from_hf` so that a Hugging Face config.json (which carries
generic PreTrainedConfig fields) loads directly. Two deliberate differences from transformers' defaults:
`visual_loss_normalizer` is the authors' exact 1 / 0.15 (transformers rounds it to 6.67; a config loaded
from transformers keeps its 6.67), and the model picks an attention backend (`attn_backend`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")


@dataclass
class LxmertConfig:
    vocab_size: int = 30522
    """WordPiece vocabulary size (BERT uncased)."""
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    """Width of the feed-forward block of every layer."""
    hidden_act: str = "gelu"
    """Activation of the feed-forward blocks and head transforms; "gelu" is the erf form."""
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation of every Linear and Embedding."""
    layer_norm_eps: float = 1e-12
    l_layers: int = 9
    """Language encoder layers."""
    r_layers: int = 5
    """Object-relationship (region) encoder layers."""
    x_layers: int = 5
    """Cross-modality layers."""
    visual_feat_dim: int = 2048
    """Size of one region feature (Faster R-CNN pool5)."""
    visual_pos_dim: int = 4
    """Size of one box: (x1, y1, x2, y2) divided by (w, h, w, h)."""
    num_qa_labels: int = 9500
    """Answers of the pre-training QA head (the joint answer table)."""
    num_object_labels: int = 1600
    num_attr_labels: int = 400
    visual_loss_normalizer: float = 1 / 0.15
    """Weight of each visual loss: 1 / (region masking probability), as in the authors' code."""
    task_mask_lm: bool = True
    task_obj_predict: bool = True
    task_matched: bool = True
    task_qa: bool = True
    visual_obj_loss: bool = True
    visual_attr_loss: bool = True
    visual_feat_loss: bool = True
    attn_backend: str = "eager"
    """Attention implementation for every attention of the model: eager, sdpa, triton, flash (lxmert.attention)."""
    feat_loss_backend: str = "torch"
    """RoI-feature regression loss: "torch" or "triton" (the fused kernel of kernels/feature_regression.py)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.feat_loss_backend not in ("torch", "triton"):
            raise ValueError(f"feat_loss_backend {self.feat_loss_backend!r} is not one of ('torch', 'triton')")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        for name in ("l_layers", "r_layers", "x_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LxmertConfig:
        """Build from a mapping, ignoring keys that are not fields (such as transformers' bookkeeping)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in values.items() if k in names}
        layers = values.get("num_hidden_layers")
        if isinstance(layers, dict):  # transformers stores the three depths a second time, under other names
            for ours, theirs in (("l_layers", "language"), ("r_layers", "vision"), ("x_layers", "cross_encoder")):
                known.setdefault(ours, layers[theirs])
        return cls(**known)

    @classmethod
    def from_hf(cls, hf_config: Any) -> LxmertConfig:
        """Build from a transformers LxmertConfig object, a dict, or a path to a config.json."""
        if isinstance(hf_config, (str, Path)):
            hf_config = json.loads(Path(hf_config).read_text())
        if not isinstance(hf_config, dict):
            hf_config = hf_config.to_dict()
        return cls.from_dict(hf_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields transformers' LxmertConfig knows, for writing a config.json it loads."""
        values = self.to_dict()
        values.pop("attn_backend")
        values.pop("feat_loss_backend")
        values.pop("layer_norm_eps")  # transformers hard-codes 1e-12
        values["model_type"] = "lxmert"
        values["num_hidden_layers"] = {
            "vision": self.r_layers,
            "cross_encoder": self.x_layers,
            "language": self.l_layers,
        }
        return values
