"""engine/flops.py: the shape-derived count equals torch's FlopCounterMode on real steps; parameters; MFU."""

from __future__ import annotations

import pytest
import torch
from conftest import random_inputs, random_pretraining_labels, small_config
from torch.utils.flop_counter import FlopCounterMode

import lxmert
from engine.flops import PEAK_TFLOPS, gpu_model, mfu, parameter_count, peak_flops, step_flops


def counted(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("attn_backend", ["eager", "sdpa"])
@pytest.mark.parametrize("batch, tokens, regions", [(3, 7, 11), (1, 20, 36)])
def test_pretraining_count_equals_flop_counter(attn_backend, batch, tokens, regions):
    """FlopCounterMode counts every mm/addmm/bmm (and SDPA) torch runs, forward and backward: it must agree
    exactly, so the heads really run on masked rows only and the backward really is 2x minus the data inputs."""
    torch.manual_seed(0)
    config = small_config(attn_backend=attn_backend)
    model = lxmert.LxmertForPreTraining(config).train()
    inputs = random_inputs(config, batch, tokens, regions)
    labels = random_pretraining_labels(config, batch, tokens, regions)
    masked_tokens = int((labels["labels"] >= 0).sum())
    masked_regions = int((labels["obj_labels"]["feat"][1] != 0).sum())
    expected = step_flops(config, "pretrain", batch, tokens, regions, masked_tokens, masked_regions)

    assert counted(lambda: model(**inputs, **labels)) == expected.forward
    assert counted(lambda: model(**inputs, **labels).loss.backward()) == expected.total
    assert 2.9 * expected.forward < expected.total < 3 * expected.forward


@pytest.mark.parametrize(
    "switches",
    [
        dict(task_qa=False, visual_attr_loss=False, visual_feat_loss=False),
        dict(task_obj_predict=False, task_mask_lm=False),  # nothing reads the vision stream: less backward
        dict(task_obj_predict=False, x_layers=0),  # no cross layer: the vision side gets no gradient at all
    ],
)
def test_pretraining_heads_follow_the_task_switches(switches):
    torch.manual_seed(1)
    config = small_config(**switches)
    model = lxmert.LxmertForPreTraining(config).train()
    inputs, labels = random_inputs(config, 2, 5, 6), random_pretraining_labels(config, 2, 5, 6)
    labels["obj_labels"] = {"obj": labels["obj_labels"]["obj"]}
    expected = step_flops(config, "pretrain", 2, 5, 6, int((labels["labels"] >= 0).sum()), 0)
    assert counted(lambda: model(**inputs, **labels)) == expected.forward
    assert counted(lambda: model(**inputs, **labels).loss.backward()) == expected.total


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
@pytest.mark.parametrize("x_layers", [2, 0])
def test_finetuning_count_equals_flop_counter(task, x_layers):
    torch.manual_seed(2)
    config, batch, tokens, regions = small_config(attn_backend="sdpa", x_layers=x_layers), 3, 9, 10
    inputs = random_inputs(config, batch, tokens, regions)
    if task == "vqa":
        model = lxmert.LxmertForQuestionAnswering(config, num_answers=23).train()
        labels = torch.rand(batch, 23)
    else:
        model = lxmert.LxmertForNLVR2(config).train()
        pair = random_inputs(config, 2 * batch, tokens, regions)
        inputs["visual_feats"] = pair["visual_feats"].view(batch, 2, regions, -1)
        inputs["visual_pos"] = pair["visual_pos"].view(batch, 2, regions, 4)
        labels = torch.randint(0, 2, (batch,))
    expected = step_flops(config, task, batch, tokens, regions, num_answers=23)
    assert counted(lambda: model(**inputs, labels=labels)) == expected.forward
    assert counted(lambda: model(**inputs, labels=labels).loss.backward()) == expected.total
    model_params = sum(p.numel() for p in model.parameters())
    assert parameter_count(config, task, num_answers=23) == model_params


def test_parameter_count_of_the_default_model():
    """transformers' default LxmertForPreTraining has 228,051,752 parameters; ours (tied decoder once) too."""
    config = lxmert.LxmertConfig()
    assert parameter_count(config) == 228_051_752
    assert sum(p.numel() for p in lxmert.LxmertForPreTraining(config).parameters()) == 228_051_752
    small = small_config(visual_attr_loss=False)
    assert parameter_count(small) == sum(p.numel() for p in lxmert.LxmertForPreTraining(small).parameters())


def test_default_pretraining_step():
    """The authors' step (256 pairs, 20 tokens, 36 regions, 15% masked): pinned, and about 3 x the forward."""
    step = step_flops(lxmert.LxmertConfig(), "pretrain", 256)
    assert step.forward == 2_791_936_054_272 and step.total == 8_346_760_510_464
    assert 2.98 < step.total / step.forward < 3.0


def test_peaks_and_mfu():
    assert gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_model("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_model("NVIDIA H200") == "H200"
    assert gpu_model("NVIDIA A100-SXM4-80GB") == "A100"
    assert gpu_model("NVIDIA H100 NVL") is None and gpu_model("NVIDIA GeForce RTX 4090") is None
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32") == pytest.approx(494.7e12)
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == pytest.approx(19.5e12)
    assert PEAK_TFLOPS["H200"] == PEAK_TFLOPS["H100 SXM"]
    assert peak_flops("cpu", "bf16") is None
    assert mfu(989.4e12 * 0.5, 1.0, 989.4e12) == pytest.approx(0.5)
    assert mfu(1e12, 0.25, 8e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown task"):
        step_flops(lxmert.LxmertConfig(), "captioning", 1)
