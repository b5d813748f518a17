"""Mutual information between each source and the fused image (Qu, Zhang and Yan 2002).

Signature and result as in :mod:`.statistics`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._images import as_batches, check_convention, entropy, joint_entropy, to_uint8


def _minmax_levels(x: Tensor) -> Tensor:
    """VIFB's requantisation: each image stretched to 0..1 by its own range (zeros if constant),
    times 255, rounded half away from zero (MATLAB ``int16``)."""
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    unit = torch.where(high > low, (x - low) / torch.where(high > low, high - low, 1.0), 0.0)
    return torch.floor(unit * 255 + 0.5).to(torch.int64)


def mi(fused, ir, vis, convention: str = "standard") -> Tensor:
    """``MI(A, F) + MI(B, F)``, each ``H(X) + H(F) - H(X, F)`` from the 256-bin histograms and the
    256 x 256 joint histogram of uint8 levels, in bits.

    ``li``: ``2 EN(F)`` whatever the sources: that code's joint entropy comes out 0 (``im2uint8``
    puts every row label into one bin), which is why its MI values are near 13-14.
    ``tang``: its joint histogram (``Hab.m``) indexes ``uint8 + 1``, which saturates, so there
    levels 254 and 255 share a bin (the marginal entropies keep them apart).
    ``cddfuse``: in nats (``sklearn.metrics.mutual_info_score`` on the rounded values).
    ``vifb``: in nats, after each image is requantised by its own range (``metricsMutinf.m``).
    """
    check_convention(convention)
    f, a, b = as_batches(fused, ir, vis)
    if convention == "li":
        return 2 * entropy(to_uint8(f, convention))
    log = math.log if convention in ("cddfuse", "vifb") else math.log2
    if convention == "vifb":
        levels = [_minmax_levels(x) for x in (f, a, b)]
    else:
        levels = [to_uint8(x, convention) for x in (f, a, b)]
    level_f, level_a, level_b = levels
    h_f = entropy(level_f, log)
    joint = (lambda x: x.clamp(max=254)) if convention == "tang" else (lambda x: x)
    return sum(entropy(level_x, log) + h_f - joint_entropy(joint(level_x), joint(level_f), log)
               for level_x in (level_a, level_b))
