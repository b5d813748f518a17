"""Where each token of a windowed feature map lives: the windows and patches of
docs/model.md#windows-and-tokens as index math.

A map ``[B, C, H, W]`` is reflection-padded on the bottom and right to multiples of the window,
cut into windows row-major, and each window's 2 x 2 patches become tokens, row-major, whose
vectors are channel-major (``c * 4 + dy * 2 + dx``). The result is a token tensor
``[B * nh * nw, tokens_per_window, 4 C]``. Every (row, feature) of it is one pixel of the map, so
the kernels at the two ends of the cross encoder compute that pixel's address
(:func:`window_token_offsets`) and read or write the map itself: no padded copy, no window
copy, no patch copy in between.

Reading mirrors coordinates past the map's edge (:func:`mirror_index`, the repeated reflection of
``reference.functional.reflect_pad_extended``, so maps of any size work). Writing leaves the
padding out, which crops. A backward that writes a gradient into the map does so into the
padded map (every pixel written once) and :func:`fold_reflection_padding` adds the margins back
onto the pixels they mirror.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.functional import PATCH, from_windows, patchify, to_windows, unpatchify


@dataclass(frozen=True)
class WindowGrid:
    """How a map ``[batch, channels, height, width]`` is cut into ``window`` -sized windows of tokens."""

    batch: int
    channels: int
    height: int
    width: int
    window_height: int
    window_width: int

    @classmethod
    def of(cls, shape, window: tuple[int, int]) -> WindowGrid:
        """The grid of a map of ``shape``; raises ``ValueError`` naming what does not fit."""
        if len(shape) != 4:
            raise ValueError(f"expected a feature map [batch, channels, height, width], got shape {tuple(shape)}")
        window_height, window_width = window
        if window_height <= 0 or window_width <= 0 or window_height % PATCH or window_width % PATCH:
            raise ValueError(f"window sides must be positive multiples of {PATCH}, got {tuple(window)}")
        batch, channels, height, width = shape
        if min(shape) <= 0:
            raise ValueError(f"feature map has an empty dimension: shape {tuple(shape)}")
        return cls(batch, channels, height, width, window_height, window_width)

    @property
    def windows_per_row(self) -> int:
        return -(-self.width // self.window_width)

    @property
    def windows_per_image(self) -> int:
        return -(-self.height // self.window_height) * self.windows_per_row

    @property
    def token_shape(self) -> tuple[int, int, int]:
        tokens = (self.window_height // PATCH) * (self.window_width // PATCH)
        return self.batch * self.windows_per_image, tokens, self.channels * PATCH * PATCH

    @property
    def padded_shape(self) -> tuple[int, int, int, int]:
        rows = self.windows_per_image // self.windows_per_row
        return (self.batch, self.channels, rows * self.window_height,
                self.windows_per_row * self.window_width)

    def kernel_args(self, addressed: Tensor) -> tuple[int, ...]:
        """The map geometry as :func:`window_token_offsets` takes it, for the map ``addressed``
        (the map itself or a padded gradient buffer: whose sides bound the valid pixels)."""
        return (*addressed.stride(), addressed.shape[2], addressed.shape[3], self.window_height,
                self.window_width, self.windows_per_row, self.windows_per_image)

    @classmethod
    def of_tokens(cls, tokens: Tensor, height: int, width: int, window: tuple[int, int]) -> WindowGrid:
        """The grid whose token tensor is ``tokens``, for an output map of ``height x width``."""
        if tokens.dim() != 3:
            raise ValueError(f"expected tokens [windows, tokens, features], got shape {tuple(tokens.shape)}")
        windows, count, features = tokens.shape
        if features % (PATCH * PATCH):
            raise ValueError(f"token features must be a multiple of {PATCH * PATCH}, got {features}")
        probe = cls.of((1, features // (PATCH * PATCH), height, width), window)
        if windows % probe.windows_per_image or count != probe.token_shape[1]:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not cut a {height} x {width} map into "
                             f"{probe.windows_per_image} windows of {probe.token_shape[1]} tokens each")
        return cls(windows // probe.windows_per_image, probe.channels, height, width, *window)


@triton.jit
def mirror_index(index, size):
    """Reflection of ``index >= 0`` about the edges of a side of ``size``, repeated for pads longer than
    the side (period 2 (n - 1)); a side of one pixel repeats it."""
    period = tl.maximum(2 * (size - 1), 1)
    index = index % period
    return tl.where(index >= size, period - index, index)


@triton.jit
def window_token_offsets(row, features, stride_b, stride_c, stride_h, stride_w, height, width, window_height,
                         window_width, windows_per_row, windows_per_image, MIRROR: tl.constexpr,
                         PATCH: tl.constexpr):
    """Offsets into the map of token ``row`` (a scalar), ``features`` (a vector), and which are inside.

    With ``MIRROR`` the coordinates past the edge are reflected back (a read of the padded map);
    without, they are reported outside (a write that crops).
    """
    patches_per_row = window_width // PATCH
    tokens_per_window = (window_height // PATCH) * patches_per_row
    window = row // tokens_per_window
    token = row % tokens_per_window
    image = window // windows_per_image
    window = window % windows_per_image
    top = (window // windows_per_row) * window_height + (token // patches_per_row) * PATCH
    left = (window % windows_per_row) * window_width + (token % patches_per_row) * PATCH
    channel = features // (PATCH * PATCH)
    y = top + (features // PATCH) % PATCH
    x = left + features % PATCH
    if MIRROR:
        y = mirror_index(y, height)
        x = mirror_index(x, width)
    inside = (y < height) & (x < width)
    return image * stride_b + channel * stride_c + y * stride_h + x * stride_w, inside


def map_to_tokens(x: Tensor, window: tuple[int, int]) -> Tensor:
    """The PyTorch twin of a windowed read: the reference's pad, windows and patches (copies)."""
    WindowGrid.of(x.shape, window)
    return patchify(to_windows(x, window))


def tokens_to_map(tokens: Tensor, height: int, width: int, window: tuple[int, int]) -> Tensor:
    """The PyTorch twin of a windowed write: the reference's un-patchify, windows put back, crop."""
    grid = WindowGrid.of_tokens(tokens, height, width, window)
    return from_windows(unpatchify(tokens, *window), grid.batch, height, width)


def mirrored_indices(size: int, padded: int, device: torch.device) -> Tensor:
    """Which pixel of a side of ``size`` each padded position ``size .. padded - 1`` reflects."""
    period = max(2 * (size - 1), 1)
    index = torch.arange(size, padded, device=device) % period
    return torch.where(index >= size, period - index, index)


def fold_reflection_padding(grad: Tensor, height: int, width: int) -> Tensor:
    """The adjoint of the bottom/right reflection pad: crop ``grad`` to ``height x width`` and add
    every padded pixel's gradient onto the pixel it mirrors."""
    for dim, size in ((2, height), (3, width)):
        padded = grad.shape[dim]
        if padded > size:
            index = mirrored_indices(size, padded, grad.device)
            grad = grad.narrow(dim, 0, size).index_add(dim, index, grad.narrow(dim, size, padded - size))
    return grad
