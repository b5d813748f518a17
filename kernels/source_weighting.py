"""The fusion decoder's weighting of its two sources, fused: channel sums, 3 x 3 box means, the
weight maps and the weighted sums, with every division in fp32 whatever the maps' dtype.

With ``box(x)`` the 3 x 3 mean (zero padding, always over 9) of ``x`` summed over its channels and
``scale`` nine times the one value of the fixed box filter's weights
(docs/fast-path.md#the-decoders-box-filters-as-their-algebra):

- deep (docs/model.md#fusion-decoder, step 1): ``g = scale box(x)`` for each source,
  ``y = fused + g_ir / (g_ir + g_vis + 1e-6) ir + g_vis / (g_ir + g_vis + 1e-6) vis``;
- shallow (step 3): ``s = |x - scale box(x)|`` per channel for each source,
  ``out = y + (0.5 s_ir ir + s_vis vis) / (s_ir + s_vis + 1e-6)``, where ``y`` is the upsampled
  map, read through the decoder's size adjust (kernels/size_adjust.py) when it is smaller.

The deep weight divides by a sum that can nearly cancel (docs/model.md#numerics-of-the-deep-weighting),
so it is computed in fp32 even for 16-bit maps. One kernel sums each source's channels per pixel
(fp32), a second reads those sums around each pixel and writes the weighted sum for a tile of
pixels and channels. As in the model, no gradient reaches the sources through the weights: the
ops differentiate ``fused`` (or ``y``) only, and refuse sources that need a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp
from .size_adjust import adjusted_source_index, margin_before, size_adjust_backward, size_adjust_torch

BLOCK_M = 64


@triton.jit
def _pixel(offs_m, height, width):
    return offs_m // (width * height), (offs_m // width) % height, offs_m % width


@triton.jit
def _channel_sum_kernel(X, S, pixels, height, width, channels, stride_xn, stride_xc, stride_xh, stride_xw,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < pixels
    image, row, column = _pixel(offs_m, height, width)
    base = image * stride_xn + row * stride_xh + column * stride_xw
    offs_c = tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, channels, BLOCK_C):
        mask = mask_m[:, None] & (start + offs_c < channels)[None, :]
        x = tl.load(X + base[:, None] + (start + offs_c)[None, :] * stride_xc, mask=mask, other=0.0)
        total += tl.sum(x.to(tl.float32), 1)
    tl.store(S + offs_m, total, mask=mask_m)


@triton.jit
def _box_mean(S, image, row, column, height, width, mask):
    """3 x 3 mean of the per-pixel sums ``S`` (``[B * H * W]``, fp32), zero outside, over 9."""
    total = tl.zeros(row.shape, dtype=tl.float32)
    for tap in tl.static_range(9):
        source_row = row + tap // 3 - 1
        source_column = column + tap % 3 - 1
        inside = mask & (source_row >= 0) & (source_row < height) & (source_column >= 0) & (source_column < width)
        total += tl.load(S + (image * height + source_row) * width + source_column, mask=inside, other=0.0)
    return total / 9.0


@triton.jit
def _weighted_sum_kernel(
    BASE, IR, VIS, S_IR, S_VIS, OUT, pixels, height, width, channels, scale, base_height, base_width, top, left,
    stride_bn, stride_bc, stride_bh, stride_bw, stride_in, stride_ic, stride_ih, stride_iw,
    stride_vn, stride_vc, stride_vh, stride_vw, stride_on, stride_oc, stride_oh, stride_ow,
    IS_DEEP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < pixels
    mask = mask_m[:, None] & (offs_c < channels)[None, :]
    image, row, column = _pixel(offs_m, height, width)
    scale = tl.cast(scale, tl.float32)
    mean_ir = scale * _box_mean(S_IR, image, row, column, height, width, mask_m)
    mean_vis = scale * _box_mean(S_VIS, image, row, column, height, width, mask_m)
    base_row = adjusted_source_index(row, top, base_height, False)
    base_column = adjusted_source_index(column, left, base_width, False)
    base = tl.load(BASE + _offsets(image, base_row, base_column, offs_c, stride_bn, stride_bc, stride_bh, stride_bw),
                   mask=mask, other=0.0).to(tl.float32)
    ir = tl.load(IR + _offsets(image, row, column, offs_c, stride_in, stride_ic, stride_ih, stride_iw),
                 mask=mask, other=0.0).to(tl.float32)
    vis = tl.load(VIS + _offsets(image, row, column, offs_c, stride_vn, stride_vc, stride_vh, stride_vw),
                  mask=mask, other=0.0).to(tl.float32)
    if IS_DEEP:
        total = mean_ir + mean_vis + 1e-6
        out = base + (mean_ir / total)[:, None] * ir + (mean_vis / total)[:, None] * vis
    else:
        s_ir = tl.abs(ir - mean_ir[:, None])
        s_vis = tl.abs(vis - mean_vis[:, None])
        out = base + (0.5 * s_ir * ir + s_vis * vis) / (s_ir + s_vis + 1e-6)
    tl.store(OUT + _offsets(image, row, column, offs_c, stride_on, stride_oc, stride_oh, stride_ow),
             out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _offsets(image, row, column, offs_c, stride_n, stride_c, stride_h, stride_w):
    return (image * stride_n + row * stride_h + column * stride_w)[:, None] + offs_c[None, :] * stride_c


def _channel_sums(x: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    pixels = batch * height * width
    sums = torch.empty(pixels, device=x.device, dtype=torch.float32)
    block_c = min(64, triton.next_power_of_2(channels))
    _channel_sum_kernel[(triton.cdiv(pixels, BLOCK_M),)](x, sums, pixels, height, width, channels, *x.stride(),
                                                         BLOCK_M=BLOCK_M, BLOCK_C=block_c, **COMPILER_OPTIONS)
    return sums


def _check(base: Tensor, ir: Tensor, vis: Tensor, *, deep: bool) -> tuple[int, int]:
    """Checks the maps; returns the size adjust's margins before (rows, columns) for ``base``."""
    if ir.dim() != 4 or min(ir.shape) <= 0:
        raise ValueError(f"expected non-empty maps [batch, channels, height, width], got shape {tuple(ir.shape)}")
    if vis.shape != ir.shape or vis.dtype != ir.dtype:
        raise ValueError(f"vis must match ir, {tuple(ir.shape)} {ir.dtype}, got {tuple(vis.shape)} {vis.dtype}")
    name = "fused" if deep else "y"
    if base.dtype != ir.dtype or base.dim() != 4 or base.shape[:2] != ir.shape[:2] or (
            deep and base.shape != ir.shape):
        raise ValueError(f"{name} must be {'' if deep else 'at most '}{tuple(ir.shape)} {ir.dtype}, the sources' "
                         f"shape, got {tuple(base.shape)} {base.dtype}")
    return (margin_before(base.shape[2], ir.shape[2], False, f"{name} height"),
            margin_before(base.shape[3], ir.shape[3], False, f"{name} width"))


def weighted_sum_fwd(base: Tensor, ir: Tensor, vis: Tensor, scale: float, *, deep: bool) -> Tensor:
    """The deep (``deep=True``) or shallow weighted sum of ``ir`` and ``vis`` added to ``base``; maps
    ``[B, C, H, W]`` in any strides (a shallow ``base`` may be smaller: it is read through the size
    adjust, kernels/size_adjust.py); the result ``[B, C, H, W]`` in channels_last."""
    top, left = _check(base, ir, vis, deep=deep)
    batch, channels, height, width = ir.shape
    pixels = batch * height * width
    out = torch.empty_like(ir, memory_format=torch.channels_last)
    block_c = min(64, triton.next_power_of_2(channels))
    _weighted_sum_kernel[(triton.cdiv(pixels, BLOCK_M), triton.cdiv(channels, block_c))](
        base, ir, vis, _channel_sums(ir), _channel_sums(vis), out, pixels, height, width, channels, scale,
        base.shape[2], base.shape[3], top, left, *base.stride(), *ir.stride(), *vis.stride(), *out.stride(),
        IS_DEEP=deep, BLOCK_M=BLOCK_M, BLOCK_C=block_c, **COMPILER_OPTIONS)
    return out


# ---- registered ops ----------------------------------------------------------------------------

def _gradient_of_base(ctx, grad_out):
    return grad_out, None, None, None


def _save_base_size(ctx, inputs, output):
    ctx.base_size = inputs[0].shape[2:]


def _gradient_of_adjusted_base(ctx, grad_out):
    if ctx.base_size == grad_out.shape[2:]:
        return grad_out, None, None, None
    return size_adjust_backward.op(grad_out, *ctx.base_size, False), None, None, None


def _deep_weighted_sum_impl(fused: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    return weighted_sum_fwd(fused, ir, vis, scale, deep=True)


def _shallow_weighted_sum_impl(y: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    return weighted_sum_fwd(y, ir, vis, scale, deep=False)


def _weighted_sum_fake(base, ir, vis, scale):
    return torch.empty_like(ir, memory_format=torch.channels_last)


_deep_weighted_sum = FusedOp("deep_weighted_sum", _deep_weighted_sum_impl, _weighted_sum_fake,
                             backward=_gradient_of_base, setup_context=lambda ctx, inputs, output: None)
_shallow_weighted_sum = FusedOp("shallow_weighted_sum", _shallow_weighted_sum_impl, _weighted_sum_fake,
                                backward=_gradient_of_adjusted_base, setup_context=_save_base_size)


def _refuse_source_gradients(ir: Tensor, vis: Tensor) -> None:
    if torch.is_grad_enabled() and (ir.requires_grad or vis.requires_grad):
        raise RuntimeError("the weighted sums pass no gradient to their sources; use the *_torch twins "
                           "where the sources need one")


# ---- public functions and their PyTorch twins ----------------------------------------------------

def deep_weighted_sum(fused: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    """``fused + w_ir ir + w_vis vis`` with ``w = g / (g_ir + g_vis + 1e-6)``, ``g = scale box(x)``
    (see the module's note); channels_last (Triton). Differentiates ``fused`` only."""
    _refuse_source_gradients(ir, vis)
    return _deep_weighted_sum(fused, ir, vis, scale)


def _widened(*maps: Tensor) -> list[Tensor]:
    """16-bit maps in fp32 (the weighting's arithmetic), others as they are."""
    return [x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in maps]


def deep_weighted_sum_torch(fused: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    """The twin (16-bit maps computed in fp32, the result rounded once, as the kernel does)."""
    dtype = fused.dtype
    fused, ir, vis = _widened(fused, ir, vis)
    with torch.no_grad():
        g_ir = scale * box_mean_of_channel_sum(ir)
        g_vis = scale * box_mean_of_channel_sum(vis)
        total = g_ir + g_vis + 1e-6
        w_ir, w_vis = g_ir / total, g_vis / total
    return (fused + w_ir * ir + w_vis * vis).to(dtype)


def shallow_weighted_sum(y: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    """``y + (0.5 s_ir ir + s_vis vis) / (s_ir + s_vis + 1e-6)`` with ``s = |x - scale box(x)|`` (see
    the module's note); channels_last (Triton). ``y`` smaller than the sources is first brought to
    their size by the decoder's size adjust, read by address. Differentiates ``y`` only."""
    _refuse_source_gradients(ir, vis)
    return _shallow_weighted_sum(y, ir, vis, scale)


def shallow_weighted_sum_torch(y: Tensor, ir: Tensor, vis: Tensor, scale: float) -> Tensor:
    """The twin, with gradients into the sources too (the weights without); ``y`` smaller than the
    sources is size-adjusted first; 16-bit maps computed in fp32, the result rounded once."""
    _check(y, ir, vis, deep=False)
    dtype = y.dtype
    y, ir, vis = _widened(size_adjust_torch(y, ir.shape[2], ir.shape[3]), ir, vis)
    sources_need_grad = torch.is_grad_enabled() and (ir.requires_grad or vis.requires_grad)
    with torch.no_grad():
        s_ir = torch.sub(ir, box_mean_of_channel_sum(ir), alpha=scale).abs_()
        s_vis = torch.sub(vis, box_mean_of_channel_sum(vis), alpha=scale).abs_()
        total = torch.add(s_ir, s_vis).add_(1e-6)
        if not sources_need_grad:
            # The same sum as below, in place: fewer full-resolution passes.
            skip = s_ir.mul_(ir).mul_(0.5).addcmul_(s_vis, vis).div_(total)
    if sources_need_grad:
        skip = 0.5 * (s_ir / total) * ir + (s_vis / total) * vis
    return (y + skip).to(dtype)


def box_mean_of_channel_sum(x: Tensor) -> Tensor:
    """``[B, 1, H, W]``: the 3 x 3 mean (zero padding, always over 9) of ``x`` summed over its channels.

    A box filter whose weights are all ``w`` gives every output channel ``9 w`` times this.
    """
    return F.avg_pool2d(x.sum(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=True)
