"""Metrics of grey levels and their differences: EN, SD, SF, AG, CC, SCD, PSNR.

Each takes the fused, infrared and visible images (``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``,
tensors or numpy arrays, grey levels on 0..255) and a convention (docs/metrics.md#conventions),
and gives one float64 value per image, ``[B]``. Metrics of the fused image alone take the
sources too, so that every metric has one signature.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._images import as_batches, check_convention, entropy, pearson, to_uint8


def en(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Entropy of the fused image: ``-sum p log2 p`` over the 256-bin histogram of its uint8
    levels (Roberts et al. 2008). Every convention; they differ only in how floats become uint8
    (``to_uint8``)."""
    check_convention(convention)
    f, _, _ = as_batches(fused, ir, vis)
    return entropy(to_uint8(f, convention))


def sd(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Standard deviation of the fused image, population (divided by N), on 0..255.

    ``li``: ``sqrt(sum((F/255 - mean(F/255))^2))``, not divided by N, so it grows with the image.
    """
    check_convention(convention)
    f, _, _ = as_batches(fused, ir, vis)
    if convention == "li":
        unit = f / 255.0
        return torch.sqrt(((unit - unit.mean((-2, -1), keepdim=True)) ** 2).sum((-2, -1)))
    return torch.sqrt(((f - f.mean((-2, -1), keepdim=True)) ** 2).mean((-2, -1)))


def sf(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Spatial frequency (Eskicioglu and Fisher 1995): ``sqrt(RF^2 + CF^2)``, RF the RMS of the
    ``(H-1) x W`` vertical differences, CF of the ``H x (W-1)`` horizontal ones.

    ``vifb``: both sums of squares divided by ``H W`` and ``sqrt(RF + CF)`` (VIFB
    ``metricsSpatial_frequency.m``).
    """
    check_convention(convention)
    f, _, _ = as_batches(fused, ir, vis)
    vertical = (f[:, 1:] - f[:, :-1]) ** 2
    horizontal = (f[:, :, 1:] - f[:, :, :-1]) ** 2
    if convention == "vifb":
        pixels = f.shape[-2] * f.shape[-1]
        return torch.sqrt((vertical.sum((-2, -1)) + horizontal.sum((-2, -1))) / pixels)
    return torch.sqrt(vertical.mean((-2, -1)) + horizontal.mean((-2, -1)))


def _gradient(x: Tensor, dim: int) -> Tensor:
    """``numpy.gradient`` (MATLAB ``gradient``) along ``dim``: central differences, one-sided at the ends."""
    head = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    middle = (x.narrow(dim, 2, x.shape[dim] - 2) - x.narrow(dim, 0, x.shape[dim] - 2)) / 2
    tail = x.narrow(dim, -1, 1) - x.narrow(dim, -2, 1)
    return torch.cat([head, middle, tail], dim)


def ag(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Average gradient: ``s = sqrt((Gx^2 + Gy^2) / 2)`` with ``numpy.gradient``'s differences,
    the mean over all pixels.

    ``tang`` and ``vifb``: the sum of ``s`` divided by ``(H-1)(W-1)`` (their ``AG_evaluation.m``
    and ``metricsAvg_gradient.m``).
    """
    check_convention(convention)
    f, _, _ = as_batches(fused, ir, vis)
    if min(f.shape[-2:]) < 3:
        raise ValueError("AG needs images of at least 3 x 3")
    s = torch.sqrt((_gradient(f, -1) ** 2 + _gradient(f, -2) ** 2) / 2)
    if convention in ("tang", "vifb"):
        return s.sum((-2, -1)) / ((f.shape[-2] - 1) * (f.shape[-1] - 1))
    return s.mean((-2, -1))


def cc(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Correlation coefficient: the pair mean of Pearson's r between each source and the fused image.

    ``tang``: the visible term centres the visible image with the infrared image's mean in its
    numerator (``CC_evaluation.m``).
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if convention != "tang":
        return (pearson(a, f) + pearson(b, f)) / 2
    centred_f = f - f.mean((-2, -1), keepdim=True)
    energy_f = (centred_f ** 2).sum((-2, -1))
    mean_a = a.mean((-2, -1), keepdim=True)
    r_a = ((a - mean_a) * centred_f).sum((-2, -1)) / torch.sqrt(((a - mean_a) ** 2).sum((-2, -1)) * energy_f)
    r_b = ((b - mean_a) * centred_f).sum((-2, -1)) / torch.sqrt(
        ((b - b.mean((-2, -1), keepdim=True)) ** 2).sum((-2, -1)) * energy_f)
    return (r_a + r_b) / 2


def scd(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Sum of the correlations of differences (Aslantas and Bendes 2015):
    ``corr2(F - B, A) + corr2(F - A, B)``. Every convention."""
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    return pearson(f - b, a) + pearson(f - a, b)


def psnr(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(255^2 / MSE)``, MSE the pair mean of the sources'
    mean squared errors against the fused image.

    ``tang``: ``20 log10(255 / sqrt(MSE))`` with MSE taken on data / 255, i.e. 48.13 dB above
    the standard (``PSNR_evaluation.m``). ``cddfuse``: ``10 log10(max(F)^2 / MSE)``. ``vifb``:
    each source's "MSE" is ``sqrt(sum of squares) / (H W)``, then ``20 log10(255 / sqrt(pair mean))``
    (``metricsPsnr.m``).
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if convention == "vifb":
        pixels = f.shape[-2] * f.shape[-1]
        quirk = (torch.sqrt(((a - f) ** 2).sum((-2, -1))) + torch.sqrt(((b - f) ** 2).sum((-2, -1)))) / (2 * pixels)
        return 20 * torch.log10(255.0 / torch.sqrt(quirk))
    mse = (((a - f) ** 2).mean((-2, -1)) + ((b - f) ** 2).mean((-2, -1))) / 2
    if convention == "tang":
        return 20 * torch.log10(255.0 / torch.sqrt(mse / 255.0 ** 2))
    peak = f.amax((-2, -1)) if convention == "cddfuse" else torch.full_like(mse, 255.0)
    return 10 * torch.log10(peak ** 2 / mse)


PSNR_TANG_OFFSET_DB = 20 * math.log10(255.0)
"""How far ``tang``'s PSNR lies above the standard one: 48.13 dB."""
