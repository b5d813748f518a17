"""Visual information fidelity in the pixel domain, VIFp (Sheikh and Bovik 2006, ``vifp_mscale``),
between each source (the reference) and the fused image (the distorted one), and VIFF, its
fusion form (Han et al. 2013), on the same per-scale model.

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ._images import as_batches, check_convention, correlate, matlab_gaussian

NOISE_VARIANCE = 2.0
EPS = 1e-10
VIFF_NOISE_VARIANCE = 0.005 * 255 * 255
VIFF_C = 1e-7
VIFF_WEIGHTS = (1.0, 0.0, 0.15, 1.0)
"""Han et al.'s per-scale weights, divided by their sum (2.15)."""


def _scale_statistics(reference: Tensor, distorted: Tensor):
    """Per scale ``s = 1..4`` of the shared model (Sheikh and Bovik's ``vifp_mscale``, which
    Han et al.'s ``ComVidVindG`` repeats): ``(g, sigma_r^2, sv^2)`` maps after the clamps, window
    ``2^(5-s) + 1`` with sigma window / 5, 'valid' filtering and decimation by 2 between scales."""
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
        yield g, var_r, sv.clamp(min=EPS)


def vifp(reference: Tensor, distorted: Tensor) -> Tensor:
    """Multiscale VIFp of two ``[B, H, W]`` batches: 4 scales, window ``2^(5-s) + 1`` with sigma
    window / 5, 'valid' filtering and decimation by 2 between scales, noise variance 2, the
    usual clamps; one ratio over all scales (not a mean of per-scale ratios)."""
    num = torch.zeros(reference.shape[0], dtype=torch.float64, device=reference.device)
    den = torch.zeros_like(num)
    for g, var_r, sv in _scale_statistics(reference, distorted):
        num += torch.log10(1 + g * g * var_r / (sv + NOISE_VARIANCE)).sum((-2, -1))
        den += torch.log10(1 + var_r / NOISE_VARIANCE).sum((-2, -1))
    return num / den


def vif(fused, ir, vis, convention: str = "standard") -> Tensor:
    """The pair sum ``VIFp(A, F) + VIFp(B, F)`` (as ``tang`` and ``cddfuse`` compute "VIF").

    ``li`` computes VIF as the pair mean of the wavelet-domain ``vifvec`` on 0..1 images
    (:func:`.vifvec.vifvec`, with ``pyrtools``; in numpy on the CPU, one image at a time).
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if convention == "li":
        from .vifvec import vifvec
        if importlib.util.find_spec("pyrtools") is None:
            raise NotImplementedError("VIF under the li convention (the wavelet-domain vifvec) needs pyrtools: "
                                      "pip install pyrtools")
        images = [x.cpu().numpy() / 255.0 for x in (f, a, b)]
        values = [(vifvec(ir_image, fused_image) + vifvec(vis_image, fused_image)) / 2
                  for fused_image, ir_image, vis_image in zip(*images)]
        return torch.tensor(values, dtype=torch.float64, device=f.device)
    return vifp(a, f) + vifp(b, f)


def viff(fused, ir, vis, convention: str = "standard") -> Tensor:
    """VIFF, the fusion VIF of Han, Cai, Cao and Xu (Information Fusion 14(2), 2013; their
    ``VIFF_Public.m``): the model of :func:`vifp` between each source and the fused image with
    visual noise ``0.005 * 255^2``; at each position of each scale the source whose gain ``g``
    is smaller (the visible one where they tie) gives the visual information with distortion
    ``VID = log10(1 + g^2 sigma_r^2 / (sv^2 + noise))`` and without ``VIND = log10(1 +
    sigma_r^2 / noise)``; per scale ``sum(VID + C) / sum(VIND + C)`` with ``C = 1e-7`` per
    position; the result is the weighted sum of the scales, weights ``[1, 0, 0.15, 1] / 2.15``.
    The same under every convention (none of the codebases computes it differently)."""
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    total = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
    for weight, (ir_scale, vis_scale) in zip(VIFF_WEIGHTS, zip(_scale_statistics(a, f), _scale_statistics(b, f))):
        informations = []
        for g, var_r, sv in (ir_scale, vis_scale):
            with_distortion = torch.log10(1 + g * g * var_r / (sv + VIFF_NOISE_VARIANCE))
            informations.append((g, with_distortion, torch.log10(1 + var_r / VIFF_NOISE_VARIANCE)))
        (g_ir, vid_ir, vind_ir), (g_vis, vid_vis, vind_vis) = informations
        ir_smaller = g_ir < g_vis
        vid = torch.where(ir_smaller, vid_ir, vid_vis)
        vind = torch.where(ir_smaller, vind_ir, vind_vis)
        total += weight / sum(VIFF_WEIGHTS) * (vid + VIFF_C).sum((-2, -1)) / (vind + VIFF_C).sum((-2, -1))
    return total
