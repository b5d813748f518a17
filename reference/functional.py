"""Plain-PyTorch functions the reference model calls (docs/model.md).

Each one is the readable twin of an op the fast path fuses, so tests, benchmarks and the
model use the same definition. Shapes use one notation: ``[B, C, H, W]`` feature maps,
``[B, N, D]`` token sequences, ``[B, heads, N, head_dim]`` attention operands.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

WINDOW = 32
"""Side of one attention window, in deep-feature pixels (docs/model.md#windows-and-tokens)."""

PATCH = 2
"""Side of one patch: a window of 32 x 32 deep pixels holds 16 x 16 = 256 tokens."""

LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
"""The 4-neighbour Laplacian: the released ``conv_gra``'s initial value and the stage-2 gradient loss's kernel."""


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, reverse: bool,
                  scale: float | None = None) -> torch.Tensor:
    """``softmax(sign * (q k^T) * scale) v`` on ``[B, heads, N, head_dim]`` operands.

    ``reverse=True`` is CrossFuse's reversed softmax (sign -1: the least correlated keys
    weigh most, docs/model.md#blocks); ``reverse=False`` the ordinary one. ``scale`` defaults to
    ``head_dim ** -0.5``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale
    if reverse:
        scores = -scores
    return scores.softmax(dim=-1) @ v


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads * d]`` -> ``[B, heads, N, d]``: channel ``head * d + i`` is head ``head``.

    Always a view (the last dimension split in two), so kernels may write through it. Neither
    this nor :func:`merge_heads` reads the batch or token count, so that a traced export
    (crossfuse_fast.export) keeps them dynamic.
    """
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def split_packed_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """``[B, N, parts * heads * d]`` (e.g. a packed ``q | k | v`` projection) -> ``parts`` views
    ``[B, heads, N, d]``, each as :func:`split_heads` of its column block."""
    return split_heads(x, parts * heads).unflatten(1, (parts, heads)).unbind(1)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` -> ``[B, N, heads * d]``, the inverse of :func:`split_heads`."""
    return x.transpose(1, 2).flatten(2)


def patchify(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``.

    Token ``i * (W/p) + j`` is patch row ``i``, column ``j``; its vector is the patch
    flattened channel-major (``c * p * p + dy * p + dx``), docs/model.md#windows-and-tokens.
    """
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch, p2=patch)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch: int = PATCH) -> torch.Tensor:
    """``[B, (H/p)(W/p), C p p]`` -> ``[B, C, H, W]``, the inverse of :func:`patchify`."""
    return rearrange(tokens, "b (h w) (c p1 p2) -> b c (h p1) (w p2)",
                     h=height // patch, w=width // patch, p1=patch, p2=patch)


def reflect_pad_extended(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """Reflection padding of ``[B, C, H, W]`` that also works when a pad reaches the map's size.

    ``F.pad(mode="reflect")`` needs every pad smaller than the side it extends, which is why
    the released code fails on images whose deep map is 16 pixels or less. Here the padding
    is applied in steps that each satisfy that rule, which extends the map by repeated
    mirroring (period ``2 (n - 1)`` for a side of ``n``): identical to one reflection pad
    whenever that is possible. A side of one pixel has nothing to mirror and is repeated.
    """
    height, width = x.shape[-2:]
    if width == 1:
        x = F.pad(x, (left, right, 0, 0), mode="replicate")
        left = right = 0
    if height == 1:
        x = F.pad(x, (0, 0, top, bottom), mode="replicate")
        top = bottom = 0
    while left or right or top or bottom:
        height, width = x.shape[-2:]
        step = (min(left, width - 1), min(right, width - 1), min(top, height - 1), min(bottom, height - 1))
        x = F.pad(x, step, mode="reflect")
        left, right, top, bottom = left - step[0], right - step[1], top - step[2], bottom - step[3]
    return x


def match_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The decoders' size adjust (docs/model.md#size-adjust): reflection-pad ``x`` to ``height x width``.

    A difference ``d`` is split ``d // 2`` before and ``d - d // 2`` after. Nothing happens
    when the sizes already agree (always the case on the 256 x 256 training crops).
    """
    dh, dw = height - x.shape[-2], width - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="reflect")


def to_windows(x: torch.Tensor, window: int | tuple[int, int] = WINDOW) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B * nh * nw, C, wh, ww]``, windows row-major per image.

    The map is reflection-padded on the bottom and right to multiples of the window (``window``
    x ``window`` unless given as ``(wh, ww)``; docs/model.md#windows-and-tokens), with
    :func:`reflect_pad_extended` so maps of 16 pixels or less work too.
    """
    window_height, window_width = (window, window) if isinstance(window, int) else window
    height, width = x.shape[-2:]
    x = reflect_pad_extended(x, 0, -width % window_width, 0, -height % window_height)
    return rearrange(x, "b c (nh h) (nw w) -> (b nh nw) c h w", h=window_height, w=window_width)


def from_windows(windows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: put the windows back and crop to ``height x width``."""
    x = rearrange(windows, "(b nh nw) c h w -> b c (nh h) (nw w)", b=batch, nh=-(-height // windows.shape[-2]))
    return x[:, :, :height, :width]


def minmax_to_255(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel: ``(x - min) / (max - min + 1e-6) * 255`` over H x W
    (docs/model.md#fusion-decoder)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    return (x - low) / (high - low + 1e-6) * 255.0
