"""Which memory layout the fast path runs its convolutions in (docs/fast-path.md#channels-last)."""
from __future__ import annotations

import torch
from torch import Tensor


def image_layout(images: Tensor, channels_last: bool | None = None) -> Tensor:
    """``images`` ``[B, 1, H, W]`` in the layout the fast path runs its convolutions in: channels_last
    (``channels_last=None``: on a CPU only, the one place it is measured faster), else as they are.

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
