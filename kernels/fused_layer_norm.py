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

The kernels also read or write a row as pixels of a windowed feature map (the ``*_map_*``
kernels, with :func:`.windows.window_token_offsets`): that is what the cross encoder's two end
ops of :mod:`.window_layer_norm` launch. The ops here, ``layer_norm`` and ``add_layer_norm``,
run on token rows, through kernels that take no map geometry (each argument costs host time at
every launch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import PATCH
from .compiler_options import COMPILER_OPTIONS
from .registry import FusedOp
from .windows import window_token_offsets

ROWS_PER_PROGRAM = 16


@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, PLUS, W, B, Y, S, MEAN, RSTD, cols, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr, HAS_PLUS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tokens in, tokens out: the map kernel below, inlined with no map. The geometry is not among
    the arguments (each costs host time at every launch): constants here, and unused."""
    _layer_norm_map_fwd_kernel(X, RES, PLUS, W, B, Y, S, MEAN, RSTD, cols, eps, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1,
                               X_FROM_MAP=False, HAS_RESIDUAL=HAS_RESIDUAL, STORE_S=STORE_S, HAS_PLUS=HAS_PLUS,
                               Y_TO_MAP=False, PATCH=1, BLOCK_N=BLOCK_N)


@triton.jit
def _layer_norm_map_fwd_kernel(
    X, RES, PLUS, W, B, Y, S, MEAN, RSTD, cols, eps,
    map_sb, map_sc, map_sh, map_sw, map_height, map_width, window_height, window_width, windows_per_row,
    windows_per_image,
    X_FROM_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr, HAS_PLUS: tl.constexpr,
    Y_TO_MAP: tl.constexpr, PATCH: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row; the cross encoder's ends read it from a map (``X_FROM_MAP``) or write it into one
    (``Y_TO_MAP``)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < cols
    token_offs = row * cols + offs
    map_offs, inside = window_token_offsets(
        row, offs, map_sb, map_sc, map_sh, map_sw, map_height, map_width, window_height, window_width,
        windows_per_row, windows_per_image, MIRROR=X_FROM_MAP, PATCH=PATCH)
    if X_FROM_MAP:
        s = tl.load(X + map_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.load(X + token_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + token_offs, mask=mask, other=0.0).to(tl.float32)
    if STORE_S:
        tl.store(S + token_offs, s.to(S.dtype.element_ty), mask=mask)
    mean = tl.sum(s, 0) / cols
    centred = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / cols + tl.cast(eps, tl.float32))
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    if HAS_PLUS:
        y += tl.load(PLUS + token_offs, mask=mask, other=0.0).to(tl.float32)
    if Y_TO_MAP:
        tl.store(Y + map_offs, y.to(Y.dtype.element_ty), mask=mask & inside)
    else:
        tl.store(Y + token_offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, DS_EXTRA, S, W, MEAN, RSTD, DS, DW_PARTIAL, DB_PARTIAL, rows, cols,
    HAS_DS_EXTRA: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tokens in, tokens out: the map kernel below with no map, as in the forward."""
    _layer_norm_map_bwd_kernel(DY, DS_EXTRA, S, W, MEAN, RSTD, DS, DS, DW_PARTIAL, DB_PARTIAL, rows, cols,
                               0, 0, 0, 0, 1, 1, 1, 1, 1, 1, DY_FROM_MAP=False, STORE_DY_TOKENS=False,
                               HAS_DS_EXTRA=HAS_DS_EXTRA, DS_TO_MAP=False, PATCH=1,
                               ROWS_PER_PROGRAM=ROWS_PER_PROGRAM, BLOCK_N=BLOCK_N)


@triton.jit
def _layer_norm_map_bwd_kernel(
    DY, DS_EXTRA, S, W, MEAN, RSTD, DS, DY_TOKENS, DW_PARTIAL, DB_PARTIAL, rows, cols,
    map_sb, map_sc, map_sh, map_sw, map_height, map_width, window_height, window_width, windows_per_row,
    windows_per_image,
    DY_FROM_MAP: tl.constexpr, STORE_DY_TOKENS: tl.constexpr, HAS_DS_EXTRA: tl.constexpr,
    DS_TO_MAP: tl.constexpr, PATCH: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A run of rows; the ends' backwards read the output map's gradient by address, or write the
    input map's."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < cols
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for index in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + index
        if row < rows:
            token_offs = row * cols + offs
            # Never mirrored: the gradient map is read where the forward wrote (the padding,
            # cropped away, has none) or written into a padded buffer (every pixel once).
            map_offs, inside = window_token_offsets(
                row, offs, map_sb, map_sc, map_sh, map_sw, map_height, map_width, window_height, window_width,
                windows_per_row, windows_per_image, MIRROR=False, PATCH=PATCH)
            if DY_FROM_MAP:
                dy = tl.load(DY + map_offs, mask=mask & inside, other=0.0).to(tl.float32)
            else:
                dy = tl.load(DY + token_offs, mask=mask, other=0.0).to(tl.float32)
            if STORE_DY_TOKENS:
                tl.store(DY_TOKENS + token_offs, dy.to(DY_TOKENS.dtype.element_ty), mask=mask)
            s = tl.load(S + token_offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            s_hat = tl.where(mask, (s - mean) * rstd, 0.0)
            g = w * dy
            ds = rstd * (g - tl.sum(g, 0) / cols - s_hat * (tl.sum(g * s_hat, 0) / cols))
            if HAS_DS_EXTRA:
                ds += tl.load(DS_EXTRA + token_offs, mask=mask, other=0.0).to(tl.float32)
            if DS_TO_MAP:
                tl.store(DS + map_offs, ds.to(DS.dtype.element_ty), mask=mask)
            else:
                tl.store(DS + token_offs, ds.to(DS.dtype.element_ty), mask=mask)
            dw += dy * s_hat
            db += dy
    tl.store(DW_PARTIAL + pid * cols + offs, dw, mask=mask)
    tl.store(DB_PARTIAL + pid * cols + offs, db, mask=mask)


def check_operands(features: int, weight: Tensor, bias: Tensor, like: Tensor, **tokens: Tensor | None) -> None:
    """The kernels index these by the same row and feature offsets: a shorter one would be read
    past its end, so mismatches are refused here."""
    for name, param in (("weight", weight), ("bias", bias)):
        if param.shape != (features,):
            raise ValueError(f"{name} must have shape ({features},) for {features} features, got {tuple(param.shape)}")
    for name, tensor in tokens.items():
        if tensor is not None and tensor.shape != like.shape:
            raise ValueError(f"{name} must have the shape of x, {tuple(like.shape)}, got {tuple(tensor.shape)}")


def rows_and_features(tokens: Tensor) -> tuple[int, int]:
    features = tokens.shape[-1]
    return (tokens.numel() // features if features else 0), features


def launch_rows_fwd(x: Tensor, residual: Tensor | None, plus: Tensor | None, weight: Tensor, bias: Tensor,
                    y: Tensor, s: Tensor | None, rows: int, cols: int, eps: float, geometry: tuple[int, ...] = (),
                    x_from_map: bool = False, y_to_map: bool = False) -> tuple[Tensor, Tensor]:
    """One program per row; unused pointers alias ``y`` (their loads and stores are compiled out).
    ``geometry`` (:meth:`.windows.WindowGrid.kernel_args`) only with ``x_from_map`` or ``y_to_map``."""
    mean = torch.empty(rows, device=y.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=y.device, dtype=torch.float32)
    if not rows:
        return mean, rstd
    operands = (x, residual if residual is not None else y, plus if plus is not None else y, weight, bias, y,
                s if s is not None else y, mean, rstd, cols, eps)
    flags = dict(HAS_RESIDUAL=residual is not None, STORE_S=s is not None, HAS_PLUS=plus is not None,
                 BLOCK_N=triton.next_power_of_2(cols), **COMPILER_OPTIONS)
    if x_from_map or y_to_map:
        _layer_norm_map_fwd_kernel[(rows,)](*operands, *geometry, X_FROM_MAP=x_from_map, Y_TO_MAP=y_to_map,
                                            PATCH=PATCH, **flags)
    else:
        _layer_norm_fwd_kernel[(rows,)](*operands, **flags)
    return mean, rstd


def launch_rows_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                    ds: Tensor, grad_y_tokens: Tensor | None, geometry: tuple[int, ...] = (),
                    dy_from_map: bool = False, ds_to_map: bool = False) -> tuple[Tensor, Tensor]:
    """``ds`` (and ``grad_y_tokens``) written; returns ``(dw, db)`` summed over the programs' partials.
    ``geometry`` only with ``dy_from_map`` or ``ds_to_map``."""
    rows, cols = rows_and_features(s)
    programs = max(1, triton.cdiv(rows, ROWS_PER_PROGRAM))
    dw_partial = torch.empty(programs, cols, device=s.device, dtype=torch.float32)
    db_partial = torch.empty(programs, cols, device=s.device, dtype=torch.float32)
    flags = dict(HAS_DS_EXTRA=grad_s is not None, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM,
                 BLOCK_N=triton.next_power_of_2(cols), **COMPILER_OPTIONS)
    ds_extra = grad_s if grad_s is not None else s
    if rows and (dy_from_map or ds_to_map or grad_y_tokens is not None):
        _layer_norm_map_bwd_kernel[(programs,)](
            grad_y, ds_extra, s, weight, mean, rstd, ds, grad_y_tokens if grad_y_tokens is not None else s,
            dw_partial, db_partial, rows, cols, *geometry, DY_FROM_MAP=dy_from_map,
            STORE_DY_TOKENS=grad_y_tokens is not None, DS_TO_MAP=ds_to_map, PATCH=PATCH, **flags)
    elif rows:
        _layer_norm_bwd_kernel[(programs,)](grad_y, ds_extra, s, weight, mean, rstd, ds, dw_partial, db_partial,
                                            rows, cols, **flags)
    else:
        dw_partial.zero_()
        db_partial.zero_()
    return dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


def layer_norm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                   eps: float) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(y, s, mean, rstd)`` for ``x`` (and ``residual``) of shape ``[..., N]``; ``s`` is None without residual.

    Contiguous tensors of any shape are rows of ``N`` to the kernel, so no reshapes (each costs
    microseconds of host time, which small batches feel).
    """
    x = x.contiguous()
    rows, cols = rows_and_features(x)
    check_operands(cols, weight, bias, x, residual=residual)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    mean, rstd = launch_rows_fwd(x, residual.contiguous() if residual is not None else None, None, weight, bias, y,
                                 s, rows, cols, eps)
    return y, s, mean, rstd


def layer_norm_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ds, dw, db)``: the gradient of the normalised input (and of ``x`` and ``residual``)."""
    s = s.contiguous()
    ds = torch.empty_like(s)
    dw, db = launch_rows_bwd(grad_y.contiguous(), grad_s.contiguous() if grad_s is not None else None, s, weight,
                             mean, rstd, ds, None)
    return ds, dw, db


# ---- registered ops ----------------------------------------------------------------------------

def _stats_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    rows, _ = rows_and_features(x)
    return x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _layer_norm_backward_impl(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                              rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_bwd(grad_y, grad_s, s, weight, mean, rstd)


_layer_norm_backward = FusedOp(
    "layer_norm_backward", _layer_norm_backward_impl,
    lambda grad_y, grad_s, s, weight, mean, rstd: (torch.empty_like(s), torch.empty_like(weight),
                                                   torch.empty_like(weight)))


def _layer_norm_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grads(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward.op(grad_y, None, x, weight, mean, rstd)
    return dx, dw, db, None


_layer_norm = FusedOp("layer_norm", _layer_norm_impl,
                      lambda x, weight, bias, eps: (torch.empty_like(x), *_stats_fake(x)),
                      backward=_layer_norm_grads, setup_context=_layer_norm_setup)


def _add_layer_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                         eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_fwd(x, residual, weight, bias, eps)


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)


def _add_layer_norm_grads(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds, dw, db = _layer_norm_backward.op(grad_y, grad_s, s, weight, mean, rstd)
    return ds, ds, dw, db, None


_add_layer_norm = FusedOp("add_layer_norm", _add_layer_norm_impl,
                          lambda x, residual, weight, bias, eps: (torch.empty_like(x), torch.empty_like(x),
                                                                  *_stats_fake(x)),
                          backward=_add_layer_norm_grads, setup_context=_add_layer_norm_setup)


# ---- public functions and their PyTorch twins ----------------------------------------------------

def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``nn.LayerNorm`` over the last dimension of ``x`` (Triton)."""
    return _layer_norm(x, weight, bias, eps)[0]


def layer_norm_torch(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` in one pass (Triton)."""
    y, s, _, _ = _add_layer_norm(x, residual, weight, bias, eps)
    return y, s


def add_layer_norm_torch(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                         eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps), s
