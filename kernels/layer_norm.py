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

The cross encoder's two ends are variants of the same kernels (:mod:`.windows`): its first
LayerNorm reads its tokens straight out of the feature map, cut into windows and patches by
address, and also writes them (they are the block's residual); its last adds the other cross
module's output (``plus``) and writes the sum as the map. Their backwards write the map's
gradient by address (folding the reflection padding back) and read it by address.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import PATCH
from .compiler_options import COMPILER_OPTIONS
from .dispatch import direct_call
from .windows import (WindowGrid, fold_reflection_padding, map_to_tokens, tokens_to_map,
                      window_token_offsets)

ROWS_PER_PROGRAM = 16


@triton.jit
def _layer_norm_fwd_kernel(
    X, RES, PLUS, W, B, Y, S, MEAN, RSTD, cols, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_S: tl.constexpr, HAS_PLUS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Tokens in, tokens out: the map kernel below, inlined with no map. The geometry is not among
    the arguments (each costs host time at every launch, 2-3 us for the ten of them): constants
    here, and unused."""
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


def _check_operands(features: int, weight: Tensor, bias: Tensor, like: Tensor, **tokens: Tensor | None) -> None:
    """The kernels index these by the same row and feature offsets: a shorter one would be read
    past its end, so mismatches are refused here."""
    for name, param in (("weight", weight), ("bias", bias)):
        if param.shape != (features,):
            raise ValueError(f"{name} must have shape ({features},) for {features} features, got {tuple(param.shape)}")
    for name, tensor in tokens.items():
        if tensor is not None and tensor.shape != like.shape:
            raise ValueError(f"{name} must have the shape of x, {tuple(like.shape)}, got {tuple(tensor.shape)}")


def _rows_and_features(tokens: Tensor) -> tuple[int, int]:
    features = tokens.shape[-1]
    return (tokens.numel() // features if features else 0), features


def _launch_fwd(x: Tensor, residual: Tensor | None, plus: Tensor | None, weight: Tensor, bias: Tensor,
                y: Tensor, s: Tensor | None, rows: int, cols: int, eps: float, geometry: tuple[int, ...] = (),
                x_from_map: bool = False, y_to_map: bool = False) -> tuple[Tensor, Tensor]:
    """One program per row; unused pointers alias ``y`` (their loads and stores are compiled out).
    ``geometry`` (:meth:`WindowGrid.kernel_args`) only with ``x_from_map`` or ``y_to_map``."""
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


def _launch_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                ds: Tensor, grad_y_tokens: Tensor | None, geometry: tuple[int, ...] = (),
                dy_from_map: bool = False, ds_to_map: bool = False) -> tuple[Tensor, Tensor]:
    """``ds`` (and ``grad_y_tokens``) written; returns ``(dw, db)`` summed over the programs' partials.
    ``geometry`` only with ``dy_from_map`` or ``ds_to_map``."""
    rows, cols = _rows_and_features(s)
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
    rows, cols = _rows_and_features(x)
    _check_operands(cols, weight, bias, x, residual=residual)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    mean, rstd = _launch_fwd(x, residual.contiguous() if residual is not None else None, None, weight, bias, y, s,
                             rows, cols, eps)
    return y, s, mean, rstd


def layer_norm_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                   rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(ds, dw, db)``: the gradient of the normalised input (and of ``x`` and ``residual``)."""
    s = s.contiguous()
    ds = torch.empty_like(s)
    dw, db = _launch_bwd(grad_y.contiguous(), grad_s.contiguous() if grad_s is not None else None, s, weight, mean,
                         rstd, ds, None)
    return ds, dw, db


def layer_norm_from_map_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                            window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(LayerNorm(tokens), tokens, mean, rstd)`` where ``tokens`` are the map ``x`` cut into windows
    of patches (:mod:`.windows`), read by address from ``x`` in any strides."""
    grid = WindowGrid.of(x.shape, window)
    tokens = x.new_empty(grid.token_shape)
    _check_operands(tokens.shape[-1], weight, bias, tokens)
    normed = torch.empty_like(tokens)
    rows, cols = _rows_and_features(tokens)
    mean, rstd = _launch_fwd(x, None, None, weight, bias, normed, tokens, rows, cols, eps, grid.kernel_args(x),
                             x_from_map=True)
    return normed, tokens, mean, rstd


def layer_norm_from_map_bwd(grad_normed: Tensor, grad_tokens: Tensor | None, tokens: Tensor, weight: Tensor,
                            mean: Tensor, rstd: Tensor, height: int, width: int,
                            window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, dw, db)``; ``grad_x`` is the map's gradient, ``[B, C, height, width]``."""
    grid = WindowGrid.of_tokens(tokens, height, width, window)
    padded = tokens.new_empty(grid.padded_shape)
    dw, db = _launch_bwd(grad_normed.contiguous(), grad_tokens.contiguous() if grad_tokens is not None else None,
                         tokens, weight, mean, rstd, padded, None, grid.kernel_args(padded), ds_to_map=True)
    return fold_reflection_padding(padded, height, width), dw, db


def add_layer_norm_to_map_fwd(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              height: int, width: int,
                              window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(map, s, mean, rstd)``: ``s = x + residual`` and ``LayerNorm(s) + plus`` written straight into
    a ``[B, C, height, width]`` map (windows put back, padding cropped)."""
    grid = WindowGrid.of_tokens(x, height, width, window)
    _check_operands(x.shape[-1], weight, bias, x, residual=residual, plus=plus)
    x, residual, plus = x.contiguous(), residual.contiguous(), plus.contiguous()
    y = x.new_empty(grid.batch, grid.channels, height, width)
    s = torch.empty_like(x)
    rows, cols = _rows_and_features(x)
    mean, rstd = _launch_fwd(x, residual, plus, weight, bias, y, s, rows, cols, eps, grid.kernel_args(y),
                             y_to_map=True)
    return y, s, mean, rstd


def add_layer_norm_to_map_bwd(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor, mean: Tensor,
                              rstd: Tensor, window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ds, grad_plus, dw, db)`` from the map's gradient ``grad_y`` (any strides): ``ds`` is the
    gradient of ``x`` and ``residual``, ``grad_plus`` is ``grad_y`` as tokens (zero in the padding)."""
    height, width = grad_y.shape[-2:]
    grid = WindowGrid.of_tokens(s, height, width, window)
    ds = torch.empty_like(s)
    grad_plus = torch.empty_like(s)
    dw, db = _launch_bwd(grad_y, grad_s.contiguous() if grad_s is not None else None, s, weight, mean, rstd, ds,
                         grad_plus, grid.kernel_args(grad_y), dy_from_map=True)
    return ds, grad_plus, dw, db


# ---- registered ops ----------------------------------------------------------------------------

def _layer_norm_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


_layer_norm_op = torch.library.custom_op("crossfuse::layer_norm", _layer_norm_impl, mutates_args=())


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    rows, _ = _rows_and_features(x)
    return torch.empty_like(x), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _add_layer_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_fwd(x, residual, weight, bias, eps)


_add_layer_norm_op = torch.library.custom_op("crossfuse::add_layer_norm", _add_layer_norm_impl,
                                             mutates_args=())


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps):
    rows, _ = _rows_and_features(x)
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


def _layer_norm_from_map_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_height: int,
                              window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_from_map_fwd(x, weight, bias, eps, (window_height, window_width))


_layer_norm_from_map_op = torch.library.custom_op("crossfuse::layer_norm_from_map", _layer_norm_from_map_impl,
                                                  mutates_args=())


@_layer_norm_from_map_op.register_fake
def _(x, weight, bias, eps, window_height, window_width):
    windows, tokens, features = WindowGrid.of(x.shape, (window_height, window_width)).token_shape
    rows = windows * tokens
    return (x.new_empty(windows, tokens, features), x.new_empty(windows, tokens, features),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("crossfuse::layer_norm_from_map_backward", mutates_args=())
def _layer_norm_from_map_backward_op(grad_normed: Tensor, grad_tokens: Tensor | None, tokens: Tensor,
                                     weight: Tensor, mean: Tensor, rstd: Tensor, height: int, width: int,
                                     window_height: int, window_width: int) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_from_map_bwd(grad_normed, grad_tokens, tokens, weight, mean, rstd, height, width,
                                   (window_height, window_width))


@_layer_norm_from_map_backward_op.register_fake
def _(grad_normed, grad_tokens, tokens, weight, mean, rstd, height, width, window_height, window_width):
    grid = WindowGrid.of_tokens(tokens, height, width, (window_height, window_width))
    return (tokens.new_empty(grid.batch, grid.channels, height, width), torch.empty_like(weight),
            torch.empty_like(weight))


def _layer_norm_from_map_setup(ctx, inputs, output):
    x, weight, _, _, window_height, window_width = inputs
    _, tokens, mean, rstd = output
    ctx.map_size = (x.shape[2], x.shape[3], window_height, window_width)
    ctx.save_for_backward(tokens, weight, mean, rstd)


def _layer_norm_from_map_backward(ctx, grad_normed, grad_tokens, grad_mean, grad_rstd):
    tokens, weight, mean, rstd = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros_like(tokens)
    dx, dw, db = torch.ops.crossfuse.layer_norm_from_map_backward(grad_normed, grad_tokens, tokens, weight, mean,
                                                                 rstd, *ctx.map_size)
    return dx, dw, db, None, None, None


_layer_norm_from_map_op.register_autograd(_layer_norm_from_map_backward, setup_context=_layer_norm_from_map_setup)


def _add_layer_norm_to_map_impl(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                                height: int, width: int, window_height: int,
                                window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return add_layer_norm_to_map_fwd(x, residual, plus, weight, bias, eps, height, width,
                                     (window_height, window_width))


_add_layer_norm_to_map_op = torch.library.custom_op("crossfuse::add_layer_norm_to_map",
                                                    _add_layer_norm_to_map_impl, mutates_args=())


@_add_layer_norm_to_map_op.register_fake
def _(x, residual, plus, weight, bias, eps, height, width, window_height, window_width):
    grid = WindowGrid.of_tokens(x, height, width, (window_height, window_width))
    rows, _ = _rows_and_features(x)
    return (x.new_empty(grid.batch, grid.channels, height, width), torch.empty_like(x),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("crossfuse::add_layer_norm_to_map_backward", mutates_args=())
def _add_layer_norm_to_map_backward_op(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor,
                                       mean: Tensor, rstd: Tensor, window_height: int,
                                       window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return add_layer_norm_to_map_bwd(grad_y, grad_s, s, weight, mean, rstd, (window_height, window_width))


@_add_layer_norm_to_map_backward_op.register_fake
def _(grad_y, grad_s, s, weight, mean, rstd, window_height, window_width):
    return torch.empty_like(s), torch.empty_like(s), torch.empty_like(weight), torch.empty_like(weight)


def _add_layer_norm_to_map_setup(ctx, inputs, output):
    weight, window = inputs[3], inputs[8:10]
    y, s, mean, rstd = output
    ctx.window = window
    ctx.map_shape = y.shape
    ctx.save_for_backward(s, weight, mean, rstd)


def _add_layer_norm_to_map_backward(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = s.new_zeros(ctx.map_shape)
    ds, grad_plus, dw, db = torch.ops.crossfuse.add_layer_norm_to_map_backward(grad_y, grad_s, s, weight, mean,
                                                                              rstd, *ctx.window)
    return ds, ds, grad_plus, dw, db, None, None, None, None, None


_add_layer_norm_to_map_op.register_autograd(_add_layer_norm_to_map_backward,
                                            setup_context=_add_layer_norm_to_map_setup)


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


def layer_norm_from_map(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(tokens), tokens)`` of the map ``x`` ``[B, C, H, W]`` cut into ``window`` -sized
    windows of 2 x 2 patches (SPEC 2.1), read by address from ``x`` (Triton)."""
    op = _layer_norm_from_map_impl if direct_call(x, weight, bias) else _layer_norm_from_map_op
    normed, tokens, _, _ = op(x, weight, bias, eps, *window)
    return normed, tokens


def layer_norm_from_map_torch(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    tokens = map_to_tokens(x, window)
    return F.layer_norm(tokens, tokens.shape[-1:], weight, bias, eps), tokens


def add_layer_norm_to_map(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                          height: int, width: int, window: tuple[int, int]) -> Tensor:
    """``LayerNorm(x + residual) + plus`` on tokens, written as the ``[B, C, height, width]`` map
    they were cut from: windows put back, patches undone, padding cropped (Triton)."""
    op = _add_layer_norm_to_map_impl if direct_call(x, residual, plus, weight, bias) else _add_layer_norm_to_map_op
    return op(x, residual, plus, weight, bias, eps, height, width, *window)[0]


def add_layer_norm_to_map_torch(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor,
                                eps: float, height: int, width: int, window: tuple[int, int]) -> Tensor:
    s = x + residual
    return tokens_to_map(F.layer_norm(s, s.shape[-1:], weight, bias, eps) + plus, height, width, window)
