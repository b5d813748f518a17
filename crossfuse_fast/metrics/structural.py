"""Structural similarity (Wang, Bovik, Sheikh and Simoncelli 2004) between each source and the
fused image.

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._images import as_batches, check_convention, correlate, matlab_gaussian


def ssim_map(x: Tensor, y: Tensor, window: Tensor, data_range: float, padding: str = "valid",
             sample_covariance: bool = False) -> Tensor:
    """The SSIM map of two ``[B, H, W]`` batches: local means, variances and covariance weighted
    by ``window`` (``padding`` as :func:`._images.correlate`), ``C1 = (0.01 L)^2``,
    ``C2 = (0.03 L)^2``; ``sample_covariance`` scales the (co)variances by ``N / (N - 1)``, N the
    window's size (scikit-image)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = correlate(x, window, padding), correlate(y, window, padding)
    scale = window.numel() / (window.numel() - 1) if sample_covariance else 1.0
    var_x = scale * (correlate(x * x, window, padding) - mu_x * mu_x)
    var_y = scale * (correlate(y * y, window, padding) - mu_y * mu_y)
    cov = scale * (correlate(x * y, window, padding) - mu_x * mu_y)
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(fused, ir, vis, convention: str = "standard") -> Tensor:
    """The pair mean of SSIM(source, fused): Gaussian window 11 x 11, sigma 1.5, K = (0.01, 0.03),
    L = 255, 'valid' positions only, the mean of the map.

    ``li`` and ``tang``: MATLAB ``ssim``: 'same' size with replicate padding and L = 1 (the
    double class), on 0..1 data for ``li``, on 0..255 data for ``tang`` (so its constants are
    those of 0..1 data). ``cddfuse``: the pair *sum* of scikit-image 0.19's
    ``structural_similarity`` defaults on float arrays: a 7 x 7 uniform window, sample
    covariance, data range 2, the map's mean away from a 3-pixel border. ``vifb``: the pair sum
    of the standard SSIM.
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    gaussian = matlab_gaussian(11, 1.5)
    if convention in ("li", "tang"):
        scale = 255.0 if convention == "li" else 1.0
        maps = [ssim_map(x / scale, f / scale, gaussian, 1.0, "replicate") for x in (a, b)]
    elif convention == "cddfuse":
        if min(f.shape[-2:]) < 7:
            raise ValueError("SSIM under cddfuse needs images of at least 7 x 7")
        uniform = torch.full((7, 7), 1 / 49, dtype=torch.float64)
        maps = [ssim_map(f, x, uniform, 2.0, "reflect", sample_covariance=True)[:, 3:-3, 3:-3] for x in (a, b)]
    else:
        if min(f.shape[-2:]) < 11:
            raise ValueError(f"SSIM under {convention} needs images of at least 11 x 11")
        maps = [ssim_map(x, f, gaussian, 255.0) for x in (a, b)]
    scores = [m.mean((-2, -1)) for m in maps]
    total = scores[0] + scores[1]
    return total if convention in ("cddfuse", "vifb") else total / 2
