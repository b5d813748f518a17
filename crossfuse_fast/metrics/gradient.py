"""Edge-preservation metrics: Qabf (Xydeas and Petrovic 2000) and Nabf (Kumar's modified N^{AB/F}).

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._images import as_batches, check_convention, convolve, correlate

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
_SOBEL_Y = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], dtype=torch.float64)


def _qabf_edges(x: Tensor) -> tuple[Tensor, Tensor]:
    """Strength and orientation: Sobel by true convolution with zero padding, ``atan(Sy / Sx)``
    (pi/2 where Sx is 0)."""
    sx, sy = convolve(x, _SOBEL_X, "zeros"), convolve(x, _SOBEL_Y, "zeros")
    strength = torch.sqrt(sx * sx + sy * sy)
    angle = torch.where(sx == 0, math.pi / 2, torch.atan(sy / _nonzero(sx)))
    return strength, angle


def _nonzero(t: Tensor) -> Tensor:
    """``t`` with zeros replaced by ones, for divisions whose result is not used where ``t`` is 0."""
    return torch.where(t == 0, 1.0, t)


def _qabf_preservation(g_x: Tensor, a_x: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    # Where the strengths are equal the ratio is gF itself, a quirk every copy of the code keeps.
    ratio = torch.where(g_x > g_f, g_f / _nonzero(g_x), torch.where(g_x < g_f, g_x / _nonzero(g_f), g_f))
    orientation = 1 - (a_x - a_f).abs() / (math.pi / 2)
    q_g = 0.9994 / (1 + torch.exp(-15 * (ratio - 0.5)))
    q_a = 0.9879 / (1 + torch.exp(-22 * (orientation - 0.8)))
    return q_g * q_a


def qabf(fused, ir, vis, convention: str = "standard") -> Tensor:
    """``sum(Q_AF gA + Q_BF gB) / sum(gA + gB)`` with ``Q = Qg Qa`` from the Sobel strengths and
    orientations (L = 1). Every convention."""
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    g_f, a_f = _qabf_edges(f)
    total, weight = 0.0, 0.0
    for x in (a, b):
        g_x, a_x = _qabf_edges(x)
        total = total + (_qabf_preservation(g_x, a_x, g_f, a_f) * g_x).sum((-2, -1))
        weight = weight + g_x.sum((-2, -1))
    return total / weight


_NABF_V = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64) / 8
_NABF_H = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 8


def _nabf_edges(x: Tensor) -> tuple[Tensor, Tensor]:
    gv, gh = correlate(x, _NABF_V, "reflect"), correlate(x, _NABF_H, "reflect")
    both_zero = (gv == 0) & (gh == 0)
    # gh = 0 alone gives atan(+-inf) = +-pi/2, as in MATLAB.
    angle = torch.where(both_zero, 0.0, torch.atan(gv / torch.where(both_zero, 1.0, gh)))
    return torch.sqrt(gv * gv + gh * gh), angle


def _nabf(f: Tensor, a: Tensor, b: Tensor) -> Tensor:
    g_f, a_f = _nabf_edges(f)
    loss, weight_sum, strengths = 0.0, 0.0, []
    for x in (a, b):
        g_x, a_x = _nabf_edges(x)
        strengths.append(g_x)
        ratio = torch.where((g_x == 0) | (g_f == 0), 0.0,
                            torch.minimum(g_x, g_f) / _nonzero(torch.maximum(g_x, g_f)))
        orientation = ((a_x - a_f).abs() - math.pi / 2).abs() * 2 / math.pi
        q_g = 0.9999 / (1 + torch.exp(-19 * (ratio - 0.5)))
        q_a = 0.9995 / (1 + torch.exp(-22 * (orientation - 0.5)))
        weight = torch.where(g_x >= 2, g_x ** 1.5, 0.001)
        loss = loss + (1 - torch.sqrt(q_g * q_a)) * weight
        weight_sum = weight_sum + weight.sum((-2, -1))
    artefacts = (g_f > strengths[0]) & (g_f > strengths[1])
    return (torch.where(artefacts, loss, 0.0)).sum((-2, -1)) / weight_sum


def nabf(fused, ir, vis, convention: str = "standard") -> Tensor:
    """Artefacts added by fusion, lower is better: ``sum(na ((1 - Q_AF) wA + (1 - Q_BF) wB)) /
    sum(wA + wB)``, ``na = 1`` where the fused strength exceeds both sources', ``Q = sqrt(Qg Qa)``,
    weights ``g^1.5`` where ``g >= 2`` else 0.001; Sobel / 8 by correlation on a mirror-extended
    image.

    ``li``: on 0..1 inputs (so every weight is 0.001). ``tang``: the infrared image in the fused
    role, the visible and fused images as the sources (``analysis_nabf(ir, vis, fused)``).
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if convention == "li":
        return _nabf(f / 255.0, a / 255.0, b / 255.0)
    if convention == "tang":
        return _nabf(a, b, f)
    return _nabf(f, a, b)
