"""A nearest 2x upsampling folded into the 3 x 3 convolution after it: four 2 x 2 phase convolutions
of the map before upsampling (docs/fast-path.md#upsamplings-folded-into-the-convolutions)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import is_channels_last


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
    with ``kernels = phase_kernels(w)``; the output keeps the layout of ``x``.

    Each output pixel's 3 x 3 window on the upsampled map covers only 2 x 2 pixels of ``x``, and
    which taps share a pixel depends only on the output's row and column parity: so each of the
    four parities is a 2 x 2 convolution of ``x``, all four in one call. Reflection padding the
    upsampled map equals upsampling ``x`` replicate-padded by one pixel and cropping one, so the
    convolutions run on that.
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


def is_nearest_2x(module: nn.Module) -> bool:
    """Whether ``module`` is a nearest-neighbour upsampling by 2 (what :func:`upsampled_conv` folds)."""
    return (isinstance(module, nn.Upsample) and module.mode == "nearest" and module.size is None
            and module.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)))
