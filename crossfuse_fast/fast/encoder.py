"""The autoencoder's encoder with its dense blocks padded piece by piece
(docs/fast-path.md#dense-blocks-pad-each-piece-once), or, on the Triton kernels, each dense block
in one buffer, the padding done by address and each pool in the epilogue of the convolution before
it (docs/fast-path.md#the-convolutions-in-triton)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..backends import DEFAULT_KERNEL_BACKEND, check_kernel_backend, resolve_kernel_backend
from ..reference import AutoEncoder
from ..reference.autoencoder import ConvLayer, DenseBlock, Encoder
from .layout import image_layout
from .reconstruction import decode_on_kernels


def dense_block(block: DenseBlock, x: Tensor) -> Tensor:
    """``block(x)``, bit for bit, with the block's input and each new 64-channel piece
    reflection-padded once instead of the whole growing concatenation before every convolution."""
    layers = (block.dense_conv0, block.dense_conv1, block.dense_conv2)
    padded = layers[0].pad(x)
    for layer in layers:
        padded = torch.cat([padded, layer.pad(layer.conv2d(padded))], dim=1)
    return block.adjust_conv.conv2d(padded)


def _conv(layer: ConvLayer, x: Tensor) -> Tensor:
    conv = layer.conv2d[0]
    return kernels.conv2d(x, conv.weight, conv.bias)


def _dense_layers(block: DenseBlock) -> tuple[ConvLayer, ConvLayer, ConvLayer]:
    return block.dense_conv0, block.dense_conv1, block.dense_conv2


def dense_block_on_kernels(block: DenseBlock, x: Tensor) -> Tensor:
    """``block(x)`` on the Triton convolutions (padding by address), each 64-channel piece
    concatenated: for encoders of another layout than the released one (:func:`chains_pools`)."""
    for layer in _dense_layers(block):
        x = torch.cat([x, _conv(layer, x)], dim=1)
    return _conv(block.adjust_conv, x)


def _is_pool2(module: nn.Module) -> bool:
    pair = (lambda value: value if isinstance(value, tuple) else (value, value))
    return (isinstance(module, nn.MaxPool2d) and pair(module.kernel_size) == (2, 2) and pair(module.stride) == (2, 2)
            and pair(module.padding) == (0, 0) and pair(module.dilation) == (1, 1) and not module.ceil_mode)


def chains_pools(encoder: Encoder) -> bool:
    """Whether ``encoder`` has the released layout that ``kernels.dense_encoder`` runs: a 2 x 2 max-pool
    after the first convolution, and dense blocks each followed by one."""
    layers = list(encoder.dense_blocks)
    return (_is_pool2(encoder.pool) and len(layers) % 2 == 0 and all(isinstance(m, DenseBlock) for m in layers[0::2])
            and all(_is_pool2(m) for m in layers[1::2]))


class FastAutoEncoder(nn.Module):
    """A reference :class:`AutoEncoder` (its own parameters) with :func:`dense_block` in its
    encoder: the same ``encode``, ``decode`` and call, bit for bit in the same layout.

    ``encode`` lays its images out by :func:`.layout.image_layout` (``channels_last``), and every
    map after follows them: PyTorch keeps each convolution, pad, pool and concat in the layout of
    its input, through the fusion network too. Where ``kernel_backend`` resolves to ``"triton"``
    (a GPU under ``"auto"``) the encoder's convolutions run on the Triton kernels instead, on NHWC
    maps: each dense block in one buffer and each pool in its convolution's epilogue
    (:func:`crossfuse_fast.kernels.dense_encoder`, in inference and with gradients, its backward
    accumulating in the buffers too); the same function up to rounding. An encoder of
    another layout than the released one runs its pieces concatenated
    (:func:`dense_block_on_kernels`). Raises ``ValueError`` for dense blocks whose convolutions do
    not all pad by one pixel (the released 3 x 3 ones do).
    """

    def __init__(self, reference: AutoEncoder, channels_last: bool | None = None,
                 kernel_backend: str = DEFAULT_KERNEL_BACKEND):
        super().__init__()
        check_kernel_backend(kernel_backend)
        self.reference = reference
        self.channels_last = channels_last
        self.kernel_backend = kernel_backend
        if not all(layer.pad.padding == 1 for block in self._dense_blocks() for layer in
                   (block.dense_conv0, block.dense_conv1, block.dense_conv2, block.adjust_conv)):
            raise ValueError("FastAutoEncoder needs dense blocks whose convolutions all pad by one pixel (3 x 3, "
                             "as released): it pads each piece once for all of them")

    def _dense_blocks(self) -> list[DenseBlock]:
        return [layer for layer in self.reference.fea_encoder1.dense_blocks if isinstance(layer, DenseBlock)]

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``AutoEncoder.encode``: ``(shallow, deep)`` of images on 0..255."""
        encoder = self.reference.fea_encoder1
        if resolve_kernel_backend(self.kernel_backend, images) == "triton":
            x = image_layout(images, True) / 255.0
            if chains_pools(encoder):
                layers = [encoder.conv1] + [layer for block in encoder.dense_blocks[0::2]
                                            for layer in (*_dense_layers(block), block.adjust_conv)]
                return kernels.dense_encoder(x, [layer.conv2d[0].weight for layer in layers],
                                             [layer.conv2d[0].bias for layer in layers])
            shallow = _conv(encoder.conv1, x)
            block = dense_block_on_kernels
        else:
            shallow = encoder.conv1(image_layout(images, self.channels_last) / 255.0)
            block = dense_block
        x = encoder.pool(shallow)
        for layer in encoder.dense_blocks:
            x = block(layer, x) if isinstance(layer, DenseBlock) else layer(x)
        return shallow, x

    def shallow(self, images: Tensor) -> Tensor:
        """``AutoEncoder.shallow``: the shallow map of :meth:`encode` alone (its first convolution)."""
        conv1 = self.reference.fea_encoder1.conv1
        if resolve_kernel_backend(self.kernel_backend, images) == "triton":
            return _conv(conv1, image_layout(images, True) / 255.0)
        return conv1(image_layout(images, self.channels_last) / 255.0)

    def decode(self, shallow: Tensor, deep: Tensor) -> Tensor:
        """``AutoEncoder.decode``; on the Triton kernels where the backend resolves to them
        (:func:`.reconstruction.decode_on_kernels`)."""
        if resolve_kernel_backend(self.kernel_backend, deep) == "triton":
            return decode_on_kernels(self.reference.recon_decoder1, shallow, deep) * 255.0
        return self.reference.decode(shallow, deep)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(*self.encode(images))
