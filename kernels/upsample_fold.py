"""A nearest 2x upsampling folded into the 3 x 3 convolution after it, as four 2 x 2 phase
convolutions of the map before upsampling, in one launch.

``conv2d(ReflPad(1)(Up2(x)), W, b)`` at output pixel ``(2 i + r, 2 j + c)`` reads only the 2 x 2
pixels of ``x`` around ``(i, j)``, and which of the nine taps fall on the same pixel depends only
on the parity ``(r, c)``: so each parity is a 2 x 2 convolution of ``x`` with kernels that are
sums of ``W``'s slices (:func:`phase_kernels`), 4 multiply-adds per input channel and output
pixel instead of 9. Reflection padding the upsampled map by one equals replicate padding ``x``
by one, so ``out[2 i + r, 2 j + c] = b + sum_{dy, dx} x[clamp(i + r - 1 + dy), clamp(j + c - 1 +
dx)] K_rc[dy, dx]`` (docs/fast-path.md#upsamplings-folded-into-the-convolutions).

The Triton kernel is an implicit GEMM over the pixels of ``x``: a program computes the four
phases of a tile of them, one after the other, and writes each to its interleaved place in the
NHWC output; the replicate padding is a clamp of the addresses. It records no gradient (the
training path runs the twin); design limit: any map size and channel counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .compiler_options import COMPILER_OPTIONS
from .implicit_gemm_conv import ConvTiles, conv_tiles
from .registry import FusedOp


@triton.jit
def _upsampled_conv_fwd_kernel(
    X, K, B, Y, pixels, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_ko, stride_ki, stride_kh, stride_kw,
    stride_yn, stride_yc, stride_yh, stride_yw,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < pixels
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_channels
    offs_k = tl.arange(0, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for phase in tl.static_range(4):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tap in tl.static_range(4):
            source_row = tl.minimum(tl.maximum(row + phase // 2 - 1 + tap // 2, 0), height - 1)
            source_column = tl.minimum(tl.maximum(column + phase % 2 - 1 + tap % 2, 0), width - 1)
            x_pixel = image * stride_xn + source_row * stride_xh + source_column * stride_xw
            k_tap = phase * out_channels * stride_ko + (tap // 2) * stride_kh + (tap % 2) * stride_kw
            for start in range(0, in_channels, BLOCK_K):
                channels = start + offs_k
                mask_k = channels < in_channels
                x = tl.load(X + x_pixel[:, None] + channels[None, :] * stride_xc,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                k = tl.load(K + k_tap + offs_n[None, :] * stride_ko + channels[:, None] * stride_ki,
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(x, k, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        y_pixel = image * stride_yn + (2 * row + phase // 2) * stride_yh + (2 * column + phase % 2) * stride_yw
        tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def phase_kernels(weight: Tensor) -> Tensor:
    """``[4 C_out, C_in, 2, 2]``: for each output phase ``(row % 2, column % 2)``, in that order, the
    2 x 2 kernel over the map before upsampling that a 3 x 3 ``weight`` amounts to.

    An even output row's three kernel rows fall on two rows before upsampling, the first alone and
    the last two together; an odd row's, the first two together and the last alone. Columns alike.
    (Sums of the weight's own slices: no constant tensor to copy to the device on every call.)
    """
    def phases(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        first, middle, last = w.unbind(dim)
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    return torch.cat([column for row in phases(weight, 2) for column in phases(row, 3)])


def upsampled_conv_tiles(in_channels: int, out_channels: int, dtype: torch.dtype) -> ConvTiles:
    """:func:`.implicit_gemm_conv.conv_tiles`, with 8 warps in fp32, where 4 spill registers when
    compiled for sm_90 (four phases' worth of addresses live at once; bench/NOTES.md)."""
    tiles = conv_tiles(in_channels, out_channels)
    return ConvTiles(tiles.block_m, tiles.block_n, tiles.block_k, 8 if dtype == torch.float32 else 4, 2)


def _check(x: Tensor, kernels: Tensor, bias: Tensor | None) -> None:
    if x.dim() != 4 or min(x.shape) <= 0:
        raise ValueError(f"x must be a non-empty map [batch, channels, height, width], got shape {tuple(x.shape)}")
    if kernels.dim() != 4 or kernels.shape[0] % 4 or kernels.shape[1:] != (x.shape[1], 2, 2):
        raise ValueError(f"kernels must be phase_kernels of a 3 x 3 weight, [4 out, {x.shape[1]}, 2, 2], "
                         f"got {tuple(kernels.shape)}")
    if bias is not None and bias.shape != (kernels.shape[0] // 4,):
        raise ValueError(f"bias must have shape ({kernels.shape[0] // 4},), got {tuple(bias.shape)}")


def upsampled_conv_fwd(x: Tensor, kernels: Tensor, bias: Tensor | None, *, tf32: bool = False,
                       tiles: ConvTiles | None = None) -> Tensor:
    """The convolution of the reflection-padded nearest 2x upsampling of ``x`` ``[B, Cin, H, W]``,
    from ``kernels = phase_kernels(w)``: ``[B, Cout, 2 H, 2 W]`` in channels_last."""
    _check(x, kernels, bias)
    batch, in_channels, height, width = x.shape
    out_channels = kernels.shape[0] // 4
    out = torch.empty(batch, out_channels, 2 * height, 2 * width, device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    tiles = tiles or upsampled_conv_tiles(in_channels, out_channels, x.dtype)
    pixels = batch * height * width
    _upsampled_conv_fwd_kernel[(triton.cdiv(pixels, tiles.block_m), triton.cdiv(out_channels, tiles.block_n))](
        x, kernels, out if bias is None else bias, out, pixels, height, width, in_channels, out_channels,
        *x.stride(), *kernels.stride(), *out.stride(), HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        INPUT_PRECISION=("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    return out


def _upsampled_conv_impl(x: Tensor, kernels: Tensor, bias: Tensor | None, tf32: bool) -> Tensor:
    return upsampled_conv_fwd(x, kernels, bias, tf32=tf32)


def _upsampled_conv_fake(x, kernels, bias, tf32):
    batch, _, height, width = x.shape
    return torch.empty(batch, kernels.shape[0] // 4, 2 * height, 2 * width, device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)


_upsampled_conv = FusedOp("upsampled_conv", _upsampled_conv_impl, _upsampled_conv_fake)


def upsampled_conv(x: Tensor, kernels: Tensor, bias: Tensor | None = None, *, tf32: bool = False) -> Tensor:
    """``conv2d(ReflPad(1)(Up2(x)), w, bias)`` from ``kernels = phase_kernels(w)``, in one launch,
    without the upsampled or padded map: ``[B, Cout, 2 H, 2 W]`` in channels_last (Triton). No
    gradient (use :func:`upsampled_conv_torch` where one is needed)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, kernels, bias)):
        raise RuntimeError("upsampled_conv records no gradient; use upsampled_conv_torch where one is needed")
    return _upsampled_conv(x, kernels, bias, tf32)


def upsampled_conv_torch(x: Tensor, kernels: Tensor, bias: Tensor | None = None, *, tf32: bool = False) -> Tensor:
    """PyTorch twin of :func:`upsampled_conv` (with autograd), in the layout of ``x``: the four phase
    convolutions of ``x`` replicate-padded by one, in one ``conv2d``, interleaved into the output."""
    _check(x, kernels, bias)
    batch, _, height, width = x.shape
    channels = kernels.shape[0] // 4
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels,
                      None if bias is None else bias.repeat(4))
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=phases.dtype, device=phases.device,
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    for row in (0, 1):
        for column in (0, 1):
            first = (2 * row + column) * channels
            out[:, :, row::2, column::2] = phases[:, first:first + channels, row:row + height, column:column + width]
    return out
