"""The convolution half on the fast path: the reference modules' own weights, fewer passes.

- **Dense blocks pad each piece once.** Reflection padding acts on each channel alone, so
  ``pad(cat(a, b)) == cat(pad(a), pad(b))``: the reference pads the whole growing concatenation
  before each of a block's four convolutions (32 + 96 + 160 + 224 channels in the first block),
  :func:`dense_block` pads the block's input and each new 64-channel piece once and builds the
  concatenation already padded. The same values bit for bit, with 56-64% fewer channels padded.
- **The fusion decoder's fixed box filters as their algebra** (:class:`FastFusionDecoder`, SPEC
  2.4): a channel sum and a one-channel box mean instead of two channel convolutions.
- **Its BatchNorms folded into the convolutions before them** in inference (eval mode, no
  gradient): one convolution with scaled weights and a shifted bias instead of a convolution and
  a normalisation pass each. Training, where BatchNorm uses the batch's statistics, runs them as
  they are.
- **Its nearest 2x upsamplings folded into the 3 x 3 convolutions after them**
  (:func:`upsampled_conv`): four 2 x 2 convolutions of the map before upsampling, one per output
  parity, 2.25x fewer multiply-adds (5.5 of the decoder's 11 GFLOP fewer at 480 x 640), and
  neither the upsampled nor the padded map is made. In training too.

Plain PyTorch: the same code runs on a CPU and on a GPU. Derived weights are cached and derived
again only when a tensor they come from changes (:class:`Derived`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .reference import AutoEncoder
from .reference.autoencoder import ConvLayer, DenseBlock
from .reference.functional import match_size, minmax_to_255
from .reference.fusion import FusionDecoder

T = TypeVar("T")


class Derived(Generic[T]):
    """``compute()``, computed again only when one of ``sources()`` changes: another tensor, new
    storage (``Module.to``) or a write into it (its version counter).

    So that calls need not read the weights they depend on, which on a GPU waits for the queued
    work. Inference tensors (made under ``torch.inference_mode``) keep no version counter, so
    with one among the sources the value is computed on every call.
    """

    def __init__(self, sources: Callable[[], tuple[Tensor | None, ...]], compute: Callable[[], T]):
        self.sources = sources
        self.compute = compute
        self._state: tuple | None = None
        self._value: T | None = None

    def get(self) -> T:
        sources = self.sources()
        if any(t is not None and t.is_inference() for t in sources):
            return self.compute()
        state = tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in sources)
        if state != self._state:
            self._value, self._state = self.compute(), state
        return self._value


def image_layout(images: Tensor, channels_last: bool | None = None) -> Tensor:
    """``images`` ``[B, 1, H, W]`` in the layout the fast path runs its convolutions in: channels_last
    (``channels_last=None``: on a CPU only, where it is measured faster), else as they are.

    With one channel both layouts hold the same data, and ``Tensor.contiguous(memory_format=...)``
    keeps the NCHW strides, from which PyTorch would pick NCHW for every convolution after; a
    copy into ``empty_like(memory_format=channels_last)`` gets the NHWC strides, which it follows.
    """
    if not (channels_last if channels_last is not None else images.device.type == "cpu"):
        return images
    return torch.empty_like(images, memory_format=torch.channels_last).copy_(images)


def is_channels_last(x: Tensor) -> bool:
    """Whether ``x`` has NHWC strides (and not also NCHW ones, as a one-pixel map has)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def dense_block(block: DenseBlock, x: Tensor) -> Tensor:
    """``block(x)``, with the block's input and each new piece reflection-padded once (see above)."""
    layers = (block.dense_conv0, block.dense_conv1, block.dense_conv2)
    padded = layers[0].pad(x)
    for layer in layers:
        padded = torch.cat([padded, layer.pad(layer.conv2d(padded))], dim=1)
    return block.adjust_conv.conv2d(padded)


class FastAutoEncoder(nn.Module):
    """A reference :class:`AutoEncoder` (its own parameters) with :func:`dense_block` in its
    encoder: the same ``encode``, ``decode`` and call, bit for bit in the same layout.

    ``encode`` lays its images out by :func:`image_layout` (``channels_last``), and every map
    after follows them: PyTorch keeps each convolution, pad, pool and concat in the layout of its
    input, through the fusion network too.
    """

    def __init__(self, reference: AutoEncoder, channels_last: bool | None = None):
        super().__init__()
        self.reference = reference
        self.channels_last = channels_last
        if not all(layer.pad.padding == 1 for block in self._dense_blocks() for layer in
                   (block.dense_conv0, block.dense_conv1, block.dense_conv2, block.adjust_conv)):
            raise ValueError("FastAutoEncoder needs dense blocks whose convolutions all pad by one pixel (3 x 3, "
                             "as released): it pads each piece once for all of them")

    def _dense_blocks(self) -> list[DenseBlock]:
        return [layer for layer in self.reference.fea_encoder1.dense_blocks if isinstance(layer, DenseBlock)]

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``AutoEncoder.encode``: ``(shallow, deep)`` of images on 0..255."""
        encoder = self.reference.fea_encoder1
        shallow = encoder.conv1(image_layout(images, self.channels_last) / 255.0)
        x = encoder.pool(shallow)
        for layer in encoder.dense_blocks:
            x = dense_block(layer, x) if isinstance(layer, DenseBlock) else layer(x)
        return shallow, x

    def decode(self, shallow: Tensor, deep: Tensor) -> Tensor:
        return self.reference.decode(shallow, deep)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(*self.encode(images))


def phase_kernels(weight: Tensor) -> Tensor:
    """``[4 C_out, C_in, 2, 2]``: for each output phase ``(row % 2, column % 2)``, the 2 x 2 kernel
    over the map before upsampling that a 3 x 3 ``weight`` amounts to (:func:`upsampled_conv`).

    An even output row's three kernel rows fall on two rows before upsampling, the first alone and
    the last two together; an odd row's, the first two together and the last alone. Columns alike.
    (Sums of the weight's own slices: no constant tensor to copy to the device on every call.)
    """
    def phases(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        first, middle, last = w.unbind(dim)
        return torch.stack([first, middle + last], dim), torch.stack([first + middle, last], dim)

    return torch.cat([column for row in phases(weight, 2) for column in phases(row, 3)])


def upsampled_conv(x: Tensor, kernels: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d(reflection_pad_1(nearest_upsample_2x(x)), w, bias)`` without making the upsampled map,
    with ``kernels = phase_kernels(w)``.

    Each output pixel's 3 x 3 window on the upsampled map covers only 2 x 2 pixels of ``x``, and
    which taps share a pixel depends only on the output's row and column parity: so each of the
    four parities is a 2 x 2 convolution of ``x`` (4 multiply-adds per input channel instead of 9),
    all four in one call. Reflection padding the upsampled map equals upsampling ``x``
    replicate-padded by one pixel and cropping one, so the convolutions run on that.
    """
    batch, _, height, width = x.shape
    channels = kernels.shape[0] // 4
    phases = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels,
                      None if bias is None else bias.repeat(4))
    layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    out = torch.empty(batch, channels, 2 * height, 2 * width, dtype=phases.dtype, device=phases.device,
                      memory_format=layout)
    for row in (0, 1):
        for column in (0, 1):
            first = (2 * row + column) * channels
            out[:, :, row::2, column::2] = phases[:, first:first + channels, row:row + height, column:column + width]
    return out


def _is_nearest_2x(module: nn.Module) -> bool:
    return (isinstance(module, nn.Upsample) and module.mode == "nearest" and module.size is None
            and module.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))


class FoldedConvLayer:
    """A reference :class:`ConvLayer` with a BatchNorm, as one convolution in inference; with
    ``upsampled``, applied to the nearest 2x upsampling of its input without making it.

    ``bn(conv(x)) = conv(x; w * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``
    while the norm uses its running statistics (eval mode); the same function up to rounding.
    ``upsampled`` (a 3 x 3 layer padding one pixel) computes the convolution as
    :func:`upsampled_conv`: 2.25x fewer multiply-adds, and neither the upsampled nor the padded
    map is made. Calls in training mode or with gradients enabled use the layer's own parameters
    and norm, so gradients reach them as they are.
    """

    def __init__(self, layer: ConvLayer, upsampled: bool = False):
        conv, norm = layer.conv2d
        if not (isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.track_running_stats):
            raise ValueError("FoldedConvLayer folds a BatchNorm2d with affine weights and running statistics")
        if upsampled and not (conv.kernel_size == (3, 3) and layer.pad.padding == 1 and conv.stride == (1, 1)
                              and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)):
            raise ValueError("FoldedConvLayer(upsampled=True) takes a 3 x 3 layer padding one pixel")
        self.layer = layer
        self.upsampled = upsampled
        self._weights = Derived(lambda: (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                                         norm.running_var), self._inference_weights)

    def _fold(self) -> tuple[Tensor, Tensor]:
        conv, norm = self.layer.conv2d
        with torch.no_grad():
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            bias = -norm.running_mean if conv.bias is None else conv.bias - norm.running_mean
            return conv.weight * scale.reshape(-1, 1, 1, 1), bias * scale + norm.bias

    def _inference_weights(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._fold()
        return (phase_kernels(weight), bias) if self.upsampled else (weight, bias)

    def __call__(self, x: Tensor) -> Tensor:
        conv, norm = self.layer.conv2d
        if norm.training or torch.is_grad_enabled():
            if self.upsampled:
                return norm(upsampled_conv(x, phase_kernels(conv.weight), conv.bias))
            return self.layer(x)
        weight, bias = self._weights.get()
        if self.upsampled:
            return upsampled_conv(x, weight, bias)
        return F.conv2d(self.layer.pad(x), weight, bias)


def _decoder_steps(modules: list[nn.Module]) -> list[Callable[[Tensor], Tensor]]:
    """``modules`` run one after the other, with each ConvLayer as a :class:`FoldedConvLayer` and a
    nearest 2x upsampling before a 3 x 3 one folded into it."""
    steps: list[Callable[[Tensor], Tensor]] = []
    for module in modules:
        if isinstance(module, ConvLayer):
            upsampled = bool(steps) and _is_nearest_2x(steps[-1]) and module.conv2d[0].kernel_size == (3, 3)
            if upsampled:
                steps.pop()
            steps.append(FoldedConvLayer(module, upsampled))
        else:
            steps.append(module)
    return steps


class FastFusionDecoder(nn.Module):
    """A reference :class:`FusionDecoder` (its own parameters): the same call and result, up to
    rounding, with its box filters as their algebra, its upsamplings folded into the convolutions
    after them and its BatchNorms folded in inference.

    The box algebra holds when each box filter's weights are all one value (as released and as
    ``box_filter`` makes them) and it has no bias; otherwise the reference decoder runs as it is.
    Both are checked when the decoder is made and again only when a weight changes.
    """

    def __init__(self, reference: FusionDecoder):
        super().__init__()
        self.reference = reference
        convs = (reference.weight.conv_de, reference.weight.conv_sh)
        # Checked here, before any work is queued: reading the weights' values waits for a GPU.
        self._box_values = Derived(lambda: tuple(t for conv in convs for t in (conv.weight, conv.bias)),
                                   lambda: uniform_box_values(reference))
        self._box_values.get()
        self._upsample_steps = _decoder_steps([reference.conv1, reference.up, *reference.conv_block])
        self._conv_last = FoldedConvLayer(reference.conv_last)

    def forward(self, fused: Tensor, ir_deep: Tensor, ir_shallow: Tensor, vis_deep: Tensor,
                vis_shallow: Tensor) -> Tensor:
        """``FusionDecoder.forward`` with ``conv_de`` and ``conv_sh`` computed as what they are
        (SPEC 2.4): a 3 x 3 conv whose weights are all one value ``w`` gives every output channel
        ``w`` times the 3 x 3 box sum of the channel sum, one channel broadcast. That replaces
        128 x 128 and 32 x 32 channel convolutions (12 GFLOP at 480 x 640) with a channel sum
        and a one-channel box sum."""
        box_values = self._box_values.get()
        if box_values is None:
            return self.reference(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
        # w times a 3 x 3 box sum is 9 w times the box mean, which needs no kernel tensor per call.
        deep_scale, shallow_scale = (9.0 * value for value in box_values)
        with torch.no_grad():  # as the reference's weights: no gradient through them
            g_ir = deep_scale * _box_mean_of_channel_sum(ir_deep)
            g_vis = deep_scale * _box_mean_of_channel_sum(vis_deep)
            total = g_ir + g_vis + 1e-6
            w_ir, w_vis = g_ir / total, g_vis / total
        y = self.upsample(fused + w_ir * ir_deep + w_vis * vis_deep, ir_shallow.shape[-2], ir_shallow.shape[-1])
        sources_need_grad = torch.is_grad_enabled() and (ir_shallow.requires_grad or vis_shallow.requires_grad)
        with torch.no_grad():
            s_ir = torch.sub(ir_shallow, _box_mean_of_channel_sum(ir_shallow), alpha=shallow_scale).abs_()
            s_vis = torch.sub(vis_shallow, _box_mean_of_channel_sum(vis_shallow), alpha=shallow_scale).abs_()
            total = torch.add(s_ir, s_vis).add_(1e-6)
            if not sources_need_grad:
                # The same sum as below, (0.5 s_ir ir + s_vis vis) / total, in place: 8 full-resolution
                # passes instead of 13 (480 x 640 on 2 CPU cores: 143 -> 61 ms).
                skip = s_ir.mul_(ir_shallow).mul_(0.5).addcmul_(s_vis, vis_shallow).div_(total)
        if sources_need_grad:
            skip = 0.5 * (s_ir / total) * ir_shallow + (s_vis / total) * vis_shallow
        return self.output(y + skip)  # the 0.5 on infrared alone, as released

    def upsample(self, y: Tensor, height: int, width: int) -> Tensor:
        """``FusionDecoder.upsample`` with its BatchNorms folded in inference and its upsamplings
        folded into the convolutions after them."""
        for step in self._upsample_steps:
            y = step(y)
        return match_size(y, height, width)

    def output(self, y: Tensor) -> Tensor:
        """``FusionDecoder.output`` with its BatchNorm folded in inference."""
        return minmax_to_255(self._conv_last(y))


def uniform_box_values(decoder: FusionDecoder) -> tuple[float, float] | None:
    """``(w_deep, w_shallow)``: the one value of all weights of ``conv_de`` and of ``conv_sh``, if both
    are bias-free 3 x 3, zero padding 1 convs whose weights are all equal; else None."""
    values = (_uniform_value(decoder.weight.conv_de), _uniform_value(decoder.weight.conv_sh))
    return None if None in values else values


def _uniform_value(conv: nn.Conv2d) -> float | None:
    shape_ok = (conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and conv.bias is None)
    weight = conv.weight
    if not shape_ok or not bool((weight == weight.flatten()[0]).all()):
        return None
    return weight.flatten()[0].item()


def _box_mean_of_channel_sum(x: Tensor) -> Tensor:
    """``[B, 1, H, W]``: the 3 x 3 mean (zero padding, always over 9) of ``x`` summed over its channels."""
    return F.avg_pool2d(x.sum(1, keepdim=True), 3, stride=1, padding=1, count_include_pad=True)
