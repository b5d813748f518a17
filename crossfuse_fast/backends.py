"""The backends a call may ask for; the fast one is imported only then, since it needs Triton and
the reference does not."""
from __future__ import annotations

import weakref
from types import ModuleType

from torch import nn

from .model import CrossFuse
from .reference import FusionNet

BACKENDS = ("reference", "fast")
"""What ``fuse``, ``train_autoencoder``, ``train_fusion`` and the command line take as ``backend``."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def fast_fusion_net(fusion: FusionNet) -> nn.Module:
    """``fusion`` on the fast path (:class:`~crossfuse_fast.fast.FastFusionNet`;
    ``train_fusion(backend="fast")``)."""
    return _fast_module().FastFusionNet(fusion)


_FAST_NETWORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``model -> (its modules' identities, its fast network)`` for :func:`fast_crossfuse`."""


def fast_crossfuse(model: CrossFuse) -> nn.Module:
    """``model`` on the fast path (``fuse(backend="fast")``), made once and reused while the model
    has the same modules.

    Making it reads the box filters' weights, and its first call derives the folded and merged
    weights (on a GPU: dozens of small launches and waits for the weights' values); reused, it
    derives them again only when a weight changes. A replaced module makes a new network; the
    entry goes with the model.
    """
    modules = tuple(map(id, model.modules()))
    cached = _FAST_NETWORKS.get(model)
    if cached is None or cached[0] != modules:
        cached = _FAST_NETWORKS[model] = (modules, _fast_module().FastCrossFuse(model))
    return cached[1]


def _fast_module() -> ModuleType:
    try:
        import triton  # noqa: F401  (the fast path's kernels, and their CPU twins beside them)
    except ImportError as error:
        raise ValueError("backend 'fast' needs Triton, which is not installed here (pip install triton, on "
                         "Linux); backend 'reference' runs without it") from error
    from . import fast
    return fast
