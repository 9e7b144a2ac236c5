"""Model FLOPs of an LXMERT training step, parameter counts, and MFU (model FLOPs utilisation).

Counted from the shapes, matmuls only: 2 * m * n * k for every GEMM, i.e. every Linear and the attention
scores (q k^T) and context (p v) products. Not counted: embeddings lookups, LayerNorm, softmax, activations,
dropout, losses (all O(tokens * hidden), under 1% here). Padded tokens count: attention and every layer run
over them. The backward pass of a GEMM is two GEMMs of the same size (the gradients of both operands), except
where an operand needs no gradient: the visual projections' inputs are data, so their backward is one GEMM,
and a fine-tuning loss never reads the last cross layer's vision stream, so its vision self-attention and FFN
have no backward. So backward = 2 x forward minus those: a step is about 3 x forward (the usual rule), exactly.
Recomputation by activation checkpointing is not counted: MFU counts model FLOPs, not hardware FLOPs
(PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's estimate_mfu counts 6N + attention per token the same way).

The pre-training step runs the heads as lxmert/pretraining.py does: MLM transform + decoder (hidden x vocab)
only on the masked tokens, the object transform and obj/attr decoders on every region, the feature decoder
only on the masked regions, the QA and matching heads on every pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxmert.config import LxmertConfig

# Peak dense (no sparsity) throughput in TFLOP/s, from NVIDIA's datasheets, which quote tensor-core numbers
# "with sparsity": dense is half of them. H100 SXM5 (H100 Tensor Core GPU datasheet): BF16/FP16 1,979 sparse
# -> 989.4 dense, TF32 989 sparse -> 494.7, FP32 (CUDA cores) 67. H100 PCIe: BF16/FP16 1,513 -> 756.5, TF32
# 756 -> 378, FP32 51. H200 (H200 datasheet): the H100 SXM's compute (same GH100 chip and clocks), more and
# faster memory. A100 SXM4/PCIe (A100 datasheet): BF16/FP16 312 dense, TF32 156 dense, FP32 19.5.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def gpu_model(device_name: str) -> str | None:
    """PEAK_TFLOPS's key for a torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" -> "H100 SXM"), or None."""
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name:
        if "PCIE" in name:
            return "H100 PCIe"
        return None if "NVL" in name else "H100 SXM"  # the SXM5 parts report "H100 80GB HBM3" / "H100 SXM5"
    if "A100" in name:
        return "A100"
    return None


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one GPU for matmuls in dtype ("bf16", "fp16", "tf32", "fp32"); None if unknown.
    fp32 training with TF32 matmuls allowed (torch.backends.cuda.matmul.allow_tf32) runs at the "tf32" peak."""
    model = gpu_model(device_name)
    return None if model is None else PEAK_TFLOPS[model][dtype] * 1e12


def mfu(flops_per_step: float, step_time_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak. Give both for the same scope: the FLOPs
    one GPU does in a step (its micro batches x accumulation) with one GPU's peak, or the global step with
    peak x world size."""
    return flops_per_step / step_time_s / peak


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _gemm(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _bert_layer(c: LxmertConfig, tokens: int, seq: int) -> int:
    """A post-LN BERT layer over `tokens` = batch x seq rows: fused QKV, scores, context, output, FFN."""
    h = c.hidden_size
    attention = _gemm(tokens, h, 3 * h) + 2 * _gemm(tokens, seq, h) + _gemm(tokens, h, h)
    return attention + 2 * _gemm(tokens, h, c.intermediate_size)


def _backbone(c: LxmertConfig, batch: int, text_len: int, regions: int, vision_used: bool) -> tuple[int, int]:
    """(forward, backward) FLOPs of LxmertModel. vision_used: whether the loss reads vision_output (the object
    head does; the QA/NLVR2 heads read only the pooled [CLS]): if not, the last cross layer's vision
    self-attention and FFN (with no cross layer: the whole vision side) get no backward."""
    h, lang, vis = c.hidden_size, batch * text_len, batch * regions
    data_input = _gemm(vis, c.visual_feat_dim, h) + _gemm(vis, c.visual_pos_dim, h)  # visual embeddings
    language = c.l_layers * _bert_layer(c, lang, text_len)
    vision = data_input + c.r_layers * _bert_layer(c, vis, regions)
    # cross layer: one shared attention both ways (language queries over regions and back), projected once
    cross = _gemm(lang + vis, h, 3 * h) + 2 * (_gemm(lang, regions, h) + _gemm(vis, text_len, h))
    cross += _gemm(lang + vis, h, h)
    cross += _bert_layer(c, lang, text_len) + _bert_layer(c, vis, regions)
    forward = language + vision + c.x_layers * cross + _gemm(batch, h, h)  # + pooler
    saved = data_input  # of 2 x forward: the visual projections' inputs are data, only weight gradients
    if not vision_used:  # GEMMs whose output reaches no loss: no backward at all
        saved = 2 * vision if c.x_layers == 0 else data_input + 2 * _bert_layer(c, vis, regions)
    return forward, 2 * forward - saved


def _answer_head(rows: int, in_dim: int, hidden: int, labels: int) -> int:
    return _gemm(rows, in_dim, hidden) + _gemm(rows, hidden, labels)


def step_flops(
    config: LxmertConfig,
    task: str,
    batch_size: int,
    text_len: int = 20,
    regions: int = 36,
    masked_tokens: int | None = None,
    masked_regions: int | None = None,
    num_answers: int | None = None,
) -> StepFlops:
    """FLOPs of one forward and backward over `batch_size` samples of `text_len` tokens (padded length) and
    `regions` regions. Pre-training: masked_tokens / masked_regions are the batch's counts (labels >= 0,
    mask != 0), by default 15% of the words (text_len - 2 a sentence) and of the regions. VQA / GQA:
    num_answers (default config.num_qa_labels). NLVR2: batch_size statements, each with two images."""
    c, h = config, config.hidden_size
    if task == "pretrain":
        forward, backward = _backbone(c, batch_size, text_len, regions, vision_used=c.task_obj_predict)
        if masked_tokens is None:
            masked_tokens = round(0.15 * batch_size * max(text_len - 2, 0))
        if masked_regions is None:
            masked_regions = round(0.15 * batch_size * regions)
        heads = _gemm(batch_size, h, 2)  # matching head
        if c.task_mask_lm:
            heads += _gemm(masked_tokens, h, h) + _gemm(masked_tokens, h, c.vocab_size)
        if c.task_obj_predict:
            all_regions = batch_size * regions
            heads += _gemm(all_regions, h, h)  # the object head's transform runs on every region
            heads += c.visual_obj_loss * _gemm(all_regions, h, c.num_object_labels)
            heads += c.visual_attr_loss * _gemm(all_regions, h, c.num_attr_labels)
            heads += c.visual_feat_loss * _gemm(masked_regions, h, c.visual_feat_dim)
        if c.task_qa:
            heads += _answer_head(batch_size, h, 2 * h, c.num_qa_labels)
    elif task in ("vqa", "gqa"):
        forward, backward = _backbone(c, batch_size, text_len, regions, vision_used=False)
        heads = _answer_head(batch_size, h, 2 * h, num_answers or c.num_qa_labels)
    elif task == "nlvr2":  # the statement with each image: the backbone runs on 2 x batch
        forward, backward = _backbone(c, 2 * batch_size, text_len, regions, vision_used=False)
        heads = _answer_head(batch_size, 2 * h, 2 * h, 2)
    else:
        raise ValueError(f"unknown task {task!r}; one of 'pretrain', 'vqa', 'gqa', 'nlvr2'")
    return StepFlops(forward=forward + heads, backward=backward + 2 * heads)


# ---------------------------------------------------------------------------------------------- parameters


def parameter_count(config: LxmertConfig, task: str = "pretrain", num_answers: int | None = None) -> int:
    """Parameters of the model for `task`, the tied MLM decoder counted once (as model.parameters() does)."""
    c, h, i = config, config.hidden_size, config.intermediate_size

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    norm = 2 * h
    attention = linear(h, 3 * h) + linear(h, h) + norm
    ffn = linear(h, i) + linear(i, h) + norm
    backbone = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + norm
    backbone += linear(c.visual_feat_dim, h) + linear(c.visual_pos_dim, h) + 2 * norm
    backbone += (c.l_layers + c.r_layers) * (attention + ffn) + c.x_layers * (3 * attention + 2 * ffn)
    backbone += linear(h, h)  # pooler

    def answer_head(n_in: int, labels: int) -> int:
        return linear(n_in, 2 * h) + 2 * (2 * h) + linear(2 * h, labels)

    transform = linear(h, h) + norm
    if task == "pretrain":
        heads = transform + c.vocab_size + linear(h, 2)  # MLM transform + bias (decoder tied), matching
        if c.task_obj_predict:
            heads += transform + c.visual_obj_loss * linear(h, c.num_object_labels)
            heads += c.visual_attr_loss * linear(h, c.num_attr_labels)
            heads += c.visual_feat_loss * linear(h, c.visual_feat_dim)
        if c.task_qa:
            heads += answer_head(h, c.num_qa_labels)
        return backbone + heads
    if task in ("vqa", "gqa"):
        return backbone + answer_head(h, num_answers or c.num_qa_labels)
    if task == "nlvr2":
        return backbone + answer_head(2 * h, 2)
    raise ValueError(f"unknown task {task!r}; one of 'pretrain', 'vqa', 'gqa', 'nlvr2'")
