"""Stride-1 "same" convolution as an implicit GEMM on NHWC maps, the padding done by address.

``y[n, h, w, co] = b[co] + sum_{kh, kw, ci} x[n, P(h + kh - p), P(w + kw - p), ci] W[co, ci, kh, kw]``
with ``p = k // 2`` and ``P`` the padding's index map: the repeated reflection of
``reference.functional.reflect_pad_extended`` (``"reflect"``, the model's ``ConvLayer``; a side of
one pixel repeats it) or the clamp of replicate padding (``"replicate"``, the decoder's folded
upsamplings, docs/fast-path.md#upsamplings-folded-into-the-convolutions). No padded copy is made.

The GEMM: rows are output pixels (``M = B H W``), columns output channels, the reduction runs
over the ``k x k`` taps and, for each, the input channels; a program computes a
``BLOCK_M x BLOCK_N`` tile with an fp32 accumulator. Every map is addressed by its own strides, so
the input may be a channel slice of a wider buffer and the output may be written into a channel
slice of one (:func:`conv2d_into`): a dense block can live in one buffer that each layer reads and
appends to. :func:`conv2d_pool_into` orders a tile's rows by 2 x 2 quads and takes the max-pool
in its epilogue, writing the pooled map (and the full one, if asked, odd sides included) where it is wanted. fp32
dots use ``input_precision="ieee"`` (or TF32 when asked), 16-bit ones tensor cores with fp32
accumulation. Design limit: odd square kernels, any channel counts and map sizes.

The backward, for 1 x 1 and 3 x 3 kernels: the input gradient is a second implicit GEMM over
output channels and taps, in which each pixel also collects the padded positions that read it
(the reflection's or replication's gradient folded by address, no padded buffer); the weight
gradient a GEMM per tap over the pixels, split into chunks whose fp32 partial sums are added
afterwards (deterministic, no atomics); the bias gradient a channel sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import reflect_pad_extended
from .compiler_options import COMPILER_OPTIONS, tf32_requested
from .registry import FusedOp
from .windows import mirror_index

PADDING_MODES = ("reflect", "replicate")


@triton.jit
def _source_index(index, size, PADDING: tl.constexpr):
    """Where a tap past the edge reads: 0 reflects (repeatedly), 1 replicates."""
    if PADDING == 0:
        return mirror_index(tl.abs(index), size)
    return tl.minimum(tl.maximum(index, 0), size - 1)


@triton.jit
def gemm_over_channels(acc, A, a_rows, a_mask, stride_a, B, stride_b, b_columns, b_mask, channels,
                       BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + A[rows, :] @ B[:, columns]`` over ``channels``, ``BLOCK_K`` at a time: row ``i`` of ``A``
    at ``A + a_rows[i] + c * stride_a``, column ``j`` of ``B`` at ``B + c * stride_b + b_columns[j]``
    (the implicit GEMMs' reduction over one tap's channels; masked rows and columns read zeros)."""
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, channels, BLOCK_K):
        offs_c = start + offs_k
        mask_c = offs_c < channels
        a = tl.load(A + a_rows[:, None] + offs_c[None, :] * stride_a, mask=a_mask[:, None] & mask_c[None, :],
                    other=0.0)
        b = tl.load(B + offs_c[:, None] * stride_b + b_columns[None, :], mask=mask_c[:, None] & b_mask[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _conv_tile(X, W, B, image, row, column, mask_m, offs_n, mask_n, height, width, in_channels,
               stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
               KERNEL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The fp32 ``[BLOCK_M, BLOCK_N]`` tile of output pixels ``(image, row, column)`` by channels ``offs_n``."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in tl.static_range(KERNEL * KERNEL):
        source_row = _source_index(row + tap // KERNEL - KERNEL // 2, height, PADDING)
        source_column = _source_index(column + tap % KERNEL - KERNEL // 2, width, PADDING)
        x_pixel = image * stride_xn + source_row * stride_xh + source_column * stride_xw
        w_tap = (tap // KERNEL) * stride_wh + (tap % KERNEL) * stride_ww
        acc = gemm_over_channels(acc, X, x_pixel, mask_m, stride_xc, W + w_tap, stride_wi, offs_n * stride_wo, mask_n,
                                 in_channels, BLOCK_K, INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv2d_fwd_kernel(
    X, W, B, Y, pixels, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < pixels
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_channels
    acc = _conv_tile(X, W, B, image, row, column, mask_m, offs_n, mask_n, height, width, in_channels,
                     stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
                     KERNEL, PADDING, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    y_pixel = image * stride_yn + row * stride_yh + column * stride_yw
    tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _conv2d_pool_fwd_kernel(
    X, W, B, Y, P, quads, quad_rows, quad_columns, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw, stride_pn, stride_pc, stride_ph, stride_pw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """The rows of the tile are 2 x 2 quads of output pixels, four consecutive rows a quad, so the
    epilogue takes each quad's maximum (the 2 x 2 max-pool) before its store; with ``STORE_FULL``
    the full-resolution output is written too. The quads cover ``quad_rows x quad_columns`` per
    image: with ``STORE_FULL`` and an odd side they include the partial quads of the last row or
    column, whose pixels are stored in full but not pooled (the pool floors)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    quad = offs_m // 4
    quad_column = quad % quad_columns
    quad_row = (quad // quad_columns) % quad_rows
    image = quad // (quad_columns * quad_rows)
    row = 2 * quad_row + (offs_m % 4) // 2
    column = 2 * quad_column + offs_m % 2
    mask_m = (quad < quads) & (row < height) & (column < width)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < out_channels
    acc = _conv_tile(X, W, B, image, row, column, mask_m, offs_n, mask_n, height, width, in_channels,
                     stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
                     KERNEL, PADDING, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    if STORE_FULL:
        y_pixel = image * stride_yn + row * stride_yh + column * stride_yw
        tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
    pooled = tl.max(tl.reshape(acc, (BLOCK_M // 4, 4, BLOCK_N)), axis=1)
    offs_q = tl.program_id(0) * (BLOCK_M // 4) + tl.arange(0, BLOCK_M // 4)
    q_column = offs_q % quad_columns
    q_row = (offs_q // quad_columns) % quad_rows
    q_image = offs_q // (quad_columns * quad_rows)
    whole = (offs_q < quads) & (q_row < height // 2) & (q_column < width // 2)
    p_pixel = q_image * stride_pn + q_row * stride_ph + q_column * stride_pw
    tl.store(P + p_pixel[:, None] + offs_n[None, :] * stride_pc, pooled.to(P.dtype.element_ty),
             mask=whole[:, None] & mask_n[None, :])


@triton.jit
def _conv2d_bwd_input_kernel(
    DY, W, DX, pixels, height, width, in_channels, out_channels,
    stride_dyn, stride_dyc, stride_dyh, stride_dyw, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_dxn, stride_dxc, stride_dxh, stride_dxw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """A tile of input pixels by input channels. A pixel's gradient collects every padded position
    that reads it: itself and, for a one-pixel pad, the positions -1 and ``size`` of its row and
    column where the padding maps them onto it (checked per tile, skipped where none does). With
    ``ACCUMULATE`` the tile is added to what ``DX`` holds (a dense buffer's gradient)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < pixels
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < in_channels
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Per side, the positions that may read a pixel: itself, and for a 3 x 3 kernel (one-pixel pad)
    # the ones before and after the side: KERNEL of them.
    for source in range(KERNEL * KERNEL):
        padded_row = _padded_position(row, height, source // KERNEL)
        padded_column = _padded_position(column, width, source % KERNEL)
        reads_here = (mask_m & (_source_index(padded_row, height, PADDING) == row)
                      & (_source_index(padded_column, width, PADDING) == column))
        if tl.max(reads_here.to(tl.int32), 0) > 0:
            for tap in tl.static_range(KERNEL * KERNEL):
                out_row = padded_row - tap // KERNEL + KERNEL // 2
                out_column = padded_column - tap % KERNEL + KERNEL // 2
                valid = reads_here & (out_row >= 0) & (out_row < height) & (out_column >= 0) & (out_column < width)
                dy_pixel = image * stride_dyn + out_row * stride_dyh + out_column * stride_dyw
                w_tap = (tap // KERNEL) * stride_wh + (tap % KERNEL) * stride_ww
                acc = gemm_over_channels(acc, DY, dy_pixel, valid, stride_dyc, W + w_tap, stride_wo,
                                         offs_n * stride_wi, mask_n, out_channels, BLOCK_K, INPUT_PRECISION)
    dx_pixel = image * stride_dxn + row * stride_dxh + column * stride_dxw
    dx = DX + dx_pixel[:, None] + offs_n[None, :] * stride_dxc
    if ACCUMULATE:
        acc += tl.load(dx, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(dx, acc.to(DX.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _padded_position(index, size, which):
    """``which`` 0: the pixel itself; 1: the padded position before the side; 2: the one after it."""
    return tl.where(which == 0, index, tl.where(which == 1, -1, size))


@triton.jit
def _conv2d_bwd_weight_kernel(
    X, DY, PARTIAL, pixels, pixels_per_split, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_dyn, stride_dyc, stride_dyh, stride_dyw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_CI: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One tap's ``BLOCK_CO x BLOCK_CI`` tile of ``dW = dY^T x_tap`` over one split of the pixels,
    written to ``PARTIAL[split, tap]`` (the splits are summed afterwards: no atomics, so the
    result does not depend on scheduling)."""
    pid_co = tl.program_id(0)
    pid_ci = tl.program_id(1)
    tap = tl.program_id(2) % (KERNEL * KERNEL)
    split = tl.program_id(2) // (KERNEL * KERNEL)
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
        dy = tl.load(DY + (image * stride_dyn + row * stride_dyh + column * stride_dyw)[:, None]
                     + offs_co[None, :] * stride_dyc, mask=mask_m[:, None] & mask_co[None, :], other=0.0)
        source_row = _source_index(row + tap // KERNEL - KERNEL // 2, height, PADDING)
        source_column = _source_index(column + tap % KERNEL - KERNEL // 2, width, PADDING)
        x = tl.load(X + (image * stride_xn + source_row * stride_xh + source_column * stride_xw)[:, None]
                    + offs_ci[None, :] * stride_xc, mask=mask_m[:, None] & mask_ci[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)
    partial = PARTIAL + (split * KERNEL * KERNEL + tap) * out_channels * in_channels
    tl.store(partial + offs_co[:, None] * in_channels + offs_ci[None, :], acc,
             mask=mask_co[:, None] & mask_ci[None, :])


@dataclass(frozen=True)
class ConvTiles:
    """Launch shape: output pixels and channels per tile, input channels per step, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def conv_tiles(in_channels: int, out_channels: int, dtype: torch.dtype) -> ConvTiles:
    """Deterministic tiles (no autotuning, so runs repeat): 64 pixels by up to 64 output channels,
    up to 32 input channels a step (at least 16 each way, as ``tl.dot`` needs), 2 stages; 8 warps
    in fp32 and 4 in 16 bits, the choices that compile for sm_90 without register spills under
    both Triton 3.6 and 3.9 (bench/NOTES.md has the ones tried). Not yet timed on a GPU."""
    return ConvTiles(64, min(64, max(16, triton.next_power_of_2(out_channels))),
                     min(32, max(16, triton.next_power_of_2(in_channels))), 8 if dtype == torch.float32 else 4, 2)


def conv_input_gradient_tiles(out_channels: int, in_channels: int, dtype: torch.dtype) -> ConvTiles:
    """The input gradient's tiles: :func:`conv_tiles` with the channels' roles swapped; in fp32 one
    stage, and 32 pixels by 4 warps for narrow inputs (16 channels or fewer), 64 by 8 otherwise:
    without spills under Triton 3.6 and 3.9, where the other choices tried spill (bench/NOTES.md)."""
    tiles = conv_tiles(out_channels, in_channels, dtype)
    if dtype != torch.float32:
        return tiles
    narrow = tiles.block_n <= 16
    return ConvTiles(32 if narrow else 64, tiles.block_n, tiles.block_k, 4 if narrow else 8, 1)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, padding_mode: str) -> None:
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")
    if x.dim() != 4 or min(x.shape) <= 0:
        raise ValueError(f"x must be a non-empty map [batch, channels, height, width], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3] \
            or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be [out, {x.shape[1]}, k, k] with k odd for x of shape {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias must share a dtype, got {x.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")


def conv2d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *, padding_mode: str, tf32: bool = False,
               tiles: ConvTiles | None = None) -> Tensor:
    """Write the convolution of ``x`` ``[B, Cin, H, W]`` (any strides) into ``out`` ``[B, Cout, H, W]``
    (any strides that do not overlap ``x``); return ``out``."""
    _check(x, weight, bias, padding_mode)
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[2]
    if out.shape != (batch, out_channels, height, width) or out.dtype != x.dtype:
        raise ValueError(f"out must be [{batch}, {out_channels}, {height}, {width}] {x.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    tiles = tiles or conv_tiles(in_channels, out_channels, x.dtype)
    pixels = batch * height * width
    precision = ("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(pixels, tiles.block_m), triton.cdiv(out_channels, tiles.block_n))
    _conv2d_fwd_kernel[grid](
        x, weight, out if bias is None else bias, out, pixels, height, width, in_channels, out_channels,
        *x.stride(), *weight.stride(), *out.stride(),
        KERNEL=kernel, PADDING=PADDING_MODES.index(padding_mode), HAS_BIAS=bias is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, INPUT_PRECISION=precision,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    return out


def conv2d_pool_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, pooled: Tensor, full: Tensor | None = None, *,
                    padding_mode: str, tf32: bool = False, tiles: ConvTiles | None = None) -> Tensor:
    """The convolution of ``x`` ``[B, Cin, H, W]`` with its 2 x 2 max-pool (floored, as
    ``MaxPool2d(2)``) written into ``pooled`` ``[B, Cout, H // 2, W // 2]`` and, when given, the full
    output into ``full`` ``[B, Cout, H, W]`` (any strides); returns ``pooled``."""
    _check(x, weight, bias, padding_mode)
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[2]
    if height < 2 or width < 2:
        raise ValueError(f"a 2 x 2 max-pool needs sides of 2 or more, got {height} x {width}")
    for name, out, size in (("pooled", pooled, (height // 2, width // 2)), ("full", full, (height, width))):
        if out is not None and (out.shape != (batch, out_channels, *size) or out.dtype != x.dtype):
            raise ValueError(f"{name} must be [{batch}, {out_channels}, {size[0]}, {size[1]}] {x.dtype}, "
                             f"got {tuple(out.shape)} {out.dtype}")
    tiles = tiles or conv_tiles(in_channels, out_channels, x.dtype)
    quad_rows, quad_columns = ((height + 1) // 2, (width + 1) // 2) if full is not None else (height // 2, width // 2)
    quads = batch * quad_rows * quad_columns
    precision = ("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32"
    _conv2d_pool_fwd_kernel[(triton.cdiv(4 * quads, tiles.block_m), triton.cdiv(out_channels, tiles.block_n))](
        x, weight, pooled if bias is None else bias, pooled if full is None else full, pooled, quads, quad_rows,
        quad_columns, height, width, in_channels, out_channels, *x.stride(), *weight.stride(),
        *(pooled if full is None else full).stride(),
        *pooled.stride(), KERNEL=kernel, PADDING=PADDING_MODES.index(padding_mode), HAS_BIAS=bias is not None,
        STORE_FULL=full is not None, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        INPUT_PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    return pooled


WEIGHT_GRADIENT_PROGRAMS = 512
"""About how many programs the weight gradient launches (each tap and channel tile's pixels are
split until there are): enough to fill a GPU, with partial sums of bounded size."""


def weight_gradient_split(pixels: int, out_channels: int, in_channels: int,
                          taps: int) -> tuple[int, int, int, int, int]:
    """``(block_co, block_ci, block_m, splits, pixels_per_split)`` of a weight gradient over ``taps``
    kernel positions: channel tiles of up to 64, pixels in steps of 32, split into chunks until
    there are about :data:`WEIGHT_GRADIENT_PROGRAMS` programs."""
    block_co = min(64, max(16, triton.next_power_of_2(out_channels)))
    block_ci = min(64, max(16, triton.next_power_of_2(in_channels)))
    block_m = 32
    channel_programs = taps * triton.cdiv(out_channels, block_co) * triton.cdiv(in_channels, block_ci)
    splits = max(1, min(triton.cdiv(pixels, block_m), WEIGHT_GRADIENT_PROGRAMS // channel_programs))
    pixels_per_split = triton.cdiv(triton.cdiv(pixels, splits), block_m) * block_m
    return block_co, block_ci, block_m, triton.cdiv(pixels, pixels_per_split), pixels_per_split


def conv2d_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, *, padding_mode: str, tf32: bool = False,
               input_gradient: bool = True, add_into: Tensor | None = None,
               tiles: ConvTiles | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d_fwd` for its output gradient ``grad_y``
    (any strides): ``grad_x`` in channels_last, the padding's gradient added onto the pixels it
    reads, computed by address; ``grad_bias`` is the per-channel sum whether or not there is a
    bias; without ``input_gradient``, ``grad_x`` is empty and not computed. With ``add_into`` (the
    shape of ``x``, any strides, e.g. the first channels of a dense buffer's gradient) the input
    gradient is added to it in place and ``grad_x`` is ``add_into``. Design limit: 1 x 1 and 3 x 3
    kernels."""
    _check(x, weight, None, padding_mode)
    batch, in_channels, height, width = x.shape
    out_channels, kernel = weight.shape[0], weight.shape[2]
    if kernel not in (1, 3):
        raise ValueError(f"the convolution's backward takes 1 x 1 and 3 x 3 kernels, got {kernel} x {kernel}")
    if grad_y.shape != (batch, out_channels, height, width):
        raise ValueError(f"grad_y must be [{batch}, {out_channels}, {height}, {width}], got {tuple(grad_y.shape)}")
    pixels = batch * height * width
    precision = ("tf32" if tf32 else "ieee") if x.dtype == torch.float32 else "tf32"
    options = dict(KERNEL=kernel, PADDING=PADDING_MODES.index(padding_mode), INPUT_PRECISION=precision,
                   **COMPILER_OPTIONS)
    if add_into is not None and (add_into.shape != x.shape or add_into.dtype != x.dtype):
        raise ValueError(f"add_into must be {tuple(x.shape)} {x.dtype}, got {tuple(add_into.shape)} {add_into.dtype}")
    grad_x = x.new_empty(0)
    if input_gradient:
        input_tiles = tiles or conv_input_gradient_tiles(out_channels, in_channels, x.dtype)
        grad_x = torch.empty_like(x, memory_format=torch.channels_last) if add_into is None else add_into
        _conv2d_bwd_input_kernel[(triton.cdiv(pixels, input_tiles.block_m),
                                  triton.cdiv(in_channels, input_tiles.block_n))](
            grad_y, weight, grad_x, pixels, height, width, in_channels, out_channels, *grad_y.stride(),
            *weight.stride(), *grad_x.stride(), ACCUMULATE=add_into is not None, BLOCK_M=input_tiles.block_m,
            BLOCK_N=input_tiles.block_n, BLOCK_K=input_tiles.block_k, num_warps=input_tiles.num_warps,
            num_stages=input_tiles.num_stages, **options)
    block_co, block_ci, block_m, splits, pixels_per_split = weight_gradient_split(pixels, out_channels, in_channels,
                                                                                  kernel * kernel)
    partial = torch.empty(splits, kernel * kernel, out_channels, in_channels, device=x.device, dtype=torch.float32)
    _conv2d_bwd_weight_kernel[(triton.cdiv(out_channels, block_co), triton.cdiv(in_channels, block_ci),
                               splits * kernel * kernel)](
        x, grad_y, partial, pixels, pixels_per_split, height, width, in_channels, out_channels, *x.stride(),
        *grad_y.stride(), BLOCK_M=block_m, BLOCK_CO=block_co, BLOCK_CI=block_ci, **options)
    grad_weight = partial.sum(0).view(kernel, kernel, out_channels, in_channels).permute(2, 3, 0, 1)
    return grad_x, grad_weight.to(weight.dtype).contiguous(), grad_y.sum((0, 2, 3), dtype=torch.float32).to(x.dtype)


def _new_output(x: Tensor, weight: Tensor) -> Tensor:
    batch, _, height, width = x.shape
    return torch.empty(batch, weight.shape[0], height, width, device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)


# ---- registered ops ----------------------------------------------------------------------------

def _conv2d_backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, padding_mode: str, tf32: bool,
                          input_gradient: bool) -> tuple[Tensor, Tensor, Tensor]:
    return conv2d_bwd(grad_y, x, weight, padding_mode=padding_mode, tf32=tf32, input_gradient=input_gradient)


def _conv2d_backward_fake(grad_y, x, weight, padding_mode, tf32, input_gradient):
    return (torch.empty_like(x, memory_format=torch.channels_last) if input_gradient else x.new_empty(0),
            torch.empty_like(weight), weight.new_empty(weight.shape[0]))


_conv2d_backward = FusedOp("conv2d_backward", _conv2d_backward_impl, _conv2d_backward_fake)


def _conv2d_impl(x: Tensor, weight: Tensor, bias: Tensor | None, padding_mode: str, tf32: bool) -> Tensor:
    return conv2d_fwd(x, weight, bias, _new_output(x, weight), padding_mode=padding_mode, tf32=tf32)


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, ctx.padding_mode, ctx.tf32 = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _conv2d_grads(ctx, grad_y):
    x, weight = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_weight, grad_bias = _conv2d_backward.op(grad_y, x, weight, ctx.padding_mode, ctx.tf32, needs_x)
    return grad_x if needs_x else None, grad_weight, grad_bias if ctx.has_bias else None, None, None


_conv2d = FusedOp("conv2d", _conv2d_impl, lambda x, weight, bias, padding_mode, tf32: _new_output(x, weight),
                  backward=_conv2d_grads, setup_context=_conv2d_setup)


def _conv2d_into_impl(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, padding_mode: str,
                      tf32: bool) -> None:
    conv2d_fwd(x, weight, bias, out, padding_mode=padding_mode, tf32=tf32)


_conv2d_into = FusedOp("conv2d_into", _conv2d_into_impl, lambda x, weight, bias, out, padding_mode, tf32: None,
                       mutates_args=("out",))


def _conv2d_pool_into_impl(x: Tensor, weight: Tensor, bias: Tensor | None, pooled: Tensor, full: Tensor | None,
                           padding_mode: str, tf32: bool) -> None:
    conv2d_pool_fwd(x, weight, bias, pooled, full, padding_mode=padding_mode, tf32=tf32)


_conv2d_pool_into = FusedOp("conv2d_pool_into", _conv2d_pool_into_impl,
                            lambda x, weight, bias, pooled, full, padding_mode, tf32: None,
                            mutates_args=("pooled", "full"))


# ---- public functions and their PyTorch twins ----------------------------------------------------

def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, padding_mode: str = "reflect",
           tf32: bool | None = None) -> Tensor:
    """``conv2d(pad(x, k // 2, padding_mode), weight, bias)`` of ``x`` ``[B, Cin, H, W]`` (any strides,
    e.g. a channel slice of a wider NHWC buffer) with ``weight`` ``[Cout, Cin, k, k]``, ``k`` odd:
    ``[B, Cout, H, W]`` in channels_last (Triton). ``tf32`` lets fp32 products run in TF32 (``None``:
    as PyTorch's GEMMs, ``torch.backends.cuda.matmul.allow_tf32``)."""
    return _conv2d(x, weight, bias, padding_mode, tf32_requested(tf32))


def conv2d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, padding_mode: str = "reflect",
                 tf32: bool = False) -> Tensor:
    """PyTorch twin of :func:`conv2d`: the reference's padding, then ``F.conv2d`` (``tf32`` is ignored:
    PyTorch's own settings decide)."""
    _check(x, weight, bias, padding_mode)
    pad = weight.shape[-1] // 2
    if padding_mode == "reflect":
        padded = reflect_pad_extended(x, pad, pad, pad, pad)
    else:
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, weight, bias).contiguous(memory_format=torch.channels_last)


def conv2d_into(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *, padding_mode: str = "reflect",
                tf32: bool | None = None) -> Tensor:
    """:func:`conv2d` written into ``out`` ``[B, Cout, H, W]`` (any strides, e.g. the next channel slice
    of the buffer ``x`` is a slice of); returns ``out``. No gradient: the write is in place."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, out)):
        raise RuntimeError("conv2d_into writes in place and records no gradient; use conv2d where one is needed")
    _conv2d_into(x, weight, bias, out, padding_mode, tf32_requested(tf32))
    return out


def conv2d_into_torch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *,
                      padding_mode: str = "reflect", tf32: bool = False) -> Tensor:
    return out.copy_(conv2d_torch(x, weight, bias, padding_mode=padding_mode))


def conv2d_pool_into(x: Tensor, weight: Tensor, bias: Tensor | None, pooled: Tensor, full: Tensor | None = None, *,
                     padding_mode: str = "reflect", tf32: bool | None = None) -> Tensor:
    """:func:`conv2d` followed by a 2 x 2 max-pool, in one pass: the pooled map written into ``pooled``
    (e.g. the first channels of the next dense block's buffer; floored, as ``MaxPool2d(2)``) and, when
    given, the full-resolution output into ``full``; sides of 2 or more. Returns ``pooled``. No gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, pooled, full)):
        raise RuntimeError("conv2d_pool_into writes in place and records no gradient; use conv2d and a pool "
                           "where one is needed")
    _conv2d_pool_into(x, weight, bias, pooled, full, padding_mode, tf32_requested(tf32))
    return pooled


def conv2d_pool_into_torch(x: Tensor, weight: Tensor, bias: Tensor | None, pooled: Tensor,
                           full: Tensor | None = None, *, padding_mode: str = "reflect",
                           tf32: bool = False) -> Tensor:
    y = conv2d_torch(x, weight, bias, padding_mode=padding_mode)
    if full is not None:
        full.copy_(y)
    return pooled.copy_(F.max_pool2d(y, 2))
