"""kernels/fused_attention.py's dropout seed: an int64 [1] tensor drawn per forward on the inputs' device by
torch's generator of that device and loaded by the kernels (no host read). The same generator state gives the
same mask, two forwards draw different masks, torch.manual_seed and torch.utils.checkpoint's RNG restore
reproduce them, the backward regenerates the forward's mask, and (on a GPU) a captured CUDA graph draws new
masks at each replay.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (tiny shapes).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import kernels.fused_attention as ca

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
assert ca.triton_runs_on(torch.empty(0, device=DEVICE))  # conftest.py turns the interpreter on without a GPU

P = 0.3
BATCH, HEADS, LEN_Q, LEN_K, DIM = 2, 2, 5, 7, 16


def randn(*shape, g):
    return torch.randn(*shape, generator=g).to(DEVICE)


def qkv(seed):
    g = torch.Generator().manual_seed(seed)
    return (
        randn(BATCH, HEADS, LEN_Q, DIM, g=g),
        randn(BATCH, HEADS, LEN_K, DIM, g=g),
        randn(BATCH, HEADS, LEN_K, DIM, g=g),
    )


def rng_state():
    return torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()


def set_rng_state(state):
    (torch.cuda.set_rng_state if DEVICE == "cuda" else torch.set_rng_state)(state)


def test_same_generator_state_same_seed_and_mask_new_state_new_mask():
    q, k, v = qkv(0)
    state = rng_state()
    first = ca.draw_dropout_seed(DEVICE)
    assert first.device.type == DEVICE and first.dtype == torch.int64 and first.shape == (1,)
    out_a = ca.cross_attention(q, k, v, dropout_p=P)  # draws the next seed: the generator moved on
    out_b = ca.cross_attention(q, k, v, dropout_p=P)
    assert not torch.equal(out_a, out_b)  # two forwards, two masks
    set_rng_state(state)
    assert torch.equal(ca.draw_dropout_seed(DEVICE), first)
    assert torch.equal(ca.cross_attention(q, k, v, dropout_p=P), out_a)
    assert torch.equal(ca.cross_attention(q, k, v, dropout_p=P), out_b)
    mask_a = ca.dropout_keep_mask(first, BATCH, HEADS, LEN_Q, LEN_K, P, DEVICE)
    assert torch.equal(mask_a, ca.dropout_keep_mask(first.clone(), BATCH, HEADS, LEN_Q, LEN_K, P, DEVICE))
    other = ca.dropout_keep_mask(first + 1, BATCH, HEADS, LEN_Q, LEN_K, P, DEVICE)
    assert not torch.equal(mask_a, other)


def test_manual_seed_twice_gives_identical_forwards_and_gradients():
    def step(seed):
        torch.manual_seed(seed)
        leaves = [t.clone().requires_grad_() for t in qkv(1)]
        lang, vis = ca.bidirectional_from_views(leaves[:1] * 3, [leaves[1], *leaves[1:]], None, None, P)
        out = ca.cross_attention(*leaves, dropout_p=P)
        (lang.square().sum() + vis.sum() + out.sum()).backward()
        return [lang, vis, out, *(t.grad for t in leaves)]

    for a, b in zip(step(5), step(5)):
        assert torch.equal(a, b)
    assert not torch.equal(step(5)[2], step(6)[2])


def test_backward_regenerates_the_forwards_mask_after_the_generator_moved_on():
    """The backward loads the saved seed tensor, whatever was drawn in between: gradients equal the float64
    reference's with the forward's materialised mask."""
    q, k, v = (t.double() for t in qkv(2))
    grad_out = torch.randn(BATCH, HEADS, LEN_Q, DIM, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    torch.manual_seed(7)
    keep = ca.dropout_keep_mask(ca.draw_dropout_seed(DEVICE), BATCH, HEADS, LEN_Q, LEN_K, P, DEVICE)
    assert 0 < (~keep).sum() < keep.numel()
    torch.manual_seed(7)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = ca.cross_attention(*leaves, dropout_p=P)
    for _ in range(3):  # later forwards draw other seeds; the saved one is untouched
        ca.cross_attention(*leaves, dropout_p=P)
    out.backward(grad_out)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ca.reference_attention(*ref_leaves, None, None, keep, P)
    ref.backward(grad_out.double())
    for a, b in zip([out, *(t.grad for t in leaves)], [ref, *(t.grad for t in ref_leaves)]):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_activation_checkpointing_recomputes_the_same_masks():
    """torch.utils.checkpoint restores torch's RNG state before recomputing: the recomputed forward draws the same
    seeds, so the gradients are those of the plain run (a seed kept outside torch's generators would not be)."""
    x = torch.randn(BATCH, LEN_Q + LEN_K, HEADS * DIM, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def layer(x):
        t = x.view(BATCH, LEN_Q + LEN_K, HEADS, DIM).transpose(1, 2)
        lang, vis = ca.bidirectional_attention(t, t * 0.5, t.square(), n_lang=LEN_Q, dropout_p=P)
        return ca.cross_attention(lang, vis, vis, dropout_p=P)

    grads = []
    for checkpointed in (False, True):
        leaf = x.clone().requires_grad_()
        torch.manual_seed(8)
        out = checkpoint(layer, leaf, use_reentrant=False, preserve_rng_state=True) if checkpointed else layer(leaf)
        out.square().sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-7)


class ScalarReads(TorchDispatchMode):
    """Records every read of a tensor's value on the host through the dispatcher (.item(), int(), bool())."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_forward_and_backward_never_read_the_seed_on_the_host(monkeypatch):
    """Forward and backward through the entry points with Tensor.item and int(tensor) raising; then, counted by a
    dispatch mode (which sees a custom op as one call), the launchers the ops run."""

    def host_read(*args):
        raise AssertionError("a tensor read on the host")

    q, k, v = qkv(9)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", host_read)
        patch.setattr(torch.Tensor, "__int__", host_read)
        ca.cross_attention(*leaves, dropout_p=P).sum().backward()
        sum(
            t.sum() for t in ca.bidirectional_from_views(leaves[:1] * 3, leaves[1:2] * 2 + leaves[2:], None, None, P)
        ).backward()

    seed = ca.draw_dropout_seed(DEVICE)
    d_lang, d_vis = torch.ones_like(q), torch.ones_like(k)
    lang, vis = (q, q, q), (k, k, v)
    counter = ScalarReads()
    with counter:
        ca.cross_attention(q, k, v, dropout_p=P)
        ca.bidirectional_from_views(lang, vis, None, None, P)
        ca._attention_fwd(q, k, v, None, 0.25, P, seed)
        ca._attention_bwd(q, k, v, None, d_lang, 0.25, P, seed)
        ca._bidirectional_fwd(lang, vis, None, None, 0.25, P, seed)
        ca._bidirectional_bwd(lang, vis, None, None, d_lang, d_vis, 0.25, P, seed)
    assert counter.reads == []
    with counter:  # the counter does see a host read
        seed.item()
    assert counter.reads == ["aten._local_scalar_dense.default"]


def test_a_seed_on_another_device_is_refused():
    q, k, v = qkv(10)
    meta_seed = torch.zeros(1, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="dropout seed is on meta"):
        ca._attention_fwd(q, k, v, None, 0.25, P, meta_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_cuda_graph_draws_new_masks_at_each_replay():
    q, k, v = (t.half() for t in qkv(11))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        for _ in range(2):
            ca.cross_attention(q, k, v, dropout_p=P)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ca.cross_attention(q, k, v, dropout_p=P)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append(out.clone())
    torch.cuda.synchronize()
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])
    plain = ca.cross_attention(q, k, v)
    assert all(not torch.equal(r, plain) for r in replays)  # dropout did act in each replay
