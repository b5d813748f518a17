"""Bias add and exact (erf) GELU in one pass: the epilogue of the MLP's ``fc1``.

``y = gelu(x + b)`` with ``gelu(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))``. The backward
recomputes ``z`` from the saved ``x`` and uses ``gelu'(z) = Phi(z) + z phi(z)``, with
``phi(z) = exp(-z^2 / 2) / sqrt(2 pi)``; ``dx = dy gelu'(z)`` and ``db = sum_rows(dx)``.
So ``fc1`` runs as a plain GEMM and its ``[tokens, 2048]`` output is read and written once here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp

BLOCK = 1024


@triton.jit
def gelu(z):
    """The exact GELU, ``z * Phi(z)`` with the erf, in fp32 (also the fused fc1 GEMM's epilogue)."""
    return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, numel, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + offs % cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, gelu(z).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, numel, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + offs % cols, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * (cdf + z * pdf)).to(DX.dtype.element_ty), mask=mask)


def bias_gelu_fwd(x: Tensor, bias: Tensor) -> Tensor:
    if bias.shape != x.shape[-1:]:
        raise ValueError(f"bias must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(bias.shape)}")
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        _bias_gelu_fwd_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, bias, y, x.numel(), x.shape[-1], BLOCK=BLOCK,
                                                                **COMPILER_OPTIONS)
    return y


def bias_gelu_bwd(grad_y: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    grad_y, x = grad_y.contiguous(), x.contiguous()
    dx = torch.empty_like(x)
    if x.numel():
        _bias_gelu_bwd_kernel[(triton.cdiv(x.numel(), BLOCK),)](grad_y, x, bias, dx, x.numel(), x.shape[-1],
                                                               BLOCK=BLOCK, **COMPILER_OPTIONS)
    return dx, dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


def _bias_gelu_backward_impl(grad_y: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return bias_gelu_bwd(grad_y, x, bias)


bias_gelu_backward = FusedOp("bias_gelu_backward", _bias_gelu_backward_impl,
                             lambda grad_y, x, bias: (torch.empty_like(x), torch.empty_like(bias)))
"""``(dx, dbias)`` of :func:`bias_gelu` from the saved ``x`` (the fused fc1 GEMM's backward uses it too)."""


def _bias_gelu_impl(x: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_fwd(x, bias)


def _bias_gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bias_gelu_grads(ctx, grad_y):
    x, bias = ctx.saved_tensors
    return bias_gelu_backward.op(grad_y, x, bias)


_bias_gelu = FusedOp("bias_gelu", _bias_gelu_impl, lambda x, bias: torch.empty_like(x), backward=_bias_gelu_grads,
                     setup_context=_bias_gelu_setup)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x + bias)`` (exact erf GELU), ``bias`` over the last dimension (Triton)."""
    return _bias_gelu(x, bias)


def bias_gelu_torch(x: Tensor, bias: Tensor) -> Tensor:
    return F.gelu(x + bias)
