"""LXMERT pre-training: the backbone, four heads and the five losses (total = plain sum).

Heads: masked LM (transform + decoder tied to the word embeddings + bias), matching (Linear(H, 2) on the
pooled output), object head (transform, then obj / attr / feat decoders on every region), QA head.
Losses, each switched by its config flag (task_mask_lm, task_matched, task_obj_predict with
visual_obj_loss / visual_attr_loss / visual_feat_loss, task_qa) and computed when its labels are passed:
  mlm     cross-entropy over the masked tokens (labels >= 0); the vocabulary head runs on those rows only
  matched 2-way cross-entropy on every pair
  obj     normalizer * mean over all B x R regions of conf_i * CE(obj)  (weights: detector confidences)
  attr    the same with the attribute head
  feat    normalizer * mean over all regions of mask_i * mean_f SmoothL1 (only masked rows are projected)
  qa      cross-entropy over the pairs with an answer label >= 0 (mismatched pairs carry -1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import losses
from .attention import Unpadding
from .config import LxmertConfig
from .modeling import AnswerHead, HeadTransform, LxmertModel, ModelOutput, init_weights
from .pretrained import PretrainedMixin

Tensor = torch.Tensor


@dataclass
class LxmertForPreTrainingOutput(ModelOutput):
    loss: Tensor | None = None  # sum of the components in `losses`
    prediction_logits: Tensor | None = None  # [B, L, vocab], only when asked (see forward)
    cross_relationship_score: Tensor | None = None  # [B, 2]
    question_answering_score: Tensor | None = None  # [B, num_qa_labels]
    language_hidden_states: tuple[Tensor, ...] | None = None
    vision_hidden_states: tuple[Tensor, ...] | None = None
    language_attentions: tuple[Tensor, ...] | None = None  # see LxmertModelOutput
    vision_attentions: tuple[Tensor, ...] | None = None
    cross_encoder_attentions: tuple[Tensor, ...] | None = None
    losses: dict[str, Tensor] | None = None  # each component: mlm, matched, obj, attr, feat, qa

    def to_tuple(self) -> tuple:
        """transformers' return_dict=False tuple: loss when there is one, then the three head outputs, whose
        slots are always there (None for logits not asked for, or without a QA head, where transformers puts
        pooled_output[0][0]), then the hidden states and attentions asked for. `losses` is not in it."""
        heads = (self.prediction_logits, self.cross_relationship_score, self.question_answering_score)
        rest = (
            self.language_hidden_states,
            self.vision_hidden_states,
            self.language_attentions,
            self.vision_attentions,
            self.cross_encoder_attentions,
        )
        loss = () if self.loss is None else (self.loss,)
        return loss + heads + tuple(t for t in rest if t is not None)


class MaskedLMHead(nn.Module):
    """transform, then a decoder that shares its weight with the word-embedding table, plus a bias.

    The tied weight is one Parameter registered in both modules (as the authors and transformers do), so
    sharded optimisers such as ZeRO-3 gather it where each module runs; state dicts list it under both names.
    """

    def __init__(self, config: LxmertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = HeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class FeatureRegressionDecoder(nn.Linear):
    """The feat decoder (hidden -> feature dim). Called with targets it returns the masked regression loss
    instead of predictions: the loss then reads the decoder's weight inside the decoder's own forward, where
    parameter-sharding engines (ZeRO-3) have gathered it, and only the masked rows are ever projected."""

    def __init__(self, hidden_size: int, feat_dim: int, loss_backend: str):
        super().__init__(hidden_size, feat_dim)
        self._loss = losses.feature_regression(loss_backend)

    def forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        row_weight: Tensor | None = None,
        normalizer: float = 1.0,
        rows: Tensor | None = None,
    ) -> Tensor:
        if target is None:
            return super().forward(x)
        return self._loss(x, self.weight, self.bias, target, row_weight, normalizer, rows=rows)


class ObjectHead(nn.Module):
    """transform, then one decoder per enabled visual loss: obj (classes), attr (classes), feat (regression); the
    forward returns those losses (the feature loss is computed inside its decoder's forward: ZeRO-3 gathers a
    weight only there)."""

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.transform = HeadTransform(config)
        h = config.hidden_size
        self.decoders = nn.ModuleDict()  # in the order obj, attr, feat, for the enabled losses
        if config.visual_obj_loss:
            self.decoders["obj"] = nn.Linear(h, config.num_object_labels)
        if config.visual_attr_loss:
            self.decoders["attr"] = nn.Linear(h, config.num_attr_labels)
        if config.visual_feat_loss:
            self.decoders["feat"] = FeatureRegressionDecoder(h, config.visual_feat_dim, config.feat_loss_backend)

    def forward(
        self,
        vis: Tensor,
        obj_labels: dict[str, tuple[Tensor, Tensor]],
        normalizer: float,
        feat_rows: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The enabled visual losses of region states vis [B, R, H] against obj_labels, each times `normalizer`
        (feat_rows: the masked regions' flat indices, see LxmertForPreTraining.forward)."""
        states = self.transform(vis).reshape(-1, vis.shape[-1])  # [B * R, H]: every region
        parts = {}
        for name, decoder in self.decoders.items():
            if name not in obj_labels:
                raise KeyError(f"obj_labels has no {name!r} entry, but the {name} loss is enabled in the config")
            target, weight = obj_labels[name]
            if target.shape[:2] != vis.shape[:2] or weight.shape[:2] != vis.shape[:2]:
                raise ValueError(
                    f"obj_labels[{name!r}] must be per region [batch, regions={vis.shape[1]}, ...], "
                    f"got {tuple(target.shape)} and {tuple(weight.shape)}"
                )
            if name == "feat":
                parts[name] = decoder(states, target.reshape(states.shape[0], -1), weight, normalizer, feat_rows)
            else:
                parts[name] = losses.weighted_region_cross_entropy(decoder(states), target, weight, normalizer)
        return parts


class LxmertForPreTraining(PretrainedMixin, nn.Module):
    takes_pretraining_heads = True

    def __init__(self, config: LxmertConfig):
        super().__init__()
        self.config = config
        self.lxmert = LxmertModel(config)
        self.mlm_head = MaskedLMHead(config, self.lxmert.embeddings.word)
        self.match_head = nn.Linear(config.hidden_size, 2)
        self.obj_head = ObjectHead(config) if config.task_obj_predict else None
        self.answer_head = (
            AnswerHead(config.hidden_size, 2 * config.hidden_size, config.num_qa_labels, config.layer_norm_eps)
            if config.task_qa
            else None
        )
        # the MLM decoder is the already initialised word-embedding table
        for head in (self.mlm_head.transform, self.match_head, self.obj_head, self.answer_head):
            if head is not None:
                init_weights(head, config.initializer_range)

    def forward(
        self,
        input_ids: Tensor,
        visual_feats: Tensor,
        visual_pos: Tensor,
        attention_mask: Tensor | None = None,
        visual_attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        obj_labels: dict[str, tuple[Tensor, Tensor]] | None = None,
        matched_label: Tensor | None = None,
        ans: Tensor | None = None,
        return_prediction_logits: bool | None = None,
        mlm_rows: Tensor | None = None,
        feat_rows: Tensor | None = None,
        unpadding: Unpadding | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
    ) -> LxmertForPreTrainingOutput | tuple:
        """Keywords as transformers' LxmertForPreTraining.

        labels [B, L]: MLM targets, negative where not masked. obj_labels: {"obj": (ids [B, R], conf [B, R]),
        "attr": (ids, conf), "feat": (target feats [B, R, F], mask [B, R])}. matched_label [B] (1 = matched).
        ans [B]: answer index, negative to ignore. return_prediction_logits: full-vocabulary logits for every
        token; by default only when no MLM labels are given (training never needs them), and always with
        return_dict=False (transformers' tuple has them). output_attentions and unpadding (the flash backend's,
        found ahead): as LxmertModel.
        """
        cfg = self.config
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
        lang, vis, pooled = out.language_output, out.vision_output, out.pooled_output
        if return_prediction_logits is None:
            return_prediction_logits = labels is None or not return_dict
        cross_relationship_score = self.match_head(pooled)
        answer_score = self.answer_head(pooled) if self.answer_head is not None else None

        parts: dict[str, Tensor] = {}
        if labels is not None and cfg.task_mask_lm:
            parts["mlm"] = losses.masked_token_loss(lang, labels, self.mlm_head, mlm_rows)
        if matched_label is not None and cfg.task_matched:
            parts["matched"] = losses.cross_entropy(cross_relationship_score, matched_label)
        if obj_labels is not None and self.obj_head is not None:
            parts.update(self.obj_head(vis, obj_labels, cfg.visual_loss_normalizer, feat_rows))
        if ans is not None and answer_score is not None:
            parts["qa"] = losses.cross_entropy(answer_score, ans)

        if parts:
            loss = torch.stack(list(parts.values())).sum()
        elif any(x is not None for x in (labels, obj_labels, matched_label, ans)):  # none enabled: 0, as transformers
            loss = torch.zeros((), device=pooled.device)
        else:
            loss = None
        result = LxmertForPreTrainingOutput(
            loss=loss,
            prediction_logits=self.mlm_head(lang) if return_prediction_logits else None,
            cross_relationship_score=cross_relationship_score,
            question_answering_score=answer_score,
            language_hidden_states=out.language_hidden_states,
            vision_hidden_states=out.vision_hidden_states,
            language_attentions=out.language_attentions,
            vision_attentions=out.vision_attentions,
            cross_encoder_attentions=out.cross_encoder_attentions,
            losses=parts or None,
        )
        return result if return_dict else result.to_tuple()
