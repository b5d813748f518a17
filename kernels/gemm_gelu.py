"""The MLP's ``fc1`` with its bias and exact GELU in the GEMM's epilogue: ``y = gelu(x W^T + b)``.

``fc1`` writes the widest activation of the model (``[tokens, 2048]``); run as a GEMM followed
by :func:`.gelu.bias_gelu` that activation is written, read back and written again. Here the
GEMM's fp32 accumulator gets the bias and the GELU before its only store. For training the
kernel also stores the pre-activation ``x W^T`` (what the unfused GEMM would have written), and
the backward is :func:`.gelu.bias_gelu`'s kernel followed by the two weight/input GEMMs.

The public :func:`linear_gelu` uses the kernel for 16-bit inputs. fp32 stays on cuBLAS plus the
bias+GELU kernel: the model's fp32 runs are strict fp32 (no TF32), which Triton computes on
the FMA units, below cuBLAS's SGEMM. Tiles are fixed (no autotuning, so runs repeat);
``python -m bench.linear_gelu_tiles`` sweeps them on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .compiler_options import COMPILER_OPTIONS
from .gelu import bias_gelu, bias_gelu_backward, bias_gelu_torch, gelu
from .registry import FusedOp


@triton.jit
def _linear_gelu_kernel(
    X, W, B, Y, PRE, rows, cols, depth,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_prem,
    STORE_PRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks share each weight column block while it is in L2.
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    col_blocks = tl.cdiv(cols, BLOCK_N)
    group_size = GROUP_M * col_blocks
    first_row_block = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(row_blocks - first_row_block, GROUP_M)
    pid_m = first_row_block + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < rows
    mask_n = offs_n < cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, depth, BLOCK_K):
        ks = start + offs_k
        mask_k = ks < depth
        x = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:
        tl.store(PRE + offs_m[:, None] * stride_prem + offs_n[None, :], acc.to(PRE.dtype.element_ty), mask=mask)
    z = acc + tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], gelu(z).to(Y.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class GemmTiles:
    """Launch shape of the GEMM: output tile, depth step, row-block grouping, warps, stages."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def linear_gelu_fwd(x: Tensor, weight: Tensor, bias: Tensor, *, save_pre: bool,
                    tiles: GemmTiles | None = None) -> tuple[Tensor, Tensor]:
    """``(gelu(x W^T + b), x W^T)`` for ``x`` ``[..., K]``, ``weight`` ``[N, K]``; the second is empty
    unless ``save_pre``."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_gelu: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                         f"{tuple(bias.shape)} do not make x @ weight.T + bias")
    tiles = tiles or GemmTiles()
    x2 = x.reshape(-1, x.shape[-1])
    rows, depth = x2.shape
    cols = weight.shape[0]
    y = x.new_empty(rows, cols)
    pre = x.new_empty(rows, cols) if save_pre else x.new_empty(0)
    if rows and cols:
        grid = (triton.cdiv(rows, tiles.block_m) * triton.cdiv(cols, tiles.block_n),)
        _linear_gelu_kernel[grid](
            x2, weight, bias, y, pre if save_pre else y, rows, cols, depth, *x2.stride(), *weight.stride(),
            y.stride(0), pre.stride(0) if save_pre else 0, STORE_PRE=save_pre, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
            INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=tiles.num_warps,
            num_stages=tiles.num_stages, **COMPILER_OPTIONS)
    shape = (*x.shape[:-1], cols)
    return y.view(shape), pre.view(shape) if save_pre else pre


# ---- registered op ---------------------------------------------------------------------------

def _linear_gelu_impl(x: Tensor, weight: Tensor, bias: Tensor, save_pre: bool) -> tuple[Tensor, Tensor]:
    return linear_gelu_fwd(x, weight, bias, save_pre=save_pre)


def _linear_gelu_fake(x, weight, bias, save_pre):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape) if save_pre else x.new_empty(0)


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, save_pre = inputs
    _, pre = output
    ctx.save_pre = save_pre
    ctx.save_for_backward(x, weight, bias, pre)


def _linear_gelu_grads(ctx, grad_y, grad_pre):
    if not ctx.save_pre:
        raise RuntimeError("crossfuse::linear_gelu ran with save_pre=False and cannot give gradients")
    x, weight, bias, pre = ctx.saved_tensors
    grad_z, grad_bias = bias_gelu_backward.op(grad_y, pre, bias)
    if grad_pre is not None:  # the pre-activation output x W^T used downstream too
        grad_z = grad_z + grad_pre
    grad_z2 = grad_z.reshape(-1, grad_z.shape[-1])
    grad_x = (grad_z2 @ weight).view(x.shape)
    grad_weight = grad_z2.t() @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_weight, grad_bias, None


_linear_gelu = FusedOp("linear_gelu", _linear_gelu_impl, _linear_gelu_fake, backward=_linear_gelu_grads,
                       setup_context=_linear_gelu_setup)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x W^T + b)`` (exact GELU): one Triton GEMM with the bias and GELU in its epilogue for
    16-bit inputs, cuBLAS then :func:`.gelu.bias_gelu` for fp32 (see the module's note)."""
    if x.dtype == torch.float32:
        return bias_gelu(F.linear(x, weight), bias)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    return _linear_gelu(x, weight, bias, save_pre)[0]


def linear_gelu_torch(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return bias_gelu_torch(F.linear(x, weight), bias)
