"""Which path a kernel module takes on CPU tensors: the Triton interpreter, or its PyTorch reference.

triton 3.6 decides between compiling and interpreting when @triton.jit decorates a function, and for its own
tl.sum / tl.max / tl.rand that happens at `import triton`: so TRITON_INTERPRET=1 must be set before anything
imports triton. A module checks its kernels and the library helpers they call once, at import.
"""

import os
import warnings


def all_interpreted(*jitted) -> bool:
    """True when every given @triton.jit function (ours and triton's helpers) runs in the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(fn, InterpretedFunction) for fn in jitted)


def warn_if_imported_too_early(interpreted: bool, what: str) -> None:
    if not interpreted and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        warnings.warn(
            f"TRITON_INTERPRET is set but triton was imported before it: {what} cannot run on CPU tensors, which "
            "use the PyTorch reference instead. Set TRITON_INTERPRET=1 before anything imports triton.",
            stacklevel=3,
        )
