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
NHWC output; the replicate padding is a clamp of the addresses. The backward: the input gradient
an implicit GEMM over output channels, phases and taps, in which the first and last row and
column also collect the outputs whose reads were clamped onto them; the phase kernels' gradient a
GEMM per phase and tap over the pixels in chunks whose partial sums are added afterwards. Design
limit: any map size and channel counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .compiler_options import COMPILER_OPTIONS, tf32_requested
from .implicit_gemm_conv import ConvTiles, conv_tiles, gemm_over_channels, weight_gradient_split
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
    if HAS_BIAS:
        bias = tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for phase in tl.static_range(4):
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tap in tl.static_range(4):
            source_row = tl.minimum(tl.maximum(row + phase // 2 - 1 + tap // 2, 0), height - 1)
            source_column = tl.minimum(tl.maximum(column + phase % 2 - 1 + tap % 2, 0), width - 1)
            x_pixel = image * stride_xn + source_row * stride_xh + source_column * stride_xw
            k_tap = phase * out_channels * stride_ko + (tap // 2) * stride_kh + (tap % 2) * stride_kw
            acc = gemm_over_channels(acc, X, x_pixel, mask_m, stride_xc, K + k_tap, stride_ki, offs_n * stride_ko,
                                     mask_n, in_channels, BLOCK_K, INPUT_PRECISION)
        if HAS_BIAS:
            acc += bias[None, :]
        y_pixel = image * stride_yn + (2 * row + phase // 2) * stride_yh + (2 * column + phase % 2) * stride_yw
        tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _upsampled_conv_bwd_input_kernel(
    DY, K, DX, pixels, height, width, in_channels, out_channels,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw, stride_ko, stride_ki, stride_kh, stride_kw,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A tile of input pixels by input channels. Phase ``(r, c)``, tap ``(dy, dx)`` reads pixel
    ``clamp(i + r - 1 + dy)``: a pixel collects the outputs whose unclamped row is itself and, at
    the first and last row, -1 and ``height`` (columns alike; skipped per tile where none applies)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < pixels
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < in_channels
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for source in range(9):
        which_row = source // 3
        which_column = source % 3
        read_row = tl.where(which_row == 0, row, tl.where(which_row == 1, -1, height))
        read_column = tl.where(which_column == 0, column, tl.where(which_column == 1, -1, width))
        reads_here = (mask_m & (tl.minimum(tl.maximum(read_row, 0), height - 1) == row)
                      & (tl.minimum(tl.maximum(read_column, 0), width - 1) == column))
        if tl.max(reads_here.to(tl.int32), 0) > 0:
            for combo in tl.static_range(16):
                phase = combo // 4
                tap = combo % 4
                out_row = read_row - phase // 2 + 1 - tap // 2
                out_column = read_column - phase % 2 + 1 - tap % 2
                valid = reads_here & (out_row >= 0) & (out_row < height) & (out_column >= 0) & (out_column < width)
                dy_pixel = (image * stride_dyn + (2 * out_row + phase // 2) * stride_dyh
                            + (2 * out_column + phase % 2) * stride_dyw)
                k_tap = phase * out_channels * stride_ko + (tap // 2) * stride_kh + (tap % 2) * stride_kw
                acc = gemm_over_channels(acc, DY, dy_pixel, valid, stride_dyc, K + k_tap, stride_ko,
                                         offs_n * stride_ki, mask_n, out_channels, BLOCK_K, INPUT_PRECISION)
    dx_pixel = image * stride_dxn + row * stride_dxh + column * stride_dxw
    tl.store(DX + dx_pixel[:, None] + offs_n[None, :] * stride_dxc, acc.to(DX.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _upsampled_conv_bwd_weight_kernel(
    X, DY, PARTIAL, pixels, pixels_per_split, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One (phase, tap)'s ``BLOCK_CO x BLOCK_CI`` tile of the phase kernels' gradient over one split
    of the input pixels, into ``PARTIAL[split, phase, tap]`` (summed afterwards, no atomics)."""
    pid_co = tl.program_id(0)
    pid_ci = tl.program_id(1)
    combo = tl.program_id(2) % 16
    split = tl.program_id(2) // 16
    phase = combo // 4
    tap = combo % 4
    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_co = offs_co < out_channels
    mask_ci = offs_ci < in_channels
    acc = tl.zeros([BLOCK_CO, BLOCK_CI], dtype=tl.float32)
    end = tl.minimum((split + 1) * pixels_per_split, pixels)
    for start in range(split * pixels_per_split, end, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        column = offs_m % width
        row = (offs_m // width) % height
        image = offs_m // (width * height)
        dy_pixel = image * stride_dyn + (2 * row + phase // 2) * stride_dyh + (2 * column + phase % 2) * stride_dyw
        dy = tl.load(DY + dy_pixel[:, None] + offs_co[None, :] * stride_dyc,
                     mask=mask_m[:, None] & mask_co[None, :], other=0.0)
        source_row = tl.minimum(tl.maximum(row + phase // 2 - 1 + tap // 2, 0), height - 1)
        source_column = tl.minimum(tl.maximum(column + phase % 2 - 1 + tap % 2, 0), width - 1)
        x = tl.load(X + (image * stride_xn + source_row * stride_xh + source_column * stride_xw)[:, None]
                    + offs_ci[None, :] * stride_xc, mask=mask_m[:, None] & mask_ci[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    partial = PARTIAL + (split * 16 + combo) * out_channels * in_channels
    tl.store(partial + offs_co[:, None] * in_channels + offs_ci[None, :], acc,
             mask=mask_co[:, None] & mask_ci[None, :])


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


def upsampled_input_gradient_tiles(out_channels: int, in_channels: int, dtype: torch.dtype) -> ConvTiles:
    """The input gradient's tiles: those of :func:`.implicit_gemm_conv.conv_tiles` with the channels'
    roles swapped; in fp32 32 pixels by 4 warps and one stage, without spills under Triton 3.6
    and 3.9 (its sixteen phase-tap combinations hold more live values; bench/NOTES.md)."""
    tiles = conv_tiles(out_channels, in_channels, dtype)
    if dtype != torch.float32:
        return tiles
    return ConvTiles(32, tiles.block_n, tiles.block_k, 4, 1)


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
    tiles = tiles or conv_tiles(in_channels, out_channels, x.dtype)
    pixels = batch * height * width
    _upsampled_conv_fwd_kernel[(triton.cdiv(pixels, tiles.block_m), triton.cdiv(out_channels, tiles.block_n))](
        x, kernels, out if bias is None else bias, out, pixels, height, width, in_channels, out_channels,
        *x.stride(), *kernels.stride(), *out.stride(), HAS_BIAS=bias is not None, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        INPUT_PRECISION=("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    return out


def upsampled_conv_bwd(grad_y: Tensor, x: Tensor, kernels: Tensor, *, tf32: bool = False,
                       tiles: ConvTiles | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_kernels, grad_bias)`` of :func:`upsampled_conv_fwd` for the output gradient
    ``grad_y`` ``[B, Cout, 2 H, 2 W]`` (any strides); ``grad_x`` in channels_last, the replicate
    padding's gradient added by address; ``grad_bias`` is the channel sum, bias or not."""
    _check(x, kernels, None)
    batch, in_channels, height, width = x.shape
    out_channels = kernels.shape[0] // 4
    if grad_y.shape != (batch, out_channels, 2 * height, 2 * width):
        raise ValueError(f"grad_y must be [{batch}, {out_channels}, {2 * height}, {2 * width}], "
                         f"got {tuple(grad_y.shape)}")
    pixels = batch * height * width
    precision = ("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32"
    input_tiles = tiles or upsampled_input_gradient_tiles(out_channels, in_channels, x.dtype)
    grad_x = torch.empty_like(x, memory_format=torch.channels_last)
    _upsampled_conv_bwd_input_kernel[(triton.cdiv(pixels, input_tiles.block_m),
                                      triton.cdiv(in_channels, input_tiles.block_n))](
        grad_y, kernels, grad_x, pixels, height, width, in_channels, out_channels, *grad_y.stride(),
        *kernels.stride(), *grad_x.stride(), BLOCK_M=input_tiles.block_m, BLOCK_N=input_tiles.block_n,
        BLOCK_K=input_tiles.block_k, INPUT_PRECISION=precision, num_warps=input_tiles.num_warps,
        num_stages=input_tiles.num_stages, **COMPILER_OPTIONS)
    block_co, block_ci, block_m, splits, pixels_per_split = weight_gradient_split(pixels, out_channels, in_channels, 16)
    partial = torch.empty(splits, 16, out_channels, in_channels, device=x.device, dtype=torch.float32)
    _upsampled_conv_bwd_weight_kernel[(triton.cdiv(out_channels, block_co), triton.cdiv(in_channels, block_ci),
                                       splits * 16)](
        x, grad_y, partial, pixels, pixels_per_split, height, width, in_channels, out_channels, *x.stride(),
        *grad_y.stride(), BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, INPUT_PRECISION=precision,
        **COMPILER_OPTIONS)
    grad_kernels = (partial.sum(0).view(4, 2, 2, out_channels, in_channels).permute(0, 3, 4, 1, 2)
                    .reshape(4 * out_channels, in_channels, 2, 2))
    return (grad_x, grad_kernels.to(kernels.dtype),
            grad_y.sum((0, 2, 3), dtype=torch.float32).to(x.dtype))


def _upsampled_conv_impl(x: Tensor, kernels: Tensor, bias: Tensor | None, tf32: bool) -> Tensor:
    return upsampled_conv_fwd(x, kernels, bias, tf32=tf32)


def _upsampled_conv_fake(x, kernels, bias, tf32):
    batch, _, height, width = x.shape
    return torch.empty(batch, kernels.shape[0] // 4, 2 * height, 2 * width, device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)


def _upsampled_conv_backward_impl(grad_y: Tensor, x: Tensor, kernels: Tensor,
                                  tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    return upsampled_conv_bwd(grad_y, x, kernels, tf32=tf32)


def _upsampled_conv_backward_fake(grad_y, x, kernels, tf32):
    return (torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(kernels),
            kernels.new_empty(kernels.shape[0] // 4))


_upsampled_conv_backward = FusedOp("upsampled_conv_backward", _upsampled_conv_backward_impl,
                                   _upsampled_conv_backward_fake)


def _upsampled_conv_setup(ctx, inputs, output):
    x, kernels, bias, ctx.tf32 = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, kernels)


def _upsampled_conv_grads(ctx, grad_y):
    x, kernels = ctx.saved_tensors
    grad_x, grad_kernels, grad_bias = _upsampled_conv_backward.op(grad_y, x, kernels, ctx.tf32)
    return grad_x, grad_kernels, grad_bias if ctx.has_bias else None, None


_upsampled_conv = FusedOp("upsampled_conv", _upsampled_conv_impl, _upsampled_conv_fake,
                          backward=_upsampled_conv_grads, setup_context=_upsampled_conv_setup)


def upsampled_conv(x: Tensor, kernels: Tensor, bias: Tensor | None = None, *, tf32: bool | None = None) -> Tensor:
    """``conv2d(ReflPad(1)(Up2(x)), w, bias)`` from ``kernels = phase_kernels(w)``, in one launch,
    without the upsampled or padded map: ``[B, Cout, 2 H, 2 W]`` in channels_last (Triton), with
    gradients for ``x``, ``kernels`` (and through :func:`phase_kernels`, ``w``) and ``bias``."""
    return _upsampled_conv(x, kernels, bias, tf32_requested(tf32))


def upsampled_conv_torch(x: Tensor, kernels: Tensor, bias: Tensor | None = None, *, tf32: bool = False) -> Tensor:
    """PyTorch twin of :func:`upsampled_conv` (with autograd), in the layout of ``x``: the four phase
    convolutions of ``x`` replicate-padded by one, in one ``conv2d``, interleaved into the output."""
    _check(x, kernels, bias)
    batch, _, height, width = x.shape
    channels = kernels.shape[0] // 4
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels,
                      None if bias is None else bias.repeat(4))
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if nhwc else torch.contiguous_format

    def phase(row: int, column: int) -> Tensor:
        first = (2 * row + column) * channels
        return phases[:, first:first + channels, row:row + height, column:column + width]

    if torch.compiler.is_compiling():
        # Inductor fails on two such upsamplings in a row when the phases are written by strided
        # slices ("vr must not be None"); stacked, they compile (and run slower eagerly).
        rows = [torch.stack([phase(row, 0), phase(row, 1)], dim=-1) for row in (0, 1)]
        out = torch.stack(rows, dim=3).reshape(batch, channels, 2 * height, 2 * width)
        return out.contiguous(memory_format=layout)
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=phases.dtype, device=phases.device,
                      memory_format=layout)
    for row in (0, 1):
        for column in (0, 1):
            out[:, :, row::2, column::2] = phase(row, column)
    return out
