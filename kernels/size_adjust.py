"""The decoders' size adjust by address: ``match_size(up(x), H, W) + extra`` in one pass, and its gradient.

Both decoders end their upsampling at ``8 (h // 8)`` rows and columns and reflection-pad the map
to the shallow maps' ``H x W`` (docs/model.md#size-adjust: a difference ``d`` split ``d // 2``
before and the rest after); the reconstruction decoder pads the nearest 2x upsampling of its
last map and adds the shallow map to it before its last convolution. Output pixel ``p`` of a
dimension reads ``u = p - d // 2``, reflected once into ``[0, n)`` (the pads are narrower than the
map, as ``F.pad``'s reflection requires; a negative ``d`` crops, as ``match_size`` does, though the
model never needs it), and then source pixel ``u // 2`` when ``x`` is upsampled, ``u`` otherwise.
Neither the upsampled nor the padded map is made.

The gradient of ``x`` gathers, for each source pixel, the output pixels that read it: per
dimension the one or two upsampled positions ``u``, each read directly (``u + d // 2``), by the
reflection before (``d // 2 - u``, for ``1 <= u <= d // 2``) and by the one after
(``d // 2 + 2 (n - 1) - u``, inside the output): at most six rows and six columns, masked, added
in fp32 in a fixed order (deterministic, no atomics). ``extra``'s gradient is the output's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import match_size
from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp

BLOCK_M = 64


@triton.jit
def adjusted_source_index(index, before, source_size, UPSAMPLE: tl.constexpr):
    """The source pixel that output pixel ``index`` reads: ``index - before`` reflected once into
    the (upsampled, when ``UPSAMPLE``) source, then halved when upsampled."""
    size = 2 * source_size if UPSAMPLE else source_size
    u = tl.abs(index - before)
    u = tl.where(u >= size, 2 * (size - 1) - u, u)
    if UPSAMPLE:
        return u // 2
    return u


@triton.jit
def _readers(u, before, size, output_size, kind: tl.constexpr):
    """Output position reading upsampled position ``u``: directly (``kind`` 0), through the reflection
    before (1) or after (2); and whether that reader exists."""
    if kind == 0:
        return u + before, (u + before >= 0) & (u + before < output_size)
    if kind == 1:
        return before - u, (u >= 1) & (u <= before)
    reader = before + 2 * (size - 1) - u
    return reader, (u <= size - 2) & (reader < output_size)


@triton.jit
def _size_adjust_fwd_kernel(
    X, E, Y, pixels, height, width, channels, source_height, source_width, top, left,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_en, stride_ec, stride_eh, stride_ew,
    stride_yn, stride_yc, stride_yh, stride_yw,
    UPSAMPLE: tl.constexpr, HAS_EXTRA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < pixels)[:, None] & (offs_c < channels)[None, :]
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    source_row = adjusted_source_index(row, top, source_height, UPSAMPLE)
    source_column = adjusted_source_index(column, left, source_width, UPSAMPLE)
    x_offsets = (image * stride_xn + source_row * stride_xh + source_column * stride_xw)[:, None]
    value = tl.load(X + x_offsets + offs_c[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if HAS_EXTRA:
        e_offsets = (image * stride_en + row * stride_eh + column * stride_ew)[:, None]
        value += tl.load(E + e_offsets + offs_c[None, :] * stride_ec, mask=mask, other=0.0).to(tl.float32)
    y_offsets = (image * stride_yn + row * stride_yh + column * stride_yw)[:, None]
    tl.store(Y + y_offsets + offs_c[None, :] * stride_yc, value.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _size_adjust_bwd_kernel(
    G, DX, pixels, height, width, channels, source_height, source_width, top, left,
    stride_gn, stride_gc, stride_gh, stride_gw, stride_dn, stride_dc, stride_dh, stride_dw,
    UPSAMPLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: a tile of source pixels by channels, each the sum of the output gradient at every
    output pixel that reads it."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < pixels
    mask_c = offs_c < channels
    column = offs_m % source_width
    row = (offs_m // source_width) % source_height
    image = offs_m // (source_width * source_height)
    factor: tl.constexpr = 2 if UPSAMPLE else 1
    total = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for row_tap in tl.static_range(3 * factor):
        reader_row, row_reads = _readers(factor * row + row_tap // 3, top, factor * source_height, height,
                                         row_tap % 3)
        for column_tap in tl.static_range(3 * factor):
            reader_column, column_reads = _readers(factor * column + column_tap // 3, left,
                                                   factor * source_width, width, column_tap % 3)
            reads = mask_m & row_reads & column_reads
            offsets = (image * stride_gn + reader_row * stride_gh + reader_column * stride_gw)[:, None]
            total += tl.load(G + offsets + offs_c[None, :] * stride_gc, mask=reads[:, None] & mask_c[None, :],
                             other=0.0).to(tl.float32)
    d_offsets = (image * stride_dn + row * stride_dh + column * stride_dw)[:, None]
    tl.store(DX + d_offsets + offs_c[None, :] * stride_dc, total.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_c[None, :])


def margin_before(source_size: int, size: int, upsample: bool, what: str) -> int:
    """The reflection before (``d // 2``) of one dimension of ``what`` (named in the error); refuses
    what ``F.pad``'s reflection refuses."""
    grown = 2 * source_size if upsample else source_size
    difference = size - grown
    if size <= 0 or difference - difference // 2 >= grown:
        raise ValueError(f"cannot reflect-pad a {what} of {grown} to {size}: the padding must be narrower "
                         f"than the map")
    return difference // 2


def _check(x: Tensor, height: int, width: int, upsample: bool, extra: Tensor | None) -> tuple[int, int]:
    if x.dim() != 4 or min(x.shape) <= 0:
        raise ValueError(f"x must be a non-empty map [batch, channels, height, width], got shape {tuple(x.shape)}")
    if extra is not None and (extra.shape != (*x.shape[:2], height, width) or extra.dtype != x.dtype):
        raise ValueError(f"extra must be [{x.shape[0]}, {x.shape[1]}, {height}, {width}] {x.dtype}, "
                         f"got {tuple(extra.shape)} {extra.dtype}")
    return (margin_before(x.shape[2], height, upsample, "height"), margin_before(x.shape[3], width, upsample, "width"))


def _grid(pixels: int, channels: int) -> tuple[tuple[int, int], int]:
    block_c = min(64, triton.next_power_of_2(channels))
    return (triton.cdiv(pixels, BLOCK_M), triton.cdiv(channels, block_c)), block_c


def size_adjust_fwd(x: Tensor, height: int, width: int, upsample: bool, extra: Tensor | None) -> Tensor:
    """``match_size(up(x) if upsample else x, height, width) + extra`` (``extra`` optional), any
    strides in, channels_last out."""
    top, left = _check(x, height, width, upsample, extra)
    batch, channels = x.shape[:2]
    out = torch.empty(batch, channels, height, width, device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    grid, block_c = _grid(batch * height * width, channels)
    _size_adjust_fwd_kernel[grid](
        x, out if extra is None else extra, out, batch * height * width, height, width, channels, x.shape[2],
        x.shape[3], top, left, *x.stride(), *(out if extra is None else extra).stride(), *out.stride(),
        UPSAMPLE=upsample, HAS_EXTRA=extra is not None, BLOCK_M=BLOCK_M, BLOCK_C=block_c, **COMPILER_OPTIONS)
    return out


def size_adjust_bwd(grad_out: Tensor, source_height: int, source_width: int, upsample: bool) -> Tensor:
    """The gradient of ``x`` ``[B, C, source_height, source_width]`` (channels_last) for the output
    gradient ``grad_out`` ``[B, C, H, W]`` of :func:`size_adjust_fwd`."""
    batch, channels, height, width = grad_out.shape
    top = margin_before(source_height, height, upsample, "height")
    left = margin_before(source_width, width, upsample, "width")
    grad_x = torch.empty(batch, channels, source_height, source_width, device=grad_out.device, dtype=grad_out.dtype,
                         memory_format=torch.channels_last)
    pixels = batch * source_height * source_width
    grid, block_c = _grid(pixels, channels)
    _size_adjust_bwd_kernel[grid](
        grad_out, grad_x, pixels, height, width, channels, source_height, source_width, top, left,
        *grad_out.stride(), *grad_x.stride(), UPSAMPLE=upsample, BLOCK_M=BLOCK_M, BLOCK_C=block_c,
        **COMPILER_OPTIONS)
    return grad_x


# ---- registered ops ----------------------------------------------------------------------------

def _size_adjust_backward_impl(grad_out: Tensor, source_height: int, source_width: int, upsample: bool) -> Tensor:
    return size_adjust_bwd(grad_out, source_height, source_width, upsample)


def _size_adjust_backward_fake(grad_out, source_height, source_width, upsample):
    return torch.empty(*grad_out.shape[:2], source_height, source_width, device=grad_out.device,
                       dtype=grad_out.dtype, memory_format=torch.channels_last)


size_adjust_backward = FusedOp("size_adjust_backward", _size_adjust_backward_impl, _size_adjust_backward_fake)


def _size_adjust_impl(x: Tensor, height: int, width: int, upsample: bool, extra: Tensor | None) -> Tensor:
    return size_adjust_fwd(x, height, width, upsample, extra)


def _size_adjust_fake(x, height, width, upsample, extra):
    return torch.empty(*x.shape[:2], height, width, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


def _size_adjust_setup(ctx, inputs, output):
    x, _, _, ctx.upsample, extra = inputs
    ctx.source_size = x.shape[2:]
    ctx.has_extra = extra is not None


def _size_adjust_grads(ctx, grad_out):
    grad_x = size_adjust_backward.op(grad_out, *ctx.source_size, ctx.upsample)
    return grad_x, None, None, None, grad_out if ctx.has_extra else None


_size_adjust = FusedOp("size_adjust", _size_adjust_impl, _size_adjust_fake, backward=_size_adjust_grads,
                       setup_context=_size_adjust_setup)


def size_adjust(x: Tensor, height: int, width: int, *, upsample: bool = False, extra: Tensor | None = None) -> Tensor:
    """``match_size(up(x) if upsample else x, height, width) + extra`` (``up`` the nearest 2x
    upsampling, ``extra`` optional, ``[B, C, height, width]``) in one pass, without the upsampled or
    padded map: ``[B, C, height, width]`` in channels_last (Triton), with gradients for ``x`` and
    ``extra``."""
    return _size_adjust(x, height, width, upsample, extra)


def size_adjust_torch(x: Tensor, height: int, width: int, *, upsample: bool = False,
                      extra: Tensor | None = None) -> Tensor:
    """PyTorch twin of :func:`size_adjust` (with autograd), in the layout of ``x``."""
    _check(x, height, width, upsample, extra)
    y = match_size(F.interpolate(x, scale_factor=2, mode="nearest") if upsample else x, height, width)
    return y if extra is None else y + extra
