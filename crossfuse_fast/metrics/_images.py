"""What the metrics share: batches in float64, the uint8 conversions the codebases use, filtering
with the paddings they use, MATLAB's Gaussian window, and histograms."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CONVENTIONS = ("standard", "li", "tang", "cddfuse", "vifb")
"""The codebases whose numbers the metrics reproduce (docs/metrics.md#conventions)."""


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; use one of {', '.join(CONVENTIONS)}")


def as_batch(image) -> Tensor:
    """A tensor or numpy array ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (any real dtype, grey
    levels on 0..255) -> float64 ``[B, H, W]`` on its device."""
    x = torch.from_numpy(np.asarray(image)) if not isinstance(image, Tensor) else image
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"images must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"images must hold real grey levels, got {x.dtype}")
    return x.to(torch.float64)


def as_batches(fused, ir, vis) -> tuple[Tensor, Tensor, Tensor]:
    """The three images of a metric as float64 ``[B, H, W]``, checked to share one shape."""
    f, a, b = as_batch(fused), as_batch(ir), as_batch(vis)
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"fused, ir and vis differ in shape: {tuple(f.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if min(f.shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2 x 2, got {f.shape[-2]} x {f.shape[-1]}")
    return f, a.to(f.device), b.to(f.device)


def to_uint8(x: Tensor, convention: str) -> Tensor:
    """Grey levels as the codebase's uint8 conversion makes them, as int64 0..255: MATLAB's
    ``uint8()`` rounds half away from zero and saturates; ``cddfuse`` uses ``np.round`` (half to
    even). Integral inputs are unchanged either way."""
    rounded = torch.round(x) if convention == "cddfuse" else torch.sign(x) * torch.floor(x.abs() + 0.5)
    return rounded.clamp(0, 255).to(torch.int64)


def correlate(x: Tensor, kernel: Tensor, padding: str = "valid") -> Tensor:
    """``x [B, H, W]`` correlated with ``kernel [k, l]`` (odd sides): ``"valid"``; ``"zeros"``,
    ``"replicate"`` or ``"reflect"`` (numpy's reflect: the edge is not repeated) keep the size."""
    kernel = kernel.to(x)
    height, width = kernel.shape
    x = x[:, None]
    if padding != "valid":
        pads = (width // 2, width // 2, height // 2, height // 2)
        x = F.pad(x, pads) if padding == "zeros" else F.pad(x, pads, mode=padding)
    column, row = kernel[:, width // 2], kernel[height // 2] / kernel[height // 2, width // 2]
    if kernel[height // 2, width // 2] != 0 and torch.allclose(torch.outer(column, row), kernel, rtol=1e-13, atol=0):
        # A separable window (Gaussian, uniform) as two 1-D passes: the same sums, far fewer of them.
        return F.conv2d(F.conv2d(x, column[None, None, :, None]), row[None, None, None, :])[:, 0]
    return F.conv2d(x, kernel[None, None])[:, 0]


def convolve(x: Tensor, kernel: Tensor, padding: str = "valid") -> Tensor:
    """True convolution (MATLAB ``conv2``, ``scipy.signal.convolve2d``): correlation with the
    kernel turned by 180 degrees."""
    return correlate(x, kernel.flip(0, 1), padding)


def matlab_gaussian(size: int, sigma: float) -> Tensor:
    """MATLAB ``fspecial('gaussian', size, sigma)``: entries below ``eps * max`` zeroed, normalised."""
    half = (size - 1) / 2
    axis = torch.arange(size, dtype=torch.float64) - half
    h = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma * sigma))
    h[h < torch.finfo(torch.float64).eps * h.max()] = 0
    return h / h.sum()


def entropy(levels: Tensor, log=math.log2) -> Tensor:
    """Shannon entropy per image of ``levels [B, H, W]`` (int64 0..255), 256 bins, in the unit of ``log``."""
    batch = levels.shape[0]
    counts = torch.bincount((levels + 256 * torch.arange(batch, device=levels.device)[:, None, None]).flatten(),
                            minlength=256 * batch).view(batch, 256).to(torch.float64)
    return _entropy_of_counts(counts, log)


def joint_entropy(first: Tensor, second: Tensor, log=math.log2) -> Tensor:
    """Entropy per image of the 256 x 256 joint histogram of two ``[B, H, W]`` level maps."""
    batch = first.shape[0]
    offsets = 65536 * torch.arange(batch, device=first.device)[:, None, None]
    counts = torch.bincount((first * 256 + second + offsets).flatten(), minlength=65536 * batch)
    return _entropy_of_counts(counts.view(batch, 65536).to(torch.float64), log)


def _entropy_of_counts(counts: Tensor, log) -> Tensor:
    p = counts / counts.sum(-1, keepdim=True)
    terms = torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(-1) * log(math.e)  # nats to the unit of log


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson's r per image (MATLAB ``corr2``) of two ``[B, H, W]`` batches."""
    x = x - x.mean((-2, -1), keepdim=True)
    y = y - y.mean((-2, -1), keepdim=True)
    return (x * y).sum((-2, -1)) / torch.sqrt((x * x).sum((-2, -1)) * (y * y).sum((-2, -1)))
