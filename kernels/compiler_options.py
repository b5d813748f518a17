"""Compiler options that every Triton launch of this package passes."""

# Pinned rather than left to Triton's default, which is on up to Triton 3.9 and off from 3.10
# (3.9 warns about it at the first launch): a * b + c as one FMA sets the kernels' fp32 rounding
# and speed, and neither may change with the installed Triton.
COMPILER_OPTIONS = {"enable_fp_fusion": True}
