"""The per-image, per-channel min-max stretch to 0..255 that ends the fusion network
(docs/model.md#fusion-decoder, step 4): ``(x - min) / (max - min + 1e-6) * 255`` over ``H x W``.

Two launches: one reduces each block of a plane (an image's channel) to its minimum and maximum,
the next reads its plane's partial results and stretches its block. The arithmetic is the
reference's, in the same order, in fp32: for fp32 maps the result is the reference's bit for bit.
No gradient (training runs :func:`minmax_to_255_torch`, the reference's own function).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import minmax_to_255 as minmax_to_255_torch  # noqa: F401  (the twin: the reference's own)
from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp

BLOCK = 1024
PARTIALS_BLOCK = 128


@triton.jit
def _plane_offsets(plane, offs, channels, width, stride_n, stride_c, stride_h, stride_w):
    return ((plane // channels) * stride_n + (plane % channels) * stride_c + (offs // width) * stride_h
            + (offs % width) * stride_w)


@triton.jit
def _minmax_partial_kernel(X, LOW, HIGH, plane_size, blocks, channels, width, stride_n, stride_c, stride_h,
                           stride_w, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    plane = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane_size
    x = tl.load(X + _plane_offsets(plane, offs, channels, width, stride_n, stride_c, stride_h, stride_w),
                mask=mask, other=0.0).to(tl.float32)
    tl.store(LOW + plane * blocks + block, tl.min(tl.where(mask, x, float("inf")), 0))
    tl.store(HIGH + plane * blocks + block, tl.max(tl.where(mask, x, float("-inf")), 0))


@triton.jit
def _minmax_stretch_kernel(X, LOW, HIGH, Y, plane_size, blocks, channels, width, stride_n, stride_c, stride_h,
                           stride_w, stride_yn, stride_yc, stride_yh, stride_yw, BLOCK: tl.constexpr,
                           PARTIALS_BLOCK: tl.constexpr):
    block = tl.program_id(0)
    plane = tl.program_id(1)
    low = tl.full([PARTIALS_BLOCK], float("inf"), tl.float32)
    high = tl.full([PARTIALS_BLOCK], float("-inf"), tl.float32)
    for start in range(0, blocks, PARTIALS_BLOCK):
        partial = start + tl.arange(0, PARTIALS_BLOCK)
        low = tl.minimum(low, tl.load(LOW + plane * blocks + partial, mask=partial < blocks, other=float("inf")))
        high = tl.maximum(high, tl.load(HIGH + plane * blocks + partial, mask=partial < blocks, other=float("-inf")))
    low_value = tl.min(low, 0)
    high_value = tl.max(high, 0)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < plane_size
    x = tl.load(X + _plane_offsets(plane, offs, channels, width, stride_n, stride_c, stride_h, stride_w),
                mask=mask, other=0.0).to(tl.float32)
    # div_rn: IEEE round-to-nearest, as PyTorch divides (Triton's "/" may approximate on a GPU).
    y = tl.math.div_rn(x - low_value, high_value - low_value + 1e-6) * 255.0
    tl.store(Y + _plane_offsets(plane, offs, channels, width, stride_yn, stride_yc, stride_yh, stride_yw),
             y.to(Y.dtype.element_ty), mask=mask)


def minmax_to_255_fwd(x: Tensor) -> Tensor:
    """The stretch of ``x`` ``[B, C, H, W]`` (any strides), in ``x``'s layout."""
    if x.dim() != 4 or min(x.shape) <= 0:
        raise ValueError(f"x must be a non-empty map [batch, channels, height, width], got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    plane_size = height * width
    blocks = triton.cdiv(plane_size, BLOCK)
    low = torch.empty(batch * channels, blocks, device=x.device, dtype=torch.float32)
    high = torch.empty_like(low)
    y = torch.empty_like(x)
    grid = (blocks, batch * channels)
    _minmax_partial_kernel[grid](x, low, high, plane_size, blocks, channels, width, *x.stride(), BLOCK=BLOCK,
                                 **COMPILER_OPTIONS)
    _minmax_stretch_kernel[grid](x, low, high, y, plane_size, blocks, channels, width, *x.stride(), *y.stride(),
                                 BLOCK=BLOCK, PARTIALS_BLOCK=PARTIALS_BLOCK, **COMPILER_OPTIONS)
    return y


def _minmax_to_255_impl(x: Tensor) -> Tensor:
    return minmax_to_255_fwd(x)


_minmax_to_255 = FusedOp("minmax_to_255", _minmax_to_255_impl, lambda x: torch.empty_like(x))


def minmax_to_255(x: Tensor) -> Tensor:
    """Per image and channel ``(x - min) / (max - min + 1e-6) * 255`` over ``H x W`` (Triton). No
    gradient (use :func:`minmax_to_255_torch` where one is needed)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("minmax_to_255 records no gradient; use minmax_to_255_torch where one is needed")
    return _minmax_to_255(x)
