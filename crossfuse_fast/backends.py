"""The fast backend, imported only when a call asks for it: it needs Triton, the reference does not."""
from __future__ import annotations

from types import ModuleType

from torch import Tensor, nn

from .model import CrossFuse
from .reference import FusionNet


def fast_fusion_net(fusion: FusionNet) -> nn.Module:
    """``fusion`` with its cross encoder on the fast path (``train_fusion(backend="fast")``)."""
    return _fast_module().FastFusionNet(fusion)


def fast_image_layout(images: Tensor) -> Tensor:
    """``images`` in the layout the fast path runs its convolutions in (channels_last on a CPU)."""
    return _fast_module().image_layout(images)


def fast_crossfuse(model: CrossFuse) -> nn.Module:
    """``model`` on the fast path (``fuse(backend="fast")``)."""
    return _fast_module().FastCrossFuse(model)


def _fast_module() -> ModuleType:
    try:
        import triton  # noqa: F401  (the fast path's kernels, and their CPU twins beside them)
    except ImportError as error:
        raise ValueError("backend 'fast' needs Triton, which is not installed here (pip install triton, on "
                         "Linux); backend 'reference' runs without it") from error
    from . import fast
    return fast
