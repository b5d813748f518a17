"""The autoencoder's reconstruction decoder on the Triton kernels (stage 1): each nearest 2x
upsampling before a 3 x 3 convolution folded into it as four phase convolutions
(docs/fast-path.md#upsamplings-folded-into-the-convolutions), the last one with the size adjust and
the added shallow map in one pass, every convolution padding by address."""
from __future__ import annotations

from torch import Tensor

from .. import kernels
from ..kernels.upsample_fold import phase_kernels
from ..reference.autoencoder import ConvLayer, ReconDecoder
from .folded_conv import is_nearest_2x


def _conv(layer: ConvLayer, x: Tensor, upsampled: bool) -> Tensor:
    conv = layer.conv2d[0]
    if upsampled:
        return kernels.upsampled_conv(x, phase_kernels(conv.weight), conv.bias)
    return kernels.conv2d(x, conv.weight, conv.bias)


def decode_on_kernels(decoder: ReconDecoder, shallow: Tensor, deep: Tensor) -> Tensor:
    """``decoder(shallow, deep)`` (before the reconstruction's scaling by 255): ``conv1``; the two
    convolutions of ``conv_block``, each with the upsampling before it folded in; the last upsampling,
    the size adjust and ``+ shallow`` in one pass (:func:`crossfuse_fast.kernels.size_adjust`); and
    ``conv_last``. With gradients, on the kernels' backwards."""
    first, up_first, second, up_second = decoder.conv_block
    if not all(map(is_nearest_2x, (decoder.up, up_first, up_second))):
        raise ValueError("decode_on_kernels takes the released ReconDecoder: nearest 2x upsamplings")
    x = _conv(decoder.conv1, deep, False)
    x = _conv(first, x, True)
    x = _conv(second, x, True)
    x = kernels.size_adjust(x, shallow.shape[-2], shallow.shape[-1], upsample=True, extra=shallow)
    return _conv(decoder.conv_last, x, False)
