"""Visual information fidelity in the pixel domain, VIFp (Sheikh and Bovik 2006, ``vifp_mscale``),
between each source (the reference) and the fused image (the distorted one).

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._images import as_batches, check_convention, correlate, matlab_gaussian

NOISE_VARIANCE = 2.0
EPS = 1e-10


def vifp(reference: Tensor, distorted: Tensor) -> Tensor:
    """Multiscale VIFp of two ``[B, H, W]`` batches: 4 scales, window ``2^(5-s) + 1`` with sigma
    window / 5, 'valid' filtering and decimation by 2 between scales, noise variance 2, the
    usual clamps; one ratio over all scales (not a mean of per-scale ratios)."""
    num = torch.zeros(reference.shape[0], dtype=torch.float64, device=reference.device)
    den = torch.zeros_like(num)
    for scale in range(1, 5):
        size = 2 ** (5 - scale) + 1
        window = matlab_gaussian(size, size / 5.0)
        if scale > 1:
            reference = correlate(reference, window)[:, ::2, ::2]
            distorted = correlate(distorted, window)[:, ::2, ::2]
        if min(reference.shape[-2:]) < size:
            raise ValueError("VIF needs images of at least 41 x 41 (its four scales)")
        mu_r, mu_d = correlate(reference, window), correlate(distorted, window)
        var_r = (correlate(reference * reference, window) - mu_r * mu_r).clamp(min=0)
        var_d = (correlate(distorted * distorted, window) - mu_d * mu_d).clamp(min=0)
        cov = correlate(reference * distorted, window) - mu_r * mu_d
        g = cov / (var_r + EPS)
        sv = var_d - g * cov
        flat_reference = var_r < EPS
        g = torch.where(flat_reference, 0.0, g)
        sv = torch.where(flat_reference, var_d, sv)
        var_r = torch.where(flat_reference, 0.0, var_r)
        flat_distorted = var_d < EPS
        g = torch.where(flat_distorted, 0.0, g)
        sv = torch.where(flat_distorted, 0.0, sv)
        sv = torch.where(g < 0, var_d, sv)
        g = g.clamp(min=0)
        sv = sv.clamp(min=EPS)
        num += torch.log10(1 + g * g * var_r / (sv + NOISE_VARIANCE)).sum((-2, -1))
        den += torch.log10(1 + var_r / NOISE_VARIANCE).sum((-2, -1))
    return num / den


def vif(fused, ir, vis, convention: str = "standard") -> Tensor:
    """The pair sum ``VIFp(A, F) + VIFp(B, F)`` (as ``tang`` and ``cddfuse`` compute "VIF").

    ``li`` computes VIF as the pair mean of the wavelet-domain ``vifvec``, which is not
    implemented: ``NotImplementedError``.
    """
    check_convention(convention)
    if convention == "li":
        raise NotImplementedError("VIF under the li convention (the wavelet-domain vifvec) is not implemented")
    f, a, b = as_batches(fused, ir, vis)
    return vifp(a, f) + vifp(b, f)
