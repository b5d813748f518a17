"""The per-image, per-channel min-max stretch to 0..255 that ends the fusion network
(docs/model.md#fusion-decoder, step 4): ``(x - min) / (max - min + 1e-6) * 255`` over ``H x W``.

Two launches: one reduces each block of a plane (an image's channel) to its minimum and maximum,
the next reads its plane's partial results and stretches its block. The arithmetic is the
reference's, in the same order, in fp32: for fp32 maps the result is the reference's bit for bit.
:func:`conv2d_minmax_to_255` gathers the partial results in the epilogue of the convolution
before the stretch (the network's last, ``conv_last``), so its map is read once, by the stretch,
which then runs in place. No gradient (training runs the reference's own functions).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import minmax_to_255 as minmax_to_255_torch  # noqa: F401  (the twin: the reference's own)
from .compiler_options import COMPILER_OPTIONS, tf32_requested
from .implicit_gemm_conv import PADDING_MODES, _check, _conv_tile, _new_output, conv2d_torch, conv_tiles
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
def _conv2d_minmax_fwd_kernel(
    X, W, B, Y, LOW, HIGH, height, width, in_channels, out_channels, tiles,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A tile of one image's convolution (``implicit_gemm_conv``'s), stored, and the minimum and
    maximum of each of its channels over the tile's pixels, as stored, into ``LOW`` and ``HIGH``
    ``[image, channel, tile]``."""
    tile = tl.program_id(0)
    image = tl.program_id(2)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < height * width
    column = offs_m % width
    row = offs_m // width
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_channels
    acc = _conv_tile(X, W, B, image, row, column, mask_m, offs_n, mask_n, height, width, in_channels,
                     stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
                     KERNEL, PADDING, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    y = acc.to(Y.dtype.element_ty)
    y_pixel = image * stride_yn + row * stride_yh + column * stride_yw
    tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, y, mask=mask_m[:, None] & mask_n[None, :])
    stored = y.to(tl.float32)
    partial = (image * out_channels + offs_n) * tiles + tile
    tl.store(LOW + partial, tl.min(tl.where(mask_m[:, None], stored, float("inf")), 0), mask=mask_n)
    tl.store(HIGH + partial, tl.max(tl.where(mask_m[:, None], stored, float("-inf")), 0), mask=mask_n)


@triton.jit
def _minmax_stretch_kernel(X, LOW, HIGH, Y, plane_size, partials, channels, width, stride_n, stride_c, stride_h,
                           stride_w, stride_yn, stride_yc, stride_yh, stride_yw, BLOCK: tl.constexpr,
                           PARTIALS_BLOCK: tl.constexpr):
    """Block ``program_id(0)`` of plane ``program_id(1)`` stretched by the plane's ``partials``
    minima and maxima; ``Y`` may be ``X`` (each element is read before it is written, by one program)."""
    block = tl.program_id(0)
    plane = tl.program_id(1)
    low = tl.full([PARTIALS_BLOCK], float("inf"), tl.float32)
    high = tl.full([PARTIALS_BLOCK], float("-inf"), tl.float32)
    for start in range(0, partials, PARTIALS_BLOCK):
        partial = start + tl.arange(0, PARTIALS_BLOCK)
        low = tl.minimum(low, tl.load(LOW + plane * partials + partial, mask=partial < partials,
                                      other=float("inf")))
        high = tl.maximum(high, tl.load(HIGH + plane * partials + partial, mask=partial < partials,
                                        other=float("-inf")))
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


def conv2d_minmax_to_255_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, *, padding_mode: str,
                             tf32: bool = False) -> Tensor:
    """The stretch of ``implicit_gemm_conv.conv2d_fwd(x, weight, bias)``, ``[B, Cout, H, W]`` float32 in
    channels_last whatever ``x``'s dtype: the convolution (accumulated in fp32) stored in fp32 with
    its per-tile minima and maxima (one launch), then the stretch in place (one more)."""
    _check(x, weight, bias, padding_mode)
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[2]
    y = _float32_output(x, weight)
    tiles = conv_tiles(in_channels, out_channels, x.dtype)
    conv_blocks = triton.cdiv(height * width, tiles.block_m)
    low = torch.empty(batch * out_channels, conv_blocks, device=x.device, dtype=torch.float32)
    high = torch.empty_like(low)
    precision = ("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32"
    _conv2d_minmax_fwd_kernel[(conv_blocks, triton.cdiv(out_channels, tiles.block_n), batch)](
        x, weight, y if bias is None else bias, y, low, high, height, width, in_channels, out_channels,
        conv_blocks, *x.stride(), *weight.stride(), *y.stride(), KERNEL=kernel,
        PADDING=PADDING_MODES.index(padding_mode), HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, INPUT_PRECISION=precision, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    _minmax_stretch_kernel[(triton.cdiv(height * width, BLOCK), batch * out_channels)](
        y, low, high, y, height * width, conv_blocks, out_channels, width, *y.stride(), *y.stride(), BLOCK=BLOCK,
        PARTIALS_BLOCK=PARTIALS_BLOCK, **COMPILER_OPTIONS)
    return y


def _minmax_to_255_impl(x: Tensor) -> Tensor:
    return minmax_to_255_fwd(x)


_minmax_to_255 = FusedOp("minmax_to_255", _minmax_to_255_impl, lambda x: torch.empty_like(x))


def _conv2d_minmax_to_255_impl(x: Tensor, weight: Tensor, bias: Tensor | None, padding_mode: str,
                               tf32: bool) -> Tensor:
    return conv2d_minmax_to_255_fwd(x, weight, bias, padding_mode=padding_mode, tf32=tf32)


def _float32_output(x: Tensor, weight: Tensor) -> Tensor:
    return _new_output(x, weight).float()


_conv2d_minmax_to_255 = FusedOp("conv2d_minmax_to_255", _conv2d_minmax_to_255_impl,
                                lambda x, weight, bias, padding_mode, tf32: _float32_output(x, weight))


def minmax_to_255(x: Tensor) -> Tensor:
    """Per image and channel ``(x - min) / (max - min + 1e-6) * 255`` over ``H x W`` (Triton). No
    gradient (use :func:`minmax_to_255_torch` where one is needed)."""
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("minmax_to_255 records no gradient; use minmax_to_255_torch where one is needed")
    return _minmax_to_255(x)


def conv2d_minmax_to_255(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, padding_mode: str = "reflect",
                         tf32: bool | None = None) -> Tensor:
    """``minmax_to_255(conv2d(x, weight, bias))`` with the statistics gathered in the convolution's
    epilogue: ``x`` ``[B, Cin, H, W]`` (any strides), ``weight`` ``[Cout, Cin, k, k]``, ``k`` odd;
    ``[B, Cout, H, W]`` float32 in channels_last (Triton; 16-bit inputs too: the stretch to 0..255
    needs more than 16 bits). Each image gets the same bits as the two ops applied to it alone (its
    tiles start at its first pixel). No gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise RuntimeError("conv2d_minmax_to_255 records no gradient; use conv2d_minmax_to_255_torch where one is "
                           "needed")
    return _conv2d_minmax_to_255(x, weight, bias, padding_mode, tf32_requested(tf32))


def conv2d_minmax_to_255_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                               padding_mode: str = "reflect", tf32: bool = False) -> Tensor:
    """PyTorch twin of :func:`conv2d_minmax_to_255`: ``implicit_gemm_conv.conv2d_torch``, in fp32 from
    16 bits, then the reference's stretch (differentiable)."""
    y = conv2d_torch(x, weight, bias, padding_mode=padding_mode)
    return minmax_to_255_torch(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y)
