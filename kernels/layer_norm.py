"""LayerNorm over the last dimension, with the residual add fused in, forward and backward.

Forward, per row: ``s = x + residual`` (when given), ``y = (s - mean) * rstd * w + b`` with
``rstd = 1 / sqrt(var + eps)`` (biased variance, as ``nn.LayerNorm``); ``mean`` and ``rstd`` are
saved. Backward, with ``s_hat = (s - mean) * rstd`` and ``g = w * dy``:

    ds = rstd * (g - mean(g) - s_hat * mean(g * s_hat)) + ds_extra
    dw = sum_rows(dy * s_hat)        db = sum_rows(dy)

``ds_extra`` is the gradient reaching ``s`` from its other uses (it is the block's residual
stream), and ``ds`` is the gradient of both ``x`` and ``residual``. Each backward program
handles a run of rows and writes partial ``dw, db`` sums, added up afterwards, so the result
does not depend on scheduling. Design limit: rows of up to 8192 features (one block per row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .dispatch import direct_call

ROWS_PER_PROGRAM = 16


@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, W, B, Y, S, MEAN, RSTD, rows, cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < cols
    s = tl.load(X + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(S + row * cols + offs, s.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(s, 0) / cols
    centred = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / cols + tl.cast(eps, tl.float32))
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * cols + offs, (centred * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS_EXTRA, S, W, MEAN, RSTD, DS, DW_PARTIAL, DB_PARTIAL, rows, cols,
    HAS_DS_EXTRA: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < cols
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for index in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + index
        if row < rows:
            dy = tl.load(DY + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(S + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            s_hat = tl.where(mask, (s - mean) * rstd, 0.0)
            g = w * dy
            ds = rstd * (g - tl.sum(g, 0) / cols - s_hat * (tl.sum(g * s_hat, 0) / cols))
            if HAS_DS_EXTRA:
                ds += tl.load(DS_EXTRA + row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DS + row * cols + offs, ds.to(DS.dtype.element_ty), mask=mask)
            dw += dy * s_hat
            db += dy
    tl.store(DW_PARTIAL + pid * cols + offs, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * cols + offs, db, mask=mask)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def layer_norm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                   eps: float) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(y, s, mean, rstd)`` for ``x`` (and ``residual``) of shape ``[..., N]``; ``s`` is None without residual."""
    x2 = _rows(x.contiguous())
    rows, cols = x2.shape
    y = torch.empty_like(x2)
    s = torch.empty_like(x2) if residual is not None else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        _layer_norm_fwd_kernel[(rows,)](
            x2, _rows(residual.contiguous()) if residual is not None else x2, weight, bias, y,
            s if s is not None else y, mean, rstd, rows, cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=triton.next_power_of_2(cols))
    return y.view(x.shape), s.view(x.shape) if s is not None else None, mean, rstd


def layer_norm_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ds, dw, db)``: the gradient of the normalised input (and of ``x`` and ``residual``)."""
    s2 = _rows(s.contiguous())
    rows, cols = s2.shape
    programs = max(1, triton.cdiv(rows, ROWS_PER_PROGRAM))
    ds = torch.empty_like(s2)
    dw_partial = torch.empty(programs, cols, device=s.device, dtype=torch.float32)
    db_partial = torch.empty(programs, cols, device=s.device, dtype=torch.float32)
    if rows:
        _layer_norm_bwd_kernel[(programs,)](
            _rows(grad_y.contiguous()), _rows(grad_s.contiguous()) if grad_s is not None else s2, s2, weight,
            mean, rstd, ds, dw_partial, db_partial, rows, cols, HAS_DS_EXTRA=grad_s is not None,
            ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, BLOCK_N=triton.next_power_of_2(cols))
    else:
        dw_partial.zero_()
        db_partial.zero_()
    return ds.view(s.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# ---- registered ops ----------------------------------------------------------------------------

def _layer_norm_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


_layer_norm_op = torch.library.custom_op("crossfuse::layer_norm", _layer_norm_impl, mutates_args=())


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _add_layer_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_fwd(x, residual, weight, bias, eps)


_add_layer_norm_op = torch.library.custom_op("crossfuse::add_layer_norm", _add_layer_norm_impl,
                                             mutates_args=())


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.numel() // x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(x), x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("crossfuse::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                            rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_bwd(grad_y, grad_s, s, weight, mean, rstd)


@_layer_norm_backward_op.register_fake
def _(grad_y, grad_s, s, weight, mean, rstd):
    return torch.empty_like(s), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.crossfuse.layer_norm_backward(grad_y, None, x, weight, mean, rstd)
    return dx, dw, db, None


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)


def _add_layer_norm_backward(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = torch.ops.crossfuse.layer_norm_backward(grad_y, grad_s, s, weight, mean, rstd)
    return ds, ds, dw, db, None


_add_layer_norm_op.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


# ---- public functions and their PyTorch twins ----------------------------------------------------

def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``nn.LayerNorm`` over the last dimension of ``x`` (Triton)."""
    op = _layer_norm_impl if direct_call(x, weight, bias) else _layer_norm_op
    return op(x, weight, bias, eps)[0]


def layer_norm_torch(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` in one pass (Triton)."""
    op = _add_layer_norm_impl if direct_call(x, residual, weight, bias) else _add_layer_norm_op
    y, s, _, _ = op(x, residual, weight, bias, eps)
    return y, s


def add_layer_norm_torch(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                         eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s
