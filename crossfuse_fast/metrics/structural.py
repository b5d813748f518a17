"""Structural similarity (Wang, Bovik, Sheikh and Simoncelli 2004) between each source and the
fused image.

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


MEF_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001)
"""MEF-SSIM's per-scale exponents (normalised to sum 1 when used)."""
MEF_WINDOW = 11
_MATLAB_EPS = float(torch.finfo(torch.float64).eps)


def _mef_ssim_scale(sources: list[Tensor], fused: Tensor, window: Tensor) -> Tensor:
    """MEF-SSIM at one scale (Ma, Zeng and Wang 2015, ``mef_ssim.m``): the mean of its quality map
    over 'valid' positions, ``[B]``, for ``sources`` and ``fused`` ``[B, H, W]``.

    ``mef_ssim.m`` loops over 11 x 11 patches; every quantity it forms per patch is a sum over the
    patch of the images, their squares or their products, so here they are box (``U``) and
    Gaussian (``G``) filters of those: the patch norms ``||x - mu|| = sqrt(121 var_U(x))``; the
    structure ``r = a sum_k c_k (x_k - mu_k)``, ``c_k = w_k / ed_k``, whose norm is
    ``sqrt(121 sum c_k c_l cov_U(x_k, x_l))``; and its Gaussian-weighted statistics
    ``var_G(r) = a^2 sum c_k c_l cov_G(x_k, x_l)``, ``cov_G(r, f) = a sum c_k cov_G(x_k, f)``.
    """
    size, c = MEF_WINDOW, (0.03 * 255) ** 2
    box = torch.full((size, size), 1.0 / (size * size), dtype=torch.float64)
    patch = size * size

    def box_cov(x: Tensor, y: Tensor) -> Tensor:
        return correlate(x * y, box) - correlate(x, box) * correlate(y, box)

    def gauss_cov(x: Tensor, y: Tensor) -> Tensor:
        return correlate(x * y, window) - correlate(x, window) * correlate(y, window)

    spreads = [torch.sqrt((patch * box_cov(x, x)).clamp(min=0)) for x in sources]
    ed = [spread + 0.001 for spread in spreads]
    total = sum(sources)
    numerator = torch.sqrt((patch * box_cov(total, total)).clamp(min=0))
    consistency = (numerator + _MATLAB_EPS) / (sum(spreads) + _MATLAB_EPS)
    consistency = torch.where(consistency > 1, 1 - _MATLAB_EPS, consistency)
    consistency = torch.where(consistency < 0, _MATLAB_EPS, consistency)
    power = torch.tan(torch.pi / 2 * consistency).clamp(max=10)
    weights = [(e / size) ** power + _MATLAB_EPS for e in ed]
    normaliser = sum(weights)
    coefficients = [w / normaliser / e for w, e in zip(weights, ed)]
    pairs = [(k, l) for k in range(len(sources)) for l in range(len(sources))]
    norm = torch.sqrt((patch * sum(coefficients[k] * coefficients[l] * box_cov(sources[k], sources[l])
                                   for k, l in pairs)).clamp(min=0))
    scale = torch.where(norm > 0, torch.stack(ed).amax(0) / torch.where(norm > 0, norm, 1.0), 1.0)
    sigma1 = scale ** 2 * sum(coefficients[k] * coefficients[l] * gauss_cov(sources[k], sources[l]) for k, l in pairs)
    sigma2 = gauss_cov(fused, fused)
    sigma12 = scale * sum(cf * gauss_cov(x, fused) for cf, x in zip(coefficients, sources))
    return ((2 * sigma12 + c) / (sigma1 + sigma2 + c)).mean((-2, -1))


def _halve(x: Tensor) -> Tensor:
    """MATLAB ``imfilter(x, ones(2) / 4, 'symmetric', 'same')(1:2:end, 1:2:end)`` on ``[N, H, W]``."""
    padded = F.pad(x[:, None], (0, 1, 0, 1), mode="replicate")
    return F.avg_pool2d(padded, 2, stride=1)[:, 0, ::2, ::2]


def ms_ssim(fused, ir, vis, convention: str = "standard") -> Tensor:
    """MS-SSIM as fusion papers compute it: MEF-SSIM (Ma, Zeng and Wang 2015) with the two sources
    as the exposure sequence, 3 scales weighted ``[0.0448, 0.2856, 0.3001]`` (normalised), the
    Gaussian window 11 x 11 sigma 1.5, ``C = (0.03 * 255)^2``, a 2 x 2 mean (symmetric padding)
    and decimation by 2 between scales (``analysis_ms_ssim.m``). Every convention; images of at
    least 44 x 44."""
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if min(f.shape[-2:]) < MEF_WINDOW * 4:
        raise ValueError(f"MS-SSIM needs images of at least {MEF_WINDOW * 4} x {MEF_WINDOW * 4} (three scales)")
    window = matlab_gaussian(MEF_WINDOW, 1.5)
    weights = torch.tensor(MEF_SCALE_WEIGHTS, dtype=torch.float64)
    weights = weights / weights.sum()
    sources = [a, b]
    score = torch.ones(f.shape[0], dtype=torch.float64, device=f.device)
    for level in range(3):
        if level:
            sources, f = [_halve(x) for x in sources], _halve(f)
        score = score * _mef_ssim_scale(sources, f, window) ** weights[level].item()
    return score
