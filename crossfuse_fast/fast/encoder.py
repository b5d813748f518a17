"""The autoencoder's encoder with its dense blocks padded piece by piece
(docs/fast-path.md#dense-blocks-pad-each-piece-once)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..reference import AutoEncoder
from ..reference.autoencoder import DenseBlock
from .layout import image_layout


def dense_block(block: DenseBlock, x: Tensor) -> Tensor:
    """``block(x)``, bit for bit, with the block's input and each new 64-channel piece
    reflection-padded once instead of the whole growing concatenation before every convolution."""
    layers = (block.dense_conv0, block.dense_conv1, block.dense_conv2)
    padded = layers[0].pad(x)
    for layer in layers:
        padded = torch.cat([padded, layer.pad(layer.conv2d(padded))], dim=1)
    return block.adjust_conv.conv2d(padded)


class FastAutoEncoder(nn.Module):
    """A reference :class:`AutoEncoder` (its own parameters) with :func:`dense_block` in its
    encoder: the same ``encode``, ``decode`` and call, bit for bit in the same layout.

    ``encode`` lays its images out by :func:`.layout.image_layout` (``channels_last``), and every
    map after follows them: PyTorch keeps each convolution, pad, pool and concat in the layout of
    its input, through the fusion network too. Raises ``ValueError`` for dense blocks whose
    convolutions do not all pad by one pixel (the released 3 x 3 ones do).
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
