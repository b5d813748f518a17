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
appends to. fp32 dots use ``input_precision="ieee"`` (or TF32 when asked), 16-bit ones tensor
cores with fp32 accumulation. Design limit: odd square kernels, any channel counts and map sizes.

The backward (input, weight and bias gradients) runs in PyTorch inside one registered op for now
(the convolution's gradients on a padded copy, the padding's folded back); Triton backward kernels
are the next step (docs/fast-path.md#not-fused-yet).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import reflect_pad_extended
from .compiler_options import COMPILER_OPTIONS
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
def _conv2d_fwd_kernel(
    X, W, B, Y, pixels, height, width, in_channels, out_channels,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_wo, stride_wi, stride_wh, stride_ww,
    stride_yn, stride_yc, stride_yh, stride_yw,
    KERNEL: tl.constexpr, PADDING: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in tl.static_range(KERNEL * KERNEL):
        source_row = _source_index(row + tap // KERNEL - KERNEL // 2, height, PADDING)
        source_column = _source_index(column + tap % KERNEL - KERNEL // 2, width, PADDING)
        x_pixel = image * stride_xn + source_row * stride_xh + source_column * stride_xw
        w_tap = (tap // KERNEL) * stride_wh + (tap % KERNEL) * stride_ww
        for start in range(0, in_channels, BLOCK_K):
            channels = start + offs_k
            mask_k = channels < in_channels
            x = tl.load(X + x_pixel[:, None] + channels[None, :] * stride_xc,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + w_tap + offs_n[None, :] * stride_wo + channels[:, None] * stride_wi,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_pixel = image * stride_yn + row * stride_yh + column * stride_yw
    tl.store(Y + y_pixel[:, None] + offs_n[None, :] * stride_yc, acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@dataclass(frozen=True)
class ConvTiles:
    """Launch shape: output pixels and channels per tile, input channels per step, warps, stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def conv_tiles(in_channels: int, out_channels: int) -> ConvTiles:
    """Deterministic tiles (no autotuning, so runs repeat): 64 pixels by up to 64 output channels,
    up to 32 input channels a step; at least 16 each way, as ``tl.dot`` needs. Not yet timed on a GPU."""
    return ConvTiles(64, min(64, max(16, triton.next_power_of_2(out_channels))),
                     min(32, max(16, triton.next_power_of_2(in_channels))))


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
    tiles = tiles or conv_tiles(in_channels, out_channels)
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


def _new_output(x: Tensor, weight: Tensor) -> Tensor:
    batch, _, height, width = x.shape
    return torch.empty(batch, weight.shape[0], height, width, device=x.device, dtype=x.dtype,
                       memory_format=torch.channels_last)


# ---- registered ops ----------------------------------------------------------------------------

def padding_sources(size: int, pad: int, padding_mode: str, device: torch.device) -> Tensor:
    """For each position of a side of ``size`` padded by ``pad`` on both ends, the pixel it reads."""
    index = torch.arange(-pad, size + pad, device=device)
    if padding_mode == "replicate":
        return index.clamp(0, size - 1)
    period = max(2 * (size - 1), 1)
    index = index.abs() % period
    return torch.where(index >= size, period - index, index)


def _conv2d_backward_impl(grad_y: Tensor, x: Tensor, weight: Tensor, padding_mode: str,
                          tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` in PyTorch: the convolution's gradients on the padded map,
    the padding's gradient added back onto the pixels each position reads; ``grad_bias`` is the
    per-channel sum whether or not there is a bias."""
    pad = weight.shape[-1] // 2
    height, width = x.shape[-2:]
    rows = padding_sources(height, pad, padding_mode, x.device)
    columns = padding_sources(width, pad, padding_mode, x.device)
    padded = x.index_select(2, rows).index_select(3, columns)
    grad_padded = torch.nn.grad.conv2d_input(padded.shape, weight, grad_y)
    grad_weight = torch.nn.grad.conv2d_weight(padded, weight.shape, grad_y)
    grad_rows = grad_padded.new_zeros(*x.shape[:2], height, grad_padded.shape[3]).index_add_(2, rows, grad_padded)
    grad_x = torch.zeros_like(x).index_add_(3, columns, grad_rows)
    return grad_x, grad_weight, grad_y.sum((0, 2, 3))


def _conv2d_backward_fake(grad_y, x, weight, padding_mode, tf32):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0])


_conv2d_backward = FusedOp("conv2d_backward", _conv2d_backward_impl, _conv2d_backward_fake)


def _conv2d_impl(x: Tensor, weight: Tensor, bias: Tensor | None, padding_mode: str, tf32: bool) -> Tensor:
    return conv2d_fwd(x, weight, bias, _new_output(x, weight), padding_mode=padding_mode, tf32=tf32)


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, ctx.padding_mode, ctx.tf32 = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _conv2d_grads(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _conv2d_backward.op(grad_y, x, weight, ctx.padding_mode, ctx.tf32)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


_conv2d = FusedOp("conv2d", _conv2d_impl, lambda x, weight, bias, padding_mode, tf32: _new_output(x, weight),
                  backward=_conv2d_grads, setup_context=_conv2d_setup)


def _conv2d_into_impl(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, padding_mode: str,
                      tf32: bool) -> None:
    conv2d_fwd(x, weight, bias, out, padding_mode=padding_mode, tf32=tf32)


_conv2d_into = FusedOp("conv2d_into", _conv2d_into_impl, lambda x, weight, bias, out, padding_mode, tf32: None,
                       mutates_args=("out",))


# ---- public functions and their PyTorch twins ----------------------------------------------------

def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, padding_mode: str = "reflect",
           tf32: bool = False) -> Tensor:
    """``conv2d(pad(x, k // 2, padding_mode), weight, bias)`` of ``x`` ``[B, Cin, H, W]`` (any strides,
    e.g. a channel slice of a wider NHWC buffer) with ``weight`` ``[Cout, Cin, k, k]``, ``k`` odd:
    ``[B, Cout, H, W]`` in channels_last (Triton). ``tf32`` lets fp32 products run in TF32."""
    return _conv2d(x, weight, bias, padding_mode, tf32)


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
                tf32: bool = False) -> Tensor:
    """:func:`conv2d` written into ``out`` ``[B, Cout, H, W]`` (any strides, e.g. the next channel slice
    of the buffer ``x`` is a slice of); returns ``out``. No gradient: the write is in place."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, out)):
        raise RuntimeError("conv2d_into writes in place and records no gradient; use conv2d where one is needed")
    _conv2d_into(x, weight, bias, out, padding_mode, tf32)
    return out


def conv2d_into_torch(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, *,
                      padding_mode: str = "reflect", tf32: bool = False) -> Tensor:
    return out.copy_(conv2d_torch(x, weight, bias, padding_mode=padding_mode))
