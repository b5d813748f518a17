"""Stage 1 of CrossFuse: the per-modality autoencoder (docs/model.md#stage-1-the-autoencoders).

Module and attribute names follow the released checkpoints (``fea_encoder1``,
``recon_decoder1``, ``conv2d.0``), so ``load_state_dict(strict=True)`` takes the authors' files.
"""
from __future__ import annotations

import torch
from torch import nn

from .functional import match_size, reflect_pad_extended


class ReflectionPad(nn.Module):
    """``nn.ReflectionPad2d`` that also pads maps of one pixel (by repeating it).

    Only images under 16 pixels a side have one-pixel maps (at H/8); everywhere else this is
    exactly ``nn.ReflectionPad2d``, see :func:`reflect_pad_extended`.
    """

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reflect_pad_extended(x, self.padding, self.padding, self.padding, self.padding)


class ConvLayer(nn.Module):
    """``ReflPad(k // 2)`` then ``Conv2d(cin, cout, k)``, and a BatchNorm when ``batch_norm``.

    The padding is a stateless layer before the ``conv2d`` Sequential, which is why the
    checkpoint keys read ``<name>.conv2d.0.weight`` (and ``conv2d.1.*`` for the norm).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, batch_norm: bool = False):
        super().__init__()
        self.pad = ReflectionPad(kernel_size // 2)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        self.conv2d = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d(self.pad(x))


class DenseConv(ConvLayer):
    """``cat([x, ConvLayer(cin, 64, 3)(x)])``: one dense layer."""

    def __init__(self, in_channels: int, growth: int = 64):
        super().__init__(in_channels, growth, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], dim=1)


class DenseBlock(nn.Module):
    """Three dense layers (each adding 64 channels), then ``adjust_conv`` to 128 channels."""

    def __init__(self, in_channels: int, growth: int = 64, out_channels: int = 128):
        super().__init__()
        self.dense_conv0 = DenseConv(in_channels, growth)
        self.dense_conv1 = DenseConv(in_channels + growth, growth)
        self.dense_conv2 = DenseConv(in_channels + 2 * growth, growth)
        self.adjust_conv = ConvLayer(in_channels + 3 * growth, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjust_conv(self.dense_conv2(self.dense_conv1(self.dense_conv0(x))))


class Encoder(nn.Module):
    """``x`` (0..1) -> ``(shallow [B, 32, H, W], deep [B, 128, H/8, W/8])``, sizes floored."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvLayer(1, 32, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.dense_blocks = nn.Sequential(
            DenseBlock(32), nn.MaxPool2d(2, 2), DenseBlock(128), nn.MaxPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shallow = self.conv1(x)
        deep = self.dense_blocks(self.pool(shallow))
        return shallow, deep


class ReconDecoder(nn.Module):
    """Stage-1 reconstruction: deep map up to full size, plus the shallow map, to one channel."""

    def __init__(self):
        super().__init__()
        self.conv1 = ConvLayer(128, 64, 3)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_block = nn.Sequential(
            ConvLayer(64, 64, 3), nn.Upsample(scale_factor=2, mode="nearest"),
            ConvLayer(64, 32, 3), nn.Upsample(scale_factor=2, mode="nearest"))
        self.conv_last = ConvLayer(32, 1, 1)

    def forward(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        x = self.conv_block(self.up(self.conv1(deep)))
        x = match_size(x, shallow.shape[-2], shallow.shape[-1])
        return self.conv_last(x + shallow)


class AutoEncoder(nn.Module):
    """One modality's autoencoder with the released hyper-parameters.

    ``encode`` and ``forward`` take images ``[B, 1, H, W]`` on 0..255 (H, W >= 8);
    ``forward`` returns the reconstruction on the same scale.
    """

    def __init__(self):
        super().__init__()
        self.fea_encoder1 = Encoder()
        self.recon_decoder1 = ReconDecoder()

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shallow [B, 32, H, W], deep [B, 128, H//8, W//8])`` of images on 0..255."""
        return self.fea_encoder1(images / 255.0)

    def shallow(self, images: torch.Tensor) -> torch.Tensor:
        """The shallow map of :meth:`encode` alone (its first convolution), ``[B, 32, H, W]``."""
        return self.fea_encoder1.conv1(images / 255.0)

    def decode(self, shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        """Reconstruction on 0..255 from the encoder's two maps."""
        return self.recon_decoder1(shallow, deep) * 255.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(images))
