"""Every backend name, how one is resolved, the defaults, and the networks each one runs.

Two choices, one after the other:

- ``backend`` (:data:`BACKENDS`), what ``fuse``, ``train_autoencoder``, ``train_fusion`` and the
  command line take: ``"reference"`` runs the reference model, ``"fast"`` the same weights on
  the fast path (:mod:`crossfuse_fast.fast`, docs/fast-path.md), ``"auto"`` (the default) the
  fast path where Triton is installed and the reference, with a notice, where it is not.
- ``kernel_backend`` (:data:`KERNEL_BACKENDS`), what the fast path's fused ops run on:
  ``"triton"`` the Triton kernels (a GPU, or ``TRITON_INTERPRET=1`` on a CPU), ``"torch"`` their
  PyTorch twins, ``"auto"`` (the default) the kernels on a GPU and the twins elsewhere.

The fast path is imported only when asked for: it needs Triton, and the reference does not.
"""
from __future__ import annotations

import weakref
from types import ModuleType

import torch
from torch import nn

from .model import CrossFuse
from .reference import AutoEncoder, FusionNet

BACKENDS = ("auto", "reference", "fast")
DEFAULT_BACKEND = "auto"
NO_TRITON_NOTICE = ("Triton is not installed, so the reference model runs (pip install triton, on Linux, for the "
                    "fast path; the same result up to rounding)")
KERNEL_BACKENDS = ("auto", "torch", "triton")
DEFAULT_KERNEL_BACKEND = "auto"


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def fast_available() -> bool:
    """Whether the fast path can run here (Triton imports)."""
    try:
        import triton  # noqa: F401  (the fast path's kernels, and their CPU twins beside them)
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """``"reference"`` or ``"fast"``: ``"auto"`` is the fast path where Triton is installed
    (:data:`NO_TRITON_NOTICE` says what happens elsewhere; callers show it)."""
    check_backend(backend)
    if backend == "auto":
        return "fast" if fast_available() else "reference"
    return backend


def check_kernel_backend(kernel_backend: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``kernel_backend`` is one of :data:`KERNEL_BACKENDS`."""
    if kernel_backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown backend {kernel_backend!r}; available: {', '.join(KERNEL_BACKENDS)}")


def resolve_kernel_backend(kernel_backend: str, x: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for a call on ``x``: ``"auto"`` is the Triton kernels on a GPU,
    their twins elsewhere. float64 always runs the twins: the kernels take 32- and 16-bit floats,
    and float64 is the dtype of the exactness checks (docs/fast-path.md)."""
    if x.dtype == torch.float64:
        return "torch"
    if kernel_backend == "auto":
        return "triton" if x.device.type == "cuda" else "torch"
    return kernel_backend


def fast_autoencoder(autoencoder: AutoEncoder) -> nn.Module:
    """``autoencoder`` on the fast path (``train_autoencoder(backend="fast")``, and the frozen
    encoders of ``train_fusion(backend="fast")``)."""
    return _fast_module().FastAutoEncoder(autoencoder)


def fast_fusion_net(fusion: FusionNet) -> nn.Module:
    """``fusion`` on the fast path (``train_fusion(backend="fast")``)."""
    return _fast_module().FastFusionNet(fusion)


_FAST_NETWORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""``model -> (its modules' identities, its fast network)`` for :func:`fast_crossfuse`."""


def fast_crossfuse(model: CrossFuse) -> nn.Module:
    """``model`` on the fast path (``fuse(backend="fast")``), made once and reused while the model
    has the same modules.

    Making it reads the box filters' weights, and its first call derives the folded and merged
    weights (on a GPU: small launches, and waits for the weights' values); reused, it derives them
    again only when a weight changes. A replaced module makes a new network; the entry goes with
    the model.
    """
    modules = tuple(map(id, model.modules()))
    cached = _FAST_NETWORKS.get(model)
    if cached is None or cached[0] != modules:
        cached = _FAST_NETWORKS[model] = (modules, _fast_module().FastCrossFuse(model))
    return cached[1]


def require_fast() -> None:
    """Raise ``ValueError`` saying what to do where the fast path cannot run (Triton missing)."""
    if not fast_available():
        raise ValueError("backend 'fast' needs Triton, which is not installed here (pip install triton, on "
                         "Linux); backend 'reference' runs without it")


def _fast_module() -> ModuleType:
    require_fast()
    from . import fast
    return fast
