"""Custom Triton ops for LXMERT, each beside the PyTorch reference it is tested against.

On CUDA tensors the Triton kernels run; on the CPU they run under TRITON_INTERPRET=1 (set before triton is
first imported), else each op falls back to its PyTorch reference. Each launch is a torch.library custom op
(lxmert::*) with a fake impl and its autograd, so torch.compile traces the entry points without a graph break.
"""

from .feature_regression import masked_feature_regression, reference_masked_feature_regression
from .fused_attention import bidirectional_attention, cross_attention, reference_attention

__all__ = [
    "bidirectional_attention",
    "cross_attention",
    "reference_attention",
    "masked_feature_regression",
    "reference_masked_feature_regression",
]
