"""kernels/feature_regression.py: loss and x / weight / bias gradients against a float64 reference
(norm-wise relative error), on LXMERT-like and awkward shapes, per dtype. Without a GPU the kernel runs in the
Triton interpreter on CPU tensors; with one, on CUDA tensors (fp32 checks assume TF32 off, torch's default).

fp32 must be within 1e-5 of float64; fp16 / bf16 within 2x PyTorch's own error (the same formula run by plain
torch ops in that dtype, measured against float64) plus a small constant (kernels/errors.py's against_float64).
"""

import pytest
import torch

import kernels.feature_regression as fr
from kernels.errors import FEATURE_SLACK, against_float64
from kernels.errors import norm_rel_err as rel_err
from lxmert import losses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# conftest.py turns the interpreter on before triton is imported when there is no GPU
assert fr.triton_runs_on(torch.empty(0, device=DEVICE)), "the Triton kernel cannot run: TRITON_INTERPRET unset"

NORMALIZER = 1 / 0.15


def make_inputs(n, h, f, dtype=torch.float32, target_dtype=torch.float32, weights="mask", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    weight = torch.randn(f, h, generator=g) / h**0.5
    b = torch.randn(f, generator=g) * 0.1 if bias else None
    target = torch.randn(n, f, generator=g)  # |pred - target| spans both SmoothL1 branches
    if weights == "mask":
        row_weight = (torch.rand(n, generator=g) < 0.15).float()
        row_weight[n // 2] = 1.0  # never empty
    elif weights == "soft":  # non-0/1 weights, a third of them zero
        row_weight = torch.rand(n, generator=g) * 3 * (torch.rand(n, generator=g) > 0.33)
    else:
        row_weight = weights
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(weight), cast(b), target.to(DEVICE, target_dtype), row_weight.to(DEVICE)


def run(fn, x, weight, bias, target, row_weight, grad_scale=1.0, **kw):
    """Loss and the gradients of x, weight, bias (leaves are fresh copies, so inputs stay untouched)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    loss = fn(*leaves, target, row_weight, NORMALIZER, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def run_float64(x, weight, bias, target, row_weight, grad_scale=1.0):
    up = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return run(fr.reference_masked_feature_regression, up(x), up(weight), up(bias), up(target), row_weight, grad_scale)


def errors(outs, ref):
    (loss, grads), (ref_loss, ref_grads) = outs, ref
    return [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads) if r is not None]


def assert_close_fp32(inputs, grad_scale=1.0, tol=1e-5):
    loss, grads = run(fr.masked_feature_regression, *inputs, grad_scale=grad_scale)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    for g, t in zip(grads, inputs[:3]):
        assert (g is None) == (t is None) and (g is None or (g.dtype == t.dtype and g.shape == t.shape))
    errs = errors((loss, grads), run_float64(*inputs, grad_scale=grad_scale))
    assert max(errs) <= tol, errs
    return loss, grads


# ---- dtype sweep: LXMERT-like shapes (2 images x 36 regions) and awkward ones ---------------------------
SHAPES = {"lxmert": (72, 64, 128), "n37_f100": (37, 48, 100), "f2048": (72, 32, 2048)}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_against_float64(shape, dtype):
    n, h, f = SHAPES[shape]
    target_dtype = torch.float32 if dtype == torch.float32 else torch.float16  # the store keeps fp16
    x, weight, bias, target, row_weight = make_inputs(
        n, h, f, dtype, target_dtype, weights="soft" if shape == "n37_f100" else "mask"
    )
    result = against_float64(
        lambda x, w, b: fr.masked_feature_regression(x, w, b, target, row_weight, NORMALIZER),
        # float64: the truth; in dtype: the yardstick
        lambda x, w, b: fr.reference_masked_feature_regression(
            x, w, b, target.to(x.dtype), row_weight, NORMALIZER, acc_dtype=x.dtype
        ),
        [x, weight, bias],
        [torch.ones((), device=DEVICE)],
        dtype,
        ["loss", "dx", "dweight", "dbias"],
        rel_err,
        FEATURE_SLACK,
    )
    loss, *grads = result["kernel"].values()
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert result["passed"], {k: (e, result["tolerances"][k]) for k, e in result["errors"].items()}


# ---- awkward inputs, fp32 against float64 -------------------------------------------------------------
def test_no_weighted_region_gives_zero_loss_and_zero_gradients():
    x, weight, bias, target, _ = make_inputs(72, 64, 128)
    loss, grads = run(fr.masked_feature_regression, x, weight, bias, target, torch.zeros(72, device=DEVICE))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    for g, t in zip(grads, (x, weight, bias)):
        assert g is not None and g.shape == t.shape and not g.any()


def test_all_regions_weighted():
    assert_close_fp32(make_inputs(72, 64, 128, weights=torch.ones(72, device=DEVICE)))


def test_one_region():
    assert_close_fp32(make_inputs(1, 64, 128, weights=torch.ones(1, device=DEVICE)))
    assert_close_fp32(make_inputs(37, 64, 128, weights=torch.eye(37, device=DEVICE)[36]))  # only the last of 37


def test_f_spanning_two_blocks_with_a_tail_and_grad_output_scale():
    assert_close_fp32(make_inputs(37, 16, 1100, weights="soft"), grad_scale=-2.5)


def test_bias_none():
    assert_close_fp32(make_inputs(37, 64, 100, bias=False))


def test_fp16_target_with_fp32_x():
    assert_close_fp32(make_inputs(72, 64, 128, target_dtype=torch.float16))


def test_noncontiguous_x_target_weight_and_row_weight():
    x, weight, bias, target, row_weight = make_inputs(72, 64, 128, weights="soft")
    x_nc = torch.randn(128, 72, device=DEVICE).t()[:, ::2]  # strides (1, 144)
    x_nc.copy_(x)
    target_nc = target.t().contiguous().t()  # strides (1, 72)
    weight_nc = weight.t().contiguous().t()
    row_weight_nc = torch.stack([row_weight, row_weight], 1)[:, 1]  # stride 2
    assert not (x_nc.is_contiguous() or target_nc.is_contiguous() or row_weight_nc.is_contiguous())
    loss, grads = assert_close_fp32((x_nc, weight_nc, bias, target_nc, row_weight_nc))
    ref_loss, ref_grads = run(fr.masked_feature_regression, x, weight, bias, target, row_weight)
    assert torch.allclose(loss, ref_loss, rtol=1e-6) and all(torch.allclose(a, b) for a, b in zip(grads, ref_grads))


def test_batch_region_layout_and_bool_mask():
    x, weight, bias, target, row_weight = make_inputs(72, 64, 128)
    batched = (x.view(2, 36, 64), weight, bias, target.view(2, 36, 128), row_weight.bool().view(2, 36))
    loss, grads = run(fr.masked_feature_regression, *batched)
    flat_loss, flat_grads = run(fr.masked_feature_regression, x, weight, bias, target, row_weight)
    assert torch.equal(loss, flat_loss) and torch.equal(grads[0].view(72, 64), flat_grads[0])


def test_shape_mismatch_raises():
    x, weight, bias, target, row_weight = make_inputs(8, 16, 32)
    with pytest.raises(ValueError):
        fr.masked_feature_regression(x, weight, bias, target[:, :31], row_weight)


def test_gradcheck_float64():
    x, weight, bias, target, _ = make_inputs(5, 3, 5, torch.float64, torch.float64, seed=3)  # F=5: a masked tail
    row_weight = torch.tensor([1.0, 0, 0.5, 2.0, 0], dtype=torch.float64, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fn = lambda x, w, b: fr.masked_feature_regression(x, w, b, target, row_weight, NORMALIZER)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_equals_lxmert_losses_fp32():
    inputs = make_inputs(72, 64, 128, weights="soft", seed=1)
    loss, grads = run(fr.masked_feature_regression, *inputs, grad_scale=3.0)
    ref_loss, ref_grads = run(losses.masked_feature_regression, *inputs, grad_scale=3.0)
    assert rel_err(loss, ref_loss) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-6


def test_autocast_bf16_matches_lxmert_losses():
    inputs = make_inputs(72, 64, 128, target_dtype=torch.float16, seed=2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, grads = run(fr.masked_feature_regression, *inputs)
        ref_loss, ref_grads = run(losses.masked_feature_regression, *inputs)
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) <= 1e-6  # the same bf16 prediction
    for g, r, t in zip(grads, ref_grads, inputs[:3]):
        assert g.dtype == t.dtype == torch.float32 and rel_err(g, r) <= 1e-2


def test_unweighted_rows_are_never_read_nor_projected():
    x, weight, bias, target, row_weight = make_inputs(72, 64, 128, weights="soft")
    clean_loss, clean_grads = run(fr.masked_feature_regression, x, weight, bias, target, row_weight)
    unweighted = row_weight == 0
    x, target = x.clone(), target.clone()
    x[unweighted] = float("nan")
    target[unweighted] = float("nan")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss, grads = run(fr.masked_feature_regression, x, weight, bias, target, row_weight)
    assert torch.isfinite(loss) and torch.equal(loss, clean_loss)
    assert all(torch.equal(g, c) for g, c in zip(grads, clean_grads))
    assert not grads[0][unweighted].any()
    m = int((~unweighted).sum())
    assert (m, 128) in saved and all(s.numel() <= max(m * 128, 128 * 64) for s in saved)  # no [N, F] buffer


def test_cpu_fallback_without_interpreter(monkeypatch):
    inputs = make_inputs(37, 32, 100, weights="soft")
    kernel_loss, kernel_grads = run(fr.masked_feature_regression, *inputs)
    monkeypatch.setattr(fr, "_INTERPRETED", False)
    monkeypatch.setattr(fr, "_loss_and_unit_grad", None)  # the fallback must not launch
    cpu_inputs = [t.cpu() for t in inputs]
    loss, grads = run(fr.masked_feature_regression, *cpu_inputs)
    assert rel_err(loss, kernel_loss.cpu()) <= 1e-6
    assert all(rel_err(g, k.cpu()) <= 1e-6 for g, k in zip(grads, kernel_grads))


# ---- rows given: the flat indices of the weighted rows, padded with -1 (no host sync) ------------------
def padded_rows(row_weight, padding, g, dtype=torch.int64):
    """The weighted rows in random order with `padding` entries -1 at random positions."""
    real = (row_weight != 0).nonzero().squeeze(1).cpu()
    rows = torch.cat([real, torch.full((padding,), -1, dtype=real.dtype)])
    return rows[torch.randperm(len(rows), generator=g)].to(DEVICE, dtype)


ROWS_CASES = {  # (n, h, f, weights, padding)
    "lxmert_mask": (72, 64, 128, "mask", 11),
    "soft_n37_f100": (37, 48, 100, "soft", 5),
    "all_weighted": (36, 16, 40, torch.ones(36), 3),
    "nothing_weighted": (36, 16, 40, torch.zeros(36), 4),  # every entry padding: a launch, loss 0
    "no_padding": (37, 16, 1100, "soft", 0),  # F over two blocks with a tail
}


@pytest.mark.parametrize("case", list(ROWS_CASES))
def test_rows_given_equals_rows_found_float64(case):
    n, h, f, weights, padding = ROWS_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    x, weight, bias, target, row_weight = make_inputs(n, h, f, torch.float64, torch.float64, weights, seed=len(case))
    rows = padded_rows(row_weight, padding, g)
    found = run(fr.masked_feature_regression, x, weight, bias, target, row_weight, grad_scale=1.5)
    given = run(fr.masked_feature_regression, x, weight, bias, target, row_weight, grad_scale=1.5, rows=rows)
    reference = run(
        fr.reference_masked_feature_regression, x, weight, bias, target, row_weight, grad_scale=1.5, rows=rows
    )
    for a, b in ((given, found), (given, reference)):
        assert max(errors(a, b)) <= 1e-12, errors(a, b)
    for g_ in given[1]:
        assert g_.dtype == torch.float64
    if not row_weight.any():
        assert given[0].item() == 0.0 and not any(g_.any() for g_ in given[1])


def test_rows_given_equals_lxmert_losses_with_rows():
    x, weight, bias, target, row_weight = make_inputs(72, 64, 128, weights="soft", seed=4)
    rows = padded_rows(row_weight, 9, torch.Generator().manual_seed(4), torch.int32)  # the loaders' dtype
    loss, grads = run(fr.masked_feature_regression, *(x, weight, bias, target, row_weight), grad_scale=2.0, rows=rows)
    ref_loss, ref_grads = run(
        losses.masked_feature_regression, *(x, weight, bias, target, row_weight), grad_scale=2.0, rows=rows
    )
    assert rel_err(loss, ref_loss) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-6


def test_rows_given_is_deterministic_and_padding_gets_no_gradient():
    x, weight, bias, target, row_weight = make_inputs(72, 64, 128, seed=5)
    row_weight[0] = 0.0  # padding entries gather row 0: it must stay without a gradient
    rows = padded_rows(row_weight, 13, torch.Generator().manual_seed(5))
    first = run(fr.masked_feature_regression, x, weight, bias, target, row_weight, rows=rows)
    again = run(fr.masked_feature_regression, x, weight, bias, target, row_weight, rows=rows)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not first[1][0][row_weight == 0].any()


def test_rows_empty_is_a_static_zero():
    x, weight, bias, target, row_weight = make_inputs(36, 16, 40, seed=6)
    loss, grads = run(
        fr.masked_feature_regression,
        x,
        weight,
        bias,
        target,
        row_weight,
        rows=torch.empty(0, dtype=torch.int64, device=DEVICE),
    )
    assert loss.item() == 0.0 and all(g is not None and not g.any() for g in grads)


def test_gradcheck_float64_with_rows():
    x, weight, bias, target, _ = make_inputs(5, 3, 5, torch.float64, torch.float64, seed=7)
    row_weight = torch.tensor([1.0, 0, 0.5, 2.0, 0], dtype=torch.float64, device=DEVICE)
    rows = torch.tensor([3, -1, 0, -1, 2], device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fn = lambda x, w, b: fr.masked_feature_regression(x, w, b, target, row_weight, NORMALIZER, rows=rows)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_cpu_fallback_with_rows_without_interpreter(monkeypatch):
    inputs = make_inputs(37, 32, 100, weights="soft", seed=8)
    rows = padded_rows(inputs[4], 6, torch.Generator().manual_seed(8))
    kernel_loss, kernel_grads = run(fr.masked_feature_regression, *inputs, rows=rows)
    monkeypatch.setattr(fr, "_INTERPRETED", False)
    monkeypatch.setattr(fr, "_loss_and_unit_grad", None)  # the fallback must not launch
    loss, grads = run(fr.masked_feature_regression, *[t.cpu() for t in inputs], rows=rows.cpu())
    assert rel_err(loss, kernel_loss.cpu()) <= 1e-6
    assert all(rel_err(g, k.cpu()) <= 1e-6 for g, k in zip(grads, kernel_grads))


def test_bad_rows_raise():
    x, weight, bias, target, row_weight = make_inputs(8, 16, 32)
    for rows in (torch.zeros(2, 2, dtype=torch.int64), torch.zeros(3), torch.zeros(3, dtype=torch.bool)):
        with pytest.raises(ValueError):
            fr.masked_feature_regression(x, weight, bias, target, row_weight, rows=rows.to(DEVICE))
