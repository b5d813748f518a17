"""The cross encoder's two ends: LayerNorms that read their tokens out of a feature map, or write
them into one, by address.

A map ``[B, C, H, W]`` is cut into windows of 2 x 2 patches (docs/model.md#windows-and-tokens);
:mod:`.windows` says where each token's features live in the map. So the first LayerNorm of the
encoder reads its tokens straight from the deep map (reflection padding included) and also writes
them (they are the first block's residual), and the last one adds the other cross module's output
(``plus``) and writes the sum as the output map (windows put back, padding cropped): no padded
copy, no window copy, no patch copy. The math is :mod:`.fused_layer_norm`'s, in its ``*_map_*``
kernels. Their backwards write the input map's gradient by address (into the padded map, whose
margins :func:`.windows.fold_reflection_padding` adds back) and read the output map's gradient
by address.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_layer_norm import check_operands, launch_rows_bwd, launch_rows_fwd, rows_and_features
from .registry import FusedOp
from .windows import WindowGrid, fold_reflection_padding, map_to_tokens, tokens_to_map


def layer_norm_from_map_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                            window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(LayerNorm(tokens), tokens, mean, rstd)`` where ``tokens`` are the map ``x`` cut into windows
    of patches (:mod:`.windows`), read by address from ``x`` in any strides."""
    grid = WindowGrid.of(x.shape, window)
    tokens = x.new_empty(grid.token_shape)
    check_operands(tokens.shape[-1], weight, bias, tokens)
    normed = torch.empty_like(tokens)
    rows, cols = rows_and_features(tokens)
    mean, rstd = launch_rows_fwd(x, None, None, weight, bias, normed, tokens, rows, cols, eps, grid.kernel_args(x),
                                 x_from_map=True)
    return normed, tokens, mean, rstd


def layer_norm_from_map_bwd(grad_normed: Tensor, grad_tokens: Tensor | None, tokens: Tensor, weight: Tensor,
                            mean: Tensor, rstd: Tensor, height: int, width: int,
                            window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, dw, db)``; ``grad_x`` is the map's gradient, ``[B, C, height, width]``."""
    grid = WindowGrid.of_tokens(tokens, height, width, window)
    padded = tokens.new_empty(grid.padded_shape)
    dw, db = launch_rows_bwd(grad_normed.contiguous(), grad_tokens.contiguous() if grad_tokens is not None else None,
                             tokens, weight, mean, rstd, padded, None, grid.kernel_args(padded), ds_to_map=True)
    return fold_reflection_padding(padded, height, width), dw, db


def add_layer_norm_to_map_fwd(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              height: int, width: int,
                              window: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(map, s, mean, rstd)``: ``s = x + residual`` and ``LayerNorm(s) + plus`` written straight into
    a ``[B, C, height, width]`` map (windows put back, padding cropped)."""
    grid = WindowGrid.of_tokens(x, height, width, window)
    check_operands(x.shape[-1], weight, bias, x, residual=residual, plus=plus)
    x, residual, plus = x.contiguous(), residual.contiguous(), plus.contiguous()
    y = x.new_empty(grid.batch, grid.channels, height, width)
    s = torch.empty_like(x)
    rows, cols = rows_and_features(x)
    mean, rstd = launch_rows_fwd(x, residual, plus, weight, bias, y, s, rows, cols, eps, grid.kernel_args(y),
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
    dw, db = launch_rows_bwd(grad_y, grad_s.contiguous() if grad_s is not None else None, s, weight, mean, rstd, ds,
                             grad_plus, grid.kernel_args(grad_y), dy_from_map=True)
    return ds, grad_plus, dw, db


# ---- registered ops ----------------------------------------------------------------------------

def _stats_fake(tokens: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    return tokens.new_empty(rows, dtype=torch.float32), tokens.new_empty(rows, dtype=torch.float32)


def _layer_norm_from_map_backward_impl(grad_normed: Tensor, grad_tokens: Tensor | None, tokens: Tensor,
                                       weight: Tensor, mean: Tensor, rstd: Tensor, height: int, width: int,
                                       window_height: int, window_width: int) -> tuple[Tensor, Tensor, Tensor]:
    return layer_norm_from_map_bwd(grad_normed, grad_tokens, tokens, weight, mean, rstd, height, width,
                                   (window_height, window_width))


def _layer_norm_from_map_backward_fake(grad_normed, grad_tokens, tokens, weight, mean, rstd, height, width,
                                       window_height, window_width):
    grid = WindowGrid.of_tokens(tokens, height, width, (window_height, window_width))
    return (tokens.new_empty(grid.batch, grid.channels, height, width), torch.empty_like(weight),
            torch.empty_like(weight))


_layer_norm_from_map_backward = FusedOp("layer_norm_from_map_backward", _layer_norm_from_map_backward_impl,
                                        _layer_norm_from_map_backward_fake)


def _layer_norm_from_map_impl(x: Tensor, weight: Tensor, bias: Tensor, eps: float, window_height: int,
                              window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_from_map_fwd(x, weight, bias, eps, (window_height, window_width))


def _layer_norm_from_map_fake(x, weight, bias, eps, window_height, window_width):
    windows, tokens, features = WindowGrid.of(x.shape, (window_height, window_width)).token_shape
    return (x.new_empty(windows, tokens, features), x.new_empty(windows, tokens, features),
            *_stats_fake(x, windows * tokens))


def _layer_norm_from_map_setup(ctx, inputs, output):
    x, weight, _, _, window_height, window_width = inputs
    _, tokens, mean, rstd = output
    ctx.map_size = (x.shape[2], x.shape[3], window_height, window_width)
    ctx.save_for_backward(tokens, weight, mean, rstd)


def _layer_norm_from_map_grads(ctx, grad_normed, grad_tokens, grad_mean, grad_rstd):
    tokens, weight, mean, rstd = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros_like(tokens)
    dx, dw, db = _layer_norm_from_map_backward.op(grad_normed, grad_tokens, tokens, weight, mean, rstd,
                                                  *ctx.map_size)
    return dx, dw, db, None, None, None


_layer_norm_from_map = FusedOp("layer_norm_from_map", _layer_norm_from_map_impl, _layer_norm_from_map_fake,
                               backward=_layer_norm_from_map_grads, setup_context=_layer_norm_from_map_setup)


def _add_layer_norm_to_map_backward_impl(grad_y: Tensor, grad_s: Tensor | None, s: Tensor, weight: Tensor,
                                         mean: Tensor, rstd: Tensor, window_height: int,
                                         window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return add_layer_norm_to_map_bwd(grad_y, grad_s, s, weight, mean, rstd, (window_height, window_width))


_add_layer_norm_to_map_backward = FusedOp(
    "add_layer_norm_to_map_backward", _add_layer_norm_to_map_backward_impl,
    lambda grad_y, grad_s, s, weight, mean, rstd, window_height, window_width: (
        torch.empty_like(s), torch.empty_like(s), torch.empty_like(weight), torch.empty_like(weight)))


def _add_layer_norm_to_map_impl(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                                height: int, width: int, window_height: int,
                                window_width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return add_layer_norm_to_map_fwd(x, residual, plus, weight, bias, eps, height, width,
                                     (window_height, window_width))


def _add_layer_norm_to_map_fake(x, residual, plus, weight, bias, eps, height, width, window_height, window_width):
    grid = WindowGrid.of_tokens(x, height, width, (window_height, window_width))
    rows, _ = rows_and_features(x)
    return (x.new_empty(grid.batch, grid.channels, height, width), torch.empty_like(x), *_stats_fake(x, rows))


def _add_layer_norm_to_map_setup(ctx, inputs, output):
    weight, window = inputs[3], inputs[8:10]
    y, s, mean, rstd = output
    ctx.window = window
    ctx.map_shape = y.shape
    ctx.save_for_backward(s, weight, mean, rstd)


def _add_layer_norm_to_map_grads(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = s.new_zeros(ctx.map_shape)
    ds, grad_plus, dw, db = _add_layer_norm_to_map_backward.op(grad_y, grad_s, s, weight, mean, rstd, *ctx.window)
    return ds, ds, grad_plus, dw, db, None, None, None, None, None


_add_layer_norm_to_map = FusedOp("add_layer_norm_to_map", _add_layer_norm_to_map_impl, _add_layer_norm_to_map_fake,
                                 backward=_add_layer_norm_to_map_grads, setup_context=_add_layer_norm_to_map_setup)


# ---- public functions and their PyTorch twins ----------------------------------------------------

def layer_norm_from_map(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(LayerNorm(tokens), tokens)`` of the map ``x`` ``[B, C, H, W]`` cut into ``window`` -sized
    windows of 2 x 2 patches (docs/model.md#windows-and-tokens), read by address from ``x`` (Triton)."""
    normed, tokens, _, _ = _layer_norm_from_map(x, weight, bias, eps, *window)
    return normed, tokens


def layer_norm_from_map_torch(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                              window: tuple[int, int]) -> tuple[Tensor, Tensor]:
    tokens = map_to_tokens(x, window)
    return F.layer_norm(tokens, tokens.shape[-1:], weight, bias, eps), tokens


def add_layer_norm_to_map(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor, eps: float,
                          height: int, width: int, window: tuple[int, int]) -> Tensor:
    """``LayerNorm(x + residual) + plus`` on tokens, written as the ``[B, C, height, width]`` map
    they were cut from: windows put back, patches undone, padding cropped (Triton)."""
    return _add_layer_norm_to_map(x, residual, plus, weight, bias, eps, height, width, *window)[0]


def add_layer_norm_to_map_torch(x: Tensor, residual: Tensor, plus: Tensor, weight: Tensor, bias: Tensor,
                                eps: float, height: int, width: int, window: tuple[int, int]) -> Tensor:
    s = x + residual
    return tokens_to_map(F.layer_norm(s, s.shape[-1:], weight, bias, eps) + plus, height, width, window)
