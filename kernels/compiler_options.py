"""Compiler options that every Triton launch of this package passes, and the TF32 choice of its fp32 dots."""

import torch

# Pinned rather than left to Triton's default, which is on up to Triton 3.9 and off from 3.10
# (3.9 warns about it at the first launch): a * b + c as one FMA sets the kernels' fp32 rounding
# and speed, and neither may change with the installed Triton.
COMPILER_OPTIONS = {"enable_fp_fusion": True}


def tf32_requested(tf32: bool | None) -> bool:
    """Whether fp32 dots run in TF32: as asked, or (``None``) as PyTorch's own GEMMs do
    (``torch.backends.cuda.matmul.allow_tf32``, off unless switched on), so that
    ``fuse(precision="tf32")`` reaches the kernels."""
    return torch.backends.cuda.matmul.allow_tf32 if tf32 is None else tf32
