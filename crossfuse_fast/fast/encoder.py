"""The autoencoder's encoder with its dense blocks padded piece by piece
(docs/fast-path.md#dense-blocks-pad-each-piece-once), or, on the Triton kernels, each dense block
in one buffer with the padding done by address (docs/fast-path.md#not-fused-yet)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import kernels
from ..backends import DEFAULT_KERNEL_BACKEND, check_kernel_backend, resolve_kernel_backend
from ..reference import AutoEncoder
from ..reference.autoencoder import ConvLayer, DenseBlock
from .layout import image_layout


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


def dense_block_in_buffer(block: DenseBlock, x: Tensor) -> Tensor:
    """``block(x)`` on the Triton convolutions, which pad by address: without gradients the block's
    input and its three 64-channel pieces share one NHWC buffer (each layer reads the channels so
    far and writes the next 64, no ``cat``); with gradients each piece is concatenated (the
    in-place writes would record none)."""
    layers = (block.dense_conv0, block.dense_conv1, block.dense_conv2)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *block.parameters())):
        for layer in layers:
            x = torch.cat([x, _conv(layer, x)], dim=1)
        return _conv(block.adjust_conv, x)
    batch, channels, height, width = x.shape
    growth = layers[0].conv2d[0].out_channels
    buffer = torch.empty(batch, channels + len(layers) * growth, height, width, device=x.device, dtype=x.dtype,
                         memory_format=torch.channels_last)
    buffer[:, :channels].copy_(x)
    for index, layer in enumerate(layers):
        filled = channels + index * growth
        conv = layer.conv2d[0]
        kernels.conv2d_into(buffer[:, :filled], conv.weight, conv.bias, buffer[:, filled:filled + growth])
    return _conv(block.adjust_conv, buffer)


class FastAutoEncoder(nn.Module):
    """A reference :class:`AutoEncoder` (its own parameters) with :func:`dense_block` in its
    encoder: the same ``encode``, ``decode`` and call, bit for bit in the same layout.

    ``encode`` lays its images out by :func:`.layout.image_layout` (``channels_last``), and every
    map after follows them: PyTorch keeps each convolution, pad, pool and concat in the layout of
    its input, through the fusion network too. Where ``kernel_backend`` resolves to ``"triton"``
    (a GPU under ``"auto"``) the encoder's convolutions run on the Triton kernels instead, on NHWC
    maps, each dense block in one buffer (:func:`dense_block_in_buffer`): the same function up to
    rounding. Raises ``ValueError`` for dense blocks whose convolutions do not all pad by one
    pixel (the released 3 x 3 ones do).
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
        if resolve_kernel_backend(self.kernel_backend, images.device) == "triton":
            shallow = _conv(encoder.conv1, image_layout(images, True) / 255.0)
            block = dense_block_in_buffer
        else:
            shallow = encoder.conv1(image_layout(images, self.channels_last) / 255.0)
            block = dense_block
        x = encoder.pool(shallow)
        for layer in encoder.dense_blocks:
            x = block(layer, x) if isinstance(layer, DenseBlock) else layer(x)
        return shallow, x

    def decode(self, shallow: Tensor, deep: Tensor) -> Tensor:
        return self.reference.decode(shallow, deep)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(*self.encode(images))
