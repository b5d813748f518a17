"""The fast backend, imported only when a call asks for it: it needs Triton, the reference does not."""
from __future__ import annotations

from torch import nn

from .reference import FusionNet


def fast_fusion_net(fusion: FusionNet) -> nn.Module:
    """``fusion`` with its cross encoder on the fast path (``backend="fast"``)."""
    try:
        import triton  # noqa: F401  (the fast path's kernels, and their CPU twins beside them)
    except ImportError as error:
        raise ValueError("backend 'fast' needs Triton, which is not installed here (pip install triton, on "
                         "Linux); backend 'reference' runs without it") from error
    from .fast import FastFusionNet
    return FastFusionNet(fusion)
