"""The kernels as torch.library custom ops (lxmert::*): torch.library.opcheck on each op (schema, autograd
registration, fake impl against the real one, strides included, and AOT dispatch), no graph break under
torch._dynamo for the entry points on the kernel path and on the CPU fallback, a compiled (aot_eager) step equal
to eager, and no host wait in the feature-regression loss when it is handed its rows.

Without a GPU the ops run in the Triton interpreter on CPU tensors (slow: shapes stay tiny).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels.feature_regression as fr
import kernels.fused_attention as ca

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# conftest.py turns the interpreter on before triton is imported when there is no GPU
assert ca.triton_runs_on(torch.empty(0, device=DEVICE)) and fr.triton_runs_on(torch.empty(0, device=DEVICE))

BATCH, HEADS, N_LANG, N_VIS, DIM = 2, 2, 5, 7, 16
FEATS, FEAT_DIM = 20, 16  # region states and regression target widths


def randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def views(x):
    """(lang q, k, v), (vis q, k, v): slices of x [B, L+R, 3, H, D] as lxmert.modeling.Attention makes them."""
    q, k, v = x.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(t[:, :, :N_LANG] for t in (q, k, v)), tuple(t[:, :, N_LANG:] for t in (q, k, v))


def masks(g):
    """A padded language mask (row 0 without any real token) and a padded region mask."""
    lang = torch.arange(N_LANG)[None] < torch.tensor([[0], [3]])
    vis = torch.arange(N_VIS)[None] < torch.randint(1, N_VIS + 1, (BATCH, 1), generator=g)
    return lang.to(DEVICE), vis.to(DEVICE)


def bhld_grad(length, g):
    """A gradient laid out [B, L, H, D], as the outputs are."""
    return randn(BATCH, length, HEADS, DIM, g=g).transpose(1, 2)


def feature_inputs(g, padding=3):
    """x, weight, bias, target, row_weight (about 40% weighted) and the weighted rows padded with -1."""
    n = BATCH * N_VIS
    x, weight, bias = randn(n, FEATS, g=g), randn(FEAT_DIM, FEATS, g=g) / FEATS**0.5, randn(FEAT_DIM, g=g)
    target = randn(n, FEAT_DIM, g=g)
    row_weight = (torch.rand(n, generator=g) < 0.4).float()
    row_weight[1] = 1.0
    real = row_weight.nonzero().squeeze(1)
    rows = torch.cat([real, torch.full((padding,), -1)])
    rows = rows[torch.randperm(len(rows), generator=g)]
    return x, weight, bias, target, row_weight.to(DEVICE), rows.to(DEVICE)


def seed_tensor(dropout_p):
    return torch.tensor([20260], dtype=torch.int64, device=DEVICE) if dropout_p > 0 else None  # as drawn: on the device


# ---------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_attention(dropout_p):
    g = torch.Generator().manual_seed(1)
    (lq, lk, lv), _ = views(randn(BATCH, N_LANG + N_VIS, 3, HEADS, DIM, g=g))
    lang_mask, _ = masks(g)
    seed = seed_tensor(dropout_p)
    leaves = [t.detach().clone().requires_grad_() for t in (lq, lk, lv)]
    torch.library.opcheck(ca._attention_fwd_op, (*leaves, lang_mask, 0.3, dropout_p, seed))
    torch.library.opcheck(
        torch.ops.lxmert.attention_bwd.default, (lq, lk, lv, lang_mask, bhld_grad(N_LANG, g), 0.3, dropout_p, seed)
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck_bidirectional(dropout_p):
    g = torch.Generator().manual_seed(2)
    lang, vis = views(randn(BATCH, N_LANG + N_VIS, 3, HEADS, DIM, g=g))
    lang_mask, vis_mask = masks(g)
    seed = seed_tensor(dropout_p)
    leaves = [t.detach().clone().requires_grad_() for t in (*lang, *vis)]
    torch.library.opcheck(ca._bidirectional_fwd_op, (*leaves, lang_mask, vis_mask, 0.3, dropout_p, seed))
    grads = bhld_grad(N_LANG, g), bhld_grad(N_VIS, g)
    torch.library.opcheck(
        torch.ops.lxmert.bidirectional_bwd.default, (*lang, *vis, None, vis_mask, *grads, 0.3, dropout_p, seed)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_feature_regression(dtype):
    g = torch.Generator().manual_seed(3)
    x, weight, bias, target, row_weight, rows = feature_inputs(g)
    leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    torch.library.opcheck(fr._feature_regression_fwd_op, (*leaves, target, row_weight, rows, 0.3, dtype))
    empty = rows[:0]  # M = 0: no launch
    torch.library.opcheck(fr._feature_regression_fwd_op, (*leaves, target, row_weight, empty, 0.3, dtype))


# ---------------------------------------------------------------------------------------------- dynamo


def training_step(x, feats, weight, bias, target, row_weight, rows, lang_mask, vis_mask):
    """What the model does with the kernels: the cross layer both ways, a self-attention, the feature loss."""
    lang, vis = views(x)
    lang_ctx, vis_ctx = ca.bidirectional_from_views(lang, vis, lang_mask, vis_mask, 0.1)
    self_ctx = ca.cross_attention(*lang, lang_mask, dropout_p=0.1)
    feat_loss = fr.masked_feature_regression(feats, weight, bias, target, row_weight, rows=rows)
    return lang_ctx.square().sum() + vis_ctx.sum() + self_ctx.sum() + feat_loss


def step_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = randn(BATCH, N_LANG + N_VIS, 3, HEADS, DIM, g=g)
    x_feats, weight, bias, target, row_weight, rows = feature_inputs(g)
    return [x, x_feats, weight, bias], [target, row_weight, rows, *masks(g)]


OPS = {"lxmert.bidirectional_fwd", "lxmert.attention_fwd", "lxmert.feature_regression_fwd"}


@pytest.mark.parametrize("path", ["kernels", "cpu_fallback"])
def test_no_graph_break(path, monkeypatch):
    if path == "cpu_fallback":
        if DEVICE != "cpu":
            pytest.skip("the fallback is the CPU path")
        monkeypatch.setattr(ca, "_INTERPRETED", False)
        monkeypatch.setattr(fr, "_INTERPRETED", False)
    leaves, data = step_inputs(4)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(training_step)(*leaves, *data)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    called = {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}
    assert (called & OPS) == (OPS if path == "kernels" else set()), called


def test_compiled_step_equals_eager():
    """fullgraph aot_eager: the ops' fake impls and registered backwards traced; dropout masks equal eager's
    (aot_eager draws the seeds with torch's generator, in the same order)."""
    leaves, data = step_inputs(5)
    results = []
    torch._dynamo.reset()
    for fn in (training_step, torch.compile(training_step, backend="aot_eager", fullgraph=True)):
        copies = [t.detach().clone().requires_grad_() for t in leaves]
        torch.manual_seed(6)
        loss = fn(*copies, *data)
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in copies])
    for name, eager, compiled in zip(["loss", "dx", "dfeats", "dweight", "dbias"], *results):
        assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6), name


# ------------------------------------------------------------------------------------------ host waits

aten = torch.ops.aten


class HostWaits(TorchDispatchMode):
    """Counts the operations that make a CUDA host wait for the device: a scalar read, data-dependent shapes."""

    WAITING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.waits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in self.WAITING or bool_index:
            self.waits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["kernels", "cpu_fallback"])
def test_feature_regression_with_rows_never_waits(path, monkeypatch):
    if path == "cpu_fallback":
        monkeypatch.setattr(fr, "_INTERPRETED", False)
    g = torch.Generator().manual_seed(7)
    x, weight, bias, target, row_weight, rows = feature_inputs(g)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    for given, expected in ((rows, []), (None, ["aten.nonzero.default"])):  # the counter does see nonzero
        counter = HostWaits()
        with counter:
            fr.masked_feature_regression(*leaves, target, row_weight, rows=given).backward()
        assert counter.waits == expected, (given is None, counter.waits)


def test_feature_regression_op_inside_never_waits():
    """The mode sees a custom op as one call: run the op's implementation (and its launch) directly."""
    g = torch.Generator().manual_seed(8)
    x, weight, bias, target, row_weight, rows = feature_inputs(g)
    counter = HostWaits()
    with counter:
        fr._feature_regression_fwd(x, weight, bias, target, row_weight, rows, 0.3, torch.float32)
    assert counter.waits == []
