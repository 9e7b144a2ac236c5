"""engine/optim.py: BertAdam against a float64 reference of the authors' rule, schedules, make_optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import small_config

import lxmert
from engine.config import OptimConfig, load_config
from engine.optim import BertAdam, make_optimizer, make_schedule, make_scheduler, param_groups


def reference_bert_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-6, wd=0.01):
    """The authors' update in float64: m, v without bias correction; p -= lr * (m/(sqrt v + eps) + wd p)."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for g, step_lr in zip(grads, lr):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - step_lr * (m / (v.sqrt() + eps) + wd * p)
    return p


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
@pytest.mark.parametrize("foreach", [False, True])
def test_bert_adam_matches_the_reference(dtype, tol, foreach):
    torch.manual_seed(0)
    shapes = [(7, 5), (13,), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    start = [p.detach().clone() for p in params]
    lrs = [1e-2, 3e-2, 0.0, 2e-2, 1e-2, 5e-3]  # a step with lr 0 (the authors' first step) too
    grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in lrs]
    for g in grads[2]:
        g.zero_()  # a zero gradient: m and v still decay, weight decay still applies
    opt = BertAdam(params, lr=1.0, weight_decay=0.01, foreach=foreach)
    for step, step_lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = step_lr
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
    for i, p in enumerate(params):
        expected = reference_bert_adam(start[i], [g[i] for g in grads], lrs)
        err = ((p.double() - expected).abs().max() / expected.abs().max()).item()
        assert err <= tol, f"param {i}: relative error {err:.3g}"


def test_first_step_has_no_bias_correction():
    p = torch.nn.Parameter(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([0.1, -4.0, 0.0], dtype=torch.float64)
    lr, wd, eps = 1e-3, 0.01, 1e-6
    opt = BertAdam([p], lr=lr, weight_decay=wd)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    m, v = 0.1 * g, 0.001 * g * g
    expected = before - lr * (m / (v.sqrt() + eps) + wd * before)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=0)
    # about lr * 0.1 / sqrt(0.001) = 3.16 lr per unit gradient sign; bias-corrected Adam would move lr
    assert (before - p.detach())[0].item() == pytest.approx(lr * (0.1 / math.sqrt(0.001) + wd * 0.5), rel=1e-3)
    assert p.grad is not None and (p.detach()[2] - before[2] * (1 - lr * wd)).abs() < 1e-15  # zero grad: decay only


def test_foreach_equals_loop_and_skips_params_without_grad():
    torch.manual_seed(1)
    model = lxmert.LxmertForPreTraining(small_config())
    twin = copy.deepcopy(model)
    loop = BertAdam(model.parameters(), lr=1e-3, foreach=False)
    fast = BertAdam(twin.parameters(), lr=1e-3, foreach=True)
    frozen = "lxmert.pooler.weight"
    for _ in range(4):
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        for m in (model, twin):
            m.get_parameter(frozen).grad = None
        loop.step()
        fast.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name  # the same ops in the same order: bit-identical on the CPU
    assert model.get_parameter(frozen) not in loop.state  # never stepped, no state


def test_state_dict_round_trip_resumes_identically():
    torch.manual_seed(2)

    def make():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        opt = BertAdam(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, make_schedule("linear", 0.2, 10))

    batches = [torch.randn(5, 4) for _ in range(6)]

    def train(model, opt, sched, xs):
        for x in xs:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            sched.step()

    model, opt, sched = make()
    train(model, opt, sched, batches)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = make()
    train(model, opt, sched, batches[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
    model, opt, sched = make()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    sched.load_state_dict(saved[2])
    train(model, opt, sched, batches[3:])
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)


def test_bert_adam_rejects_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in ({"lr": -1.0}, {"betas": (0.9, 1.0)}, {"eps": -1.0}, {"weight_decay": -0.1}):
        with pytest.raises(ValueError):
            BertAdam(p, **kwargs)


@pytest.mark.parametrize(
    "kind, expected",
    [
        # steps of 100 with 10% warm-up: 0, mid warm-up, warm-up end, half, end, beyond the end
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 150: 0.0}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0, 150: 1.0}),
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0, 150: 0.0}),
    ],
)
def test_schedules_at_key_points(kind, expected):
    schedule = make_schedule(kind, 0.1, 100)
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value, abs=1e-12), (kind, step)


def test_linear_is_pytorch_pretrained_berts_warmup_linear():
    def warmup_linear(x, warmup=0.002):  # the authors' src/lxrt/optimization.py
        if x < warmup:
            return x / warmup
        return max((x - 1.0) / (warmup - 1.0), 0)

    schedule = make_schedule("linear", 0.05, 1000)
    for step in range(0, 1100, 7):
        assert schedule(step) == warmup_linear(step / 1000, 0.05)
    assert make_schedule("linear", 0.0, 10)(0) == 1.0  # no warm-up: starts at the peak
    assert make_schedule("cosine", 0.0, 10)(5) == pytest.approx(0.5)
    for bad in (("step", 0.1, 10), ("linear", 1.0, 10), ("linear", 0.1, 0)):
        with pytest.raises(ValueError):
            make_schedule(*bad)


def test_scheduler_drives_bert_adam_like_the_authors():
    """LambdaLR stepped after each optimizer step: step k uses lr * warmup_linear(k / t_total), k from 0."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = BertAdam([p], lr=1e-2, weight_decay=0.0)
    sched = make_scheduler(opt, OptimConfig(lr=1e-2, warmup_ratio=0.25, schedule="linear"), total_steps=8)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    expected = [1e-2 * v for v in (0, 0.5, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0, 0)]
    assert seen == pytest.approx(expected)


def test_make_optimizer_groups():
    model = lxmert.LxmertForPreTraining(small_config())
    names = {id(p): n for n, p in model.named_parameters()}
    total = len(list(model.parameters()))

    bert = make_optimizer(model, load_config(None).optim)  # the authors': decay on everything
    assert isinstance(bert, BertAdam) and len(bert.param_groups) == 1
    assert len(bert.param_groups[0]["params"]) == total and bert.param_groups[0]["weight_decay"] == 0.01
    assert bert.defaults["eps"] == 1e-6 and bert.defaults["betas"] == (0.9, 0.999)

    adamw = make_optimizer(model, load_config(None, ["optim.name=adamw", "optim.lr=3e-4"]).optim)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True
    decay, exempt = adamw.param_groups
    assert (decay["name"], decay["weight_decay"], exempt["name"], exempt["weight_decay"]) == (
        "decay",
        0.01,
        "no_decay",
        0.0,
    )
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert "lxmert.embeddings.norm.weight" in exempt_names and "mlm_head.bias" in exempt_names
    assert "lxmert.visual_embeddings.feat_norm.weight" in exempt_names
    assert all(n.endswith(".bias") or n.endswith("norm.weight") for n in exempt_names)
    assert all(p.dim() == 2 for p in decay["params"])  # every matrix and embedding table decays
    assert len(decay["params"]) + len(exempt["params"]) == total

    custom = make_optimizer(model, load_config(None, ["optim.no_decay=['*.bias']"]).optim)
    assert isinstance(custom, BertAdam) and all(
        names[id(p)].endswith(".bias") for p in custom.param_groups[1]["params"]
    )
    with pytest.raises(ValueError, match="match no parameter"):
        param_groups(model, 0.01, ["*LayerNorm.weight"])


def test_adamw_steps_and_bert_adam_steps_a_model():
    torch.manual_seed(4)
    for name in ("bertadam", "adamw"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        opt = make_optimizer(model, load_config(None, [f"optim.name={name}"]).optim)
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
