"""The autoencoder's encoder in dense buffers, forward and backward, for training on the kernels.

The encoder (docs/model.md) is a 3 x 3 convolution, a 2 x 2 max-pool, then dense blocks each
followed by a max-pool: three dense layers, each reading every channel so far and appending 64,
and an adjust convolution. Here each block is one NHWC buffer: every layer reads a channel slice of
it and writes its 64 channels after (:mod:`.implicit_gemm_conv`, padding by address), and the
convolution before each pool takes the pool in its epilogue, writing the pooled map into the
next block's buffer and its full map beside it. The full maps and the buffers are what the
backward needs, so nothing else is kept.

The backward walks the same buffers in reverse: the max-pool's gradient goes to the first
maximum of each 2 x 2 quad (as PyTorch's max-pool chooses it, from the stored full map; a
floored odd side's last row or column gets none); the adjust convolution's input gradient fills
a gradient buffer of the block's width, and each dense layer, from the last, reads its 64
channels of it and adds its input gradient into the channels before them in place. No ``cat``,
no padded map, no concatenated copy, forward or backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import reflect_pad_extended
from .compiler_options import COMPILER_OPTIONS, tf32_requested
from .implicit_gemm_conv import conv2d_bwd, conv2d_fwd, conv2d_pool_fwd
from .registry import FusedOp

BLOCK_M = 64
LAYERS_PER_BLOCK = 4
"""Three dense layers and the adjust convolution."""


@triton.jit
def _max_pool_bwd_kernel(
    FULL, GP, ADD, DX, pixels, height, width, channels,
    stride_fn, stride_fc, stride_fh, stride_fw, stride_gn, stride_gc, stride_gh, stride_gw,
    stride_an, stride_ac, stride_ah, stride_aw, stride_dn, stride_dc, stride_dh, stride_dw,
    HAS_ADD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A tile of full-resolution pixels by channels: the pooled gradient where the pixel is the first
    maximum of its quad (row-major; a NaN counts as the maximum, as in PyTorch), else zero; plus
    ``ADD``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < pixels
    mask = mask_m[:, None] & (offs_c < channels)[None, :]
    column = offs_m % width
    row = (offs_m // width) % height
    image = offs_m // (width * height)
    quad_row = row // 2
    quad_column = column // 2
    whole = mask & ((quad_row < height // 2) & (quad_column < width // 2))[:, None]
    corner = (image * stride_fn + 2 * quad_row * stride_fh + 2 * quad_column * stride_fw)[:, None]
    channel = offs_c[None, :] * stride_fc
    best = tl.load(FULL + corner + channel, mask=whole, other=0.0)
    first = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.int32)
    for position in tl.static_range(1, 4):
        value = tl.load(FULL + corner + (position // 2) * stride_fh + (position % 2) * stride_fw + channel,
                        mask=whole, other=0.0)
        larger = (value > best) | (value != value)
        best = tl.where(larger, value, best)
        first = tl.where(larger, position, first)
    mine = (row % 2) * 2 + column % 2
    pooled = (image * stride_gn + quad_row * stride_gh + quad_column * stride_gw)[:, None] + offs_c[None, :] * stride_gc
    grad = tl.load(GP + pooled, mask=whole & (first == mine[:, None]), other=0.0).to(tl.float32)
    if HAS_ADD:
        grad += tl.load(ADD + (image * stride_an + row * stride_ah + column * stride_aw)[:, None]
                        + offs_c[None, :] * stride_ac, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + (image * stride_dn + row * stride_dh + column * stride_dw)[:, None] + offs_c[None, :] * stride_dc,
             grad.to(DX.dtype.element_ty), mask=mask)


def max_pool_bwd(full: Tensor, grad_pooled: Tensor, add: Tensor | None = None) -> Tensor:
    """The gradient of ``full`` ``[B, C, H, W]`` through ``MaxPool2d(2)`` for the pooled gradient
    ``grad_pooled`` ``[B, C, H // 2, W // 2]``, plus ``add`` when given; channels_last."""
    batch, channels, height, width = full.shape
    out = torch.empty_like(full, memory_format=torch.channels_last)
    block_c = min(64, triton.next_power_of_2(channels))
    pixels = batch * height * width
    _max_pool_bwd_kernel[(triton.cdiv(pixels, BLOCK_M), triton.cdiv(channels, block_c))](
        full, grad_pooled, out if add is None else add, out, pixels, height, width, channels, *full.stride(),
        *grad_pooled.stride(), *(out if add is None else add).stride(), *out.stride(), HAS_ADD=add is not None,
        BLOCK_M=BLOCK_M, BLOCK_C=block_c, **COMPILER_OPTIONS)
    return out


def _nhwc(like: Tensor, channels: int, height: int, width: int) -> Tensor:
    return torch.empty(like.shape[0], channels, height, width, device=like.device, dtype=like.dtype,
                       memory_format=torch.channels_last)


def _blocks(weights: list[Tensor]) -> list[list[Tensor]]:
    return [weights[start:start + LAYERS_PER_BLOCK] for start in range(1, len(weights), LAYERS_PER_BLOCK)]


def _check(x: Tensor, weights: list[Tensor], biases: list[Tensor]) -> None:
    if x.dim() != 4 or min(x.shape) <= 0:
        raise ValueError(f"x must be a non-empty map [batch, channels, height, width], got shape {tuple(x.shape)}")
    if len(weights) % LAYERS_PER_BLOCK != 1 or len(biases) != len(weights):
        raise ValueError(f"expected the first convolution and four per dense block, each with a bias, got "
                         f"{len(weights)} weights and {len(biases)} biases")
    channels = weights[0].shape[0]
    for block in _blocks(weights):
        for weight in block[:-1]:
            if weight.shape[1] != channels:
                raise ValueError(f"a dense layer must read the {channels} channels before it, "
                                 f"got {tuple(weight.shape)}")
            channels += weight.shape[0]
        if block[-1].shape[1] != channels:
            raise ValueError(f"an adjust convolution must read the block's {channels} channels, "
                             f"got {tuple(block[-1].shape)}")
        channels = block[-1].shape[0]
    if min(x.shape[2:]) < 2 ** (1 + len(_blocks(weights))):
        raise ValueError(f"the encoder pools {1 + len(_blocks(weights))} times: sides of "
                         f"{2 ** (1 + len(_blocks(weights)))} pixels or more, got {x.shape[2]} x {x.shape[3]}")


def dense_encoder_fwd(x: Tensor, weights: list[Tensor], biases: list[Tensor], tf32: bool = False,
                      keep: bool = True) -> list[Tensor]:
    """``[shallow, deep, buffer, full, buffer, full, ...]``: the encoder's outputs, then per dense block
    its buffer and its adjust convolution's full map (what the backward reads); without ``keep``
    (inference) the outputs alone, and the full maps are not written."""
    _check(x, weights, biases)
    height, width = x.shape[2] // 2, x.shape[3] // 2
    shallow = _nhwc(x, weights[0].shape[0], *x.shape[2:])
    saved = []
    layer, source, full = 0, x, shallow
    for block in _blocks(weights):
        grown = block[-1].shape[1]
        buffer = _nhwc(x, grown, height, width)
        conv2d_pool_fwd(source, weights[layer], biases[layer], buffer[:, :block[0].shape[1]], full,
                        padding_mode="reflect", tf32=tf32)
        filled = block[0].shape[1]
        for index, weight in enumerate(block[:-1], start=layer + 1):
            conv2d_fwd(buffer[:, :filled], weight, biases[index], buffer[:, filled:filled + weight.shape[0]],
                       padding_mode="reflect", tf32=tf32)
            filled += weight.shape[0]
        layer += LAYERS_PER_BLOCK
        full = _nhwc(x, block[-1].shape[0], height, width) if keep else None
        saved += [buffer, full]
        source = buffer
        height, width = height // 2, width // 2
    deep = _nhwc(x, weights[-1].shape[0], height, width)
    conv2d_pool_fwd(source, weights[layer], biases[layer], deep, full, padding_mode="reflect", tf32=tf32)
    return [shallow, deep, *saved] if keep else [shallow, deep]


def dense_encoder_bwd(grad_shallow: Tensor, grad_deep: Tensor, x: Tensor, weights: list[Tensor],
                      saved: list[Tensor], input_gradient: bool, tf32: bool = False) -> list[Tensor]:
    """``[grad_x, *grad_weights, *grad_biases]`` of :func:`dense_encoder_fwd` (``saved`` its outputs
    after the first two); ``grad_x`` is empty without ``input_gradient``."""
    shallow, buffers, fulls = saved[0], saved[1::2], saved[2::2]
    grad_weights: list[Tensor] = [x.new_empty(0)] * len(weights)
    grad_biases: list[Tensor] = [x.new_empty(0)] * len(weights)
    grad_pooled = grad_deep
    for number in reversed(range(len(buffers))):
        buffer = buffers[number]
        first = 1 + number * LAYERS_PER_BLOCK
        adjust = first + LAYERS_PER_BLOCK - 1
        grad_full = max_pool_bwd(fulls[number], grad_pooled)
        grad_buffer, grad_weights[adjust], grad_biases[adjust] = conv2d_bwd(grad_full, buffer, weights[adjust],
                                                                            padding_mode="reflect", tf32=tf32)
        filled = buffer.shape[1]
        for index in reversed(range(first, adjust)):
            filled -= weights[index].shape[0]
            _, grad_weights[index], grad_biases[index] = conv2d_bwd(
                grad_buffer[:, filled:filled + weights[index].shape[0]], buffer[:, :filled], weights[index],
                padding_mode="reflect", tf32=tf32, add_into=grad_buffer[:, :filled])
        grad_pooled = grad_buffer[:, :filled]
    grad_conv1 = max_pool_bwd(shallow, grad_pooled, grad_shallow)
    grad_x, grad_weights[0], grad_biases[0] = conv2d_bwd(grad_conv1, x, weights[0], padding_mode="reflect",
                                                         tf32=tf32, input_gradient=input_gradient)
    return [grad_x, *grad_weights, *grad_biases]


# ---- registered ops ----------------------------------------------------------------------------

def _dense_encoder_impl(x: Tensor, weights: list[Tensor], biases: list[Tensor], tf32: bool,
                        keep: bool) -> list[Tensor]:
    return dense_encoder_fwd(x, weights, biases, tf32, keep)


def _dense_encoder_fake(x, weights, biases, tf32, keep):
    height, width = x.shape[2], x.shape[3]
    outputs = [_nhwc(x, weights[0].shape[0], height, width)]
    saved = []
    for block in _blocks(weights):
        height, width = height // 2, width // 2
        saved += [_nhwc(x, block[-1].shape[1], height, width), _nhwc(x, block[-1].shape[0], height, width)]
    return outputs + [_nhwc(x, weights[-1].shape[0], height // 2, width // 2)] + (saved if keep else [])


def _dense_encoder_backward_impl(grad_shallow: Tensor, grad_deep: Tensor, x: Tensor, weights: list[Tensor],
                                 saved: list[Tensor], input_gradient: bool, tf32: bool) -> list[Tensor]:
    return dense_encoder_bwd(grad_shallow, grad_deep, x, weights, saved, input_gradient, tf32)


def _dense_encoder_backward_fake(grad_shallow, grad_deep, x, weights, saved, input_gradient, tf32):
    return ([torch.empty_like(x, memory_format=torch.channels_last) if input_gradient else x.new_empty(0)]
            + [torch.empty_like(w) for w in weights] + [w.new_empty(w.shape[0]) for w in weights])


_dense_encoder_backward = FusedOp("dense_encoder_backward", _dense_encoder_backward_impl,
                                  _dense_encoder_backward_fake)


def _dense_encoder_setup(ctx, inputs, output):
    x, weights, _, ctx.tf32, _ = inputs
    ctx.save_for_backward(x, *weights, *output[:1], *output[2:])
    ctx.layers = len(weights)


def _dense_encoder_grads(ctx, grads):
    x, *rest = ctx.saved_tensors
    weights, saved = rest[:ctx.layers], rest[ctx.layers:]
    grad_shallow = torch.zeros_like(saved[0]) if grads[0] is None else grads[0]
    grad_deep = grads[1]
    if grad_deep is None:
        grad_deep = x.new_zeros(saved[0].shape[0], weights[-1].shape[0], *[s // 2 for s in saved[-1].shape[2:]])
    needs_x = ctx.needs_input_grad[0]
    result = _dense_encoder_backward.op(grad_shallow, grad_deep, x, list(weights), list(saved), needs_x, ctx.tf32)
    return result[0] if needs_x else None, result[1:1 + ctx.layers], result[1 + ctx.layers:], None, None


_dense_encoder = FusedOp("dense_encoder", _dense_encoder_impl, _dense_encoder_fake, backward=_dense_encoder_grads,
                         setup_context=_dense_encoder_setup)


def dense_encoder(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                  tf32: bool | None = None) -> tuple[Tensor, Tensor]:
    """The encoder ``(shallow, deep)`` of ``x`` ``[B, Cin, H, W]``: a 3 x 3 convolution (``weights[0]``),
    then per dense block three dense layers and an adjust convolution (four weights each), every
    convolution reflection-padded by one and each followed where the model pools by a 2 x 2
    max-pool, in one buffer per block (see the module's note); channels_last (Triton), with
    gradients for ``x``, every weight and every bias (the full maps the backward needs are kept only
    then). ``tf32`` as in :func:`.implicit_gemm_conv.conv2d`."""
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases))
    shallow, deep, *_ = _dense_encoder(x, list(weights), list(biases), tf32_requested(tf32), keep)
    return shallow, deep


def dense_encoder_torch(x: Tensor, weights: list[Tensor], biases: list[Tensor], *,
                        tf32: bool | None = None) -> tuple[Tensor, Tensor]:
    """PyTorch twin of :func:`dense_encoder` (with autograd), in the layout of ``x``: the reference's
    padding, convolutions, concatenations and pools."""
    _check(x, weights, biases)

    def conv(y: Tensor, index: int) -> Tensor:
        return F.conv2d(reflect_pad_extended(y, 1, 1, 1, 1), weights[index], biases[index])

    shallow = conv(x, 0)
    y = F.max_pool2d(shallow, 2)
    for number, block in enumerate(_blocks(weights)):
        first = 1 + number * LAYERS_PER_BLOCK
        for index in range(first, first + len(block) - 1):
            y = torch.cat([y, conv(y, index)], dim=1)
        y = F.max_pool2d(conv(y, first + len(block) - 1), 2)
    return shallow, y
