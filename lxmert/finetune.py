"""Fine-tuning models with the authors' heads and losses.

VQA / GQA (LxmertForQuestionAnswering): pooled -> Linear(H, 2H) -> GELU -> LN -> Linear(2H, answers);
loss = mean BCE-with-logits on the soft answer scores x the number of answers.
NLVR2 (LxmertForNLVR2): the sentence is encoded with each of its two images, the two pooled vectors are
concatenated -> Linear(2H, 2H) -> GELU -> LN -> Linear(2H, 2); 2-way cross-entropy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .answers import init_answer_head
from .attention import Unpadding
from .config import LxmertConfig
from .modeling import AnswerHead, LxmertModel, ModelOutput, init_weights
from .pretrained import PRETRAINING_HEADS, PretrainedMixin

Tensor = torch.Tensor


@dataclass
class LxmertForQuestionAnsweringOutput(ModelOutput):
    loss: Tensor | None = None
    question_answering_score: Tensor | None = None  # [B, answers]
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None  # see LxmertModelOutput
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None


@dataclass
class LxmertForNLVR2Output(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # [B, 2]: statement false / true


class LxmertForQuestionAnswering(PretrainedMixin, nn.Module):
    """VQA (3129 answers) and GQA (1842): `num_answers` defaults to config.num_qa_labels."""

    def __init__(self, config: LxmertConfig, num_answers: int | None = None):
        super().__init__()
        self.config = config
        self.num_answers = num_answers or config.num_qa_labels
        self.lxmert = LxmertModel(config)
        h = config.hidden_size
        self.answer_head = AnswerHead(h, 2 * h, self.num_answers, config.layer_norm_eps)
        init_weights(self.answer_head, config.initializer_range)

    @classmethod
    def checkpoint_kwargs(
        cls, config: LxmertConfig, state: Mapping[str, Tensor], overrides: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The answer count of a fine-tuned QA checkpoint's head, unless num_qa_labels is given: our exports keep
        the pre-training table's size in num_qa_labels (engine/tasks/finetune.py)."""
        fc1, fc2 = state.get("answer_head.fc1.weight"), state.get("answer_head.fc2.weight")
        if "num_qa_labels" in overrides or fc1 is None or fc2 is None or fc1.shape[1] != config.hidden_size:
            return {}
        if any(k.startswith(PRETRAINING_HEADS) for k in state):
            return {}
        return {"num_answers": fc2.shape[0]}

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        unpadding: Unpadding | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
    ) -> LxmertForQuestionAnsweringOutput | tuple:
        """labels: soft answer scores [B, answers] in [0, 1]; an integer [B] answer index is taken as one-hot.
        unpadding: the flash backend's, found ahead (LxmertModel)."""
        out = self.lxmert(
            input_ids,
            visual_feats,
            visual_pos,
            attention_mask,
            visual_attention_mask,
            token_type_ids,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            unpadding=unpadding,
        )
        score = self.answer_head(out.pooled_output)
        loss = None
        if labels is not None:
            if not labels.is_floating_point():
                labels = F.one_hot(labels.long(), self.num_answers)
            if labels.shape != score.shape:
                raise ValueError(f"labels must be soft scores of shape {tuple(score.shape)}, got {tuple(labels.shape)}")
            loss = losses.soft_score_bce(score, labels)
        result = LxmertForQuestionAnsweringOutput(
            loss,
            score,
            out.language_hidden_states,
            out.vision_hidden_states,
            out.language_attentions,
            out.vision_attentions,
            out.cross_encoder_attentions,
        )
        return result if return_dict else result.to_tuple()

    def init_from_pretraining(
        self, pretrained_state: Mapping[str, Tensor], table_answers: Sequence[str], answers: Sequence[str]
    ) -> tuple[int, int]:
        """Start from a pre-training checkpoint (our names): the backbone whole, the head by answer string.

        Returns (answers found in the pre-training table, answers not found).
        """
        backbone = {k[len("lxmert.") :]: v for k, v in pretrained_state.items() if k.startswith("lxmert.")}
        self.lxmert.load_state_dict(backbone)
        head = {k[len("answer_head.") :]: v for k, v in pretrained_state.items() if k.startswith("answer_head.")}
        if not head:
            raise KeyError("the pre-training checkpoint has no QA head (answer_head.*)")
        return init_answer_head(self.answer_head, head, table_answers, answers)


class LxmertForNLVR2(PretrainedMixin, nn.Module):
    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.lxmert = LxmertModel(config)
        h = config.hidden_size
        self.answer_head = AnswerHead(2 * h, 2 * h, 2, config.layer_norm_eps)
        init_weights(self.answer_head, config.initializer_range)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        unpadding: Unpadding | None = None,
        return_dict: bool = True,
    ) -> LxmertForNLVR2Output | tuple:
        """input_ids [B, L]; visual_feats [B, 2, R, F], visual_pos [B, 2, R, 4] (the pair of images); labels [B].

        unpadding: the flash backend's, found ahead (LxmertModel), for the 2B (statement, image) rows the backbone
        sees: nlvr2_unpadding of the batch's masks."""
        for name, t in (("visual_feats", visual_feats), ("visual_pos", visual_pos)):
            if t.dim() != 4 or t.shape[:2] != (input_ids.shape[0], 2):
                raise ValueError(
                    f"NLVR2 {name} must be [batch={input_ids.shape[0]}, 2 images, regions, ...], got {tuple(t.shape)}"
                )

        def per_image(t: Tensor | None) -> Tensor | None:  # the sentence is paired with each image in turn
            return None if t is None else t.repeat_interleave(2, dim=0)

        out = self.lxmert(
            per_image(input_ids),
            visual_feats.flatten(0, 1),
            visual_pos.flatten(0, 1),
            per_image(attention_mask),
            None if visual_attention_mask is None else visual_attention_mask.flatten(0, 1),
            per_image(token_type_ids),
            unpadding=unpadding,
        )
        logits = self.answer_head(out.pooled_output.reshape(input_ids.shape[0], -1))
        loss = losses.cross_entropy(logits, labels) if labels is not None else None
        result = LxmertForNLVR2Output(loss, logits)
        return result if return_dict else result.to_tuple()


def nlvr2_unpadding(attention_mask: Tensor, visual_attention_mask: Tensor | None, regions: int) -> Unpadding:
    """The Unpadding of an NLVR2 batch's masks (attention_mask [B, L], visual_attention_mask [B, 2, R] or None)
    for the 2B (statement, image) rows LxmertForNLVR2 hands its backbone: each statement's row twice, then the
    image pairs flattened, as its forward lays them out."""
    vis = None if visual_attention_mask is None else visual_attention_mask.flatten(0, 1)
    return Unpadding.from_masks(attention_mask.repeat_interleave(2, dim=0), vis, regions)
