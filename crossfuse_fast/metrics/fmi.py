"""Feature mutual information, Haghighat's fast FMI (Haghighat and Razian 2014, ``fmi.m`` /
``analysis_fmi.m``), on raw pixels, on the image's DCT, or on its one-level Meyer wavelet transform.

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._images import as_batches, check_convention

WINDOW = 3
ROWS_PER_PASS = 64
"""Rows of windows computed at once: bounds the memory of the 9 x 9 joint distributions."""
_LOG2 = math.log(2)


def dct2(x: Tensor) -> Tensor:
    """MATLAB ``dct2`` (orthonormal 2-D DCT-II) of ``[B, H, W]``, as two matrix products."""
    def basis(n: int) -> Tensor:
        k = torch.arange(n, dtype=torch.float64, device=x.device)
        d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
        d[0] /= math.sqrt(2.0)
        return d
    return basis(x.shape[-2]) @ x @ basis(x.shape[-1]).T


def _windows(x: Tensor) -> Tensor:
    """The 3 x 3 windows of ``[B, H, W]`` as ``[B, N, 9]``, each in MATLAB's column-major order."""
    patches = F.unfold(x[:, None], WINDOW)  # [B, 9, N], row-major within a window
    order = [row + WINDOW * column for row in range(WINDOW) for column in range(WINDOW)]
    return patches.transpose(1, 2)[..., torch.tensor(order).argsort()]


def _normalised(x: Tensor) -> Tensor:
    """Each window (last dimension) min-max stretched to 0..1 (a constant one becomes ones)."""
    low, high = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    return torch.where(high > low, (x - low) / torch.where(high > low, high - low, 1.0), 1.0)


def _entropy_bits(p: Tensor) -> Tensor:
    return torch.where(p != 0, -p * torch.log(torch.where(p != 0, p, 1.0)), 0.0).sum(-1) / _LOG2


def _window_fmi(source: Tensor, fused: Tensor) -> Tensor:
    """FMI of each pair of windows ``[..., 9]`` (already normalised), by Nelsen's method: the
    joint distribution of the two 9-point distributions mixes the Frechet bound their correlation
    points to (upper for ``c >= 0``, lower for ``c < 0``) with their product."""
    p_s = source / source.sum(-1, keepdim=True)
    p_f = fused / fused.sum(-1, keepdim=True)
    cdf_s, cdf_f = p_s.cumsum(-1), p_f.cumsum(-1)
    centred_s, centred_f = p_s - p_s.mean(-1, keepdim=True), p_f - p_f.mean(-1, keepdim=True)
    numerator = (centred_s * centred_f).sum(-1)
    c = torch.where(numerator == 0, 0.0, numerator / torch.sqrt((centred_s ** 2).sum(-1) * (centred_f ** 2).sum(-1)))
    index = torch.arange(1, p_s.shape[-1] + 1, dtype=torch.float64, device=p_s.device)
    sd_s = torch.sqrt((index ** 2 * p_s).sum(-1) - (index * p_s).sum(-1) ** 2)
    sd_f = torch.sqrt((index ** 2 * p_f).sum(-1) - (index * p_f).sum(-1) ** 2)
    f_i, s_j = cdf_f[..., :, None], cdf_s[..., None, :]
    upper = torch.minimum(f_i, s_j)
    lower = (f_i + s_j - 1).clamp(min=0)
    bound = torch.where((c >= 0)[..., None, None], upper, lower)
    degenerate = (sd_s == 0) | (sd_f == 0) | (c == 0)
    bound_correlation = (bound - f_i * s_j).sum((-2, -1)) / torch.where(degenerate, 1.0, sd_f * sd_s)
    mix = torch.where(degenerate, 0.0, c / torch.where(degenerate, 1.0, bound_correlation))
    # The bound's probabilities: rectangle differences of its distribution function.
    padded = F.pad(bound, (1, 0, 1, 0))
    bound_pdf = padded[..., 1:, 1:] - padded[..., :-1, 1:] - padded[..., 1:, :-1] + padded[..., :-1, :-1]
    joint = mix[..., None, None] * bound_pdf + (1 - mix[..., None, None]) * p_f[..., :, None] * p_s[..., None, :]
    # Nelsen's mixture can go negative; the code takes the real part of -p log2(p).
    joint_entropy = torch.where(joint != 0, -joint * torch.log(torch.where(joint != 0, joint.abs(), 1.0)),
                                0.0).sum((-2, -1)) / _LOG2
    h_s, h_f = _entropy_bits(p_s), _entropy_bits(p_f)
    mi = h_s + h_f - joint_entropy
    return torch.where(mi == 0, 0.0, 2 * mi / (h_s + h_f))


def _fmi(features: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """The mean over 3 x 3 'valid' windows of the pair mean of FMI(source, fused) per window."""
    f, a, b = features
    height = f.shape[-2]
    total = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
    count = 0
    for top in range(0, height - WINDOW + 1, ROWS_PER_PASS):
        rows = slice(top, min(top + ROWS_PER_PASS, height - WINDOW + 1) + WINDOW - 1)
        wf, wa, wb = (_windows(x[:, rows]) for x in (f, a, b))
        same_a = (wa == wf).all(-1)
        fmi_a = torch.where(same_a, 1.0, _window_fmi(_normalised(wa), _normalised(wf)))
        # As released, the visible window is compared with the fused one as the infrared branch
        # left it: normalised, unless that branch found the windows equal.
        f_seen = torch.where(same_a[..., None], wf, _normalised(wf))
        same_b = (wb == f_seen).all(-1)
        fmi_b = torch.where(same_b, 1.0, _window_fmi(_normalised(wb), _normalised(f_seen)))
        total += ((fmi_a + fmi_b) / 2).sum(-1)
        count += wf.shape[1]
    return total / count


def fmi_pixel(fused, ir, vis, convention: str = "standard") -> Tensor:
    """FMI on raw pixels: 3 x 3 'valid' windows, each min-max normalised and divided by its sum
    into a 9-point distribution, the joint estimated by Nelsen's method, ``2 MI / (H_x + H_f)`` in
    bits (1 where the windows are equal, 0 where MI is 0), per window the pair mean, then the mean.

    ``li`` and ``tang``: their "FMI_pixel" is FMI on binary Sobel edge maps (``analysis_fmi``
    without a feature name defaults to 'edge', MATLAB's ``edge``), which is not implemented:
    ``NotImplementedError``.
    """
    check_convention(convention)
    if convention in ("li", "tang"):
        raise NotImplementedError(f"FMI_pixel under the {convention} convention (FMI on MATLAB edge maps) is not "
                                  "implemented")
    return _fmi(as_batches(fused, ir, vis))


def fmi_dct(fused, ir, vis, convention: str = "standard") -> Tensor:
    """FMI (as :func:`fmi_pixel`) on the DCT of each whole image (MATLAB ``dct2``, not 8 x 8
    blocks). Every convention."""
    check_convention(convention)
    return _fmi(tuple(dct2(x) for x in as_batches(fused, ir, vis)))


def _wavelet_mosaic(x: Tensor) -> Tensor:
    """``rerange([cA cH; cV cD])`` of each image: the one-level 2-D DWT with PyWavelets' discrete
    Meyer wavelet and symmetric extension, its four bands in a mosaic min-max stretched to 0..1
    (all ones if constant)."""
    import pywt

    mosaics = []
    for image in x.cpu().numpy():
        approximation, (horizontal, vertical, diagonal) = pywt.dwt2(image, "dmey", mode="symmetric")
        mosaics.append(torch.from_numpy(np.block([[approximation, horizontal], [vertical, diagonal]])))
    mosaic = torch.stack(mosaics).to(x)
    return _normalised(mosaic.flatten(-2)).view_as(mosaic)


def fmi_wavelet(fused, ir, vis, convention: str = "standard") -> Tensor:
    """FMI (as :func:`fmi_pixel`) on each image's one-level discrete Meyer wavelet transform, the
    mosaic ``[cA cH; cV cD]`` stretched to 0..1 (``analysis_fmi(..., 'wavelet')``), with
    PyWavelets' ``dmey`` (62 taps; computed in numpy on the CPU).

    ``li`` and ``tang`` call MATLAB's ``dwt2(x, 'dmey')``, whose ``dmey`` is another filter (102
    taps), which PyWavelets does not have and which moves the value by up to 0.0055 per image:
    ``NotImplementedError`` there.
    """
    check_convention(convention)
    if convention in ("li", "tang"):
        raise NotImplementedError(f"FMI_wavelet under the {convention} convention (MATLAB's 102-tap dmey filter) "
                                  "is not implemented")
    if importlib.util.find_spec("pywt") is None:
        raise NotImplementedError("FMI_wavelet needs PyWavelets: pip install PyWavelets")
    return _fmi(tuple(_wavelet_mosaic(x) for x in as_batches(fused, ir, vis)))
