"""The fused ops of each kernel backend, all with the signatures of the Triton functions."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels
from ..backends import resolve_kernel_backend


@dataclass(frozen=True)
class Ops:
    """What the fast cross encoder calls: the Triton ops, or their PyTorch twins."""

    layer_norm: Callable
    add_layer_norm: Callable
    linear_gelu: Callable
    self_attention: Callable
    cross_attention: Callable
    layer_norm_from_map: Callable
    add_layer_norm_to_map: Callable


OPS = {
    "torch": Ops(kernels.layer_norm_torch, kernels.add_layer_norm_torch, kernels.linear_gelu_torch,
                 kernels.self_attention_torch, kernels.cross_attention_torch, kernels.layer_norm_from_map_torch,
                 kernels.add_layer_norm_to_map_torch),
    "triton": Ops(kernels.layer_norm, kernels.add_layer_norm, kernels.linear_gelu, kernels.self_attention,
                  kernels.cross_attention, kernels.layer_norm_from_map, kernels.add_layer_norm_to_map),
}


def ops_for(kernel_backend: str, x: torch.Tensor) -> Ops:
    """The ops that ``kernel_backend`` (:data:`~crossfuse_fast.backends.KERNEL_BACKENDS`) runs on
    tensors like ``x`` (:func:`~crossfuse_fast.backends.resolve_kernel_backend`)."""
    return OPS[resolve_kernel_backend(kernel_backend, x)]
