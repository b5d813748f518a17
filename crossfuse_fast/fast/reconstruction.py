"""The autoencoder's reconstruction decoder on the Triton kernels (stage 1): each nearest 2x
upsampling before a 3 x 3 convolution folded into it as four phase convolutions
(docs/fast-path.md#upsamplings-folded-into-the-convolutions), every convolution padding by address."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..kernels.upsample_fold import phase_kernels
from ..reference.autoencoder import ConvLayer, ReconDecoder
from ..reference.functional import match_size
from .folded_conv import is_nearest_2x


def _conv(layer: ConvLayer, x: Tensor, upsampled: bool) -> Tensor:
    conv = layer.conv2d[0]
    if upsampled:
        return kernels.upsampled_conv(x, phase_kernels(conv.weight), conv.bias)
    return kernels.conv2d(x, conv.weight, conv.bias)


def decode_on_kernels(decoder: ReconDecoder, shallow: Tensor, deep: Tensor) -> Tensor:
    """``decoder(shallow, deep)`` (before the reconstruction's scaling by 255): ``conv1``, then the
    upsamplings and convolutions of ``conv_block`` with each upsampling before a 3 x 3 convolution
    folded into it (the last one, before the shallow map is added, runs as it is), the size adjust,
    ``+ shallow`` and ``conv_last``; with gradients, on the kernels' backwards."""
    modules = [decoder.conv1, decoder.up, *decoder.conv_block]
    x = deep
    pending_upsample = False
    for module in modules:
        if isinstance(module, ConvLayer):
            upsampled = pending_upsample and module.conv2d[0].kernel_size == (3, 3)
            if pending_upsample and not upsampled:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = _conv(module, x, upsampled)
            pending_upsample = False
        elif is_nearest_2x(module):
            if pending_upsample:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            pending_upsample = True
        else:
            x = module(x)
    if pending_upsample:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    x = match_size(x, shallow.shape[-2], shallow.shape[-1])
    return _conv(decoder.conv_last, x + shallow, False)
