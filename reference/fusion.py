"""Stage 2 of CrossFuse: the fusion network (cross encoder over windows + fusion decoder).

What it computes: docs/model.md#fusion-decoder and docs/model.md#stage-2-training. Names follow
the released checkpoint (``cross_atten_block``, ``decoder_fusion``, ``decoder_fusion.weight.conv_de``,
the unused ``conv_gra``), so it loads with ``strict=True``.
"""
from __future__ import annotations

import torch
from torch import nn

from .autoencoder import ConvLayer
from .functional import LAPLACIAN, from_windows, match_size, minmax_to_255, to_windows
from .transformer import CrossEncoder


def box_filter(channels: int) -> nn.Conv2d:
    """A fixed 3 x 3 conv, zero padding 1, every weight 1/9: the box sum of the channel sum / 9."""
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0 / 9.0)
    conv.weight.requires_grad_(False)
    return conv


class SourceWeights(nn.Module):
    """The fixed box filters that weigh the two sources (``decoder_fusion.weight``)."""

    def __init__(self):
        super().__init__()
        self.conv_sh = box_filter(32)
        self.conv_de = box_filter(128)

    @torch.no_grad()
    def deep(self, ir_deep: torch.Tensor, vis_deep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activity weights of the deep maps, ``g / (g_ir + g_vis + 1e-6)``, without gradient."""
        g_ir, g_vis = self.conv_de(ir_deep), self.conv_de(vis_deep)
        total = g_ir + g_vis + 1e-6
        return g_ir / total, g_vis / total

    @torch.no_grad()
    def shallow(self, ir_shallow: torch.Tensor, vis_shallow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Detail weights of the shallow maps, from ``|x - box(x)|``, without gradient."""
        # sqrt(d^2) rather than |d|, as released: it rounds differently in the last bit.
        s_ir = torch.sqrt((ir_shallow - self.conv_sh(ir_shallow)) ** 2)
        s_vis = torch.sqrt((vis_shallow - self.conv_sh(vis_shallow)) ** 2)
        total = s_ir + s_vis + 1e-6
        return s_ir / total, s_vis / total


class FusionDecoder(nn.Module):
    """Fused deep map plus both sources' skip connections -> fused image on 0..255."""

    def __init__(self):
        super().__init__()
        self.weight = SourceWeights()
        self.conv1 = ConvLayer(128, 64, 3, batch_norm=True)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_block = nn.Sequential(
            ConvLayer(64, 64, 3, batch_norm=True), nn.Upsample(scale_factor=2, mode="nearest"),
            ConvLayer(64, 32, 3, batch_norm=True), nn.Upsample(scale_factor=2, mode="nearest"),
            ConvLayer(32, 32, 3, batch_norm=True))
        self.conv_last = ConvLayer(32, 1, 1, batch_norm=True)

    def forward(self, fused: torch.Tensor, ir_deep: torch.Tensor, ir_shallow: torch.Tensor,
                vis_deep: torch.Tensor, vis_shallow: torch.Tensor) -> torch.Tensor:
        y = self.upsample(self.deep_sum(fused, ir_deep, vis_deep), ir_shallow.shape[-2], ir_shallow.shape[-1])
        return self.output(self.shallow_sum(y, ir_shallow, vis_shallow))

    def deep_sum(self, fused: torch.Tensor, ir_deep: torch.Tensor, vis_deep: torch.Tensor) -> torch.Tensor:
        """Step 1 of docs/model.md#fusion-decoder: ``fused + w_ir ir_deep + w_vis vis_deep``."""
        w_ir, w_vis = self.weight.deep(ir_deep, vis_deep)
        return fused + w_ir * ir_deep + w_vis * vis_deep

    def upsampled(self, y: torch.Tensor) -> torch.Tensor:
        """Step 2 of docs/model.md#fusion-decoder without the size adjust: ``conv1``, then
        ``conv_block`` with its upsamplings, ``[B, 32, 8 h, 8 w]``."""
        return self.conv_block(self.up(self.conv1(y)))

    def upsample(self, y: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Step 2 of docs/model.md#fusion-decoder: :meth:`upsampled`, then the size adjust to
        ``height x width``."""
        return match_size(self.upsampled(y), height, width)

    def shallow_sum(self, y: torch.Tensor, ir_shallow: torch.Tensor, vis_shallow: torch.Tensor) -> torch.Tensor:
        """Step 3 of docs/model.md#fusion-decoder: ``y + 0.5 w_ir ir_shallow + w_vis vis_shallow``."""
        w_ir, w_vis = self.weight.shallow(ir_shallow, vis_shallow)
        # The 0.5 on the infrared term alone is as released (docs/model.md#fusion-decoder, step 3).
        return y + 0.5 * w_ir * ir_shallow + w_vis * vis_shallow

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """Step 4 of docs/model.md#fusion-decoder: ``conv_last``, then the per-image min-max stretch to 0..255."""
        return minmax_to_255(self.conv_last(y))


class FusionNet(nn.Module):
    """The released fusion network: ``forward(ir_deep, ir_shallow, vis_deep, vis_shallow, shift)``.

    Deep maps ``[B, 128, h, w]`` and shallow maps ``[B, 32, H, W]`` come from the two
    autoencoders' encoders. Any ``h, w >= 1`` works: the deep maps are cut into 32 x 32
    windows (docs/model.md#windows-and-tokens), each window goes through the cross encoder on
    its own, all windows of the batch in one call. Returns the fused image ``[B, 1, H, W]``, min-max stretched to 0..255.
    """

    def __init__(self):
        super().__init__()
        self.cross_atten_block = CrossEncoder()
        # In the released state dict and trainable, but used nowhere in the forward.
        self.conv_gra = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv_gra.weight.copy_(torch.tensor(LAPLACIAN).expand(32, 32, 3, 3))
        self.decoder_fusion = FusionDecoder()

    def fuse_deep(self, ir_deep: torch.Tensor, vis_deep: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """The cross encoder over every 32 x 32 window of the deep maps: ``[B, 128, h, w]``."""
        batch, _, height, width = ir_deep.shape
        fused = self.cross_atten_block(to_windows(ir_deep), to_windows(vis_deep), shift=shift)
        return from_windows(fused, batch, height, width)

    def forward(self, ir_deep: torch.Tensor, ir_shallow: torch.Tensor, vis_deep: torch.Tensor,
                vis_shallow: torch.Tensor, shift: bool = True, windows: bool = True) -> torch.Tensor:
        """With ``windows=False`` the cross encoder runs on each whole deep map as one window, as the
        released training code calls it (docs/model.md#stage-2-training): the same on 256 x 256
        crops, whose deep maps are one window, and different on other sizes, whose deep sides must
        then be even (2 x 2 patches)."""
        if windows:
            fused = self.fuse_deep(ir_deep, vis_deep, shift=shift)
        else:
            fused = self.cross_atten_block(ir_deep, vis_deep, shift=shift)
        return self.decoder_fusion(fused, ir_deep, ir_shallow, vis_deep, vis_shallow)
